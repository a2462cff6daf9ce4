"""The optional extras a TRL user expects, each needing a package the library does not: LoRA through peft
(--lora_r; the reference is the policy with its adapters off) and experiment tracking (--report_to tensorboard,
wandb). Asking for an extra that is not installed is one error line before anything loads."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import models
import rundir
import train
import utils
from test_train import ENV, EQUIV, HERE, assert_same_params, base_args, metrics, params, torchrun

LORA = dict(method="dpo", lora_r=8, lora_alpha=16, lr=1e-2)


# ---------------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------------

def test_lora_dpo_starts_at_ln2_changes_only_the_adapters_and_exports_a_plain_model(world, tmp_path):
    """Step 0's held-out DPO loss is ln 2 (the adapters start at zero, so policy = reference = the base with its
    adapters off); training changes the adapters alone; final/ is a plain Hugging Face model (the adapters merged)
    that gives the trained model's log-probs and differs from the base, and final/adapter holds the adapter alone."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = tmp_path / "lora"
    train.main(base_args(world, out, eval_data=world["small"], eval_every=4, **LORA, activation_checkpointing=True))
    assert math.isclose(metrics(out, "eval")[0]["loss"], math.log(2), abs_tol=1e-6)
    assert metrics(out, "eval")[-1]["loss"] < math.log(2) - 1e-3  # it learned something
    config = json.loads((out / "config.json").read_text())
    assert config["lora_r"] == 8 and config["activation_checkpointing"] is True  # LoRA with checkpointing
    base = AutoModelForCausalLM.from_pretrained(world["llama-tiny"])
    merged = AutoModelForCausalLM.from_pretrained(out / "final")
    assert type(merged).__name__ == "LlamaForCausalLM" and not any("lora" in k for k in merged.state_dict())
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world["llama-tiny"]),
                                             out / "final" / "adapter")
    # only the adapters were trained: the base under the adapter is the base, bit for bit
    for name, value in with_adapter.get_base_model().state_dict().items():
        if "lora" not in name:
            assert torch.equal(value, base.state_dict()[name.replace(".base_layer", "")]), name
    tok = AutoTokenizer.from_pretrained(world["llama-tiny"])
    rows = list(data.tokenize_preferences(data.load_preferences(world["small"]), tok)[0])[:4]
    batch = data.collate_pairs(rows, data.pad_id(tok))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    logps = lambda m: models.PolicyLogps(m, "chunked", None, together=False)(**inputs)[0]  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(logps(merged), logps(with_adapter.merge_and_unload()), rtol=0, atol=1e-5)
        assert (logps(merged) - logps(base)).abs().max() > 1e-3  # it differs from the base


def test_the_reference_with_adapters_off_is_the_base_model_and_no_second_copy(world, world_of_one):
    """The reference of a LoRA run is the policy with its adapters disabled: its per-token log-probs equal a
    separate copy of the base model's, and the run holds one model (the frozen reference is not loaded)."""
    from transformers import AutoTokenizer
    rank, world_size, device = world_of_one
    cfg = train.Config(model=world["llama-tiny"], lora_r=4, lora_alpha=8, device="cpu", dtype="fp32")
    mesh = models.make_mesh(cfg, 1, device)
    policy = models.load_model(cfg.model, cfg, mesh, device, trainable=True)
    with torch.no_grad():  # adapters that moved: the policy is no longer the base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)
    base = models.load_model(cfg.model, cfg, mesh, device, trainable=False)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    rows = list(data.tokenize_preferences(data.load_preferences(world["small"]), tok)[0])[:3]
    batch = data.collate_pairs(rows, data.pad_id(tok))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        reference, _ = policy.as_reference(**inputs)
        torch.testing.assert_close(reference, base(**inputs)[0], rtol=0, atol=0)
        assert (policy(**inputs)[0] - reference).abs().max() > 1e-3
    trained = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)


@pytest.fixture
def world_of_one():
    import torch.distributed as dist
    made = not dist.is_initialized()
    found = utils.init_distributed("cpu")
    yield found
    if made:
        dist.destroy_process_group()


def test_lora_on_two_ranks_equals_one_and_resumes_bit_exact_after_kill_9(world, tmp_path):
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    train.main(base_args(world, one, **LORA, **EQUIV))
    torchrun(2, base_args(world, two, **LORA, **EQUIV))
    assert_same_params(one, two, atol=2e-6)
    args = dict(**LORA, max_steps=8, epochs=4, save_every=1, keep_last=2)
    full = tmp_path / "full"
    train.main(base_args(world, full, **args))
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *base_args(world, killed, **args)],
                            env=ENV, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    target = killed / "checkpoints" / "step_00000003"
    deadline = time.time() + 120
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert target.exists() and not (killed / "final").exists()
    train.main(base_args(world, killed, **args))
    assert_same_params(full, killed, atol=0)
    assert {k for k in params(full)} == {k for k in params(one)}  # a plain model, whatever the path


# ---------------------------------------------------------------------------------------------------------------
# Experiment tracking
# ---------------------------------------------------------------------------------------------------------------

def tensorboard_scalars(out):
    """{(tag, step): value} of every scalar in out/tensorboard, read with TensorBoard's own reader; a step logged
    twice (a resume that did not purge) fails."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    found = {}
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
        found.update({(tag, e.step): e.value for e in events.Scalars(tag)})
    return found


def jsonl_scalars(out):
    lines = rundir.read_metrics(str(out / "metrics.jsonl"))
    return {(f"{m['split']}/{k}", m["step"]): v for m in lines for k, v in m.items()
            if k not in ("step", "split") and isinstance(v, (int, float))}


def test_tensorboard_holds_the_scalars_of_metrics_jsonl_across_a_kill_and_resume(world, tmp_path):
    out = tmp_path / "tb"
    args = dict(method="simpo", max_steps=8, epochs=4, save_every=2, eval_data=world["small"], eval_every=4,
                report_to="tensorboard")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *base_args(world, out, **args)],
                            env=ENV, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 5) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # after step 5: steps 5 was logged, the checkpoint is at 4
    proc.wait()
    # TensorBoard reads a folder's event files in name order: the second each writer started, then its pid. A run
    # killed within a second of its start (only a tiny one) and resumed by a lower pid would be read after its
    # resumption: the resumed writer starts in the next second, as any real run's does
    time.sleep(math.floor(time.time()) + 1 - time.time())
    train.main(base_args(world, out, **args))
    tb, js = tensorboard_scalars(out), jsonl_scalars(out)
    assert set(tb) == set(js) and {s for _, s in tb} == set(range(0, 9))
    for key, value in js.items():
        assert math.isclose(tb[key], value, rel_tol=1e-6, abs_tol=1e-6), key


def test_wandb_offline_writes_its_run_folder_and_resumes_the_same_run(world, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    train.main(base_args(world, out, method="simpo", max_steps=2, report_to="wandb"))
    run_id = (out / "wandb_id").read_text().strip()
    folders = [p.name for p in (out / "wandb").iterdir() if p.name.startswith("offline-run")]
    assert len(folders) == 1 and folders[0].endswith(run_id)
    assert any(f.suffix == ".wandb" for f in (out / "wandb" / folders[0]).iterdir())


def test_an_extra_that_is_not_installed_is_one_line_before_anything_loads(world, tmp_path, monkeypatch, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("peft", "tensorboard")
                        else real(name, *a))
    for flag, value, package in (("lora_r", "8", "peft"), ("report_to", "none,tensorboard", "tensorboard")):
        code = utils.cli(train.main, base_args(world, tmp_path / "never", **{flag: value}))
        line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert code == 1 and len(line) == 1 and f"needs the {package} package: pip install {package}" in line[0]
        assert not (tmp_path / "never").exists()
