"""The measures the two studies share (experiments.py, the miniature study on the tiny world; real_study.py, a real
model's study): what sampled answers cost and say (their sequence KL from a reference, their mean token log-prob under
a model, distinct-2), how a selection sits against the key tokens beside a random one of the same sizes (`anatomy`),
a result kept once beside the configuration that produced it (`cached`), the mean and spread over seeds and a
difference paired by seed (`paired`), and plots as hand-written SVG. It imports library modules only, never a study."""

import json
import math
import os
import statistics
from xml.sax.saxutils import escape

import torch

import data
import losses
from rundir import atomic_write
from utils import UserError


# ---------------------------------------------------------------------------------------------------------------
# Answers: against a reference, under a model, their variety
# ---------------------------------------------------------------------------------------------------------------

def position_ids(attention_mask):
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each text


@torch.no_grad()
def sequence_kl(model, sft, sequences, answer_mask, pad_id, batch_size=50, attention_mask=None):
    """Per answer: sum over its tokens t of KL(pi(.|x, y<t) || pi_sft(.|x, y<t)), from full distributions.
    attention_mask: the real tokens of the left-padded sequences (default: those that are not pad_id, which is
    right only where the pad token appears nowhere in a prompt). Only the rows that predict answer tokens are
    normalised (a float32 log-softmax of every position of a batch of 32 at 49k words is 2 GB a model)."""
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, answer = sequences[i:i + batch_size], answer_mask[i:i + batch_size]
        attention = ((ids != pad_id) if attention_mask is None else attention_mask[i:i + batch_size].bool()) | answer
        kw = dict(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids(attention))
        rows = answer[:, 1:]  # position t predicts token t + 1: the positions that predict an answer token
        logp = torch.log_softmax(model(**kw).logits[:, :-1][rows].float(), -1)  # (N, V)
        logq = torch.log_softmax(sft(**kw).logits[:, :-1][rows].float(), -1)
        kl_t = (logp.exp() * (logp - logq)).sum(-1)
        out.append(torch.zeros(len(ids), dtype=kl_t.dtype, device=kl_t.device).index_add_(
            0, rows.nonzero()[:, 0], kl_t))
    return torch.cat(out)


def left_padded(answers, pad):
    """[(prompt ids, answer ids, ended)] -> left-padded prompt + answer ids (N, T), their attention mask and the
    answer mask (True on answer tokens)."""
    T = max(len(p) + len(a) for p, a, _ in answers)
    ids = torch.full((len(answers), T), pad)
    attention = torch.zeros(len(answers), T, dtype=torch.bool)
    answer = torch.zeros(len(answers), T, dtype=torch.bool)
    for i, (p, a, _) in enumerate(answers):
        ids[i, T - len(p) - len(a):] = torch.tensor(p + a)
        attention[i, T - len(p) - len(a):] = True
        answer[i, T - len(a):] = True
    return ids, attention, answer


@torch.no_grad()
def mean_token_logp(model, answers, pad, device, batch_size=32):
    """A model's mean token log-prob of answers [(prompt ids, answer ids, ended)]: the mean over answers of each
    one's mean."""
    out = []
    for i in range(0, len(answers), batch_size):
        ids, attention, answer = (x.to(device) for x in left_padded(answers[i:i + batch_size], pad))
        logits = model(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids(attention)).logits
        logps, mask = losses.token_logps(logits, torch.where(answer, ids, losses.IGNORE_INDEX))
        out += losses.masked_mean(logps, mask).tolist()
    return statistics.fmean(out)


def distinct2(strings):
    """Distinct-2: unique word bigrams over all bigrams of the answers."""
    grams = [tuple(w[i:i + 2]) for s in strings for w in [s.lower().split()] for i in range(len(w) - 1)]
    return len(set(grams)) / max(len(grams), 1)


# ---------------------------------------------------------------------------------------------------------------
# Results: each computed once per configuration
# ---------------------------------------------------------------------------------------------------------------

def git_commit(folder=None):
    """The git commit of the code in `folder` (default: the repository's), with "+changes" when tracked files differ
    from it; None outside a git work tree (a study records which code wrote its results)."""
    import subprocess
    folder = folder or os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def cached(path, key, fn):
    """fn() once: its result is kept in `path` beside the configuration that produced it (`key`). A result of
    another configuration is never reused: the study stops and names the file."""
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("config") != key:
            raise UserError(f"{path} holds a result of another configuration of the study; choose another "
                            "--output_dir (or delete that file to compute it again)")
        return saved["result"]
    result = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps({"config": key, "result": result}, indent=1))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Selections: against the key tokens, beside a random selection of the same sizes
# ---------------------------------------------------------------------------------------------------------------

def anatomy(ctx, path, seed=0):
    """How a selection sits in the responses, beside a random selection of the same sizes: precision and recall
    of the planted key tokens, `one_sided`: the share of selected tokens that are neutral words (not keys, found
    in chosen and rejected answers alike) selected on this side and never on the other, and for rejected answers
    how often the key itself and the token right after it are selected."""
    rows = {r["row"]: r for r in map(json.loads, open(path))}
    tok = ctx["tokenized_train"]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for kind in ("selection", "random"):
        counts = {"chosen": {}, "rejected": {}}
        neutral_sides = {"chosen": set(), "rejected": set()}
        stats = {s: dict(selected=0, key=0, hit=0, tokens=0) for s in ("chosen", "rejected")}
        at_key, after_key, with_key, picks = 0, 0, 0, {}
        for ex in tok:
            for side in ("chosen", "rejected"):
                ids, keys = data.response_part(ex, side, "input_ids"), data.response_part(ex, side, "key")
                chosen = set(rows[ex["row"]][f"{side}_selected"])
                if kind == "random":
                    order = torch.randperm(len(ids), generator=gen).tolist()
                    chosen = set(order[:len(chosen)])
                picks[(ex["row"], side)] = chosen
                for j, (v, key) in enumerate(zip(ids, keys)):
                    if not key:
                        neutral_sides[side].add(v)
                    if j in chosen:
                        counts[side][v] = counts[side].get(v, 0) + 1
                s = stats[side]
                s["selected"] += len(chosen)
                s["key"] += sum(keys)
                s["hit"] += sum(1 for j in chosen if keys[j])
                s["tokens"] += len(ids)
                if side == "rejected" and any(keys):
                    last = max(j for j, key in enumerate(keys) if key)
                    with_key += 1
                    at_key += any(keys[j] for j in chosen)
                    after_key += (last + 1) in chosen and last + 1 < len(ids) and not keys[last + 1]
        neutral = neutral_sides["chosen"] & neutral_sides["rejected"]
        result = {}
        for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
            one_sided = 0
            for ex in tok:
                ids, keys = data.response_part(ex, side, "input_ids"), data.response_part(ex, side, "key")
                one_sided += sum(1 for j in picks[(ex["row"], side)] if not keys[j] and ids[j] in neutral
                                 and ids[j] not in counts[other])
            s = stats[side]
            result[side] = {"selected_fraction": s["selected"] / max(s["tokens"], 1),
                            "precision": s["hit"] / max(s["selected"], 1), "recall": s["hit"] / max(s["key"], 1),
                            "one_sided": one_sided / max(s["selected"], 1)}
        result["rejected"].update(key_selected=at_key / max(with_key, 1),
                                  after_key_selected=after_key / max(with_key, 1))
        out[kind] = result
    return out


# ---------------------------------------------------------------------------------------------------------------
# Over seeds: mean and spread, differences paired by seed
# ---------------------------------------------------------------------------------------------------------------

# Student's t: the 97.5% quantile by degrees of freedom (paired's 95% interval; 1.96 beyond 9)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired(runs, name, base, metric):
    """The per-seed differences name - base on a metric, their mean, 95% t-interval, and what may be claimed:
    "higher" or "lower" when every seed agrees or the interval excludes zero, else "no claim"."""
    diffs = [runs[s][name]["final"][metric] - runs[s][base]["final"][metric] for s in runs
             if name in runs[s] and base in runs[s]]
    mean = statistics.fmean(diffs)
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0
    sure = all(d > 0 for d in diffs) or all(d < 0 for d in diffs) or (len(diffs) > 1 and abs(mean) > half)
    verdict = ("higher" if mean > 0 else "lower") if sure and mean != 0 else "no claim"
    return {"diffs": diffs, "mean": mean, "ci95": [mean - half, mean + half], "verdict": verdict}


def fmt(pair, digits=3):
    mean, std = pair
    return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


# ---------------------------------------------------------------------------------------------------------------
# Plots: hand-written SVG (no plotting dependency)
# ---------------------------------------------------------------------------------------------------------------

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def svg_panel(x0, y0, w, h, panel):
    """One chart at (x0, y0): panel = {title, xlabel, ylabel, series: [{label, x, y, err?, colour?, dashed?}],
    xticks? / yticks?: [(value, text)] (categorical?: the x are category indices), points_only?: no lines}."""
    xs = [v for s in panel["series"] for v in s["x"]]
    ys = [v + sgn * e for s in panel["series"] for v, e in zip(s["y"], s.get("err") or [0] * len(s["y"]))
          for sgn in (-1, 1)]
    xt = [t for t, _ in panel["xticks"]] if panel.get("xticks") else _ticks(min(xs), max(xs))
    yt = [t for t, _ in panel["yticks"]] if panel.get("yticks") else _ticks(min(ys), max(ys))
    xlo, xhi = min(xt + xs), max(xt + xs)
    if panel.get("categorical"):
        xlo, xhi = xlo - 0.5, xhi + 0.5
    ylo, yhi = min(yt + ys), max(yt + ys)
    legend = 24 + 6.5 * max(len(s["label"]) for s in panel["series"])  # the legend sits right of the axes
    below = 62 if panel.get("categorical") else 38  # room for slanted category names
    left, right, top, bottom = x0 + 52, x0 + w - 10 - legend, y0 + 24, y0 + h - below
    px = lambda v: left + (v - xlo) / ((xhi - xlo) or 1) * (right - left)  # noqa: E731
    py = lambda v: bottom - (v - ylo) / ((yhi - ylo) or 1) * (bottom - top)  # noqa: E731
    o = [f'<text x="{(left + right) / 2}" y="{y0 + 14}" text-anchor="middle" font-weight="bold">'
         f'{escape(panel["title"])}</text>',
         f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>']
    for v, text in panel.get("yticks") or [(v, f"{v:g}") for v in yt]:
        o.append(f'<line x1="{left}" x2="{right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>'
                 f'<text x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{escape(str(text))}</text>')
    for v, text in panel.get("xticks") or [(v, f"{v:g}") for v in xt]:
        slant = f' text-anchor="end" transform="rotate(-30 {px(v):.1f} {bottom + 14})"' if panel.get("categorical") \
            else ' text-anchor="middle"'
        o.append(f'<text x="{px(v):.1f}" y="{bottom + 14}"{slant}>{escape(str(text))}</text>')
    o.append(f'<text x="{(left + right) / 2}" y="{y0 + h - 6}" text-anchor="middle">{escape(panel["xlabel"])}</text>')
    o.append(f'<text transform="translate({x0 + 12},{(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
             f'{escape(panel["ylabel"])}</text>')
    for i, s in enumerate(panel["series"]):
        c = s.get("colour") or COLOURS[i % len(COLOURS)]
        pts = [(px(a), py(b)) for a, b in zip(s["x"], s["y"])]
        if len(pts) > 1 and not panel.get("points_only"):
            dash = ' stroke-dasharray="4 3"' if s.get("dashed") else ""
            o.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6"{dash} points="' +
                     " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for (a, b), v, e in zip(pts, s["y"], s.get("err") or [None] * len(pts)):
            if e:
                o.append(f'<line x1="{a:.1f}" x2="{a:.1f}" y1="{py(v - e):.1f}" y2="{py(v + e):.1f}" stroke="{c}"/>')
            o.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>')
        o.append(f'<rect x="{right + 8}" y="{top + 6 + 14 * i}" width="10" height="10" fill="{c}"/>'
                 f'<text x="{right + 22}" y="{top + 15 + 14 * i}">{escape(s["label"])}</text>')
    return o


def write_svg(path, panels, width=420, height=300):
    """Panels side by side in one SVG file, written through a temporary file."""
    body = [line for i, p in enumerate(panels) for line in svg_panel(i * width, 0, width, height, p)]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
           + "".join(body) + "</svg>\n")
    atomic_write(path, svg)
    return path
