"""A user's mistakes, met as a user meets them (most through the real commands, in subprocesses): a failed start
leaves the folder as it was, errors are one line (once under torchrun), Ctrl-C says how to resume, one job per
folder, runs known by what they compute, foreign folders refused, damaged checkpoints skipped, no pickle loaded,
honest bookkeeping, a NaN stops the run, and --help answers before torch loads."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import torch
from safetensors.torch import load_file

import experiments
import losses
import measures
import rundir
import train
import utils

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("DEBUG", None)


def flags(**kw):
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def args(world, out, **extra):
    return flags(**{"model": world["llama-tiny"], "data": world["small"], "output_dir": out, "cache_dir": world["cache"],
                    "global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "max_steps": 2, "log_every": 1,
                    "save_every": 0, "seed": 3, "judge": "none", "activation_checkpointing": False, **extra})


def command(script, argv, cwd, timeout=300):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *argv], env=ENV, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def errors(proc):
    """The error lines a command printed (ours start with 'error:')."""
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def metrics(out, split="train"):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [m for m in map(json.loads, fh) if m["split"] == split]


def params(out):
    return load_file(os.path.join(out, "final", "model.safetensors"))


# ---------------------------------------------------------------------------------------------------------------
# 1-2. A failed start; one-line errors
# ---------------------------------------------------------------------------------------------------------------

def test_a_failed_start_leaves_the_folder_as_it_found_it_and_the_fix_runs(world, tmp_path):
    out = tmp_path / "run"
    proc = command("train.py", args(world, out, data="typo.jsonl"), tmp_path)
    assert proc.returncode == 1 and errors(proc) == ["error: typo.jsonl: file does not exist"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()
    out.mkdir()  # a folder that existed, empty: it stays so
    proc = command("train.py", args(world, out, model="./no_such_dir"), tmp_path)
    assert errors(proc) == ["error: --model ./no_such_dir: no such folder"] and list(out.iterdir()) == []
    proc = command("train.py", args(world, out), tmp_path)  # the corrected command is not "a different run"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (out / "final" / "config.json").exists() and not (out / ".lock").exists()


def test_errors_are_one_line_and_debug_shows_the_traceback(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n[1, 2]\n42\n")
    proc = command("train.py", args(world, tmp_path / "r", data=bad), tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert errors(proc) == [f"error: {bad} row 1, field '<row>': expected a JSON object with prompt, chosen and "
                            "rejected, got list [1, 2]"]
    proc = command("train.py", args(world, tmp_path / "r", data=bad) + ["--debug"], tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr
    proc = command("train.py", ["--lrr", "1e-3", "--method", "dpoo"], tmp_path)
    assert proc.returncode == 2 and len(errors(proc)) == 1 and "invalid choice: 'dpoo'" in proc.stderr
    assert "did you mean dpo" in proc.stderr
    proc = command("score.py", ["--orcle", "x"], tmp_path)
    assert proc.returncode == 2 and "did you mean --oracle for --orcle?" in proc.stderr


def test_torchrun_reports_a_user_error_once_and_no_rank_is_left_hanging(world, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n[1, 2]\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *args(world, tmp_path / "r", data=bad)]
    proc = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and ours == [f"error: {bad} row 1, field '<row>': expected a JSON object with "
                                             "prompt, chosen and rejected, got list [1, 2]"], proc.stderr[-3000:]
    assert "Connection reset" not in proc.stderr and "[rank0]" not in proc.stderr and "[rank1]" not in proc.stderr
    assert not (tmp_path / "r").exists()


def signalled(argv, cwd, ready, sig):
    """train.py with argv, sent `sig` once ready() holds -> (its exit code, its one error line)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], env=ENV, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, stderr[-2000:]
    return proc.returncode, lines[0]


def test_ctrl_c_saves_nothing_new_and_says_how_to_resume(world, tmp_path):
    out = tmp_path / "run"
    argv = args(world, out, max_steps=400, epochs=200, save_every=2, keep_last=0)
    code, line = signalled(argv, tmp_path, lambda: (out / "checkpoints" / "step_00000004").exists(), signal.SIGINT)
    assert code == 130
    newest = rundir.checkpoints(out)[-1]
    assert line.startswith("error: interrupted during step ") and "nothing new was saved" in line
    assert f"The last checkpoint is {newest}; run the same command to resume" in line
    assert not (out / ".lock").exists()  # the lock goes with the run


def test_a_full_disk_during_a_save_is_one_clear_message(world, tmp_path, monkeypatch):
    """torch's checkpoint writer reports a full disk as 'unexpected pos ...'; the run says what happened."""
    def full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch.distributed.checkpoint, "save", full)
    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(1, 1, 0))
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"the disk is full: saving .*step_00000001 failed \(RuntimeError\)\. Free "
                                         r"some space and run the same command again\. There is no checkpoint yet"):
        train.main(args(world, out, max_steps=2, save_every=1))
    assert rundir.checkpoints(out) == []


# ---------------------------------------------------------------------------------------------------------------
# 3. One job per folder
# ---------------------------------------------------------------------------------------------------------------

def test_a_second_run_on_the_same_folder_is_refused_and_the_first_is_unharmed(world, tmp_path):
    out = tmp_path / "run"
    argv = args(world, out, max_steps=400, epochs=200, save_every=50, keep_last=1)  # long enough to be met running
    first = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], env=ENV, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    second = command("train.py", argv, tmp_path)
    assert second.returncode == 1 and len(errors(second)) == 1, second.stderr[-2000:]
    assert f"{out} is in use by another run (host " in errors(second)[0] and f"pid {first.pid}," in errors(second)[0]
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr[-2000:]
    assert [m["step"] for m in metrics(out)] == list(range(1, 401))  # one writer: no line twice
    assert not (out / ".lock").exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(world, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("host elsewhere, pid 999999, started 2026-01-01 00:00:00, command train.py")
    proc = command("train.py", args(world, out), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"note: {out} was locked by a run that ended without releasing it (host elsewhere, pid 999999" in proc.stderr


# ---------------------------------------------------------------------------------------------------------------
# 4-5. Runs known by what they compute; foreign folders; selections of other data
# ---------------------------------------------------------------------------------------------------------------

def test_a_moved_run_folder_resumes_with_data_given_by_another_path(world, tmp_path):
    full, here = tmp_path / "full", tmp_path / "here"
    train.main(args(world, full, max_steps=4, epochs=2))
    train.main(args(world, here, max_steps=4, epochs=2, halt_after=2))
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.move(here, moved)
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(world["small"], copy / "pairs.jsonl")
    proc = command("train.py", args(world, "moved", max_steps=4, epochs=2, data="../copy/pairs.jsonl"),
                   tmp_path / "elsewhere")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from moved/checkpoints/step_00000002 at step 2" in proc.stdout
    a, b = params(full), params(moved)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_folder_of_other_files_is_refused_and_left_untouched(world, tmp_path):
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "final" / "weights.bin").write_bytes(b"precious")
    (out / "metrics.jsonl").write_text("not json\n")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    proc = command("train.py", args(world, out), tmp_path)
    assert proc.returncode == 1 and "holds files this project did not write (final, metrics.jsonl), and no " \
        "config.json" in errors(proc)[0]
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_sepo_refuses_selections_scored_on_other_data(world, tmp_path):
    import score
    score.main(["--oracle", world["llama-tiny"], "--reference", world["neox-tiny"], "--data", world["small"],
                "--output_dir", str(tmp_path / "s"), "--cache_dir", world["cache"]])
    other = tmp_path / "other.jsonl"
    rows = [json.loads(x) for x in open(world["small"])]
    other.write_text("".join(json.dumps({**r, "chosen": r["rejected"], "rejected": r["chosen"]}) + "\n"
                             for r in rows))  # as many pairs, the same lengths: only the fingerprint tells
    with pytest.raises(SystemExit, match=rf"selections were scored on other data \({world['small']} \[train\], "
                                         rf"fingerprint \w+\) than --data {other} \[train\] \(fingerprint \w+\)"):
        train.main(args(world, tmp_path / "t", method="sepo", data=other,
                        selections=tmp_path / "s" / "selections-c0.3-r0.3.jsonl"))


# ---------------------------------------------------------------------------------------------------------------
# 6. Damaged checkpoints, no pickles
# ---------------------------------------------------------------------------------------------------------------

class Planted:
    """A pickle that would run code when loaded with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_resume_skips_damaged_checkpoints_and_runs_no_pickled_code(world, tmp_path, capsys):
    full, run = tmp_path / "full", tmp_path / "run"
    common = dict(max_steps=6, epochs=3, save_every=1, keep_last=0)
    train.main(args(world, full, **common))
    train.main(args(world, run, halt_after=4, **common))
    shard = next(p for p in (run / "checkpoints" / "step_00000004").iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[:100])  # cut short, as by a full disk or a bad copy
    marker = tmp_path / "code-ran"
    with open(run / "checkpoints" / "step_00000003" / "rank_0.pt", "wb") as fh:
        pickle.dump({"rng": Planted(str(marker))}, fh)
    capsys.readouterr()
    train.main(args(world, run, **common))
    said = capsys.readouterr().out
    assert f"warning: skipping checkpoint {run}/checkpoints/step_00000004: unreadable on rank 0" in said
    assert f"warning: skipping checkpoint {run}/checkpoints/step_00000003: unreadable on rank 0" in said
    assert f"resumed from {run}/checkpoints/step_00000002 at step 2" in said and not marker.exists()
    a, b = params(full), params(run)
    assert all(torch.equal(a[k], b[k]) for k in a)
    for name in os.listdir(run / "checkpoints" / "step_00000006"):  # what a checkpoint holds loads without pickle
        if name.endswith(".pt"):
            torch.load(run / "checkpoints" / "step_00000006" / name, weights_only=True)


def test_no_intact_checkpoint_stops_with_advice(world, tmp_path):
    run = tmp_path / "run"
    train.main(args(world, run, max_steps=4, halt_after=1, save_every=1))
    (run / "checkpoints" / "step_00000001" / "rank_0.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit, match=r"no checkpoint of .*checkpoints is intact \(1 tried, each named above\); "
                                         "to start over in this folder, pass --resume false"):
        train.main(args(world, run, max_steps=4, save_every=1))


# ---------------------------------------------------------------------------------------------------------------
# 7. Bookkeeping
# ---------------------------------------------------------------------------------------------------------------

def comparable(lines):
    return [{k: v for k, v in m.items() if k not in ("tokens_per_s", "peak_memory_mib")} for m in lines]


def test_a_resume_between_log_lines_logs_what_an_uninterrupted_run_logs(world, tmp_path):
    full, run = tmp_path / "full", tmp_path / "run"
    common = dict(max_steps=6, epochs=3, log_every=3, save_every=0)
    train.main(args(world, full, method="confpo", **common))
    train.main(args(world, run, method="confpo", halt_after=2, **common))  # step 2: mid-way through a log line
    train.main(args(world, run, method="confpo", **common))
    assert [m["step"] for m in metrics(run)] == [3, 6]
    assert comparable(metrics(run)) == comparable(metrics(full))


def test_a_finished_run_rerun_does_nothing_twice(world, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(args(world, out, judge="synthetic"))
    stamp = (out / "final" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    train.main(args(world, out, judge="synthetic"))
    assert "this run had already finished" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(metrics(out, "generate")) == 1 and [m["step"] for m in metrics(out)] == [1, 2]


def test_confpo_rand_does_not_depend_on_the_micro_batch_size(world, tmp_path):
    two, four = tmp_path / "two", tmp_path / "four"
    common = dict(method="confpo_rand", max_steps=4, epochs=2, adam_eps=1e-6)
    train.main(args(world, two, micro_batch_size=2, **common))
    train.main(args(world, four, micro_batch_size=4, **common))
    for x, y in zip(metrics(two), metrics(four)):  # the same tokens drawn: the same losses, to float rounding
        assert abs(x["loss"] - y["loss"]) < 1e-5 and x["selected_ratio_chosen"] == y["selected_ratio_chosen"]
    a, b = params(two), params(four)
    for k in a:  # equal up to float summation order, which Adam amplifies (other draws differ by ~1e-2)
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-4, msg=k)


# ---------------------------------------------------------------------------------------------------------------
# 9. A non-finite loss
# ---------------------------------------------------------------------------------------------------------------

def test_a_non_finite_loss_stops_before_the_step_or_is_skipped(world, tmp_path, monkeypatch):
    out = tmp_path / "huge_lr"  # step 1 is finite, its update sends the weights to overflow
    with pytest.raises(SystemExit, match=r"step 2: the loss or the gradient norm \(\w+\) is not finite; stopped before "
                                         r"the optimizer step\. The last checkpoint is .*step_00000001\. Lower --lr"):
        train.main(args(world, out, method="simpo", lr=1e30, max_steps=4, save_every=1))
    skipped = tmp_path / "skipped"  # an objective whose every loss is NaN (a --beta nan is refused at parse time)

    def nan_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask):
        per_pair, metrics_ = losses.simpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask)
        return per_pair * float("nan"), metrics_
    monkeypatch.setitem(train.METHODS, "simpo", train.Method(nan_loss))
    train.main(args(world, skipped, method="simpo", max_steps=3, epochs=2, skip_nonfinite="true"))
    assert [m["skipped_steps"] for m in metrics(skipped)] == [1, 2, 3]
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(world["llama-tiny"]).state_dict()
    after = params(skipped)
    assert all(torch.equal(after[k], start[k]) for k in after)  # no NaN reached the weights: nothing moved


# ---------------------------------------------------------------------------------------------------------------
# 8, 10. Fast answers; the study's folders
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", [["train.py"], ["score.py"], ["sepo_pipeline.py"], ["onpolicy.py"],
                                    ["studies/experiments.py"], ["studies/real_study.py"], ["data.py", "check"],
                                    ["tiny/__main__.py"], ["benchmarks/bench.py"]])
def test_help_answers_before_torch_is_imported(script, tmp_path):
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(HERE, script[0]), *script[1:], "--help"],
                          env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "torch" not in imported and "datasets" not in imported


def test_quick_study_has_folders_of_its_own_and_results_are_keyed_by_configuration(tmp_path):
    cfg = experiments.configure(["--quick"])
    assert cfg.output_dir == "runs/experiments-quick" and cfg.figures == "runs/experiments-quick/figures"
    assert experiments.configure([]).figures == "docs/experiments"
    assert experiments.configure(["--quick", "--figures", "x"]).figures == "x"
    calls, path = [], str(tmp_path / "result.json")
    assert measures.cached(path, {"lr": 1}, lambda: calls.append(1) or {"r": 1}) == {"r": 1}
    assert measures.cached(path, {"lr": 1}, lambda: calls.append(1) or {"r": 2}) == {"r": 1}
    assert calls == [1]
    with pytest.raises(SystemExit, match="holds a result of another configuration"):
        measures.cached(path, {"lr": 2}, lambda: {"r": 3})


# ---------------------------------------------------------------------------------------------------------------
# Faults found by trying it (issue 22): nothing silently wrong, a folder never made unusable, every mistake one line
# ---------------------------------------------------------------------------------------------------------------

def cli_line(main, argv, capsys):
    """A command run as the scripts run it (utils.cli): its exit code and its one error line."""
    code = utils.cli(main, [str(a) for a in argv])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, lines
    return code, lines[0]


@pytest.mark.parametrize("flag,value,said", [("beta", "-1", "must be positive"), ("beta", "nan", "finite number"),
                                             ("lr", "nan", "learning rate"), ("lr", "-1", "learning rate"),
                                             ("micro_batch_size", "0", "at least 1"),
                                             ("warmup_ratio", "1.5", "[0, 1]"), ("lambda_", "-0.1", "negative")])
def test_a_number_out_of_its_range_is_one_line_before_anything_loads(world, tmp_path, capsys, flag, value, said):
    """--beta -1 used to train the inverted objective with exit 0; --beta nan failed at step 1 advising a lower
    lr; --lr nan, --lr -1 and --micro_batch_size 0 were tracebacks after everything had loaded."""
    method = "cpo" if flag == "lambda_" else "simpo"
    code, line = cli_line(train.main, args(world, tmp_path / "r", method=method, **{flag: value}), capsys)
    assert code == 2 and line.startswith(f"error: --{flag} {value}") and said in line, line
    assert not (tmp_path / "r").exists()


def test_a_damaged_model_an_output_dir_that_is_a_file_and_an_unwritable_folder(world, tmp_path, capsys,
                                                                                monkeypatch):
    damaged = tmp_path / "damaged"
    shutil.copytree(world["llama-tiny"], damaged)
    with open(damaged / "model.safetensors", "r+b") as fh:
        fh.truncate(200)
    code, line = cli_line(train.main, args(world, tmp_path / "r", model=damaged), capsys)
    assert code == 1 and f"{damaged}: the model could not be loaded" in line and "cut short" in line
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    code, line = cli_line(train.main, args(world, afile), capsys)
    assert code == 1 and line == f"error: {afile} is a file, not a folder; choose another --output_dir"
    assert afile.read_text() == "not a folder"

    def refuse(*a, **kw):  # the tests run as root, which no permission stops: a read-only folder is mocked
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "makedirs", refuse)
    code, line = cli_line(train.main, args(world, tmp_path / "ro" / "run"), capsys)
    assert code == 1 and line == f"error: cannot write in {tmp_path / 'ro' / 'run'} (Permission denied); choose " \
                                 "another --output_dir"


def test_a_kill_during_the_first_reference_pass_resumes(world, tmp_path):
    """config.json was written only after the reference pass, so a rerun after a kill -9 in the first pass took
    ref_logps/ for a stranger's files. Now the folder is known as a run before the pass, a killed pass resumes,
    a damaged block is computed again (named), and the run ends as an uninterrupted one."""
    out, full = tmp_path / "killed", tmp_path / "full"
    argv = args(world, out, method="dpo", precompute_ref="true", data=world["train"], micro_batch_size=8,
                global_batch_size=8, max_steps=2)
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *argv], env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "ref_logps" / "train_000001.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    blocks = sorted((out / "ref_logps").glob("train_*.pt"))
    assert 2 <= len(blocks) < 8 and (out / "config.json").exists()
    with open(blocks[0], "r+b") as fh:  # and one block cut short
        fh.truncate(100)
    proc = command("train.py", argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: {blocks[0]} is damaged; computing it again" in proc.stdout + proc.stderr
    train.main(args(world, full, method="dpo", precompute_ref="true", data=world["train"], micro_batch_size=8,
                    global_batch_size=8, max_steps=2))
    assert [m["loss"] for m in metrics(out)] == [m["loss"] for m in metrics(full)]
    assert all(torch.equal(params(out)[k], v) for k, v in params(full).items())


def test_damaged_score_shards_are_scored_again_never_merged(world, tmp_path, capsys):
    """A shard cut short, one holding another block's rows, and one of garbage gave exit 0, `complete: true` and
    selections with rows missing or doubled (or a traceback). Each is named and scored again, the selections equal
    an uninterrupted run's bytes, and a killed merge's temporary file goes."""
    import score
    out = tmp_path / "scores"
    argv = ["--confpo", "--model", world["llama-tiny"], "--data", world["small"], "--output_dir", out, "--shard_size",
            "4", "--cache_dir", world["cache"], "--device", "cpu"]
    assert utils.cli(score.main, [str(a) for a in argv]) == 0
    expected = (out / "confpo.jsonl").read_bytes()
    shards = sorted((out / "shards").glob("block_*.jsonl"))
    lines = shards[1].read_text().splitlines()
    shards[1].write_text("\n".join(lines[:2]) + "\n")  # cut to half its rows
    shards[2].write_text(shards[0].read_text())  # another block's rows
    shards[3].write_text("garbage\n")
    (out / f"confpo.jsonl.tmp{os.getpid() + 1}").write_text("left by a killed merge")
    capsys.readouterr()
    assert utils.cli(score.main, [str(a) for a in argv]) == 0
    said = capsys.readouterr()
    for shard in shards[1:]:
        assert f"warning: {shard} is damaged (not the scores of its block's pairs); scoring it again" in said.out
    assert (out / "confpo.jsonl").read_bytes() == expected
    assert json.loads((out / "manifest.json").read_text())["complete"]
    assert not list(out.glob("*.tmp*"))


def test_two_first_time_jobs_on_one_tiny_world_share_one_sft_build(tmp_path):
    """tiny.trained() deleted the SFT run folder, the other job's lock included: two jobs trained the start side
    by side, one died, the model's metrics held every line twice. Now the second job waits for the first."""
    tw = tmp_path / "tw"
    jobs = [subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), "--tiny_world", str(tw), "--output_dir",
                              str(tmp_path / name), "--max_steps", "2", "--judge", "none", "--method", method,
                              "--cache_dir", str(tmp_path / "cache")], env=ENV, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for name, method in (("a", "confpo"), ("b", "simpo"))]
    for job in jobs:
        _, err = job.communicate(timeout=600)
        assert job.returncode == 0, err[-2000:]
    lines = (tw / "models" / "llama-small-sft" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) and lines


def test_sigterm_saves_at_the_step_boundary_and_the_rerun_ends_as_one_that_never_stopped(world, tmp_path):
    """SIGTERM (a scheduler's preemption) ended a run with nothing printed. Now the step finishes, a checkpoint is
    saved, one line says where, the lock is released, and the same command resumes to the same parameters; with
    --save_on_signal false it stops at once, as Ctrl-C."""
    out, full = tmp_path / "run", tmp_path / "full"
    argv = args(world, out, max_steps=40, epochs=20)
    code, line = signalled(argv, tmp_path, lambda: (out / "metrics.jsonl").exists() and len(metrics(out)) >= 2,
                           signal.SIGTERM)
    assert code == 143
    step = rundir.checkpoints(out)[-1]
    assert line.startswith("error: stopped by SIGTERM after step ") and f"saved in {step}" in line
    assert not (out / ".lock").exists()
    proc = command("train.py", argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    train.main(args(world, full, max_steps=40, epochs=20))
    assert all(torch.equal(params(out)[k], v) for k, v in params(full).items())
    now = tmp_path / "at_once"
    argv = args(world, now, max_steps=400, epochs=200, save_on_signal="false")
    code, line = signalled(argv, tmp_path, lambda: (now / "metrics.jsonl").exists() and len(metrics(now)) >= 1,
                           signal.SIGTERM)
    assert code == 143 and line.startswith("error: terminated (SIGTERM) during step ")
    assert "nothing new was saved" in line and not rundir.checkpoints(now)


def test_missing_data_on_the_default_path_is_found_before_the_sft_start_is_built(tmp_path, capsys):
    tw = tmp_path / "tw"
    code, line = cli_line(train.main, ["--tiny_world", tw, "--data", tmp_path / "typo.jsonl", "--output_dir",
                                       tmp_path / "r"], capsys)
    assert code == 1 and line == f"error: {tmp_path / 'typo.jsonl'}: file does not exist"
    assert not (tw / "models" / "llama-small-sft").exists()


def test_help_says_which_defaults_the_tiny_world_changes():
    import tiny
    import re
    text = train.__doc__.replace("\n", " ")
    listed = dict(re.findall(r"(\w+) ([0-9.e-]+)[,( ]", text.split("these change", 1)[1]))
    assert {k: float(v) for k, v in listed.items()} == {k: float(v) for k, v in tiny.TRAIN_DEFAULTS.items()}


def test_two_sigterms_to_a_torchrun_job_end_in_a_checkpoint_that_the_same_command_resumes(world, tmp_path):
    """Under `srun torchrun`, a preemption reaches every worker twice (Slurm's SIGTERM and the agent's forwarded
    one), and a kill of the process group once more: two SIGTERMs 50 ms apart to a 2-rank torchrun job's process
    group. Signals within utils.SIGTERM_WINDOW are one request, so the workers finish the step and save (before
    torchrun's shutdown timeout); the agent's own exit code is torchrun's, but the checkpoint is there, and the same
    command resumes from it to the end of the run."""
    out = tmp_path / "run"
    argv = args(world, out, max_steps=60, epochs=30, global_batch_size=8, micro_batch_size=2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), *argv]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.time() + 240
    while not ((out / "metrics.jsonl").exists() and len(metrics(out)) >= 2) and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=240)
    saved = rundir.checkpoints(out)
    assert saved, stderr[-3000:]
    assert "error: stopped by SIGTERM after step" in stderr, stderr[-3000:]
    step = json.loads(open(os.path.join(saved[-1], "trainer_state.json")).read())["step"]
    assert 2 <= step < 60
    resumed = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved[-1]} at step {step}" in resumed.stdout + resumed.stderr
    assert metrics(out)[-1]["step"] == 60


def choice_fields():
    """(script, config class, field, allowed values) of every choice-valued flag of every command and study."""
    import dataclasses
    import typing

    import experiments
    import onpolicy
    import real_study
    import score
    import sepo_pipeline
    configs = {"train.py": train.Config, "score.py": score.ScoreConfig, "onpolicy.py": onpolicy.OnPolicyConfig,
               "sepo_pipeline.py": sepo_pipeline.PipelineConfig, "studies/experiments.py": experiments.ExperimentConfig,
               "studies/real_study.py": real_study.RealStudyConfig}
    out = []
    for script, cls in configs.items():
        for f in dataclasses.fields(cls):
            allowed = f.metadata.get("options") or (typing.get_args(f.type) if typing.get_origin(f.type) is
                                                   typing.Literal else None)
            if allowed:
                out.append((script, cls, f.name, allowed))
    return out


def test_every_choice_valued_flag_refuses_an_unknown_value_in_one_line_with_did_you_mean(world, tmp_path, capsys):
    """`--dtype fp8x`, `--device gpux` and `--logp_path chnked` ran the whole job (the last skipping its head
    check); `--dtype fp16` ran as auto. Every choice-valued flag of every script now refuses an unknown value in one
    error line before anything loads, with the closest choices."""
    import experiments
    import onpolicy
    import real_study
    import score
    import sepo_pipeline
    mains = {"train.py": train.main, "score.py": score.main, "onpolicy.py": onpolicy.main,
             "sepo_pipeline.py": sepo_pipeline.main, "studies/experiments.py": experiments.main,
             "studies/real_study.py": real_study.main}
    found = choice_fields()
    assert {(s, n) for s, _, n, _ in found} >= {("train.py", "dtype"), ("train.py", "device"), ("train.py", "method"),
                                                ("train.py", "logp_path"), ("train.py", "form"), ("score.py", "format"),
                                                ("sepo_pipeline.py", "until"), ("onpolicy.py", "dtype"),
                                                ("studies/real_study.py", "device")}
    for script, _, name, allowed in found:
        wrong = str(allowed[-1]) + "x"  # one letter off the last choice: the hint names it
        code, line = cli_line(mains[script], [f"--{name}", wrong, "--output_dir", tmp_path / "never"], capsys)
        assert code == 2 and f"did you mean {allowed[-1]}" in line, (script, name, line)
        assert not (tmp_path / "never").exists()
    code, line = cli_line(train.main, ["--dtype", "fp16"], capsys)
    assert code == 2 and "fp16 is not supported: it needs loss scaling" in line
    code, line = cli_line(train.main, ["--logp_path", "chnked"], capsys)
    assert code == 2 and "did you mean chunked" in line
    code, line = cli_line(train.main, ["--config", str(_write(tmp_path / "c.json", {"device": "gpux"}))], capsys)
    assert code == 2 and "--device 'gpux'" in line  # a --config file goes through the same check


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def test_a_gpu_that_torch_cannot_use_stops_a_real_model_in_one_line(monkeypatch, capsys):
    """--device auto fell back to the CPU without a word when CUDA was unusable; with a real model it now stops and
    says why (a CPU build, or a driver older than the build). CUDA_VISIBLE_DEVICES set empty hides the GPUs on
    purpose: the CPU, with a note. The tiny world never asks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real = os.path.exists
    monkeypatch.setattr(os.path, "exists", lambda p: p == "/dev/nvidia0" or real(p))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(utils.UserError, match=r"has an NVIDIA GPU, but this torch .* is a CPU build"):
        utils.usable_cuda(model_given=True)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with pytest.raises(utils.UserError, match="the NVIDIA driver may be older than this build needs"):
        utils.usable_cuda(model_given=True)
    assert utils.usable_cuda(model_given=False) is False  # the tiny world: the CPU is the point
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert utils.usable_cuda(model_given=True) is False
    assert "CUDA_VISIBLE_DEVICES is empty: running on the CPU" in capsys.readouterr().out
