"""experiments.py: the quick study produces every output; the KL estimate (measures.py) and checkpoint loading
against slow, direct versions."""

import json
import math
import os
import xml.etree.ElementTree as ET

import pytest
import torch

import experiments
import measures
import models
import tiny
import train

SVG = "{http://www.w3.org/2000/svg}"


def test_quick_study_writes_every_output_and_reruns_from_its_results(world, tmp_path):
    """Both regimes, a subset of the methods (the others differ only by their objective): every stage (pretraining,
    SFT, sweep, comparison with curves, SePO's k / share / size / anchor, selections' anatomy) and every output."""
    args = ["--quick", "--output_dir", str(tmp_path / "runs"), "--figures", str(tmp_path / "fig"), "--tiny_world",
            os.path.dirname(world["data"]), "--cache_dir", world["cache"], "--methods", "dpo,simpo,confpo,sepo",
            "--lrs", "1e-4,3e-4", "--regimes", "independent", "--protocols", "instruct"]
    assert experiments.main(args)
    # the protocol: the headroom world's start, its headroom measured, pairs it wrote, SePO at its default only
    results = json.loads((tmp_path / "fig" / "instruct" / "results.json").read_text())
    room = results["stages"]["headroom"]
    assert 0 <= room["greedy"] <= 1 and room["best_of_4"] >= room["sampled"] - 1e-9
    assert set(room["greedy_by_task"]) <= {"sum", "forbidden_word", "polarity"}
    assert sorted(results["summary"]) == ["confpo", "dpo", "sepo", "sft", "simpo"]
    assert [p["step"] for p in results["runs"]["0"]["dpo"]["curve"]] == [0, 1, 2]
    assert results["config"]["protocol_max_new_tokens"] == 32 and "paired" in results and "dpo-sft" in results["paired"]
    table = (tmp_path / "fig" / "instruct" / "results.md").read_text()
    assert "## Protocol: instruct" in table and "| best of 4 |" in table and "Greedy reward per task" in table
    pairs = tmp_path / "runs" / "instruct" / "onpolicy" / "pairs.jsonl"
    assert pairs.exists() and json.loads(pairs.read_text().splitlines()[0])["chosen_key_spans"] is not None
    for regime in ("independent",):
        fig = tmp_path / "fig" / regime
        results = json.loads((fig / "results.json").read_text())
        summary, runs = results["summary"], results["runs"]["0"]
        expected = ["sft", "dpo", "simpo", "confpo", "sepo", "sepo_anchor", "sepo_k0.1", "sepo_k0.3",
                    "sepo_tiny_0.25", "sepo_tiny_0.5", "sepo_micro_0.5"]
        assert sorted(summary) == sorted(expected), regime
        for name in expected:
            for metric in ("reward", "kl", "accuracy", "margin", "chosen_logp"):
                mean, std = summary[name][metric]
                assert math.isfinite(mean) and std == 0.0, (name, metric)  # one seed
            assert 0 <= summary[name]["accuracy"][0] <= 1
        assert summary["sft"]["kl"][0] == 0.0  # the SFT model against itself
        assert set(results["sweep"]) == {"dpo", "simpo", "confpo", "sepo"}
        assert all(set(v) == {"0.0001", "0.0003"} for v in results["sweep"].values())
        assert all(results["best_lr"][m] in (1e-4, 3e-4) for m in results["sweep"])
        for m in ("dpo", "simpo", "confpo", "sepo", "sepo_anchor"):  # the SFT model, step 1, step 2
            assert [p["step"] for p in runs[m]["curve"]] == [0, 1, 2], m
            assert runs[m]["curve"][0]["kl"] == 0.0 and runs[m]["curve"][-1]["kl"] > 0, m
        assert {"selected_rejected", "same_types_heldout_chosen"} <= set(runs["sepo"]["curve"][-1])
        assert [p["step"] for p in runs["confpo"]["selected"]] == [1, 2]  # ConfPO Fig. 8's series
        assert runs["sepo_k0.3"] == runs["sepo"]  # k = --ratio is the comparison's own SePO, not trained twice
        assert not list((tmp_path / "runs" / regime).rglob("checkpoints"))  # deleted once every curve is evaluated
        for kind in ("selection", "random"):
            a = results["anatomy"]["confpo"][kind]["rejected"]
            assert 0 <= a["precision"] <= 1 and 0 <= a["one_sided"] <= 1 and 0 <= a["after_key_selected"] <= 1
        assert results["anatomy"]["confpo"]["selection"]["chosen"]["recall"] > 0
        assert set(results["stages"]["oracles"]["0"]) == {"tiny_0.25", "tiny_0.5", "micro_0.5"}
        assert set(results["stages"]["pretrain"]) == {"micro", "tiny", "small"}
        for name in ("methods", "kl_reward", "confpo_selected", "sepo", "collapse"):
            root = ET.parse(fig / f"{name}.svg").getroot()
            assert root.tag == f"{SVG}svg" and len(root.findall(f".//{SVG}circle")) >= 2, name
        table = (fig / "results.md").read_text()
        assert "| confpo |" in table and "| SePO k=0.1 | chosen |" in table and "nan" not in table
        assert "| sepo_anchor | selected rejected |" in table
    # a second run finds every result in place: the same numbers, nothing trained or evaluated again
    evaluation = next((tmp_path / "runs" / "independent" / "dpo").glob("seed0_*/evaluation_test_curve.json"))
    mtime = os.path.getmtime(evaluation)
    summary = json.loads((tmp_path / "fig" / "independent" / "results.json").read_text())["summary"]
    assert experiments.main(args)
    assert json.loads((tmp_path / "fig" / "independent" / "results.json").read_text())["summary"] == summary
    assert os.path.getmtime(evaluation) == mtime
    # --tables_only writes the same tables and plots from the results files alone, without the runs folder
    written = {p: p.read_bytes() for p in (tmp_path / "fig").rglob("*") if p.suffix in (".md", ".svg")}
    for p in written:
        p.unlink()
    os.rename(tmp_path / "runs", tmp_path / "gone")
    assert experiments.main(args + ["--tables_only"])
    assert {p: p.read_bytes() for p in written} == written


def slow_sequence_kl(model, sft, sequences, answer_mask, pad_id):
    """One answer at a time, unpadded, one token at a time: sum_t sum_v p(v) (log p(v) - log q(v))."""
    out = []
    for ids, answer in zip(sequences.tolist(), answer_mask.tolist()):
        keep = [i for i, (t, a) in enumerate(zip(ids, answer)) if t != pad_id or a]
        ids, answer = [ids[i] for i in keep], [answer[i] for i in keep]
        total = 0.0
        for t in range(1, len(ids)):
            if answer[t]:
                prefix = torch.tensor([ids[:t]])
                with torch.no_grad():
                    p = torch.log_softmax(model(prefix).logits[0, -1].double(), -1)
                    q = torch.log_softmax(sft(prefix).logits[0, -1].double(), -1)
                total += float((p.exp() * (p - q)).sum())
        out.append(total)
    return out


def test_sequence_kl_and_answer_masks_match_a_slow_loop(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world["llama-tiny"], padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(world["llama-tiny"]).eval()
    sft = AutoModelForCausalLM.from_pretrained(world["llama-tiny"]).eval()
    with torch.no_grad():
        for p in sft.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = ["What is 3 plus 4?", "Name a colour.", "Hi"]  # different lengths: left padding
    torch.manual_seed(0)
    seqs, answer = tiny.generate_answers(model, tok, prompts, torch.device("cpu"), max_new_tokens=12, sample=True,
                                          batch_size=2)
    for ids, mask in zip(seqs.tolist(), answer.tolist()):  # the mask: generated tokens up to the first EOS
        pos = [i for i, m in enumerate(mask) if m]
        assert pos == list(range(pos[0], pos[-1] + 1))
        run = [ids[i] for i in pos]
        assert tok.eos_token_id not in run[:-1] and (run[-1] == tok.eos_token_id or len(run) == 12)
        assert all(t == tok.pad_token_id for t in ids[pos[-1] + 1:])
    fast = measures.sequence_kl(model, sft, seqs, answer, tok.pad_token_id, batch_size=2)
    slow = slow_sequence_kl(model, sft, seqs, answer, tok.pad_token_id)
    assert torch.allclose(fast.double(), torch.tensor(slow, dtype=torch.float64), rtol=1e-4, atol=1e-6)
    assert all(v > 0 for v in slow)
    assert float(measures.sequence_kl(model, model, seqs, answer, tok.pad_token_id).abs().max()) < 1e-6


def test_checkpoint_weights_equal_the_exported_model(world, tmp_path):
    from transformers import AutoModelForCausalLM
    out = tmp_path / "run"
    train.main(["--method", "simpo", "--model", world["llama-tiny"], "--data", world["small"], "--output_dir",
                str(out), "--global_batch_size", "8", "--micro_batch_size", "4", "--max_length", "128",
                "--max_prompt_length", "64", "--lr", "1e-3", "--max_steps", "2", "--save_every", "1", "--keep_last",
                "0", "--judge", "none", "--cache_dir", world["cache"]])
    base = lambda: AutoModelForCausalLM.from_pretrained(world["llama-tiny"])  # noqa: E731
    from_checkpoint = models.load_weights(base(), str(out / "checkpoints" / "step_00000002")).state_dict()
    exported = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    first = models.load_weights(base(), str(out / "checkpoints" / "step_00000001")).state_dict()
    original = base().state_dict()
    for k, v in exported.items():
        assert torch.equal(from_checkpoint[k], v), k
    assert any(not torch.equal(first[k], exported[k]) for k in exported)
    assert any(not torch.equal(original[k], first[k]) for k in exported)


@pytest.mark.parametrize("lo,hi", [(0.0, 1.0), (0.37, 0.41), (-3.2, 17.0), (0.5, 0.5), (1e-4, 3e-4)])
def test_ticks_cover_the_range_with_round_even_steps(lo, hi):
    ticks = measures._ticks(lo, hi)
    assert ticks[0] <= lo and ticks[-1] >= hi and 3 <= len(ticks) <= 12
    steps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(steps) - min(steps) < 1e-9 * max(1.0, abs(hi))
    mantissa = steps[0] / 10 ** math.floor(math.log10(steps[0]))
    assert any(abs(mantissa - m) < 1e-6 for m in (1, 2, 2.5, 5, 10))


def test_mean_token_logp_of_left_padded_answers_matches_each_answer_alone(world):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(world["llama-tiny"]).eval()
    answers = [([5, 9, 11], [7, 8, 2], True), ([6], [10, 12, 13, 14], False), ([4, 4, 5, 6, 7], [3], True)]
    ids, attention, answer = measures.left_padded(answers, pad=0)
    assert ids.shape == (3, 6) and attention.sum(-1).tolist() == [6, 5, 6] and answer.sum(-1).tolist() == [3, 4, 1]
    alone = []  # one answer at a time, unpadded: the mean over its tokens of log pi(token | all before it)
    for prompt, a, _ in answers:
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + a])).logits[0].double(), -1)
        alone.append(sum(float(logp[len(prompt) + t - 1, tok]) for t, tok in enumerate(a)) / len(a))
    got = measures.mean_token_logp(model, answers, 0, torch.device("cpu"), batch_size=2)
    assert abs(got - sum(alone) / 3) < 1e-5
