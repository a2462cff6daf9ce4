"""real_study.py --quick: every stage of the real model's study on the tiny world (its SFT model, prompts and judge
as stand-ins for SmolLM2, the sentiment prompts and VADER), and results.json in its fixed layout."""

import json
import math
import os
import re
import shutil
import xml.etree.ElementTree as ET

import real_study
import real_task

POINT = {"step", "primary", "reward", "ended", "reward_lc", "length", "kl", "distinct2", "primary_greedy",
         "reward_greedy", "ended_greedy", "length_greedy", "start_logp"}
METHODS = ["dpo", "simpo", "confpo", "confpo_rand", "confpo_dpo", "rdpo", "sepo", "sepo_noeos"]
ANSWER = {"prompt", "greedy", "sampled", "greedy_reward", "sampled_reward", "greedy_ended", "sampled_ended",
          "greedy_tokens", "sampled_tokens"}


def test_quick_study_writes_the_fixed_layout_and_reruns_from_its_results(world, tmp_path):
    args = ["--quick", "--output_dir", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), "--tiny_world",
            os.path.dirname(world["data"]), "--cache_dir", world["cache"]]
    assert real_study.main(args)
    results = json.loads((tmp_path / "fig" / "results.json").read_text())
    assert {"start", "runs", "selection", "claims"} <= set(results) and results["complete"] is True
    assert all(v == [0, 1] for v in results["seeds_run"].values())
    start = results["start"]["point"]
    assert POINT <= set(start) and start["kl"] == 0.0 and start["reward_lc"] == start["reward"]
    assert all(set(a) == ANSWER for a in results["start"]["answers"])
    assert results["commit"] and len(results["commit"].split("+")[0]) == 40
    runs = results["runs"]
    assert {r["method"] for r in runs} == set(METHODS)
    for r in runs:
        assert {"method", "setting", "seed", "comparison", "points", "answers"} <= set(r)
        assert "lr" in r["setting"] and all(POINT <= set(p) for p in r["points"])
        steps = [p["step"] for p in r["points"]]
        assert steps == sorted(steps) and steps[-1] == 2  # in step order, the last one the final model
        final, answers = r["points"][-1], r["answers"]
        assert math.isfinite(final["reward_greedy"]) and final["kl"] >= 0 and final["length"] > 0
        assert len(answers) == results["config"]["test_prompts"] and all(set(a) == ANSWER for a in answers)
        # the primary metric: the reward, an answer that did not end scored --cut_reward (0 on the tiny world)
        for side, suffix in (("sampled", ""), ("greedy", "_greedy")):
            assert math.isclose(final[f"primary{suffix}"], sum(a[f"{side}_reward"] if a[f"{side}_ended"] else 0.0
                                                               for a in answers) / len(answers))
            assert math.isclose(final[f"ended{suffix}"], sum(a[f"{side}_ended"] for a in answers) / len(answers))
            assert math.isclose(final[f"length{suffix}"], sum(a[f"{side}_tokens"] for a in answers) / len(answers))
        slope, length0 = results["length_slope"]
        assert math.isclose(final["reward_lc"], final["reward"] - slope * (final["length"] - length0))
    for m in METHODS:  # the lr grid on seed 0 (a control: its leader's choice), the comparison on every seed
        seed0 = [r for r in runs if r["method"] == m and r["seed"] == 0]
        assert len(seed0) == (1 if m in real_study.FOLLOWS else 2) and sum(r["comparison"] for r in seed0) == 1
        assert [r["seed"] for r in runs if r["method"] == m and r["comparison"]] == [0, 1]
        if m not in real_study.FOLLOWS:  # chosen by the primary metric on the choice's validation prompts
            assert all(r["choice"]["prompts"] == 12 and r["valid"]["prompts"] == 8 for r in seed0)
            assert max(seed0, key=lambda r: r["choice"]["primary"])["comparison"]
    lr_of = {r["method"]: r["setting"]["lr"] for r in runs if r["comparison"]}
    assert lr_of["confpo_rand"] == lr_of["confpo"] and lr_of["sepo_noeos"] == lr_of["sepo"]
    for key in ("confpo", "sepo_seed0", "sepo_seed1"):
        for side in ("chosen", "rejected"):
            s, r = results["selection"][key]["selection"][side], results["selection"][key]["random"][side]
            assert 0 <= s["precision"] <= 1 and 0 <= r["precision"] <= 1 and 0 < s["recall"] <= 1
    lengths = results["pair_lengths"]
    assert lengths["chosen"] > 1 and lengths["rejected"] > 1 and 0 <= lengths["chosen_longer"] <= 1
    for seed in (0, 1):  # the share of answers whose end of turn SePO's oracle selects, per k
        eot = results["selection"][f"sepo_seed{seed}"]["end_of_turn"]
        assert set(eot) == {"0.1", "0.2", "0.3", "0.4", "0.5"}
        assert all(0 <= v[side] <= 1 for v in eot.values() for side in ("chosen", "rejected"))
        assert eot["0.5"]["chosen"] >= eot["0.1"]["chosen"]  # a larger k keeps every token a smaller k keeps
    claims = {c["claim"]: c for c in results["claims"]}
    for name in ("ConfPO beats SimPO", "ConfPO beats ConfPO-rand", "ConfPO_DPO beats DPO", "SePO beats DPO",
                 "SePO beats SimPO", "SePO without its end of turn beats SePO",
                 "rdpo raises the primary metric over the start"):
        c = claims[name]
        assert len(c["diffs"]) == 2 and c["verdict"] in ("higher", "lower", "no claim")
        assert c["holds"] == ("yes" if c["verdict"] == "higher" else "no")
    kl = claims["ConfPO moves less far from the start than SimPO (KL)"]
    assert kl["holds"] == ("yes" if kl["verdict"] == "lower" else "no")  # less KL: the claim is "lower"
    gain = claims["dpo raises the primary metric over the start"]
    assert gain["metric"] == "primary" and set(gain["beside"]) == {"reward", "ended", "reward_lc"}
    assert gain["bar"] == (gain["mean"] >= 0.1 and gain["mean"] > 3 * gain["sd"]
                           and gain["ended_share_of_start"] >= 0.9)
    svg = ET.parse(tmp_path / "fig" / "frontier.svg").getroot()
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) >= 14  # 6 methods x 2 lrs, 2 controls
    table = (tmp_path / "fig" / "results.md").read_text()
    assert "| confpo_dpo |" in table and "nan" not in table
    for n, what in ((8, "validation point"), (12, "choice")):  # how far apart two settings must be to be told apart
        assert re.search(rf"The {what}'s primary metric \({n} prompts\) has a standard error of about 0\.\d{{3}} .* "
                         r"closer than about \d\.\d\d ", table)
    assert not list((tmp_path / "runs").rglob("checkpoints/step_*"))  # deleted once evaluated; none kept by a stage
    for piece in ("selection_confpo", "selection_sepo_seed0", "selection_sepo_seed1"):  # kept to resume
        assert (tmp_path / "fig" / "evaluations" / f"{piece}.json").exists()
    # a rerun finds every evaluation in place (beside the results): nothing trained or evaluated again
    evaluation = tmp_path / "fig" / "evaluations" / "dpo_lr0.0001_seed0.json"
    assert evaluation.exists()
    mtime = os.path.getmtime(evaluation)
    assert real_study.main(args)
    assert os.path.getmtime(evaluation) == mtime
    assert json.loads((tmp_path / "fig" / "results.json").read_text())["summary"] == results["summary"]
    # --collect runs nothing: without one run's evaluation, the results so far, marked incomplete
    for lr in ("0.0001", "0.0003"):
        for method in ("sepo", "sepo_noeos"):
            (tmp_path / "fig" / "evaluations" / f"{method}_lr{lr}_seed1.json").unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "runs" / "runs" / "sepo")
    assert real_study.main(args + ["--collect"])
    partial = json.loads((tmp_path / "fig" / "results.json").read_text())
    assert partial["complete"] is False and partial["seeds_run"]["sepo"] == [0]
    assert partial["seeds_run"]["dpo"] == [0, 1] and partial["summary"]["dpo"] == results["summary"]["dpo"]
    assert not (tmp_path / "runs" / "runs" / "sepo").exists()  # nothing trained
    assert "Results so far" in (tmp_path / "fig" / "results.md").read_text()
    # a method whose lr grid is not done yet: its finished runs reported, none of them its comparison setting
    (tmp_path / "fig" / "evaluations" / "simpo_lr0.0003_seed0.json").unlink()
    assert real_study.main(args + ["--collect"])
    partial = json.loads((tmp_path / "fig" / "results.json").read_text())
    simpo = [(r["setting"]["lr"], r["seed"], r["comparison"]) for r in partial["runs"] if r["method"] == "simpo"]
    assert simpo == [(1e-4, 0, False)] and partial["seeds_run"]["simpo"] == []
    assert "| simpo | 0.0001 |  |" in (tmp_path / "fig" / "results.md").read_text()


def test_the_lr_grid_widens_until_its_best_is_inside_and_keeps_an_lr_evaluated_before(tmp_path, monkeypatch):
    ran = []
    peak = {"value": 1e-6}

    def run(ctx, method, lr, seed, curve):
        ran.append(lr)
        return {"valid": {"lr": lr}}

    def choice(ctx, method, lr, result):  # the choice's primary metric peaks at one lr of the ladder
        return {"primary": -abs(math.log10(lr) - math.log10(peak["value"]))}
    monkeypatch.setattr(real_study, "run", run)
    monkeypatch.setattr(real_study, "choice", choice)
    ctx = real_study.SimpleNamespace(grid=[3e-6, 1e-5], ladder=list(real_study.LADDER),
                                     cfg=real_study.SimpleNamespace(figures=str(tmp_path)))
    done, best = real_study.frontier(ctx, "simpo")
    assert (ran, sorted(done), best) == ([3e-6, 1e-5, 1e-6, 3e-7], [3e-7, 1e-6, 3e-6, 1e-5], 1e-6)
    ran.clear()
    peak["value"] = 3e-6  # inside the grid once the lr evaluated before is kept (else 1e-6 would run)
    os.makedirs(tmp_path / "evaluations")
    open(real_study.evaluation_path(ctx, "dpo", 3e-7, 0), "w").close()
    done, best = real_study.frontier(ctx, "dpo")
    assert (ran, best) == ([3e-7, 3e-6, 1e-5], 3e-6)
    ran.clear()
    peak["value"] = 1e-4  # the best on the upper edge: the ladder's next lr up
    done, best = real_study.frontier(ctx, "dpo")
    assert (ran, best) == ([3e-7, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4], 1e-4)


def test_prompts_share_no_subject_between_the_sets_and_never_name_a_polarity():
    sets = {split: {s for _, s in real_task.subjects(split)} for split in ("train", "valid", "test")}
    for pattern, firsts, seconds in real_task.CATEGORIES.values():  # each head noun in exactly one set
        for item in firsts:
            assert sum(any(pattern.format(item, b) in v for b in seconds) for v in sets.values()) == 1, item
    rows = real_task.prompts("train", 1024)
    choice = real_task.prompts("valid", 240)  # the choice's prompts: the validation point's 64 first, each subject twice
    assert choice[:64] == real_task.prompts("valid", 64) and len({r["prompt"] for r in choice}) > 200
    assert max(sum(r["subject"] == s for r in choice) for s in {r["subject"] for r in choice}) == 2
    assert len(rows) == 1024 and len({r["prompt"] for r in rows}) > 900
    words = {"positive", "negative", "good", "bad", "praise", "criticize"}
    assert not any(words & set(r["prompt"].lower().replace("?", " ").replace(".", " ").split()) for r in rows)
    assert real_task.prompts("test", 200) == real_task.prompts("test", 200)  # from the seed alone
