"""score.py's HTML report: tokens coloured by score, selections outlined, known key tokens underlined, histograms of
scores (SePO Fig. 6) and of selected positions (ConfPO Fig. 12). One self-contained file, no dependency.
"""

import html
import math

import data
from rundir import atomic_write

HISTOGRAM_PAIRS = 20000  # the report's histograms use the first pairs up to this many (memory stays bounded)


def new_report(name):
    """An empty report of the selection file `name`."""
    return {"name": name, "pairs": [], "scores": {"chosen": [], "rejected": []},
            "positions": {"chosen": [], "rejected": []}}


def collect_report(report, rec, sample_rows):
    """Keep what the report needs: the sampled pairs whole, and scores and selected positions of the first pairs."""
    if rec["index"] in sample_rows:
        report["pairs"].append(rec)
    if rec["index"] < HISTOGRAM_PAIRS:
        for side, (sel, scores) in rec["sides"].items():
            report["scores"][side].extend(v for v in scores if math.isfinite(v))
            report["positions"][side].extend(j / max(len(sel) - 1, 1) for j, s in enumerate(sel) if s)


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
            ids = data.response_part(rec["target"], side, "input_ids")
            keys = data.response_part(rec["target"], side, "key") if has_keys else [0] * len(ids)
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
