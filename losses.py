"""The core: per-token log-probs, masked reductions, and every pairwise preference objective.

Conventions (the whole repo follows them):
- per-token log-probs `logps` and masks `mask` are [B, T], aligned with the input ids: position t holds
  log pi(y_t | x, y_<t), predicted from the logits at position t-1; position 0 is never a response token.
- a mask is bool, True on response tokens (the final EOS included), False on prompt and padding. A selective method
  is a standard objective over a different mask (a subset of the response mask). Masks carry no gradient.
- every objective takes per-token log-probs and masks (never pre-summed values) and returns `(losses, metrics)`:
  `losses` [B] float32, one per preference pair, unreduced; `metrics` a dict of detached [B] tensors, at least
  `rewards_chosen` and `rewards_rejected` (the trainer derives margins and accuracies from them).

The formulas are those of the ConfPO paper's Table 5 (itself SimPO's Table); where a default departs from it, a
`NOTE(deviation)` says why. ConfPO lives in confpo.py and SePO in sepo.py, both on top of these functions.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # Hugging Face's label for "not a target token"


# ---------------------------------------------------------------------------------------------------------------
# Per-token log-probs without a full-vocabulary float32 log-softmax copy
# ---------------------------------------------------------------------------------------------------------------

def _targets(labels, ignore_index):
    """Shift Hugging Face labels: position t is predicted by position t-1. Returns (mask [B, T], rows [N], targets [N]).

    rows index the flattened [B*T] positions whose *logits* predict a response token (t-1 for target t).
    """
    B, T = labels.shape
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, 1:] = labels[:, 1:] != ignore_index  # (B, T)
    b, t = mask.nonzero(as_tuple=True)
    rows = b * T + (t - 1)  # the logits row that predicts token t
    return mask, rows, labels[b, t]


def _scatter_rows(values, mask):
    """[N] values of the response positions -> [B, T] float32, zero elsewhere (an autograd-friendly scatter)."""
    out = torch.zeros(mask.shape, dtype=values.dtype, device=values.device)
    return out.masked_scatter(mask, values)


# The default block, in bytes of float32 logits whatever the vocabulary: 32 MiB on a CPU (bench.py item 2), 512 MiB
# on a GPU, where a block is one matmul that re-reads the whole output embedding (at V = 128k, 65 rows per 32 MiB
# block would be ~60 small matmuls for one micro-batch; 512 MiB gives ~1000 rows; bench.py --large measures it).
CHUNK_BYTES = {"cpu": 2**25, "cuda": 2**29}


def _chunk_rows(chunk_size, V, device=None):
    """Response tokens per (rows, V) block: chunk_size when given, else as many as fit in CHUNK_BYTES of the device."""
    budget = CHUNK_BYTES.get(getattr(device, "type", "cpu"), CHUNK_BYTES["cpu"])
    return chunk_size if chunk_size else max(1, budget // (4 * V))


class _LogSoftmaxGather(torch.autograd.Function):
    """log_softmax(logits)[rows, targets] computed chunk by chunk, in float32 (float64 stays float64), with a
    recomputing backward.

    Autograd through `logits.float().log_softmax(-1)` would keep a float32 [N, V] copy alive until backward; this
    keeps the logits in their own dtype (the model's output) and one [N] logsumexp.
    """

    @staticmethod
    def forward(ctx, logits, rows, targets, chunk_size):  # logits (B*T, V), rows (N,), targets (N,)
        N = rows.numel()
        dtype = torch.promote_types(logits.dtype, torch.float32)
        lse = torch.empty(N, dtype=dtype, device=logits.device)
        picked = torch.empty(N, dtype=dtype, device=logits.device)
        for s in range(0, N, chunk_size):
            x = _f32(logits.index_select(0, rows[s:s + chunk_size]))  # (c, V), float32 or float64
            lse[s:s + chunk_size] = torch.logsumexp(x, dim=-1)
            picked[s:s + chunk_size] = x.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.chunk_size = chunk_size
        return picked - lse

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        logits, rows, targets, lse = ctx.saved_tensors
        grad_logits = torch.zeros_like(logits)
        for s in range(0, rows.numel(), ctx.chunk_size):
            r, g = rows[s:s + ctx.chunk_size], grad[s:s + ctx.chunk_size, None].to(lse.dtype)
            # d/dz [z_y - logsumexp(z)] = onehot(y) - softmax(z), built in place in the block (one (c, V) alive)
            d = _f32(logits.index_select(0, r)).sub_(lse[s:s + ctx.chunk_size, None]).exp_().mul_(-g)  # (c, V)
            d.scatter_add_(-1, targets[s:s + ctx.chunk_size, None], g)
            grad_logits.index_copy_(0, r, d.to(logits.dtype))
        return grad_logits, None, None, None


def token_logps(logits, labels, ignore_index=IGNORE_INDEX, chunk_size=None):
    """Per-token log-probs of the labels under the logits.

    logps[b, t] = log softmax(logits[b, t-1])[labels[b, t]]  where labels[b, t] != ignore_index, else 0.

    Args:
        logits: (B, T, V) any float dtype (bf16 accepted); the model's output for the same input ids.
        labels: (B, T) long, Hugging Face layout (same length as the input ids, -100 outside responses); the
            shift happens here.
        chunk_size: response tokens per float32 (chunk_size, V) block (None: as many as fit in CHUNK_BYTES); no
            (B, T, V) float32 copy is ever made and prompt and padding positions cost nothing.
    Returns:
        logps (B, T) float32 (float64 for float64 logits), mask (B, T) bool (True where a label is given; always
        False at t = 0).
    """
    B, T, V = logits.shape
    mask, rows, targets = _targets(labels, ignore_index)
    picked = _LogSoftmaxGather.apply(logits.reshape(B * T, V), rows, targets,
                                     _chunk_rows(chunk_size, V, logits.device))  # (N,)
    return _scatter_rows(picked, mask), mask


def _matmul_dtype(hidden, weight):
    """The dtype of hidden @ W.T: autocast's (bf16 under a bf16 autocast) where it is on, else the inputs'."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _LinearLogSoftmaxGather(torch.autograd.Function):
    """log_softmax(hidden @ W.T)[rows, targets] without ever holding more than a (chunk, V) block of logits.

    The products run in one dtype, chosen in forward (bf16 under a bf16 autocast) and cast to explicitly in forward
    and backward alike: backward runs outside autocast, and a float32 recomputation of bf16 logits would give
    softmax rows that do not sum to 1 against the forward's log-sum-exp (a gradient off by several percent)."""

    @staticmethod
    def forward(ctx, hidden, weight, rows, targets, chunk_size):  # hidden (B*T, H), weight (V, H)
        N = rows.numel()
        dtype = _matmul_dtype(hidden, weight)
        w = weight.to(dtype)
        lse = torch.empty(N, dtype=torch.float32, device=hidden.device)
        picked = torch.empty(N, dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk_size):
            z = (hidden.index_select(0, rows[s:s + chunk_size]).to(dtype) @ w.T).float()  # (c, V)
            lse[s:s + chunk_size] = torch.logsumexp(z, dim=-1)
            picked[s:s + chunk_size] = z.gather(-1, targets[s:s + chunk_size, None]).squeeze(-1)
        ctx.save_for_backward(hidden, weight, rows, targets, lse)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return picked - lse

    @staticmethod
    def backward(ctx, grad):  # grad (N,)
        hidden, weight, rows, targets, lse = ctx.saved_tensors
        w = weight.to(ctx.dtype)  # the forward's products, in the forward's dtype
        grad_hidden = torch.zeros_like(hidden)
        # accumulated over chunks in float32: a transient (V, H) buffer, the size of the weight in fp32
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, rows.numel(), ctx.chunk_size):
            r, g = rows[s:s + ctx.chunk_size], grad[s:s + ctx.chunk_size, None].float()
            h = hidden.index_select(0, r).to(ctx.dtype)  # (c, H)
            z = (h @ w.T).float()  # (c, V), recomputed rather than stored: the forward's very logits
            d = z.sub_(lse[s:s + ctx.chunk_size, None]).exp_().mul_(-g)  # onehot(y) - softmax(z), times grad
            d.scatter_add_(-1, targets[s:s + ctx.chunk_size, None], g)
            d = d.to(ctx.dtype)
            grad_hidden.index_copy_(0, r, (d @ w).to(hidden.dtype))
            grad_weight.add_(d.T @ h)  # promoted to float32 inside the add: no float32 copy of the (V, H) product
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None


def chunked_token_logps(hidden, lm_head_weight, labels, chunk_size=None, ignore_index=IGNORE_INDEX):
    """`token_logps` from the last hidden states, never materialising the (B, T, V) logits.

    logps[b, t] = log softmax(hidden[b, t-1] @ W.T)[labels[b, t]]  for labelled t, else 0.

    For models whose logits are exactly `hidden @ W.T` (no bias, no soft-capping, no logit scale: Llama, Mistral,
    Qwen, GPT-NeoX, ...). Only response positions are projected, so long prompts cost no vocabulary matmul.

    Args:
        hidden: (B, T, H) the final-norm output of the decoder.
        lm_head_weight: (V, H) the output embedding.
        labels: (B, T) as in `token_logps`.
    Returns:
        logps (B, T) float32, mask (B, T) bool.
    """
    B, T, H = hidden.shape
    mask, rows, targets = _targets(labels, ignore_index)
    picked = _LinearLogSoftmaxGather.apply(hidden.reshape(B * T, H), lm_head_weight, rows, targets,
                                           _chunk_rows(chunk_size, lm_head_weight.shape[0], hidden.device))
    return _scatter_rows(picked, mask), mask


# ---------------------------------------------------------------------------------------------------------------
# Masked reductions
# ---------------------------------------------------------------------------------------------------------------

def _f32(x):
    """Half-precision log-probs are reduced in float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def log_ratio(logps, ref_logps):
    """log pi_theta(y_t)/pi_ref(y_t) per token, in float32 at least (bf16 differences lose the small ones)."""
    return _f32(logps) - _f32(ref_logps)


def masked_sum(values, mask):
    """sum_t mask[b, t] * values[b, t] -> (B,). Values outside the mask are ignored, even if inf or NaN."""
    values = _f32(values)
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(-1)


def masked_mean(values, mask):
    """(1/|mask_b|) sum_t mask[b, t] * values[b, t] -> (B,); 0 for an empty row (never 0/0)."""
    return masked_sum(values, mask) / mask.sum(-1).clamp(min=1)


def top_k_mask(keys, mask, k):
    """Per row, the k[b] positions of `mask` with the largest keys, ties to the earliest position -> (B, T) bool.

    keys (B, T) float, mask (B, T) bool, k (B,) long. Vectorised: one stable sort per row, then keep ranks < k.
    The selection rule behind SePO's Eq. 25 and ConfPO-rand.
    """
    keys = keys.masked_fill(~mask, -torch.inf)  # non-response positions rank last
    order = keys.argsort(dim=-1, descending=True, stable=True)  # (B, T) positions, best first, ties earliest
    positions = torch.arange(mask.shape[-1], device=mask.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(-1, order, positions)  # ranks[b, order[b, r]] = r
    return mask & (ranks < k[:, None])


def zero_empty_pairs(losses, chosen_selected, rejected_selected):
    """The one rule of every selective loss: a pair whose selection is empty on either side gets loss 0 and stays
    in the batch mean (the ConfPO authors' code does the same; SePO's divides 0 by 0). -> (losses, empty (B,))."""
    empty = (chosen_selected.sum(-1) == 0) | (rejected_selected.sum(-1) == 0)
    return torch.where(empty, torch.zeros_like(losses), losses), empty


def selection_metrics(rewards_chosen, rewards_rejected, rewards_chosen_all, rewards_rejected_all, chosen_selected,
                      rejected_selected, chosen_mask, rejected_mask, empty, **extra):
    """The one place for the metrics of a selective objective, all detached (B,): its rewards over the selected
    tokens and over every response token (`*_all`), the selected counts, the response lengths and `empty`."""
    return _detached(rewards_chosen=rewards_chosen, rewards_rejected=rewards_rejected,
                     rewards_chosen_all=rewards_chosen_all, rewards_rejected_all=rewards_rejected_all,
                     selected_chosen=chosen_selected.sum(-1).float(), selected_rejected=rejected_selected.sum(-1).float(),
                     length_chosen=chosen_mask.sum(-1).float(), length_rejected=rejected_mask.sum(-1).float(),
                     empty=empty.float(), **extra)


def _detached(**metrics):
    return {k: v.detach() for k, v in metrics.items()}


# ---------------------------------------------------------------------------------------------------------------
# Objectives. Arguments, for all of them:
#   chosen_logps, rejected_logps: (B, T) policy per-token log-probs (y^w and y^l)
#   chosen_mask, rejected_mask:   (B, T) bool, the tokens that count
#   ref_chosen_logps, ref_rejected_logps: (B, T) reference per-token log-probs on the same token ids
# The two sides may have different T. Returns (losses (B,), metrics). The formula of each is on the comment line
# above the code that computes it, the equation numbers those of the ConfPO paper (Table 5 for the baselines).
# NOTE(deviation): Table 5 writes the NLL term of CPO, RRHF and SLiC-HF as -lambda log pi(y_w|x), a sum; like the
# original RRHF, CPO and ORPO code and TRL, we use the per-token mean, which keeps lambda independent of length.
# ---------------------------------------------------------------------------------------------------------------

def sft_loss(logps, mask, length_normalize=True):
    """SFT (SePO Eq. 23): L = -log pi(y^w | x), on the chosen responses only.

    Returns per-response -(1/|y|) sum_t log pi(y_t) (length_normalize=True) or -sum_t log pi(y_t) (False), and
    metrics `nll` (mean token NLL) and `response_tokens` (|y|).
    NOTE(deviation): Eq. 23 is an expectation of sequence log-likelihoods; train.py divides the summed NLL by the
    global batch's token count instead, the Hugging Face / TRL convention for SFT (a token mean).
    """
    # Eq. 23 (SFT): -log pi(y^w | x) = -sum_t log pi(y_t | x, y_<t)
    total = -masked_sum(logps, mask)
    tokens = mask.sum(-1)
    losses = total / tokens.clamp(min=1) if length_normalize else total
    return losses, _detached(nll=total / tokens.clamp(min=1), response_tokens=tokens.float())


def dpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023; ConfPO Eq. 3-4):
    L = -log sigmoid( beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l) ), log-ratios summed over tokens.

    label_smoothing eps > 0 gives conservative DPO: -(1-eps) log sigmoid(z) - eps log sigmoid(-z).
    Metrics: rewards = beta * summed log-ratio.
    """
    # Eq. 3 (DPO): r(x, y) = beta sum_i log pi_theta(y_i)/pi_ref(y_i)
    r_w = beta * masked_sum(log_ratio(chosen_logps, ref_chosen_logps), chosen_mask)
    r_l = beta * masked_sum(log_ratio(rejected_logps, ref_rejected_logps), rejected_mask)
    # Eq. 4 (DPO): L = -log sigmoid(r_w - r_l)   (cDPO: -(1-eps) log sigmoid(z) - eps log sigmoid(-z))
    losses = -(1 - label_smoothing) * F.logsigmoid(r_w - r_l) - label_smoothing * F.logsigmoid(-(r_w - r_l))
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def ipo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps, ref_rejected_logps,
             tau=0.1):
    """IPO (Azar et al. 2024):
    L = ( log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l) - 1/(2 tau) )^2.

    NOTE(deviation): Table 5 writes summed log-ratios; like TRL (whose `beta` is this tau) we average them over
    tokens, which is what the SimPO/ConfPO baselines ran and keeps 1/(2 tau) meaningful across lengths.
    Metrics: rewards = mean token log-ratio.
    """
    # log pi_theta(y|x)/pi_ref(y|x), averaged over the masked tokens
    r_w = masked_mean(log_ratio(chosen_logps, ref_chosen_logps), chosen_mask)
    r_l = masked_mean(log_ratio(rejected_logps, ref_rejected_logps), rejected_mask)
    # Table 5 (IPO): L = (r_w - r_l - 1/(2 tau))^2
    losses = (r_w - r_l - 1 / (2 * tau)) ** 2
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def simpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=2.0, gamma=1.0,
               label_smoothing=0.0):
    """SimPO (Meng et al. 2024; ConfPO Eq. 5-6):
    r(x, y) = beta/|y| sum_t log pi(y_t);   L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma ).

    Defaults beta 2.0, gamma 1.0: SimPO's Llama-3-Base setting (gamma/beta = 0.5). |y| is the number of masked
    tokens: over ConfPO's confidence mask this is ConfPO (confpo.py), over an oracle's selection with gamma 0 it is
    SePO's Eq. 26 (sepo.py); both write their own arithmetic, and tests check them against this function.
    """
    # Eq. 5 (SimPO): r(x, y) = beta/|y| sum_t log pi(y_t)
    r_w = beta * masked_sum(chosen_logps, chosen_mask) / chosen_mask.sum(-1).clamp(min=1)
    r_l = beta * masked_sum(rejected_logps, rejected_mask) / rejected_mask.sum(-1).clamp(min=1)
    # Eq. 6 (SimPO): L = -log sigmoid(r_w - r_l - gamma)   (label smoothing as in DPO)
    z = r_w - r_l - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def cpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=0.1, lambda_=1.0):
    """CPO (Xu et al. 2024):
    L = -log sigmoid( beta log pi(y_w) - beta log pi(y_l) ) - lambda log pi(y_w), log-probs summed over tokens,
    the NLL term as a token mean. lambda 1.0 as in the CPO paper (TRL's cpo_alpha).
    """
    r_w = beta * masked_sum(chosen_logps, chosen_mask)
    r_l = beta * masked_sum(rejected_logps, rejected_mask)
    # Table 5 (CPO): L = -log sigmoid(beta log pi(y_w) - beta log pi(y_l)) - lambda log pi(y_w)
    losses = -F.logsigmoid(r_w - r_l) - lambda_ * masked_mean(chosen_logps, chosen_mask)
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def rrhf_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, lambda_=1.0):
    """RRHF (Yuan et al. 2023):
    L = max(0, -(1/|y_w|) log pi(y_w) + (1/|y_l|) log pi(y_l)) - lambda log pi(y_w), NLL as a token mean.
    lambda 1.0: RRHF adds its ranking and fine-tuning losses unweighted.
    """
    r_w = masked_mean(chosen_logps, chosen_mask)
    r_l = masked_mean(rejected_logps, rejected_mask)
    # Table 5 (RRHF): L = max(0, -(1/|y_w|) log pi(y_w) + (1/|y_l|) log pi(y_l)) - lambda log pi(y_w)
    losses = torch.relu(r_l - r_w) - lambda_ * masked_mean(chosen_logps, chosen_mask)
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def slic_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, delta=1.0, lambda_=0.1):
    """SLiC-HF (Zhao et al. 2023):
    L = max(0, delta - log pi(y_w) + log pi(y_l)) - lambda log pi(y_w), log-probs summed, NLL as a token mean.
    delta 1.0 and lambda 0.1 are from the grid SimPO searched for this baseline.
    """
    r_w = masked_sum(chosen_logps, chosen_mask)
    r_l = masked_sum(rejected_logps, rejected_mask)
    # Table 5 (SLiC-HF): L = max(0, delta - log pi(y_w) + log pi(y_l)) - lambda log pi(y_w)
    losses = torch.relu(delta - r_w + r_l) - lambda_ * masked_mean(chosen_logps, chosen_mask)
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, lambda_=0.1):
    """ORPO (Hong et al. 2024):
    p(y|x) = exp( (1/|y|) log pi(y|x) ),  odds(y) = p / (1 - p),
    L = -log p(y_w|x) - lambda log sigmoid( log odds(y_w) - log odds(y_l) ).  lambda 0.1 as in the ORPO paper.

    A response whose mean log-prob is exactly 0 (p = 1) has infinite odds; its mean is capped at -1e-6 so the
    loss and its gradient stay finite. Metrics: rewards = (1/|y|) log pi(y|x).
    """
    # log p(y|x) = (1/|y|) log pi(y|x), capped below 0
    logp_w = masked_mean(chosen_logps, chosen_mask).clamp(max=-1e-6)
    logp_l = masked_mean(rejected_logps, rejected_mask).clamp(max=-1e-6)
    # log odds(y_w) - log odds(y_l), with log odds = log p - log(1 - p)
    log_odds = (logp_w - _log1mexp(logp_w)) - (logp_l - _log1mexp(logp_l))
    # Table 5 (ORPO): L = -log p(y_w|x) - lambda log sigmoid(log odds(y_w) - log odds(y_l))
    losses = -logp_w - lambda_ * F.logsigmoid(log_odds)
    return losses, _detached(rewards_chosen=logp_w, rewards_rejected=logp_l, log_odds=log_odds)


def rdpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps, ref_rejected_logps,
              beta=0.1, alpha=0.05):
    """R-DPO (Park et al. 2024), as written in ConfPO's (and SimPO's) Table 5:
    L = -log sigmoid( beta log pi(y_w)/pi_ref(y_w) - beta log pi(y_l)/pi_ref(y_l) + (alpha |y_w| - alpha |y_l|) ).
    alpha 0.05 from the grid SimPO searched. Metrics: rewards = beta * summed log-ratio (no length term).
    """
    r_w = beta * masked_sum(log_ratio(chosen_logps, ref_chosen_logps), chosen_mask)
    r_l = beta * masked_sum(log_ratio(rejected_logps, ref_rejected_logps), rejected_mask)
    # Table 5 (R-DPO): L = -log sigmoid(r_w - r_l + (alpha |y_w| - alpha |y_l|))
    losses = -F.logsigmoid(r_w - r_l + alpha * (chosen_mask.sum(-1) - rejected_mask.sum(-1)).to(r_w.dtype))
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l)


def kto_reference_point(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps,
                        ref_rejected_logps, beta=0.1):
    """KTO's z_ref = E[beta KL(pi || pi_ref)] estimated on paired data, as (sum, count) of the detached rewards
    beta * sum_t log pi/pi_ref over every response, so that a trainer can all-reduce both; z_ref = max(0, sum/count).

    NOTE(deviation): TRL estimates the KL on mismatched (x, y') pairs, which costs an extra forward; on paired data
    we use the matched responses themselves (still a sample of pi's outputs' log-ratios, detached).
    """
    rewards = torch.cat([masked_sum(log_ratio(chosen_logps, ref_chosen_logps), chosen_mask),
                         masked_sum(log_ratio(rejected_logps, ref_rejected_logps), rejected_mask)])
    return (beta * rewards).detach().sum(), rewards.numel()


def kto_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps, ref_rejected_logps,
             beta=0.1, lambda_w=1.0, lambda_l=1.0, z_ref=None):
    """KTO (Ethayarajh et al. 2024), paired form: each pair gives one desirable and one undesirable example.
    r(y) = beta log pi(y)/pi_ref(y) (summed);  z_ref = E[beta KL(pi || pi_ref)];
    L = lambda_w (1 - sigmoid(r(y_w) - z_ref)) + lambda_l (1 - sigmoid(z_ref - r(y_l))).

    z_ref: a scalar; None estimates it from this batch (kto_reference_point: beta * the mean summed log-ratio of its
    responses, detached, clamped at 0); train.py passes the estimate all-reduced over ranks, as TRL does.
    NOTE(deviation): Table 5 prints the losses as -lambda_w sigmoid(...) + lambda_l sigmoid(z_ref - r(y_l)); the
    second sign is a typo (it would raise the rejected reward); we follow the KTO paper, 1 - v(x, y). TRL averages
    over the 2B examples, which is half this per-pair sum.
    """
    r_w = beta * masked_sum(log_ratio(chosen_logps, ref_chosen_logps), chosen_mask)
    r_l = beta * masked_sum(log_ratio(rejected_logps, ref_rejected_logps), rejected_mask)
    if z_ref is None:
        total, count = kto_reference_point(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps,
                                           ref_rejected_logps, beta)
        z_ref = (total / count).clamp(min=0)
    # Table 5 (KTO; the KTO paper's signs): L = lambda_w (1 - sigma(r_w - z_ref)) + lambda_l (1 - sigma(z_ref - r_l))
    losses = lambda_w * (1 - torch.sigmoid(r_w - z_ref)) + lambda_l * (1 - torch.sigmoid(z_ref - r_l))
    return losses, _detached(rewards_chosen=r_w, rewards_rejected=r_l,
                             z_ref=torch.as_tensor(z_ref, device=losses.device).expand_as(losses))
