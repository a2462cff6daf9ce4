"""Score every response token with an oracle and a reference (SePO Eq. 24), select (Eq. 25), write the selections
that `train.py --method sepo` reads; or show ConfPO's selection under one model. Optionally an HTML report.

    python score.py --oracle runs/sepo/oracle/final --reference runs/sepo/sft/final --data DATA \
        --policy PATH_OR_NAME --ratios 0.3:0.3,0.5:0.1 --output_dir runs/sepo/selections --report report.html
    torchrun --standalone --nproc_per_node 8 score.py ...            # each rank scores its shards; rank 0 merges
    python score.py --confpo --model PATH --data DATA --report confpo.html --output_dir runs/confpo-scores

Output folder:
    shards/block_NNNNNN.jsonl   per block of pairs: Eq. 24 scores of every response token (atomic; a killed run
                                resumes at the first missing block, and the merged files equal an uninterrupted run's)
    selections-c{rc}-r{rl}.jsonl  one per ratio pair: row, chosen_n, rejected_n, chosen_selected, rejected_selected
                                (indices of selected tokens, 0 = first response token), + scores with --save_scores
    manifest.json               models, data, ratios, the policy tokenizer's fingerprint, key-token precision/recall
Positions are in the policy's tokenization: the oracle, the reference and the policy must share a vocabulary, or
`--cross_tokenizer` maps the oracle's selection onto the policy's tokens through character offsets.
"""

import html
import json
import math
import os
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
    report: str = _f("", "write an HTML report here")
    report_pairs: int = _f(12, "pairs shown token by token in the report")
    seed: int = _f(0, "seed of the report's sample of pairs")


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


def map_across_tokenizers(src_spans, src_selected, src_scores, dst_spans):
    """Carry a selection from one tokenization of a response to another through character spans.

    src_spans (n, 2), dst_spans (m, 2): [start, end) in the response text per token, [-1, -1] for tokens outside
    it (EOS, template tokens). A destination token is selected when it overlaps a selected source token's span;
    its score is the overlap-weighted mean of the source scores it overlaps. A final EOS (spanless on both sides)
    takes the source's final EOS. Returns (selected (m,) bool, scores (m,) float).
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
    if dst_spans[-1, 0] < 0 and src_spans[-1, 0] < 0:  # both end with an EOS (not cut by truncation)
        selected[-1], scores[-1] = src_selected[-1], src_scores[-1]
    return selected, scores.float()


# ---------------------------------------------------------------------------------------------------------------
# Scoring (each rank its blocks), shards written atomically
# ---------------------------------------------------------------------------------------------------------------

def load_scorer(path, cfg, device):
    """A causal LM for inference that returns per-token log-probs (train.PolicyLogps), no FSDP: ranks split data."""
    from transformers import AutoModelForCausalLM
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return train.PolicyLogps(model, train.choose_logp_path("auto", model), chunk_size=1024)


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
    bar = tqdm(total=pairs, desc=f"scoring (rank {rank})", disable=rank != 0, unit="pair", dynamic_ncols=True)
    tokens, t0 = 0, time.perf_counter()
    for b in todo:
        lines = []
        for s in range(b * cfg.shard_size, min(len(tokenized), (b + 1) * cfg.shard_size), cfg.batch_size):
            rows = [tokenized[i] for i in range(s, min(s + cfg.batch_size, len(tokenized), (b + 1) * cfg.shard_size))]
            batch = {k: v.to(device) for k, v in data.collate_pairs(rows, pad_id).items()}
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            with torch.no_grad():
                if cfg.confpo:  # the policy's own confidence, log pi(y_t)
                    scores, _ = scorer(**inputs)
                else:  # Eq. 24: s(y_t) = beta log(pi_oracle(y_t) / pi_ref(y_t))
                    scores = sepo.token_scores(oracle(**inputs)[0], reference(**inputs)[0], cfg.beta)
            per_row = response_values(scores.float().cpu(), batch["labels"].cpu())
            B = len(rows)
            for i, row in enumerate(rows):
                lines.append(json.dumps({"row": row["row"], "chosen_n": len(per_row[i]),
                                         "rejected_n": len(per_row[B + i]), "chosen_scores": per_row[i],
                                         "rejected_scores": per_row[B + i]}))
            tokens += int(batch["attention_mask"].sum())
            bar.update(B)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        atomic_write(block_path(cfg, b), "\n".join(lines) + "\n")
    bar.close()


def read_blocks(cfg, n_pairs):
    n_blocks = math.ceil(n_pairs / cfg.shard_size)
    rows = []
    for b in range(n_blocks):
        with open(block_path(cfg, b), encoding="utf-8") as fh:
            rows += [json.loads(line) for line in fh if line.strip()]
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Selection (Eq. 25, or ConfPO's Eq. 12-14), merged by rank 0
# ---------------------------------------------------------------------------------------------------------------

def padded(lists, fill=0.0):
    """Lists of per-token values -> (values (N, L) float64, mask (N, L) bool)."""
    L = max((len(x) for x in lists), default=1) or 1
    values = torch.full((len(lists), L), fill, dtype=torch.float64)
    mask = torch.zeros(len(lists), L, dtype=torch.bool)
    for i, x in enumerate(lists):
        values[i, :len(x)] = torch.tensor(x, dtype=torch.float64)
        mask[i, :len(x)] = True
    return values, mask


def select(cfg, scores, highest, ratio):
    """Selections (list of bool lists) for a list of per-response score lists."""
    values, mask = padded(scores)
    if cfg.confpo:
        threshold = cfg.threshold if cfg.threshold in ("arithmetic", "geometric") else float(cfg.threshold)
        chosen, _ = confpo.confpo_mask(values, mask, threshold, cfg.strict)
    else:
        chosen = sepo.select_tokens(values, mask, ratio, highest)
    return [sel[:len(s)].tolist() for sel, s in zip(chosen, scores)]


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


def selection_name(rc, rl, fmt):
    return f"selections-c{rc:g}-r{rl:g}" + (".jsonl" if fmt == "jsonl" else "")


def key_precision_recall(selected, keys):
    """How well a selection finds the known key tokens: |S & K| / |S| and |S & K| / |K| over all responses."""
    hit = sum(s and k for sel, key in zip(selected, keys) for s, k in zip(sel, key))
    n_sel = sum(map(sum, selected))
    n_key = sum(map(sum, keys))
    n_all = sum(map(len, keys))
    return {"precision": hit / max(n_sel, 1), "recall": hit / max(n_key, 1), "key_fraction": n_key / max(n_all, 1),
            "selected_fraction": n_sel / max(n_all, 1)}


def merge(cfg, rows, policy_tok_rows, oracle_tok_rows):
    """Write one selection file per ratio pair (atomically) and return the manifest's per-ratio statistics.

    rows: the block lines (oracle tokenization). policy_tok_rows / oracle_tok_rows: tokenized pairs by row (with
    offsets when crossing tokenizers, with key masks when the data has key spans)."""
    stats = {}
    ratio_pairs = [(None, None)] if cfg.confpo else parse_ratios(cfg.ratios)
    out = {}
    for rc, rl in ratio_pairs:
        sides = {}
        for side, highest, ratio in (("chosen", True, rc), ("rejected", False, rl)):
            sel = select(cfg, [r[f"{side}_scores"] for r in rows], highest, ratio)
            scores = [r[f"{side}_scores"] for r in rows]
            if cfg.cross_tokenizer:
                mapped = [map_across_tokenizers(torch.tensor(response_part(oracle_tok_rows[r["row"]], side, "offsets")),
                                                torch.tensor(s), torch.tensor(sc),
                                                torch.tensor(response_part(policy_tok_rows[r["row"]], side, "offsets")))
                          for r, s, sc in zip(rows, sel, scores)]
                sel, scores = [m[0].tolist() for m in mapped], [m[1].tolist() for m in mapped]
            sides[side] = (sel, scores)
        name = "confpo" if cfg.confpo else selection_name(rc, rl, cfg.format)
        records = []
        for i, r in enumerate(rows):
            rec = {"row": r["row"]}
            for side, (sel, scores) in sides.items():
                rec[f"{side}_n"] = len(sel[i])
                rec[f"{side}_selected"] = [j for j, s in enumerate(sel[i]) if s]
                if cfg.save_scores or cfg.confpo:
                    rec[f"{side}_scores"] = scores[i]
            records.append(rec)
        write_selections(cfg, name, records)
        entry = {"file": name, "chosen_ratio": rc, "rejected_ratio": rl}
        if "chosen_key" in next(iter(policy_tok_rows.values())):
            for side, (sel, _) in sides.items():
                keys = [response_part(policy_tok_rows[r["row"]], side, "key") for r in rows]
                entry[f"key_{side}"] = key_precision_recall(sel, keys)
        stats[name] = entry
        out[name] = (records, sides)
    return stats, out


def response_part(tok_row, side, field):
    """A per-token field of a tokenized pair (`<side>_<field>`, e.g. key flags or offsets), response tokens only."""
    return [x for x, lab in zip(tok_row[f"{side}_{field}"], tok_row[f"{side}_labels"]) if lab != losses.IGNORE_INDEX]


def write_selections(cfg, name, records):
    path = os.path.join(cfg.output_dir, name)
    if cfg.format == "datasets" and not cfg.confpo:
        import datasets
        import shutil
        tmp = path + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(records).save_to_disk(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    else:
        atomic_write(path if path.endswith(".jsonl") else path + ".jsonl",
                     "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------------------------------------------------
# The report: tokens coloured by score, selections marked, histograms (SePO Fig. 6, ConfPO Fig. 12)
# ---------------------------------------------------------------------------------------------------------------

def _colour(score, scale, confpo_mode):
    """Diverging colours: red for high oracle scores (or, for ConfPO, low confidence), blue for the other end."""
    if confpo_mode:  # score = log pi: probability 1 is white, probability 0 red
        t = 1.0 - math.exp(score)
        return f"rgba(220,40,40,{0.85 * t:.3f})"
    t = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    return f"rgba(220,40,40,{0.85 * t:.3f})" if t >= 0 else f"rgba(40,90,220,{-0.85 * t:.3f})"


def _histogram_svg(series, title, bins=30, lo=None, hi=None, width=520, height=170):
    """An inline SVG histogram of one or more named value lists, overlaid."""
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
        total = max(len(vals), 1)
        counts.append((name, [x / total for x in c], colour))
    top = max(max(c) for _, c, _ in counts) or 1.0
    w = (width - 40) / bins
    parts = [f'<svg width="{width}" height="{height + 40}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="20" y="14" font-size="13">{html.escape(title)}</text>']
    for name, c, colour in counts:
        for i, x in enumerate(c):
            h = x / top * height
            parts.append(f'<rect x="{30 + i * w:.1f}" y="{20 + height - h:.1f}" width="{w - 1:.1f}" height="{h:.1f}" '
                         f'fill="{colour}" fill-opacity="0.55"><title>{name}: {x:.3f} in '
                         f'[{lo + i * (hi - lo) / bins:.3g}, {lo + (i + 1) * (hi - lo) / bins:.3g})</title></rect>')
    parts.append(f'<text x="30" y="{height + 36}" font-size="11">{lo:.3g}</text>'
                 f'<text x="{width - 40}" y="{height + 36}" font-size="11">{hi:.3g}</text>')
    for k, (name, _, colour) in enumerate(counts):
        parts.append(f'<rect x="{width - 170}" y="{22 + 16 * k}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - 155}" y="{31 + 16 * k}" font-size="11">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def write_report(cfg, path, name, records, sides, tok_rows, tokenizer, stats):
    """One HTML file, no dependency: a sample of pairs token by token, and the score and position histograms."""
    import random
    chosen_sel, chosen_scores = sides["chosen"]
    rejected_sel, rejected_scores = sides["rejected"]
    all_scores = [abs(v) for s in chosen_scores + rejected_scores for v in s]
    scale = sorted(all_scores)[int(0.99 * (len(all_scores) - 1))] if all_scores else 1.0
    sample = sorted(random.Random(cfg.seed).sample(range(len(records)), min(cfg.report_pairs, len(records))))
    title = ("ConfPO selection under " + cfg.model) if cfg.confpo else f"SePO selection ({name})"
    legend = ("colour: 1 - pi(y_t) (red = unsure); outlined: selected (pi <= tau)" if cfg.confpo else
              "colour: score s(y_t) = beta log(pi_oracle / pi_ref) (red high, blue low); outlined: selected")
    legend += "; green wavy underline: a known key token of the synthetic task" if "chosen_key" in next(
        iter(tok_rows.values())) else ""
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>", html.escape(title), "</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:20px auto;color:#222}",
           ".resp{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:6px}",
           ".tok{padding:1px 0;border-radius:2px}.sel{outline:2px solid #111;outline-offset:-1px}",
           ".key{text-decoration:underline wavy #0a0;text-underline-offset:4px}",
           "h3{margin-bottom:4px}.meta{color:#666;font-size:13px}table{border-collapse:collapse}",
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(legend)}. Hover a token for its value. "
           f"Data: {html.escape(cfg.data)}; {len(records)} pairs.</p>"]
    entry = stats.get(name, {})
    if "key_chosen" in entry:
        out.append("<table><tr><th>known key tokens</th><th>precision</th><th>recall</th><th>key fraction</th>"
                   "<th>selected fraction</th></tr>")
        for side in ("chosen", "rejected"):
            k = entry[f"key_{side}"]
            out.append(f"<tr><td>{side}</td><td>{k['precision']:.3f}</td><td>{k['recall']:.3f}</td>"
                       f"<td>{k['key_fraction']:.3f}</td><td>{k['selected_fraction']:.3f}</td></tr>")
        out.append("</table><p class='meta'>A random selection of the same size has precision = key fraction.</p>")
    # histograms over the whole data
    out.append(_histogram_svg([("chosen", [v for s in chosen_scores for v in s], "#d62728"),
                               ("rejected", [v for s in rejected_scores for v in s], "#1f77b4")],
                              "log pi(y_t) of every response token" if cfg.confpo else
                              "token scores s(y_t), chosen vs rejected (SePO Fig. 6)"))
    positions = {side: [j / max(len(sel) - 1, 1) for sel in sels for j, s in enumerate(sel) if s]
                 for side, sels in (("chosen", chosen_sel), ("rejected", rejected_sel))}
    out.append(_histogram_svg([("chosen", positions["chosen"], "#d62728"),
                               ("rejected", positions["rejected"], "#1f77b4")],
                              "selected tokens by relative position in the response (ConfPO Fig. 12)", bins=20,
                              lo=0.0, hi=1.0))
    for i in sample:
        rec = records[i]
        tok_row = tok_rows[rec["row"]]
        out.append(f"<h3>pair {rec['row']}</h3>")
        for side, sels, scores in (("chosen", chosen_sel, chosen_scores), ("rejected", rejected_sel, rejected_scores)):
            ids = response_part(tok_row, side, "input_ids")
            keys = response_part(tok_row, side, "key") if f"{side}_key" in tok_row else [0] * len(ids)
            sel, sc = sels[i], scores[i]
            spans = []
            for t, s, v, k in zip(ids, sel, sc, keys):
                label = (f"{'log pi' if cfg.confpo else 'score'} {v:.3f}" + (" (selected)" if s else "")
                         + (" (key token)" if k else ""))
                classes = "tok" + (" sel" if s else "") + (" key" if k else "")
                spans.append(f"<span class='{classes}' style='background:{_colour(v, scale, cfg.confpo)}'"
                             f" title='{html.escape(label)}'>{html.escape(tokenizer.decode([t]))}</span>")
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
    if not cfg.confpo:
        parse_ratios(cfg.ratios)


def tokenizers(cfg):
    """(scoring tokenizer, policy tokenizer). Same vocabulary: the policy's, so positions are the policy's own
    (oracle and reference read the same ids). Different: an error, or with --cross_tokenizer both are kept."""
    from transformers import AutoTokenizer
    if cfg.confpo:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        return tok, tok
    oracle_tok = AutoTokenizer.from_pretrained(cfg.oracle)
    diffs = tokenizer_differences(oracle_tok, AutoTokenizer.from_pretrained(cfg.reference))
    if diffs:
        raise SystemExit(f"the oracle and the reference must share a tokenizer (Eq. 24 compares the same token ids); "
                         f"they differ in: {'; '.join(diffs)}")
    if not cfg.policy:
        return oracle_tok, oracle_tok
    policy_tok = AutoTokenizer.from_pretrained(cfg.policy)
    diffs = tokenizer_differences(oracle_tok, policy_tok)
    if diffs and not cfg.cross_tokenizer:
        raise SystemExit(f"the oracle ({cfg.oracle}) and the policy ({cfg.policy}) have different tokenizers: "
                         f"{'; '.join(diffs)}. SePO selects token positions, so they must match (the paper's "
                         "stated limitation); pass --cross_tokenizer to map selections through character offsets")
    if not diffs:
        cfg.cross_tokenizer = False
        return policy_tok, policy_tok
    return oracle_tok, policy_tok


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
    score_tok, policy_tok = tokenizers(cfg)
    if rank == 0:
        os.makedirs(os.path.join(cfg.output_dir, "shards"), exist_ok=True)
    dist.barrier()
    def load():
        ds = data.load_preferences(cfg.data, split=cfg.split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                   cache_dir=cfg.cache_dir or None)
        ds = ds.select(range(min(cfg.max_pairs, len(ds)))) if cfg.max_pairs else ds
        return ds, *data.tokenize_preferences(ds, score_tok, cfg.max_length, cfg.max_prompt_length,
                                              offsets=cfg.cross_tokenizer)

    ds, tokenized, stats = train.rank_zero_first(load)
    train.log0(f"{cfg.data}: {stats['kept']} pairs to score ({stats['dropped_empty']} dropped: empty response)")
    manifest_path = os.path.join(cfg.output_dir, "manifest.json")
    identity = {"mode": "confpo" if cfg.confpo else "sepo", "oracle": cfg.oracle, "reference": cfg.reference,
                "model": cfg.model, "data": cfg.data, "split": cfg.split, "max_pairs": cfg.max_pairs,
                "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "beta": cfg.beta,
                "shard_size": cfg.shard_size, "scoring_tokenizer": data.tokenizer_hash(score_tok)}
    if os.path.exists(manifest_path):
        with open(manifest_path) as fh:
            old = json.load(fh)
        changed = [k for k, v in identity.items() if old.get("identity", {}).get(k) != v]
        if changed:
            raise SystemExit(f"{cfg.output_dir} holds scores of another run (differs in: {', '.join(changed)}); "
                             "choose another --output_dir")
    elif rank == 0:
        atomic_write(manifest_path, json.dumps({"identity": identity, "complete": False}, indent=2))
    pad_id = score_tok.pad_token_id if score_tok.pad_token_id is not None else score_tok.eos_token_id
    score_blocks(cfg, tokenized, pad_id, rank, world, device)
    dist.barrier()
    if rank == 0:
        finish(cfg, tokenized, stats, ds, score_tok, policy_tok, identity, manifest_path)
    dist.barrier()
    return cfg.output_dir


def finish(cfg, tokenized, stats, ds, score_tok, policy_tok, identity, manifest_path):
    """Rank 0: merge the blocks, select for every ratio pair, write the files, the manifest and the report."""
    rows = read_blocks(cfg, len(tokenized))
    oracle_rows = {r["row"]: r for r in tokenized}
    if cfg.cross_tokenizer:
        policy_tokenized, _ = data.tokenize_preferences(ds, policy_tok, cfg.max_length, cfg.max_prompt_length,
                                                        offsets=True)
        policy_rows = {r["row"]: r for r in policy_tokenized}
        missing = [r["row"] for r in rows if r["row"] not in policy_rows]
        if missing:  # dropped by the policy's truncation
            rows = [r for r in rows if r["row"] in policy_rows]
            train.log0(f"{len(missing)} pairs have an empty response in the policy's tokenization: not selected")
    else:
        policy_rows = oracle_rows
    ratio_stats, written = merge(cfg, rows, policy_rows, oracle_rows)
    manifest = {"identity": identity, "complete": True, "pairs": len(rows), "tokenize": stats,
                "policy": cfg.policy, "policy_tokenizer": data.tokenizer_hash(policy_tok),
                "cross_tokenizer": cfg.cross_tokenizer, "selections": ratio_stats}
    atomic_write(manifest_path, json.dumps(manifest, indent=2))
    for name, entry in ratio_stats.items():
        line = f"wrote {os.path.join(cfg.output_dir, entry['file'])}"
        if "key_chosen" in entry:
            line += (f" (known key tokens: chosen precision {entry['key_chosen']['precision']:.3f} / recall "
                     f"{entry['key_chosen']['recall']:.3f}, rejected {entry['key_rejected']['precision']:.3f} / "
                     f"{entry['key_rejected']['recall']:.3f})")
        train.log0(line)
    if cfg.report:
        name = next(iter(written))
        records, sides = written[name]
        write_report(cfg, cfg.report, name, records, sides, policy_rows, policy_tok, ratio_stats)
        train.log0(f"wrote {cfg.report}")


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
