"""ConfPO (Yoon et al.): preference optimization on the tokens the policy is unsure of.

The selection uses the policy's own per-token log-probs from the training forward pass (detached), so it costs no
extra forward: ConfPO is SimPO (losses.simpo_loss) over the confidence mask, and ConfPO_DPO is DPO over it. Each
objective below writes its equations out, one per line; tests check them against loops and against SimPO / DPO
when every token is selected.

    Eq. 14  tau = (1/|y|) sum_i pi(y_i)                       (arithmetic mean of token probabilities, per response)
    Eq. 12  s(y_i) = 1[pi(y_i) <= tau],  |y_s| = sum_i s(y_i),  r(x, y) = beta/|y_s| sum_i s(y_i) log pi(y_i)
    Eq. 13  L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )
    Eq. 15  L = -log sigmoid( beta sum_i s(y_i^w) log pi/pi_ref(y_i^w) - beta sum_i s(y_i^l) log pi/pi_ref(y_i^l) )
    Eq. 16  (App. B) tau = geometric mean, exp((1/|y|) sum_i log pi(y_i)); or a fixed probability (0.6)
    Table 2 ConfPO-rand: as many tokens as ConfPO selects, drawn uniformly (a control that should do worse)

Shapes as in losses.py: logps and masks are (B, T); position t holds log pi(y_t | x, y_<t).
"""

import math

import torch
import torch.nn.functional as F

from losses import log_ratio, masked_mean, masked_sum, selection_metrics, top_k_mask, zero_empty_pairs


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
        # Eq. 14: tau = (1/|y|) sum_i pi(y_i), in log space
        log_tau = torch.logsumexp(logps.masked_fill(~mask, -math.inf), dim=-1) - n.clamp(min=1).log()
    elif kind == "geometric":
        # Eq. 16: tau = (prod_i pi(y_i))^(1/|y|)
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


def low_confidence(logps, log_tau, strict=False):
    """Eq. 12's test pi(y_i) <= tau, from detached log-probs (B, T) and log tau (B,) -> (B, T) bool.
    strict=True compares with `<`, as the authors' released code does (with it an all-equal response selects
    nothing)."""
    below = torch.lt if strict else torch.le
    return below(logps.detach(), log_tau[:, None])


def confpo_mask(logps, mask, threshold="arithmetic", strict=False):
    """ConfPO's selection of one side (Eq. 12 with tau by Eq. 14) -> (selected (B, T) bool, log tau (B,))."""
    log_tau = confidence_threshold(logps, mask, threshold)
    return mask & low_confidence(logps, log_tau, strict), log_tau


def random_mask_like(selected, mask, generator=None):
    """ConfPO-rand (Table 2): for each response, as many tokens as `selected` holds, drawn uniformly without
    replacement from its response tokens (`mask`) -> (B, T) bool: the top i.i.d. uniform keys of each row.

    generator: one torch.Generator for the batch, or a list of one per row; then a row's draws depend on its own
    generator and response length only, not on the rows batched with it (train.py keys them by seed, step and
    pair, so that the micro-batch size is free to change). Generators must live on the masks' device.
    """
    if isinstance(generator, (list, tuple)):
        keys = torch.zeros(mask.shape, device=mask.device)
        for b, g in enumerate(generator):
            keys[b, mask[b]] = torch.rand(int(mask[b].sum()), generator=g, device=mask.device)
    else:
        keys = torch.rand(mask.shape, generator=generator, device=mask.device)
    return top_k_mask(keys, mask, (selected & mask).sum(-1))


def confpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=1.0, gamma=2.0,
                threshold="arithmetic", strict=False, normalize="selected", chosen_selected=None,
                rejected_selected=None):
    """ConfPO (Eq. 12-14): SimPO whose reward counts only the tokens the policy is unsure of.
    tau = (1/|y|) sum_i pi(y_i);  s(y_i) = 1[pi(y_i) <= tau];  r(x, y) = beta/|y_s| sum_i s(y_i) log pi(y_i);
    L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma ).

    Defaults beta 1.0, gamma 2.0: the paper's Llama-3-Base setting (Table 6; Mistral-Base 1.5 / 1.6).
    threshold: "arithmetic" (Eq. 14), "geometric" (Eq. 16) or a fixed probability (App. B).
    strict: select pi < tau (the released code) instead of pi <= tau (the paper).
    normalize: "selected" divides by |y_s| (Eq. 12-13 and the released code); "response" divides by |y| as App.
        Table 5 writes it.
    chosen_selected / rejected_selected: (B, T) bool masks to use instead of s (ConfPO-rand).
    A pair with an empty selection on either side has loss 0 (losses.zero_empty_pairs).
    Metrics: rewards over the selected tokens and over all tokens (`*_all`), tau, selected counts, lengths, `empty`.
    """
    if normalize not in ("selected", "response"):
        raise ValueError(f"normalize must be 'selected' or 'response', got {normalize!r}")
    # Eq. 14: tau = (1/|y|) sum_i pi(y_i) of each response, from the detached log-probs of this forward pass
    log_tau_w = confidence_threshold(chosen_logps, chosen_mask, threshold)
    log_tau_l = confidence_threshold(rejected_logps, rejected_mask, threshold)
    # Eq. 12: s(y_i) = 1[pi(y_i) <= tau]   (ConfPO-rand passes its own selections instead)
    s_w = low_confidence(chosen_logps, log_tau_w, strict) if chosen_selected is None else chosen_selected
    s_l = low_confidence(rejected_logps, log_tau_l, strict) if rejected_selected is None else rejected_selected
    s_w, s_l = s_w & chosen_mask, s_l & rejected_mask
    # Eq. 12: |y_s| = sum_i s(y_i)   (normalize="response": |y|, as App. Table 5 writes it)
    n_w = (s_w if normalize == "selected" else chosen_mask).sum(-1).clamp(min=1)
    n_l = (s_l if normalize == "selected" else rejected_mask).sum(-1).clamp(min=1)
    # Eq. 12: r(x, y) = beta/|y_s| sum_i s(y_i) log pi(y_i)
    r_w = beta * masked_sum(chosen_logps, s_w) / n_w
    r_l = beta * masked_sum(rejected_logps, s_l) / n_l
    # Eq. 13: L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )
    losses = -F.logsigmoid(r_w - r_l - gamma)
    losses, empty = zero_empty_pairs(losses, s_w, s_l)
    # SimPO's reward over every response token, for comparison (metrics only)
    r_w_all = beta * masked_sum(chosen_logps.detach(), chosen_mask) / chosen_mask.sum(-1).clamp(min=1)
    r_l_all = beta * masked_sum(rejected_logps.detach(), rejected_mask) / rejected_mask.sum(-1).clamp(min=1)
    return losses, selection_metrics(r_w, r_l, r_w_all, r_l_all, s_w, s_l, chosen_mask, rejected_mask, empty,
                                     tau_chosen=log_tau_w.exp(), tau_rejected=log_tau_l.exp())


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
    s from the policy's confidence (Eq. 12, 14), the same mask applied to the reference log-probs; sums, not means.

    threshold "arithmetic" as the paper says ("As in Eq. 14"); the released code uses "geometric" here.
    beta 0.1: DPO's usual value (the paper does not list one). Metrics as `confpo_loss`.
    """
    # Eq. 14: tau = (1/|y|) sum_i pi_theta(y_i) of each response (the policy's, not the reference's)
    log_tau_w = confidence_threshold(chosen_logps, chosen_mask, threshold)
    log_tau_l = confidence_threshold(rejected_logps, rejected_mask, threshold)
    # Eq. 12: s(y_i) = 1[pi_theta(y_i) <= tau]
    s_w = chosen_mask & low_confidence(chosen_logps, log_tau_w, strict)
    s_l = rejected_mask & low_confidence(rejected_logps, log_tau_l, strict)
    # Eq. 15: r(x, y) = beta sum_i s(y_i) log pi_theta(y_i)/pi_ref(y_i)
    r_w = beta * masked_sum(log_ratio(chosen_logps, ref_chosen_logps), s_w)
    r_l = beta * masked_sum(log_ratio(rejected_logps, ref_rejected_logps), s_l)
    # Eq. 15: L = -log sigmoid( r(x, y_w) - r(x, y_l) )
    losses = -F.logsigmoid(r_w - r_l)
    losses, empty = zero_empty_pairs(losses, s_w, s_l)
    # DPO's reward over every response token, for comparison (metrics only)
    r_w_all = beta * masked_sum(log_ratio(chosen_logps.detach(), ref_chosen_logps), chosen_mask)
    r_l_all = beta * masked_sum(log_ratio(rejected_logps.detach(), ref_rejected_logps), rejected_mask)
    return losses, selection_metrics(r_w, r_l, r_w_all, r_l_all, s_w, s_l, chosen_mask, rejected_mask, empty,
                                     tau_chosen=log_tau_w.exp(), tau_rejected=log_tau_l.exp())
