"""Speed and memory, measured side by side in one run against the naive way and against TRL, with targets.

    python bench.py                    # the whole table, a few minutes on 2 CPU cores; writes bench.json
    python bench.py --quick            # small shapes, one or two repetitions: a smoke run (test_bench.py)
    python bench.py --large            # item 2 at T=1024, H=2048 (bf16 on a GPU; on a CPU, patience and 12 GB)
    pip install -r requirements.txt -r requirements-bench.txt     # TRL and Liger-Kernel, for items 2 and 3 only

Absolute times on a shared machine are noise; what is reported is ratios of variants measured in the same process,
on the same inputs, interleaved (A B C, B C A, C A B, ...) so that drift hits every variant alike, after warm-up,
as the median of several repetitions, with a fixed number of threads (recorded in bench.json).

1. Step time of ConfPO, ConfPO-rand and SePO (selections precomputed) over SimPO, and of ConfPO_DPO over DPO: one
   training step of train.py (micro_step, backward, clipping, AdamW) on the same FSDP-wrapped tiny model and batch;
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
    parser.add_argument("--out", default="bench.json", help="where the results go (JSON)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="intra-op threads, fixed for every item")
    parser.add_argument("--tiny_world", "--tiny-world", default="tiny_world",
                        help="the offline tiny world (built on first use)")
    parser.add_argument("--cache_dir", "--cache-dir", default="", help="datasets cache ('' = a temporary folder)")
    parser.add_argument("--items", default="1,2,3,4,5,select", help="which items to run, comma-separated")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for the README)")
    parser.add_argument("--table", default="", help="only print the table of an existing bench.json, run nothing")
    return parser


if __name__ == "__main__" and sys.argv[1:2] != ["_fsdp_worker"]:
    command_line().parse_args()  # --help and a mistyped flag answer here, before torch loads

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.nn.functional as F  # noqa: E402

import losses  # noqa: E402
import models  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from utils import init_distributed  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

# Targets of the issue: (ratio, "<=" or ">="). Item 5 has none: it is a cost to know, not to meet.
TARGETS = {
    "step_time": (1.02, "<="),  # item 1: selective method / its base objective
    "peak_memory": (0.35, "<="),  # item 2: ours / naive peak bytes
    "logps_time": (1.00, "<="),  # item 2: ours / naive time ("no slower")
    "trl_throughput": (1.2, ">="),  # item 3: our tokens/s / TRL's
    "fsdp_memory": (0.55, "<="),  # item 4: per-rank bytes with 2 ranks / 1 rank
}
SKIP_TRL = "skipped (pip install -r requirements-bench.txt)"


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


def bench_logps(B, T, H, V, prompt, hidden_dtype, device, repeats, extra=False):
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
    out["from_hidden"] = from_hidden(labels, H, V, hidden_dtype, device, repeats, extra)
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


def from_hidden(labels, H, V, dtype, device, repeats, extra):
    """The last hidden states and the output embedding in, the mean SimPO loss over the pairs out (what a trainer
    computes): `hidden @ W.T` then naive vs losses.chunked_token_logps, and Liger's fused linear SimPO loss where it
    runs."""
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(*labels.shape, H, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).to(device).requires_grad_()
    fns = {"naive": lambda: simpo_mean(*naive_token_logps(hidden @ weight.T, labels)),
           "chunked_token_logps": lambda: simpo_mean(*losses.chunked_token_logps(hidden, weight, labels))}
    if extra:
        fns["chunked_token_logps chunk 1024"] = lambda: simpo_mean(*losses.chunked_token_logps(
            hidden, weight, labels, chunk_size=1024))
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
    _, _, device = init_distributed(cfg.device)  # a world of one: train.py's FSDP code path
    set_threads(args.threads)  # init_distributed sets OMP_NUM_THREADS threads for a world of one
    tokenizer = AutoTokenizer.from_pretrained(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with quiet():
        ds = train.prepare_data(cfg, train.METHODS[cfg.method], tokenizer)["train"]
    return {"paths": paths, "model": model, "train_file": train_file, "cfg": cfg, "device": device, "ds": ds,
            "pad_id": pad_id, "work": work}


# ---------------------------------------------------------------------------------------------------------------
# Item 1: step time of the selective methods over their base objectives
# ---------------------------------------------------------------------------------------------------------------

STEP_METHODS = ["simpo", "confpo", "confpo_rand", "sepo", "dpo", "confpo_dpo"]
STEP_RATIOS = {"confpo": "simpo", "confpo_rand": "simpo", "sepo": "simpo", "confpo_dpo": "dpo"}


def bench_steps(ctx, repeats, warmup):
    """One training step as train.py takes it (micro_step, backward, gradient clipping, AdamW step, zero_grad) per
    method, on the same FSDP-wrapped model, reference and batch. lr = 0, so every step sees the same weights and
    does the same work. SePO's selection is precomputed as score.py writes it (30% of each response: the top of
    random scores for chosen, the bottom for rejected), so no oracle runs."""
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
    return {"model": os.path.basename(ctx["model"]), "pairs": B, "tokens": train.forwarded_tokens(train.METHODS["simpo"], batch),
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
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer
    from trl.experimental.cpo import CPOConfig, CPOTrainer
    cfg = ctx["cfg"]
    accumulation = cfg.global_batch_size // cfg.micro_batch_size
    with open(ctx["train_file"]) as fh:
        rows = [json.loads(line) for line in itertools.islice(fh, steps * cfg.global_batch_size)]
    # conversational form: TRL renders it with the tokenizer's chat template, as data.tokenize_preferences does
    pairs = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    out = tempfile.mkdtemp(prefix=f"trl-{kind}-", dir=ctx["work"])
    common = dict(output_dir=out, per_device_train_batch_size=cfg.micro_batch_size,
                  gradient_accumulation_steps=accumulation, max_steps=steps, learning_rate=cfg.lr,
                  lr_scheduler_type="cosine", warmup_steps=cfg.warmup_ratio, max_grad_norm=cfg.grad_clip,
                  optim="adamw_torch", max_length=cfg.max_length, use_cpu=True, bf16=False, fp16=False,
                  report_to=[], save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
                  dataloader_num_workers=0, dataloader_pin_memory=False, seed=cfg.seed)
    ends, tokens = [], []

    class StepEnds(TrainerCallback):  # Trainer's hook: the moment each optimizer step is done
        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    with quiet():
        tokenizer = AutoTokenizer.from_pretrained(ctx["model"])
        model = AutoModelForCausalLM.from_pretrained(ctx["model"], dtype=torch.float32)
        if kind == "cpo_simpo":  # pure SimPO: no NLL term, simpo_gamma is the absolute margin; losses.simpo_loss's
            args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=2.0, simpo_gamma=1.0, **common)  # defaults
            trainer = CPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        else:  # DPO with a reference model run every step (as train.py), beta 0.1 as losses.dpo_loss
            args = DPOConfig(beta=0.1, **common)
            trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
        trainer.add_callback(StepEnds())
        training_step = trainer.training_step

        def counting_step(model, inputs, *a, **kw):  # non-padding tokens of chosen and rejected rows
            tokens.append(sum(int(v.sum()) for k, v in inputs.items()
                              if k.endswith("attention_mask") and not k.startswith("prompt")))
            return training_step(model, inputs, *a, **kw)

        trainer.training_step = counting_step
        trainer.train()
    shutil.rmtree(out, ignore_errors=True)
    per_step = [sum(tokens[i * accumulation:(i + 1) * accumulation]) for i in range(len(ends))]
    return [(per_step[i], ends[i] - ends[i - 1]) for i in range(max(1, warmup), len(ends))]


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
    os.makedirs(os.path.join(out, "shards"))  # score.run makes it before scoring
    cfg = score.ScoreConfig(oracle=ctx["model"], reference=ctx["model"], data=ctx["train_file"], output_dir=out,
                            max_length=ctx["cfg"].max_length, max_prompt_length=ctx["cfg"].max_prompt_length,
                            shard_size=n_pairs, device="cpu", dtype="fp32")
    pairs = ctx["ds"].select(range(min(n_pairs, len(ctx["ds"]))))
    tokens = sum(len(a) + len(b) for a, b in zip(pairs["chosen_input_ids"], pairs["rejected_input_ids"]))
    with quiet():
        t0 = time.perf_counter()
        score.score_blocks(cfg, pairs, ctx["pad_id"], 0, 1, ctx["device"])
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
    dist.destroy_process_group()


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
# Also: SePO's selection, vectorised against a loop
# ---------------------------------------------------------------------------------------------------------------

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
            device = "cuda" if args.large and torch.cuda.is_available() else "cpu"
            hidden_dtype = torch.bfloat16 if device == "cuda" else torch.float32  # what train.py computes in
            if q:
                shapes = [(2, 64, 32, 1000, 16), (2, 64, 32, 4000, 16)]
            elif args.large:
                shapes = [(2, 1024, 2048, v, 256) for v in (32000, 128256)]
            else:
                shapes = [(2, 512, 256, v, 128) for v in (32000, 128256)]
            results["2_logps"] = {f"V={V}": bench_logps(B, T, H, V, prompt, hidden_dtype, device,
                                                        repeats=1 if q else 3, extra=i == 0)
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


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_fsdp_worker":
        fsdp_worker(sys.argv[2:])
    else:
        main()
