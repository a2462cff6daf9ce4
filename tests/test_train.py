"""train.py on the tiny offline world (CPU, gloo): N ranks equal 1 rank, accumulation equals one big micro-batch,
resumed runs equal uninterrupted ones (after a clean halt and after kill -9), every method learns, errors are clear.
The `world` fixture (conftest.py) is the tiny offline world, built once per session.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import models
import sepo
import rundir
import train
import utils

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def base_args(world, out, **extra):
    args = {"model": world["llama-tiny"], "data": world["small"], "output_dir": str(out), "cache_dir": world["cache"],
            "global_batch_size": 8, "micro_batch_size": 2, "lr": 1e-3, "max_steps": 4, "log_every": 1,
            "save_every": 0, "seed": 3, "activation_checkpointing": False, **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def params(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


def metrics(out, split="train"):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [line for line in map(json.loads, fh) if line["split"] == split]


def assert_same_params(a, b, atol):
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        torch.testing.assert_close(pa[k], pb[k], rtol=0, atol=atol, msg=k)


def torchrun(n, args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(HERE, "train.py"), *args]
    proc = subprocess.run(cmd, env=ENV, cwd=HERE, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------------------------------------------------------
# Distributed equivalence
# ---------------------------------------------------------------------------------------------------------------

# Adam's first steps move every weight by about lr * sign(g): a gradient of 1e-12 whose sign depends on summation
# order would move by lr either way. A larger epsilon keeps such weights still, so that parameters can be compared.
EQUIV = dict(adam_eps=1e-6)


@pytest.mark.parametrize("method", ["confpo_dpo", "sft"])
def test_two_ranks_equal_one_rank(world, tmp_path, method):
    """confpo_dpo: a reference model and a selection per rank; sft: ranks hold different token counts, so the
    normaliser must be the global count."""
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(base_args(world, one, method=method, **EQUIV))
    torchrun(2, base_args(world, two, method=method, **EQUIV))
    assert_same_params(one, two, atol=2e-6)
    m1, m2 = metrics(one), metrics(two)
    assert [round(x["loss"], 5) for x in m1] == [round(x["loss"], 5) for x in m2]
    assert m1[0]["pairs"] == m2[0]["pairs"] == 8


def test_gradient_accumulation_equals_one_micro_batch(world, tmp_path):
    four, one = tmp_path / "four", tmp_path / "one"
    train.main(base_args(world, four, method="confpo", micro_batch_size=2, **EQUIV))  # 4 micro-steps of 2 pairs
    train.main(base_args(world, one, method="confpo", micro_batch_size=8, **EQUIV))  # 1 micro-step of 8
    assert_same_params(four, one, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------------

def test_halt_and_resume_equals_uninterrupted(world, tmp_path):
    full, halted = tmp_path / "full", tmp_path / "halted"
    train.main(base_args(world, full, method="dpo", max_steps=6, epochs=3))
    train.main(base_args(world, halted, method="dpo", max_steps=6, epochs=3, halt_after=3))
    assert not os.path.exists(halted / "final")
    assert [os.path.basename(c) for c in rundir.checkpoints(halted)] == ["step_00000003"]
    train.main(base_args(world, halted, method="dpo", max_steps=6, epochs=3))
    assert_same_params(full, halted, atol=0)  # bit-identical
    assert [m["loss"] for m in metrics(full)] == [m["loss"] for m in metrics(halted)]
    # the export reloads with plain transformers and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(halted / "final")
    tok = AutoTokenizer.from_pretrained(halted / "final")
    ids = tok("What is 2 plus 3?", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1] and model.config.architectures == ["LlamaForCausalLM"]


def test_kill_during_training_then_resume_matches(world, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = dict(method="confpo", max_steps=12, epochs=6, save_every=1, keep_last=2)
    train.main(base_args(world, full, **args))
    cmd = [sys.executable, os.path.join(HERE, "train.py"), *base_args(world, killed, **args)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = killed / "checkpoints" / "step_00000004"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # whatever it was doing: a step, a save, a rename
    proc.wait()
    assert target.exists() and not (killed / "final").exists()
    train.main(base_args(world, killed, **args))
    assert_same_params(full, killed, atol=0)
    assert [m["step"] for m in metrics(killed)] == list(range(1, 13))  # no duplicated lines after the resume
    assert len(rundir.checkpoints(killed)) == 2  # keep_last


def test_incomplete_checkpoint_is_ignored(world, tmp_path):
    """A save killed before its rename leaves step_N.tmp (no trainer_state.json): resume uses the previous one."""
    out = tmp_path / "run"
    train.main(base_args(world, out, method="simpo", max_steps=4, epochs=2, halt_after=2))
    stale = out / "checkpoints" / "step_00000003.tmp"
    stale.mkdir()
    (stale / "__0_0.distcp").write_bytes(b"half a file")
    assert [os.path.basename(c) for c in rundir.checkpoints(out)] == ["step_00000002"]
    train.main(base_args(world, out, method="simpo", max_steps=4, epochs=2))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3, 4]
    assert not stale.exists()
    # --resume false starts over: the old run's checkpoints and metric lines are gone, not mixed in
    first = params(out)
    train.main(base_args(world, out, method="simpo", max_steps=4, epochs=2, halt_after=3, resume=False))
    assert [m["step"] for m in metrics(out)] == [1, 2, 3]
    assert [os.path.basename(c) for c in rundir.checkpoints(out)] == ["step_00000003"]
    train.main(base_args(world, out, method="simpo", max_steps=4, epochs=2))
    second = params(out)
    assert all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------------------------------------------
# Every method
# ---------------------------------------------------------------------------------------------------------------

def write_selections(world, path, ratio=0.5):
    """SePO selections for the small set, from a made-up score (token position), through sepo.select_tokens."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world["llama-tiny"])
    ds, _ = data.tokenize_preferences(data.load_preferences(world["small"], cache_dir=world["cache"]), tok)
    with open(path, "w") as fh:
        for ex in ds:
            row = {"row": ex["row"]}
            for side, highest in (("chosen", True), ("rejected", False)):
                mask = torch.tensor(ex[f"{side}_labels"])[None] != -100
                scores = torch.arange(mask.shape[1], dtype=torch.float32)[None]
                sel = sepo.select_tokens(scores, mask, ratio, highest)[0]
                row[f"{side}_n"] = int(mask.sum())
                row[f"{side}_selected"] = (sel.nonzero().squeeze(-1) - ex["prompt_len"]).tolist()
            fh.write(json.dumps(row) + "\n")
    return path


@pytest.mark.parametrize("method", sorted(train.METHODS))
def test_every_method_learns_on_a_small_set(world, tmp_path, method):
    extra = {"selections": write_selections(world, tmp_path / "sel.jsonl")} if method == "sepo" else {}
    out = tmp_path / method
    train.main(base_args(world, out, method=method, max_steps=8, epochs=4, export=False, **extra))
    losses = [m["loss"] for m in metrics(out)]
    assert len(losses) == 8 and all(map(lambda x: x == x, losses))
    assert sum(losses[-2:]) / 2 < losses[0], losses
    line = metrics(out)[-1]
    assert line["lr"] > 0 and line["grad_norm"] > 0 and line["tokens_per_s"] > 0
    if method.startswith("confpo") or method == "sepo":
        assert 0 < line["selected_ratio_chosen"] <= 1 and "empty_pairs" in line and "accuracy_all" in line


def test_default_run_offline(world, tmp_path):
    """`python train.py` with no arguments (here shortened): the tiny world, an SFT start, ConfPO, an export and
    the synthetic judge's score before and after."""
    out = tmp_path / "default"
    train.main(["--tiny_world", os.path.dirname(world["data"]), "--output_dir", str(out), "--cache_dir",
                world["cache"], "--max_steps", "3", "--eval_every", "2"])
    lines = metrics(out, "eval")
    assert [m["step"] for m in lines] == [0, 2, 3] and 0 <= lines[-1]["accuracy"] <= 1
    (gen,) = metrics(out, "generate")
    assert gen["prompts"] == 100 and 0 <= gen["reward_after"] <= 1
    with open(out / "config.json") as fh:
        cfg = json.load(fh)
    assert cfg["method"] == "confpo" and cfg["model"].endswith("llama-small-sft") and cfg["global_batch_size"] == 32


# ---------------------------------------------------------------------------------------------------------------
# Config and errors
# ---------------------------------------------------------------------------------------------------------------

def test_config_file_and_flags(world, tmp_path, capsys):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"method": "simpo", "beta": 2.5, "gamma": 1.0, "lr": 1e-4}))
    cfg, explicit = train.parse_config(["--config", str(cfg_file), "--gamma", "0.5", "--strict"])
    assert (cfg.method, cfg.beta, cfg.gamma, cfg.lr, cfg.strict) == ("simpo", 2.5, 0.5, 1e-4, True)
    assert {"method", "beta", "gamma", "lr", "strict"} <= explicit
    cfg_file.write_text(json.dumps({"method": "simpo", "betta": 2.5}))
    with pytest.raises(SystemExit, match="unknown field 'betta'; did you mean beta"):
        train.parse_config(["--config", str(cfg_file)])
    cfg_file.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(SystemExit, match="field 'lr' must be float"):
        train.parse_config(["--config", str(cfg_file)])
    cfg_file.write_text(json.dumps({"method": "simpoo"}))
    with pytest.raises(SystemExit, match="method 'simpoo' is not one of .*did you mean simpo"):
        train.parse_config(["--config", str(cfg_file)])


@pytest.mark.parametrize("script", ["train", "score", "sepo_pipeline"])
def test_help_lists_every_field(script, capsys):
    import dataclasses

    import score
    import sepo_pipeline
    cls, run = {"train": (train.Config, train.main), "score": (score.ScoreConfig, score.main),
                "sepo_pipeline": (sepo_pipeline.PipelineConfig, sepo_pipeline.main)}[script]
    with pytest.raises(SystemExit) as stop:
        run(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert all(f"--{f.name}" in text for f in dataclasses.fields(cls))


def test_activation_checkpointing_is_on_with_a_model_and_off_on_the_tiny_world(world):
    """A real model's activations run out of memory first (an 8B model at the papers' settings keeps ~34 GiB per GPU
    without checkpointing): on by default whenever --model is given; the tiny world keeps it off; a flag decides."""
    resolved = lambda argv: (lambda cfg, explicit: (train.resolve(cfg, explicit), cfg)[1])(*train.parse_config(argv))
    assert resolved(["--model", world["llama-tiny"]]).activation_checkpointing is True
    assert resolved([]).activation_checkpointing is False
    assert resolved(["--model", world["llama-tiny"], "--activation_checkpointing", "false"]).activation_checkpointing \
        is False


def test_clear_errors(world, tmp_path, capsys):
    with pytest.raises(SystemExit, match="invalid choice: 'dpoo'.*did you mean dpo"):
        train.main(["--method", "dpoo"])
    with pytest.raises(SystemExit, match="--method sepo needs --selections"):
        train.main(base_args(world, tmp_path / "s", method="sepo"))
    with pytest.raises(SystemExit, match=r"--threshold '1.5': must be arithmetic, geometric or a probability in \(0, "):
        train.main(base_args(world, tmp_path / "th", method="confpo", threshold="1.5"))
    with pytest.raises(SystemExit, match="--gamma is not a parameter of dpo"):
        train.main(base_args(world, tmp_path / "g", method="dpo", gamma=1.0))
    # an output folder that holds a different run
    out = tmp_path / "run"
    train.main(base_args(world, out, method="simpo", max_steps=1, export=False))
    with pytest.raises(SystemExit, match="holds the checkpoints or export of another run .*method"):
        train.main(base_args(world, out, method="dpo", max_steps=1))
    # a model without a causal-LM head
    from transformers import T5Config
    t5 = tmp_path / "t5"
    T5Config(d_model=16, num_layers=1, num_heads=2, d_ff=32, d_kv=8, vocab_size=100).save_pretrained(t5)
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(world["llama-tiny"]).save_pretrained(t5)
    with pytest.raises(SystemExit, match="T5Config has no causal-LM head"):
        train.main(base_args(world, tmp_path / "t", model=t5))
    # selections that do not match the data
    bad = tmp_path / "bad.jsonl"
    write_selections(world, bad)
    rows = [json.loads(x) for x in bad.read_text().splitlines()]
    rows[3]["chosen_n"] += 1
    bad.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl row 3, field 'chosen_n'"):
        train.main(base_args(world, tmp_path / "b", method="sepo", selections=bad))


# ---------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def world_of_one():
    import torch.distributed as dist
    cfg = train.Config(device="cpu")
    utils.init_distributed(cfg.device)
    yield cfg
    dist.destroy_process_group()


def tiny_batch(world, tokenizer_path, n=3):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ds, _ = data.tokenize_preferences(data.load_preferences(world["small"], cache_dir=world["cache"]), tok)
    return data.collate_pairs([ds[i] for i in range(n)], tok.pad_token_id)


def test_logits_path_equals_chunked_path(world, world_of_one):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(world["llama-tiny"])
    batch = tiny_batch(world, world["llama-tiny"])
    labels = batch["labels"].clone()
    labels[1] = -100  # a row without any response token
    real = batch["attention_mask"][2, 1:] == 1  # a row labelled from position 1 on (no prompt but its first token)
    labels[2, 1:] = torch.where(real, batch["input_ids"][2, 1:], -100)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    chunked, m1 = models.PolicyLogps(model, "chunked", 4)(**inputs)
    logits, m2 = models.PolicyLogps(model, "logits", 4)(**inputs)
    assert chunked.shape == logits.shape == labels.shape and torch.equal(m1, m2)
    torch.testing.assert_close(chunked, logits, rtol=1e-5, atol=1e-5)
    full_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = torch.log_softmax(full_logits, -1)[:, :-1].gather(
        -1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * m1[:, 1:]
    torch.testing.assert_close(chunked[:, 1:], reference, rtol=1e-5, atol=1e-5)


def test_heads_that_transform_logits_are_not_chunked(world, world_of_one):
    from transformers import AutoModelForCausalLM, GraniteConfig, GraniteForCausalLM
    granite = GraniteForCausalLM(GraniteConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2, logits_scaling=8.0))
    assert models.choose_logp_path("auto", granite) == "logits"
    with pytest.raises(SystemExit, match="not hidden @ W.T"):
        models.choose_logp_path("chunked", granite)
    # a transformation no config names is caught at the first forward
    model = AutoModelForCausalLM.from_pretrained(world["llama-tiny"])
    assert models.choose_logp_path("auto", model) == "chunked"
    model.lm_head.register_forward_hook(lambda module, args, out: out * 2)
    batch = tiny_batch(world, world["llama-tiny"])
    with pytest.raises(SystemExit, match="use --logp_path logits"):
        models.PolicyLogps(model, "chunked", 64)(batch["input_ids"], batch["attention_mask"], batch["labels"])


def test_the_head_check_tolerates_bf16_rounding_and_still_finds_a_transform(world, world_of_one):
    """Under a bf16 autocast (a GPU's default; --dtype bf16 on CPU) the two paths may round the logits differently
    (cuBLAS results depend on the batch's shape; the CPU's do not, so a rounding-sized difference is planted here):
    the check uses bf16's tolerance there and fp32's in fp32, and a head that scales its logits fails in both.
    (The old check took fp32's tolerance, 1e-3, for bf16 logits in a world of one.)"""
    from transformers import AutoModelForCausalLM
    batch = tiny_batch(world, world["llama-small"])
    inputs = (batch["input_ids"], batch["attention_mask"], batch["labels"])

    def check(transform, autocast):
        model = AutoModelForCausalLM.from_pretrained(world["llama-small"])
        with torch.no_grad():  # logits of a real model's scale (std ~10)
            model.lm_head.weight.mul_(40)
        model.lm_head.register_forward_hook(lambda module, args, out: transform(out))
        wrapped = models.PolicyLogps(model, "chunked", 64, autocast=autocast)
        wrapped(*inputs)
        return wrapped.checked

    rounding = lambda out: out + 0.06 * torch.sign(torch.sin(torch.arange(out.shape[-1], dtype=out.dtype)))  # noqa
    assert check(lambda out: out, torch.bfloat16) and check(rounding, torch.bfloat16)
    with pytest.raises(SystemExit, match="use --logp_path logits"):
        check(rounding, None)
    with pytest.raises(SystemExit, match="use --logp_path logits"):
        check(lambda out: out * 1.5, torch.bfloat16)


def test_one_process_holds_the_plain_model_and_a_frozen_reference(world, world_of_one):
    """A world of one has nothing to shard: the model itself (no FSDP copies), the reference without gradients."""
    from torch.distributed.tensor import DTensor
    cfg = world_of_one
    mesh = models.make_mesh(cfg, 1, torch.device("cpu"))
    ref = models.load_model(world["llama-tiny"], cfg, mesh, torch.device("cpu"), trainable=False)
    batch = tiny_batch(world, world["llama-tiny"])
    with torch.no_grad():
        ref(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert not any(isinstance(p, DTensor) for p in ref.parameters())
    assert not any(p.requires_grad for p in ref.parameters())


LOAD_WORKER = """
import json, sys
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor
sys.path.insert(0, sys.argv[1])
import models, train, utils
path, out = sys.argv[2], sys.argv[3]
rank, world, device = utils.init_distributed("cpu")
cfg = train.Config(model=path, device="cpu", dtype="fp32")
mesh = models.make_mesh(cfg, world, device)
report = {}
for trainable in (True, False):
    wrapped = models.load_model(path, cfg, mesh, device, trainable)
    sharded = all(isinstance(p, DTensor) for p in wrapped.parameters())
    ids = torch.arange(1, 25).reshape(2, 12) % 50
    labels = ids.clone()
    labels[:, :4] = -100
    with torch.no_grad():
        logps, _ = wrapped(ids, torch.ones_like(ids), labels)
    if not trainable:  # a frozen reference is resharded after its forward: it holds only its shards
        sharded = sharded and all(isinstance(p, DTensor) for p in wrapped.parameters())
    sd = get_model_state_dict(wrapped.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    buffers = {n: b.clone() for n, b in wrapped.model.named_buffers()}
    if rank == 0:
        torch.save({"sd": sd, "buffers": buffers, "logps": logps}, f"{out}/{'policy' if trainable else 'ref'}.pt")
    report[str(trainable)] = sharded
if rank == 0:
    json.dump(report, open(f"{out}/report.json", "w"))
utils.end_group()
utils.exit_now(0)  # no finalization: see utils.exit_now
"""


@pytest.mark.parametrize("tied", [False, True])
def test_two_ranks_load_the_weights_of_from_pretrained_bit_for_bit(world, tmp_path, tied):
    """Rank 0 reads the checkpoint, rank 1 builds on the meta device, both keep shards of the broadcast: the
    weights, the buffers no checkpoint holds (rotary frequencies) and the log-probs equal from_pretrained's."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    path = world["llama-tiny"]
    if tied:  # a tied output embedding, as SmolLM2's
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, tie_word_embeddings=True, rope_theta=5000.0)
        path = str(tmp_path / "tied")
        LlamaForCausalLM(cfg).save_pretrained(path)
    (tmp_path / "worker.py").write_text(LOAD_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(tmp_path / "worker.py"), HERE, path, str(tmp_path)]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "report.json").read_text()) == {"True": True, "False": True}  # sharded
    reference = AutoModelForCausalLM.from_pretrained(path)
    expected = reference.state_dict()
    for name in ("policy", "ref"):
        got = torch.load(tmp_path / f"{name}.pt")
        assert got["sd"].keys() == expected.keys()
        assert all(torch.equal(got["sd"][k], expected[k]) for k in expected), name
        assert all(torch.equal(got["buffers"][k], b) for k, b in reference.named_buffers()), name
        ids = torch.arange(1, 25).reshape(2, 12) % 50
        logits = reference(input_ids=ids).logits
        direct = torch.log_softmax(logits[:, 3:-1], -1).gather(-1, ids[:, 4:, None]).squeeze(-1)
        torch.testing.assert_close(got["logps"][:, 4:], direct, rtol=1e-5, atol=1e-5)


def test_trim_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "split": "train"}) + "\n" for s in (0, 1, 2, 3)]
    path.write_text("".join(lines) + '{"step": 4, "spl')  # a line cut short by a kill
    rundir.trim_metrics(str(path), 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2]
    rundir.trim_metrics(str(path), 0)  # a fresh start: nothing of the old run stays
    assert path.read_text() == ""


@pytest.mark.parametrize("method", ["dpo", "confpo_dpo", "kto"])
def test_reference_log_probs_computed_once_give_the_live_reference_losses(world, tmp_path, method):
    """--precompute_ref: one pass writes the reference's per-token log-probs (tensors, resumable), training holds
    no reference model, and the losses equal those of a live reference to float rounding; ConfPO_DPO needs them
    per token (its selection is the policy's, every step)."""
    live, once = tmp_path / "live", tmp_path / "once"
    common = dict(method=method, max_steps=4, epochs=2, eval_data=world["small"], eval_every=2, **EQUIV)
    train.main(base_args(world, live, **common))
    train.main(base_args(world, once, precompute_ref="true", **common))
    blocks = sorted(os.listdir(once / "ref_logps"))
    assert blocks == ["eval.json", "eval_000000.pt", "train.json", "train_000000.pt"]
    for a, b in zip(metrics(live) + metrics(live, "eval"), metrics(once) + metrics(once, "eval")):
        assert a["step"] == b["step"] and math.isclose(a["loss"], b["loss"], rel_tol=1e-5, abs_tol=1e-6), (a, b)
    assert_same_params(live, once, atol=2e-6)
    stamp = (once / "ref_logps" / "train_000000.pt").stat().st_mtime_ns  # a rerun computes nothing again
    train.main(base_args(world, once, precompute_ref="true", **common) + ["--resume", "false"])
    assert (once / "ref_logps" / "train_000000.pt").stat().st_mtime_ns == stamp


def test_save_final_false_keeps_no_last_checkpoint_and_a_rerun_finds_the_run_finished(world, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(base_args(world, out, method="simpo", save_final="false"))
    assert rundir.checkpoints(out) == [] and json.loads((out / "final" / "run.json").read_text()) == {"step": 4}
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    train.main(base_args(world, out, method="simpo", save_final="false"))
    assert "this run had already finished" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp and len(metrics(out)) == 4


def test_bf16_on_a_cpu_without_native_bf16_warns_once(tmp_path, monkeypatch, capsys):
    avx2 = tmp_path / "avx2"
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n\nprocessor\t: 1\nflags\t\t: fpu avx2\n")
    sapphire = tmp_path / "sapphire"
    sapphire.write_text("processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n")
    graviton = tmp_path / "graviton"
    graviton.write_text("processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert models.cpu_has_bf16(str(avx2)) is False
    assert models.cpu_has_bf16(str(sapphire)) is True and models.cpu_has_bf16(str(graviton)) is True
    assert models.cpu_has_bf16(str(tmp_path / "missing")) is None  # not Linux: no warning
    cpu = torch.device("cpu")
    models.warn_if_bf16_emulated.cache_clear()
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: True)
    assert models.compute_dtype("bf16", cpu) == torch.bfloat16 and "warning" not in capsys.readouterr().out
    models.warn_if_bf16_emulated.cache_clear()
    monkeypatch.setattr(models, "cpu_has_bf16", lambda: False)
    assert models.compute_dtype("fp32", cpu) == torch.float32 and models.compute_dtype("auto", cpu) == torch.float32
    assert "warning" not in capsys.readouterr().out
    for _ in range(3):
        assert models.compute_dtype("bf16", cpu) == torch.bfloat16
    assert capsys.readouterr().out.count("warning: --dtype bf16 on a CPU without native bf16") == 1
