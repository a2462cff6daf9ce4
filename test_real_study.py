"""real_study.py --quick: every stage of the real model's study on the tiny world (its SFT model, prompts and judge
as stand-ins for SmolLM2, the sentiment prompts and VADER), and results.json in its fixed layout."""

import json
import math
import os
import shutil
import xml.etree.ElementTree as ET

import real_study
import real_task

POINT = {"step", "reward_sampled", "reward_greedy", "kl", "distinct2", "start_logp", "length"}
METHODS = ["dpo", "simpo", "confpo", "confpo_rand", "confpo_dpo", "sepo"]


def test_quick_study_writes_the_fixed_layout_and_reruns_from_its_results(world, tmp_path):
    args = ["--quick", "--output_dir", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), "--tiny_world",
            os.path.dirname(world["data"]), "--cache_dir", world["cache"]]
    assert real_study.main(args)
    results = json.loads((tmp_path / "fig" / "results.json").read_text())
    assert {"start", "runs", "selection", "claims"} <= set(results) and results["complete"] is True
    assert all(v == [0, 1] for v in results["seeds_run"].values())
    assert POINT <= set(results["start"]["point"]) and results["start"]["point"]["kl"] == 0.0
    assert all(set(a) == {"prompt", "greedy", "sampled"} for a in results["start"]["answers"])
    runs = results["runs"]
    assert {r["method"] for r in runs} == set(METHODS)
    for r in runs:
        assert {"method", "setting", "seed", "comparison", "points", "answers"} <= set(r)
        assert "lr" in r["setting"] and all(POINT <= set(p) for p in r["points"])
        steps = [p["step"] for p in r["points"]]
        assert steps == sorted(steps) and steps[-1] == 2  # in step order, the last one the final model
        final = r["points"][-1]
        assert math.isfinite(final["reward_greedy"]) and final["kl"] >= 0 and final["length"] > 0
        assert len(r["answers"]) == results["config"]["test_prompts"]
    for m in METHODS:  # both settings on seed 0, the comparison setting on every seed
        seed0 = [r for r in runs if r["method"] == m and r["seed"] == 0]
        assert len(seed0) == 2 and sum(r["comparison"] for r in seed0) == 1
        assert [r["seed"] for r in runs if r["method"] == m and r["comparison"]] == [0, 1]
    for key in ("confpo", "sepo_seed0", "sepo_seed1"):
        for side in ("chosen", "rejected"):
            s, r = results["selection"][key]["selection"][side], results["selection"][key]["random"][side]
            assert 0 <= s["precision"] <= 1 and 0 <= r["precision"] <= 1 and 0 < s["recall"] <= 1
    assert all(v > 1 for v in results["pair_lengths"].values())  # mean response tokens, the end of turn included
    claims = {c["claim"]: c for c in results["claims"]}
    for name in ("ConfPO beats SimPO", "ConfPO beats ConfPO-rand", "ConfPO_DPO beats DPO", "SePO beats DPO",
                 "SePO beats SimPO", "dpo raises the sampled reward over the start"):
        c = claims[name]
        assert len(c["diffs"]) == 2 and c["verdict"] in ("higher", "lower", "no claim")
        assert c["holds"] == ("yes" if c["verdict"] == "higher" else "no")
    kl = claims["ConfPO moves less far from the start than SimPO (KL)"]
    assert kl["holds"] == ("yes" if kl["verdict"] == "lower" else "no")  # less KL: the claim is "lower"
    gain = claims["dpo raises the sampled reward over the start"]
    assert gain["bar"] == (gain["mean"] >= 0.1 and gain["mean"] > 3 * gain["sd"])
    svg = ET.parse(tmp_path / "fig" / "frontier.svg").getroot()
    assert len(svg.findall(".//{http://www.w3.org/2000/svg}polyline")) >= 12  # 6 methods x 2 settings
    table = (tmp_path / "fig" / "results.md").read_text()
    assert "| confpo_dpo |" in table and "nan" not in table
    assert not list((tmp_path / "runs").rglob("checkpoints/step_*"))  # deleted once evaluated; none kept by a stage
    for piece in ("selection_confpo", "selection_sepo_seed0", "selection_sepo_seed1"):  # kept to resume
        assert (tmp_path / "fig" / "evaluations" / f"{piece}.json").exists()
    # a rerun finds every evaluation in place (beside the results): nothing trained or evaluated again
    evaluation = tmp_path / "fig" / "evaluations" / "dpo_lr0.0001_seed0.json"
    mtime = os.path.getmtime(evaluation)
    assert real_study.main(args)
    assert os.path.getmtime(evaluation) == mtime
    assert json.loads((tmp_path / "fig" / "results.json").read_text())["summary"] == results["summary"]
    # --collect runs nothing: without one run's evaluation, the results so far, marked incomplete
    (tmp_path / "fig" / "evaluations" / "sepo_lr0.0003_seed1.json").unlink(missing_ok=True)
    (tmp_path / "fig" / "evaluations" / "sepo_lr0.0001_seed1.json").unlink(missing_ok=True)
    shutil.rmtree(tmp_path / "runs" / "runs" / "sepo")
    assert real_study.main(args + ["--collect"])
    partial = json.loads((tmp_path / "fig" / "results.json").read_text())
    assert partial["complete"] is False and partial["seeds_run"]["sepo"] == [0]
    assert partial["seeds_run"]["dpo"] == [0, 1] and partial["summary"]["dpo"] == results["summary"]["dpo"]
    assert not (tmp_path / "runs" / "runs" / "sepo").exists()  # nothing trained
    assert "Results so far" in (tmp_path / "fig" / "results.md").read_text()


def test_prompts_share_no_subject_between_the_sets_and_never_name_a_polarity():
    sets = {split: {s for _, s in real_task.subjects(split)} for split in ("train", "valid", "test")}
    for pattern, firsts, seconds in real_task.CATEGORIES.values():  # each head noun in exactly one set
        for item in firsts:
            assert sum(any(pattern.format(item, b) in v for b in seconds) for v in sets.values()) == 1, item
    rows = real_task.prompts("train", 1024)
    assert len(rows) == 1024 and len({r["prompt"] for r in rows}) > 900
    words = {"positive", "negative", "good", "bad", "praise", "criticize"}
    assert not any(words & set(r["prompt"].lower().replace("?", " ").replace(".", " ").split()) for r in rows)
    assert real_task.prompts("test", 200) == real_task.prompts("test", 200)  # from the seed alone
