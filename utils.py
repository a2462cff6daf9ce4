"""What every script shares: settings declared once and checked from flags and files, one-line errors, processes
(torchrun or a world of one). No method, data or model code here; output folders are rundir.py's.

torch is imported inside the functions that need it, so that `--help` and a mistyped flag answer before torch
loads. Layers (tests/test_layers.py holds them): losses, data, utils <- confpo, sepo, rundir <- models, tiny <- train
<- score, onpolicy <- sepo_pipeline, generate <- studies, benchmarks. A module imports only from lower layers, from
inside a function neither.
"""

import argparse
import dataclasses
import difflib
import errno
import json
import math
import os
import shutil
import signal
import sys
import time
import typing
from dataclasses import field


def arg(default, help, options=None, check=None, resumable=False, **argparse_kwargs):
    """A config field, declared once: its default, its help text, the values it may take (options: a value outside
    them is refused with the closest ones), a check of its value (a Check below), whether it may change when a run
    resumes in the same folder (resumable), and any extra argparse keywords (nargs, const, ...). Every script's
    flags and --config files go through the same checks (parse_dataclass), before anything loads."""
    return field(default=default, metadata={"help": help, "options": options, "check": check, "resumable": resumable,
                                            **argparse_kwargs})


OURS = ("options", "check", "resumable")  # metadata of arg() that is not argparse's


def Check(test, requirement):
    """A check of a setting's value: test(value) -> bool, and what it requires, in words ("must be at least 1")."""
    return (test, requirement)


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


POSITIVE = Check(lambda v: _number(v) and v > 0, "must be a positive finite number")
NON_NEGATIVE = Check(lambda v: _number(v) and v >= 0, "must be a finite number, not negative")
AT_LEAST_1 = Check(lambda v: _number(v) and v >= 1, "must be at least 1")
FINITE = Check(_number, "must be a finite number")
UNIT = Check(lambda v: _number(v) and 0 <= v <= 1, "must lie in [0, 1]")
BELOW_1 = Check(lambda v: _number(v) and 0 <= v < 1, "must lie in [0, 1)")


def _tau(v):
    try:
        return v in ("arithmetic", "geometric") or 0 < float(v) <= 1
    except (TypeError, ValueError):
        return False


THRESHOLD = Check(_tau, "must be arithmetic, geometric or a probability in (0, 1]")  # confpo.parse_threshold's
REPORT_TO = Check(lambda v: set(v.split(",")) <= {"none", "tensorboard", "wandb"},
                  "must be none, tensorboard, wandb or a comma list of them")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION = ("sdpa", "eager", "flash_attention_2")  # --attn_implementation (flash_attention_2: the flash-attn package)
DTYPES = ("auto", "bf16", "fp32")  # fp16 is refused: it needs loss scaling, which no trainer here does
FORMS = ("auto", "standard", "conversational", "implicit")


def resumable_fields(cls):
    """The fields of a config that may change when a run resumes (declared with resumable=True)."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resumable")}


def require(*needs):
    """Optional extras (peft, tensorboard, wandb): each {flag: package} asked for must be installed; said in one
    UserError before anything loads."""
    import importlib.util
    for flag, package in ((f, p) for need in needs for f, p in need.items()):
        if importlib.util.find_spec(package) is None:
            raise UserError(f"{flag} needs the {package} package: pip install {package}")


def check_settings(cfg):
    """Every field of a config against its declared options and check -> the config; a value that fails is one
    UserError naming the flag, the value and what it must be (with the closest options)."""
    for f in dataclasses.fields(cfg):
        value, options, check = getattr(cfg, f.name), f.metadata.get("options"), f.metadata.get("check")
        if value is None:
            continue
        if options and value not in options:
            note = " (fp16 is not supported: it needs loss scaling; use bf16)" if value == "fp16" else ""
            raise UserError(f"--{f.name} {value!r}: must be one of {', '.join(map(str, options))}{note}"
                            f"{did_you_mean(value, options)}", code=2)
        if check and not check[0](value):
            raise UserError(f"--{f.name} {value!r}: {check[1]}", code=2)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Errors a user can fix: one line, once, no traceback
# ---------------------------------------------------------------------------------------------------------------

class UserError(SystemExit):
    """A mistake of the user's (a flag, a file, a folder, a full disk): `cli` prints its message alone, and exits
    with `code` (1). `everywhere` (the default): every rank raises it alike, so only rank 0 says it; a rank's own
    trouble (its disk) says everywhere=False. Any other exception class with the attribute `user_error = True`
    (data.DataError, ...) is reported the same way."""
    user_error = True

    def __init__(self, message, everywhere=True, code=1):
        super().__init__(message)
        self.message, self.everywhere, self.exit_code = message, everywhere, code

    def __str__(self):
        return self.message


def cli(main, argv=None):
    """Run a script's `main(argv)` as a command: user errors end in one line on stderr and a non-zero exit code
    (1; 2 for bad flags; 130 for Ctrl-C; 143 for SIGTERM), other errors in their traceback. `--debug` (or DEBUG=1)
    shows the traceback of user errors too. From the command line (argv None), a process that made a process group
    leaves through exit_now."""
    code = _cli(main, argv)
    if argv is None and GROUP_MADE[0]:
        exit_now(code)
    return code


def _cli(main, argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    signal.signal(signal.SIGTERM, on_sigterm)  # a scheduler's preemption is a Ctrl-C with its own exit code
    try:
        return 0 if main(argv) is not False else 1
    except KeyboardInterrupt as e:
        if debug:
            raise
        say("terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted")
        return 143 if isinstance(e, Terminated) else 130
    except BaseException as e:  # noqa: B036 (SystemExit included: UserError is one)
        if isinstance(e, SystemExit) and not getattr(e, "user_error", False):
            raise  # --help, or a plain exit
        error = as_user_error(e)
        if error is None or debug:
            raise
        say(f"error: {error}", everywhere=getattr(error, "everywhere", True))
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # torchrun's failure summary then shows the message, too
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as fh:
                json.dump({"message": {"message": f"error: {error}", "extraInfo": {
                    "py_callstack": f"error: {error}", "timestamp": str(int(time.time()))}}}, fh)
        return getattr(error, "exit_code", 1)


GROUP_MADE = [False]  # set by init_distributed: this process has had gloo or nccl worker threads


def exit_now(code):
    """End the process without the interpreter's finalization, once what was written is flushed. A gloo worker
    thread drops its last reference to a finished collective some time after the waiting rank has moved on; when
    the collective held tensors made in Python (an all_gather_object's, FSDP's all-gathers), dropping them takes
    the GIL, and a thread that waits for the GIL while the interpreter finalizes is unwound by CPython, which in
    the work's C++ destructor is std::terminate: "terminate called without an active exception", SIGABRT (seen in
    a core dump: c10d::AsyncAllgatherWork::~AsyncAllgatherWork in ProcessGroupGloo::runLoop, about one 2-rank job
    in fifteen, and one in twenty-three with a barrier before the end; pytorch/pytorch#179291 describes it). A
    process that does not finalize has no such moment."""
    import logging
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def reason(e):
    """An exception in a few words: its type and the first line of its message."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def load_callable(spec, flag):
    """A function named by `module:function` (a module found on sys.path) or `path/to/file.py:function`; a spec
    that cannot be imported is a one-line error naming the flag."""
    import importlib
    import importlib.util
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py") and not os.path.isfile(where):
        raise UserError(f"{flag} {spec}: no such file {where}")
    try:
        if where.endswith(".py"):
            found = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            module = importlib.util.module_from_spec(found)
            found.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except Exception as e:
        raise UserError(f"{flag} {spec}: cannot import {where} ({reason(e)})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise UserError(f"{flag} {spec}: {where} has no function {name}")
    return fn


class Terminated(KeyboardInterrupt):
    """SIGTERM, what schedulers send on preemption: handled as Ctrl-C (exit code 143 instead of 130)."""


# train.py sets `defer` during its steps: SIGTERM then only sets `pending`, and the run saves a checkpoint at the
# next step boundary before it stops (--save_on_signal). Signals within SIGTERM_WINDOW seconds of the first are the
# same request: under `srun torchrun` each worker gets Slurm's SIGTERM and the agent's forwarded one (and a process
# group's kill reaches it once more). A SIGTERM after the window stops at once, saving nothing.
SIGTERM_STATE = {"defer": False, "pending": False, "first": 0.0}
SIGTERM_WINDOW = 10.0


def on_sigterm(signum, frame):
    now = time.monotonic()
    if SIGTERM_STATE["defer"]:
        if not SIGTERM_STATE["pending"]:
            SIGTERM_STATE.update(pending=True, first=now)
            return
        if now - SIGTERM_STATE["first"] < SIGTERM_WINDOW:
            return  # the same request again
    raise Terminated()


def check_flags(parse):
    """Parse the command line at once, before a script's slow imports: --help and a mistyped flag answer in about a
    second, and a bad flag ends the process here."""
    code = cli(parse)
    if code:
        sys.exit(code)


def as_user_error(e):
    """The user error behind an exception (itself, or a full disk anywhere in its chain), or None."""
    seen = e
    while seen is not None:
        if getattr(seen, "user_error", False):
            return seen
        seen = seen.__cause__ or seen.__context__
    if disk_full(e):
        return UserError("the disk is full: free some space and run the same command again (what was already "
                         "written is intact)", everywhere=False)
    return None


def disk_full(error, path=None):
    """Whether a failed write ran out of disk: ENOSPC or EDQUOT anywhere in the exception's chain, or (path given)
    less than 64 MiB left where it wrote; torch's writers report a full disk as "unexpected pos ..."."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    return bool(path) and shutil.disk_usage(path).free < 64 * 2**20


def say(message, everywhere=False):
    """Print a message to stderr; with `everywhere`, on rank 0 only (every rank has the same one)."""
    if not everywhere or _rank() == 0:
        print(message, file=sys.stderr, flush=True)


def _rank():
    if "torch.distributed" in sys.modules and sys.modules["torch.distributed"].is_initialized():
        return sys.modules["torch.distributed"].get_rank()
    return int(os.environ.get("RANK", 0))


# ---------------------------------------------------------------------------------------------------------------
# Config: HfArgumentParser builds the flags; a JSON or YAML file (--config) and explicit flags override defaults
# ---------------------------------------------------------------------------------------------------------------

def parse_dataclass(cls, argv=None, description=None, numbers_as_text=()):
    """Flags override --config FILE (.json, or .yaml / .yml), which overrides the dataclass defaults -> (instance,
    names set explicitly), every value checked against its declaration (arg: options, check; check_settings).

    Every field is a flag (`--name` or `--name-with-hyphens`) with its help text; a bool is `--flag`, `--flag
    false` or (for a True default) `--no_flag`. numbers_as_text: text fields that a JSON file may also give as a
    number (a threshold of 0.6). The names set explicitly (in the file or as flags) let a script fill other defaults
    (the tiny world's) only where the user said nothing. A mistyped flag or option is answered with the closest
    real ones.
    """
    parser = _parser_class()(cls, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a JSON or YAML (.yaml, .yml) file of config fields (flags given here "
                        "override it)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for action in parser._actions:
        if action.dest in fields:
            if action.option_strings[0].startswith("--no_"):
                action.help = f"the same as --{action.dest} false"
            else:
                alone = "; the flag alone means true" if action.const is True else ""
                options = fields[action.dest].metadata.get("options")
                among = f"; one of {', '.join(map(str, options))}" if options else ""
                action.help = f"{action.help}{alone}{among} (default: {fields[action.dest].default})".replace("%", "%%")
        if action.dest in fields or action.dest in ("config", "debug"):
            action.default = argparse.SUPPRESS  # the namespace holds only what was given
    args = vars(parser.parse_args(argv))
    args.pop("debug", None)
    values = {}
    if "config" in args:
        path = args.pop("config")
        values = {k: v for k, v in read_config(path, parser.error).items() if not k.startswith("_")}  # _*: bookkeeping
        for key, value in values.items():
            if key not in fields:
                parser.error(f"--config {path}: unknown field {key!r}{did_you_mean(key, fields)}")
            kind, allowed = _base_type(fields[key].type), _literal(fields[key].type)
            number = _float_text(value) if kind is float and path.lower().endswith(YAML) else None
            if number is not None:
                values[key] = value = number  # YAML 1.1 reads 1e-6 (no dot) as text
            if value is not None and not (isinstance(value, kind) or (kind is float and isinstance(value, int))
                                          or (key in numbers_as_text and isinstance(value, (int, float)))):
                parser.error(f"--config {path}: field {key!r} must be {kind.__name__}, got {value!r}")
            if allowed and value not in allowed:
                parser.error(f"--config {path}: {key} {value!r} is not one of {sorted(allowed)}"
                             f"{did_you_mean(value, allowed)}")
    values.update(args)
    return check_settings(cls(**values)), set(values)


YAML = (".yaml", ".yml")


def read_config(path, error):
    """A --config file's fields -> dict: JSON, or YAML (.yaml / .yml, read with yaml.safe_load; PyYAML is imported
    only then, and is no dependency of the project). error(message) ends the run in one line."""
    try:
        with open(path, encoding="utf-8") as fh:
            if path.lower().endswith(YAML):
                try:
                    import yaml
                except ImportError:
                    error(f"--config {path}: reading a YAML file needs PyYAML: pip install pyyaml (or give a .json "
                          "file)")
                try:
                    values = yaml.safe_load(fh)
                except yaml.YAMLError as e:
                    error(f"--config {path}: not valid YAML ({' '.join(str(e).split())[:200]})")
            else:
                values = json.load(fh)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8 text
        error(f"--config {path}: {e.strerror if isinstance(e, OSError) else e}")
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
        error(f"--config {path}: must hold a mapping of field names to values, not "
              f"{'a ' + type(values).__name__ if not isinstance(values, dict) else 'keys that are not names'}")
    return values


def _float_text(text):
    """The float a number written as text stands for ("1e-6", "3E-7"), or None (for anything else)."""
    if not isinstance(text, str):
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and text.strip().lower() not in ("inf", "nan") else None


def _parser_class():
    from transformers import HfArgumentParser

    class Parser(HfArgumentParser):
        """HfArgumentParser whose errors suggest the closest flag or choice and end the run as a UserError."""

        @staticmethod
        def _parse_dataclass_field(parser, f):  # argparse is given its own keywords only
            import copy
            import types
            clean = copy.copy(f)
            clean.metadata = types.MappingProxyType({k: v for k, v in f.metadata.items() if k not in OURS})
            HfArgumentParser._parse_dataclass_field(parser, clean)

        def error(self, message):
            options = [s for a in self._actions for s in a.option_strings]
            if message.startswith("unrecognized arguments: "):
                flags = [t.split("=")[0] for t in message.split(": ", 1)[1].split() if t.startswith("-")]
                hints = [f"{close[0]} for {flag}" for flag in flags
                         for close in [difflib.get_close_matches(flag, options, n=1, cutoff=0.6)] if close]
                message += f"; did you mean {', '.join(hints)}?" if hints else ""
            elif "invalid choice: " in message:
                wrong = message.split("invalid choice: ", 1)[1].split(" ")[0].strip("'\"")
                action = next((a for a in self._actions if a.choices and f"argument {'/'.join(a.option_strings)}"
                               in message), None)
                message += did_you_mean(wrong, list(action.choices) if action else [])
            raise UserError(f"{self.prog}: {message} (--help lists every flag)", code=2)

    return Parser


def did_you_mean(word, candidates):
    """"; did you mean X or Y?" for the candidates closest to a mistyped word, or ""."""
    close = difflib.get_close_matches(str(word), [str(c) for c in candidates], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def _base_type(t):
    """float for Optional[float], str for Literal["a", "b"], and so on."""
    if _literal(t):
        return type(_literal(t)[0])
    args = [a for a in getattr(t, "__args__", ()) if a is not type(None)]
    return args[0] if args else t


def _literal(t):
    """The values of a Literal type, else None."""
    return typing.get_args(t) if typing.get_origin(t) is typing.Literal else None


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------

DIST_TIMEOUT = 120  # minutes; nccl's default of 10 is shorter than what rank 0 may do alone while others wait


def init_distributed(device="auto", threads=0, timeout=DIST_TIMEOUT, dtype=None, model_given=False):
    """Process group from torchrun's environment, or a world of one; an existing group is reused. CPU threads:
    `threads` if given, else those the process may use, divided among the ranks on this node (cpu_threads).
    timeout: minutes a collective waits for the slowest rank (a hub download, tokenization, an export or a merge on
    rank 0 alone). nccl for ranks on GPUs, bound to their device; gloo on CPUs and for a world of one (which needs
    no GPU collective). Says once what it runs on (dtype: the --dtype flag, for that line). With model_given, a GPU
    that this machine has but torch cannot use stops the run in one line (usable_cuda). Returns (rank, world,
    device)."""
    import datetime
    import torch
    import torch.distributed as dist
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: --deterministic needs it
    use_cuda = device == "cuda" or (device == "auto" and usable_cuda(model_given))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    where = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), where
    torch.set_num_threads(cpu_threads(threads))
    GROUP_MADE[0] = True
    minutes = datetime.timedelta(minutes=timeout)
    if "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun with several ranks
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=minutes, **(
            {"device_id": where} if use_cuda else {}))
    else:  # plain `python` (or torchrun with one rank): a world of one
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=minutes)
    kind = {"bf16": "bf16", "fp32": "fp32"}.get(dtype, "bf16" if use_cuda else "fp32")
    log0(f"{dist.get_world_size()} rank(s) on {where.type}{f' (rank 0 on {where})' if use_cuda else ''}, compute "
         f"dtype {kind}, backend {dist.get_backend()}, torch {torch.__version__}")
    return dist.get_rank(), dist.get_world_size(), where


def usable_cuda(model_given=False):
    """Whether --device auto runs on CUDA. With a real model (model_given), a GPU that this machine has but torch
    cannot use is one UserError saying why (a CPU build of torch, a driver older than the build): falling back to
    the CPU without a word would train an 8B model there. CUDA_VISIBLE_DEVICES set empty hides the GPUs on purpose:
    the CPU then, with a note."""
    import torch
    if torch.cuda.is_available():
        return True
    has_gpu = os.path.exists("/dev/nvidia0") or os.path.exists("/proc/driver/nvidia/version")
    if not (model_given and has_gpu):
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        log0("note: CUDA_VISIBLE_DEVICES is empty: running on the CPU (pass --device cpu to say so)")
        return False
    why = (f"this torch ({torch.__version__}) is a CPU build: install a CUDA build of torch"
           if torch.version.cuda is None else
           f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: the NVIDIA driver may be older than "
           "this build needs (nvidia-smi shows the driver's CUDA version)")
    raise UserError(f"this machine has an NVIDIA GPU, but {why}; or pass --device cpu to run on the CPU")


def cpu_threads(threads=0):
    """Intra-op threads of this process: `threads` when given (> 0); else OMP_NUM_THREADS when the user set it
    (under torchrun, a value of 1 is torchrun's own default and does not count); else the cores this process may
    run on, divided among the ranks of this node (LOCAL_WORLD_SIZE)."""
    if threads > 0:
        return threads
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0 and not ("RANK" in os.environ and omp == "1"):
        return int(omp)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def run_in_group(device, fn, threads=0, timeout=DIST_TIMEOUT, dtype=None, model_given=False):
    """fn(rank, world, device) inside a process group (init_distributed), destroyed afterwards unless a caller
    already had one (the SePO pipeline runs several stages in one group)."""
    import torch.distributed as dist
    owner = not dist.is_initialized()
    rank, world, dev = init_distributed(device, threads, timeout, dtype, model_given)
    try:
        result = fn(rank, world, dev)
        if owner:
            end_group()
        return result
    finally:
        if owner and dist.is_initialized():  # after an error: no collective may follow, only the teardown
            dist.destroy_process_group()


def end_group():
    """The process group's end after a barrier: no rank tears down while another is still in a collective. (The
    abort at exit that a barrier alone does not prevent is exit_now's.)"""
    import torch.distributed as dist
    if dist.get_world_size() > 1:
        dist.barrier()
    dist.destroy_process_group()


def log0(*args):
    """print on rank 0 only."""
    if _rank() == 0:
        print(*args, flush=True)


def on_rank_zero(fn, share=True):
    """fn() on rank 0, its result (or its user error) sent to every rank: a mistake rank 0 finds stops all ranks
    together, with one message, instead of leaving the others waiting in a collective. share=False sends the error
    alone (the other ranks get None)."""
    import torch.distributed as dist
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except BaseException as e:
            if as_user_error(e) is None:
                raise
            error = e
    box = [result if share else None, None if error is None else str(as_user_error(error))]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[1] is not None:
        raise UserError(box[1])
    return result if dist.get_rank() == 0 else box[0]


def together(fn):
    """fn() on every rank; a failure on any rank ends every rank. Ranks that work on their own (each its blocks of
    the data) would otherwise leave the others waiting in the next collective, which on nccl is a hang. The failing
    rank raises its own error; the others a UserError naming that rank (said once, by rank 0)."""
    import torch.distributed as dist
    error, result = None, None
    try:
        result = fn()
    except BaseException as e:  # noqa: B036 (KeyboardInterrupt too: the other ranks must not wait for this one)
        error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        said = [None] * dist.get_world_size()
        mine = None if error is None else str(as_user_error(error) or f"{type(error).__name__}: {error}")
        dist.all_gather_object(said, mine)
        failed = [(r, m) for r, m in enumerate(said) if m is not None]
        if error is None and failed:
            raise UserError(f"rank {failed[0][0]} failed: {failed[0][1]}")
    if error is not None:
        raise error
    return result


def any_rank(flag, device):
    """Whether a flag is set on any rank (a signal reaches the ranks at different moments; they must stop at the
    same step)."""
    import torch
    import torch.distributed as dist
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def peak_memory_mib(device):
    """The peak memory since the last line (a GPU's allocated memory; a CPU process's resident set, since its
    start)."""
    import resource

    import torch
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        torch.cuda.reset_peak_memory_stats(device)
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def rank_zero_first(fn):
    """Run fn on rank 0, then on the other ranks: rank 0 fills the datasets cache, the others read it. A user error
    on rank 0 stops every rank. Only the error is broadcast: a Dataset pickles as paths into rank 0's cache, which
    a node with a cache of its own does not have."""
    import torch.distributed as dist
    result = on_rank_zero(fn, share=False)
    if dist.get_world_size() > 1:
        result = result if dist.get_rank() == 0 else fn()
        dist.barrier()
    return result
