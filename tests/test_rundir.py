"""rundir.py's guarantees, tested once, directly (the commands' own tests try them again through train.py, score.py,
onpolicy.py and sepo_pipeline.py): a write killed half-way leaves the old file; one block store resumes at the first
missing block, names and recomputes a damaged one, clears leftovers and blocks of anything else; one claim refuses
a folder of another run or of foreign files; one lock per folder; checkpoints that a damaged save never shadows."""

import json
import os

import pytest
import torch

import rundir
import utils


def in_group(fn):
    """fn() inside a world of one (the claim and the block store ask rank 0, the lock broadcasts its verdict)."""
    return utils.run_in_group("cpu", lambda rank, world, device: fn())


def test_a_write_that_fails_half_way_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    rundir.atomic_write(path, "old")
    with pytest.raises(RuntimeError):
        with rundir.writing(path) as fh:
            fh.write("new, half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    rundir.save_atomic({"x": torch.ones(2)}, tmp_path / "t.pt")
    assert torch.equal(torch.load(tmp_path / "t.pt", weights_only=True)["x"], torch.ones(2))


def blocks(folder, n=3, identity=None):
    """A store of n JSONL blocks; block b holds one line {"b": b}, anything else is damaged."""
    return rundir.Blocks(str(folder), n, lambda path, b: rundir.read_jsonl_block(path, lambda rows: rows == [{"b": b}]),
                         identity=identity)


def test_the_block_store_resumes_at_the_missing_blocks_and_computes_a_damaged_one_again(tmp_path, capsys):
    store = blocks(tmp_path / "b")
    assert in_group(store.missing) == [0, 1, 2]
    for b in (0, 1, 2):
        store.write_text(b, json.dumps({"b": b}) + "\n")
    assert in_group(store.missing) == [] and [store.load(b) for b in range(3)] == [[{"b": 0}], [{"b": 1}], [{"b": 2}]]
    with open(store.path(1), "w") as fh:  # cut short by a kill (or of another block)
        fh.write('{"b": 1')
    (tmp_path / "b" / "block_000002.jsonl.tmp123").write_text("a killed write")
    assert in_group(store.missing) == [1]
    assert f"warning: {store.path(1)} is damaged; computing it again" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "b")) == ["block_000000.jsonl", "block_000002.jsonl"]  # leftovers gone
    with open(store.path(2), "w") as fh:  # damaged after the check: named, never used
        fh.write("garbage")
    with pytest.raises(utils.UserError, match="block_000002.jsonl is damaged"):
        store.load(2)


def test_blocks_of_anything_else_are_cleared(tmp_path):
    store = blocks(tmp_path / "b", identity={"model": "a"})
    assert in_group(store.missing) == [0, 1, 2]
    store.write_text(0, json.dumps({"b": 0}) + "\n")
    assert in_group(store.missing) == [1, 2]
    assert in_group(blocks(tmp_path / "b", identity={"model": "b"}).missing) == [0, 1, 2]
    assert not os.path.exists(store.path(0))


def test_the_claim_refuses_another_run_and_foreign_files_and_lets_resumable_fields_change(tmp_path, capsys):
    folder = str(tmp_path / "run")
    mine = {"lr": 1.0, "device": "cpu", "data": "d.jsonl", "_fingerprints": {"data": "abc"}}

    def claim(settings, **kw):
        return in_group(lambda: rundir.claim(folder, "config.json", settings, "another run", {"device"}, **kw))
    assert claim(mine) is None  # a new folder
    os.makedirs(folder)
    rundir.atomic_write(os.path.join(folder, "config.json"), json.dumps(mine))
    assert claim({**mine, "device": "cuda"})["lr"] == 1.0  # a resumable field may change
    with pytest.raises(utils.UserError, match=r"holds another run \(differs in: lr 1.0 there, 2.0 now\)"):
        claim({**mine, "lr": 2.0})
    with pytest.raises(utils.UserError, match=r"differs in: data .*\(other contents\)"):  # paths by their contents
        claim({**mine, "_fingerprints": {"data": "xyz"}})
    assert claim({**mine, "lr": 2.0}, replaceable=lambda: True) is None  # it saved nothing: replaced, with a note
    assert "held the settings of a run that saved nothing" in capsys.readouterr().out
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(utils.UserError, match="holds files this project did not write"):
        in_group(lambda: rundir.claim(str(foreign), "config.json", mine, "another run"))
    for text, why in (('"just text"', "not a JSON object"), ("{", "JSONDecodeError")):  # a damaged marker says why
        (tmp_path / "run" / "config.json").write_text(text)
        with pytest.raises(utils.UserError, match=rf"config.json is unreadable \({why}"):
            claim(mine)


def test_one_job_per_folder_and_a_failed_start_leaves_no_folder(tmp_path):
    folder = str(tmp_path / "run")

    def nested():
        with rundir.FolderLock(folder, 0):
            with pytest.raises(utils.UserError, match=f"{folder} is in use by another run .*pid {os.getpid()}"):
                with rundir.FolderLock(folder, 0):
                    pass
    in_group(nested)
    assert os.listdir(folder) == []  # the lock goes with the job
    folder = str(tmp_path / "new")

    def failed():
        with rundir.FolderLock(folder, 0):
            raise RuntimeError("a model that cannot load")
    with pytest.raises(RuntimeError):
        in_group(failed)
    assert not os.path.exists(folder)


def test_a_checkpoint_round_trip_and_a_damaged_newest_one_is_skipped(tmp_path, capsys):
    out = str(tmp_path / "run")
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)

    def save_and_resume():
        for step in (1, 2, 3):
            model(torch.ones(1, 3)).sum().backward()
            optimizer.step()
            rundir.save_checkpoint(out, step, model, optimizer, {"note": step}, {"meter": {"n": torch.tensor(step)}},
                                   0, keep_last=2)
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        found = rundir.checkpoints(out)
        assert [os.path.basename(p) for p in found] == ["step_00000002", "step_00000003"]  # keep_last
        with open(os.path.join(found[-1], "rank_0.pt"), "r+b") as fh:  # the newest one damaged
            fh.truncate(10)
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        state, mine = rundir.resume(found, model, optimizer, 0)
        assert state["step"] == 2 and state["note"] == 2 and int(mine["meter"]["n"]) == 2
        assert not torch.equal(model.weight, saved["weight"])  # step 2's weights, not step 3's nor zeros
        assert model.weight.abs().sum() > 0
    in_group(save_and_resume)
    assert "warning: skipping checkpoint" in capsys.readouterr().out


def test_checkpoints_of_save_every_leave_out_a_stop_and_a_partial_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 3, 4, 7):  # --save_every 2 wrote 2 and 4, a stop (SIGTERM) 3, --save_final the last step, 7
        (root / f"step_{step:08d}").mkdir(parents=True)
        (root / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    (root / "step_00000008").mkdir()  # being written: no trainer_state.json yet
    assert [rundir.checkpoint_step(p) for p in rundir.checkpoints(str(tmp_path))] == [2, 3, 4, 7]
    assert [rundir.checkpoint_step(p) for p in rundir.checkpoints(str(tmp_path), every=2)] == [2, 4, 7]
    assert [rundir.checkpoint_step(p) for p in rundir.checkpoints(str(tmp_path), every=3)] == [3, 7]


def test_metrics_after_the_last_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    rundir.trim_metrics(str(path), 2)
    assert rundir.read_metrics(str(path)) == [{"step": 1}, {"step": 2}]


def test_a_fingerprint_follows_the_content_not_hidden_or_temporary_files_and_a_removal_survives_a_leftover(tmp_path):
    """What the downloader's .cache/, a .git/ and a killed write's *.tmp leave beside a model do not change its
    fingerprint; a byte of the model does. remove() succeeds where an earlier kill left X.old.tmp."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "weights.bin").write_bytes(b"abc")
    before = rundir.fingerprint(str(model))
    for extra in (".cache/huggingface/download/weights.bin.metadata", ".git/HEAD", "final.tmp/x", ".hidden"):
        (model / extra).parent.mkdir(parents=True, exist_ok=True)
        (model / extra).write_text("anything")
    assert rundir.fingerprint(str(model)) == before
    (model / "weights.bin").write_bytes(b"abd")
    assert rundir.fingerprint(str(model)) != before
    (tmp_path / "model.old.tmp" / "stale").mkdir(parents=True)
    rundir.remove(str(model))
    assert not model.exists() and not (tmp_path / "model.old.tmp").exists()
