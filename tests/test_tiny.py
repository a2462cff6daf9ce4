"""Tests for the tiny/ package: the offline world builds in seconds, is re-used, is deterministic from its seed, never
overwrites a foreign folder; its models load and run; the synthetic task's judge and key spans."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny
import utils
from data import collate_pairs, load_preferences, tokenize_preferences

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fresh_world(tmp_path_factory):
    """A world built from nothing in this module, timed."""
    root = tmp_path_factory.mktemp("fresh") / "tiny_world"
    t0 = time.time()
    paths = tiny.build_tiny_world(str(root), seed=0)
    paths["seconds"] = time.time() - t0
    return paths


@pytest.fixture(scope="module")
def test_pairs(world, tmp_path_factory):
    return load_preferences(world["test"], cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def toks(world):
    return {"bpe": AutoTokenizer.from_pretrained(world["tokenizer"])}


def test_tiny_world_builds_fast_and_is_reused(fresh_world):
    world = fresh_world
    assert world["seconds"] < 30, world["seconds"]  # about 5 s on 2 cores
    marker = os.path.join(world["llama-tiny"], "model.safetensors")
    mtime = os.path.getmtime(marker)
    t0 = time.time()
    assert tiny.build_tiny_world(os.path.dirname(world["tokenizer"]), seed=0) == {
        k: v for k, v in world.items() if k != "seconds"}
    assert time.time() - t0 < 2 and os.path.getmtime(marker) == mtime
    assert not [p for p in os.listdir(os.path.dirname(world["tokenizer"])) if ".tmp" in p]


def test_tiny_models_load_and_run(world, toks, test_pairs):
    tok = toks["bpe"]
    rows = list(tokenize_preferences(test_pairs.select(range(4)), tok)[0])
    batch = collate_pairs(rows, tok.pad_token_id)
    for name, arch in [("llama-tiny", "LlamaForCausalLM"), ("llama-small", "LlamaForCausalLM"),
                       ("neox-tiny", "GPTNeoXForCausalLM")]:
        model = AutoModelForCausalLM.from_pretrained(world[name])
        model_tok = AutoTokenizer.from_pretrained(world[name])
        assert type(model).__name__ == arch and len(model_tok) == len(tok) == model.config.vocab_size
        special = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
        assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == special
        g = model.generation_config
        assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == special
        assert 1e5 < sum(p.numel() for p in model.parameters()) < 2e6
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert logits.shape == (*batch["input_ids"].shape, len(tok)) and torch.isfinite(logits).all()
    assert not AutoModelForCausalLM.from_pretrained(world["llama-tiny"]).config.tie_word_embeddings


def test_world_is_deterministic_from_the_seed(world, tmp_path):
    a = tiny.build_tiny_model(str(tmp_path / "a"), world["tokenizer"], "llama", "tiny", seed=0)
    b = tiny.build_tiny_model(str(tmp_path / "b"), world["tokenizer"], "llama", "tiny", seed=1)
    ref, same, other = (AutoModelForCausalLM.from_pretrained(p).state_dict() for p in (world["llama-tiny"], a, b))
    assert all(torch.equal(ref[k], same[k]) for k in ref) and not all(torch.equal(ref[k], other[k]) for k in ref)
    tiny.build_tokenizer(str(tmp_path / "tok"), "bpe", seed=0)
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == open(
        os.path.join(world["tokenizer"], "tokenizer.json")).read()
    paths = tiny.write_synthetic_task(str(tmp_path / "d"), seed=0)
    assert open(paths["train"]).read() == open(world["train"]).read()
    assert tiny.synthetic_pairs(5, seed=1) != tiny.synthetic_pairs(5, seed=0)


def test_world_never_overwrites_foreign_folders(tmp_path):
    (tmp_path / "data").mkdir()  # a folder without our manifest, e.g. the user's own data
    with pytest.raises(utils.UserError, match="is not a tiny-world folder"):
        tiny.build_tiny_world(str(tmp_path), seed=0)
    done = subprocess.run([sys.executable, "-m", "tiny", "--root", str(tmp_path)], capture_output=True, text=True,
                          cwd=ROOT)  # the command: one error line, no traceback
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'data'} exists and is not a tiny-world folder; not overwriting it: choose another folder"]


def test_synthetic_task_reward_and_spans(world):
    pairs = [json.loads(l) for path in (world["train"], world["test"]) for l in open(path)]
    assert len(pairs) == 2200 and {p["task"] for p in pairs} == {"sum", "forbidden_word", "polarity"}
    for p in pairs:
        assert tiny.synthetic_reward(p["prompt"], p["chosen"]) == 1.0, p
        assert tiny.synthetic_reward(p["prompt"], p["rejected"]) < 1.0, p
        (cs, ce), = p["chosen_key_spans"]
        (rs, re_), = p["rejected_key_spans"]
        assert p["chosen"][cs:ce] != p["rejected"][rs:re_] and p["chosen"][ce:] == p["rejected"][re_:]
    assert tiny.synthetic_reward("What is 12 + 30?", "It is 42, I think.") == 1.0
    assert tiny.synthetic_reward("What is 12 + 30?", "42? No, 41.") == 0.5
    assert tiny.synthetic_reward('Describe the sky without using the word "blue".', "Clear.") == 0.5
    assert tiny.synthetic_reward("Write a positive review of the cafe.", "Great place, but poor coffee.") == 0.0


def test_independent_regime_judge_spans_and_independence(world):
    pairs = [json.loads(line) for s in ("train", "valid", "test") for line in open(world[f"{s}_independent"])]
    assert len(pairs) == 2400 and {p["task"] for p in pairs} == {"sum", "forbidden_word", "polarity"}
    for p in pairs:
        assert tiny.synthetic_reward(p["prompt"], p["chosen"]) == 1.0, p
        assert tiny.synthetic_reward(p["prompt"], p["rejected"]) < 1.0, p
        for side in ("chosen", "rejected"):
            keys = [p[side][a:b] for a, b in p[f"{side}_key_spans"]]
            assert keys, p
            if p["task"] == "sum":  # the stated number, the answer's last
                assert keys == [__import__("re").findall(r"\d+", p[side])[-1]]
            elif p["task"] == "polarity":
                good = tiny.POSITIVE if "positive" in p["prompt"] else tiny.NEGATIVE
                assert all((k in good) == (side == "chosen") for k in keys), p
            else:
                w = p["prompt"].split('"')[1]
                assert all((k == w) == (side == "rejected") for k in keys), p
    # written each on its own: most pairs differ in opening and in length, unlike the minimal pairs
    assert sum(p["chosen"][:12] != p["rejected"][:12] for p in pairs) > 0.7 * len(pairs)
    assert sum(p["chosen"].count(".") != p["rejected"].count(".") for p in pairs) > 0.5 * len(pairs)
    minimal = [json.loads(line) for line in open(world["train_minimal"])]
    assert sum(p["chosen"].count(".") != p["rejected"].count(".") for p in minimal) < 0.15 * len(minimal)


def test_pretraining_corpus_holds_both_regimes_good_and_bad_and_no_study_pair(tmp_path, world):
    paths = tiny.write_pretraining_corpus(str(tmp_path / "pt"), n_pairs=400, seed=0)
    rows = [json.loads(line) for s in ("train", "test") for line in open(paths[s])]
    assert len(rows) == 800 and sum(1 for _ in open(paths["test"])) == 40
    texts = {r["chosen"] for r in rows}
    judged = [tiny.synthetic_reward(r["prompt"], r["chosen"]) for r in rows]
    assert 0.4 < sum(j == 1.0 for j in judged) / len(judged) < 0.6  # good and bad answers alike
    assert any(t.count(".") >= 3 for t in texts) and any(t.count(".") <= 1 for t in texts)  # both regimes
    study = {json.loads(line)["chosen"] for regime in ("minimal", "independent") for s in ("train", "valid", "test")
             for line in open(world[f"{s}_{regime}"])}
    assert len(texts & study) < 0.05 * len(texts)  # other streams (short minimal answers may coincide)
