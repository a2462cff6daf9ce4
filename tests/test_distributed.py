"""The GPU paths, guarded on CPU: what a run on GPUs and many nodes relies on, run here on gloo ranks (bf16 mixed
precision under FSDP2 with a reference, checkpointing and an evaluation; HSDP over two torchrun agents; the
reference pass with every remainder of its last block; the head check decided together; a datasets cache per rank;
rank 0's objects never broadcast), and what cannot run here, mocked (a resume with fewer visible GPUs, the
process-group timeout)."""

import datetime
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import rundir
import train
import utils
from test_train import ENV, EQUIV, HERE, assert_same_params, base_args, metrics, params, torchrun


def launch(script, args, tmp_path, n=2, timeout=240):
    """A worker script under torchrun on n gloo ranks -> the finished process (a hang fails by the timeout)."""
    (tmp_path / "worker.py").write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           str(tmp_path / "worker.py"), HERE, *args]
    return subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=timeout)


REF_WORKER = """
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import data, models, train, utils
from transformers import AutoTokenizer
model, pairs_file, out = sys.argv[2], sys.argv[3], sys.argv[4]
rank, world, device = utils.init_distributed("cpu")
cfg = train.Config(model=model, device="cpu", dtype="fp32", output_dir=out, micro_batch_size=1)
tok = AutoTokenizer.from_pretrained(model)
pairs, _ = data.tokenize_preferences(data.load_preferences(pairs_file), tok)
ref = models.load_model(model, cfg, models.make_mesh(cfg, world, device), device, trainable=False)
found = {}
for n in (5, 6, 7, 8):  # blocks of 4: a last block of 1, 2, 3 and 4 pairs, split over 2 ranks
    batch_of = lambda idx, n=n: train.collate(pairs.select(range(n)), idx, data.pad_id(tok), train.Method(None), device)
    values = models.reference_logps(ref, n, batch_of, f"{out}/ref_logps", f"n{n}", {"n": n}, 1, rank, world, block=4)
    found[n] = {i: [v[0].tolist(), v[1].tolist()] for i, v in values.items()}
if rank == 0:
    json.dump(found, open(f"{out}/found.json", "w"))
utils.end_group()
utils.exit_now(0)  # no finalization: see utils.exit_now
"""


def test_the_reference_pass_on_two_ranks_with_every_remainder_of_its_last_block(world, tmp_path):
    """A last block smaller than the number of ranks left a rank with nothing to forward, and FSDP's collectives
    unmatched (an abort on gloo, a hang on nccl). Every remainder mod the block size now runs, and every pair's
    log-probs equal the unsharded model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import data
    proc = launch(REF_WORKER, [world["llama-tiny"], world["small"], str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads((tmp_path / "found.json").read_text())
    tok = AutoTokenizer.from_pretrained(world["llama-tiny"])
    pairs, _ = data.tokenize_preferences(data.load_preferences(world["small"]), tok)
    model = AutoModelForCausalLM.from_pretrained(world["llama-tiny"])
    import losses
    for n, values in found.items():
        assert sorted(map(int, values)) == list(range(int(n)))
        for i, (chosen, rejected) in values.items():
            ex = pairs[int(i)]
            for side, got in (("chosen", chosen), ("rejected", rejected)):
                ids = torch.tensor([ex[f"{side}_input_ids"]])
                logps, mask = losses.token_logps(model(input_ids=ids).logits, torch.tensor([ex[f"{side}_labels"]]))
                torch.testing.assert_close(torch.tensor(got), logps[mask], rtol=1e-5, atol=1e-5)


CHECK_WORKER = """
import sys
import torch
sys.path.insert(0, sys.argv[1])
import models, train, utils
model, out = sys.argv[2], sys.argv[3]
rank, world, device = utils.init_distributed("cpu")
cfg = train.Config(model=model, device="cpu", dtype="fp32")
wrapped = models.load_model(model, cfg, models.make_mesh(cfg, world, device), device, trainable=True)
if rank == 1:  # one rank's head transforms its logits: only that rank sees the gap
    wrapped.model.lm_head.register_forward_hook(lambda module, args, output: output * 1.5)
ids = torch.arange(1, 25).reshape(2, 12) % 50
labels = ids.clone()
labels[:, :4] = -100
try:
    wrapped(ids, torch.ones_like(ids), labels)
    said = "passed"
except SystemExit as e:
    said = str(e)
open(f"{out}/rank{rank}.txt", "w").write(said)
utils.end_group()
utils.exit_now(0)  # no finalization: see utils.exit_now
"""


def test_the_head_check_is_decided_together(world, tmp_path):
    """Each rank used to decide alone, so one rank stopping left the others in FSDP's next collective: now the gap
    is all-reduced, and every rank stops with the same message."""
    proc = launch(CHECK_WORKER, [world["llama-tiny"], str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert said[0] == said[1] and "use --logp_path logits" in said[0]


BROADCAST_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
import utils
rank, world, device = utils.init_distributed("cpu")


def refuse():
    raise RuntimeError("unpickled on another rank")


class NodeLocal:  # as a Dataset: its pickle names files that another node does not have
    def __init__(self):
        self.rank = utils._rank()

    def __reduce__(self):
        return (refuse, ())


got = utils.rank_zero_first(NodeLocal)
assert got.rank == rank  # each rank built its own
shared = utils.on_rank_zero(lambda: {"from": utils._rank()})
assert shared == {"from": 0}
open(f"{sys.argv[2]}/rank{rank}.txt", "w").write("ok")
import torch.distributed as dist
utils.end_group()
utils.exit_now(0)  # no finalization: see utils.exit_now
"""


def test_rank_zero_first_broadcasts_no_object_of_rank_zero(tmp_path):
    """rank_zero_first used to broadcast rank 0's Datasets, which pickle as paths into rank 0's cache: a node
    whose cache is its own failed on unpickling. Only the error is broadcast now."""
    proc = launch(BROADCAST_WORKER, [str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all((tmp_path / f"rank{r}.txt").read_text() == "ok" for r in (0, 1))


def test_a_datasets_cache_per_rank(world, tmp_path):
    """Two ranks, each with a datasets cache of its own (as nodes with local disks): each tokenizes into its
    own, and the run equals a one-rank run."""
    launcher = tmp_path / "per_rank.py"
    cache = os.path.join(str(tmp_path), "cache")
    launcher.write_text("import os, runpy, sys\n"
                        f"os.environ['HF_DATASETS_CACHE'] = {cache!r} + os.environ['RANK']\n"
                        f"sys.argv[0] = {os.path.join(HERE, 'train.py')!r}\n"
                        f"sys.path.insert(0, {HERE!r})\n"
                        f"runpy.run_path({os.path.join(HERE, 'train.py')!r}, run_name='__main__')\n")
    args = [a for a in base_args(world, tmp_path / "two", method="simpo", **EQUIV)]
    i = args.index("--cache_dir")
    args[i + 1] = ""  # Hugging Face's default: HF_DATASETS_CACHE
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(launcher), *args]
    proc = subprocess.run(cmd, env=ENV, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(any((tmp_path / f"cache{r}").rglob("*.arrow")) for r in (0, 1))
    train.main(base_args(world, tmp_path / "one", method="simpo", **EQUIV))
    assert_same_params(tmp_path / "one", tmp_path / "two", atol=2e-6)


def test_bf16_under_fsdp2_with_a_reference_checkpointing_and_an_evaluation(world, tmp_path):
    """--dtype bf16 on 2 gloo ranks: FSDP2's MixedPrecisionPolicy (bf16 parameters in compute, fp32 reduction and
    master weights), a frozen reference, activation checkpointing, a held-out evaluation; the run lands near the
    fp32 one-rank run (bf16 rounding apart) and far from the start."""
    from transformers import AutoModelForCausalLM
    extra = dict(method="dpo", eval_data=world["small"], eval_every=2, activation_checkpointing="true", **EQUIV)
    torchrun(2, base_args(world, tmp_path / "bf16", dtype="bf16", **extra))
    train.main(base_args(world, tmp_path / "fp32", **extra))
    lines = metrics(tmp_path / "bf16", "eval")
    assert [m["step"] for m in lines] == [0, 2, 4] and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)
    start = AutoModelForCausalLM.from_pretrained(world["llama-tiny"]).state_dict()
    bf16, fp32 = params(tmp_path / "bf16"), params(tmp_path / "fp32")
    moved = torch.cat([(fp32[k] - start[k]).flatten() for k in fp32]).norm()
    gap = torch.cat([(bf16[k] - fp32[k]).flatten() for k in fp32]).norm()
    assert moved > 1e-2 and gap < moved / 2, (moved, gap)  # Adam's first steps move by ~lr whatever the gradient


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hsdp_over_two_torchrun_agents_equals_one_rank(world, tmp_path):
    """--hybrid_shard with two agents on localhost, as two nodes of two GPUs each (replicate across nodes, shard
    within one), two micro-steps a step: the all-reduce across nodes runs on the last micro-step only
    (set_requires_all_reduce), and the parameters are one rank's."""
    port, out = free_port(), tmp_path / "hsdp"
    args = base_args(world, out, method="simpo", hybrid_shard="true", micro_batch_size=1, **EQUIV)
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                                "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={port}",
                                os.path.join(HERE, "train.py"), *args], env=ENV, cwd=HERE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for agent in agents:
        _, err = agent.communicate(timeout=300)
        assert agent.returncode == 0, err[-3000:]
    train.main(base_args(world, tmp_path / "one", method="simpo", micro_batch_size=1, **EQUIV))
    assert_same_params(tmp_path / "one", out, atol=2e-6)


def test_accumulating_unsharded_gradients_equals_one_rank(world, tmp_path):
    """--accumulate_unsharded (FSDP's no-sync accumulation, one reduction per step) computes what the default,
    a reduce-scatter every micro-step, computes."""
    torchrun(2, base_args(world, tmp_path / "nosync", method="simpo", accumulate_unsharded="true", **EQUIV))
    train.main(base_args(world, tmp_path / "one", method="simpo", **EQUIV))
    assert_same_params(tmp_path / "one", tmp_path / "nosync", atol=2e-6)


def test_a_resume_with_fewer_visible_gpus_restores_this_ranks_generator(monkeypatch):
    """Checkpoints held every visible GPU's generator state, and a resume with fewer visible GPUs failed on every
    checkpoint. Now each rank saves and restores its own device's state; old checkpoints still load."""
    states = {i: torch.full((8,), i, dtype=torch.uint8) for i in range(4)}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states[2])
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [states[i] for i in range(4)])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(s))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: pytest.fail("set every device's state"))
    saved = rundir.rng_state()
    assert torch.equal(saved["cuda"], states[2])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)  # resumed where this rank sees one GPU
    rundir.set_rng_state(saved)
    assert torch.equal(restored.pop(), states[2])
    old = {**saved, "cuda": [states[i] for i in range(4)]}  # a checkpoint of the old format, 4 GPUs visible
    rundir.set_rng_state(old)
    assert torch.equal(restored.pop(), states[0])


def test_the_process_group_timeout_is_passed(monkeypatch):
    """nccl's default of 10 minutes is shorter than what rank 0 may do alone (a download, tokenization, an export):
    every process group is made with --dist_timeout (120 minutes by default)."""
    import torch.distributed as dist
    given = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: given.update(kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda: 8)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    utils.init_distributed("cpu", timeout=45)
    assert given["timeout"] == datetime.timedelta(minutes=45)
    cfg, _ = train.parse_config([])
    assert cfg.dist_timeout == utils.DIST_TIMEOUT == 120
