"""ConfPO (Yoon et al.): preference optimization on the tokens the policy is unsure of.

The selection uses the policy's own per-token log-probs from the training forward pass (detached), so it costs no
extra forward: ConfPO is SimPO (losses.simpo_loss) over the confidence mask, and ConfPO_DPO is DPO over it.

    Eq. 14  tau = (1/|y|) sum_i pi(y_i)                       (arithmetic mean of token probabilities, per response)
    Eq. 12  s(y_i) = 1[pi(y_i) <= tau],  |y_s| = sum_i s(y_i),  r(x, y) = beta/|y_s| sum_i s(y_i) log pi(y_i)
    Eq. 13  L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )
    Eq. 15  L = -log sigmoid( beta sum_i s(y_i^w) log pi/pi_ref(y_i^w) - beta sum_i s(y_i^l) log pi/pi_ref(y_i^l) )
    App. B  tau = geometric mean, exp((1/|y|) sum_i log pi(y_i)), or a fixed probability (0.6)
    Table 2 ConfPO-rand: as many tokens as ConfPO selects, drawn uniformly (a control that should do worse)

Shapes as in losses.py: logps and masks are (B, T); position t holds log pi(y_t | x, y_<t).
"""

import math

import torch

from losses import dpo_loss, masked_mean, selective_loss, simpo_loss, top_k_mask


def confidence_threshold(logps, mask, kind="arithmetic"):
    """The confidence threshold log tau of each response (B,), detached.

    kind:
      "arithmetic" (Eq. 14, the paper's choice): tau = (1/|y|) sum_i pi(y_i), computed as
          log tau = logsumexp_i log pi(y_i) - log |y|  (no underflow for very unlikely tokens);
      "geometric" (App. B, Eq. 16): log tau = (1/|y|) sum_i log pi(y_i);
      a float p in (0, 1] (App. B "fixed", the paper tries 0.6): log tau = log p.
    A mean lies between the smallest and largest term, so log tau is clamped to [min_i, max_i] log pi(y_i): this
    changes nothing mathematically, but stops float rounding from selecting no token of an all-equal response.
    An empty row gets log tau = 0.
    """
    logps = logps.detach()
    logps = logps.float() if logps.dtype in (torch.float16, torch.bfloat16) else logps
    n = mask.sum(-1)
    if kind == "arithmetic":
        log_tau = torch.logsumexp(logps.masked_fill(~mask, -math.inf), dim=-1) - n.clamp(min=1).log()
    elif kind == "geometric":
        log_tau = masked_mean(logps, mask)
    elif isinstance(kind, (int, float)) and not isinstance(kind, bool) and 0 < kind <= 1:
        return torch.full(n.shape, math.log(kind), dtype=logps.dtype, device=logps.device)
    else:
        raise ValueError(f"threshold must be 'arithmetic', 'geometric' or a probability in (0, 1], got {kind!r}")
    lo = logps.masked_fill(~mask, math.inf).amin(-1)
    hi = logps.masked_fill(~mask, -math.inf).amax(-1)
    log_tau = torch.minimum(torch.maximum(log_tau, lo), hi)
    return torch.where(n > 0, log_tau, torch.zeros_like(log_tau))


def parse_threshold(value):
    """A threshold from a flag or a file: "arithmetic", "geometric", or a probability in (0, 1] (string or number)."""
    if value in ("arithmetic", "geometric"):
        return value
    try:
        p = float(value)
    except (TypeError, ValueError):
        p = -1.0
    if not 0 < p <= 1:
        raise ValueError(f"threshold must be arithmetic, geometric or a probability in (0, 1], got {value!r}")
    return p


def confpo_mask(logps, mask, threshold="arithmetic", strict=False):
    """Eq. 12 selection s(y_i) = 1[pi(y_i) <= tau] on the response tokens, from detached log-probs -> (B, T) bool.

    strict=True uses `<` as the authors' released code does (the paper writes `<=`; with `<` an all-equal response
    selects nothing). Returns (selected, log_tau).
    """
    log_tau = confidence_threshold(logps, mask, threshold)
    logps = logps.detach()
    logps = logps.float() if logps.dtype in (torch.float16, torch.bfloat16) else logps
    below = logps < log_tau[:, None] if strict else logps <= log_tau[:, None]
    return mask & below, log_tau


def random_mask_like(selected, mask, generator=None):
    """ConfPO-rand (Table 2): for each response, as many tokens as `selected` holds, drawn uniformly without
    replacement from its response tokens (`mask`) -> (B, T) bool. Vectorised: the top i.i.d. uniform keys of each
    row. `generator` must live on the masks' device."""
    keys = torch.rand(mask.shape, generator=generator, device=mask.device)
    return top_k_mask(keys, mask, (selected & mask).sum(-1))


def _with_tau(result, log_tau_chosen, log_tau_rejected):
    losses, metrics = result
    metrics.update(tau_chosen=log_tau_chosen.exp(), tau_rejected=log_tau_rejected.exp())
    return losses, metrics


def confpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=1.0, gamma=2.0,
                threshold="arithmetic", strict=False, normalize="selected", chosen_selected=None,
                rejected_selected=None):
    """ConfPO (Eq. 12-14): SimPO over the confidence masks.
    r(x, y) = beta/|y_s| sum_i s(y_i) log pi(y_i);   L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma ).

    Defaults beta 1.0, gamma 2.0: the paper's Llama-3-Base setting (Table 6; Mistral-Base 1.5 / 1.6).
    normalize: "selected" divides by |y_s| (Eq. 12-13 and the released code); "response" divides by |y| as App.
        Table 5 writes it.
    chosen_selected / rejected_selected: (B, T) bool masks to use instead of the confidence masks (ConfPO-rand).
    A pair with an empty selection on either side has loss 0 (losses.zero_empty_pairs).
    Metrics: rewards over the selected tokens, rewards over all tokens (`*_all`), tau, selected counts, lengths,
    `empty`.
    """
    if normalize not in ("selected", "response"):
        raise ValueError(f"normalize must be 'selected' or 'response', got {normalize!r}")
    # s(y_i) = 1[pi(y_i) <= tau]  with tau from Eq. 14 (or App. B)
    sel_w, log_tau_w = confpo_mask(chosen_logps, chosen_mask, threshold, strict)
    sel_l, log_tau_l = confpo_mask(rejected_logps, rejected_mask, threshold, strict)
    sel_w = sel_w if chosen_selected is None else chosen_selected & chosen_mask
    sel_l = sel_l if rejected_selected is None else rejected_selected & rejected_mask
    lengths = dict(chosen_length=chosen_mask.sum(-1), rejected_length=rejected_mask.sum(-1))
    # -log sigmoid( beta/|y_s^w| sum s log pi(y^w) - beta/|y_s^l| sum s log pi(y^l) - gamma )
    return _with_tau(selective_loss(simpo_loss, chosen_logps, chosen_mask, rejected_logps, rejected_mask, sel_w, sel_l,
                                    beta=beta, gamma=gamma, **(lengths if normalize == "response" else {})),
                     log_tau_w, log_tau_l)


def confpo_rand_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=1.0, gamma=2.0,
                     threshold="arithmetic", strict=False, normalize="selected", generator=None):
    """ConfPO-rand (Table 2): ConfPO's objective over random tokens, as many per response as ConfPO would select."""
    sel_w, _ = confpo_mask(chosen_logps, chosen_mask, threshold, strict)
    sel_l, _ = confpo_mask(rejected_logps, rejected_mask, threshold, strict)
    return confpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=beta, gamma=gamma,
                       threshold=threshold, strict=strict, normalize=normalize,
                       chosen_selected=random_mask_like(sel_w, chosen_mask, generator),
                       rejected_selected=random_mask_like(sel_l, rejected_mask, generator))


def confpo_dpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, ref_chosen_logps, ref_rejected_logps,
                    beta=0.1, threshold="arithmetic", strict=False):
    """ConfPO_DPO (Eq. 15): DPO whose log-ratios are summed over the policy's low-confidence tokens only.
    L = -log sigmoid( beta sum_i s(y_i^w) log pi/pi_ref(y_i^w) - beta sum_i s(y_i^l) log pi/pi_ref(y_i^l) ),
    s from the policy's confidence (Eq. 14), the same mask applied to the reference log-probs; sums, not means.

    threshold "arithmetic" as the paper says ("As in Eq. 14"); the released code uses "geometric" here.
    beta 0.1: DPO's usual value (the paper does not list one). Metrics as `confpo_loss`.
    """
    sel_w, log_tau_w = confpo_mask(chosen_logps, chosen_mask, threshold, strict)
    sel_l, log_tau_l = confpo_mask(rejected_logps, rejected_mask, threshold, strict)
    # -log sigmoid( beta sum s log pi/pi_ref (y^w) - beta sum s log pi/pi_ref (y^l) )
    return _with_tau(selective_loss(dpo_loss, chosen_logps, chosen_mask, rejected_logps, rejected_mask, sel_w, sel_l,
                                    ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
                                    beta=beta), log_tau_w, log_tau_l)
