"""Speed and memory of the core, measured side by side in one run; prints ratios, asserts nothing.

    python bench.py            # CPU-sized shapes
    python bench.py --large    # closer to a real batch (a Llama-3 vocabulary); wants a GPU or patience

Memory is what autograd keeps for backward beyond the inputs (bytes of tensors saved by the graph, counted with
torch.autograd.graph.saved_tensors_hooks), so the numbers are exact and do not depend on the allocator. Time is the
median of a few forward + backward passes.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from losses import chunked_token_logps, token_logps
from sepo import select_tokens


def naive_token_logps(logits, labels):
    """The textbook version: a full float32 log-softmax copy, gathered."""
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V) float32
    mask = labels[:, 1:] != -100
    return logps.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * mask


def trl_style_token_logps(logits, labels):
    """TRL's selective_log_softmax idea: logsumexp one sequence at a time (no full copy, but autograd still keeps a
    float32 copy per row when the logits are bf16)."""
    x, y = logits[:, :-1], labels[:, 1:].clamp(min=0)
    lse = torch.stack([torch.logsumexp(row.float(), dim=-1) for row in x])
    return (x.float().gather(-1, y[..., None]).squeeze(-1) - lse) * (labels[:, 1:] != -100)


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


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_token_logps(B, T, V, prompt, dtype, device, repeats):
    gen = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    labels[:, :prompt] = -100
    weights = torch.randn(B, T - 1, generator=gen).to(device)
    rows = []
    for name, fn in [("naive log_softmax", naive_token_logps), ("TRL-style row loop", trl_style_token_logps),
                     ("token_logps", lambda lg, lb: token_logps(lg, lb)[0][:, 1:])]:
        out, saved = saved_bytes(lambda: fn(logits, labels), [logits])

        def step():
            logits.grad = None
            (fn(logits, labels) * weights).sum().backward()

        step()  # warm-up
        rows.append((name, timed(step, repeats), saved))
    print(f"\ntoken log-probs, B={B} T={T} V={V} prompt={prompt} {dtype} on {device}: forward + backward")
    base_t, base_m = rows[0][1], rows[0][2]
    for name, t, m in rows:
        print(f"  {name:22s} {t * 1e3:8.1f} ms  x{base_t / t:5.2f} speed   kept for backward {m / 2**20:8.2f} MiB")


def bench_chunked(B, T, H, V, prompt, dtype, device, repeats):
    gen = torch.Generator(device="cpu").manual_seed(1)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).to(device).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H ** 0.5).to(dtype).to(device).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    labels[:, :prompt] = -100
    rows = []
    for name, fn in [("logits then token_logps", lambda: token_logps(hidden @ weight.T, labels)[0]),
                     ("chunked_token_logps", lambda: chunked_token_logps(hidden, weight, labels)[0])]:
        _, saved = saved_bytes(fn, [hidden, weight])

        def step():
            hidden.grad = weight.grad = None
            fn().sum().backward()

        step()
        rows.append((name, timed(step, repeats), saved))
    print(f"\nlm head + log-probs, B={B} T={T} H={H} V={V} prompt={prompt} {dtype} on {device}: forward + backward")
    base_t, base_m = rows[0][1], rows[0][2]
    for name, t, m in rows:
        print(f"  {name:24s} {t * 1e3:8.1f} ms  x{base_t / t:5.2f} speed   kept for backward {m / 2**20:8.2f} MiB")


def loop_select_tokens(scores, mask, ratio):
    """Eq. 25 one response at a time, as the released scorer does."""
    out = torch.zeros_like(mask)
    for b in range(scores.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        k = int(len(idx) * ratio + 1e-9)
        top = sorted(range(len(idx)), key=lambda i: (-float(scores[b, idx[i]]), i))[:k]
        out[b, idx[top]] = True
    return out


def bench_select(B, T, device, repeats):
    gen = torch.Generator(device="cpu").manual_seed(2)
    scores = torch.randn(B, T, generator=gen).to(device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[:, : T // 4] = False
    assert torch.equal(select_tokens(scores, mask, 0.3), loop_select_tokens(scores, mask, 0.3))
    t_loop = timed(lambda: loop_select_tokens(scores, mask, 0.3), 1)
    t_vec = timed(lambda: select_tokens(scores, mask, 0.3), repeats)
    print(f"\nSePO selection (Eq. 25), B={B} T={T}: loop {t_loop * 1e3:.1f} ms, vectorised {t_vec * 1e3:.2f} ms, "
          f"x{t_loop / t_vec:.0f} faster (same selection)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="real-model shapes (vocabulary 128256)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.large:
        bench_token_logps(4, 1024, 128256, 512, torch.bfloat16, device, args.repeats)
        bench_chunked(4, 1024, 4096, 128256, 512, torch.bfloat16, device, args.repeats)
        bench_select(128, 2048, device, args.repeats)
    else:
        bench_token_logps(4, 256, 8192, 128, torch.float32, device, args.repeats)
        bench_token_logps(4, 256, 8192, 128, torch.bfloat16, device, args.repeats)
        bench_chunked(4, 256, 256, 8192, 128, torch.float32, device, args.repeats)
        bench_select(32, 512, device, args.repeats)


if __name__ == "__main__":
    main()
