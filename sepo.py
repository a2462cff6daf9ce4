"""SePO (Yang et al. 2024, arXiv 2408.13518): selective preference optimization with an oracle's token rewards.

    Eq. 23  SFT on the chosen responses of a random subset D_m: L = -E log pi(y^w | x); the result is pi_ref
    (oracle) DPO on D_m from pi_ref gives pi_oracle
    Eq. 24  s(y_t) = beta log( pi_oracle(y_t) / pi_ref(y_t) )                        score of every response token
    Eq. 25  I_k(y_t^w) = 1 if s(y_t^w) ranks in the highest k% of its response; rejected: the lowest k%
    Eq. 26  L = -log sigmoid( beta/|S^w| sum_t I_k(y_t^w) log pi(y_t^w) - beta/|S^l| sum_t I_k(y_t^l) log pi(y_t^l) )

Shapes as in losses.py: (B, T), position t holds log pi(y_t | x, y_<t), masks True on response tokens.
"""

import torch

from losses import simpo_loss, top_k_mask, zero_empty_pairs


def token_scores(oracle_logps, ref_logps, beta=1.0):
    """Eq. 24: s(y_t) = beta * log( pi_oracle(y_t | x, y_<t) / pi_ref(y_t | x, y_<t) ) -> (B, T) float32.

    Both log-probs are over exactly the same token ids. beta only rescales: the selection (Eq. 25) ranks scores
    within a response, so it does not depend on beta > 0; the released code uses beta = 1.
    """
    return beta * (oracle_logps.float() - ref_logps.float())


def selection_counts(mask, ratio):
    """floor(ratio * n) for each response of n tokens -> (B,) long. A 1e-9 slack makes 0.29 * 100 give 29, as
    meant, rather than float rounding's 28."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"selection ratio must be in [0, 1], got {ratio}")
    return (mask.sum(-1).double() * ratio + 1e-9).floor().long()


def select_tokens(scores, mask, ratio, highest=True):
    """Eq. 25: per response, the floor(ratio * n) tokens with the highest (chosen) or lowest (rejected) scores among
    its n response tokens (the first response token and the EOS included) -> (B, T) bool.

    Ties go to the earliest position (a stable sort), as in the released code; vectorised (losses.top_k_mask).
    """
    # I_k(y_t) = 1 if s(y_t) ranks in the highest (chosen) / lowest (rejected) k% of its response
    return top_k_mask(scores if highest else -scores, mask, selection_counts(mask, ratio))


def sepo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, chosen_selected, rejected_selected,
              beta=1.0, gamma=0.0):
    """SePO objective (Eq. 26), reference-free and length-normalised over the selected tokens:
    L = -log sigmoid( beta/|S^w| sum_t I(y_t^w) log pi(y_t^w) - beta/|S^l| sum_t I(y_t^l) log pi(y_t^l) - gamma ),
    that is SimPO over the oracle's selection.

    beta 1.0 and gamma 0.0 as the released code (which has no beta; the paper's Eq. 26 has one).
    chosen_selected / rejected_selected: (B, T) bool, from `select_tokens` (score.py writes them); they are
    intersected with the response masks. A pair with an empty selection on either side has loss 0.
    Metrics: rewards over the selection and over all tokens (`*_all`), selected counts, lengths, `empty`.
    """
    sel_w, sel_l = chosen_selected & chosen_mask, rejected_selected & rejected_mask
    losses, metrics = simpo_loss(chosen_logps, sel_w, rejected_logps, sel_l, beta=beta, gamma=gamma)
    losses, empty = zero_empty_pairs(losses, sel_w, sel_l)
    _, all_tokens = simpo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, beta=beta, gamma=gamma)
    metrics.update(rewards_chosen_all=all_tokens["rewards_chosen"], rewards_rejected_all=all_tokens["rewards_rejected"],
                   selected_chosen=sel_w.sum(-1).float(), selected_rejected=sel_l.sum(-1).float(),
                   length_chosen=chosen_mask.sum(-1).float(), length_rejected=rejected_mask.sum(-1).float(),
                   empty=empty.float())
    return losses, metrics
