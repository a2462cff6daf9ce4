"""The first GPU run's check: what matters on a GPU, checked and measured by one command, one verdict line a check.

    python benchmarks/gpu_check.py                        # on the GPU torch sees: about 3-4 minutes on one H100
    python benchmarks/gpu_check.py --device cpu --quick   # toy sizes on the CPU (tests/test_gpu_check.py runs it)
    python benchmarks/gpu_check.py --only head,layer --out results.json

The checks (docs/gpu-check.md says what each would catch):
  head    losses.chunked_token_logps against the dense path (hidden @ W.T, log_softmax in float32, gather) at
          Llama-3's head (V 128256, H 4096, bf16): log-prob and gradient errors, time and peak memory per block size;
          models.PolicyLogps.check_head's gap against its tolerance on a tiny model in bf16
  fsdp    the FSDP2 path on a one-device mesh: 3 DPO steps with a sharded frozen reference, clipping over DTensors,
          fused AdamW on CUDA, against the same steps unsharded; a checkpoint round trip (rundir) gives the same step
  layer   one Llama-3-8B decoder layer at 4 x 2048 tokens, with and without activation checkpointing; the SDPA kernels
          (flash and efficient forced in turn, the default with a padding mask); models.memory_estimate's 8-GPU peak
  cli     train.py end to end on the tiny world: dpo, confpo_rand, kto; --halt_after 2 then resume; --deterministic
          twice; SIGTERM to a `torchrun --nproc_per_node 1` job
  sample  models.sample: batch independence with left padding, finite bf16 logits, tokens/s against a loop of
          model.generate; the scorers' peak memory (score.load_scorer, onpolicy's reward model) with use_cache off

Each check runs in a process of its own under a time budget: its exception, crash or overrun is its FAIL line and the
others still run. Every line names what was measured. The process exits 1 when a check fails, 0 otherwise (a SKIP
says why). Results: --out (JSON: the date, the device, the versions, every number), each check's log beside it
(<out>.logs/<check>.log).
"""

import argparse
import contextlib
import datetime
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
CHECKS = ("head", "fsdp", "layer", "cli", "sample")
# Seconds each check may take before it is stopped (a FAIL). On a GPU the whole run fits one 10-minute command
# (about 3-4 minutes expected); on a CPU the sizes are toys but the machine may be slow and busy.
BUDGET_S = {"cuda": {"head": 60, "fsdp": 90, "layer": 90, "cli": 240, "sample": 90},
            "cpu": {"head": 150, "fsdp": 180, "layer": 150, "cli": 420, "sample": 180}}


def command_line():
    """gpu_check.py's flags (defined above the slow imports: --help and a mistyped flag answer before torch loads)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="where to run (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and smaller runs (on the CPU: toys)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"checks to run, comma-separated ({','.join(CHECKS)})")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_check.json"),
                        help="where the results go (JSON; the checks' logs go to <out>.logs/)")
    parser.add_argument("--tiny_world", "--tiny-world", default=os.path.join(ROOT, "tiny_world"),
                        help="the offline tiny world (built on first use)")
    parser.add_argument("--budget_scale", "--budget-scale", type=float, default=1.0,
                        help="multiply every check's time budget (a slow machine)")
    parser.add_argument("--jobs", type=int, default=0, help="train.py runs at once in the cli check (0: 2 on a CPU, "
                        "3 on a GPU)")
    parser.add_argument("--fail_on_purpose", "--fail-on-purpose", default="",
                        help="for testing this harness only: these checks (comma-separated) raise at their start")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)  # one check, in its own process
    parser.add_argument("--result", default="", help=argparse.SUPPRESS)  # where that process writes its result
    return parser


def parse_args(argv=None):
    parser = command_line()
    args = parser.parse_args(argv)
    for flag, value in (("--only", args.only), ("--fail_on_purpose", args.fail_on_purpose)):
        unknown = [c for c in value.split(",") if c and c not in CHECKS]
        if unknown:
            parser.error(f"{flag}: no check named {', '.join(unknown)} (the checks: {', '.join(CHECKS)})")
    if not any(c in CHECKS for c in args.only.split(",")):
        parser.error("--only: no check given")
    if args.worker and args.worker not in CHECKS:
        parser.error(f"--worker: no check named {args.worker}")
    if args.budget_scale <= 0:
        parser.error("--budget_scale must be positive")
    return args


if __name__ == "__main__":
    ARGS = parse_args()  # --help and a mistyped flag answer here, before torch loads

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, ROOT)  # the library, one folder up
import losses  # noqa: E402
import models  # noqa: E402
import rundir  # noqa: E402
import utils  # noqa: E402

LN2 = math.log(2)
MIB = 2**20


# ---------------------------------------------------------------------------------------------------------------
# A check's report: numbers, problems, notes; written after every change, so that a check stopped by its budget
# still leaves what it had measured
# ---------------------------------------------------------------------------------------------------------------

class Report:
    def __init__(self, name, path):
        self.name, self.path = name, path
        self.numbers, self.shown, self.problems, self.notes = {}, [], [], []
        self.skipped, self.error, self.env = None, None, {}

    def set(self, key, value, show=False):
        """A number (or a short text) measured; `show`: it goes on the verdict line too."""
        self.numbers[key] = round(value, 6) if isinstance(value, float) and math.isfinite(value) else value
        if show and key not in self.shown:
            self.shown.append(key)
        self.save()
        return value

    def expect(self, ok, problem):
        """A condition of the check: a false one is a problem, and the check FAILs naming it."""
        if not ok:
            self.problems.append(problem)
            self.save()
        return bool(ok)

    def note(self, text):
        self.notes.append(text)
        self.save()

    def skip(self, reason):
        self.skipped = reason
        self.save()

    def status(self):
        if self.error is not None or self.problems:
            return "FAIL"
        return "SKIP" if self.skipped else "PASS"

    def save(self):
        if not self.path:
            return
        obj = {"status": self.status(), "numbers": self.numbers, "shown": self.shown, "problems": self.problems,
               "notes": self.notes, "skipped": self.skipped, "error": self.error, "env": self.env}
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(obj, fh, indent=1, default=str)
        os.replace(tmp, self.path)


def fmt(value):
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------------
# Measuring: time, peak memory, errors
# ---------------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats, warmup=1):
    """The median seconds of fn() over `repeats` calls after `warmup` untimed ones (the device synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_of(fn, device):
    """(peak bytes allocated while fn() runs, bytes still allocated when it returns), both above what was allocated
    when it started. GPU: torch.cuda.max_memory_allocated, reset first. CPU: the profiler's allocation events (the
    CPU allocator caches nothing: each is a real malloc or free), summed in time order, as bench.py does."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start, torch.cuda.memory_allocated(device) - start
    from torch.profiler import ProfilerActivity, profile
    with quiet_fd2(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU),
                    key=lambda e: e.start_ns())
    running = list(itertools.accumulate(e.nbytes() for e in events)) or [0]
    return max(0, max(running)), running[-1]


@contextlib.contextmanager
def quiet_fd2():
    """The profiler's C++ side prints a start and a stop line straight to file descriptor 2; hide them."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def rel_err(a, b):
    """||a - b|| / ||b||, in float32 (a gradient of Llama-3's head has 525M entries)."""
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def mib(n):
    return n / MIB


def env_info(device):
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "transformers": version_of("transformers"), "datasets": version_of("datasets")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                    cudnn=torch.backends.cudnn.version())
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as fh:
                name = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), name)
        info.update(device=f"cpu ({name}), {torch.get_num_threads()} threads")
    return info


def version_of(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_datasets():
    """Whether the datasets package imports (data.py, tiny/, train.py, score.py and onpolicy.py need it)."""
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------------
# Inputs: the tiny world, random batches
# ---------------------------------------------------------------------------------------------------------------

def world_paths(ctx):
    """The offline tiny world (tiny.build_tiny_world); without the datasets package (which tiny/ and data.py import),
    a tiny Llama of the same shape built here, without a tokenizer."""
    if has_datasets():
        import tiny
        return tiny.build_tiny_world(ctx.tiny_world)
    from transformers import LlamaConfig, LlamaForCausalLM
    paths = {"tokenizer": None}
    for name, size in (("llama-tiny", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128)),
                       ("llama-small", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                            intermediate_size=256))):
        path = paths[name] = os.path.join(ctx.tmp, "plain-world", name)
        if not os.path.exists(os.path.join(path, "config.json")):
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(vocab_size=1024, max_position_embeddings=2048, bos_token_id=1,
                                         eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                         **size)).save_pretrained(path)
    ctx.note = "no datasets package: a tiny Llama built here stands in for the tiny world's"
    return paths


def response_labels(B, T, V, g, low=3):
    """Random token ids (B, T) and their labels: -100 on a prompt of T/8 to T/4 tokens and on right padding (row i
    shorter by i * T/8), the rest response tokens."""
    ids = torch.randint(low, V, (B, T), generator=g)
    labels = ids.clone()
    for i in range(B):
        prompt = int(torch.randint(T // 8, T // 4 + 1, (1,), generator=g))
        labels[i, :prompt] = losses.IGNORE_INDEX
        end = T - i * (T // 8)
        labels[i, end:] = losses.IGNORE_INDEX
    return ids, labels


def dpo_batch(pairs, T, vocab, g, device, pad=0):
    """A DPO micro-batch as data.collate_pairs makes it: chosen rows then rejected rows, right padding, -100 on the
    prompt and the padding; each pair's two rows share their prompt."""
    ids = torch.full((2 * pairs, T), pad, dtype=torch.long)
    mask = torch.zeros((2 * pairs, T), dtype=torch.long)
    labels = torch.full((2 * pairs, T), losses.IGNORE_INDEX, dtype=torch.long)
    for i in range(pairs):
        prompt = torch.randint(4, vocab, (int(torch.randint(4, T // 3, (1,), generator=g)),), generator=g)
        for row in (i, pairs + i):
            n = int(torch.randint(4, T - len(prompt) + 1, (1,), generator=g))
            response = torch.randint(4, vocab, (n,), generator=g)
            seq = torch.cat([prompt, response])
            ids[row, :len(seq)], mask[row, :len(seq)] = seq, 1
            labels[row, len(prompt):len(seq)] = response
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def left_padded(prompts, pad, device):
    L = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def dense_token_logps(hidden, weight, labels):
    """The dense path: all the logits (hidden @ W.T, in the inputs' dtype), log_softmax in float32, gathered ->
    (B, T) aligned as losses.chunked_token_logps (position t holds log pi(y_t | y_<t)), and the mask."""
    logits = hidden @ weight.T  # (B, T, V)
    logps = logits[:, :-1].float().log_softmax(-1)
    mask = labels[:, 1:] != losses.IGNORE_INDEX
    picked = logps.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * mask
    return F.pad(picked, (1, 0)), F.pad(mask, (1, 0))


# ---------------------------------------------------------------------------------------------------------------
# 1. head: the log-prob head at real shapes, and the head check's tolerance
# ---------------------------------------------------------------------------------------------------------------

def check_head(ctx, r):
    dev = ctx.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference must be float32
        V, H, B, T, dtype, others, reps = 128256, 4096, 4, 1024, torch.bfloat16, (256, 4096), 2 if ctx.quick else 5
    else:
        V, H, B, T, dtype, others, reps = 2048, 64, 2, 96, torch.float32, (16, 64), 1 if ctx.quick else 3
    low = dtype != torch.float32
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, T, H, generator=g).to(dev, dtype)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(dev, dtype)  # logits of std about 1.3 at H 4096
    _, labels = response_labels(B, T, V, g)
    labels = labels.to(dev)
    coef = torch.randn(B, T, generator=g).to(dev)  # the loss: a random weighting of the log-probs
    n = int((labels[:, 1:] != losses.IGNORE_INDEX).sum())
    r.set("shape", f"V {V}, H {H}, {B}x{T} {str(dtype).replace('torch.', '')}, {n} response tokens", show=True)

    def fwd_bwd(fn, as_dtype=None):
        h = hidden.detach().to(as_dtype or dtype).requires_grad_()
        w = weight.detach().to(as_dtype or dtype).requires_grad_()
        logps, mask = fn(h, w)
        gh, gw = torch.autograd.grad((logps * coef).sum(), (h, w))
        return logps.detach(), mask, gh, gw

    def chunked(size=None):
        return lambda h, w: losses.chunked_token_logps(h, w, labels, size)

    def dense(h, w):
        return dense_token_logps(h, w, labels)

    c, d = fwd_bwd(chunked()), fwd_bwd(dense)
    mask = c[1]
    r.expect(torch.equal(c[1], d[1]), "the chunked path's response mask differs from the dense path's")
    tol_lp, tol_grad = (0.05, 2e-2) if low else (1e-4, 1e-4)
    lp_err = r.set("logps_max_abs_err", float((c[0] - d[0])[mask].abs().max()), show=True)
    gh_err = r.set("grad_hidden_rel_err", rel_err(c[2], d[2]), show=True)
    gw_err = r.set("grad_W_rel_err", rel_err(c[3], d[3]), show=True)
    r.expect(torch.isfinite(c[0]).all() and torch.isfinite(c[2]).all() and torch.isfinite(c[3]).all(),
             "non-finite log-probs or gradients from chunked_token_logps")
    r.expect(lp_err <= tol_lp, f"log-probs differ from the dense path's by {lp_err:.3g} (> {tol_lp})")
    r.expect(max(gh_err, gw_err) <= tol_grad, f"gradients differ from the dense path's by {max(gh_err, gw_err):.3g} "
             f"relative (> {tol_grad})")
    if low:  # both against float32 products: the chunked path may be no less exact than the dense one
        t = fwd_bwd(dense, torch.float32)
        for name, i in (("logps", 0), ("grad_hidden", 2), ("grad_W", 3)):
            if i == 0:
                errs = [float((x[0] - t[0])[mask].abs().max()) for x in (c, d)]
            else:
                errs = [rel_err(x[i], t[i]) for x in (c, d)]
            r.set(f"{name}_vs_fp32_chunked", errs[0])
            r.set(f"{name}_vs_fp32_dense", errs[1])
            r.expect(errs[0] <= 2 * errs[1] + (1e-3 if i == 0 else 1e-4),
                     f"{name}: the chunked path is further from float32 ({errs[0]:.3g}) than the dense path "
                     f"({errs[1]:.3g})")
        del t
    del c, d
    if cuda:
        torch.cuda.empty_cache()

    default = losses._chunk_rows(None, V, dev)  # rows per block by default (losses.CHUNK_BYTES of this device)
    r.set("default_chunk_rows", default)
    peaks = {}
    for size in [default] + [s for s in others if s != default]:
        peak, _ = memory_of(lambda: fwd_bwd(chunked(size)), dev)
        ms = 1e3 * timed(lambda: fwd_bwd(chunked(size)), dev, reps)
        peaks[size] = peak
        tag = "default" if size == default else size
        r.set(f"chunk_{size}_ms", ms, show=size == default)
        r.set(f"chunk_{size}_peak_mib", mib(peak), show=size == default)
        r.note(f"chunk {size} rows ({tag}): {ms:.3g} ms forward+backward, peak {mib(peak):.4g} MiB")
    peak, _ = memory_of(lambda: fwd_bwd(dense), dev)
    r.set("dense_ms", 1e3 * timed(lambda: fwd_bwd(dense), dev, reps), show=True)
    r.set("dense_peak_mib", mib(peak), show=True)
    r.set("default_peak_over_dense", peaks[default] / max(peak, 1))
    if cuda:
        r.expect(peaks[default] < peak, f"the chunked path's peak ({mib(peaks[default]):.0f} MiB) is not below the "
                 f"dense path's ({mib(peak):.0f} MiB)")
    head_check_gaps(ctx, r)


def head_check_gaps(ctx, r):
    """models.PolicyLogps.check_head on a tiny Llama: the gap between the model's own logits path and the chunked
    path, against the tolerance check_head applies (0.25 in low precision, 1e-3 else), in float32, under a bf16
    autocast (one GPU's training), with bf16 weights (FSDP's mixed precision, scoring), with a head whose logits reach
    30 (a trained model's), on a GPU in float32 with TF32 matmuls (train.py --dtype fp32, whose --tf32 is on by
    default, and which check_head holds to 1e-3), and a negative control: a head that scales its logits (which no
    config names) must be refused."""
    from transformers import LlamaConfig, LlamaForCausalLM
    dev = ctx.device
    config = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dev).eval()
    g = torch.Generator().manual_seed(1)
    ids, labels = response_labels(2, 48, 1000, g)
    mask = (labels != losses.IGNORE_INDEX).long()
    mask[:, :labels.shape[1] // 2] = 1  # prompt positions are attended to; the right padding is not
    mask[1, -6:], labels[1, -6:] = 0, losses.IGNORE_INDEX
    ids, labels, mask = ids.to(dev), labels.to(dev), mask.to(dev)

    def gap(wrapped, autocast):
        """(max |logits path - chunked path| over every response token, max |logit|, check_head's verdict)."""
        on = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with on, torch.no_grad():
            expected, _ = wrapped.logits_path(ids, mask, labels)
            hidden = wrapped.model.base_model(input_ids=ids, attention_mask=mask)[0]
            head = wrapped.model.get_output_embeddings().weight
            ours, _ = losses.chunked_token_logps(hidden, head, labels, wrapped.chunk_size)
            top = float((hidden.float() @ head.float().T).abs().max())
        refused = None
        wrapped.checked = False
        try:
            wrapped(ids, mask, labels)  # forward runs check_head on its first row, as in training
        except utils.UserError as e:
            refused = str(e)
        return float((expected - ours)[labels != losses.IGNORE_INDEX].abs().max()), top, refused

    def copy_of(scale=1.0, dtype=torch.float32):
        twin = LlamaForCausalLM(config).to(dev).eval()
        twin.load_state_dict(model.state_dict())
        with torch.no_grad():
            twin.lm_head.weight.mul_(scale)
        return twin.to(dtype)

    plain = models.PolicyLogps(model, "chunked", 0)
    hot = 30 / gap(plain, False)[1]  # the head scaled so that its logits reach 30, a trained model's range
    cases = [("fp32", plain, False, 1e-3),
             ("autocast_bf16", models.PolicyLogps(model, "chunked", 0, autocast=torch.bfloat16), True, 0.25),
             ("bf16_weights", models.PolicyLogps(copy_of(dtype=torch.bfloat16), "chunked", 0), False, 0.25),
             ("hot_head_autocast_bf16", models.PolicyLogps(copy_of(hot), "chunked", 0, autocast=torch.bfloat16), True,
              0.25),
             ("hot_head_bf16_weights", models.PolicyLogps(copy_of(hot, torch.bfloat16), "chunked", 0), False, 0.25)]
    if dev.type == "cuda":  # train.py --dtype fp32 on a GPU multiplies in TF32 (--tf32, on by default)
        cases.append(("hot_head_fp32_tf32", models.PolicyLogps(copy_of(hot), "chunked", 0), False, 1e-3))
    for name, wrapped, autocast, tol in cases:
        torch.backends.cuda.matmul.allow_tf32 = name.endswith("_tf32")
        value, top, refused = gap(wrapped, autocast)
        r.set(f"check_head_gap_{name}", value, show=name in ("autocast_bf16", "hot_head_autocast_bf16"))
        r.set(f"check_head_max_logit_{name}", top)
        r.expect(refused is None, f"check_head refused the plain Llama head ({name}): {refused}")
        r.expect(value <= tol, f"check_head gap {value:.3g} ({name}) is above its tolerance {tol}")
    torch.backends.cuda.matmul.allow_tf32 = False
    r.set("check_head_tolerance_low_precision", 0.25)
    # score.load_scorer's model: bf16 weights, a float32 copy of the head (fp32_head). check_head compares the two
    # bf16 paths, so forward must give it bf16's tolerance (low_precision is read before the cast to float32)
    scorer = models.PolicyLogps(copy_of(hot, torch.bfloat16), "chunked", None, together=False, fp32_head=True)
    flags, check = [], scorer.check_head
    scorer.check_head = lambda *a, low_precision: flags.append(low_precision) or check(*a, low_precision=low_precision)
    value, _, refused = gap(scorer, False)
    r.set("check_head_gap_scorer_bf16_fp32_head", value)
    r.set("check_head_low_precision_scorer_bf16_fp32_head", bool(flags and flags[0]))
    r.expect(bool(flags and flags[0]), "check_head was given float32's tolerance for a bf16 scorer's two bf16 paths")
    r.expect(refused is None, f"check_head refused score.load_scorer's plain Llama (bf16 weights, fp32 head; "
             f"low_precision={flags[:1]}, so a tolerance of {0.25 if flags and flags[0] else 1e-3}): {refused}")
    # the negative control: the hot head's logits scaled by 1.5 inside its forward (a trained model's logits so
    # scaled move its log-probs by nats; a random model's, below 1, by less than bf16's tolerance)
    scaled = copy_of(hot)
    plain_forward = scaled.lm_head.forward
    scaled.lm_head.forward = lambda x: 1.5 * plain_forward(x)
    value, _, refused = gap(models.PolicyLogps(scaled, "chunked", 0, autocast=torch.bfloat16), True)
    r.set("check_head_gap_scaled_head", value)
    r.expect(refused is not None, f"check_head accepted a head that scales its logits by 1.5 (gap {value:.3g})")


# ---------------------------------------------------------------------------------------------------------------
# 2. fsdp: FSDP2 on a one-device mesh, DPO steps against the unsharded model, a checkpoint round trip
# ---------------------------------------------------------------------------------------------------------------

def load_sharded(path, cfg, mesh, device, trainable):
    """The model as models.load_model loads it on more than one rank, here on a mesh of any size (load_model shards
    only when the world has more than one rank): read by rank 0, built on the meta device, models.shard (each
    decoder layer, then the root; bf16 compute with fp32 reduction on a GPU), the weights and buffers broadcast from
    rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoConfig, AutoModelForCausalLM
    dtype = models.compute_dtype(cfg.dtype, device)
    store = torch.bfloat16 if not trainable and dtype == torch.bfloat16 and device.type == "cuda" else torch.float32
    source = AutoModelForCausalLM.from_pretrained(path, dtype=store, attn_implementation=cfg.attn_implementation)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=store,
                                                 attn_implementation=cfg.attn_implementation)
    model.config.use_cache = False
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    wrapped = models.PolicyLogps(model, models.choose_logp_path(cfg.logp_path, model), cfg.chunk_size)
    models.shard(wrapped, mesh, MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32), trainable, path)
    wrapped.to_empty(device=device)
    set_model_state_dict(model, source.state_dict(),
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    own = dict(source.named_buffers())
    for name, buffer in model.named_buffers():
        buffer.copy_(own[name])
        dist.broadcast(buffer, src=0)
    wrapped.train(trainable)
    if not trainable:
        wrapped.requires_grad_(False)
    return wrapped


def dpo_step(policy, ref, optimizer, batch, device, clip=1.0):
    """One DPO optimizer step as train.py takes it (one micro-batch): -> (loss, clipped gradient norm, seconds)."""
    sync(device)
    t0 = time.perf_counter()
    B = batch["input_ids"].shape[0] // 2
    logps, mask = policy(**batch)
    with torch.no_grad():
        ref_logps, _ = ref(**batch)
    per_pair, _ = losses.dpo_loss(chosen_logps=logps[:B], chosen_mask=mask[:B], rejected_logps=logps[B:],
                                  rejected_mask=mask[B:], ref_chosen_logps=ref_logps[:B],
                                  ref_rejected_logps=ref_logps[B:])
    loss = per_pair.mean()
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), clip)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor under FSDP
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(device)
    return float(loss.detach()), float(norm), time.perf_counter() - t0


def check_fsdp(ctx, r):
    path = world_paths(ctx)["llama-tiny"]
    out = os.path.join(ctx.tmp, "fsdp-run")

    def body(rank, world, device):
        from torch.distributed.tensor import DTensor
        cfg = SimpleNamespace(dtype="auto", hybrid_shard=False, attn_implementation="sdpa",
                              activation_checkpointing=False, disable_dropout=True, logp_path="auto", chunk_size=0)
        dtype = models.compute_dtype(cfg.dtype, device)
        low = dtype != torch.float32
        mesh = models.make_mesh(cfg, world, device)
        r.set("mesh", f"{mesh.device_type} x{mesh.size()}, {dist.get_backend()}, compute "
                      f"{str(dtype).replace('torch.', '')}", show=True)
        from transformers import AutoConfig
        g = torch.Generator().manual_seed(0)
        batches = [dpo_batch(2, 48, AutoConfig.from_pretrained(path).vocab_size, g, device) for _ in range(3)]

        def adamw(model):
            return torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")

        # the same steps on the unsharded model, as load_model gives it to a world of one
        plain, plain_ref = (models.load_model(path, cfg, mesh, device, trainable=t) for t in (True, False))
        opt = adamw(plain)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        unsharded = [dpo_step(plain, plain_ref, opt, b, device) for b in batches]
        if device.type == "cuda":
            r.set("unsharded_peak_mib", mib(torch.cuda.max_memory_allocated(device)))
        del plain, plain_ref, opt

        policy, ref = load_sharded(path, cfg, mesh, device, True), load_sharded(path, cfg, mesh, device, False)
        params = list(policy.parameters())
        r.expect(params and all(isinstance(p, DTensor) for p in params), "the sharded policy's parameters are not "
                 "all DTensors: models.shard did not shard it")
        r.expect(all(isinstance(p, DTensor) for p in ref.parameters()), "the frozen reference is not sharded")
        opt = adamw(policy)
        r.set("fused_adamw", bool(opt.defaults.get("fused")))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sharded = [dpo_step(policy, ref, opt, b, device) for b in batches[:2]]
        rundir.save_checkpoint(out, 2, policy, opt, {"by": "gpu_check"}, {}, rank, keep_last=1)
        sharded.append(dpo_step(policy, ref, opt, batches[2], device))
        if device.type == "cuda":
            r.set("sharded_peak_mib", mib(torch.cuda.max_memory_allocated(device)))
        for i, ((l1, n1, s1), (l0, n0, s0)) in enumerate(zip(sharded, unsharded)):
            r.set(f"step{i}_loss_sharded", l1)
            r.set(f"step{i}_loss_unsharded", l0)
            r.set(f"step{i}_grad_norm_sharded", n1)
            r.set(f"step{i}_grad_norm_unsharded", n0)
            r.set(f"step{i}_ms_sharded", 1e3 * s1)
            r.set(f"step{i}_ms_unsharded", 1e3 * s0)
        tol0 = 1e-2 if low else 1e-4
        for tag, steps in (("sharded", sharded), ("unsharded", unsharded)):
            # unsharded on a GPU: the policy computes under autocast over fp32 weights (fp32 norms and residual
            # stream), the frozen reference over weights stored in bf16: they agree to bf16 rounding, not exactly
            off = r.set(f"step0_loss_minus_ln2_{tag}", abs(steps[0][0] - LN2), show=True)
            r.expect(off <= tol0, f"step 0's loss ({tag}) is not ln 2 (off by {off:.3g} > {tol0}): policy and "
                     "reference differ before any step")
        tol = 3e-2 if low else 1e-5
        diff = r.set("max_loss_diff_vs_unsharded", max(abs(a[0] - b[0]) for a, b in zip(sharded, unsharded)),
                     show=True)
        r.expect(diff <= tol, f"sharded and unsharded losses differ by {diff:.3g} (> {tol})")
        norms = r.set("max_grad_norm_rel_diff", max(abs(a[1] - b[1]) / max(b[1], 1e-12)
                                                    for a, b in zip(sharded, unsharded)), show=True)
        r.expect(all(math.isfinite(x[1]) for x in sharded), "a non-finite gradient norm under FSDP")
        r.expect(norms <= (5e-2 if low else 1e-4), f"sharded and unsharded gradient norms differ by {norms:.3g}")

        # the checkpoint round trip: a fresh policy and optimizer resumed from step 2 take the same step 3
        fresh = load_sharded(path, cfg, mesh, device, True)
        opt2 = adamw(fresh)
        state, _ = rundir.resume(rundir.checkpoints(out), fresh, opt2, rank)
        r.expect(state["step"] == 2, f"resumed at step {state['step']}, not 2")
        again = dpo_step(fresh, ref, opt2, batches[2], device)
        drift = r.set("resumed_step_loss_rel_diff", abs(again[0] - sharded[2][0]) / abs(sharded[2][0]), show=True)
        r.set("resumed_step_grad_norm_rel_diff", abs(again[1] - sharded[2][1]) / max(sharded[2][1], 1e-12))
        r.expect(drift <= 1e-6, f"the resumed step's loss differs by {drift:.3g} relative (> 1e-6)")

    utils.run_in_group(ctx.device.type, body)


# ---------------------------------------------------------------------------------------------------------------
# 3. layer: one Llama-3-8B decoder layer; the SDPA kernels; the 8-GPU memory prediction
# ---------------------------------------------------------------------------------------------------------------

KERNELS = {"flash": "FLASH", "efficient": "EFFICIENT", "cudnn": "CUDNN", "math": "MATH"}


def sdpa_kernel_of(fn):
    """Which SDPA kernel fn() ran: the profiler's aten op (FLASH, EFFICIENT, CUDNN, MATH; `(cpu)` for the CPU's
    flash kernel), or 'none' when no attention ran."""
    from torch.profiler import ProfilerActivity, profile
    with quiet_fd2(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.name for e in prof.events() if "scaled_dot_product" in e.name}
    found = sorted({v + (" (cpu)" if "for_cpu" in n else "") for n in names for k, v in KERNELS.items()
                    if n.startswith("aten::_scaled_dot_product_") and k in n})
    if found:
        return "+".join(found)
    others = sorted(n for n in names if n != "aten::scaled_dot_product_attention")
    return "+".join(others) if others else ("MATH" if names else "none")  # the math kernel: plain aten ops


def check_layer(ctx, r):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.checkpoint import checkpoint
    from transformers import LlamaConfig, LlamaModel
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    dev = ctx.device
    cuda = dev.type == "cuda"
    if cuda:
        shape = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8)
        B, T, dtype, reps = 4, 2048, torch.bfloat16, 2 if ctx.quick else 3
    else:  # a toy layer
        shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
        B, T, dtype, reps = 2, 64, torch.float32, 1 if ctx.quick else 2
    H = shape["hidden_size"]
    config = LlamaConfig(vocab_size=256, num_hidden_layers=1, max_position_embeddings=max(T, 8192), **shape)
    config._attn_implementation = "sdpa"
    r.set("shape", f"h {H}, ffn {shape['intermediate_size']}, heads {shape['num_attention_heads']}/"
                   f"{shape['num_key_value_heads']}, {B}x{T} {str(dtype).replace('torch.', '')}", show=True)
    torch.manual_seed(0)
    layer = LlamaDecoderLayer(config, 0).to(dev, dtype)
    rotary = LlamaRotaryEmbedding(config).to(dev)
    x0 = torch.randn(B, T, H, device=dev, dtype=dtype)
    pos = torch.arange(T, device=dev)[None].expand(B, -1)
    pe = rotary(x0, pos)
    grad_out = torch.randn(B, T, H, device=dev, dtype=dtype)

    def forward(x, ckpt):
        kw = dict(attention_mask=None, position_ids=pos, position_embeddings=pe)
        y = checkpoint(layer, x, use_reentrant=False, **kw) if ckpt else layer(x, **kw)
        return y[0] if isinstance(y, tuple) else y

    def fwd_bwd(ckpt, backend=None):
        x = x0.detach().requires_grad_()
        with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
            forward(x, ckpt).backward(grad_out)
        return x.grad

    results = {}
    for ckpt in (False, True):
        tag = "ckpt" if ckpt else "no_ckpt"
        layer.zero_grad(set_to_none=True)
        held, x = {}, x0.detach().requires_grad_()
        peak_f, kept = memory_of(lambda: held.update(y=forward(x, ckpt)), dev)
        peak_b, _ = memory_of(lambda: held.pop("y").backward(grad_out), dev)
        results[tag] = dict(kept=kept, peak=max(peak_f, kept + peak_b), gx=x.grad.detach().clone(),
                            gw=layer.mlp.down_proj.weight.grad.detach().clone(),
                            gq=layer.self_attn.q_proj.weight.grad.detach().clone())
        layer.zero_grad(set_to_none=True)
        ms = r.set(f"{tag}_fwd_bwd_ms", 1e3 * timed(lambda: fwd_bwd(ckpt), dev, reps), show=True)
        r.set(f"{tag}_peak_mib", mib(results[tag]["peak"]), show=True)
        r.set(f"{tag}_saved_mib", mib(kept))
        r.set(f"{tag}_saved_bytes_per_token_per_h", kept / (B * T * H))
        r.note(f"{tag}: {ms:.4g} ms forward+backward, peak {mib(results[tag]['peak']):.4g} MiB, "
               f"{mib(kept):.4g} MiB kept for backward ({kept / (B * T * H):.1f} bytes per token per h)")
        layer.zero_grad(set_to_none=True)
    a, b = results["no_ckpt"], results["ckpt"]
    r.expect(all(torch.isfinite(t).all() for t in (a["gx"], a["gw"], a["gq"])), "non-finite gradients")
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    err = r.set("ckpt_grad_rel_err", max(rel_err(b[k], a[k]) for k in ("gx", "gw", "gq")), show=True)
    r.expect(err <= tol, f"activation checkpointing changes the gradients by {err:.3g} relative (> {tol})")
    r.expect(b["kept"] < a["kept"], f"activation checkpointing keeps {mib(b['kept']):.0f} MiB for backward, not less "
             f"than without ({mib(a['kept']):.0f} MiB)")

    # the kernels: the default (causal, no mask), each forced in turn, and the model's default with a padding mask
    with torch.no_grad():
        r.set("kernel_default_causal", sdpa_kernel_of(lambda: forward(x0, False)), show=True)
    works = []
    for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            continue
        try:
            ms = 1e3 * timed(lambda: fwd_bwd(False, backend), dev, reps)
            r.set(f"forced_{name.lower()}_ms", ms, show=name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION"))
            works.append(name)
        except RuntimeError as e:
            r.set(f"forced_{name.lower()}_ms", f"unavailable ({str(e).strip().splitlines()[0][:120]})")
        finally:
            layer.zero_grad(set_to_none=True)
    if cuda:
        r.expect({"FLASH_ATTENTION", "EFFICIENT_ATTENTION"} & set(works), "neither the flash nor the memory-efficient "
                 "SDPA kernel runs this layer: attention falls back to the math kernel (a (T, T) matrix per head)")
    torch.manual_seed(0)
    model = LlamaModel(config).to(dev, dtype)
    ids = torch.randint(4, 256, (B, T), device=dev)
    padded = torch.ones(B, T, dtype=torch.long, device=dev)
    for i in range(1, B):  # right padding, as data.collate_pairs pads a training batch
        padded[i, T - i * T // (2 * B):] = 0
    full = torch.ones_like(padded)
    with torch.no_grad():
        r.set("kernel_model_no_padding", sdpa_kernel_of(lambda: model(input_ids=ids, attention_mask=full)))
        r.set("kernel_model_padding_mask", sdpa_kernel_of(lambda: model(input_ids=ids, attention_mask=padded)),
              show=True)

    def model_fwd_bwd(mask):
        model(input_ids=ids, attention_mask=mask).last_hidden_state.float().square().mean().backward()
    r.set("model_fwd_bwd_ms_no_padding", 1e3 * timed(lambda: model_fwd_bwd(full), dev, reps))
    r.set("model_fwd_bwd_ms_padding_mask", 1e3 * timed(lambda: model_fwd_bwd(padded), dev, reps))
    model = None  # freed before the estimate
    memory_prediction(ctx, r, results, B * T)


def memory_prediction(ctx, r, measured, tokens):
    """models.memory_estimate for the papers' 8-GPU settings (Llama-3-8B, 2 pairs of 2048 tokens per micro-batch,
    activation checkpointing, bf16): ConfPO (no reference) and DPO (a frozen reference). On a GPU the layer measured
    above has the papers' micro-batch (4 x 2048 tokens), so its numbers give a measured activation peak as well: 32
    layers' checkpointed inputs and one layer's forward and backward."""
    from transformers import LlamaConfig
    llama8b = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                          num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)
    papers = SimpleNamespace(dtype="auto", micro_batch_size=2, max_length=2048, activation_checkpointing=True)
    gpu = torch.device("cuda")  # the estimate is arithmetic: it only asks whether the device is a GPU
    for method, reference in (("confpo", False), ("dpo", True)):
        line = models.memory_estimate(llama8b, papers, 8, reference, gpu)
        total, state, activations = (float(x) for x in re.findall(r"([\d.]+) GiB", line)[:3])
        r.set(f"estimate_8gpu_{method}_gib", total, show=True)
        r.set(f"estimate_8gpu_{method}_state_gib", state)
        r.set(f"estimate_8gpu_{method}_activations_gib", activations)
        if ctx.device.type == "cuda" and tokens == 2 * papers.micro_batch_size * papers.max_length:
            acts = (llama8b.num_hidden_layers * measured["ckpt"]["kept"] + measured["no_ckpt"]["peak"]) / 2**30
            r.set(f"measured_8gpu_{method}_activations_gib", acts)
            r.set(f"measured_8gpu_{method}_gib", state + acts, show=method == "dpo")
            r.set(f"measured_over_estimated_activations_{method}", acts / activations)


# ---------------------------------------------------------------------------------------------------------------
# 4. cli: train.py end to end on the device
# ---------------------------------------------------------------------------------------------------------------

def small_data(paths, folder, n=16):
    path = os.path.join(folder, "small.jsonl")
    with open(paths["train"]) as src, open(path, "w") as dst:
        for _ in range(n):
            dst.write(src.readline())
    return path


def train_env():
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_jobs(jobs, folder, concurrency, timeout):
    """{name: argv} run as subprocesses, `concurrency` at a time -> {name: (exit code, seconds, output's tail)}."""
    pending, running, done = list(jobs.items()), {}, {}
    try:
        while pending or running:
            while pending and len(running) < concurrency:
                name, argv = pending.pop(0)
                log = open(os.path.join(folder, f"{name}.log"), "w")
                running[name] = (subprocess.Popen(argv, cwd=folder, env=train_env(), stdout=log,
                                                  stderr=subprocess.STDOUT, start_new_session=True),
                                 time.perf_counter(), log)
            for name, (proc, t0, log) in list(running.items()):
                code = proc.poll()
                if code is None and time.perf_counter() - t0 > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    code = proc.wait()
                    code = f"killed after {timeout} s"
                if code is not None:
                    log.close()
                    with open(log.name) as fh:
                        done[name] = (code, time.perf_counter() - t0, fh.read()[-3000:])
                    del running[name]
            time.sleep(0.1)
    finally:
        for proc, _, log in running.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    return done


def final_params(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


def params_diff(a, b):
    """max |a - b| over every tensor of two exports (inf when their keys differ)."""
    pa, pb = final_params(a), final_params(b)
    if pa.keys() != pb.keys():
        return math.inf
    return max(float((pa[k].double() - pb[k].double()).abs().max()) for k in pa)


def train_lines(out):
    return [line for line in rundir.read_metrics(os.path.join(out, "metrics.jsonl")) if line.get("split") == "train"]


def check_cli(ctx, r):
    if not has_datasets():
        r.skip("the datasets package is not installed: train.py needs it to read data (pip install datasets)")
        return
    cuda = ctx.device.type == "cuda"
    paths = world_paths(ctx)
    folder = os.path.join(ctx.tmp, "cli")
    os.makedirs(folder, exist_ok=True)
    data = small_data(paths, folder)
    train_py = os.path.join(ROOT, "train.py")
    common = ["--model", paths["llama-tiny"], "--data", data, "--global_batch_size", "4", "--micro_batch_size", "2",
              "--max_steps", "4", "--lr", "1e-3", "--adam_eps", "1e-6", "--log_every", "1", "--save_every", "0",
              "--judge", "none", "--max_length", "64", "--max_prompt_length", "32", "--seed", "3",
              "--device", ctx.device.type]

    def argv(name, method, *extra):
        out = os.path.join(folder, name)
        return [sys.executable, train_py, *common, "--method", method, "--output_dir", out,
                "--cache_dir", os.path.join(folder, f"cache-{name}"), *extra]

    timeout = 240 if cuda else 300
    halt = argv("resumed", "dpo", "--halt_after", "2")
    jobs = {"dpo": argv("dpo", "dpo"), "confpo_rand": argv("confpo_rand", "confpo_rand"), "kto": argv("kto", "kto"),
            "halted": halt, "det1": argv("det1", "dpo", "--deterministic"),
            "det2": argv("det2", "dpo", "--deterministic")}
    done = run_jobs(jobs, folder, ctx.jobs, timeout)
    out = {name: os.path.join(folder, name) for name in ("dpo", "confpo_rand", "kto", "resumed", "det1", "det2")}
    for name, (code, seconds, tail) in done.items():
        r.set(f"{name}_s", seconds)
        if not r.expect(code == 0, f"train.py {name} exited with {code}: {tail.strip().splitlines()[-1:]}"):
            r.note(f"{name}'s output ends: {tail[-1500:]}")
    for name in ("dpo", "confpo_rand", "kto"):
        lines = train_lines(out[name])
        finite = bool(lines) and all(math.isfinite(line.get("loss", math.nan)) for line in lines)
        r.expect(len(lines) == 4 and finite, f"{name}: {len(lines)} training lines (4 expected), losses finite: "
                 f"{finite}")
        r.expect(os.path.exists(os.path.join(out[name], "final", "model.safetensors")), f"{name}: no export")
        if lines:
            r.set(f"{name}_final_loss", lines[-1]["loss"], show=True)
            r.set(f"{name}_tokens_per_s", lines[-1].get("tokens_per_s"))
            r.set(f"{name}_peak_memory_mib", lines[-1].get("peak_memory_mib"))
    first = train_lines(out["dpo"])[:1]
    if first:
        tol = 1e-2 if cuda else 1e-4
        off = r.set("dpo_step1_loss_minus_ln2", abs(first[0]["loss"] - LN2))
        r.expect(off <= tol, f"dpo's first loss is {first[0]['loss']:.6f}, not ln 2 (off by more than {tol})")

    # --halt_after 2, then the same command resumes and ends where an uninterrupted run ends
    saved = rundir.checkpoints(out["resumed"])
    r.expect([os.path.basename(p) for p in saved] == ["step_00000002"], f"--halt_after 2 left checkpoints "
             f"{[os.path.basename(p) for p in saved]}, not step_00000002")
    r.expect(not os.path.exists(os.path.join(out["resumed"], "final")), "--halt_after 2 exported a final model")
    again = run_jobs({"resume": argv("resumed", "dpo")}, folder, 1, timeout)["resume"]  # the same, without the halt
    r.set("resume_s", again[1])
    if r.expect(again[0] == 0, f"the resumed run exited with {again[0]}: {again[2][-500:]}"):
        r.expect("resumed from" in again[2] and "at step 2" in again[2], "the resumed run did not say it resumed at "
                 "step 2")
        if os.path.exists(os.path.join(out["dpo"], "final")):
            diff = r.set("resumed_vs_uninterrupted_max_abs_diff", params_diff(out["resumed"], out["dpo"]), show=True)
            tol = 1e-6 if cuda else 0.0
            r.expect(diff <= tol, f"the resumed run's final parameters differ from an uninterrupted run's by "
                     f"{diff:.3g} (> {tol})")
            a, b = train_lines(out["resumed"]), train_lines(out["dpo"])
            loss_diff = max((abs(x["loss"] - y["loss"]) for x, y in zip(a, b)), default=math.inf)
            r.set("resumed_vs_uninterrupted_loss_diff", loss_diff)
            r.expect(len(a) == len(b) and loss_diff <= (1e-6 if cuda else 0.0),
                     f"the resumed run's metrics lines differ ({len(a)} against {len(b)}, losses by {loss_diff:.3g})")

    # --deterministic twice: the same bits (on a CPU, the same bits as without the flag, too)
    if all(os.path.exists(os.path.join(out[n], "final")) for n in ("det1", "det2")):
        diff = r.set("deterministic_twice_max_abs_diff", params_diff(out["det1"], out["det2"]), show=True)
        r.expect(diff == 0, f"two --deterministic runs differ by {diff:.3g}")
        if os.path.exists(os.path.join(out["dpo"], "final")):
            other = r.set("deterministic_vs_default_max_abs_diff", params_diff(out["det1"], out["dpo"]))
            if not cuda:
                r.expect(other == 0, f"on a CPU, --deterministic changed the result by {other:.3g}")
    sigterm(ctx, r, folder, train_py, common)


def sigterm(ctx, r, folder, train_py, common):
    """SIGTERM to a `torchrun --nproc_per_node 1` job's process group (a scheduler's preemption): the step finishes,
    a checkpoint is saved, the job ends; how long each took."""
    out = os.path.join(folder, "sigterm")
    flags = [a for a in common]
    flags[flags.index("--max_steps") + 1] = "100000"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", train_py, *flags,
           "--method", "dpo", "--output_dir", out, "--cache_dir", os.path.join(folder, "cache-sigterm")]
    log = open(os.path.join(folder, "sigterm.log"), "w")
    proc = subprocess.Popen(cmd, cwd=folder, env=train_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + (120 if ctx.device.type == "cuda" else 240)
        while len(train_lines(out)) < 2 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if not r.expect(proc.poll() is None and len(train_lines(out)) >= 2, "the torchrun job did not reach step 2 "
                        f"(exit code {proc.poll()})"):
            return
        t0 = time.perf_counter()
        os.killpg(proc.pid, signal.SIGTERM)
        saved_at = None
        while proc.poll() is None and time.perf_counter() - t0 < 90:
            if saved_at is None and rundir.checkpoints(out):
                saved_at = time.perf_counter() - t0
            time.sleep(0.02)
        if proc.poll() is None:
            r.expect(False, "the torchrun job was still running 90 s after SIGTERM")
            return
        ended = r.set("sigterm_to_exit_s", time.perf_counter() - t0, show=True)
        saved = rundir.checkpoints(out)
        if saved_at is None and saved:
            saved_at = ended
        r.set("sigterm_to_checkpoint_s", saved_at, show=True)
        r.set("sigterm_exit_code", proc.returncode)
        log.flush()
        with open(log.name) as fh:
            text = fh.read()
        r.expect(bool(saved), "no checkpoint after SIGTERM")
        r.expect("stopped by SIGTERM after step" in text, "the job did not say it stopped by SIGTERM and saved")
        if saved:
            with open(os.path.join(saved[-1], "trainer_state.json")) as fh:
                r.set("sigterm_saved_step", json.load(fh)["step"])
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


# ---------------------------------------------------------------------------------------------------------------
# 5. sample: models.sample, and the scorers' memory
# ---------------------------------------------------------------------------------------------------------------

def smol_folder(ctx, tokenizer_path):
    """A random model of SmolLM2-135M's architecture (30 layers, h 576, vocab 49152, tied embeddings), saved with
    the tiny world's tokenizer: the size bench.py's generation item uses."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    path = os.path.join(ctx.tmp, "smollm2-arch")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(path)
    if tokenizer_path:
        AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(path)
    return path


def check_sample(ctx, r):
    from transformers import AutoModelForCausalLM
    dev = ctx.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = False  # batch independence is checked in float32
    paths = world_paths(ctx)
    if cuda and not ctx.quick:
        folder, P, K, N, lengths = smol_folder(ctx, paths["tokenizer"]), 32, 4, 64, (16, 96)
    elif cuda:
        folder, P, K, N, lengths = paths["llama-small"], 16, 4, 32, (8, 48)
    else:
        folder, P, K, N, lengths = paths["llama-tiny"], 4, 2, 8, (4, 16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
    vocab = min(model.config.vocab_size, 1024)  # prompt ids the tokenizer knows
    eos, pad = [model.config.eos_token_id], model.config.pad_token_id or 0
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(4, vocab, (int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g)),),
                             generator=g).tolist() for _ in range(P)]
    r.set("model", f"{model.config.num_hidden_layers} layers, h {model.config.hidden_size}, vocab "
                   f"{model.config.vocab_size}; {P} prompts x {K} samples x {N} tokens", show=True)

    # batch independence with left padding, float32: greedy, and sampled with each row's own generator
    n = min(P, 6)
    seeds = [[models.draw_seed(0, i, k) for k in range(2)] for i in range(n)]
    same = 0
    for temperature, top_p, row_seeds in ((0.0, 1.0, [[0]] * n), (1.0, 0.9, seeds)):
        together = models.sample(model, prompts[:n], row_seeds, N, temperature, top_p, eos, pad)
        alone = [models.sample(model, [p], [s], N, temperature, top_p, eos, pad)[0] for p, s in
                 zip(prompts[:n], row_seeds)]
        agree = sum(a == b for a, b in zip(alone, together))
        key = "greedy" if temperature == 0 else "sampled"
        r.set(f"batch_independent_{key}", f"{agree}/{n}", show=True)
        r.expect(agree == n, f"{key}: {n - agree} of {n} prompts get another answer alone than in a batch of prompts "
                 "of other lengths (float32)")
        same += agree

    # bf16: finite logits of a left-padded batch, and sampling
    half = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(dev).eval()
    ids, mask = left_padded(prompts[:8], pad, dev)
    with torch.no_grad():
        logits = half(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    r.set("bf16_nonfinite_logits_real_tokens", int((~torch.isfinite(logits[real])).sum()), show=True)
    r.set("bf16_nonfinite_logits_padding", int((~torch.isfinite(logits[~real])).sum()))
    r.expect(bool(torch.isfinite(logits[real]).all()), "non-finite bf16 logits at real (unpadded) positions")
    out = models.sample(half, prompts[:4], seeds[:4], N, 1.0, 0.95, eos, pad)
    ok = all(0 < len(t) <= N and all(0 <= i < half.config.vocab_size for i in t) for row in out for t, _ in row)
    r.expect(ok, "models.sample in bf16 gave empty or out-of-vocabulary answers")
    greedy_bf16 = models.sample(half, prompts[:n], [[0]] * n, N, 0.0, 1.0, eos, pad)
    alone_bf16 = [models.sample(half, [p], [[0]], N, 0.0, 1.0, eos, pad)[0] for p in prompts[:n]]
    r.set("bf16_greedy_batch_independent", f"{sum(a == b for a, b in zip(alone_bf16, greedy_bf16))}/{n}")
    del logits

    # tokens/s: models.sample against a loop of model.generate, batches of 8 prompts, K samples each
    fast = half if cuda else model
    all_seeds = [[models.draw_seed(0, i, k) for k in range(K)] for i in range(P)]

    def ours():
        made = 0
        for i in range(0, P, 8):
            made += sum(len(t) for row in models.sample(fast, prompts[i:i + 8], all_seeds[i:i + 8], N, 1.0, 0.95,
                                                        eos, pad) for t, _ in row)
        return made

    def theirs():
        made = 0
        for i in range(0, P, 8):
            ids, mask = left_padded(prompts[i:i + 8], pad, dev)
            with torch.no_grad():
                new = fast.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.95,
                                    top_k=0, max_new_tokens=N, num_return_sequences=K, pad_token_id=pad,
                                    eos_token_id=eos)[:, ids.shape[1]:]
            ended = torch.isin(new, torch.tensor(eos, device=dev))
            first = torch.where(ended.any(-1), ended.float().argmax(-1) + 1, torch.full_like(ended[:, 0], new.shape[1],
                                                                                           dtype=torch.long))
            made += int(first.sum())
        return made
    rates = {}
    for name, fn in (("sample", ours), ("generate", theirs)):
        fn()  # warm-up
        sync(dev)
        t0 = time.perf_counter()
        made = fn()
        sync(dev)
        rates[name] = r.set(f"{name}_tokens_per_s", made / (time.perf_counter() - t0))
    r.set("sample_over_generate", rates["sample"] / rates["generate"], show=True)
    half = fast = model = None  # freed before the scorers load
    scorers(ctx, r, folder, paths)


def scorers(ctx, r, folder, paths):
    """The scorers' forward, with use_cache off as they load, and with it on for comparison: score.load_scorer (a
    PolicyLogps with a float32 head) and onpolicy.reward_model_scorer (a sequence classifier)."""
    if not has_datasets():
        r.set("scorers", "skipped: score.py and onpolicy.py import data.py, which needs the datasets package")
        return
    import onpolicy
    import score
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification
    dev = ctx.device
    cfg = SimpleNamespace(dtype="auto", attn_implementation="sdpa")
    scorer = score.load_scorer(folder, cfg, dev)
    r.expect(scorer.model.config.use_cache is False, "score.load_scorer left use_cache on")
    B, T = (8, 512) if dev.type == "cuda" and not ctx.quick else (4, 48)
    g = torch.Generator().manual_seed(2)
    ids, labels = response_labels(B, T, min(scorer.model.config.vocab_size, 1024), g, low=4)
    ids, labels, mask = ids.to(dev), labels.to(dev), torch.ones(B, T, dtype=torch.long, device=dev)
    try:  # the first forward runs check_head (before the memory is measured: it forwards the logits path too)
        with torch.no_grad():
            scorer(ids, mask, labels)
    except utils.UserError as e:
        r.expect(False, f"score.load_scorer's plain Llama was refused by check_head on this device: {e}")
        scorer.checked = True
    peaks = {}
    for cache in (False, True):
        scorer.model.config.use_cache = cache
        with torch.no_grad():
            peaks[cache], _ = memory_of(lambda: scorer(ids, mask, labels), dev)
    scorer.model.config.use_cache = False
    with torch.no_grad():
        logps, m = scorer(ids, mask, labels)
    r.expect(bool(torch.isfinite(logps[m]).all()), "non-finite log-probs from score.load_scorer's model")
    r.set("scorer_peak_mib", mib(peaks[False]), show=True)
    r.set("scorer_peak_mib_with_cache", mib(peaks[True]))
    r.expect(peaks[False] <= peaks[True], f"score.load_scorer's forward peaks higher without the KV cache "
             f"({mib(peaks[False]):.1f} MiB) than with it ({mib(peaks[True]):.1f} MiB)")
    scorer = None

    if not paths.get("tokenizer"):
        r.set("reward_model", "skipped: no tokenizer")
        return
    reward_path = os.path.join(ctx.tmp, "reward-model")
    base = AutoConfig.from_pretrained(folder)
    base.num_labels, base.pad_token_id = 1, base.pad_token_id if base.pad_token_id is not None else 0
    torch.manual_seed(0)
    LlamaForSequenceClassification(base).save_pretrained(reward_path)
    AutoTokenizer.from_pretrained(paths["tokenizer"]).save_pretrained(reward_path)
    dtype = models.compute_dtype("auto", dev)
    scores = onpolicy.reward_model_scorer(reward_path, dev, dtype, batch_size=8)
    r.expect(scores.model.config.use_cache is False, "onpolicy.reward_model_scorer left use_cache on")
    rows = [json.loads(line) for line in open(paths["test"])][:16 if dev.type == "cuda" else 4]
    prompts, responses = [x["prompt"] for x in rows], [x["chosen"] for x in rows]
    scores(prompts[:2], responses[:2])  # a warm-up, as for the scorer
    found = {}
    for cache in (False, True):
        scores.model.config.use_cache = cache
        found[cache] = memory_of(lambda: scores(prompts, responses), dev)[0]
    scores.model.config.use_cache = False
    values = scores(prompts, responses)
    r.expect(len(values) == len(prompts) and all(math.isfinite(v) for v in values), "non-finite reward scores")
    r.set("reward_peak_mib", mib(found[False]), show=True)
    r.set("reward_peak_mib_with_cache", mib(found[True]))
    r.expect(found[False] <= found[True], f"the reward model's forward peaks higher without the KV cache "
             f"({mib(found[False]):.1f} MiB) than with it ({mib(found[True]):.1f} MiB)")


# ---------------------------------------------------------------------------------------------------------------
# The harness: each check in a process of its own, under a budget; one verdict line each; the JSON
# ---------------------------------------------------------------------------------------------------------------

RUN = {"head": check_head, "fsdp": check_fsdp, "layer": check_layer, "cli": check_cli, "sample": check_sample}


class OverBudget(BaseException):
    """SIGTERM from the parent: this check ran past its budget (the finally blocks still stop what it started)."""


def worker(args):
    """One check in this process -> its Report, written to args.result."""
    r = Report(args.worker, args.result)

    def stop(signum, frame):
        raise OverBudget()
    signal.signal(signal.SIGTERM, stop)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    r.env = env_info(device)
    tmp = tempfile.mkdtemp(prefix=f"gpu_check_{args.worker}_", dir=os.environ.get("GPU_CHECK_TMP") or None)
    ctx = SimpleNamespace(device=device, quick=args.quick, tiny_world=args.tiny_world, tmp=tmp, note=None,
                          jobs=args.jobs or (3 if device.type == "cuda" else 2))
    try:
        if args.worker in args.fail_on_purpose.split(","):
            raise RuntimeError(f"failing on purpose (--fail_on_purpose {args.worker}): a test of the harness")
        RUN[args.worker](ctx, r)
        if ctx.note:
            r.note(ctx.note)
    except OverBudget:
        r.error = "stopped: it ran past its time budget"
    except BaseException as e:  # noqa: B036 (the check's failure is its verdict, whatever it is)
        r.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        r.note("traceback: " + "".join(traceback.format_exception(e))[-3000:])
        traceback.print_exc()
    finally:
        r.save()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def run_check(args, name, device, logs):
    """Run one check in a process of its own under its budget -> its result (a dict), with status and seconds."""
    budget = BUDGET_S[device][name] * args.budget_scale
    result_path = os.path.join(logs, f"{name}.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(result_path)
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, "--result", result_path, "--device", device,
            "--tiny_world", args.tiny_world, "--jobs", str(args.jobs), "--fail_on_purpose", args.fail_on_purpose]
    argv += ["--quick"] if args.quick else []
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "PYTHONUNBUFFERED": "1",
           "HF_DATASETS_OFFLINE": os.environ.get("HF_DATASETS_OFFLINE", "1"), "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    with open(os.path.join(logs, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        over = False
        try:
            proc.wait(timeout=budget)
        except subprocess.TimeoutExpired:
            over = True
        except BaseException:  # Ctrl-C or SIGTERM here: the worker (a session of its own) must not outlive us
            stop_worker(proc)
            raise
        if over:
            stop_worker(proc)
    seconds = time.perf_counter() - t0
    try:
        with open(result_path) as fh:
            result = json.load(fh)
    except (OSError, ValueError):
        result = {"status": "FAIL", "numbers": {}, "shown": [], "problems": [], "notes": [], "env": {}, "error": None}
    if over:
        result.update(status="FAIL", error=f"ran past its budget of {budget:.0f} s")
    elif proc.returncode != 0 or (result["status"] == "FAIL" and not result.get("error") and not result["problems"]):
        with open(os.path.join(logs, f"{name}.log")) as fh:
            last = [line for line in fh.read().strip().splitlines() if line.strip()][-1:] or ["no output"]
        result.update(status="FAIL", error=result.get("error") or f"its process ended with code {proc.returncode}: "
                      f"{last[0][:300]}")
    result.update(seconds=round(seconds, 1), budget_s=budget, log=os.path.join(logs, f"{name}.log"))
    return result


def stop_worker(proc):
    """SIGTERM to a check's process group (the worker then stops what it started), SIGKILL 15 s later."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def verdict_line(name, result):
    numbers = result.get("numbers", {})
    shown = ", ".join(f"{k} {fmt(numbers[k])}" for k in result.get("shown", []) if k in numbers)
    status = result["status"]
    if status == "SKIP":
        return f"SKIP {name}: {result.get('skipped')} [{result['seconds']:.0f} s]"
    if status == "FAIL":
        why = result.get("error") or "; ".join(result.get("problems", []))
        more = "; ".join(result.get("problems", [])) if result.get("error") and result.get("problems") else ""
        return f"FAIL {name}: {why}{'; ' + more if more else ''}{' | ' + shown if shown else ''} " \
               f"[{result['seconds']:.0f} s]"
    return f"PASS {name}: {shown} [{result['seconds']:.0f} s]"


def details(result, width=116):
    """The numbers not on the verdict line, and the notes, as indented lines."""
    shown = set(result.get("shown", []))
    parts = [f"{k} {fmt(v)}" for k, v in result.get("numbers", {}).items() if k not in shown]
    lines, line = [], ""
    for part in parts:
        if line and len(line) + len(part) + 2 > width:
            lines.append(line)
            line = ""
        line = f"{line}, {part}" if line else part
    lines += [line] if line else []
    lines += [n for n in result.get("notes", []) if not n.startswith("traceback:")]
    return ["    " + x for x in lines]


def write_results(out, args, device, env, results, seconds):
    """The JSON of every check so far: the date, the device, the versions, each check's status and numbers."""
    counts = {s: sum(r["status"] == s for r in results.values()) for s in ("PASS", "FAIL", "SKIP")}
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": version_of("transformers"),
                **env}
    summary = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": env.get("device", device),
               "device_type": device, "torch": versions["torch"], "cuda": versions["cuda"],
               "transformers": versions["transformers"], "versions": versions, "quick": args.quick,
               "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "seconds": round(seconds, 1),
               "counts": counts, "checks": {n: {k: v for k, v in r.items() if k != "env"} for n, r in results.items()}}
    with open(out + ".tmp", "w") as fh:
        json.dump(summary, fh, indent=1, default=str)
    os.replace(out + ".tmp", out)
    return summary


def main(args):
    if args.worker:
        return worker(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"error: --device cuda: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU",
              file=sys.stderr)
        return 2
    selected = [c for c in CHECKS if c in args.only.split(",")]
    out = os.path.abspath(args.out)
    logs = os.path.splitext(out)[0] + ".logs"
    os.makedirs(logs, exist_ok=True)
    print(f"gpu_check on {device}{' (quick)' if args.quick else ''}: {', '.join(selected)}; budgets "
          f"{', '.join(f'{c} {BUDGET_S[device][c] * args.budget_scale:.0f} s' for c in selected)}; logs in {logs}",
          flush=True)
    t0 = time.perf_counter()
    results, env = {}, {}

    def terminated(signum, frame):
        raise KeyboardInterrupt("SIGTERM")
    signal.signal(signal.SIGTERM, terminated)  # a `timeout` around this command: stop the running check too
    for name in selected:
        results[name] = result = run_check(args, name, device, logs)
        env = env or result.get("env", {})
        print(verdict_line(name, result), flush=True)
        for line in details(result):
            print(line, flush=True)
        if result["status"] == "FAIL" and result.get("error"):
            with open(result["log"]) as fh:
                tail = [x for x in fh.read().splitlines() if x.strip()][-8:]
            print("\n".join(f"    | {x[:200]}" for x in tail), flush=True)
        summary = write_results(out, args, device, env, results, time.perf_counter() - t0)  # after each check
    counts, seconds = summary["counts"], summary["seconds"]
    print(f"summary: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in {seconds:.0f} s on "
          f"{summary['device']} (torch {summary['torch']}, CUDA {summary['cuda']}, transformers "
          f"{summary['transformers']}); results in {out}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
