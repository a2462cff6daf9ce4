"""Speed and memory, measured side by side in one run against the naive way and against TRL, with targets.

    python benchmarks/bench.py          # the whole table, about an hour on 2 CPU cores; writes benchmarks/bench.json
    python benchmarks/bench.py --items 1,2,3,4,5,select    # the tiny-model items only: a few minutes
    python benchmarks/bench.py --quick  # small shapes, one or two repetitions: a smoke run (tests/test_bench.py)
    python benchmarks/bench.py --large  # item 2 at T=1024, H=2048 (bf16 on a GPU; on a CPU, patience and 12 GB)
    pip install -r requirements.txt -r benchmarks/requirements-bench.txt   # TRL and Liger-Kernel: items 2, 3, 6

Absolute times on a shared machine are noise; what is reported is ratios of variants measured in the same process,
on the same inputs, interleaved (A B C, B C A, C A B, ...) so that drift hits every variant alike, after warm-up,
as the median of several repetitions, with a fixed number of threads (recorded in bench.json).

1. Step time of ConfPO, ConfPO-rand and SePO (selections precomputed) over SimPO, and of ConfPO_DPO over DPO: one
   training step of train.py (micro_step, backward, clipping, AdamW) on the same tiny model (a world of one, as
   train.py loads it) and batch;
   and the objective alone (from cached log-probs), the part that differs, in milliseconds.
2. Per-token log-probs, forward + backward: peak memory and time of losses.token_logps (from logits) and
   losses.chunked_token_logps (from hidden states and the output embedding) over the naive
   `log_softmax(logits).gather` (for the chunked path, `hidden @ W.T` then the naive way), at V = 32000 and 128256.
   Liger-Kernel's fused linear SimPO loss (eager), where it imports, is a second anchor.
3. Training throughput (tokens/s) of train.py's step for SimPO and DPO over TRL's CPOTrainer(loss_type="simpo",
   cpo_alpha=0) and DPOTrainer on the same model, data, batch, sequence length and threads.
4. FSDP: per-rank bytes of parameters, gradients and AdamW state (local shards) with 2 ranks over 1 rank.
5. score.py's scoring throughput (oracle + reference forward) over training throughput: the cost of SePO's token
   selection relative to one epoch of training.
6-7. Real shapes: SmolLM2-135M's architecture (random weights, built from its config in code) at 256 and 1024
   tokens, 4 pairs per step, activation checkpointing off and on (TRL's gradient checkpointing set the same):
   tokens/s and peak memory (max RSS, and the allocator's peak) of train.py against TRL's CPOTrainer(simpo) and
   DPOTrainer, every run a process of its own, in turns; DPO also with --precompute_ref.
8. Where the memory of one real-shape step goes: peak by phase (load, forward, backward, optimizer step) and by owner
   (parameters, gradients, optimizer state, reference, saved activations, the rest), for train.py's model, the same
   under FSDP2 in a world of one, and the plain Hugging Face model computing full logits.
9. Loading on 2 ranks (torchrun): summed growth of peak RSS, rank 0 reading and broadcasting (train.py) against
   every rank reading the whole checkpoint (before), over one model plus its shards.
10. Generation: onpolicy.py's sampler (models.sample: one prefill per prompt for its K samples, a KV cache, rows
   leaving the batch as they end) against what a user would write, a loop of model.generate(num_return_sequences=K)
   over batches of prompts, tokens/s, on the tiny world's SFT model and SmolLM2-135M's architecture.
Also: sepo.select_tokens against a loop over responses (the released scorer's way).

Every comparison of two implementations first checks that they agree (loss and input gradients, to float
precision), so that a fast but wrong variant cannot win; bench.json records it.

Peak memory (item 2) is exact on CPU: torch.profiler with profile_memory=True reports every allocation and free of
the CPU allocator (which does not cache: each is a real malloc/free) with its size and a timestamp; the running sum
in time order is the bytes allocated at each moment, and its maximum, taken from just before the forward to the end
of the backward, is the peak above what existed before (the inputs). It counts every tensor the variant creates:
saved activations, transient buffers, and the gradients of the inputs (which every variant must produce). On a
GPU it is torch.cuda.max_memory_allocated over the same span.
"""

import argparse
import contextlib
import dataclasses
import datetime
import glob
import io
import itertools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def command_line():
    """bench.py's flags (defined above the slow imports, so that --help answers at once); every flag in both
    spellings, as HfArgumentParser gives the other scripts'."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes, 1-2 repetitions: a smoke run")
    parser.add_argument("--large", action="store_true", help="item 2 at T=1024, H=2048 (bf16 on a GPU)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench.json"),
                        help="where the results go (JSON; default: beside this file)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, fixed for every item")
    parser.add_argument("--tiny_world", "--tiny-world", default="tiny_world",
                        help="the offline tiny world (built on first use)")
    parser.add_argument("--cache_dir", "--cache-dir", default="", help="datasets cache ('' = a temporary folder)")
    parser.add_argument("--items", default="1,2,3,4,5,6,8,9,10,11,12,select", help="which items to run, comma-"
                        "separated (6: real shapes against TRL, about 40 minutes; 8: memory breakdown; 9: loading on 2 "
                        "ranks; 10: generation; 11: micro-batches grouped by length; 12: LoRA against full DPO)")
    parser.add_argument("--generation_model", "--generation-model", default="", help="item 10 also on this model "
                        "(e.g. runs/real/assets/smollm2-135m-instruct, made by real_study.py)")
    parser.add_argument("--generation_prompts", "--generation-prompts", type=int, default=48, help="item 10's "
                        "prompts (batches of 8, 5 samples each)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    parser.add_argument("--table", default="", help="only print the table of an existing bench.json, run nothing")
    return parser


if __name__ == "__main__" and not (sys.argv[1:2] and sys.argv[1].endswith("_worker")):
    command_line().parse_args()  # --help and a mistyped flag answer here, before torch loads

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, one folder up
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import rundir  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from utils import end_group, exit_now, init_distributed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Targets of the issue: (ratio, "<=" or ">="). Item 5 has none: it is a cost to know, not to meet.
TARGETS = {
    "step_time": (1.02, "<="),  # item 1: selective method / its base objective
    "peak_memory": (0.35, "<="),  # item 2: ours / naive peak bytes
    "logps_time": (1.00, "<="),  # item 2: ours / naive time ("no slower")
    "trl_throughput": (1.2, ">="),  # item 3: our tokens/s / TRL's
    "fsdp_memory": (0.55, "<="),  # item 4: per-rank bytes with 2 ranks / 1 rank
    "real_throughput": (1.2, ">="),  # item 6: our tokens/s / TRL's, real shapes
    "real_memory": (0.9, "<="),  # item 7: our peak memory / TRL's, real shapes
    "load_memory": (1.3, "<="),  # item 9: 2 ranks' summed peak at load / (one model + its shards)
    "generation": (2.0, ">="),  # item 10: onpolicy.py's sampler / a loop of model.generate, tokens/s
}
SKIP_TRL = "skipped (pip install -r benchmarks/requirements-bench.txt)"


# ---------------------------------------------------------------------------------------------------------------
# Measuring: threads, interleaved timing, peak memory
# ---------------------------------------------------------------------------------------------------------------

def set_threads(n):
    """Fix intra-op threads (and the OpenMP variable that torchrun and init_distributed read)."""
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def interleaved(variants, repeats, warmup=1):
    """Time each of {name: fn} `repeats` times after `warmup` untimed calls each. The variants run in turns, the
    order rotated every round (A B C, B C A, C A B, ...), so that machine drift and cache effects hit all alike.
    Returns {name: [seconds]}."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def peak_bytes(fn, device="cpu"):
    """Peak bytes allocated while fn() runs, above what was allocated when it started.

    CPU: the profiler's memory events (one per allocation, +bytes, and per free, -bytes, of the CPU allocator, which
    has no cache), summed in time order; the maximum of the running sum. GPU: torch.cuda.max_memory_allocated.
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    with no_fd2_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    running = itertools.accumulate(e.nbytes() for e in events)
    return max(0, max(running, default=0))


@contextlib.contextmanager
def no_fd2_output():
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


def saved_bytes(fn, inputs):
    """Run fn() and return (output, bytes autograd saved for backward), not counting the inputs themselves (the
    logits or hidden states, which the model's graph keeps alive anyway)."""
    total = [0]
    alive = {x.untyped_storage().data_ptr() for x in inputs}

    def pack(t):
        if t.untyped_storage().data_ptr() not in alive:
            total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, total[0]


@contextlib.contextmanager
def quiet():
    """Silence a trainer's progress bars and prints; show the tail of them if it fails."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    except BaseException:
        print(out.getvalue()[-4000:], file=sys.stderr)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Item 2: per-token log-probs against the naive way (and Liger-Kernel)
# ---------------------------------------------------------------------------------------------------------------

def naive_token_logps(logits, labels):
    """The textbook version: a full float32 log-softmax copy, gathered -> (B, T) aligned as losses.token_logps."""
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V) float32
    mask = labels[:, 1:] != -100
    picked = logps.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * mask
    return F.pad(picked, (1, 0)), F.pad(mask, (1, 0))


def simpo_mean(logps, mask):
    """The mean SimPO loss (losses.simpo_loss, its defaults) over pairs stacked as chosen rows then rejected rows."""
    B = logps.shape[0] // 2
    return losses.simpo_loss(logps[:B], mask[:B], logps[B:], mask[B:])[0].mean()


def liger_simpo(hidden, weight, labels):
    """Liger-Kernel's fused linear SimPO loss (chunked over pairs, pure PyTorch), with losses.simpo_loss's beta and
    gamma; it takes the shifted hidden states and labels. Eager (compiled=False): torch.compile is not part of the
    comparison."""
    from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    loss = LigerFusedLinearSimPOLoss(beta=2.0, gamma=1.0, compute_nll_loss=False, compiled=False)
    return loss(weight, hidden[:, :-1], labels[:, 1:])[0]


def liger_status():
    """Why Liger-Kernel cannot be the second anchor, or None if its chunked losses import."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss  # noqa: F401 (the one bench.py uses)
        return None
    except Exception as e:  # not installed, or no import on this platform
        return f"{type(e).__name__}: {e}"


def bench_logps(B, T, H, V, prompt, hidden_dtype, device, repeats, extra=False, blocks=()):
    """Item 2 at one vocabulary size: B pairs (2B rows, chosen then rejected) of T tokens, the first `prompt` of each
    row unlabelled. From logits (float32, as train.py on CPU) and from hidden states; extra: also bfloat16 logits
    (a GPU's, where the naive way makes a float32 copy) and chunk_size 1024 instead of the default (blocks of 32 MiB
    of float32 logits: 262 rows at V=32000, 65 at V=128256) (both informational)."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, V, (2 * B, T), generator=gen).to(device)
    labels[:, :prompt] = -100
    out = {"B_pairs": B, "rows": 2 * B, "T": T, "H": H, "V": V, "prompt": prompt}
    for dtype in (torch.float32, torch.bfloat16) if extra else (torch.float32,):
        out[f"from_logits_{str(dtype).replace('torch.', '')}"] = from_logits(labels, V, dtype, device, repeats, extra)
    out["from_hidden"] = from_hidden(labels, H, V, hidden_dtype, device, repeats, extra, blocks)
    return out


def from_logits(labels, V, dtype, device, repeats, extra):
    """The model's logits in, a weighted sum of the per-token log-probs out (so that the logits get a gradient of
    their own): naive vs losses.token_logps."""
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(*labels.shape, V, generator=gen) * 2).to(dtype).to(device).requires_grad_()
    weights = torch.randn(labels.shape, generator=gen).to(device)
    fns = {"naive": lambda: naive_token_logps(logits, labels)[0],
           "token_logps": lambda: losses.token_logps(logits, labels)[0]}
    if extra:
        fns["token_logps chunk 1024"] = lambda: losses.token_logps(logits, labels, chunk_size=1024)[0]
    return {"dtype": str(dtype), **compare_variants(fns, lambda f: (f() * weights).sum(), [logits], repeats, device)}


def from_hidden(labels, H, V, dtype, device, repeats, extra, blocks=()):
    """The last hidden states and the output embedding in, the mean SimPO loss over the pairs out (what a trainer
    computes): `hidden @ W.T` then naive vs losses.chunked_token_logps, and Liger's fused linear SimPO loss where it
    runs; blocks: also chunked_token_logps with blocks of these many bytes of float32 logits (--large: the choice
    of losses.CHUNK_BYTES on a GPU)."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(*labels.shape, H, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).to(device).requires_grad_()
    fns = {"naive": lambda: simpo_mean(*naive_token_logps(hidden @ weight.T, labels)),
           "chunked_token_logps": lambda: simpo_mean(*losses.chunked_token_logps(hidden, weight, labels))}
    if extra:
        fns["chunked_token_logps chunk 1024"] = lambda: simpo_mean(*losses.chunked_token_logps(
            hidden, weight, labels, chunk_size=1024))
    for size in blocks:
        rows = max(1, size // (4 * V))
        fns[f"chunked_token_logps {size >> 20} MiB blocks"] = lambda r=rows: simpo_mean(*losses.chunked_token_logps(
            hidden, weight, labels, chunk_size=r))
    why_not = liger_status()
    if why_not is None:
        fns["liger_simpo"] = lambda: liger_simpo(hidden, weight, labels)
    return {"dtype": str(dtype), "liger": "ran (eager, compiled=False)" if why_not is None else f"not run: {why_not}",
            **compare_variants(fns, lambda f: f(), [hidden, weight], repeats, device)}


def assert_agree(a, b, tol, what):
    """|a - b| <= tol |b| + tol / 100 max|b| everywhere (float sums in another order), checked block by block so
    that no temporary as large as a vocabulary-sized gradient is made."""
    a, b = a.reshape(-1), b.reshape(-1)
    scale = max(float(b.abs().max()), 1e-30)
    for s in range(0, b.numel(), 2**22):
        x, y = a[s:s + 2**22], b[s:s + 2**22]
        excess = float(((x - y).abs() - tol * y.abs()).max())
        if excess > tol / 100 * scale:
            raise AssertionError(f"{what} differs from the baseline's by {excess:.3g} beyond tolerance "
                                 f"(max |baseline| {scale:.3g})")


def compare_variants(fns, loss_of, inputs, repeats, device):
    """For each variant, one forward + backward whose peak memory is measured and whose loss and input gradients
    must equal the baseline's (the first variant's); then the bytes it keeps for backward, and interleaved
    forward + backward times (the first pass was the warm-up). Returns the measurements and ratios over the
    baseline."""
    def clear():
        for x in inputs:
            x.grad = None

    def run(f):
        clear()
        loss_of(f).backward()

    reference, agree, peaks = None, {}, {}
    for name, f in fns.items():
        clear()  # before the measurement: freeing the previous gradients inside it would lower the count
        value = []

        def forward_backward(f=f, value=value):
            value.append(loss_of(f))
            value[0].backward()

        peaks[name] = peak_bytes(forward_backward, device)
        result = [value[0].detach().float()] + [x.grad.float() for x in inputs]
        if reference is None:
            reference = result
        for what, a, b in zip(["loss"] + [f"gradient {i}" for i in range(len(inputs))], result, reference):
            assert_agree(a, b, 2e-2 if inputs[0].dtype in (torch.bfloat16, torch.float16) else 2e-4, f"{name}: {what}")
        agree[name] = True
        del value, result
    clear()
    kept = {}
    for name, f in fns.items():
        try:
            kept[name] = saved_bytes(lambda f=f: loss_of(f), inputs)[1]
        except RuntimeError:  # torch.func (Liger) refuses saved-tensor hooks; its peak still counts
            kept[name] = None
    times = interleaved({name: (lambda f=f: run(f)) for name, f in fns.items()}, repeats, warmup=0)
    clear()
    base = next(iter(fns))
    res = {"agree_with_naive": agree, "peak_bytes": peaks, "kept_for_backward_bytes": kept,
           "median_s": {k: statistics.median(v) for k, v in times.items()}, "times_s": times}
    res["peak_ratio"] = {k: peaks[k] / peaks[base] for k in fns if k != base}
    res["time_ratio"] = {k: res["median_s"][k] / res["median_s"][base] for k in fns if k != base}
    return res


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up: the tiny world, its tokenized data, a world-of-one process group
# ---------------------------------------------------------------------------------------------------------------

def setup(args, work):
    """The tiny world (built or re-used), the training config of its defaults, tokenized pairs and the device."""
    from transformers import AutoTokenizer
    with quiet():
        paths = tiny.build_tiny_world(args.tiny_world)
    train_file = paths["train"]
    if args.quick:  # a few pairs are enough, and tokenize in a moment
        train_file = os.path.join(work, "train-quick.jsonl")
        with open(paths["train"]) as src, open(train_file, "w") as dst:
            dst.writelines(itertools.islice(src, 256))
    model = paths["llama-tiny" if args.quick else "llama-small"]
    shapes = {k: v for k, v in tiny.TRAIN_DEFAULTS.items() if k in ("max_length", "max_prompt_length",
                                                                    "global_batch_size", "micro_batch_size", "lr")}
    cfg = train.Config(method="simpo", model=model, data=train_file, device="cpu", dtype="fp32",
                       cache_dir=args.cache_dir or os.path.join(work, "cache"), **shapes)
    _, _, device = init_distributed(cfg.device, args.threads)  # a world of one, as python train.py
    set_threads(args.threads)  # init_distributed sets OMP_NUM_THREADS threads for a world of one
    tokenizer = AutoTokenizer.from_pretrained(model)
    pad_id = data.pad_id(tokenizer)
    with quiet():
        ds = train.prepare_data(cfg, train.METHODS[cfg.method], tokenizer, "")["train"]
    return {"paths": paths, "model": model, "train_file": train_file, "cfg": cfg, "device": device, "ds": ds,
            "pad_id": pad_id, "work": work}


# ---------------------------------------------------------------------------------------------------------------
# Item 1: step time of the selective methods over their base objectives
# ---------------------------------------------------------------------------------------------------------------

STEP_METHODS = ["simpo", "confpo", "confpo_rand", "sepo", "dpo", "confpo_dpo"]
STEP_RATIOS = {"confpo": "simpo", "confpo_rand": "simpo", "sepo": "simpo", "confpo_dpo": "dpo"}


def bench_steps(ctx, repeats, warmup):
    """One training step as train.py takes it (micro_step, backward, gradient clipping, AdamW step, zero_grad) per
    method, on the same model (as train.py loads it in a world of one), reference and batch. lr = 0, so every step
    sees the same weights and does the same work. SePO's selection is precomputed as score.py writes it (30% of
    each response: the top of random scores for chosen, the bottom for rejected), so no oracle runs."""
    cfg, device = ctx["cfg"], ctx["device"]
    mesh = models.make_mesh(cfg, 1, device)
    with quiet():
        policy = models.load_model(ctx["model"], cfg, mesh, device, trainable=True)
        ref = models.load_model(ctx["model"], cfg, mesh, device, trainable=False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.0)
    batch = train.collate(ctx["ds"], range(cfg.micro_batch_size), ctx["pad_id"], train.METHODS["simpo"], device)
    B = cfg.micro_batch_size
    response = batch["labels"] != -100
    scores = torch.randn(response.shape, generator=torch.Generator().manual_seed(0))
    batch["select"] = torch.cat([sepo.select_tokens(scores[:B], response[:B], 0.3),
                                 sepo.select_tokens(scores[B:], response[B:], 0.3, highest=False)]).long()
    losses_seen = {}

    def step(name):
        method = train.METHODS[name]
        per_pair, _ = train.micro_step(method, policy, ref if method.reference else None, batch, {}, (0, 0))
        per_pair.mean().backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses_seen[name] = float(per_pair.detach().mean())

    # The objective alone, the only part of a step that differs between methods: micro_step with models that hand
    # back this batch's log-probs (a leaf that takes the gradient), so its cost does not depend on the model's size.
    with torch.no_grad():
        logps, mask = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])

    def objective(name):
        def cached(**inputs):
            return logps.clone().requires_grad_(), mask

        per_pair, _ = train.micro_step(train.METHODS[name], cached, cached, batch, {}, (0, 0))
        per_pair.mean().backward()

    times = interleaved({m: (lambda m=m: step(m)) for m in STEP_METHODS}, repeats, warmup)
    objective_times = interleaved({m: (lambda m=m: objective(m)) for m in STEP_METHODS}, 5 * repeats, warmup)
    med = {m: statistics.median(t) for m, t in times.items()}
    obj = {m: statistics.median(t) for m, t in objective_times.items()}
    return {"model": os.path.basename(ctx["model"]), "pairs": B,
            "tokens": int(train.forwarded_tokens(train.METHODS["simpo"], batch)),
            "loss": losses_seen, "losses_finite": all(math.isfinite(v) for v in losses_seen.values()),
            "median_s": med, "times_s": times, "ratio": {m: med[m] / med[b] for m, b in STEP_RATIOS.items()},
            "baseline": STEP_RATIOS, "objective_median_s": obj,
            "ratio_of_minimums": {m: min(times[m]) / min(times[b]) for m, b in STEP_RATIOS.items()},
            "objective_extra_s": {m: obj[m] - obj[b] for m, b in STEP_RATIOS.items()}}


# ---------------------------------------------------------------------------------------------------------------
# Item 3: training throughput, train.py against TRL (and the training side of item 5)
# ---------------------------------------------------------------------------------------------------------------

def trl_status():
    """None if TRL's DPOTrainer and CPOTrainer import, else the reason."""
    try:
        from trl import DPOTrainer  # noqa: F401 (TRL 1.x places them here)
        from trl.experimental.cpo import CPOTrainer  # noqa: F401
        return None
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def ours_throughput(ctx, method, steps, warmup):
    """train.py's own loop (train.train) for `steps` optimizer steps of the tiny defaults (32 pairs = 4 micro-steps
    of 8), logging every step, no evaluation or export: per-step tokens/s as train.py itself measures and logs them
    (tokens read by the policy / wall time since the previous step), the first `warmup` steps dropped."""
    out = tempfile.mkdtemp(prefix=f"ours-{method}-", dir=ctx["work"])
    cfg = dataclasses.replace(ctx["cfg"], method=method, output_dir=out, max_steps=steps, log_every=1,
                              eval_every=10**9, save_every=0, export=False, judge="none", resume=False)
    with quiet():
        train.train(cfg, {}, 0, 1, ctx["device"])
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh if '"split": "train"' in line]
    shutil.rmtree(out, ignore_errors=True)
    return [(line["tokens"], line["tokens"] / line["tokens_per_s"]) for line in lines[warmup:]]


def trl_throughput(ctx, kind, steps, warmup):
    """TRL's own Trainer loop (trainer.train) for `steps` steps with the same model, pairs (rendered with the same
    chat template), batch (8 pairs x 4 accumulation steps), max_length, learning rate, AdamW (torch, not fused, as
    train.py on CPU), gradient clipping and threads; fp32 on CPU, dropout off, no evaluation, saving or reporting.
    A step's time is the wall time between TRL's consecutive on_step_end callbacks; its tokens are the non-padding
    tokens of the micro-batches passed to training_step. Returns [(tokens, seconds)] after `warmup` steps."""
    cfg = ctx["cfg"]
    accumulation = cfg.global_batch_size // cfg.micro_batch_size
    with open(ctx["train_file"]) as fh:
        rows = [json.loads(line) for line in itertools.islice(fh, steps * cfg.global_batch_size)]
    out = tempfile.mkdtemp(prefix=f"trl-{kind}-", dir=ctx["work"])
    common = dict(output_dir=out, per_device_train_batch_size=cfg.micro_batch_size,
                  gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=cfg.lr,
                  lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.grad_clip,
                  optim="adamw_torch", max_length=cfg.max_length, use_cpu=True, bf16=False, fp16=False,
                  report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, dataloader_pin_memory=False, seed=cfg.seed,
                  gradient_checkpointing=cfg.activation_checkpointing)  # TRL 1.x turns it on by default
    tokens, ends = trl_train("simpo" if kind == "cpo_simpo" else "dpo", ctx["model"], rows, common)
    shutil.rmtree(out, ignore_errors=True)
    per_step = [sum(tokens[i * accumulation:(i + 1) * accumulation]) for i in range(len(ends) - 1)]
    return [(per_step[i], ends[i + 1] - ends[i]) for i in range(max(1, warmup), len(ends) - 1)]


def trl_train(method, model_path, rows, common):
    """TRL 1.x trains `model_path` on `rows` (conversational: rendered with the model's chat template, as
    data.tokenize_preferences does) with the TrainingArguments `common`: CPOTrainer(loss_type="simpo", cpo_alpha=0,
    simpo_gamma=1, beta=2: pure SimPO as losses.simpo_loss's defaults) or DPOTrainer (beta 0.1, a reference model run
    every step, as train.py). -> (non-padding tokens of each micro-batch passed to training_step, [the time training
    started] + the time of each on_step_end)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    ends, tokens = [], []

    class StepEnds(TrainerCallback):  # Trainer's hooks: training starts, each optimizer step is done
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        if method == "simpo":
            args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common)
            trainer = CPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        else:
            trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, **common), train_dataset=pairs,
                                 processing_class=tokenizer)
        trainer.add_callback(StepEnds())
        training_step = trainer.training_step

        def counting_step(model, inputs, *a, **kw):  # non-padding tokens of chosen and rejected rows
            tokens.append(sum(int(v.sum()) for k, v in inputs.items()
                              if k.endswith("attention_mask") and not k.startswith("prompt")))
            return training_step(model, inputs, *a, **kw)

        trainer.training_step = counting_step
        trainer.train()
    return tokens, ends


def bench_throughput(ctx, rounds, steps, warmup, score_pairs):
    """Items 3 and 5, interleaved: each round runs ours (SimPO, DPO), TRL's (CPO-SimPO, DPO) and score.py's scoring,
    in an order rotated every round. Per-step tokens/s, median over rounds and steps."""
    have_trl = trl_status() is None
    runs = {"ours_simpo": lambda: ours_throughput(ctx, "simpo", steps, warmup),
            "ours_dpo": lambda: ours_throughput(ctx, "dpo", steps, warmup),
            "score": lambda: score_throughput(ctx, score_pairs)}
    if have_trl:
        runs["trl_cpo_simpo"] = lambda: trl_throughput(ctx, "cpo_simpo", steps, warmup)
        runs["trl_dpo"] = lambda: trl_throughput(ctx, "dpo", steps, warmup)
    samples = {name: [] for name in runs}
    threads = torch.get_num_threads()
    names = list(runs)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            set_threads(threads)
            samples[name] += runs[name]()
    tok_s = {name: statistics.median([t / s for t, s in xs]) for name, xs in samples.items()}
    tokens = {name: statistics.median([t for t, _ in xs]) for name, xs in samples.items()}
    item3 = {"model": os.path.basename(ctx["model"]), "rounds": rounds, "steps_per_round": steps,
             "warmup_steps": warmup, "pairs_per_step": ctx["cfg"].global_batch_size,
             "micro_batch_pairs": ctx["cfg"].micro_batch_size, "max_length": ctx["cfg"].max_length,
             "tokens_per_s": {k: v for k, v in tok_s.items() if k != "score"},
             "median_tokens_per_step": {k: v for k, v in tokens.items() if k != "score"},
             "samples": {k: v for k, v in samples.items() if k != "score"}}
    if have_trl:
        import trl
        item3["trl_version"] = trl.__version__
        item3["ratio"] = {"simpo": tok_s["ours_simpo"] / tok_s["trl_cpo_simpo"],
                          "dpo": tok_s["ours_dpo"] / tok_s["trl_dpo"]}
    else:
        item3["skipped"] = f"{SKIP_TRL}: {trl_status()}"
    item5 = {"model": os.path.basename(ctx["model"]), "pairs_scored": score_pairs, "score_tokens_per_s": tok_s["score"],
             "train_tokens_per_s": tok_s["ours_simpo"], "train_method": "simpo", "samples": samples["score"],
             "ratio": tok_s["score"] / tok_s["ours_simpo"],
             "scoring_cost_in_epochs": tok_s["ours_simpo"] / tok_s["score"]}
    return item3, item5


# ---------------------------------------------------------------------------------------------------------------
# Item 5: score.py's scoring pass
# ---------------------------------------------------------------------------------------------------------------

def score_throughput(ctx, n_pairs):
    """score.score_blocks over the first n_pairs of the tokenized training pairs, oracle = reference = the tiny
    model (the cost does not depend on the weights): both models loaded, every pair forwarded through both (no
    gradient) in batches of score.py's default 8 pairs, token scores written to a shard. Tokenization and the merge
    into selection files are not timed. Returns [(tokens, seconds)]."""
    out = tempfile.mkdtemp(prefix="score-", dir=ctx["work"])
    cfg = score.ScoreConfig(oracle=ctx["model"], reference=ctx["model"], data=ctx["train_file"], output_dir=out,
                            max_length=ctx["cfg"].max_length, max_prompt_length=ctx["cfg"].max_prompt_length,
                            shard_size=n_pairs, device="cpu", dtype="fp32")
    pairs = ctx["ds"].select(range(min(n_pairs, len(ctx["ds"]))))
    tokens = sum(len(a) + len(b) for a, b in zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"]))
    with quiet():
        t0 = time.perf_counter()
        score.score_blocks(cfg, score.shards(cfg, pairs), [0], pairs, ctx["pad_id"], 0, ctx["device"])
        seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return [(tokens, seconds)]


# ---------------------------------------------------------------------------------------------------------------
# Item 4: FSDP memory per rank, 2 ranks over 1 (torchrun on this file's hidden sub-command)
# ---------------------------------------------------------------------------------------------------------------

def fsdp_worker(argv):
    """Under torchrun: load the model with train.py's FSDP2 set-up, take one AdamW step on a random batch, and
    count on each rank the bytes of the local shards (DTensor.to_local()) of parameters, gradients and optimizer
    state. Rank 0 writes them all to --out."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    cfg = train.Config(model=args.model, device="cpu", dtype="fp32")
    rank, world, device = init_distributed(cfg.device)
    policy = models.load_model(args.model, cfg, models.make_mesh(cfg, world, device), device, trainable=True)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, policy.model.config.vocab_size, (4, 32), generator=gen)
    labels = ids.clone()
    labels[:, :8] = -100
    logps, mask = policy(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    (-(logps * mask).sum() / mask.sum()).backward()
    optimizer.step()

    def local_bytes(t):
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()

    mine = {"params": sum(local_bytes(p) for p in policy.parameters()),
            "grads": sum(local_bytes(p.grad) for p in policy.parameters() if p.grad is not None),
            "optimizer_state": sum(local_bytes(v) for s in optimizer.state.values() for v in s.values()
                                   if torch.is_tensor(v)),
            "n_params": sum(p.numel() for p in policy.parameters())}
    mine["total"] = mine["params"] + mine["grads"] + mine["optimizer_state"]
    every = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        write_json(args.out, {"world": world, "ranks": every})
    end_group()  # a barrier first: see utils.end_group


def bench_fsdp(ctx):
    """Run fsdp_worker with 1 and 2 ranks (torchrun, gloo); the ratio is the largest rank's total with 2 ranks over
    the 1-rank total."""
    result = {"model": os.path.basename(ctx["model"])}
    for n in (1, 2):
        out = os.path.join(ctx["work"], f"fsdp-{n}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.abspath(__file__), "_fsdp_worker", "--model", ctx["model"], "--out", out]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun with {n} ranks failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        with open(out) as fh:
            result[f"ranks_{n}"] = json.load(fh)["ranks"]
    one = result["ranks_1"][0]
    worst = max(result["ranks_2"], key=lambda r: r["total"])
    result["ratio"] = worst["total"] / one["total"]
    result["ratio_by_kind"] = {k: worst[k] / one[k] for k in ("params", "grads", "optimizer_state")}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Items 6-8: real shapes. SmolLM2-135M's architecture, built from its config in code (no download, random
# weights), with the tiny world's tokenizer (the shapes are what cost: V = 49,152, 30 layers, hidden 576). Every
# run is a process of its own (`python bench.py _real_worker ...`), so that its peak RSS is its own.
# ---------------------------------------------------------------------------------------------------------------

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True)  # HuggingFaceTB/SmolLM2-135M-Instruct's config.json
REAL_PAIRS_PER_STEP = 4  # as the measurements of issue 15: 4 pairs (8 rows) per optimizer step, one micro-step


def real_model(work, tokenizer_path, quick):
    """SmolLM2-135M's architecture (quick: 2 layers of it) with random weights (seed 0), saved with the tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    path = os.path.join(work, "smollm2-135m-random")
    if not os.path.exists(os.path.join(path, "config.json")):
        tok = AutoTokenizer.from_pretrained(tokenizer_path)
        torch.manual_seed(0)
        config = LlamaConfig(**{**SMOL, **({"num_hidden_layers": 2} if quick else {})}, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(config).save_pretrained(path)
        tok.save_pretrained(path)
    return path


def long_pairs(work, tokens, n):
    """n pairs whose prompt and responses are long enough that every row is cut to `tokens` (the same lengths
    for every method and for TRL), from the synthetic task's words -> the JSONL file's path."""
    import random
    rng = random.Random(0)
    words = [w for p in tiny.synthetic_pairs(50, 0) for w in (p["prompt"] + " " + p["chosen"]).split()]
    text = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    path = os.path.join(work, f"pairs-{tokens}.jsonl")
    with open(path, "w") as fh:
        for _ in range(n):
            fh.write(json.dumps({"prompt": text(tokens // 3), "chosen": text(tokens), "rejected": text(tokens)}) + "\n")
    return path


def real_worker(argv):
    """One measured run in this process: train.py itself (ours), or TRL's trainer, for --steps optimizer steps;
    writes to --out (JSON): tokens/s of each step after the first (each side's own non-padding tokens), the peak RSS
    of the process, and with --profile the allocator's peak bytes (the profiler's CPU memory events over the whole
    run, loading included)."""
    parser = argparse.ArgumentParser()
    for flag in ("--kind", "--method", "--model", "--data", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--ac", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", type=int, default=0)
    parser.add_argument("--lora", type=int, default=0)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    run = trl_run if args.kind == "trl" else ours_run
    if args.profile:
        done = []
        peak = peak_bytes(lambda: done.append(run(args)))
        steps = done[0]
    else:
        steps, peak = run(args), None
    rss = resource_peak_rss()
    with open(args.out, "w") as fh:
        json.dump({"steps": steps, "peak_rss": rss, "allocator_peak": peak}, fh)


def resource_peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def ours_run(args):
    """train.py's own loop on the pairs -> [(tokens, seconds)] per step, as it logs them."""
    out = tempfile.mkdtemp(prefix="ours-", dir=os.path.dirname(args.out))
    method = {"dpo_once": "dpo"}.get(args.method, args.method)
    argv = ["--model", args.model, "--data", args.data, "--method", method, "--output_dir", out, "--max_length",
            str(args.seq), "--max_prompt_length", str(args.seq // 4), "--global_batch_size", str(REAL_PAIRS_PER_STEP),
            "--micro_batch_size", str(REAL_PAIRS_PER_STEP), "--max_steps", str(args.steps), "--log_every", "1",
            "--save_every", "0", "--save_final", "false", "--export", "false", "--judge", "none", "--lr", "1e-6",
            "--threads", str(args.threads), "--device", "cpu", "--dtype", "fp32", "--warmup_ratio", "0"]
    argv += ["--activation_checkpointing", "true" if args.ac else "false", "--lora_r", str(args.lora)]
    argv += ["--precompute_ref", "true"] if args.method == "dpo_once" else []
    if method == "sepo":
        argv += ["--selections", random_selections(args, out)]
    with quiet():
        train.main(argv)
    lines = [line for line in rundir.read_metrics(os.path.join(out, "metrics.jsonl")) if line["split"] == "train"]
    shutil.rmtree(out, ignore_errors=True)
    return [(line["tokens"], line["tokens"] / line["tokens_per_s"]) for line in lines]


def random_selections(args, out):
    """A selection file for the pairs as score.py writes one: 30% of each response (random scores, Eq. 25)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(args.model)
    pairs, _ = data.tokenize_preferences(data.load_preferences(args.data), tok, args.seq, args.seq // 4)
    # beside the run's folder, not in it: train.py refuses a new run's folder that holds files it did not write
    gen, path = torch.Generator().manual_seed(0), os.path.join(os.path.dirname(out), f"selections-{args.seq}.jsonl")
    with open(path, "w") as fh:
        for ex in pairs:
            row = {"row": ex["row"]}
            for side, highest in (("chosen", True), ("rejected", False)):
                n = len(data.response_part(ex, side, "labels"))
                picked = sepo.select_tokens(torch.rand(1, n, generator=gen), torch.ones(1, n, dtype=torch.bool), 0.3,
                                            highest)[0]
                row[f"{side}_n"], row[f"{side}_selected"] = n, picked.nonzero().squeeze(-1).tolist()
            fh.write(json.dumps(row) + "\n")
    return path


def trl_run(args):
    """TRL 1.x's trainer on the same pairs (conversational: rendered with the same chat template), batch, max
    length, AdamW (torch), fp32, threads, dropout off, gradient checkpointing as --ac -> [(tokens, seconds)]."""
    with open(args.data) as fh:
        rows = [json.loads(line) for line in fh]
    out = tempfile.mkdtemp(prefix="trl-", dir=os.path.dirname(args.out))
    common = dict(output_dir=out, per_device_train_batch_size=REAL_PAIRS_PER_STEP, gradient_accumulation_steps=1,
                  max_steps=args.steps, learning_rate=1e-6, max_length=args.seq, optim="adamw_torch", use_cpu=True,
                  bf16=False, fp16=False, report_to=[], save_strategy="no", eval_strategy="no",
                  logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False,
                  gradient_checkpointing=bool(args.ac), max_grad_norm=1.0, seed=0)
    tokens, ends = trl_train("simpo" if args.method == "simpo" else "dpo", args.model, rows, common)
    shutil.rmtree(out, ignore_errors=True)
    return [(tokens[i], ends[i + 1] - ends[i]) for i in range(len(tokens))]


# (methods, activation checkpointing settings) per length. At 1024 tokens SimPO and DPO without checkpointing only:
# a run there takes about 7 minutes on 2 cores, and every method in both settings would add more than an hour.
REAL_RUNS = {256: (["simpo", "confpo", "sepo", "dpo", "dpo_once"], (0, 1)), 1024: (["simpo", "dpo"], (0,))}
PROFILED_RUNS = {256: ["simpo"]}  # the allocator's peak over a whole run (a second, profiled run of each side)


def bench_real(ctx, quick, threads):
    """Items 6 and 7: tokens/s and peak memory of train.py against TRL at 256 and 1024 tokens (REAL_RUNS), with
    activation checkpointing off and on for both (TRL's gradient checkpointing), each run a process of its own, in turns
    (ours, TRL, ours, TRL, ...). The first step of every run is dropped. DPO also with --precompute_ref
    (`dpo_once`: the reference's pass is done before the timed steps, its cost reported apart)."""
    work = ctx["work"]
    model = real_model(work, ctx["paths"]["tokenizer"], quick)
    have_trl = trl_status() is None
    runs = REAL_RUNS if not quick else {64: (["simpo", "sepo", "dpo_once"], (0,))}
    result = {"model": "SmolLM2-135M architecture" + (" (2 layers: --quick)" if quick else ""), "runs": {},
              "pairs_per_step": REAL_PAIRS_PER_STEP, "threads": threads, "trl": have_trl or trl_status()}
    for seq, (methods, settings) in runs.items():
        pairs = long_pairs(work, seq, REAL_PAIRS_PER_STEP * 4)
        for ac in settings:
            order = [("ours", m) for m in methods]
            if have_trl:  # in turns: ours, TRL, ours, TRL, ...
                theirs = [("trl", "simpo"), ("trl", "dpo")]
                order = [x for pair in itertools.zip_longest(order, theirs) for x in pair if x]
            for kind, method in order:
                key = f"{kind}_{method}_T{seq}_ac{ac}"
                result["runs"][key] = real_subprocess(kind, method, model, pairs, seq, ac, 2 if quick else 3, threads,
                                                      work)
                print(f"    {key}: {result['runs'][key]['tokens_per_s']:.0f} tok/s, peak RSS "
                      f"{result['runs'][key]['peak_rss'] / 2**30:.2f} GiB", flush=True)
    if have_trl and not quick:  # the allocator's peak over a whole run, checkpointing off
        for seq, methods in PROFILED_RUNS.items():
            for kind, method in [(kind, m) for m in methods for kind in ("ours", "trl")]:
                key = f"{kind}_{method}_T{seq}_ac0"
                if key not in result["runs"]:
                    continue
                result["runs"][key]["allocator_peak"] = real_subprocess(
                    kind, method, model, long_pairs(work, seq, REAL_PAIRS_PER_STEP * 4), seq, 0, 2, threads, work,
                    profile=True)["allocator_peak"]
    result["ratios"] = real_ratios(result["runs"])
    return result


def real_subprocess(kind, method, model, pairs, seq, ac, steps, threads, work, profile=False, lora=0):
    out = os.path.join(work, f"real-{kind}-{method}-{seq}-{ac}-{int(profile)}-{lora}.json")
    cmd = [sys.executable, os.path.abspath(__file__), "_real_worker", "--kind", kind, "--method", method, "--model",
           model, "--data", pairs, "--out", out, "--seq", str(seq), "--ac", str(ac), "--steps", str(steps),
           "--threads", str(threads), "--profile", str(int(profile)), "--lora", str(lora)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(cmd, env=env, cwd=HERE, capture_output=True, text=True, timeout=7200)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {method} at {seq} tokens failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    with open(out) as fh:
        r = json.load(fh)
    timed = r["steps"][1:] or r["steps"]
    r["tokens_per_s"] = sum(t for t, _ in timed) / sum(s for _, s in timed)
    return r


def bench_lora(ctx, quick, threads):
    """Item 12: DPO with LoRA (--lora_r 8, the reference = the policy with its adapters off) against full DPO (a
    frozen reference beside the policy) on SmolLM2-135M's shapes at 256 tokens, each run a process of its own, in
    turns: tokens/s and peak RSS, activation checkpointing off for both."""
    model = real_model(ctx["work"], ctx["paths"]["tokenizer"], quick)
    seq = 64 if quick else 256
    pairs = long_pairs(ctx["work"], seq, REAL_PAIRS_PER_STEP * 4)
    runs = {}
    for r in range(1 if quick else 2):
        for lora in (0, 8):
            run = real_subprocess("ours", "dpo", model, pairs, seq, 0, 2 if quick else 3, threads, ctx["work"],
                                  lora=lora)
            runs.setdefault(f"lora{lora}", []).append(run)
    best = {k: {"tokens_per_s": max(r["tokens_per_s"] for r in v), "peak_rss": min(r["peak_rss"] for r in v)}
            for k, v in runs.items()}
    return {"model": "SmolLM2-135M architecture" + (" (2 layers: --quick)" if quick else ""), "seq": seq,
            "runs": best, "peak_ratio": best["lora8"]["peak_rss"] / best["lora0"]["peak_rss"],
            "speed_ratio": best["lora8"]["tokens_per_s"] / best["lora0"]["tokens_per_s"]}


def real_ratios(runs):
    """ours / TRL: tokens/s and peak RSS (and allocator peak where measured), per method, length and setting.
    ConfPO and SePO are compared with TRL's SimPO (TRL has neither), DPO with and without --precompute_ref with
    TRL's DPO."""
    out = {}
    for key, r in runs.items():
        kind, method, seq, ac = key.split("_", 1)[0], *key.split("_", 1)[1].rsplit("_", 2)
        if kind != "ours":
            continue
        theirs = runs.get(f"trl_{'dpo' if method.startswith('dpo') else 'simpo'}_{seq}_{ac}")
        if theirs:
            out[key] = {"tokens_per_s": r["tokens_per_s"] / theirs["tokens_per_s"],
                        "peak_rss": r["peak_rss"] / theirs["peak_rss"]}
            if r.get("allocator_peak") and theirs.get("allocator_peak"):
                out[key]["allocator_peak"] = r["allocator_peak"] / theirs["allocator_peak"]
    return out


def breakdown_worker(argv):
    """Where the memory of one SimPO (or DPO) step goes, at real shapes, in this process (item 8): train.py's
    model in a world of one, the same under FSDP2 in a world of one (how train.py ran before), and the plain
    Hugging Face model computing full logits (as TRL does). Peak live bytes of the allocator in each phase (load,
    forward, backward, optimizer step), from the profiler's memory events; and by owner: parameters, gradients,
    optimizer state, the reference model, the activations the forward saves (counted by a saved-tensors hook),
    and the rest at the peak (transients: log-prob blocks or logits, FSDP's unsharded copies, temporaries)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers import AutoModelForCausalLM
    parser = argparse.ArgumentParser()
    for flag in ("--variant", "--method", "--model", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--seq", type=int, required=True)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    cfg = train.Config(model=args.model, device="cpu", dtype="fp32")
    init_distributed("cpu", args.threads)
    device, B, T = torch.device("cpu"), REAL_PAIRS_PER_STEP, args.seq
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 600, (2 * B, T), generator=gen)
    labels = ids.clone()
    labels[:, :T // 4] = -100

    def load(trainable):
        if args.variant == "hf":
            model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
            model.train(trainable)
            return model.requires_grad_(trainable)
        model = models.load_model(args.model, cfg, models.make_mesh(cfg, 1, device), device, trainable)
        if args.variant == "ours_fsdp":  # train.py's world of one before: FSDP2 around the same model
            models.shard(model, models.make_mesh(cfg, 1, device), torch.distributed.fsdp.MixedPrecisionPolicy(
                param_dtype=torch.float32, reduce_dtype=torch.float32), trainable, args.model)
        return model

    def logps_of(model):
        if args.variant == "hf":  # full logits, log-softmax, gather: what a trainer without our path computes
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1]
            mask = torch.nn.functional.pad(labels[:, 1:] != -100, (1, 0))
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
            return torch.nn.functional.pad(lp, (1, 0)), mask
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)

    rss0 = resource_peak_rss()
    with no_fd2_output(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("phase:load"):
            policy = load(True)
            ref = load(False) if args.method == "dpo" else None
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
        saved = {"bytes": 0, "seen": set()}
        param_storage = {(p.to_local() if hasattr(p, "to_local") else p).untyped_storage().data_ptr()
                         for p in policy.parameters() if p.device.type != "meta"}  # FSDP's: its local shards

        def pack(t):  # each tensor the forward keeps for backward, counted once, parameters aside
            key = t.untyped_storage().data_ptr()
            if key not in saved["seen"] and key not in param_storage:
                saved["seen"].add(key)
                saved["bytes"] += t.untyped_storage().nbytes()
            return t
        for step in range(2):  # the first builds the optimizer state; the second is the one measured
            with record_function(f"phase:forward{step}"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                saved["bytes"], saved["seen"] = 0, set()
                lp, mask = logps_of(policy)
                if ref is not None:
                    with torch.no_grad():
                        ref_lp, _ = logps_of(ref)
                    loss, _ = losses.dpo_loss(lp[:B], mask[:B], lp[B:], mask[B:], ref_lp[:B], ref_lp[B:])
                else:
                    loss, _ = losses.simpo_loss(lp[:B], mask[:B], lp[B:], mask[B:])
            with record_function(f"phase:backward{step}"):
                loss.mean().backward()
                grads = sum(p.grad.numel() * p.grad.element_size() for p in policy.parameters() if p.grad is not None)
            with record_function(f"phase:optimizer{step}"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    events = prof.profiler.kineto_results.events()
    memory = sorted(((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"
                     and e.device_type() == torch.autograd.DeviceType.CPU))
    phases = {e.name().split(":", 1)[1]: (e.start_ns(), e.start_ns() + e.duration_ns()) for e in events
              if e.name().startswith("phase:")}
    live, peaks, t_peak, overall = 0, {}, None, 0
    for t, nbytes in memory:
        live += nbytes
        for name, (a, b) in phases.items():
            if a <= t <= b:
                peaks[name] = max(peaks.get(name, 0), live)
        if live > overall and phases["forward1"][0] <= t:
            overall, t_peak = live, t
    size = lambda params: sum(p.numel() * p.element_size() for p in params)  # noqa: E731
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    owners = {"parameters": size(local(p) for p in policy.parameters()),
              "optimizer_state": sum(size([local(v)]) for s in optimizer.state.values() for v in s.values()
                                     if torch.is_tensor(v) and v.dim()),
              "reference": size(local(p) for p in ref.parameters()) if ref is not None else 0,
              "gradients": grads, "activations_saved": saved["bytes"]}
    at_peak = "backward1" if phases["backward1"][0] <= t_peak <= phases["backward1"][1] else "forward1" \
        if phases["forward1"][0] <= t_peak <= phases["forward1"][1] else "optimizer1"
    with open(args.out, "w") as fh:
        json.dump({"variant": args.variant, "method": args.method, "seq": T, "peaks": {
            "load": peaks.get("load", 0), "forward": peaks.get("forward1", 0), "backward": peaks.get("backward1", 0),
            "optimizer": peaks.get("optimizer1", 0)}, "peak": overall, "peak_in": at_peak, "owners": owners,
            "peak_rss": resource_peak_rss(), "rss_before_load": rss0}, fh)
    end_group()


def bench_breakdown(ctx, quick, threads):
    """Item 8: the memory breakdown of one step, for each variant and method, at 256 tokens."""
    model = real_model(ctx["work"], ctx["paths"]["tokenizer"], quick)
    out = {}
    for method in ("simpo", "dpo") if not quick else ("simpo",):
        for variant in ("ours", "ours_fsdp", "hf") if not quick else ("ours", "hf"):
            path = os.path.join(ctx["work"], f"breakdown-{variant}-{method}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "_breakdown_worker", "--variant", variant, "--method",
                   method, "--model", model, "--out", path, "--seq", str(64 if quick else 256), "--threads",
                   str(threads)]
            proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, cwd=HERE,
                                  capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise RuntimeError(f"breakdown {variant} {method} failed:\n{proc.stderr[-3000:]}")
            with open(path) as fh:
                out[f"{variant}_{method}"] = json.load(fh)
    return out


def load_worker(argv):
    """Under torchrun (item 9): load the policy as train.py does (--way new: rank 0 reads, the others build on
    meta and keep their shards of the broadcast) or as it did before (--way old: every rank reads the whole
    checkpoint, then shards it), and record every rank's peak RSS before and after."""
    parser = argparse.ArgumentParser()
    for flag in ("--way", "--model", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    cfg = train.Config(model=args.model, device="cpu", dtype="fp32")
    rank, world, device = init_distributed("cpu", 1)
    before = resource_peak_rss()
    mesh = models.make_mesh(cfg, world, device)
    if args.way == "new":
        policy = models.load_model(args.model, cfg, mesh, device, trainable=True)
    else:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        policy = models.PolicyLogps(model, "chunked", 0)
        models.shard(policy, mesh, torch.distributed.fsdp.MixedPrecisionPolicy(param_dtype=torch.float32,
                                                                             reduce_dtype=torch.float32), True,
                     args.model)
    shard = sum(p.to_local().numel() * 4 for p in policy.parameters())
    every = [None] * world
    torch.distributed.all_gather_object(every, {"before": before, "after": resource_peak_rss(), "shard": shard})
    if rank == 0:
        write_json(args.out, every)
    end_group()


def bench_load(ctx, quick):
    """Item 9: summed peak host memory of 2 ranks loading the policy, the new way and the old, over one full model
    plus its shards (what loading must at least hold); the growth of each rank's peak RSS while loading."""
    model = real_model(ctx["work"], ctx["paths"]["tokenizer"], quick)
    full = sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model) if f.endswith(".safetensors"))
    out = {"model_bytes": full}
    for way in ("old", "new"):
        path = os.path.join(ctx["work"], f"load-{way}.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.abspath(__file__), "_load_worker", "--way", way, "--model", model, "--out", path]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=HERE, capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"loading ({way}) failed:\n{proc.stderr[-3000:]}")
        with open(path) as fh:
            ranks = json.load(fh)
        grown = sum(r["after"] - r["before"] for r in ranks)
        out[way] = {"ranks": ranks, "summed_growth": grown,
                    "over_model_and_shards": grown / (full + sum(r["shard"] for r in ranks))}
    out["ratio"] = out["new"]["summed_growth"] / out["old"]["summed_growth"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Also: SePO's selection, vectorised against a loop
# ---------------------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------------------
# Item 10: generation, onpolicy.py's sampler against a loop of model.generate(num_return_sequences=K)
# ---------------------------------------------------------------------------------------------------------------

def bench_generation(ctx, quick, repeats, extra_model="", n_prompts=48):
    """K = 5 samples per prompt (temperature 0.8, top-p 0.95), batches of 8 prompts, on the tiny world's SFT model
    (trained: its answers end at different lengths) and SmolLM2-135M's architecture (random weights: no answer
    ends, every row runs to max_new_tokens), fp32, and bf16 on the real architecture; with extra_model, also that
    model (e.g. the real SmolLM2-135M-Instruct of real_study.py). Tokens are each sample's own, up to its first
    EOS. Before timing, greedy answers of both sides must be equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    K, batch = 5, 8
    prompts = [r["prompt"] for r in data.load_preferences(ctx["paths"]["test"])][:8 if quick else n_prompts]
    with quiet():
        sft = tiny.sft_model(ctx["paths"]["data"].rsplit(os.sep, 1)[0], ctx["paths"], train.main,
                             cache_dir=ctx["cfg"].cache_dir)
    cases = {"tiny SFT, fp32": (sft, torch.float32, 40),
             "SmolLM2-135M arch, fp32": (real_model(ctx["work"], ctx["paths"]["tokenizer"], quick), torch.float32, 64),
             "SmolLM2-135M arch, bf16": (real_model(ctx["work"], ctx["paths"]["tokenizer"], quick), torch.bfloat16,
                                         64)}
    if extra_model:
        cases.update({f"{os.path.basename(extra_model.rstrip('/'))}, {name}": (extra_model, dtype, 64)
                      for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))})
    out = {}
    for name, (path, dtype, new_tokens) in cases.items():
        new_tokens = min(new_tokens, 8) if quick else new_tokens
        tok = AutoTokenizer.from_pretrained(path, padding_side="left")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        eos = models.eos_token_ids(model, tok)
        ids = [data.encode_prompt(data.render_prompt(p, tok, True), tok, 64)[0] for p in prompts]
        batches = [ids[i:i + batch] for i in range(0, len(ids), batch)]
        counted = {}

        def ours(temperature=0.8):
            n, texts = 0, []
            for b, chunk in enumerate(batches):
                seeds = [[models.draw_seed(0, b * batch + j, k) for k in range(K)] for j in range(len(chunk))]
                rows = models.sample(model, chunk, seeds, new_tokens, temperature, 0.95, eos, tok.pad_token_id)
                n += sum(len(t) for row in rows for t, _ in row)
                texts += [row[0][0] for row in rows]
            counted["ours"] = n
            return texts

        def hf(do_sample=True):
            n, texts = 0, []
            for chunk in batches:
                enc = tok.pad({"input_ids": chunk}, return_tensors="pt")
                with torch.no_grad():
                    gen = model.generate(**enc, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id,
                                         eos_token_id=eos, **(dict(do_sample=True, temperature=0.8, top_p=0.95,
                                                                   top_k=0, num_return_sequences=K)
                                                              if do_sample else dict(do_sample=False)))
                answers = gen[:, enc["input_ids"].shape[1]:]
                ended = torch.isin(answers, torch.tensor(eos))
                upto = (ended.int().cumsum(-1) - ended.int()) == 0  # up to and including the first EOS
                n += int(upto.sum())
                texts += [a[m].tolist() for a, m in zip(answers, upto)]
            counted["hf"] = n
            return texts

        assert ours(temperature=0) == hf(do_sample=False), f"{name}: greedy answers differ from model.generate's"
        tokens_per_s = {"ours": [], "hf": []}
        for variant, seconds in interleaved({"ours": ours, "hf": hf}, repeats).items():
            tokens_per_s[variant] = [counted[variant] / s for s in seconds]  # the counts of the same draws
        med = {k: statistics.median(v) for k, v in tokens_per_s.items()}
        out[name] = {"tokens_per_s": med, "samples": tokens_per_s, "ratio": med["ours"] / med["hf"],
                     "prompts": len(prompts), "samples_per_prompt": K, "batch_prompts": batch,
                     "max_new_tokens": new_tokens, "dtype": str(dtype), "greedy_equal": True}
        print(f"    {name}: {med['ours']:.0f} / {med['hf']:.0f} tokens/s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Item 11: micro-batches grouped by length (train.py --group_by_length)
# ---------------------------------------------------------------------------------------------------------------

def bench_grouping(ctx, quick, repeats):
    """Pairs of real lengths, batched as train.py batches them, with and without --group_by_length: the share of
    padding in the micro-batches of one epoch, and the tokens/s of a forward and backward over them (the real
    tokens, padding excluded) on the tiny world's model. The pairs: the real study's on-policy pairs
    (docs/real/train_pairs_*.jsonl) in SmolLM2's tokenizer where runs/real holds its assets, else in the tiny
    world's tokenizer; 4 ranks' shares of a 32-pair step cut into micro-batches of 4, as on 4 GPUs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    root = os.path.dirname(HERE)
    found = sorted(glob.glob(os.path.join(root, "docs", "real", "train_pairs_*.jsonl")))
    source = found[-1] if found else ctx["train_file"]
    smollm = os.path.join(root, "runs", "real", "assets", "smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(smollm if os.path.isdir(smollm) else ctx["model"])
    with quiet():
        ds = data.tokenize_preferences(data.load_preferences(source, cache_dir=ctx["cfg"].cache_dir), tok, 1024,
                                       512)[0]
    if quick:
        ds = ds.select(range(min(64, len(ds))))
    lengths, order, world, step_pairs, micro = data.pair_lengths(ds), data.epoch_order(len(ds), 0, 0), 4, 32, 4
    steps = len(ds) // step_pairs
    model = AutoModelForCausalLM.from_pretrained(ctx["model"]).train()
    vocab = model.config.vocab_size
    out = {"pairs": source.replace(root + os.sep, ""), "tokenizer": os.path.basename(tok.name_or_path), "steps": steps}
    for name, by_length in (("plain", None), ("grouped", lengths)):
        batches = [data.collate_indices(ds, m, data.pad_id(tok)) for s in range(steps) for r in range(world)
                   for m in data.rank_micro_batches(order, s, steps, step_pairs, micro, r, world, by_length)]
        real = sum(int(b["attention_mask"].sum()) for b in batches)
        out[name] = {"padding_share": 1 - real / sum(b["input_ids"].numel() for b in batches), "tokens": real,
                     "batches": batches}

    def run(batches):
        for b in batches[:len(batches) if not quick else 4]:
            ids = b["input_ids"].clamp(max=vocab - 1)  # the tiny model's vocabulary (timing, not quality)
            model(input_ids=ids, attention_mask=b["attention_mask"]).logits.float().logsumexp(-1).mean().backward()
        model.zero_grad(set_to_none=True)
    times = interleaved({k: (lambda k=k: run(out[k]["batches"])) for k in ("plain", "grouped")}, repeats)
    for k in ("plain", "grouped"):
        n = len(out[k]["batches"]) if not quick else 4
        tokens = sum(int(b["attention_mask"].sum()) for b in out[k].pop("batches")[:n])
        out[k]["tokens_per_s"] = tokens / statistics.median(times[k])
    out["speedup"] = out["grouped"]["tokens_per_s"] / out["plain"]["tokens_per_s"]
    return out


def loop_select_tokens(scores, mask, ratio):
    """Eq. 25 one response at a time, as the released scorer does."""
    out = torch.zeros_like(mask)
    for b in range(scores.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        k = int(len(idx) * ratio + 1e-9)
        top = sorted(range(len(idx)), key=lambda i: (-float(scores[b, idx[i]]), i))[:k]
        out[b, idx[top]] = True
    return out


def bench_select(B, T, repeats):
    gen = torch.Generator().manual_seed(2)
    scores = torch.randn(B, T, generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, : T // 4] = False
    same = torch.equal(sepo.select_tokens(scores, mask, 0.3), loop_select_tokens(scores, mask, 0.3))
    assert same, "sepo.select_tokens differs from the loop"
    times = interleaved({"loop": lambda: loop_select_tokens(scores, mask, 0.3),
                         "select_tokens": lambda: sepo.select_tokens(scores, mask, 0.3)}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"B": B, "T": T, "agree": same, "median_s": med, "ratio": med["select_tokens"] / med["loop"]}


# ---------------------------------------------------------------------------------------------------------------
# Report: the table, bench.json
# ---------------------------------------------------------------------------------------------------------------

def machine(threads):
    import transformers
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for name in ("trl", "liger_kernel"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:
            try:
                from importlib.metadata import version
                versions[name] = version(name.replace("_", "-"))
            except Exception:
                versions[name] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": os.getloadavg(), **versions}


def table_rows(results):
    """The printed table's rows (item, variant, measured, ratio, target, met) and the verdicts on the targets."""
    rows, verdicts = [], []

    def add(item, variant, measured, ratio, target=None):
        bound, sense = TARGETS[target] if target else (None, None)
        met = None if target is None else (ratio <= bound if sense == "<=" else ratio >= bound)
        if target:
            verdicts.append({"item": item, "variant": variant, "ratio": ratio, "target": f"{sense} {bound}",
                             "met": met})
        rows.append((item, variant, measured, f"{ratio:.3f}" if ratio >= 0.1 else f"{ratio:.2g}",
                     f"{sense} {bound}" if target else "-", {True: "met", False: "MISSED", None: ""}[met]))

    steps = results.get("1_step_time")
    for m, b in STEP_RATIOS.items() if steps else ():
        ms = steps["median_s"][m] * 1e3, steps["median_s"][b] * 1e3
        add("1 step time", f"{m} / {b}", f"{ms[0]:.1f} / {ms[1]:.1f} ms", steps["ratio"][m], "step_time")
    for m, b in STEP_RATIOS.items() if steps else ():  # what the selection itself costs, whatever the model
        extra = steps["objective_extra_s"][m]
        add("1 objective alone", f"{m} - {b}, share of a {b} step", f"{extra * 1e3:+.2f} ms",
            max(extra, 0.0) / steps["median_s"][b])
    for key, lp in results.get("2_logps", {}).items():
        for path in [p for p in lp if p.startswith("from_")]:
            r, label = lp[path], f"2 logps {key} {path.replace('from_', 'from ').replace('_', ' ')}"
            for name in r["peak_ratio"]:
                ours = name in ("token_logps", "chunked_token_logps")  # at its defaults; the rest inform
                mib = r["peak_bytes"][name] / 2**20, r["peak_bytes"]["naive"] / 2**20
                add(label, f"{name} / naive, peak", f"{mib[0]:.0f} / {mib[1]:.0f} MiB", r["peak_ratio"][name],
                    "peak_memory" if ours else None)
                ms = r["median_s"][name] * 1e3, r["median_s"]["naive"] * 1e3
                add(label, f"{name} / naive, time", f"{ms[0]:.0f} / {ms[1]:.0f} ms", r["time_ratio"][name],
                    "logps_time" if ours else None)
    lo = results.get("12_lora")
    if lo:
        runs = lo["runs"]
        add("12 LoRA DPO", f"--lora_r 8 / full, peak RSS, {lo['model']}, {lo['seq']} tokens",
            f"{runs['lora8']['peak_rss'] / 2**30:.2f} / {runs['lora0']['peak_rss'] / 2**30:.2f} GiB", lo["peak_ratio"])
        add("12 LoRA DPO", "--lora_r 8 / full, tokens/s", f"{runs['lora8']['tokens_per_s']:.0f} / "
            f"{runs['lora0']['tokens_per_s']:.0f} tok/s", lo["speed_ratio"])
    g = results.get("11_grouping")
    if g:
        add("11 length grouping", f"grouped / plain, {g['pairs']} ({g['tokenizer']})",
            f"padding {g['plain']['padding_share']:.1%} -> {g['grouped']['padding_share']:.1%}, "
            f"{g['plain']['tokens_per_s']:.0f} -> {g['grouped']['tokens_per_s']:.0f} tok/s", g["speedup"])
    tp = results.get("3_trl_throughput")
    if tp and "ratio" in tp:
        t = tp["tokens_per_s"]
        for ours, theirs, label in (("ours_simpo", "trl_cpo_simpo", "simpo"), ("ours_dpo", "trl_dpo", "dpo")):
            add("3 tokens/s vs TRL", f"{label}: train.py / TRL", f"{t[ours]:.0f} / {t[theirs]:.0f} tok/s",
                tp["ratio"][label], "trl_throughput")
    elif tp:
        rows.append(("3 tokens/s vs TRL", SKIP_TRL, f"train.py: simpo {tp['tokens_per_s']['ours_simpo']:.0f}, dpo "
                     f"{tp['tokens_per_s']['ours_dpo']:.0f} tok/s", "-", f">= {TARGETS['trl_throughput'][0]}", ""))
    fs = results.get("4_fsdp")
    if fs:
        worst, one = max(fs["ranks_2"], key=lambda r: r["total"]), fs["ranks_1"][0]
        add("4 FSDP per-rank bytes", "2 ranks / 1 rank", f"{worst['total'] / 2**20:.2f} / {one['total'] / 2**20:.2f} "
            "MiB", fs["ratio"], "fsdp_memory")
    sc = results.get("5_score")
    if sc:
        add("5 score.py vs training", "scoring / training tok/s",
            f"{sc['score_tokens_per_s']:.0f} / {sc['train_tokens_per_s']:.0f} tok/s", sc["ratio"])
    real = results.get("6_real")
    for key, r in (real or {}).get("ratios", {}).items():
        _, method, seq, ac = key.split("_", 1)[0], *key.split("_", 1)[1].rsplit("_", 2)
        label = f"6-7 real shapes {seq[1:]} tokens, checkpointing {'on' if ac == 'ac1' else 'off'}"
        versus = "DPO" if method.startswith("dpo") else "SimPO"
        ours, theirs = real["runs"][key], real["runs"][f"trl_{versus.lower()}_{seq}_{ac}"]
        add(label, f"{method}: train.py / TRL {versus}, tokens/s",
            f"{ours['tokens_per_s']:.1f} / {theirs['tokens_per_s']:.1f}", r["tokens_per_s"], "real_throughput")
        add(label, f"{method}: train.py / TRL {versus}, peak RSS",
            f"{ours['peak_rss'] / 2**30:.2f} / {theirs['peak_rss'] / 2**30:.2f} GiB", r["peak_rss"], "real_memory")
        if "allocator_peak" in r:
            add(label, f"{method}: train.py / TRL {versus}, allocator peak", f"{ours['allocator_peak'] / 2**30:.2f} / "
                f"{theirs['allocator_peak'] / 2**30:.2f} GiB", r["allocator_peak"], "real_memory")
    for key, r in (real or {}).get("runs", {}).items():  # what computing the reference once saves
        live = real["runs"].get(key.replace("dpo_once", "dpo"))
        if key.startswith("ours_dpo_once") and live:
            label = f"6 reference computed once, {key.split('_')[3][1:]} tokens, ac {key.split('_')[4][2:]}"
            add(label, "dpo --precompute_ref / live reference, tokens/s",
                f"{r['tokens_per_s']:.1f} / {live['tokens_per_s']:.1f}", r["tokens_per_s"] / live["tokens_per_s"])
            add(label, "dpo --precompute_ref / live reference, peak RSS",
                f"{r['peak_rss'] / 2**30:.2f} / {live['peak_rss'] / 2**30:.2f} GiB", r["peak_rss"] / live["peak_rss"])
    for key, r in results.get("8_breakdown", {}).items():
        add("8 memory of a step (256 tokens)", f"{key}: peak, in {r['peak_in']}",
            f"{r['peak'] / 2**30:.2f} GiB", r["peak"] / results["8_breakdown"][f"hf_{r['method']}"]["peak"])
    ld = results.get("9_load")
    if ld:
        for way in ("old", "new"):
            add("9 loading on 2 ranks", f"{way}: summed growth of peak RSS / (one model + its shards)",
                f"{ld[way]['summed_growth'] / 2**30:.2f} GiB", ld[way]["over_model_and_shards"],
                "load_memory" if way == "new" else None)
    for key, r in results.get("10_generation", {}).items():
        t = r["tokens_per_s"]
        add(f"10 generation, {key}", f"models.sample / model.generate loop, K = {r['samples_per_prompt']}",
            f"{t['ours']:.0f} / {t['hf']:.0f} tok/s", r["ratio"], "generation")
    sel = results.get("select_tokens")
    if sel:
        add("SePO selection", "select_tokens / loop",
            f"{sel['median_s']['select_tokens'] * 1e3:.2f} / {sel['median_s']['loop'] * 1e3:.1f} ms", sel["ratio"])
    return rows, verdicts


def print_table(rows, markdown=False):
    header = ("item", "variant", "measured", "ratio", "target", "")
    if markdown:  # for the README
        for r in [header, ("---",) * len(header)] + rows:
            print("| " + " | ".join(str(x) for x in r) + " |")
        return
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)).rstrip())


def write_json(path, obj):
    """Through a temporary file and a rename: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    args = command_line().parse_args(argv)
    if args.table:
        with open(args.table) as fh:
            print_table(table_rows(json.load(fh))[0], args.markdown)
        return None
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    set_threads(args.threads)
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    items = set(args.items.split(","))
    if args.large:  # a GPU run: say what it measures, and stop where there is no GPU
        if not torch.cuda.is_available():
            print("bench.py --large measures item 2 on a GPU (bf16 hidden states, T = 1024, H = 2048, V = 32000 and "
                  "128256: peak memory and time of the chunked log-prob path against the naive one, and blocks of 32 "
                  "MiB to 2 GiB); no GPU is visible here (torch.cuda.is_available() is False)", file=sys.stderr)
            raise SystemExit(1)
        print(f"bench.py --large on {torch.cuda.get_device_name()}: item 2 at T = 1024, H = 2048, V = 32000 and "
              "128256, bf16, the chunked path's block size from 32 MiB to 2 GiB (losses.CHUNK_BYTES['cuda'] is "
              f"{losses.CHUNK_BYTES['cuda'] >> 20} MiB)", flush=True)
        items &= {"2"}
    t_start = time.perf_counter()
    results = {"machine": machine(args.threads), "settings": {"quick": args.quick, "large": args.large,
                                                              "threads": args.threads}, "targets": TARGETS}
    timing = {}
    work = tempfile.mkdtemp(prefix="bench-")
    try:
        ctx = setup(args, work)
        print(f"bench: {results['machine']['cpu']}, {os.cpu_count()} cores, {args.threads} threads, torch "
              f"{torch.__version__}; model {os.path.basename(ctx['model'])}", flush=True)
        q = args.quick
        if "1" in items:
            t0 = time.perf_counter()
            results["1_step_time"] = bench_steps(ctx, repeats=2 if q else 40, warmup=1 if q else 3)
            timing["1"] = time.perf_counter() - t0
            print(f"  item 1 done ({timing['1']:.0f} s)", flush=True)
        if "2" in items:
            t0 = time.perf_counter()
            device = "cuda" if args.large else "cpu"
            hidden_dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what train.py computes in
            if q:
                shapes = [(2, 64, 32, 1000, 16), (2, 64, 32, 4000, 16)]
            elif args.large:
                shapes = [(2, 1024, 2048, v, 256) for v in (32000, 128256)]
            else:
                shapes = [(2, 512, 256, v, 128) for v in (32000, 128256)]
            blocks = [2**25, 2**27, 2**29, 2**31] if args.large else []  # 32 MiB (the CPU's) ... 2 GiB
            results["2_logps"] = {f"V={V}": bench_logps(B, T, H, V, prompt, hidden_dtype, device,
                                                        repeats=1 if q else 3, extra=i == 0, blocks=blocks)
                                  for i, (B, T, H, V, prompt) in enumerate(shapes)}
            timing["2"] = time.perf_counter() - t0
            print(f"  item 2 done ({timing['2']:.0f} s)", flush=True)
        if "3" in items or "5" in items:
            t0 = time.perf_counter()
            item3, item5 = bench_throughput(ctx, rounds=1 if q else 3, steps=3 if q else 8, warmup=1 if q else 2,
                                            score_pairs=64 if q else 1024)
            results["3_trl_throughput"], results["5_score"] = item3, item5
            timing["3+5"] = time.perf_counter() - t0
            print(f"  items 3 and 5 done ({timing['3+5']:.0f} s)", flush=True)
        if "4" in items:
            t0 = time.perf_counter()
            results["4_fsdp"] = bench_fsdp(ctx)
            timing["4"] = time.perf_counter() - t0
            print(f"  item 4 done ({timing['4']:.0f} s)", flush=True)
        for item, key, run in (("6", "6_real", lambda: bench_real(ctx, q, args.threads)),
                                ("8", "8_breakdown", lambda: bench_breakdown(ctx, q, args.threads)),
                                ("9", "9_load", lambda: bench_load(ctx, q))):
            if item in items:
                t0 = time.perf_counter()
                results[key] = run()
                timing[item] = time.perf_counter() - t0
                print(f"  item {item} done ({timing[item]:.0f} s)", flush=True)
        if "10" in items:
            t0 = time.perf_counter()
            results["10_generation"] = bench_generation(ctx, q, repeats=1 if q else 3,
                                                        extra_model=args.generation_model,
                                                        n_prompts=args.generation_prompts)
            timing["10"] = time.perf_counter() - t0
            print(f"  item 10 done ({timing['10']:.0f} s)", flush=True)
        if "12" in items:
            t0 = time.perf_counter()
            results["12_lora"] = bench_lora(ctx, q, args.threads)
            timing["12"] = time.perf_counter() - t0
            print(f"  item 12 done ({timing['12']:.0f} s)", flush=True)
        if "11" in items:
            t0 = time.perf_counter()
            results["11_grouping"] = bench_grouping(ctx, q, repeats=1 if q else 3)
            timing["11"] = time.perf_counter() - t0
            print(f"  item 11 done ({timing['11']:.0f} s)", flush=True)
        if "select" in items:
            results["select_tokens"] = bench_select(8 if q else 32, 128 if q else 512, repeats=2 if q else 5)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    rows, verdicts = table_rows(results)
    results["verdicts"] = verdicts
    results["machine"]["load_average_at_end"] = os.getloadavg()
    results["runtime_s"] = {"total": time.perf_counter() - t_start, **timing}
    write_json(args.out, results)
    print()
    print_table(rows, args.markdown)
    missed = [v for v in verdicts if not v["met"]]
    print(f"\n{len(verdicts) - len(missed)} of {len(verdicts)} targets met; {results['runtime_s']['total']:.0f} s; "
          f"wrote {args.out}")
    return results


WORKERS = {"_fsdp_worker": "fsdp_worker", "_real_worker": "real_worker", "_breakdown_worker": "breakdown_worker",
           "_load_worker": "load_worker"}  # hidden sub-commands: one measured run in a process of its own


if __name__ == "__main__":
    if sys.argv[1:2] and sys.argv[1] in WORKERS:
        globals()[WORKERS[sys.argv[1]]](sys.argv[2:])
    else:
        main()
    exit_now(0)  # no interpreter finalization once a process group has run: see utils.exit_now
