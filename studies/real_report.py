"""The real study's report (real_study.py): results.md (the start, the pairs, every run's points, the comparison,
the claims, the selections, SePO's end of turn, answers) and frontier.svg, from results.json's content alone."""

import math
import os
import statistics

import measures


def plot(result, methods, folder):
    """The frontier (primary metric against KL), the primary metric over steps, and the selections' precision ->
    files written."""
    start = result["start"]["point"]
    frontier_, over_steps = [], []
    for i, m in enumerate(methods):
        for r in (r for r in result["runs"] if r["method"] == m and r["seed"] == 0):
            points = [start] + r["points"]
            label = f"{m} lr {r['setting']['lr']:g}"
            style = {"colour": measures.COLOURS[i % len(measures.COLOURS)], "dashed": not r["comparison"]}
            frontier_.append({"label": label, "x": [math.log1p(max(p["kl"], 0)) for p in points],
                              "y": [p["primary"] for p in points], **style})
            over_steps.append({"label": label, "x": [p["step"] for p in points],
                               "y": [p["primary"] for p in points], **style})
    if not frontier_:
        return []
    top = max(max(s["x"]) for s in frontier_)
    ticks = [(math.log1p(v), f"{v:g}") for v in (0, 1, 3, 10, 30, 100, 300, 1000) if math.log1p(v) <= top + 0.5]
    panels = [{"title": "primary metric against KL from the start", "xlabel": "sequence KL, nats (log scale)",
               "ylabel": "primary metric (sampled; cut = -1)", "xticks": ticks, "series": frontier_},
              {"title": "primary metric over training", "xlabel": "step", "ylabel": "primary metric (sampled)",
               "series": over_steps}]
    names = [(k, side) for k in ("confpo", "sepo_seed0") if k in result["selection"] for side in ("chosen",
                                                                                                    "rejected")]
    if names:
        cats = list(enumerate(f"{'ConfPO' if k == 'confpo' else 'SePO'} {side}" for k, side in names))
        panels.append({"title": "key-token precision", "xlabel": "", "ylabel": "precision", "xticks": cats,
                       "categorical": True, "points_only": True, "series": [
                           {"label": kind, "x": list(range(len(names))),
                            "y": [result["selection"][k][kind][side]["precision"] for k, side in names]}
                           for kind in ("selection", "random")]})
    return [measures.write_svg(os.path.join(folder, "frontier.svg"), panels, width=520, height=360)]


def markdown(result, methods, oracle):
    """results.md: the start, the pairs, every run's points, the comparison, the claims, the selections, SePO's end
    of turn, answers (oracle: the flags of SePO's oracle, real_study.ORACLE)."""
    start, pairs, lengths = result["start"]["point"], result["pairs"], result.get("pair_lengths")
    slope, length0 = result["length_slope"]
    num = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    out = [f"# {result['config']['model'] or 'SmolLM2-135M-Instruct'}, on-policy pairs, every method", "",
           f"Code: commit {result['commit']}. Answers: at most {result['config']['max_new_tokens']} tokens; sampled "
           f"at temperature {result['config']['temperature']:g}, top-p {result['config']['top_p']:g}, and greedy. "
           f"**Primary metric**: the reward, with an answer that did not end scored "
           f"{result['config']['cut_reward']:g}. Length-controlled reward: reward - {slope:.5f} x (length - "
           f"{length0:.1f}), the slope of reward on length among the start's sampled test answers.", "",
           f"Start (test, {start['prompts']} prompts): sampled answers end {start['ended']:.3f} of the time, primary "
           f"{start['primary']:.3f}, reward {start['reward']:.3f}, length {start['length']:.1f} tokens; greedy: end "
           f"{num(start['ended_greedy'])}, primary {num(start['primary_greedy'])}, reward {num(start['reward_greedy'])}"
           f"; distinct-2 {start['distinct2']:.3f}; validation ({result['start']['valid']['prompts']} prompts) "
           f"primary {result['start']['valid']['primary']:.3f}, ended {result['start']['valid']['ended']:.3f}.",
           "", f"Pairs: {pairs['pairs']} of {pairs['prompts']} prompts ({pairs['dropped']}); mean sample reward "
               f"{pairs['mean_score']:.3f}, chosen {pairs['mean_chosen_score']:.3f}, rejected "
               f"{pairs['mean_rejected_score']:.3f}; {pairs['cut_by_max_new_tokens']:.1%} of samples cut"
               + (f"; the training pairs' chosen answers {lengths['chosen']:.1f} tokens long, rejected "
                  f"{lengths['rejected']:.1f}; the chosen answer is the longer in {lengths['chosen_longer']:.1%} of "
                  "pairs" if lengths else "") + ".", "",
           "SePO's oracle (sepo_pipeline.py, from the start): " + ", ".join(f"{k} {v:g}" for k, v in oracle.items())
           + ".", "",
           f"## Every run's points (seed 0, the lr grid; test prompts: {result['config']['curve_prompts']} during "
           f"training, sampled answers only, {start['prompts']} at the end)", "",
           "| method | lr | comparison | step | primary | reward | ended | reward LC | length | KL | primary greedy | "
           f"ended greedy | distinct-2 | validation primary ({result['start']['valid']['prompts']} prompts) | "
           f"choice primary ({result['config']['choice_prompts']} validation prompts: the choice) | choice ended |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["runs"]:
        if r["seed"] == 0:
            for p in r["points"]:
                last, chosen = p is r["points"][-1] and r.get("valid"), r.get("choice") or {}
                out.append(f"| {r['method']} | {r['setting']['lr']:g} | {'yes' if r['comparison'] else ''} | "
                           f"{p['step']} | {num(p['primary'])} | {num(p['reward'])} | {num(p['ended'])} | "
                           f"{num(p['reward_lc'])} | {num(p['length'], 1)} | {num(p['kl'], 2)} | "
                           f"{num(p['primary_greedy'])} | {num(p['ended_greedy'])} | {num(p['distinct2'])} | "
                           f"{num(r['valid']['primary']) if last else ''} | "
                           f"{num(chosen.get('primary')) if last and chosen else ''} | "
                           f"{num(chosen.get('ended')) if last and chosen else ''} |")
    cut = result["config"]["cut_reward"]  # the noise of a choice: the spread of the test answers' primary scores
    spreads = [statistics.stdev([a["sampled_reward"] if a["sampled_ended"] else cut for a in r["answers"]])
               for r in result["runs"] if r.get("valid") and len(r["answers"]) > 1]
    if spreads:
        sd = statistics.median(spreads)
        for n, what in ((result["start"]["valid"]["prompts"], "validation point"),
                        (result["config"]["choice_prompts"], "choice")):
            out += ["", f"The {what}'s primary metric ({n} prompts) has a standard error of about "
                        f"{sd / math.sqrt(n):.3f} (the spread of a run's primary scores over its test answers): two "
                        f"settings closer than about {1.96 * math.sqrt(2 / n) * sd:.2f} (the 95% half-width of an "
                        "unpaired difference) are not told apart by it."]
    seeds = sorted({r["seed"] for r in result["runs"]})
    if not result["complete"]:
        out += ["", "**Results so far** (the study is still running): seeds run per method " + ", ".join(
            f"{m} {v}" for m, v in result["seeds_run"].items()) + "."]
    out += ["", f"## The comparison (mean ± sd over the seeds each method has run of {seeds}, test prompts)", "",
            "| method | lr | seeds | primary | reward | ended | reward LC | length | KL | primary greedy | "
            "reward greedy | ended greedy | distinct-2 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    chosen_lr = {r["method"]: r["setting"]["lr"] for r in result["runs"] if r["comparison"]}
    for m in ["start"] + methods:
        v, n = result["summary"][m], len(result["seeds_run"].get(m, [None]))  # the start: one model, no seeds

        def cell(k, d):  # one seed has no spread: its value alone
            return measures.fmt(v[k], d) if n > 1 or v[k][0] is None else f"{v[k][0]:.{d}f}"
        cells = [cell(k, d) for k, d in (("primary", 3), ("reward", 3), ("ended", 3), ("reward_lc", 3), ("length", 1),
                                         ("kl", 2), ("primary_greedy", 3), ("reward_greedy", 3), ("ended_greedy", 3),
                                         ("distinct2", 3))]
        lr = f"{chosen_lr[m]:g}" if m in chosen_lr else ""
        out.append(f"| {m} | {lr} | {n if m in result['seeds_run'] else '–'} | " + " | ".join(cells) + " |")
    out += ["", "## The claims (primary metric unless named; paired by seed: the same sign on every seed, or a 95% "
            "t-interval excluding 0)", "",
            "| paper | claim | metric | difference per seed | mean | sd | verdict | holds | beside: reward, ended, "
            "reward LC | bar: gain >= 0.1, > 3 sd, ends >= 90% as often as the start |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["claims"]:
        if "diffs" in c:
            diffs = ", ".join(f"{d:+.3f}" for d in c["diffs"])
            bar = {None: "", True: "yes", False: "no"}[c.get("bar")]
            if "ended_share_of_start" in c:
                bar += f" (ends {c['ended_share_of_start']:.2f} x the start)"
            beside = ", ".join(f"{v:+.3f}" for v in c.get("beside", {}).values())
            out.append(f"| {c['paper']} | {c['claim']} | {c['metric']} | {diffs} | {c['mean']:+.3f} | "
                       f"{num(c['sd'])} | {c['verdict']} | {c['holds']} | {beside} | {bar} |")
        else:
            out.append(f"| {c['paper']} | {c['claim']} | {c['metric']} | {c['selection']:.3f} against "
                       f"{c['random']:.3f} | {c['ratio']:.2f}x | | | | | |")
    out += ["", "## Selections against the key tokens (words with a VADER valence)", "",
            "| selection | side | selected | precision | recall | random: precision | random: recall |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, a in result["selection"].items():
        for side in ("chosen", "rejected"):
            x, r = a["selection"][side], a["random"][side]
            out.append(f"| {k} | {side} | {x['selected_fraction']:.3f} | {x['precision']:.3f} | {x['recall']:.3f} | "
                       f"{r['precision']:.3f} | {r['recall']:.3f} |")
    eot = {k: a["end_of_turn"] for k, a in result["selection"].items() if "end_of_turn" in a}
    if eot:
        out += ["", "## SePO's end of turn: the share of training answers whose end-of-turn token the oracle selects "
                "(chosen: top k; rejected: bottom k)", "", "| oracle | k | chosen | rejected |",
                "| --- | --- | --- | --- |"]
        for name, by_k in eot.items():
            for k, v in by_k.items():
                out.append(f"| {name} | {k} | {num(v['chosen'])} | {num(v['rejected'])} |")
    shares = [r for r in result["runs"] if r["method"] in ("confpo", "confpo_dpo") and r["comparison"]
              and r["selected"]]
    if shares:
        out += ["", "ConfPO's selected share over training (its Fig. 8), first and last logged step, mean of seeds: " +
                "; ".join(f"{m} chosen {statistics.fmean(r['selected'][0]['chosen'] for r in rs):.3f} -> "
                          f"{statistics.fmean(r['selected'][-1]['chosen'] for r in rs):.3f}, rejected "
                          f"{statistics.fmean(r['selected'][0]['rejected'] for r in rs):.3f} -> "
                          f"{statistics.fmean(r['selected'][-1]['rejected'] for r in rs):.3f}"
                          for m in ("confpo", "confpo_dpo") for rs in [[r for r in shares if r["method"] == m]] if rs)]
    finals = {r["method"]: r for r in result["runs"] if r["seed"] == 0 and r["comparison"]}
    out += ["", "## Answers (sampled, test prompts, seed 0 at the comparison setting; [cut] = did not end)", ""]
    for i in range(min(6, len(result["start"]["answers"]))):
        out.append(f"- **{result['start']['answers'][i]['prompt']}**")
        for m, answers in [("start", result["start"]["answers"])] + [(m, finals[m]["answers"]) for m in methods
                                                                    if m in finals]:
            a = answers[i]
            out.append(f"  - {m} ({a['sampled_reward']:+.2f}{'' if a['sampled_ended'] else ' [cut]'}): "
                       f"{a['sampled']}")
    return "\n".join(out) + "\n"
