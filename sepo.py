"""SePO (Yang et al. 2024, arXiv 2408.13518): selective preference optimization with an oracle's token rewards.

    Eq. 23  SFT on the chosen responses of a random subset D_m: L = -E log pi(y^w | x); the result is pi_ref
    (oracle) DPO on D_m from pi_ref gives pi_oracle
    Eq. 24  s(y_t) = beta log( pi_oracle(y_t) / pi_ref(y_t) )                        score of every response token
    Eq. 25  I_k(y_t^w) = 1 if s(y_t^w) ranks in the highest k% of its response; rejected: the lowest k%
    Eq. 26  L = -log sigmoid( beta/|S^w| sum_t I_k(y_t^w) log pi(y_t^w) - beta/|S^l| sum_t I_k(y_t^l) log pi(y_t^l) )

This file is the method: Eq. 24-26 and the selection files that carry Eq. 25 from score.py (which scores and selects)
to train.py (which trains with Eq. 26). The whole pipeline, Eq. 23 to Eq. 26, is `python sepo_pipeline.py`.
Shapes as in losses.py: (B, T), position t holds log pi(y_t | x, y_<t), masks True on response tokens.
"""

import json
import os

import torch.nn.functional as F

from losses import IGNORE_INDEX, masked_mean, masked_sum, selection_metrics, top_k_mask, zero_empty_pairs


def token_scores(oracle_logps, ref_logps, beta=1.0):
    """Eq. 24: s(y_t) = beta * log( pi_oracle(y_t | x, y_<t) / pi_ref(y_t | x, y_<t) ) -> (B, T) float32.

    Both log-probs are over exactly the same token ids. beta only rescales: the selection (Eq. 25) ranks scores
    within a response, so it does not depend on beta > 0; the released code uses beta = 1.
    """
    # Eq. 24: s(y_t) = beta log(pi_oracle(y_t) / pi_ref(y_t))
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
    NOTE(deviation): the paper says "the highest k%"; floor(ratio * n) is the released code's count (a response
    shorter than 1/ratio tokens selects nothing, which the losses turn into a zero-loss pair). Unlike the released
    scorer, the first response token is scored and can be selected.
    """
    # Eq. 25: I_k(y_t) = 1 if s(y_t) ranks in the highest (chosen) / lowest (rejected) k% of its response
    return top_k_mask(scores if highest else -scores, mask, selection_counts(mask, ratio))


def sepo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, chosen_selected, rejected_selected,
              beta=1.0, gamma=0.0, lambda_=0.0):
    """SePO objective (Eq. 26), reference-free and length-normalised over the selected tokens:
    L = -log sigmoid( beta/|S^w| sum_t I(y_t^w) log pi(y_t^w) - beta/|S^l| sum_t I(y_t^l) log pi(y_t^l) - gamma ),
    that is SimPO over the oracle's selection.

    beta 1.0 and gamma 0.0 as the released code (which has no beta; the paper's Eq. 26 has one).
    chosen_selected / rejected_selected: (B, T) bool, from `select_tokens` (score.py writes them); they are
    intersected with the response masks. A pair with an empty selection on either side has loss 0.
    lambda_ > 0 adds an anchor, CPO's NLL term on the whole chosen response: - lambda (1/|y_w|) log pi(y_w).
    NOTE(deviation): not in the paper nor the released code (default 0): a remedy for the collapse the
    miniature study finds, where the objective crushes frequent words selected on the rejected side only.
    Metrics: rewards over the selection and over all tokens (`*_all`), selected counts, lengths, `empty`.
    """
    # Eq. 25's selection I_k, on the response tokens
    S_w, S_l = chosen_selected & chosen_mask, rejected_selected & rejected_mask
    # Eq. 26: r(x, y) = beta/|S| sum_t I_k(y_t) log pi(y_t),  |S| = sum_t I_k(y_t)
    r_w = beta * masked_sum(chosen_logps, S_w) / S_w.sum(-1).clamp(min=1)
    r_l = beta * masked_sum(rejected_logps, S_l) / S_l.sum(-1).clamp(min=1)
    # Eq. 26: L = -log sigmoid( r(x, y_w) - r(x, y_l) - gamma )
    losses = -F.logsigmoid(r_w - r_l - gamma)
    losses, empty = zero_empty_pairs(losses, S_w, S_l)
    if lambda_:  # the anchor (off by default): + lambda * -(1/|y_w|) sum_t log pi(y_t^w), every chosen token
        losses = losses - lambda_ * masked_mean(chosen_logps, chosen_mask)
    # the same reward over every response token, for comparison (metrics only)
    r_w_all = beta * masked_sum(chosen_logps.detach(), chosen_mask) / chosen_mask.sum(-1).clamp(min=1)
    r_l_all = beta * masked_sum(rejected_logps.detach(), rejected_mask) / rejected_mask.sum(-1).clamp(min=1)
    return losses, selection_metrics(r_w, r_l, r_w_all, r_l_all, S_w, S_l, chosen_mask, rejected_mask, empty)


# ---------------------------------------------------------------------------------------------------------------
# Selections on disk: score.py writes them into a folder with its manifest.json, train.py --method sepo reads them.
#   one row per pair: row (index in the source data), chosen_n / rejected_n (response tokens, EOS included),
#   chosen_selected / rejected_selected (indices of the selected tokens, 0 = the first response token),
#   optionally chosen_scores / rejected_scores (Eq. 24 per response token)
# ---------------------------------------------------------------------------------------------------------------

def selection_name(k_w, k_l, fmt="jsonl"):
    """The selection file score.py writes for ratios (k_w, k_l): selections-c{k_w}-r{k_l}.jsonl (or a folder)."""
    return f"selections-c{k_w:g}-r{k_l:g}" + (".jsonl" if fmt == "jsonl" else "")


def read_manifest(scores_dir):
    """score.py's manifest.json in a scores folder (what was scored with what; "complete" once every selection
    file is in place), or None when there is none."""
    path = os.path.join(scores_dir, "manifest.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def provenance_problem(manifest, path, data_path, split, data_fingerprint, tokenizer_hash):
    """Why the selections at `path` may not train on these data, or None: score.py's manifest must say the scoring
    finished, on data of this fingerprint and split, in the positions of a tokenizer of this hash."""
    scored = manifest.get("data", {})
    if not manifest.get("complete"):
        return f"{path}: the score.py run that writes it has not finished (see its manifest.json); run it again"
    if scored and (scored.get("fingerprint"), scored.get("split")) != (data_fingerprint, split):
        return (f"{path}: these selections were scored on other data ({scored.get('path')} [{scored.get('split')}], "
                f"fingerprint {scored.get('fingerprint')}) than --data {data_path} [{split}] (fingerprint "
                f"{data_fingerprint}); score these data with score.py, or train on the data that were scored")
    if manifest.get("policy_tokenizer") != tokenizer_hash:
        return (f"{path}: these selections index the tokens of another tokenizer (see its manifest.json); score "
                "again with --policy set to this model")
    return None


def scoring_complete(scores_dir):
    manifest = read_manifest(scores_dir)
    return bool(manifest and manifest.get("complete"))


class SelectionError(ValueError):
    """Selections that do not fit the data being trained (the message names the file, the row and the field)."""
    user_error = True  # a user's mistake: reported in one line by the scripts


def load_selections(path):
    """A selections file (JSONL) or folder (datasets.save_to_disk) -> datasets.Dataset."""
    import datasets
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    if not os.path.exists(path):
        raise SelectionError(f"{path}: no such selections file (write one with score.py)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SelectionError(f"{path} row {i}: not valid JSON ({e})") from None
    return datasets.Dataset.from_list(rows)


def attach_selections(tokenized, selections, source="selections"):
    """Add per-token fields `chosen_select` / `rejected_select` (0/1, aligned with *_input_ids) to tokenized pairs
    (data.tokenize_preferences), from their selections. Fails when a pair has no selection or when its response
    length differs from the one scored (another tokenizer or max_length)."""
    index = {int(r): i for i, r in enumerate(selections["row"])}

    def add(ex):
        if ex["row"] not in index:
            raise SelectionError(f"{source}: no selection for row {ex['row']}")
        sel = selections[index[ex["row"]]]
        out = {}
        for side in ("chosen", "rejected"):
            n = sum(1 for x in ex[f"{side}_labels"] if x != IGNORE_INDEX)
            if sel[f"{side}_n"] != n:
                raise SelectionError(f"{source} row {ex['row']}, field '{side}_n': {sel[f'{side}_n']} tokens were scored "
                                 f"but the response has {n} here (another tokenizer or max_length?)")
            flags = [0] * len(ex[f"{side}_input_ids"])
            for j in sel[f"{side}_selected"]:
                if not 0 <= j < n:
                    raise SelectionError(f"{source} row {ex['row']}, field '{side}_selected': index {j} outside 0..{n - 1}")
                flags[ex["prompt_len"] + j] = 1
            out[f"{side}_select"] = flags
        return out

    return tokenized.map(add, desc="attaching selections")


def select_all(tokenized):
    """Selections of every response token (`*_select` = 1 where labels != -100): held-out pairs, which the oracle
    never scored, are evaluated over all their tokens."""
    return tokenized.map(lambda ex: {f"{side}_select": [int(x != IGNORE_INDEX) for x in ex[f"{side}_labels"]]
                                     for side in ("chosen", "rejected")})
