"""Every vectorised function of losses.py, confpo.py and sepo.py against a slow loop written from its equation.

The slow versions below walk each response token by token in Python (float64, exact fractions where a threshold
decides a tie) and build their losses from 0-d tensors, so that autograd gives reference gradients too. Batches are
random: variable lengths, left and right padding, float64 / float32 / bfloat16 inputs, all-equal responses (exact
ties), single-token responses, quantised scores (ties for SePO), garbage outside the masks.
"""

import itertools
import math
from fractions import Fraction

import pytest
import torch

import confpo
import losses
import sepo

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
SEEDS = range(6)


# ---------------------------------------------------------------------------------------------------------------
# Random batches
# ---------------------------------------------------------------------------------------------------------------

def make_side(gen, B, T, pad, dtype):
    """(logps leaf (B, T) dtype, mask (B, T) bool): random response spans after a prompt of >= 1 token.

    Row kinds: random, all-equal values (exact ties), a single token, quantised values (ties among tokens).
    Positions outside the mask hold positive garbage, which any masked reduction must ignore.
    """
    logps = torch.rand(B, T, generator=gen, dtype=torch.float64) * 5 + 1  # garbage > 0 outside the mask
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):
        kind = int(torch.randint(0, 6, (), generator=gen))
        n = 1 if kind == 1 else int(torch.randint(1, T, (), generator=gen))
        p = int(torch.randint(1, T - n + 1, (), generator=gen))  # prompt tokens, >= 1 so position 0 is prompt
        start = p if pad == "right" else T - n
        mask[b, start:start + n] = True
        vals = -torch.empty(n, dtype=torch.float64).exponential_(generator=gen) * 2  # log-probs <= 0
        if kind == 2:
            vals[:] = vals[0]  # all equal
        elif kind == 3:
            vals = (vals * 2).round() / 2  # quantised: many ties
        logps[b, start:start + n] = vals
    return logps.to(dtype).requires_grad_(), mask


def make_pair(seed, dtype, pad, B=5, T=9, ref=False):
    gen = torch.Generator().manual_seed(seed)
    cw, mw = make_side(gen, B, T, pad, dtype)
    cl, ml = make_side(gen, B, T + 2, pad, dtype)  # sides may differ in length
    out = dict(chosen_logps=cw, chosen_mask=mw, rejected_logps=cl, rejected_mask=ml)
    if ref:  # reference log-probs: fresh negative values, on the same positions
        for key, m in (("ref_chosen_logps", mw), ("ref_rejected_logps", ml)):
            out[key] = (-torch.empty(m.shape, dtype=torch.float64).exponential_(generator=gen) * 2).to(dtype)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Slow references, written from the equations
# ---------------------------------------------------------------------------------------------------------------

def toks(logps, mask, b):
    """The response tokens of row b, in order, as float64 0-d tensors (autograd flows back to `logps`)."""
    x = logps.double()
    return [x[b, t] for t in range(x.shape[1]) if mask[b, t]]


def tsum(xs):
    return sum(xs, torch.zeros((), dtype=torch.float64))


def neg_log_sigmoid(z):
    return -torch.log(torch.sigmoid(z))


def slow_pairs(fn, d, **kw):
    """Apply fn(w_tokens, l_tokens, [ref_w_tokens, ref_l_tokens,] **kw) -> 0-d loss to each pair -> (B,)."""
    out = []
    for b in range(d["chosen_mask"].shape[0]):
        args = [toks(d["chosen_logps"], d["chosen_mask"], b), toks(d["rejected_logps"], d["rejected_mask"], b)]
        if "ref_chosen_logps" in d:
            args += [toks(d["ref_chosen_logps"], d["chosen_mask"], b), toks(d["ref_rejected_logps"], d["rejected_mask"], b)]
        out.append(fn(*args, **kw))
    return torch.stack(out)


def slow_dpo(w, l, rw, rl, beta, label_smoothing=0.0):
    z = beta * tsum(w) - beta * tsum(rw) - (beta * tsum(l) - beta * tsum(rl))
    return (1 - label_smoothing) * neg_log_sigmoid(z) + label_smoothing * neg_log_sigmoid(-z)


def slow_ipo(w, l, rw, rl, tau):
    return ((tsum(w) - tsum(rw)) / len(w) - (tsum(l) - tsum(rl)) / len(l) - 1 / (2 * tau)) ** 2


def slow_simpo(w, l, beta, gamma):
    return neg_log_sigmoid(beta / len(w) * tsum(w) - beta / len(l) * tsum(l) - gamma)


def slow_cpo(w, l, beta, lambda_):
    return neg_log_sigmoid(beta * tsum(w) - beta * tsum(l)) - lambda_ * tsum(w) / len(w)


def slow_rrhf(w, l, lambda_):
    return torch.clamp(-tsum(w) / len(w) + tsum(l) / len(l), min=0) - lambda_ * tsum(w) / len(w)


def slow_slic(w, l, delta, lambda_):
    return torch.clamp(delta - tsum(w) + tsum(l), min=0) - lambda_ * tsum(w) / len(w)


def slow_orpo(w, l, lambda_):
    pw, pl = torch.exp(tsum(w) / len(w)), torch.exp(tsum(l) / len(l))
    log_odds = torch.log(pw / (1 - pw)) - torch.log(pl / (1 - pl))
    return -torch.log(pw) - lambda_ * torch.log(torch.sigmoid(log_odds))


def slow_rdpo(w, l, rw, rl, beta, alpha):
    z = beta * (tsum(w) - tsum(rw)) - beta * (tsum(l) - tsum(rl)) + (alpha * len(w) - alpha * len(l))
    return neg_log_sigmoid(z)


def slow_kto_batch(d, beta, lambda_w, lambda_l):
    """KTO needs the whole batch: z_ref = max(0, mean of beta * log-ratio over all responses), detached."""
    B = d["chosen_mask"].shape[0]
    r_w = [beta * (tsum(toks(d["chosen_logps"], d["chosen_mask"], b)) - tsum(toks(d["ref_chosen_logps"], d["chosen_mask"], b)))
           for b in range(B)]
    r_l = [beta * (tsum(toks(d["rejected_logps"], d["rejected_mask"], b)) - tsum(toks(d["ref_rejected_logps"], d["rejected_mask"], b)))
           for b in range(B)]
    z_ref = max(0.0, sum(r.item() for r in r_w + r_l) / (2 * B))
    return torch.stack([lambda_w * (1 - torch.sigmoid(r_w[b] - z_ref)) + lambda_l * (1 - torch.sigmoid(z_ref - r_l[b]))
                        for b in range(B)])


def slow_select_confidence(vals, threshold, strict):
    """Eq. 12 / 14 / App. B on one response, exactly: the float64 probabilities compared as fractions."""
    x = [Fraction(float(v)) for v in vals]
    if threshold == "arithmetic":  # tau = (1/|y|) sum pi(y_i), compare pi(y_i) <= tau
        p = [Fraction(math.exp(float(v))) for v in vals]
        tau = sum(p) / len(p)
        return [(pi < tau) if strict else (pi <= tau) for pi in p]
    if threshold == "geometric":  # log tau = (1/|y|) sum log pi(y_i)
        log_tau = sum(x) / len(x)
        return [(xi < log_tau) if strict else (xi <= log_tau) for xi in x]
    p = [math.exp(float(v)) for v in vals]  # fixed tau
    return [(pi < threshold) if strict else (pi <= threshold) for pi in p]


def slow_selective_simpo(w, l, sw, sl, beta, gamma, norm_w=None, norm_l=None):
    """beta/|y_s| sum_i s(y_i) log pi(y_i) on each side; loss 0 when a side selects nothing."""
    if not any(sw) or not any(sl):
        return tsum(w) * 0  # zero, still connected to the graph
    rw = beta / (norm_w or sum(sw)) * tsum([t for t, s in zip(w, sw) if s])
    rl = beta / (norm_l or sum(sl)) * tsum([t for t, s in zip(l, sl) if s])
    return neg_log_sigmoid(rw - rl - gamma)


def slow_confpo(w, l, beta, gamma, threshold, strict, normalize):
    sw = slow_select_confidence([t.item() for t in w], threshold, strict)
    sl = slow_select_confidence([t.item() for t in l], threshold, strict)
    norms = dict(norm_w=len(w), norm_l=len(l)) if normalize == "response" else {}
    return slow_selective_simpo(w, l, sw, sl, beta, gamma, **norms)


def slow_confpo_dpo(w, l, rw, rl, beta, threshold, strict):
    sw = slow_select_confidence([t.item() for t in w], threshold, strict)
    sl = slow_select_confidence([t.item() for t in l], threshold, strict)
    if not any(sw) or not any(sl):
        return tsum(w) * 0  # zero, still connected to the graph
    z = (beta * tsum([a - r for a, r, s in zip(w, rw, sw) if s])
         - beta * tsum([a - r for a, r, s in zip(l, rl, sl) if s]))
    return neg_log_sigmoid(z)


def slow_select_ratio(scores, ratio, highest):
    """Eq. 25 on one response: floor(ratio * n) positions, best scores first, ties to the earliest position."""
    n = len(scores)
    k = math.floor(Fraction(str(ratio)) * n)
    order = sorted(range(n), key=lambda i: ((-scores[i] if highest else scores[i]), i))
    chosen = set(order[:k])
    return [i in chosen for i in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Comparison helpers
# ---------------------------------------------------------------------------------------------------------------

def tol(dtype):
    return dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)


def grad_tol(dtype):
    return {torch.float64: dict(rtol=1e-8, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-5),
            torch.bfloat16: dict(rtol=2e-2, atol=1e-3)}[dtype]


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True)


def check_against(fast, slow, d, dtype):
    """Values equal, gradients w.r.t. the policy log-probs equal, everything finite."""
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast.double(), slow.double(), **tol(dtype))
    leaves = [d["chosen_logps"], d["rejected_logps"]]
    g_fast = grads(fast.sum(), leaves)
    g_slow = grads(slow.sum(), leaves)
    for gf, gs in zip(g_fast, g_slow):
        gf = torch.zeros_like(leaves[0]) if gf is None else gf
        gs = torch.zeros_like(gf) if gs is None else gs
        assert gf.shape == gs.shape and torch.isfinite(gf).all()
        torch.testing.assert_close(gf.double(), gs.double(), **grad_tol(dtype))


# ---------------------------------------------------------------------------------------------------------------
# token_logps and chunked_token_logps
# ---------------------------------------------------------------------------------------------------------------

def make_labels(gen, B, T, V, pad):
    input_ids = torch.randint(0, V, (B, T), generator=gen)
    labels = torch.full((B, T), -100)
    for b in range(B):
        n = int(torch.randint(1, T, (), generator=gen))
        p = int(torch.randint(1, T - n + 1, (), generator=gen))
        start = p if pad == "right" else T - n
        labels[b, start:start + n] = input_ids[b, start:start + n]
    return labels


def test_token_logps_float64_gradcheck():
    """float64 logits stay float64, so autograd's numerical gradient check applies to the custom backward."""
    gen = torch.Generator().manual_seed(5)
    labels = make_labels(gen, 2, 6, 7, "right")
    logits = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    assert losses.token_logps(logits, labels)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: losses.token_logps(x, labels, chunk_size=2)[0], (logits,))


def test_token_logps_without_any_response_token():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    logps, mask = losses.token_logps(logits, torch.full((2, 4), -100))
    assert not mask.any() and torch.equal(logps, torch.zeros(2, 4))
    logps.sum().backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("dtype,pad,chunk", [(torch.float32, "right", 3), (torch.float32, "left", 1000),
                                             (torch.bfloat16, "right", 5), (torch.bfloat16, "left", 2)])
def test_token_logps_matches_log_softmax_gather(dtype, pad, chunk):
    gen = torch.Generator().manual_seed(0)
    B, T, V = 4, 11, 37
    labels = make_labels(gen, B, T, V, pad)
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(dtype).requires_grad_()
    logps, mask = losses.token_logps(logits, labels, chunk_size=chunk)
    # reference: the full float32 log-softmax, gathered at the next token
    ref_logits = logits.detach().float().requires_grad_()
    full = ref_logits[:, :-1].log_softmax(-1)
    ref_mask = labels[:, 1:] != -100
    ref = full.gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1) * ref_mask
    assert logps.dtype == torch.float32 and logps.shape == (B, T)
    assert not mask[:, 0].any() and torch.equal(mask[:, 1:], ref_mask)
    torch.testing.assert_close(logps[:, 1:], ref, rtol=1e-6, atol=1e-6)
    assert (logps[~mask] == 0).all()
    w = torch.randn(B, T, generator=gen)
    (g,) = torch.autograd.grad((logps * w).sum(), logits)
    (g_ref,) = torch.autograd.grad((ref * w[:, 1:]).sum(), ref_logits)
    assert g.dtype == dtype
    torch.testing.assert_close(g.float(), g_ref, **({} if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("dtype,pad,chunk", [(torch.float32, "right", 4), (torch.float32, "left", 64),
                                             (torch.bfloat16, "right", 3)])
def test_chunked_token_logps_matches_full_logits(dtype, pad, chunk):
    gen = torch.Generator().manual_seed(1)
    B, T, H, V = 3, 10, 8, 29
    labels = make_labels(gen, B, T, V, pad)
    hidden = torch.randn(B, T, H, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=gen).to(dtype).requires_grad_()
    logps, mask = losses.chunked_token_logps(hidden, weight, labels, chunk_size=chunk)
    h_ref = hidden.detach().float().requires_grad_()
    w_ref = weight.detach().float().requires_grad_()
    full = (h_ref @ w_ref.T)[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    assert not mask[:, 0].any() and torch.equal(mask[:, 1:], labels[:, 1:] != -100)
    loose = {} if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(logps[:, 1:], full * mask[:, 1:], **loose)
    w = torch.randn(B, T, generator=gen)
    g_h, g_w = torch.autograd.grad((logps * w).sum(), [hidden, weight])
    r_h, r_w = torch.autograd.grad((full * mask[:, 1:] * w[:, 1:]).sum(), [h_ref, w_ref])
    assert g_h.dtype == dtype and g_w.dtype == dtype
    torch.testing.assert_close(g_h.float(), r_h, **(dict(rtol=1e-5, atol=1e-5) if not loose else loose))
    torch.testing.assert_close(g_w.float(), r_w, **(dict(rtol=1e-5, atol=1e-5) if not loose else dict(rtol=5e-2, atol=5e-2)))


@pytest.mark.parametrize("chunk", [3, 64])
def test_chunked_token_logps_under_autocast_match_autograd_through_the_same_bf16_logits(chunk):
    """Under a bf16 autocast (a GPU's default, or --dtype bf16 on CPU) over fp32 weights, the forward computes bf16
    logits; the gradients must be those of that forward, which autograd gives through the same bf16 logits. A
    backward that recomputed the logits in fp32 was off by several percent at a real model's logit scale."""
    gen = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 12, 64, 257
    labels = make_labels(gen, B, T, V, "right")
    hidden = (torch.randn(B, T, H, generator=gen) * 2).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.5).requires_grad_()  # logits of std ~8, as a real model's
    w = torch.randn(B, T, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, mask = losses.chunked_token_logps(hidden, weight, labels, chunk_size=chunk)
        ref_logits = hidden @ weight.T  # bf16, autograd's own cast and matmul backward
        assert ref_logits.dtype == torch.bfloat16
    ref = ref_logits[:, :-1].float().log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(logps[:, 1:], ref * mask[:, 1:], rtol=0, atol=1e-5)  # the same bf16 logits
    g_h, g_w = torch.autograd.grad((logps * w).sum(), [hidden, weight])
    r_h, r_w = torch.autograd.grad((ref * mask[:, 1:] * w[:, 1:]).sum(), [hidden, weight])
    assert g_h.dtype == torch.float32 and g_w.dtype == torch.float32
    # both products in bf16: equal up to bf16 rounding of the gradient of the logits (0.4%), far below the 5% of
    # the old backward
    for g, r in ((g_h, r_h), (g_w, r_w)):
        assert float((g - r).norm() / r.norm()) < 1e-2


def test_token_logps_under_autocast_match_autograd_through_the_same_bf16_logits():
    """The logits path receives the model's bf16 logits under autocast; its backward recomputes from those very
    logits, so its gradient is autograd's through them."""
    gen = torch.Generator().manual_seed(8)
    B, T, H, V = 2, 9, 32, 101
    labels = make_labels(gen, B, T, V, "left")
    hidden = (torch.randn(B, T, H, generator=gen) * 2).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.5).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hidden @ weight.T
        logps, mask = losses.token_logps(logits, labels, chunk_size=4)
    ref = logits[:, :-1].float().log_softmax(-1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    torch.testing.assert_close(logps[:, 1:], ref * mask[:, 1:], rtol=0, atol=1e-5)
    w = torch.randn(B, T, generator=gen)
    g = torch.autograd.grad((logps * w).sum(), [hidden, weight], retain_graph=True)  # the logits' graph is shared
    r = torch.autograd.grad((ref * mask[:, 1:] * w[:, 1:]).sum(), [hidden, weight])
    for a, b in zip(g, r):
        assert float((a - b).norm() / b.norm()) < 1e-2


def test_token_logps_of_a_real_causal_lm_match_its_loss():
    """On a tiny Llama, -mean(token_logps) equals the model's own cross-entropy loss over the same labels."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    input_ids = torch.randint(0, 50, (2, 8))
    labels = input_ids.clone()
    labels[:, :3] = -100
    out = model(input_ids=input_ids, labels=labels)
    logps, mask = losses.token_logps(out.logits, labels)
    torch.testing.assert_close(-logps[mask].mean(), out.loss, rtol=1e-5, atol=1e-6)
    hidden = model.model(input_ids=input_ids).last_hidden_state
    logps2, _ = losses.chunked_token_logps(hidden, model.lm_head.weight, labels, chunk_size=3)
    torch.testing.assert_close(logps2, logps, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_sum_and_mean_against_loops(dtype):
    for seed in SEEDS:
        d = make_pair(seed, dtype, "left" if seed % 2 else "right")
        x, m = d["chosen_logps"], d["chosen_mask"]
        x_garbage = x.detach().masked_fill(~m, float("nan"))  # must be ignored
        s, mean = losses.masked_sum(x_garbage, m), losses.masked_mean(x_garbage, m)
        for b in range(x.shape[0]):
            t = [float(v) for v in toks(x.detach(), m, b)]
            assert math.isclose(float(s[b]), sum(t), rel_tol=1e-5, abs_tol=1e-5)
            assert math.isclose(float(mean[b]), sum(t) / len(t), rel_tol=1e-5, abs_tol=1e-5)
    empty = torch.zeros(2, 4, dtype=torch.bool)
    assert torch.equal(losses.masked_mean(torch.randn(2, 4), empty), torch.zeros(2))
    assert losses.masked_sum(torch.full((2, 4), float("inf")), empty).eq(0).all()


# ---------------------------------------------------------------------------------------------------------------
# Every objective against its loop
# ---------------------------------------------------------------------------------------------------------------

OBJECTIVES = [
    # name, vectorised, slow, kwargs, needs reference
    ("dpo", losses.dpo_loss, slow_dpo, dict(beta=0.3), True),
    ("dpo_smoothed", losses.dpo_loss, slow_dpo, dict(beta=0.3, label_smoothing=0.2), True),
    ("ipo", losses.ipo_loss, slow_ipo, dict(tau=0.4), True),
    ("simpo", losses.simpo_loss, slow_simpo, dict(beta=2.0, gamma=1.2), False),
    ("cpo", losses.cpo_loss, slow_cpo, dict(beta=0.2, lambda_=0.7), False),
    ("rrhf", losses.rrhf_loss, slow_rrhf, dict(lambda_=0.5), False),
    ("slic", losses.slic_loss, slow_slic, dict(delta=1.5, lambda_=0.3), False),
    ("orpo", losses.orpo_loss, slow_orpo, dict(lambda_=0.5), False),
    ("rdpo", losses.rdpo_loss, slow_rdpo, dict(beta=0.2, alpha=0.1), True),
]


@pytest.mark.parametrize("name,fast_fn,slow_fn,kw,ref", OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
@pytest.mark.parametrize("dtype", DTYPES)
def test_objective_against_loop(name, fast_fn, slow_fn, kw, ref, dtype):
    for seed, pad in itertools.product(SEEDS, ["right", "left"]):
        d = make_pair(seed, dtype, pad, ref=ref)
        fast, metrics = fast_fn(**d, **kw)
        assert fast.shape == (d["chosen_mask"].shape[0],) and fast.dtype in (torch.float32, torch.float64)
        assert {"rewards_chosen", "rewards_rejected"} <= metrics.keys()
        assert all(not v.requires_grad for v in metrics.values())
        check_against(fast, slow_pairs(slow_fn, d, **kw), d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kto_against_loop(dtype):
    for seed, pad in itertools.product(SEEDS, ["right", "left"]):
        d = make_pair(seed, dtype, pad, ref=True)
        fast, metrics = losses.kto_loss(**d, beta=0.3, lambda_w=1.0, lambda_l=1.5)
        check_against(fast, slow_kto_batch(d, 0.3, 1.0, 1.5), d, dtype)
        assert (metrics["z_ref"] >= 0).all()
    # a given z_ref is used as is
    d = make_pair(0, torch.float64, "right", ref=True)
    fast, metrics = losses.kto_loss(**d, beta=0.3, z_ref=0.25)
    assert (metrics["z_ref"] == 0.25).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sft_against_loop(dtype):
    for seed in SEEDS:
        d = make_pair(seed, dtype, "right")
        x, m = d["chosen_logps"], d["chosen_mask"]
        for norm in (True, False):
            fast, metrics = losses.sft_loss(x, m, length_normalize=norm)
            slow = torch.stack([-tsum(toks(x, m, b)) / (len(toks(x, m, b)) if norm else 1) for b in range(x.shape[0])])
            check_against(fast, slow, d, dtype)
            torch.testing.assert_close(metrics["response_tokens"], m.sum(-1).float())


def test_closed_form_values():
    """A few values worked out by hand."""
    m = torch.tensor([[False, True, True]])
    zeros = torch.zeros(1, 3)
    # DPO with equal policy and reference: -log sigmoid(0) = log 2
    loss, _ = losses.dpo_loss(zeros - 1, m, zeros - 2, m, zeros - 1, zeros - 2, beta=0.1)
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6)
    # IPO with zero log-ratios: (0 - 1/(2*0.1))^2 = 25
    loss, _ = losses.ipo_loss(zeros - 1, m, zeros - 2, m, zeros - 1, zeros - 2, tau=0.1)
    assert math.isclose(loss.item(), 25.0, rel_tol=1e-6)
    # SimPO: chosen mean -1, rejected mean -2, beta 2, gamma 1: -log sigmoid(-2 + 4 - 1) = log(1 + e^-1)
    w = torch.tensor([[5.0, -0.5, -1.5]])
    l = torch.tensor([[5.0, -1.0, -3.0]])
    loss, met = losses.simpo_loss(w, m, l, m, beta=2.0, gamma=1.0)
    assert math.isclose(loss.item(), math.log1p(math.exp(-1)), rel_tol=1e-6)
    assert math.isclose(met["rewards_chosen"].item(), -2.0) and math.isclose(met["rewards_rejected"].item(), -4.0)
    # R-DPO: zero log-ratios, |y_w| = 2, |y_l| = 1, alpha 0.5: -log sigmoid(0.5)
    ml = torch.tensor([[False, False, True]])
    loss, _ = losses.rdpo_loss(zeros, m, zeros, ml, zeros, zeros, beta=0.1, alpha=0.5)
    assert math.isclose(loss.item(), math.log1p(math.exp(-0.5)), rel_tol=1e-6)
    # ORPO: mean log-probs log 0.5 and log 0.25: odds 1 and 1/3, log odds ratio log 3
    w = torch.tensor([[0.0, math.log(0.5), math.log(0.5)]])
    l = torch.tensor([[0.0, math.log(0.25), math.log(0.25)]])
    loss, _ = losses.orpo_loss(w, m, l, m, lambda_=1.0)
    assert math.isclose(loss.item(), math.log(2) + math.log1p(1 / 3), rel_tol=1e-5)
    # ConfPO: probabilities 0.9, 0.6, 0.3, 0.2 -> tau = 0.5 -> the last two; rejected 0.8, 0.1 -> tau 0.45 -> 0.1
    m4 = torch.tensor([[True, True, True, True]])
    w = torch.tensor([[0.9, 0.6, 0.3, 0.2]]).log()
    l = torch.tensor([[0.8, 0.1, 0.0, 0.0]]).log().nan_to_num(neginf=0.0)
    ml = torch.tensor([[True, True, False, False]])
    loss, met = confpo.confpo_loss(w, m4, l, ml, beta=1.0, gamma=0.5)
    r_w, r_l = (math.log(0.3) + math.log(0.2)) / 2, math.log(0.1)
    assert math.isclose(loss.item(), math.log1p(math.exp(-(r_w - r_l - 0.5))), rel_tol=1e-5)
    assert met["selected_chosen"].item() == 2 and met["selected_rejected"].item() == 1
    assert math.isclose(met["tau_chosen"].item(), 0.5, rel_tol=1e-5)
    # SePO: scores 3, 1, 2, 2 with ratio 0.5 keep 3 and the first 2; lowest keep 1 and the first 2
    s = torch.tensor([[3.0, 1.0, 2.0, 2.0]])
    assert sepo.select_tokens(s, m4, 0.5).tolist() == [[True, False, True, False]]
    assert sepo.select_tokens(s, m4, 0.5, highest=False).tolist() == [[False, True, True, False]]


# ---------------------------------------------------------------------------------------------------------------
# ConfPO
# ---------------------------------------------------------------------------------------------------------------

THRESHOLDS = ["arithmetic", "geometric", 0.6]


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_confpo_mask_against_loop(threshold, strict, dtype):
    for seed, pad in itertools.product(SEEDS, ["right", "left"]):
        d = make_pair(seed, dtype, pad)
        x, m = d["chosen_logps"], d["chosen_mask"]
        sel, log_tau = confpo.confpo_mask(x, m, threshold, strict)
        assert sel.dtype == torch.bool and not (sel & ~m).any() and not log_tau.requires_grad
        for b in range(x.shape[0]):
            vals = [float(v) for v in toks(x.detach(), m, b)]
            expected = slow_select_confidence(vals, threshold, strict)
            got = [bool(sel[b, t]) for t in range(x.shape[1]) if m[b, t]]
            assert got == expected, (seed, pad, b, vals)


def test_confpo_all_equal_and_single_token_responses():
    """Paper's `<=` selects every token of an all-equal response; the released code's `<` selects none (then the
    pair's loss is 0, and gradients stay finite)."""
    for p in (0.5, 1e-30, 1.0, 0.123456789):
        x = torch.full((1, 6), math.log(p), dtype=torch.float32)
        x[0, 0] = 7.0  # a prompt position
        m = torch.tensor([[False, True, True, True, True, True]])
        for kind in ("arithmetic", "geometric"):
            assert torch.equal(confpo.confpo_mask(x, m, kind)[0], m)
            assert not confpo.confpo_mask(x, m, kind, strict=True)[0].any()
    single = torch.tensor([[False, True]])
    assert confpo.confpo_mask(torch.tensor([[0.0, -3.0]]), single)[0].tolist() == [[False, True]]
    w = torch.tensor([[0.0, -1.0, -1.0]], requires_grad=True)
    l = torch.tensor([[0.0, -2.0, -2.0]], requires_grad=True)
    m = torch.tensor([[False, True, True]])
    loss, met = confpo.confpo_loss(w, m, l, m, strict=True)
    assert loss.item() == 0 and met["empty"].item() == 1
    loss.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(l.grad, torch.zeros_like(l))


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("normalize", ["selected", "response"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_confpo_loss_against_loop(threshold, normalize, dtype):
    for seed, pad, strict in itertools.product(SEEDS, ["right", "left"], [False, True]):
        d = make_pair(seed, dtype, pad)
        kw = dict(beta=1.5, gamma=0.8, threshold=threshold, strict=strict, normalize=normalize)
        fast, metrics = confpo.confpo_loss(**d, **kw)
        slow = slow_pairs(slow_confpo, d, **kw)
        check_against(fast, slow, d, dtype)
        sel_w = confpo.confpo_mask(d["chosen_logps"], d["chosen_mask"], threshold, strict)[0]
        sel_l = confpo.confpo_mask(d["rejected_logps"], d["rejected_mask"], threshold, strict)[0]
        empty = (sel_w.sum(-1) == 0) | (sel_l.sum(-1) == 0)
        assert torch.equal(metrics["empty"], empty.float()) and (fast[empty] == 0).all()
        assert torch.equal(metrics["selected_chosen"], sel_w.sum(-1).float())
        # gradient only on selected tokens
        g_w, g_l = grads(fast.sum(), [d["chosen_logps"], d["rejected_logps"]])
        assert (g_w[~sel_w] == 0).all() and (g_l[~sel_l] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_confpo_selecting_every_token_is_simpo(dtype):
    for seed, pad in itertools.product(SEEDS, ["right", "left"]):
        d = make_pair(seed, dtype, pad)
        fast, metrics = confpo.confpo_loss(**d, beta=1.3, gamma=0.7, threshold=1.0)  # every pi <= 1
        simpo, simpo_metrics = losses.simpo_loss(**d, beta=1.3, gamma=0.7)
        torch.testing.assert_close(fast, simpo)
        torch.testing.assert_close(metrics["rewards_chosen"], metrics["rewards_chosen_all"])
        torch.testing.assert_close(metrics["rewards_rejected_all"], simpo_metrics["rewards_rejected"])
        assert (metrics["empty"] == 0).all()


@pytest.mark.parametrize("threshold", THRESHOLDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_confpo_dpo_against_loop(threshold, dtype):
    for seed, pad, strict in itertools.product(SEEDS, ["right", "left"], [False, True]):
        d = make_pair(seed, dtype, pad, ref=True)
        kw = dict(beta=0.4, threshold=threshold, strict=strict)
        fast, metrics = confpo.confpo_dpo_loss(**d, **kw)
        check_against(fast, slow_pairs(slow_confpo_dpo, d, **kw), d, dtype)
        assert {"rewards_chosen_all", "tau_chosen", "selected_rejected", "empty"} <= metrics.keys()


@pytest.mark.parametrize("dtype", DTYPES)
def test_confpo_dpo_selecting_every_token_is_dpo(dtype):
    for seed in SEEDS:
        d = make_pair(seed, dtype, "right", ref=True)
        fast, _ = confpo.confpo_dpo_loss(**d, beta=0.4, threshold=1.0)
        torch.testing.assert_close(fast, losses.dpo_loss(**d, beta=0.4)[0])


def test_random_mask_like_counts_subset_uniformity_and_seed():
    gen = torch.Generator().manual_seed(0)
    d = make_pair(3, torch.float32, "left", B=6, T=12)
    m = d["chosen_mask"]
    sel, _ = confpo.confpo_mask(d["chosen_logps"], m)
    r = confpo.random_mask_like(sel, m, torch.Generator().manual_seed(7))
    assert torch.equal(r.sum(-1), sel.sum(-1)) and not (r & ~m).any()
    assert torch.equal(r, confpo.random_mask_like(sel, m, torch.Generator().manual_seed(7)))
    # uniform: over many draws, every response position of a row is picked about c/n of the time
    m1 = torch.zeros(1, 10, dtype=torch.bool)
    m1[0, 2:10] = True  # n = 8
    s1 = torch.zeros_like(m1)
    s1[0, 2:5] = True  # c = 3
    counts = sum(confpo.random_mask_like(s1, m1, gen).float() for _ in range(4000))
    assert (counts[0, :2] == 0).all()
    freq = counts[0, 2:] / 4000
    assert (freq - 3 / 8).abs().max() < 0.03, freq  # 4000 draws: std ~ 0.008


def test_confpo_rand_loss_uses_the_same_counts():
    d = make_pair(2, torch.float32, "right")
    fast, metrics = confpo.confpo_rand_loss(**d, generator=torch.Generator().manual_seed(1))
    _, conf_metrics = confpo.confpo_loss(**d)
    assert torch.equal(metrics["selected_chosen"], conf_metrics["selected_chosen"])
    assert torch.equal(metrics["selected_rejected"], conf_metrics["selected_rejected"])
    assert torch.isfinite(fast).all()


# ---------------------------------------------------------------------------------------------------------------
# SePO
# ---------------------------------------------------------------------------------------------------------------

def test_token_scores_eq24():
    """s(y_t) = beta log(pi_oracle(y_t) / pi_ref(y_t)), from the probabilities themselves."""
    gen = torch.Generator().manual_seed(0)
    p_oracle, p_ref = torch.rand(3, 5, generator=gen) + 0.01, torch.rand(3, 5, generator=gen) + 0.01
    s = sepo.token_scores(p_oracle.log(), p_ref.log().to(torch.bfloat16), beta=0.5)
    assert s.dtype == torch.float32
    for b, t in itertools.product(range(3), range(5)):
        ratio = float(p_oracle[b, t]) / float(torch.tensor(float(p_ref[b, t])).log().to(torch.bfloat16).float().exp())
        assert math.isclose(float(s[b, t]), 0.5 * math.log(ratio), rel_tol=1e-4, abs_tol=1e-5)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.29, 0.3, 0.5, 0.7, 0.9, 1.0])
@pytest.mark.parametrize("highest", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_select_tokens_against_loop(ratio, highest, dtype):
    for seed, pad in itertools.product(SEEDS, ["right", "left"]):
        d = make_pair(seed, dtype, pad, T=15)
        s, m = d["rejected_logps"].detach(), d["rejected_mask"]  # quantised and all-equal rows give ties
        sel = sepo.select_tokens(s, m, ratio, highest)
        assert not (sel & ~m).any()
        for b in range(s.shape[0]):
            scores = [float(v) for v in toks(s, m, b)]
            got = [bool(sel[b, t]) for t in range(s.shape[1]) if m[b, t]]
            assert got == slow_select_ratio(scores, ratio, highest), (seed, pad, b, scores)
            assert sum(got) == math.floor(Fraction(str(ratio)) * len(scores))


def sepo_slow(w, l, sw, sl, beta, gamma):
    return slow_selective_simpo(w, l, sw, sl, beta, gamma)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sepo_loss_against_loop(dtype):
    for seed, pad, (rw, rl) in itertools.product(SEEDS, ["right", "left"], [(0.3, 0.3), (0.5, 0.1), (0.1, 0.9)]):
        d = make_pair(seed, dtype, pad, ref=True)
        sw = sepo.select_tokens(sepo.token_scores(d["chosen_logps"].detach(), d["ref_chosen_logps"]), d["chosen_mask"], rw)
        sl = sepo.select_tokens(sepo.token_scores(d["rejected_logps"].detach(), d["ref_rejected_logps"]),
                                d["rejected_mask"], rl, highest=False)
        pair = {k: v for k, v in d.items() if not k.startswith("ref_")}
        fast, metrics = sepo.sepo_loss(**pair, chosen_selected=sw, rejected_selected=sl, beta=1.5, gamma=0.3)
        slow = torch.stack([
            sepo_slow(toks(d["chosen_logps"], d["chosen_mask"], b), toks(d["rejected_logps"], d["rejected_mask"], b),
                      [bool(sw[b, t]) for t in range(sw.shape[1]) if d["chosen_mask"][b, t]],
                      [bool(sl[b, t]) for t in range(sl.shape[1]) if d["rejected_mask"][b, t]], 1.5, 0.3)
            for b in range(sw.shape[0])])
        check_against(fast, slow, d, dtype)
        empty = (sw.sum(-1) == 0) | (sl.sum(-1) == 0)
        assert torch.equal(metrics["empty"], empty.float())
        g_w, g_l = grads(fast.sum(), [d["chosen_logps"], d["rejected_logps"]])
        assert (g_w[~sw] == 0).all() and (g_l[~sl] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_sepo_anchor_adds_the_chosen_nll(dtype):
    """lambda_ adds - lambda (1/|y_w|) sum_t log pi(y_t^w) to every pair, empty selections included."""
    for seed, pad in itertools.product(SEEDS, ["right", "left"]):
        d = make_pair(seed, dtype, pad)
        sw = sepo.select_tokens(d["chosen_logps"].detach(), d["chosen_mask"], 0.3)
        sl = sepo.select_tokens(d["rejected_logps"].detach(), d["rejected_mask"], 0.3, highest=False)
        fast, _ = sepo.sepo_loss(**d, chosen_selected=sw, rejected_selected=sl, beta=1.5, lambda_=0.7)
        slow = torch.stack([
            sepo_slow(toks(d["chosen_logps"], d["chosen_mask"], b), toks(d["rejected_logps"], d["rejected_mask"], b),
                      [bool(sw[b, t]) for t in range(sw.shape[1]) if d["chosen_mask"][b, t]],
                      [bool(sl[b, t]) for t in range(sl.shape[1]) if d["rejected_mask"][b, t]], 1.5, 0.0)
            - 0.7 * tsum(toks(d["chosen_logps"], d["chosen_mask"], b)) / len(toks(d["chosen_logps"], d["chosen_mask"], b))
            for b in range(sw.shape[0])])
        check_against(fast, slow, d, dtype)
        plain, _ = sepo.sepo_loss(**d, chosen_selected=sw, rejected_selected=sl, beta=1.5)
        assert torch.equal(plain, sepo.sepo_loss(**d, chosen_selected=sw, rejected_selected=sl, beta=1.5,
                                                 lambda_=0.0)[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_sepo_ratio_one_is_simpo_gamma_zero(dtype):
    for seed in SEEDS:
        d = make_pair(seed, dtype, "left", ref=True)
        pair = {k: v for k, v in d.items() if not k.startswith("ref_")}
        sw = sepo.select_tokens(torch.randn(d["chosen_mask"].shape), d["chosen_mask"], 1.0)
        sl = sepo.select_tokens(torch.randn(d["rejected_mask"].shape), d["rejected_mask"], 1.0, highest=False)
        assert torch.equal(sw, d["chosen_mask"]) and torch.equal(sl, d["rejected_mask"])
        fast, _ = sepo.sepo_loss(**pair, chosen_selected=sw, rejected_selected=sl, beta=2.0)
        torch.testing.assert_close(fast, losses.simpo_loss(**pair, beta=2.0, gamma=0.0)[0])


def test_sepo_short_responses_give_empty_selections_not_nan():
    """floor(0.3 * 2) = 0 tokens: the released code divides 0 by 0 here; we give the pair loss 0."""
    w = torch.tensor([[0.0, -1.0, -2.0], [0.0, -1.0, -0.5]], requires_grad=True)
    m = torch.tensor([[False, True, True], [False, True, True]])
    m_long = torch.tensor([[False, True, True], [False, True, True]])
    sel = sepo.select_tokens(w.detach(), m, 0.3)
    assert not sel.any()
    loss, metrics = sepo.sepo_loss(w, m, w, m_long, sel, sepo.select_tokens(w.detach(), m_long, 0.5), beta=1.0)
    assert torch.equal(loss, torch.zeros(2)) and torch.equal(metrics["empty"], torch.ones(2))
    loss.mean().backward()
    assert torch.isfinite(w.grad).all()


# ---------------------------------------------------------------------------------------------------------------
# Robustness: no NaN or inf for any finite log-probs
# ---------------------------------------------------------------------------------------------------------------

SELECTIVE = [
    ("confpo", lambda d: confpo.confpo_loss(**{k: v for k, v in d.items() if not k.startswith("ref_")})),
    ("confpo_strict", lambda d: confpo.confpo_loss(**{k: v for k, v in d.items() if not k.startswith("ref_")}, strict=True)),
    ("confpo_rand", lambda d: confpo.confpo_rand_loss(**{k: v for k, v in d.items() if not k.startswith("ref_")},
                                                       generator=torch.Generator().manual_seed(0))),
    ("confpo_dpo", lambda d: confpo.confpo_dpo_loss(**d)),
    ("sepo", lambda d: sepo.sepo_loss(**{k: v for k, v in d.items() if not k.startswith("ref_")},
                                      chosen_selected=sepo.select_tokens(d["chosen_logps"].detach(), d["chosen_mask"], 0.3),
                                      rejected_selected=sepo.select_tokens(d["rejected_logps"].detach(), d["rejected_mask"], 0.3, False))),
    ("dpo", lambda d: losses.dpo_loss(**d)),
    ("ipo", lambda d: losses.ipo_loss(**d)),
    ("kto", lambda d: losses.kto_loss(**d)),
    ("rdpo", lambda d: losses.rdpo_loss(**d)),
    ("orpo", lambda d: losses.orpo_loss(**{k: v for k, v in d.items() if not k.startswith("ref_")})),
    ("simpo", lambda d: losses.simpo_loss(**{k: v for k, v in d.items() if not k.startswith("ref_")})),
]


@pytest.mark.parametrize("name,fn", SELECTIVE, ids=[s[0] for s in SELECTIVE])
@pytest.mark.parametrize("extreme", [0.0, -1e-30, -1e-4, -50.0, -1e4])
def test_finite_loss_and_gradients_on_extreme_inputs(name, fn, extreme):
    """Length-1 responses, all-equal responses (log-prob exactly 0 included), huge negative log-probs."""
    mask = torch.tensor([[False, True, False, False], [False, True, True, True], [False, False, True, True]])
    base = torch.tensor([[0.0, extreme, 0.0, 0.0], [0.0, extreme, extreme, extreme], [0.0, 0.0, extreme, -1.0]])
    d = dict(chosen_logps=base.clone().requires_grad_(), chosen_mask=mask,
             rejected_logps=(base * 2).requires_grad_(), rejected_mask=mask,
             ref_chosen_logps=base * 0.5, ref_rejected_logps=base)
    loss, metrics = fn(d)
    assert torch.isfinite(loss).all(), loss
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    loss.mean().backward()
    assert torch.isfinite(d["chosen_logps"].grad).all() and torch.isfinite(d["rejected_logps"].grad).all()
