"""An output folder that survives kills: what train.py, score.py, onpolicy.py and sepo_pipeline.py write, and how a
killed job resumes there. No method, data or model code here.

    FolderLock   one job writes a folder at a time; a second job is refused with the holder's host, pid and command
    claim        a folder holds one run: its marker (config.json, manifest.json, ...) names what it computes, by
                 content fingerprints; a folder of another run, or of files this project did not write, is refused
    atomic_write / writing / save_atomic / remove   files written to a temporary path and renamed: a reader sees the
                 old version or the new one, never half of one
    Blocks       one resumable block store: a long computation written block by block; a killed job resumes at the
                 first missing block, a damaged block is named and computed again, leftovers are removed, rank 0
                 decides what is missing (train.py's reference log-probs, score.py's shards, onpolicy.py's samples)
    checkpoints  model and optimizer shards (torch.distributed.checkpoint), RNG states and a trainer state, written to
                 step_N.tmp and renamed; resume from the newest intact one; the metrics file and its trackers
The Hugging Face export of a run (final/, with run.json naming its step) is models.export.

The commands import it after their flags are checked (torch takes seconds to load).
"""

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import random
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from utils import UserError, disk_full, log0, on_rank_zero, reason

# ---------------------------------------------------------------------------------------------------------------
# Files that survive a kill: a reader sees the old version or the new one, never half of one
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def writing(path, mode="w"):
    """A file opened for writing at a temporary path (path.tmp<pid>), renamed to `path` when the block ends without
    an error and removed when it does not."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write(path, text):
    """Write a text file through a temporary file and a rename."""
    with writing(path) as fh:
        fh.write(text)


def save_atomic(obj, path):
    """torch.save through a temporary file and a rename."""
    with writing(path, "wb") as fh:
        torch.save(obj, fh)


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path):
    """Delete a folder so that a kill half-way leaves nothing that looks complete: rename it to *.old.tmp (atomic),
    then delete; leftover *.tmp folders are cleared by the next run."""
    path = os.path.abspath(path)
    doomed = f"{path}.old.tmp"
    shutil.rmtree(doomed, ignore_errors=True)  # what an earlier kill left, or the rename below would fail
    os.replace(path, doomed)
    fsync_dir(os.path.dirname(path))
    shutil.rmtree(doomed, ignore_errors=True)


def remove_leftovers(*patterns):
    """Delete what killed writes left (files or folders matching the glob patterns: *.tmp<pid>, step_N.tmp, ...)."""
    for pattern in patterns:
        for leftover in glob.glob(pattern):
            if os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                os.remove(leftover)


def read_json(path):
    """A JSON file's contents, or None when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# What a run computes from: content fingerprints, whatever the path's spelling
# ---------------------------------------------------------------------------------------------------------------

WHOLE = 64 * 2**20  # files up to this size are hashed whole; larger ones by size and samples (model weights)


def fingerprint(path):
    """A content fingerprint of a file or folder ('' for '', "hub:<name>" for what is not on disk), the same
    however the path is spelled and wherever the folder is moved or copied. Files up to 64 MiB are hashed whole;
    larger ones by their size, their first and last 4 MiB and 16 samples between (cheap for model weights)."""
    if not path:
        return ""
    if not os.path.exists(path):
        return f"hub:{path}"
    files = [path] if os.path.isfile(path) else []
    for folder, subfolders, names in os.walk(path):  # hidden and temporary folders too are left out (.git, .cache)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and ".tmp" not in d)
        files += [os.path.join(folder, n) for n in sorted(names) if not n.startswith(".") and ".tmp" not in n]
    h = hashlib.sha256()
    for name in files:
        size = os.path.getsize(name)
        h.update(f"{os.path.relpath(name, path) if name != path else ''}:{size}\n".encode())
        with open(name, "rb") as fh:
            if size <= WHOLE:
                for block in iter(lambda: fh.read(2**20), b""):
                    h.update(block)
            else:
                for offset in [0, size - 4 * 2**20] + [size * i // 17 for i in range(1, 17)]:
                    fh.seek(offset)
                    h.update(fh.read(4 * 2**20 if offset in (0, size - 4 * 2**20) else 2**16))
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------------------
# Output folders: one writer at a time, never someone else's folder, a run known by what it computes
# ---------------------------------------------------------------------------------------------------------------

LOCK = ".lock"


class FolderLock:
    """An exclusive lock on an output folder (flock on folder/.lock), taken by rank 0 for the whole job; the other
    ranks of the job share it. A second job is refused with the holder's host, pid, start time and command. A
    lock whose holder died is released by the OS: the next run takes it over and says so. A failed start leaves
    no folder behind where there was none."""

    def __init__(self, folder, rank):
        self.folder, self.rank, self.fd, self.created = folder, rank, None, False

    def __enter__(self):
        message = None
        if self.rank == 0:
            message = self._acquire()
        box = [message]
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise UserError(box[0])
        return self

    def _acquire(self):
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            return f"{self.folder} is a file, not a folder; choose another --output_dir"
        self.created = not os.path.exists(self.folder)
        path = os.path.join(self.folder, LOCK)
        while True:
            try:
                os.makedirs(self.folder, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:  # a read-only or foreign-owned place, a path through a file
                self._undo_create()
                return f"cannot write in {self.folder} ({e.strerror}); choose another --output_dir"
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                self._undo_create()
                return (f"{self.folder} is in use by another run ({holder or 'holder unknown'}); wait for it to end, "
                        f"or stop it, or choose another --output_dir")
            except OSError as e:  # Lustre without flock (ENOSYS), NFS without a lock daemon (ENOLCK), ...
                if e.errno not in (errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                print(f"warning: {self.folder}: this filesystem cannot lock files ({e.strerror}): the folder is not "
                      "locked, so make sure no other job writes in it", file=sys.stderr, flush=True)
                break
            if os.path.exists(path) and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # the file we locked is still the lock file (a releasing run may have just deleted it)
            os.close(fd)
        left = os.read(fd, 4096).decode(errors="replace").strip()
        if left:
            print(f"note: {self.folder} was locked by a run that ended without releasing it ({left}); taking it "
                  "over", file=sys.stderr, flush=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, ", ".join(f"{k} {v}" for k, v in me.items()).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return None

    def _undo_create(self):
        if self.created:  # a failed start leaves no folder behind where there was none
            shutil.rmtree(self.folder, ignore_errors=True)

    def __exit__(self, kind, error, tb):
        if self.fd is not None:
            started = any(f != LOCK for f in os.listdir(self.folder))
            if error is not None and self.created and not started:
                self._undo_create()
            else:
                os.remove(os.path.join(self.folder, LOCK))
            os.close(self.fd)  # releases the lock
            self.fd = None
        return False


def read_marker(folder, marker):
    """The saved settings of the project's run in `folder` (its marker file), or None for a folder that does not
    exist or is empty. A folder that holds other files, and no marker, is not ours: refused, never touched."""
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise UserError(f"{folder} is a file, not a folder; choose another --output_dir")
        return None
    path = os.path.join(folder, marker)
    if not os.path.exists(path):
        foreign = sorted(f for f in os.listdir(folder) if f != LOCK)
        if foreign:
            raise UserError(f"{folder} exists and holds files this project did not write ({', '.join(foreign[:5])}"
                            f"{', ...' if len(foreign) > 5 else ''}), and no {marker}; choose another --output_dir")
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            saved = json.load(fh)
        problem = None if isinstance(saved, dict) else "not a JSON object"
    except (OSError, ValueError) as e:
        problem = reason(e)
    if problem:
        raise UserError(f"{path} is unreadable ({problem}); it does not say what this folder holds, so it is left "
                        "alone: choose another --output_dir")
    return saved


def differences(saved, mine, resumable=()):
    """What differs between a saved run and this one, outside `resumable` (and keys starting with "_"): paths
    compare by their content fingerprints (under "_fingerprints" in both), everything else by value -> [(field,
    theirs, mine)]."""
    prints = mine.get("_fingerprints", {})
    out = []
    for key, value in mine.items():
        if key in resumable or key.startswith("_"):
            continue
        if key in prints and "_fingerprints" in saved:  # folders saved before fingerprints compare by value
            if saved["_fingerprints"].get(key) != prints[key]:
                out.append((key, saved.get(key), value))
        elif saved.get(key) != value:
            out.append((key, saved.get(key), value))
    return out


def claim(folder, marker, mine, what, resumable=(), key=None, replaceable=None, hint=""):
    """The one check that a folder is this run's, made by rank 0 and followed by every rank -> the saved marker (or
    None for a new folder). what: what the folder holds otherwise, in words; mine: what this run computes (paths by
    content under "_fingerprints"); key: the marker's entry that holds it (None: the whole marker); resumable:
    fields that may change from run to run.
    A folder of another run is refused in one line that names what differs, unless replaceable() says it holds
    nothing to resume (a run that saved nothing: its settings are simply replaced, with a note)."""
    def check():
        saved = read_marker(folder, marker)
        if saved is None:
            return None
        diff = differences(saved.get(key, {}) if key else saved, mine, resumable)
        if not diff:
            return saved
        said = "; ".join(f"{k} {theirs!r} there, {ours!r} now" + (" (other contents)" if theirs == ours else "")
                         for k, theirs, ours in diff)
        if replaceable is not None and replaceable():
            log0(f"note: {folder} held the settings of a run that saved nothing ({said}); replacing them")
            return None
        raise UserError(f"{folder} holds {what} (differs in: {said}); {hint or 'choose another'}"
                        f"{' or choose another' if hint else ''} --output_dir")
    return on_rank_zero(check)


# ---------------------------------------------------------------------------------------------------------------
# One resumable block store
# ---------------------------------------------------------------------------------------------------------------

class Blocks:
    """A long computation written block by block in `folder`: block b at folder/<prefix>NNNNNN<ext>, written
    through a temporary file. read(path, b) returns a block's contents, or None when it is damaged (unreadable, cut
    short, of other items): a damaged block is named and computed again. With `identity` (a JSON-able description
    of what the blocks hold), blocks of anything else are cleared first. damaged: what the warning about a damaged
    block says after "is damaged"."""

    def __init__(self, folder, n_blocks, read, prefix="block_", ext=".jsonl", identity=None,
                 damaged="computing it again"):
        self.folder, self.n_blocks, self.read, self.prefix, self.ext = folder, n_blocks, read, prefix, ext
        self.identity, self.damaged = identity, damaged

    def path(self, b):
        return os.path.join(self.folder, f"{self.prefix}{b:06d}{self.ext}")

    def missing(self):
        """Rank 0 decides, every rank follows -> the blocks still to compute. Leftovers of killed writes are
        removed, and damaged blocks (with a warning naming each)."""
        def look():
            remove_leftovers(os.path.join(self.folder, f"{self.prefix}*.tmp*"))
            if self.identity is not None:
                os.makedirs(self.folder, exist_ok=True)
                marker = os.path.join(self.folder, f"{self.prefix.rstrip('_') or 'blocks'}.json")
                if read_json(marker) != self.identity:  # blocks of anything else
                    for stale in glob.glob(os.path.join(self.folder, f"{self.prefix}[0-9]*{self.ext}")):
                        os.remove(stale)
                    atomic_write(marker, json.dumps(self.identity))
            todo = []
            for b in range(self.n_blocks):
                if os.path.exists(self.path(b)) and self.read(self.path(b), b) is None:
                    log0(f"warning: {self.path(b)} is damaged{'' if self.damaged.startswith('(') else ';'} "
                         f"{self.damaged}")
                    os.remove(self.path(b))
                if not os.path.exists(self.path(b)):
                    todo.append(b)
            return todo
        return on_rank_zero(look)

    def write_text(self, b, text):
        os.makedirs(self.folder, exist_ok=True)
        atomic_write(self.path(b), text)

    def save(self, b, obj):
        os.makedirs(self.folder, exist_ok=True)
        save_atomic(obj, self.path(b))

    def load(self, b):
        """A block that was checked: damaged since (another process, a disk) is a one-line error."""
        value = self.read(self.path(b), b)
        if value is None:
            raise UserError(f"{self.path(b)} is damaged (it changed after it was checked); run the same command "
                            "again to compute it again")
        return value


def read_jsonl_block(path, check):
    """A JSONL block's lines, or None when the file cannot be read or check(lines) is false (or raises on a line of
    the wrong shape)."""
    try:
        with open(path, encoding="utf-8") as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
        return lines if check(lines) else None
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints, RNG states, the metrics file, a finished run
# ---------------------------------------------------------------------------------------------------------------

def checkpoints(out_dir, every=None):
    """Complete checkpoints, oldest first: folders step_NNNNNNNN holding trainer_state.json (written last); with
    every, the ones --save_every wrote (a step that is a multiple of it) and the newest (of a finished run: its last
    step, --save_final), not one saved when a run was stopped and resumed."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
                  and os.path.exists(os.path.join(root, d, "trainer_state.json")))
    return [os.path.join(root, d) for d in done if not every or checkpoint_step(d) % every == 0 or d == done[-1]]


def checkpoint_step(path):
    """The step of a checkpoint folder step_NNNNNNNN."""
    return int(os.path.basename(path).split("_")[1])


def last_checkpoint(out_dir):
    """Where a stopped run would resume from, in words."""
    found = checkpoints(out_dir)
    return f"The last checkpoint is {found[-1]}" if found else "There is no checkpoint yet"


def save_checkpoint(out_dir, step, model, optimizer, trainer_state, rank_state, rank, keep_last):
    """Model and optimizer shards through torch.distributed.checkpoint, plus this rank's RNG states and rank_state
    (tensors and numbers only: loading runs no code), and trainer_state (JSON, with the step and every file's size,
    written last) into step_N.tmp, renamed to step_N once complete: a kill at any moment leaves the previous
    checkpoint intact, and a damaged one is recognised at resume. Keeps the newest keep_last (0: all)."""
    root = os.path.join(out_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save({"rng": rng_state(), **rank_state}, os.path.join(tmp, f"rank_{rank}.pt"))
        dist.barrier()
        if rank == 0:
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            state = {"step": step, "world_size": dist.get_world_size(), **trainer_state, "files": files}
            atomic_write(os.path.join(tmp, "trainer_state.json"), json.dumps(state))
            if os.path.exists(final):  # re-saving a step (a run restarted from scratch): retire the old one first
                remove(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
                remove(old)
    except Exception as e:
        if disk_full(e, tmp):
            raise UserError(f"the disk is full: saving {final} failed ({type(e).__name__}). Free some space and run "
                            f"the same command again. {last_checkpoint(out_dir)}",
                            everywhere=False) from e
        raise
    dist.barrier()


def resume(found, model, optimizer, rank):
    """Load the newest intact checkpoint of `found` into the model and optimizer, and this rank's RNG states ->
    (its trainer_state, this rank's rank_state or None when resuming on more ranks than saved). A checkpoint that
    is incomplete or unreadable on any rank is skipped with a warning that names it; when none is intact, the run
    stops."""
    for path in reversed(found):
        problem = ""
        try:
            loaded = load_checkpoint(path, model, optimizer, rank)
        except Exception as e:  # a damaged checkpoint: any error of the readers
            problem = reason(e)
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, problem)
        bad = [(r, p) for r, p in enumerate(verdicts) if p]
        if not bad:
            log0(f"resumed from {path} at step {loaded[0]['step']}")
            return loaded
        log0(f"warning: skipping checkpoint {path}: unreadable on rank {bad[0][0]} ({bad[0][1]})")
    raise UserError(f"no checkpoint of {os.path.dirname(found[0])} is intact ({len(found)} tried, each named "
                    "above); to start over in this folder, pass --resume false")


def load_checkpoint(path, model, optimizer, rank):
    """One checkpoint -> (trainer_state, rank_state or None); raises when it is damaged."""
    with open(os.path.join(path, "trainer_state.json")) as fh:
        trainer_state = json.load(fh)
    for name, size in trainer_state.get("files", {}).items():
        actual = os.path.getsize(os.path.join(path, name)) if os.path.exists(os.path.join(path, name)) else None
        if actual != size:
            raise OSError(f"{name} has {actual} bytes, {size} were written")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    mine = os.path.join(path, f"rank_{rank}.pt")
    if not os.path.exists(mine):  # resuming on more ranks than saved
        return trainer_state, None
    saved = torch.load(mine, weights_only=True)  # tensors and numbers only: loading runs no code
    set_rng_state(saved.pop("rng"))
    return trainer_state, saved


def rng_state():
    """Python's, NumPy's, torch's (and this rank's GPU's) generator states as tensors and numbers. Only this rank's
    device: a resume with another number of visible GPUs (CUDA_VISIBLE_DEVICES) still reads it."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": torch.tensor(mt, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
            "numpy_gauss": float(cached), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}


def set_rng_state(s):
    random.setstate((s["python_version"], tuple(s["python"].tolist()), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_has_gauss"],
                         s["numpy_gauss"]))
    torch.set_rng_state(s["torch"])
    cuda = s["cuda"]
    if isinstance(cuda, (list, tuple)):  # checkpoints before this version saved every visible GPU's state
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and len(cuda) > \
            torch.cuda.current_device() else torch.zeros(0, dtype=torch.uint8)
    if len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


class Meter:
    """The metrics file's training lines: sums of per-pair metrics over micro-steps and ranks; `result()` turns them
    into the logged averages. Its partial sums go into checkpoints, so a line after a resume covers the same pairs as
    an uninterrupted run's; `tokens_timed` and `seconds` count only what this process read since the last line, and
    the time its steps took (tokens/s)."""

    def __init__(self, device):
        self.sums, self.device = {}, device

    def timed(self, seconds):
        self.sums["seconds"] = self.sums.get("seconds", 0.0) + seconds

    def add(self, losses_, metrics, tokens):
        rows = {"loss": losses_.detach().float(), **{k: v.float() for k, v in metrics.items()}}
        for suffix in ("", "_all"):  # over the selected tokens, and (selective methods) over all response tokens
            if f"rewards_chosen{suffix}" in metrics:
                chosen, rejected = metrics[f"rewards_chosen{suffix}"], metrics[f"rewards_rejected{suffix}"]
                rows[f"margin{suffix}"] = chosen - rejected
                rows[f"accuracy{suffix}"] = (chosen > rejected).float()
        rows["n_pairs"] = torch.ones_like(rows["loss"])
        for k, v in rows.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.sum()
        for k in ("n_tokens", "tokens_timed"):
            self.sums[k] = self.sums.get(k, 0.0) + tokens

    def state(self):
        """The partial sums for a checkpoint, each in its own type (float32 tensors stay float32, so that a resumed
        run adds up exactly as an uninterrupted one); the timing is not kept."""
        return {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.sums.items()
                if k not in ("tokens_timed", "seconds")}

    def load(self, sums):
        self.sums = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in sums.items()}

    def result(self):
        seconds = self.sums.pop("seconds", 0.0)  # this rank's own time (the ranks step together)
        keys = sorted(self.sums)
        totals = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).to(self.device) for k in keys])
        dist.all_reduce(totals)
        s = dict(zip(keys, totals.tolist()))
        pairs = max(s.pop("n_pairs"), 1.0)
        out = {"pairs": int(pairs), "tokens": int(s.pop("n_tokens")), "tokens_timed": s.pop("tokens_timed", 0.0),
               "seconds": seconds}
        for side in ("chosen", "rejected"):  # token-level selection ratio (ConfPO Fig. 8)
            if f"selected_{side}" in s:
                out[f"selected_ratio_{side}"] = s[f"selected_{side}"] / max(s[f"length_{side}"], 1.0)
        if "empty" in s:
            out["empty_pairs"] = int(s.pop("empty"))
        if "tau_chosen" in s:
            out["tau_mean"] = (s.pop("tau_chosen") + s.pop("tau_rejected")) / (2 * pairs)
        for k, v in s.items():
            if not (k.startswith("selected_") or k.startswith("length_")):
                out[k] = v / pairs
        self.sums = {}
        return out


class Trackers:
    """--report_to: the scalars of every metrics.jsonl line, also to TensorBoard (out_dir/tensorboard) and/or W&B
    (rank 0 only; the run's config once). A resumed run continues the same logs: TensorBoard purges the events
    after the step it resumes from (trim_metrics does the same to metrics.jsonl); W&B resumes its run, whose id is
    kept in out_dir/wandb_id (WANDB_MODE=offline works without a network)."""

    def __init__(self, out_dir, report_to, config, step):
        self.tb = self.wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=step + 1 if step else 0)
            self.tb.add_text("config", json.dumps(config, indent=1))
        if "wandb" in report_to:
            import wandb
            path = os.path.join(out_dir, "wandb_id")
            run_id = Path(path).read_text().strip() if os.path.exists(path) else os.urandom(4).hex()
            atomic_write(path, run_id)
            self.wandb = wandb.init(id=run_id, resume="allow", dir=out_dir, config=config,
                                    project=os.environ.get("WANDB_PROJECT", "confpo-sepo"),
                                    name=os.path.basename(os.path.abspath(out_dir)))

    def log(self, line):
        """One metrics line: each number under <split>/<name>, at its step."""
        scalars = {f"{line['split']}/{k}": v for k, v in line.items() if k not in ("step", "split")
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, line["step"])
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=line["step"])

    def __enter__(self):
        return self

    def __exit__(self, *error):
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(path):
    """The lines of metrics.jsonl that parse (a line cut short by a kill does not)."""
    lines = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return lines


def append_metrics(path, line):
    with open(path, "a") as fh:
        fh.write(json.dumps(line) + "\n")


def trim_metrics(path, step):
    """Drop the lines a stopped run wrote after its last checkpoint (they will be written again): all of them when
    starting from step 0, and a line cut short by a kill."""
    if os.path.exists(path):
        kept = [line for line in read_metrics(path) if step > 0 and isinstance(line, dict)
                and isinstance(line.get("step"), int) and line["step"] <= step]
        atomic_write(path, "".join(json.dumps(line) + "\n" for line in kept))


def finished_at(out_dir):
    """The step at which final/ was exported (its run.json), or None."""
    saved = read_json(os.path.join(out_dir, "final", "run.json"))
    return saved.get("step") if isinstance(saved, dict) else None
