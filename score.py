"""Score every response token with an oracle and a reference (SePO Eq. 24), select (Eq. 25), write the selections
that `train.py --method sepo` reads; or show ConfPO's selection under one model. Optionally an HTML report.

    python score.py --oracle runs/sepo/oracle_dpo/final --reference runs/sepo/oracle_sft/final --data DATA \
        --policy PATH_OR_NAME --ratios 0.3:0.3,0.5:0.1 --output_dir runs/sepo/scores --report report.html
    torchrun --standalone --nproc_per_node 8 score.py ...            # each rank scores its blocks; rank 0 merges
    python score.py --confpo --model PATH --data DATA --report confpo.html --output_dir runs/confpo-scores

Output folder:
    shards/block_NNNNNN.jsonl   per block of pairs: the Eq. 24 score of every response token (written atomically;
                                a killed run resumes at the first missing block, and its output equals an
                                uninterrupted run's)
    selections-c{kw}-r{kl}.jsonl  one per ratio pair: row, chosen_n, rejected_n, chosen_selected, rejected_selected
                                (indices of the selected tokens, 0 = the first response token), + scores with
                                --save_scores (`confpo.jsonl` with --confpo)
    manifest.json               what was scored with what (fingerprints of models and data), the policy tokenizer's
                                fingerprint, key-token precision and recall; "complete" once every file is written
Positions are in the policy's tokenization: the oracle, the reference and the policy must share a vocabulary, or
`--cross_tokenizer` maps the oracle's selection onto the policy's tokens through character offsets.
"""

import glob
import hashlib
import html
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import confpo
import data
import losses
import sepo
import train
from train import _f, atomic_write


@dataclass
class ScoreConfig:
    oracle: str = _f("", "pi_oracle: the DPO-trained oracle (folder or hub name)")
    reference: str = _f("", "pi_ref: the SFT model the oracle started from")
    confpo: bool = _f(False, "score with one model's confidence instead (ConfPO Eq. 12-14): needs --model")
    model: str = _f("", "--confpo: the policy whose confidence selects tokens")
    policy: str = _f("", "the policy to be trained (its tokenizer fixes the token positions; '' = the oracle's)")
    cross_tokenizer: bool = _f(False, "allow a policy tokenizer other than the oracle's: map selections by characters")
    data: str = _f("", "target preference data (file, save_to_disk folder or hub name)")
    split: str = _f("train", "split of --data")
    form: str = _f("auto", "data form: auto | standard | conversational | implicit")
    skip_bad_rows: bool = _f(False, "skip (and count) bad rows")
    cache_dir: str = _f("", "datasets cache folder ('' = Hugging Face's default)")
    max_length: int = _f(2048, "prompt + response tokens (use the training run's value)")
    max_prompt_length: int = _f(1800, "prompt tokens (use the training run's value)")
    max_pairs: int = _f(0, "score only the first N pairs (0 = all)")
    beta: float = _f(1.0, "beta of Eq. 24 (rescales scores; the selection does not depend on it)")
    ratios: str = _f("0.3:0.3", "chosen:rejected selection ratios k (Eq. 25), comma-separated for several")
    threshold: str = _f("arithmetic", "--confpo: arithmetic | geometric | a probability")
    strict: bool = _f(False, "--confpo: pi < tau instead of pi <= tau")
    save_scores: bool = _f(False, "also write each token's score into the selection files")
    format: str = _f("jsonl", "jsonl | datasets (a save_to_disk folder per ratio pair)")
    output_dir: str = _f("", "where shards, selections and manifest.json go")
    batch_size: int = _f(8, "pairs per forward")
    shard_size: int = _f(512, "pairs per shard file (the unit of resumption and of work split between ranks)")
    device: str = _f("auto", "auto | cpu | cuda")
    dtype: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    report: str = _f("", "write an HTML report here (of the first ratio pair)")
    report_pairs: int = _f(12, "pairs shown token by token in the report")
    seed: int = _f(0, "seed of the report's sample of pairs")


HISTOGRAM_PAIRS = 20000  # the report's histograms use the first pairs up to this many (memory stays bounded)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers: the paper's requirement, and the way around it
# ---------------------------------------------------------------------------------------------------------------

def tokenizer_differences(a, b):
    """What differs between two tokenizers in ways that change token ids: vocabulary and special tokens."""
    diffs = []
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diffs.append(f"vocabulary ({len(va)} vs {len(vb)} tokens, {len(va.keys() ^ vb.keys())} differ)")
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(a, name, None) != getattr(b, name, None):
            diffs.append(f"{name} ({getattr(a, name, None)!r} vs {getattr(b, name, None)!r})")
    return diffs


def check_tokenizers(oracle_tok, policy_tok, oracle, policy, cross_tokenizer):
    """Stop when the oracle cannot select positions of the policy's tokens (the paper's limitation) unless
    cross_tokenizer; warn when only the chat templates differ (the oracle would read a format it was not trained
    on). Returns True when the vocabularies differ (and cross_tokenizer allows it)."""
    diffs = tokenizer_differences(oracle_tok, policy_tok)
    if diffs and not cross_tokenizer:
        raise SystemExit(f"the oracle ({oracle}) and the policy ({policy}) have different tokenizers: "
                         f"{'; '.join(diffs)}. SePO selects token positions, so they must match (the paper's "
                         "stated limitation); pass --cross_tokenizer to map selections through character offsets")
    if not diffs and getattr(oracle_tok, "chat_template", None) != getattr(policy_tok, "chat_template", None):
        train.log0(f"warning: {oracle} and {policy} share a vocabulary but not a chat template; the oracle scores "
                   "the data rendered with the policy's template (train the oracle with --tokenizer set to the "
                   "policy, as sepo.py does)")
    return bool(diffs)


def map_across_tokenizers(src_spans, src_selected, src_scores, dst_spans, align_tail=True):
    """Carry a selection from one tokenization of a response to another through character spans.

    src_spans (n, 2), dst_spans (m, 2): [start, end) in the response text per token, [-1, -1] for tokens outside
    it (template tokens, EOS). A destination token is selected when it overlaps a selected source token's span; its
    score is the overlap-weighted mean of the source scores it overlaps. align_tail (both responses end with their
    EOS, not cut by truncation): the trailing span-less tokens (an end-of-turn token, the EOS) are paired from the
    end. Returns (selected (m,) bool, scores (m,) float, covered (m,) bool: tokens with text that some source token
    overlaps).
    """
    a_s, b_s = src_spans[:, 0].double(), src_spans[:, 1].double()
    a_d, b_d = dst_spans[:, 0].double(), dst_spans[:, 1].double()
    # overlap[j, i] = characters shared by destination token j and source token i
    overlap = (torch.minimum(b_d[:, None], b_s[None]) - torch.maximum(a_d[:, None], a_s[None])).clamp(min=0)
    overlap[dst_spans[:, 0] < 0] = 0
    overlap[:, src_spans[:, 0] < 0] = 0
    selected = (overlap * src_selected[None].double()).sum(1) > 0
    weight = overlap.sum(1)
    scores = (overlap @ src_scores.double()) / weight.clamp(min=1)
    if align_tail:
        j, i = len(dst_spans) - 1, len(src_spans) - 1
        while j >= 0 and i >= 0 and dst_spans[j, 0] < 0 and src_spans[i, 0] < 0:
            selected[j], scores[j] = src_selected[i], src_scores[i]
            j, i = j - 1, i - 1
    return selected, scores.float(), (weight > 0) | (dst_spans[:, 0] < 0)


# ---------------------------------------------------------------------------------------------------------------
# What was scored: fingerprints, so that a folder is never resumed with other models or data
# ---------------------------------------------------------------------------------------------------------------

def model_fingerprint(path):
    """A hub name as is; a folder by its config and the size and time of its weight files (cheap, and changes
    whenever the folder's model does)."""
    if not os.path.isdir(path):
        return path
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as fh:
                h.update(fh.read())
        elif name.endswith((".safetensors", ".bin", ".pt")):
            st = os.stat(full)
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:32]


def identity(cfg, tokenized, score_tok):
    """Everything that decides the shards' contents."""
    models = {"model": cfg.model} if cfg.confpo else {"oracle": cfg.oracle, "reference": cfg.reference}
    return {"mode": "confpo" if cfg.confpo else "sepo", **models,
            "models": {k: model_fingerprint(v) for k, v in models.items()},
            "data": cfg.data, "split": cfg.split, "tokenized_data": tokenized._fingerprint, "beta": cfg.beta,
            "shard_size": cfg.shard_size, "batch_size": cfg.batch_size, "dtype": resolved_dtype(cfg).__repr__(),
            "scoring_tokenizer": data.tokenizer_hash(score_tok)}


def resolved_dtype(cfg):
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    return {"bf16": torch.bfloat16, "fp32": torch.float32}.get(cfg.dtype, torch.bfloat16 if use_cuda else torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# Scoring (each rank its blocks), shards written atomically
# ---------------------------------------------------------------------------------------------------------------

def load_scorer(path, cfg, device):
    """A causal LM for inference that returns per-token log-probs (train.PolicyLogps), no FSDP: ranks split data."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolved_dtype(cfg)).to(device).eval()
    return train.PolicyLogps(model, train.choose_logp_path("auto", model), chunk_size=None)


def block_path(cfg, b):
    return os.path.join(cfg.output_dir, "shards", f"block_{b:06d}.jsonl")


def response_values(values, labels):
    """Per row, the values at the response positions (labels != -100), as lists."""
    mask = labels != losses.IGNORE_INDEX
    return [v[m].tolist() for v, m in zip(values, mask)]


def score_blocks(cfg, tokenized, pad_id, rank, world, device):
    """Score this rank's blocks of pairs; skip blocks already on disk. A block line: row, chosen_n, rejected_n,
    chosen_scores, rejected_scores (Eq. 24, or log pi(y_t) with --confpo)."""
    n_blocks = math.ceil(len(tokenized) / cfg.shard_size)
    todo = [b for b in range(rank, n_blocks, world) if not os.path.exists(block_path(cfg, b))]
    if not todo:
        return
    if cfg.confpo:
        scorer = load_scorer(cfg.model, cfg, device)
    else:
        oracle, reference = load_scorer(cfg.oracle, cfg, device), load_scorer(cfg.reference, cfg, device)
    pairs = sum(min(cfg.shard_size, len(tokenized) - b * cfg.shard_size) for b in todo)
    bar = tqdm(total=pairs, desc=f"scoring (rank {rank})", disable=rank != 0, unit="pair", dynamic_ncols=True,
               mininterval=1.0)
    tokens, t0 = 0, time.perf_counter()
    for b in todo:
        lines = []
        end = min(len(tokenized), (b + 1) * cfg.shard_size)
        for s in range(b * cfg.shard_size, end, cfg.batch_size):
            rows = [tokenized[i] for i in range(s, min(s + cfg.batch_size, end))]
            batch = {k: v.to(device) for k, v in data.collate_pairs(rows, pad_id).items()}
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            with torch.no_grad():
                if cfg.confpo:  # the policy's own confidence, log pi(y_t)
                    scores, _ = scorer(**inputs)
                else:  # Eq. 24: s(y_t) = beta log(pi_oracle(y_t) / pi_ref(y_t)), on the same token ids
                    scores = sepo.token_scores(oracle(**inputs)[0], reference(**inputs)[0], cfg.beta)
            per_row = response_values(scores.float().cpu(), batch["labels"].cpu())
            B = len(rows)
            for i, row in enumerate(rows):
                lines.append(json.dumps({"row": row["row"], "chosen_n": len(per_row[i]),
                                         "rejected_n": len(per_row[B + i]), "chosen_scores": per_row[i],
                                         "rejected_scores": per_row[B + i]}))
            tokens += int(batch["attention_mask"].sum())
            bar.update(B)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
        atomic_write(block_path(cfg, b), "\n".join(lines) + "\n")
    bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Selection (Eq. 25, or ConfPO's Eq. 12-14), merged block by block on rank 0
# ---------------------------------------------------------------------------------------------------------------

def padded(lists):
    """Lists of per-token values -> (values (N, L) float64, mask (N, L) bool)."""
    L = max((len(x) for x in lists), default=1) or 1
    values = torch.zeros((len(lists), L), dtype=torch.float64)
    mask = torch.zeros(len(lists), L, dtype=torch.bool)
    for i, x in enumerate(lists):
        values[i, :len(x)] = torch.tensor(x, dtype=torch.float64)
        mask[i, :len(x)] = True
    return values, mask


def per_response(rule, lists):
    """Apply a batched selection rule (values (N, L), mask (N, L)) -> (N, L) bool to a list of per-response
    value lists -> list of bool lists."""
    values, mask = padded(lists)
    return [sel[:len(x)].tolist() for sel, x in zip(rule(values, mask), lists)]


def parse_ratios(text):
    pairs = []
    for part in text.split(","):
        try:
            rc, rl = (float(x) for x in part.split(":"))
        except ValueError:
            raise SystemExit(f"--ratios: expected chosen:rejected pairs such as 0.3:0.3, got {part!r}") from None
        if not (0 <= rc <= 1 and 0 <= rl <= 1):
            raise SystemExit(f"--ratios: ratios must lie in [0, 1], got {part!r}")
        pairs.append((rc, rl))
    return pairs


def selection_name(rc, rl, fmt="jsonl"):
    return f"selections-c{rc:g}-r{rl:g}" + (".jsonl" if fmt == "jsonl" else "")


def selectors(cfg):
    """{file name: (select chosen, select rejected)}: one entry per ratio pair, or ConfPO's single selection."""
    if cfg.confpo:  # ConfPO's Eq. 12-14
        threshold = confpo.parse_threshold(cfg.threshold)
        pick = lambda s: per_response(lambda v, m: confpo.confpo_mask(v, m, threshold, cfg.strict)[0], s)  # noqa
        return {"confpo.jsonl": (pick, pick)}
    # Eq. 25: the top k_w of each chosen response, the bottom k_l of each rejected one
    return {selection_name(rc, rl, cfg.format): (
        lambda s, r=rc: per_response(lambda v, m: sepo.select_tokens(v, m, r, highest=True), s),
        lambda s, r=rl: per_response(lambda v, m: sepo.select_tokens(v, m, r, highest=False), s))
        for rc, rl in parse_ratios(cfg.ratios)}


def response_part(tok_row, side, field):
    """A per-token field of a tokenized pair (`<side>_<field>`, e.g. key flags or offsets), response tokens only."""
    return [x for x, lab in zip(tok_row[f"{side}_{field}"], tok_row[f"{side}_labels"]) if lab != losses.IGNORE_INDEX]


class Tally:
    """Per ratio pair and side: selected, key, hit and total token counts (key precision and recall), and tokens of
    the policy that no oracle token covers (cross-tokenizer)."""

    def __init__(self):
        self.n = {}

    def add(self, key, value):
        self.n[key] = self.n.get(key, 0) + value

    def stats(self, name):
        out = {}
        for side in ("chosen", "rejected"):
            g = lambda k: self.n.get((name, side, k), 0)  # noqa: E731
            out[f"selected_fraction_{side}"] = g("selected") / max(g("tokens"), 1)
            if g("key"):
                out[f"key_{side}"] = {"precision": g("hit") / max(g("selected"), 1), "recall": g("hit") / g("key"),
                                      "key_fraction": g("key") / max(g("tokens"), 1),
                                      "selected_fraction": g("selected") / max(g("tokens"), 1)}
        return out


def merge(cfg, n_pairs, scored_ds, policy_ds, eos_ids=None):
    """Rank 0: read the blocks in order, select for every ratio pair, write each selection file through a
    temporary file (renamed at the end). Returns (per-file statistics, the report's material).

    scored_ds: the tokenized pairs that were scored (block b holds its rows b*shard_size ...). policy_ds: the
    policy's tokenization; eos_ids: (the scoring tokenizer's EOS, the policy's) when the two tokenizers differ,
    else None (policy_ds is then scored_ds)."""
    tokenizer_crossing = eos_ids is not None
    files = selectors(cfg)
    tmp = {name: open(os.path.join(cfg.output_dir, name) + f".tmp{os.getpid()}", "w", encoding="utf-8")
           for name in files}
    policy_index = {r: i for i, r in enumerate(policy_ds["row"])} if tokenizer_crossing else None
    tally, report_name = Tally(), next(iter(files))
    sample_rows = set(random.Random(cfg.seed).sample(range(n_pairs), min(cfg.report_pairs, n_pairs)))
    report = {"pairs": [], "scores": {"chosen": [], "rejected": []}, "positions": {"chosen": [], "rejected": []}}
    written = set()
    for b in range(math.ceil(n_pairs / cfg.shard_size)):
        with open(block_path(cfg, b), encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        for name, pickers in files.items():
            for rec in block_records(cfg, b, rows, pickers, scored_ds, policy_ds, policy_index, eos_ids, tally, name):
                tmp[name].write(json.dumps(rec["out"]) + "\n")
                written.add(rec["out"]["row"])
                if name == report_name:
                    collect_report(report, rec, sample_rows)
    if tokenizer_crossing:  # pairs the policy keeps but the oracle's tokenization dropped: nothing selected
        missing = [i for i, r in enumerate(policy_ds["row"]) if r not in written]
        for i in missing:
            ex = policy_ds[i]
            empty = {"row": ex["row"], **{f"{s}_n": len(response_part(ex, s, "labels")) for s in ("chosen", "rejected")},
                     "chosen_selected": [], "rejected_selected": []}
            for fh in tmp.values():
                fh.write(json.dumps(empty) + "\n")
        if missing:
            train.log0(f"warning: {len(missing)} pairs are empty in the oracle's tokenization: nothing selected")
    for name, fh in tmp.items():
        fh.close()
        finish_file(cfg, name, fh.name)
    stats = {name: {"file": name, **tally.stats(name)} for name in files}
    if tokenizer_crossing:
        uncovered = tally.n.get("uncovered", 0) / max(tally.n.get("text_tokens", 0), 1)
        stats["uncovered_policy_tokens"] = uncovered
        if uncovered:
            train.log0(f"warning: {uncovered:.1%} of the policy's response tokens overlap no oracle token (the two "
                       "tokenizations truncate at different places): they are never selected")
    return stats, {"name": report_name, **report}


def block_records(cfg, b, rows, pickers, scored_ds, policy_ds, policy_index, eos_ids, tally, name):
    """The selection records of one block for one ratio pair, in the policy's positions; updates the tally."""
    picked = {side: pick([r[f"{side}_scores"] for r in rows]) for side, pick in zip(("chosen", "rejected"), pickers)}
    for i, r in enumerate(rows):
        index = b * cfg.shard_size + i
        scored = scored_ds[index]
        target = scored if policy_index is None else policy_ds[policy_index[r["row"]]] if r["row"] in policy_index \
            else None
        if target is None:  # dropped by the policy's tokenization: not needed for training
            continue
        out, sides = {"row": r["row"]}, {}
        for side in ("chosen", "rejected"):
            sel, scores = picked[side][i], r[f"{side}_scores"]
            if policy_index is not None:
                # pair the trailing template tokens only when neither response was cut before its EOS
                tail = (response_part(scored, side, "input_ids")[-1:] == [eos_ids[0]]
                        and response_part(target, side, "input_ids")[-1:] == [eos_ids[1]])
                sel, scores, covered = map_across_tokenizers(
                    torch.tensor(response_part(scored, side, "offsets")), torch.tensor(sel), torch.tensor(scores),
                    torch.tensor(response_part(target, side, "offsets")), align_tail=tail)
                has_text = torch.tensor([s >= 0 for s, _ in response_part(target, side, "offsets")])
                tally.add("uncovered", int((has_text & ~covered).sum()))
                tally.add("text_tokens", int(has_text.sum()))
                sel, scores = sel.tolist(), scores.tolist()
            out[f"{side}_n"] = len(sel)
            out[f"{side}_selected"] = [j for j, s in enumerate(sel) if s]
            if cfg.save_scores or cfg.confpo:
                out[f"{side}_scores"] = scores
            sides[side] = (sel, scores)
            tally.add((name, side, "selected"), sum(sel))
            tally.add((name, side, "tokens"), len(sel))
            if f"{side}_key" in target:
                key = response_part(target, side, "key")
                tally.add((name, side, "key"), sum(key))
                tally.add((name, side, "hit"), sum(1 for s, k in zip(sel, key) if s and k))
        yield {"out": out, "sides": sides, "target": target, "index": index}


def collect_report(report, rec, sample_rows):
    """Keep what the report needs: the sampled pairs whole, and scores and selected positions of the first pairs."""
    if rec["index"] in sample_rows:
        report["pairs"].append(rec)
    if rec["index"] < HISTOGRAM_PAIRS:
        for side, (sel, scores) in rec["sides"].items():
            report["scores"][side].extend(v for v in scores if math.isfinite(v))
            report["positions"][side].extend(j / max(len(sel) - 1, 1) for j, s in enumerate(sel) if s)


def finish_file(cfg, name, tmp_path):
    """Move a finished selection file into place: JSONL renamed, or converted to a save_to_disk folder."""
    path = os.path.join(cfg.output_dir, name)
    if name.endswith(".jsonl"):
        os.replace(tmp_path, path)
        return
    import datasets
    folder_tmp = path + ".tmp"
    shutil.rmtree(folder_tmp, ignore_errors=True)
    datasets.Dataset.from_list(sepo.load_selections(tmp_path).to_list()).save_to_disk(folder_tmp)
    os.remove(tmp_path)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(folder_tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# The report: tokens coloured by score, selections marked, histograms (SePO Fig. 6, ConfPO Fig. 12)
# ---------------------------------------------------------------------------------------------------------------

def _colour(score, scale, confpo_mode):
    """Diverging colours: red for high oracle scores (or, for ConfPO, low confidence), blue for the other end."""
    if not math.isfinite(score):
        return "transparent"
    if confpo_mode:  # score = log pi: probability 1 is white, probability 0 red
        t = 1.0 - math.exp(min(score, 0.0))
        return f"rgba(220,40,40,{0.85 * t:.3f})"
    t = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    return f"rgba(220,40,40,{0.85 * t:.3f})" if t >= 0 else f"rgba(40,90,220,{-0.85 * t:.3f})"


def _histogram_svg(series, title, bins=30, lo=None, hi=None, width=520, height=170):
    """An inline SVG histogram of one or more named value lists, overlaid; each normalised to sum to 1."""
    values = [v for _, vals, _ in series for v in vals]
    if not values:
        return f"<p>{html.escape(title)}: no values</p>"
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    hi = hi if hi > lo else lo + 1.0
    counts = []
    for name, vals, colour in series:
        c = [0] * bins
        for v in vals:
            c[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
        counts.append((name, [x / max(len(vals), 1) for x in c], colour))
    top = max(max(c) for _, c, _ in counts) or 1.0
    w = (width - 40) / bins
    parts = [f'<svg width="{width}" height="{height + 40}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="20" y="14" font-size="13">{html.escape(title)}</text>']
    for name, c, colour in counts:
        for i, x in enumerate(c):
            h = x / top * height
            parts.append(f'<rect x="{30 + i * w:.1f}" y="{20 + height - h:.1f}" width="{w - 1:.1f}" height="{h:.1f}" '
                         f'fill="{colour}" fill-opacity="0.55"><title>{html.escape(name)}: {x:.3f} in '
                         f'[{lo + i * (hi - lo) / bins:.3g}, {lo + (i + 1) * (hi - lo) / bins:.3g})</title></rect>')
    parts.append(f'<text x="30" y="{height + 36}" font-size="11">{lo:.3g}</text>'
                 f'<text x="{width - 40}" y="{height + 36}" font-size="11">{hi:.3g}</text>')
    for k, (name, _, colour) in enumerate(counts):
        parts.append(f'<rect x="{width - 170}" y="{22 + 16 * k}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - 155}" y="{31 + 16 * k}" font-size="11">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def token_texts(tokenizer, ids):
    """The text each token adds, decoding prefixes: a character split over several byte-level tokens shows on the
    token that completes it (decoding tokens one by one would show U+FFFD halves)."""
    texts, done = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[:i + 1])
        if cur.endswith("\ufffd") and i + 1 < len(ids):  # an incomplete character: wait for the next token
            texts.append("")
            continue
        texts.append(cur[len(done):] if cur.startswith(done) else tokenizer.decode([ids[i]]))
        done = cur
    return texts


def write_report(cfg, path, report, stats, tokenizer):
    """One HTML file, no dependency: key-token precision, the two histograms, a sample of pairs token by token."""
    name, entry = report["name"], stats[report["name"]]
    magnitudes = sorted(abs(v) for side in ("chosen", "rejected") for v in report["scores"][side])
    scale = magnitudes[int(0.99 * (len(magnitudes) - 1))] if magnitudes else 1.0
    title = ("ConfPO selection under " + cfg.model) if cfg.confpo else f"SePO selection ({name})"
    legend = ("colour: 1 - pi(y_t) (red = unsure); outlined: selected (pi <= tau)" if cfg.confpo else
              "colour: score s(y_t) = beta log(pi_oracle / pi_ref) (red high, blue low); outlined: selected")
    has_keys = "key_chosen" in entry
    legend += "; green wavy underline: a known key token of the synthetic task" if has_keys else ""
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>", html.escape(title), "</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:20px auto;color:#222}",
           ".resp{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:6px}",
           ".tok{padding:1px 0;border-radius:2px}.sel{outline:2px solid #111;outline-offset:-1px}",
           ".key{text-decoration:underline wavy #0a0;text-underline-offset:4px}",
           "h3{margin-bottom:4px}.meta{color:#666;font-size:13px}table{border-collapse:collapse}",
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(legend)}. Hover a token for its value. "
           f"Data: {html.escape(cfg.data)}; histograms over the first {HISTOGRAM_PAIRS} pairs at most.</p>"]
    if has_keys:
        out.append("<table><tr><th>known key tokens</th><th>precision</th><th>recall</th><th>key fraction</th>"
                   "<th>selected fraction</th></tr>")
        for side in ("chosen", "rejected"):
            k = entry[f"key_{side}"]
            out.append(f"<tr><td>{side}</td><td>{k['precision']:.3f}</td><td>{k['recall']:.3f}</td>"
                       f"<td>{k['key_fraction']:.3f}</td><td>{k['selected_fraction']:.3f}</td></tr>")
        out.append("</table><p class='meta'>A random selection of the same size has precision = key fraction.</p>")
    colours = {"chosen": "#d62728", "rejected": "#1f77b4"}
    out.append(_histogram_svg([(s, report["scores"][s], colours[s]) for s in colours],
                              "log pi(y_t) of every response token" if cfg.confpo else
                              "token scores s(y_t), chosen vs rejected (SePO Fig. 6)"))
    out.append(_histogram_svg([(s, report["positions"][s], colours[s]) for s in colours],
                              "selected tokens by relative position in the response (ConfPO Fig. 12)", bins=20,
                              lo=0.0, hi=1.0))
    for rec in sorted(report["pairs"], key=lambda r: r["out"]["row"]):
        out.append(f"<h3>pair {rec['out']['row']}</h3>")
        for side, (sel, scores) in rec["sides"].items():
            ids = response_part(rec["target"], side, "input_ids")
            keys = response_part(rec["target"], side, "key") if has_keys else [0] * len(ids)
            spans = []
            for text, s, v, k in zip(token_texts(tokenizer, ids), sel, scores, keys):
                label = (f"{'log pi' if cfg.confpo else 'score'} {v:.3f}" + (" (selected)" if s else "")
                         + (" (key token)" if k else ""))
                classes = "tok" + (" sel" if s else "") + (" key" if k else "")
                spans.append(f"<span class='{classes}' style='background:{_colour(v, scale, cfg.confpo)}'"
                             f" title='{html.escape(label)}'>{html.escape(text)}</span>")
            out.append(f"<p class='meta'>{side}: {sum(sel)} of {len(sel)} tokens selected "
                       f"({sum(sel) / max(len(sel), 1):.0%})</p><div class='resp'>{''.join(spans)}</div>")
    out.append("</body></html>")
    atomic_write(path, "".join(out))


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def check_config(cfg):
    if cfg.confpo:
        if not cfg.model:
            raise SystemExit("--confpo needs --model: the policy whose confidence selects tokens")
    elif not (cfg.oracle and cfg.reference):
        raise SystemExit("score.py needs --oracle and --reference (or --confpo --model)")
    if not cfg.data:
        raise SystemExit("score.py needs --data")
    if not cfg.output_dir:
        raise SystemExit("score.py needs --output_dir")
    if cfg.format not in ("jsonl", "datasets"):
        raise SystemExit(f"--format must be jsonl or datasets, got {cfg.format!r}")
    if cfg.confpo:
        try:
            confpo.parse_threshold(cfg.threshold)
        except ValueError as e:
            raise SystemExit(f"--{e}") from None
    else:
        parse_ratios(cfg.ratios)


def tokenizers(cfg):
    """(scoring tokenizer, policy tokenizer, crossing). With one vocabulary the policy's tokenizer (its chat
    template included) renders the data for oracle and reference alike, so positions are the policy's own."""
    from transformers import AutoTokenizer
    if cfg.confpo:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        return tok, tok, False
    oracle_tok = AutoTokenizer.from_pretrained(cfg.oracle)
    diffs = tokenizer_differences(oracle_tok, AutoTokenizer.from_pretrained(cfg.reference))
    if diffs:
        raise SystemExit(f"the oracle and the reference must share a tokenizer (Eq. 24 compares the same token ids); "
                         f"they differ in: {'; '.join(diffs)}")
    if not cfg.policy:
        return oracle_tok, oracle_tok, False
    policy_tok = AutoTokenizer.from_pretrained(cfg.policy)
    crossing = check_tokenizers(oracle_tok, policy_tok, cfg.oracle, cfg.policy, cfg.cross_tokenizer)
    return (oracle_tok if crossing else policy_tok), policy_tok, crossing


def main(argv=None):
    cfg, _ = train.parse_dataclass(ScoreConfig, argv, __doc__)
    check_config(cfg)
    owner = not dist.is_initialized()
    rank, world, device = train.init_distributed(cfg)
    try:
        return run(cfg, rank, world, device)
    finally:
        if owner:
            dist.destroy_process_group()


def run(cfg, rank, world, device):
    score_tok, policy_tok, crossing = tokenizers(cfg)

    def load():
        ds = data.load_preferences(cfg.data, split=cfg.split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                   cache_dir=cfg.cache_dir or None)
        ds = ds.select(range(min(cfg.max_pairs, len(ds)))) if cfg.max_pairs else ds
        return ds, *data.tokenize_preferences(ds, score_tok, cfg.max_length, cfg.max_prompt_length, offsets=crossing)

    ds, tokenized, stats = train.rank_zero_first(load)
    train.log0(f"{cfg.data}: {stats['kept']} pairs to score ({stats['dropped_empty']} dropped: empty response)")
    manifest_path = os.path.join(cfg.output_dir, "manifest.json")
    mine = identity(cfg, tokenized, score_tok)
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            old = json.load(fh)["identity"]
        changed = [k for k in mine if old.get(k) != mine[k]]
        if changed:
            raise SystemExit(f"{cfg.output_dir} holds scores of another run (differs in: {', '.join(changed)}); "
                             "choose another --output_dir")
    dist.barrier()
    if rank == 0:
        os.makedirs(os.path.join(cfg.output_dir, "shards"), exist_ok=True)
        for leftover in glob.glob(os.path.join(cfg.output_dir, "shards", "*.tmp*")):
            os.remove(leftover)  # a block whose write was killed
        atomic_write(manifest_path, json.dumps({"identity": mine, "complete": False,
                                                "policy_tokenizer": data.tokenizer_hash(policy_tok)}, indent=2))
    dist.barrier()
    pad_id = score_tok.pad_token_id if score_tok.pad_token_id is not None else score_tok.eos_token_id
    score_blocks(cfg, tokenized, pad_id, rank, world, device)
    dist.barrier()
    if rank == 0:
        finish(cfg, ds, tokenized, stats, score_tok, policy_tok, crossing, mine, manifest_path)
    dist.barrier()
    return cfg.output_dir


def finish(cfg, ds, tokenized, stats, score_tok, policy_tok, crossing, mine, manifest_path):
    """Rank 0: merge, select, write the selection files, then the complete manifest, then the report."""
    policy_ds = data.tokenize_preferences(ds, policy_tok, cfg.max_length, cfg.max_prompt_length,
                                          offsets=True)[0] if crossing else tokenized
    eos_ids = (score_tok.eos_token_id, policy_tok.eos_token_id) if crossing else None
    selection_stats, report = merge(cfg, len(tokenized), tokenized, policy_ds, eos_ids)
    manifest = {"identity": mine, "complete": True, "pairs": len(policy_ds), "tokenize": stats, "policy": cfg.policy,
                "policy_tokenizer": data.tokenizer_hash(policy_tok), "cross_tokenizer": crossing,
                "selections": selection_stats}
    atomic_write(manifest_path, json.dumps(manifest, indent=2))
    for name in selectors(cfg):
        entry, line = selection_stats[name], f"wrote {os.path.join(cfg.output_dir, name)}"
        if "key_chosen" in entry:
            line += (f" (known key tokens: chosen precision {entry['key_chosen']['precision']:.3f} / recall "
                     f"{entry['key_chosen']['recall']:.3f}, rejected {entry['key_rejected']['precision']:.3f} / "
                     f"{entry['key_rejected']['recall']:.3f})")
        train.log0(line)
    if cfg.report:
        write_report(cfg, cfg.report, report, selection_stats, policy_tok)
        train.log0(f"wrote {cfg.report}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
