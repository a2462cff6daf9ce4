"""What every script shares: config from flags and files, processes (torchrun or a world of one), and files that
survive a kill (written to a temporary path, then renamed). No method, data or model code here.

Layers (test_layers.py holds them): losses, data, utils <- confpo, sepo, models, tiny, report <- train <- score
<- sepo_pipeline <- experiments, bench. A module imports only from lower layers, from inside a function neither.
"""

import argparse
import dataclasses
import json
import os
import shutil
from dataclasses import field

import torch
import torch.distributed as dist


def arg(default, help, **argparse_kwargs):
    """A config field: its default, its help text, and any extra argparse keywords (nargs, const, ...)."""
    return field(default=default, metadata={"help": help, **argparse_kwargs})


# ---------------------------------------------------------------------------------------------------------------
# Config: transformers.HfArgumentParser builds the flags; a JSON file (--config) and explicit flags override defaults
# ---------------------------------------------------------------------------------------------------------------

def parse_dataclass(cls, argv=None, description=None, choices=None, numbers_as_text=()):
    """Flags override --config FILE.json, which overrides the dataclass defaults -> (instance, names set explicitly).

    Every field is a flag (`--name` or `--name-with-hyphens`) with its help text; a bool is `--flag`, `--flag
    false` or (for a True default) `--no_flag`. choices: {field: allowed values}; numbers_as_text: text fields that a
    JSON file may also give as a number (a threshold of 0.6). The names set explicitly (in the file or as flags) let
    a script fill other defaults (the tiny world's) only where the user said nothing.
    """
    from transformers import HfArgumentParser
    parser = HfArgumentParser(cls, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a JSON file of config fields (flags given here override it)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.dest in fields:
            if action.option_strings[0].startswith("--no_"):
                action.help = f"the same as --{action.dest} false"
            else:
                alone = "; the flag alone means true" if action.const is True else ""
                action.help = f"{action.help}{alone} (default: {fields[action.dest].default})".replace("%", "%%")
            action.choices = (choices or {}).get(action.dest, action.choices)
        if action.dest in fields or action.dest == "config":
            action.default = argparse.SUPPRESS  # the namespace holds only what was given
    args = vars(parser.parse_args(argv))
    values = {}
    if "config" in args:
        with open(args.pop("config")) as fh:
            values = json.load(fh)
        for key, value in values.items():
            if key not in fields:
                parser.error(f"--config: unknown field {key!r}")
            kind = _base_type(fields[key].type)
            if value is not None and not (isinstance(value, kind) or (kind is float and isinstance(value, int))
                                          or (key in numbers_as_text and isinstance(value, (int, float)))):
                parser.error(f"--config: field {key!r} must be {kind.__name__}, got {value!r}")
            if choices and key in choices and value not in choices[key]:
                parser.error(f"--config: {key} {value!r} is not one of {sorted(choices[key])}")
    values.update(args)
    return cls(**values), set(values)


def _base_type(t):
    """float for Optional[float], and so on."""
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return args[0] if args else t


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------

def init_distributed(device="auto"):
    """Process group from torchrun's environment, or a world of one; an existing group is reused.
    Returns (rank, world, device)."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if "RANK" in os.environ:  # torchrun
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:  # plain `python`: the same FSDP code path over a world of one
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")


def run_in_group(device, fn):
    """fn(rank, world, device) inside a process group, destroyed afterwards unless a caller already had one (the
    SePO pipeline runs several stages in one group)."""
    owner = not dist.is_initialized()
    rank, world, dev = init_distributed(device)
    try:
        return fn(rank, world, dev)
    finally:
        if owner:
            dist.destroy_process_group()


def log0(*args):
    """print on rank 0 only."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def rank_zero_first(fn):
    """Run fn on rank 0, then on the other ranks: rank 0 fills the datasets cache, the others read it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    result = fn() if rank == 0 else None
    if world > 1:
        dist.barrier()
        result = result if rank == 0 else fn()
        dist.barrier()
    return result


# ---------------------------------------------------------------------------------------------------------------
# Files that survive a kill: a reader sees the old version or the new one, never half of one
# ---------------------------------------------------------------------------------------------------------------

def atomic_write(path, text):
    """Write a text file through a temporary file and a rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove(path):
    """Delete a folder so that a kill half-way leaves nothing that looks complete: rename it to *.old.tmp (atomic),
    then delete; leftover *.tmp folders are cleared by the next run."""
    doomed = f"{path}.old.tmp"
    os.replace(path, doomed)
    fsync_dir(os.path.dirname(path))
    shutil.rmtree(doomed, ignore_errors=True)


def claim_output_dir(cfg, rank, file, resumable, what):
    """Refuse an output folder that holds another run (its saved config, `file`, differs outside `resumable`); then
    save this run's config there."""
    path = os.path.join(cfg.output_dir, file)
    mine = dataclasses.asdict(cfg)
    if os.path.exists(path):
        with open(path) as fh:
            theirs = json.load(fh)
        diff = {k for k in mine if k not in resumable and theirs.get(k) != mine[k]}
        if diff:
            raise SystemExit(f"{cfg.output_dir} holds {what} (differs in: {', '.join(sorted(diff))}); "
                             "choose another --output_dir or delete it")
    dist.barrier()
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        atomic_write(path, json.dumps(mine, indent=2))
