"""benchmarks/gpu_check.py, the first GPU run's check, kept working on the CPU until a GPU is at hand: at toy sizes
(--device cpu --quick) every check passes, or skips saying why, each with numbers in the JSON; a failing check makes
the run exit non-zero while the others still run; a wrong flag is refused before torch loads."""

import json
import math
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
SCRIPT = os.path.join(HERE, "benchmarks", "gpu_check.py")
CHECKS = ("head", "fsdp", "layer", "cli", "sample")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
VERDICT = re.compile(r"^(PASS|FAIL|SKIP) (\w+): (.*)$")


def run(world, tmp_path, *flags, timeout=600):
    out = tmp_path / "results.json"
    (tmp_path / "work").mkdir(exist_ok=True)
    cmd = [sys.executable, SCRIPT, "--device", "cpu", "--quick", "--out", str(out),
           "--tiny_world", os.path.dirname(world["data"]), *flags]
    t0 = time.perf_counter()
    env = {**ENV, "GPU_CHECK_TMP": str(tmp_path / "work")}  # the checks' temporary folders, to look at afterwards
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    verdicts = {m.group(2): (m.group(1), m.group(3)) for m in map(VERDICT.match, proc.stdout.splitlines()) if m}
    result = json.loads(out.read_text()) if out.exists() else None
    return proc, verdicts, result, time.perf_counter() - t0


def numbers_in(entry):
    return [v for v in entry["numbers"].values() if isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)]


def test_quick_run_on_the_cpu_passes_every_check_with_numbers(world, tmp_path):
    proc, verdicts, result, seconds = run(world, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-3000:]
    assert set(verdicts) == set(CHECKS), proc.stdout[-4000:]
    for name, (status, text) in verdicts.items():
        assert status == "PASS" or (status == "SKIP" and len(text) > 20), (name, status, text)
        assert re.search(r"\d", text), f"{name}'s verdict line names no number: {text}"
    assert re.search(r"^summary: 5 PASS, 0 FAIL, 0 SKIP in \d+ s on cpu", proc.stdout, re.M), proc.stdout[-1000:]

    assert result["date"] and result["device"].startswith("cpu") and result["device_type"] == "cpu"
    assert result["torch"] and result["transformers"] and "cuda" in result and result["quick"] is True
    assert set(result["checks"]) == set(CHECKS)
    for name, entry in result["checks"].items():
        assert entry["status"] == verdicts[name][0] and entry["seconds"] > 0 and entry["budget_s"] > 0
        assert len(numbers_in(entry)) >= 3, (name, entry["numbers"])
    head, fsdp = result["checks"]["head"]["numbers"], result["checks"]["fsdp"]["numbers"]
    assert head["logps_max_abs_err"] <= 1e-4 and head["check_head_gap_scaled_head"] > 0.25
    assert fsdp["step0_loss_minus_ln2_sharded"] <= 1e-4 and fsdp["resumed_step_loss_rel_diff"] <= 1e-6
    layer, cli = result["checks"]["layer"]["numbers"], result["checks"]["cli"]["numbers"]
    assert layer["ckpt_saved_mib"] < layer["no_ckpt_saved_mib"] and layer["estimate_8gpu_dpo_gib"] > 0
    assert cli["resumed_vs_uninterrupted_max_abs_diff"] == 0 and cli["deterministic_twice_max_abs_diff"] == 0
    assert cli["sigterm_to_checkpoint_s"] is not None and cli["sigterm_saved_step"] >= 2
    assert result["checks"]["sample"]["numbers"]["batch_independent_greedy"].split("/")[0] == \
        result["checks"]["sample"]["numbers"]["batch_independent_greedy"].split("/")[1]
    print(f"gpu_check --device cpu --quick: {seconds:.0f} s")


def test_a_failing_check_fails_the_run_and_the_others_still_run(world, tmp_path):
    proc, verdicts, result, _ = run(world, tmp_path, "--only", "head,layer", "--fail_on_purpose", "head")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert verdicts["head"][0] == "FAIL" and "failing on purpose" in verdicts["head"][1]
    assert verdicts["layer"][0] == "PASS"
    assert result["checks"]["head"]["status"] == "FAIL" and "failing on purpose" in result["checks"]["head"]["error"]
    assert result["checks"]["layer"]["status"] == "PASS" and result["counts"] == {"PASS": 1, "FAIL": 1, "SKIP": 0}


def test_a_check_past_its_budget_is_stopped_and_fails(world, tmp_path):
    proc, verdicts, result, seconds = run(world, tmp_path, "--only", "cli", "--budget_scale", "0.02")
    assert proc.returncode == 1 and verdicts["cli"][0] == "FAIL", proc.stdout[-3000:]
    assert "ran past its budget" in verdicts["cli"][1] and seconds < 60
    # the stopped check stopped what it had started (train.py runs), and removed its temporary folder
    assert not list((tmp_path / "work").iterdir())
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(tmp_path / "work") not in left, left


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--device", "cuda", "--out", str(tmp_path / "r.json")], env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: --device cuda: torch ")
    assert "sees no GPU" in proc.stderr and not (tmp_path / "r.json").exists()


def test_a_wrong_flag_is_refused_before_torch_loads(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, SCRIPT, "--only", "head,nope"], env=ENV, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "no check named nope" in proc.stderr
    assert time.perf_counter() - t0 < 20  # argparse alone, not torch
