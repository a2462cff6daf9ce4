"""The miniature study's results (experiments.py): per regime or protocol, the summary over seeds and the paired
comparisons, results.json, the tables of results.md and the SVG plots, written from the results alone (so that
--tables_only writes them again without the runs)."""

import json
import math
import os
import statistics
from dataclasses import asdict

from measures import COLOURS, fmt, mean_std, paired, write_svg
from rundir import atomic_write

# The default oracle: its data share and size (tiny.MODEL_SIZES), in the names of SePO's runs
DEFAULT_SHARE, DEFAULT_SIZE = 0.5, "tiny"


# ---------------------------------------------------------------------------------------------------------------
# Summaries: mean and spread over seeds, and differences paired by seed
# ---------------------------------------------------------------------------------------------------------------

METRICS = ("reward", "kl", "accuracy", "margin", "chosen_logp")


def summarize(runs):
    """{run name: {metric: [mean, std]}} over seeds."""
    out = {}
    for name in next(iter(runs.values())):
        rows = [runs[s][name] for s in runs if name in runs[s]]
        out[name] = {m: mean_std([r["final"][m] for r in rows]) for m in METRICS}
        out[name].update({m: mean_std([r[m] for r in rows]) for m in ("own_accuracy", "own_margin")})
    return out


# The papers' orderings between two methods (a, b: "a beats b"), besides every method against SimPO and the start
CLAIMS = [("confpo", "confpo_rand", "ConfPO beats random selection (ConfPO Table 2)"),
          ("confpo_dpo", "dpo", "ConfPO_DPO beats DPO (ConfPO Table 4)"),
          ("sepo", "dpo", "SePO beats DPO (SePO Tables 1-2)")]


def pairs_of(runs, summary):
    """The paired comparisons: "name-sft" (reward), "name" against SimPO (reward and accuracy), "a-b" of CLAIMS."""
    pairs = {}
    for name in summary:
        if name != "sft":
            pairs[f"{name}-sft"] = paired(runs, name, "sft", "reward")
        if name not in ("sft", "simpo") and "simpo" in summary:
            pairs[name] = {m: paired(runs, name, "simpo", m) for m in ("reward", "accuracy")}
    for a, b, _ in CLAIMS:
        if a in summary and b in summary:
            pairs[f"{a}-{b}"] = paired(runs, a, b, "reward")
    return pairs


def mean_curve(runs, name, key):
    """The mean over seeds of a run's curve: [(step, mean of key)] on the steps every seed has."""
    curves = [{p["step"]: p[key] for p in runs[s][name]["curve"] if key in p} for s in runs if name in runs[s]]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [statistics.fmean(c[t] for c in curves) for t in steps]


# ---------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------

def plot_regime(cfg, regime, res, summary, d):
    """The SVG plots of one regime into folder d."""
    runs = res["runs"]
    methods = ["sft"] + cfg.methods.split(",")
    cat = list(enumerate(methods))

    def dots(metric, label):
        return {"title": label, "xlabel": "", "ylabel": label, "xticks": cat, "categorical": True, "points_only": True,
                "series": [{"label": "mean ± std over seeds", "x": list(range(len(methods))),
                            "y": [summary[m][metric][0] for m in methods],
                            "err": [summary[m][metric][1] for m in methods]}]}
    files = {"methods": write_svg(os.path.join(d, "methods.svg"), [
        dots("reward", f"reward of greedy answers ({regime})"), dots("accuracy", "held-out accuracy")], width=560)}
    with_curves = [m for m in methods[1:] + ["sepo_anchor"] if runs[next(iter(runs))].get(m, {}).get("curve")]
    by_kl, kl_by_step, reward_by_step = [], [], []
    for i, m in enumerate(with_curves):
        steps, kl = mean_curve(runs, m, "kl")
        _, reward = mean_curve(runs, m, "reward")
        log_kl = [math.log1p(max(v, 0.0)) for v in kl]
        colour = COLOURS[i % len(COLOURS)]
        by_kl.append({"label": m, "x": log_kl, "y": reward, "colour": colour})
        kl_by_step.append({"label": m, "x": steps, "y": log_kl, "colour": colour})
        reward_by_step.append({"label": m, "x": steps, "y": reward, "colour": colour})
    top = max(max(s["x"]) for s in by_kl)
    kl_ticks = [(math.log1p(v), f"{v:g}") for v in (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000)]
    kl_ticks = kl_ticks[:next((i + 1 for i, (t, _) in enumerate(kl_ticks) if t >= top), len(kl_ticks))]
    kl_label = "KL from SFT, nats per answer (log scale)"
    files["kl_reward"] = write_svg(os.path.join(d, "kl_reward.svg"), [
        {"title": "reward against KL (ConfPO Fig. 7)", "xticks": kl_ticks, "xlabel": kl_label, "ylabel": "reward",
         "series": by_kl},
        {"title": "reward over training", "xlabel": "step", "ylabel": "reward", "series": reward_by_step},
        {"title": "KL from the SFT model over training", "xlabel": "step", "ylabel": kl_label, "series": kl_by_step,
         "yticks": kl_ticks}], width=500, height=330)
    sel = []
    for colour, m in zip(COLOURS, ("confpo", "confpo_dpo")):
        rows = [runs[s][m]["selected"] for s in runs if m in runs[s] and runs[s][m]["selected"]]
        if rows:
            steps = [p["step"] for p in rows[0]]
            for side in ("chosen", "rejected"):
                sel.append({"label": f"{m} {side}", "x": steps, "dashed": side == "rejected", "colour": colour,
                            "y": [statistics.fmean(r[i][side] for r in rows) for i in range(len(steps))]})
    if sel:
        files["confpo_selected"] = write_svg(os.path.join(d, "confpo_selected.svg"), [
            {"title": "ConfPO: share of response tokens selected", "xlabel": "step", "ylabel": "selected tokens",
             "series": sel}], width=520)
    if "sepo" in methods and "sepo_anchor" in summary:  # SePO's studies (the first study's regimes)
        files.update(plot_sepo(cfg, res, summary, d))
    return files


def plot_sepo(cfg, res, summary, d):
    """SePO's studies (k, oracle share, oracle size) and the collapse: its selected rejected tokens over training,
    beside the same words in held-out chosen answers, with and without the anchor."""
    runs = res["runs"]

    def sweep(names, xs, metric, title, xlabel, xticks=None):
        return {"title": title, "xlabel": xlabel, "ylabel": metric, "xticks": xticks, "categorical": bool(xticks),
                "series": [{"label": "SePO", "x": xs, "y": [summary[n][metric][0] for n in names],
                            "err": [summary[n][metric][1] for n in names]},
                           {"label": "SFT", "x": xs, "y": [summary["sft"][metric][0]] * len(xs), "dashed": True,
                            "colour": "#7f7f7f"}]}
    ks = [float(k) for k in cfg.ratios.split(",")]
    shares = [float(s) for s in cfg.shares.split(",")]
    sizes = cfg.oracle_sizes.split(",")
    files = {"sepo": write_svg(os.path.join(d, "sepo.svg"), [
        sweep([f"sepo_k{k:g}" for k in ks], ks, "accuracy", "SePO: token ratio k", "k (chosen and rejected)"),
        sweep([f"sepo_k{k:g}" for k in ks], ks, "reward", "SePO: token ratio k", "k (chosen and rejected)"),
        sweep([f"sepo_{DEFAULT_SIZE}_{s:g}" for s in shares], shares, "reward", "SePO: oracle data share",
              "share of the data the oracle saw"),
        sweep([f"sepo_{z}_{DEFAULT_SHARE:g}" for z in sizes], list(range(len(sizes))), "reward",
              "SePO: oracle size (policy: small)", "oracle", list(enumerate(sizes)))], width=330)}
    series = []
    for colour, name in zip(COLOURS, ("sepo", "sepo_anchor")):
        for key, dashed in (("selected_rejected", False), ("same_types_heldout_chosen", True)):
            steps, ys = mean_curve(runs, name, key)
            if steps:
                series.append({"label": f"{name}: {key.replace('_', ' ')}", "x": steps, "y": ys, "colour": colour,
                               "dashed": dashed})
    if series:
        files["collapse"] = write_svg(os.path.join(d, "collapse.svg"), [
            {"title": "SePO's selected rejected tokens, and the same words in held-out chosen answers",
             "xlabel": "step", "ylabel": "mean log-prob", "series": series}], width=760, height=340)
    return files


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def regime_markdown(cfg, regime, res, summary, pairs):
    """The tables of one regime (results.md)."""
    runs, stages = res["runs"], res["stages"]
    n = len(runs)
    kind = "Regime" if regime in ("minimal", "independent") else "Protocol"
    out = [f"## {kind}: {regime}", "", f"Mean ± standard deviation over {n} seed(s), test split.", ""]
    if "headroom" in stages:  # what the start can reach, before any preference training
        h = stages["headroom"]
        tasks = sorted(h["greedy_by_task"])
        out += ["The start's headroom (test prompts; best of 4: per prompt the best of 4 answers sampled at "
                "temperature 1):", "", "| | all | " + " | ".join(tasks) + " |",
                "| --- |" + " --- |" * (len(tasks) + 1),
                f"| greedy | {h['greedy']:.3f} | " + " | ".join(f"{h['greedy_by_task'][t]:.3f}" for t in tasks) + " |",
                f"| best of 4 | {h['best_of_4']:.3f} | " + " | ".join(f"{h['best_of_4_by_task'][t]:.3f}"
                                                                    for t in tasks) + " |",
                "", f"Sampled answers' mean reward {h['sampled']:.3f}; {h['greedy_ended']:.0%} of the greedy answers "
                "end within the evaluation's length limit.", ""]
        names = [m for m in ["sft"] + cfg.methods.split(",") if all(m in runs[s] for s in runs)]
        by_task = {m: {t: statistics.fmean(runs[s][m]["final"]["reward_by_task"][t] for s in runs) for t in tasks}
                   for m in names}
        out += ["Greedy reward per task, mean of seeds:", "", "| method | " + " | ".join(tasks) + " |",
                "| --- |" + " --- |" * len(tasks)]
        out += [f"| {m} | " + " | ".join(f"{v[t]:.3f}" for t in tasks) + " |" for m, v in by_task.items()]
        out.append("")
    out += [
           "Starting points (held-out token loss, nats):", "",
           "| model | before | after |", "| --- | --- | --- |"]
    for size, loss in stages["pretrain"].items():
        out.append(f"| llama-{size} pretrained | {loss['start']:.3f} | {loss['end']:.3f} |")
    out.append(f"| llama-small-pt SFT ({regime}) | {stages['sft_loss']['start']:.3f} | "
               f"{stages['sft_loss']['end']:.3f} |")
    oracles = stages.get("oracles", {})
    if oracles:
        out += ["", "The oracles on held-out pairs: pi_ref's token loss after its SFT on D_m, and the DPO oracle's "
                    "reward accuracy and margin (beta log pi_oracle/pi_ref summed; at the start every margin is 0).",
                "", "| oracle (size, share of the data) | pi_ref loss | DPO accuracy | DPO margin |",
                "| --- | --- | --- | --- |"]
        for name in next(iter(oracles.values())):
            rows = [o[name] for o in oracles.values()]
            m = lambda k: fmt(mean_std([r[k] for r in rows]))  # noqa: E731
            out.append(f"| {name} | {m('sft_loss_end')} | {m('dpo_accuracy_end')} | {m('dpo_margin_end')} |")
    lrs = list(next(iter(res["sweep"].values()))) if res["sweep"] else []
    out += ["", f"Learning-rate sweep (seed {cfg.sweep_seed}, validation split): reward of greedy answers (KL from "
                f"SFT); each method trains at its best (bold; ties go to the smaller KL). The SFT model's reward "
                f"there: {res['sft_valid']['reward']:.3f}.", "",
            "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "| --- |" + " --- |" * len(lrs)]
    for method, sweep in res["sweep"].items():
        cells = [(f"**{v['reward']:.3f}** ({v['kl']:.1f})" if float(lr) == res["best_lr"][method] else
                  f"{v['reward']:.3f} ({v['kl']:.1f})") for lr, v in sweep.items()]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    out += ["", "| method | lr | reward (greedy) | KL from SFT | accuracy | margin | chosen log-prob | reward - SFT, "
                "per seed | reward - SimPO, per seed | accuracy - SimPO, per seed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in ["sft"] + cfg.methods.split(",") + (["sepo_anchor"] if "sepo_anchor" in summary else []):
        s = summary[m]
        lr = res["best_lr"].get(m, res["best_lr"].get("sepo") if m == "sepo_anchor" else None)
        vs = [pairs.get(f"{m}-sft")] + [pairs.get(m, {}).get(k) for k in ("reward", "accuracy")]
        cells = ["–" if v is None else f"{v['mean']:+.3f} [{', '.join(f'{d:+.3f}' for d in v['diffs'])}] "
                 f"{v['verdict']}" for v in vs]
        out.append(f"| {m} | {'–' if lr is None else f'{lr:g}'} | {fmt(s['reward'])} | {fmt(s['kl'], 1)} | "
                   f"{fmt(s['accuracy'])} | {fmt(s['margin'])} | {fmt(s['chosen_logp'])} | " + " | ".join(cells) + " |")
    claims = [(text, pairs[f"{a}-{b}"]) for a, b, text in CLAIMS if f"{a}-{b}" in pairs]
    if claims:
        out += ["", "The papers' other orderings (reward of greedy answers, paired by seed):", "",
                "| claim | difference per seed | mean | verdict |", "| --- | --- | --- | --- |"]
        out += [f"| {text} | {', '.join(f'{d:+.3f}' for d in v['diffs'])} | {v['mean']:+.3f} | {v['verdict']} |"
                for text, v in claims]
    names = [n for n in summary if n.startswith("sepo_") and n != "sepo_anchor"]
    if names:
        out += ["", "| SePO run | reward (greedy) | accuracy | KL from SFT | reward - SFT, per seed |",
                "| --- | --- | --- | --- | --- |"]
        for name in names:
            v = pairs[f"{name}-sft"]
            out.append(f"| {name} | {fmt(summary[name]['reward'])} | {fmt(summary[name]['accuracy'])} | "
                       f"{fmt(summary[name]['kl'], 1)} | {v['mean']:+.3f} {v['verdict']} |")
    out += ["", "Selections against the planted keys (a random selection of the same sizes beside each):", "",
            "| selection | side | selected | key precision | key recall | one-sided neutral | random: precision "
            "| random: one-sided |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in selection_rows(res):
        for side in ("chosen", "rejected"):
            x, r = a["selection"][side], a["random"][side]
            out.append(f"| {name} | {side} | {x['selected_fraction']:.3f} | {x['precision']:.3f} | {x['recall']:.3f} | "
                       f"{x['one_sided']:.3f} | {r['precision']:.3f} | {r['one_sided']:.3f} |")
    out += ["", "Rejected answers: how often the selection holds the key itself, and the token right after it:", "",
            "| selection | key selected | token after the key selected | random: key | random: after |",
            "| --- | --- | --- | --- | --- |"]
    for name, a in selection_rows(res):
        x, r = a["selection"]["rejected"], a["random"]["rejected"]
        out.append(f"| {name} | {x['key_selected']:.3f} | {x['after_key_selected']:.3f} | {r['key_selected']:.3f} | "
                   f"{r['after_key_selected']:.3f} |")
    collapse = [(name, key) for name in ("sepo", "sepo_anchor") for key in ("selected_rejected", "selected_chosen",
                                                                              "same_types_heldout_chosen")
                if mean_curve(runs, name, key)[0]]
    if collapse:
        out += ["", "What SePO does to the tokens it selects (mean log-prob over training, mean of seeds):", "",
                "| run | tokens | at the SFT start | at the end |", "| --- | --- | --- | --- |"]
        for name, key in collapse:
            steps, ys = mean_curve(runs, name, key)
            out.append(f"| {name} | {key.replace('_', ' ')} | {ys[0]:.3f} | {ys[-1]:.3f} |")
    return "\n".join(out) + "\n"


def selection_rows(res):
    """(name, anatomy) of ConfPO's selection and of SePO's at each k, averaged over seeds."""
    rows = [("ConfPO (SFT model)", res["anatomy"]["confpo"])]
    seeds = [v for k, v in res["anatomy"].items() if k.startswith("sepo_seed")]
    for k in (seeds[0] if seeds else {}):
        rows.append((f"SePO {k.replace('k', 'k=')}", average_anatomy([s[k] for s in seeds])))
    return rows


def average_anatomy(items):
    return {kind: {side: {m: statistics.fmean(i[kind][side][m] for i in items) for m in items[0][kind][side]}
                   for side in items[0][kind]} for kind in items[0]}


# ---------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------

def write_outputs(cfg, regime, res, minutes, config=None):
    """A regime's results.json (its runs, their summary and paired comparisons, the study's config or the one it
    was run with), results.md and plots."""
    summary = summarize(res["runs"])
    pairs = pairs_of(res["runs"], summary)
    d = os.path.join(cfg.figures, regime)
    os.makedirs(d, exist_ok=True)
    files = plot_regime(cfg, regime, res, summary, d)
    atomic_write(os.path.join(d, "results.json"), json.dumps(
        {"config": config or asdict(cfg), "minutes_so_far": minutes, "summary": summary, "paired": pairs, **res},
        indent=1))
    table = regime_markdown(cfg, regime, res, summary, pairs)
    atomic_write(os.path.join(d, "results.md"), table)
    print(table)
    print("wrote " + ", ".join(sorted(files.values())) + f" and results.json / results.md in {d}")
