"""score.py and the SePO pipeline on the tiny world: scores equal a direct computation with the two models,
floor(k n) tokens per response, kill-and-resume, 2 ranks = 1 rank, tokenizer checks, the cross-tokenizer mapping on
known key spans, the HTML report, ConfPO's selection, and the whole pipeline end to end.

The "oracle" and "reference" of most tests are two different untrained models that share a tokenizer (llama-tiny
and neox-tiny): what is tested is the arithmetic of Eq. 24-25 and the plumbing, not the quality of an oracle.
"""

import json
import math
from fractions import Fraction
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import confpo
import data
import models
import score
import sepo
import sepo_pipeline
import tiny
import train
import utils

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def score_args(world, out, **extra):
    args = {"oracle": world["llama-tiny"], "reference": world["neox-tiny"], "data": world["small"],
            "output_dir": str(out), "cache_dir": world["cache"], "batch_size": 3, "shard_size": 5, **extra}
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def direct_logps(model_path, tok_row, side):
    """log pi(y_t | x, y_<t) of each response token, from the model's full log-softmax (no repo code)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path)
    ids = torch.tensor([tok_row[f"{side}_input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    start = tok_row["prompt_len"]
    return [float(logp[t - 1, ids[0, t]]) for t in range(start, ids.shape[1])]


def tokenized_rows(world, tokenizer_path, source=None, **kw):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    ds, _ = data.tokenize_preferences(data.load_preferences(source or world["small"], cache_dir=world["cache"]),
                                      tok, **kw)
    return {r["row"]: r for r in ds}


def test_scores_equal_a_direct_computation_and_counts_are_floor_kn(world, tmp_path):
    out = tmp_path / "scores"
    score.main(score_args(world, out, ratios="0.3:0.3,0.5:0.1", save_scores=True, beta=0.5))
    rows = tokenized_rows(world, world["llama-tiny"])
    for name, (rc, rl) in (("selections-c0.3-r0.3.jsonl", (0.3, 0.3)), ("selections-c0.5-r0.1.jsonl", (0.5, 0.1))):
        records = read_jsonl(out / name)
        assert [r["row"] for r in records] == sorted(rows)
        for rec in records[:4] if rc == 0.3 else records:
            for side, ratio, highest in (("chosen", rc, True), ("rejected", rl, False)):
                n = rec[f"{side}_n"]
                assert len(rec[f"{side}_selected"]) == math.floor(Fraction(str(ratio)) * n)  # exact floor(k n)
                if rc == 0.3:  # Eq. 24 against the two models' own log-softmax
                    expected = [0.5 * (o - r) for o, r in zip(direct_logps(world["llama-tiny"], rows[rec["row"]], side),
                                                             direct_logps(world["neox-tiny"], rows[rec["row"]], side))]
                    assert len(expected) == n
                    torch.testing.assert_close(torch.tensor(rec[f"{side}_scores"]), torch.tensor(expected).float(),
                                               rtol=1e-4, atol=1e-4)
                # Eq. 25 from the written scores: best first, ties to the earliest position
                s = rec[f"{side}_scores"]
                order = sorted(range(n), key=lambda i: ((-s[i] if highest else s[i]), i))
                assert rec[f"{side}_selected"] == sorted(order[:len(rec[f"{side}_selected"])])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["pairs"] == 16
    assert manifest["policy_tokenizer"] == data.tokenizer_hash(__import__("transformers").AutoTokenizer
                                                               .from_pretrained(world["llama-tiny"]))
    assert 0 <= manifest["selections"]["selections-c0.3-r0.3.jsonl"]["key_chosen"]["recall"] <= 1


def test_killed_score_resumes_to_the_same_files(world, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    extra = dict(data=world["train"], max_pairs=300, batch_size=1, shard_size=6, ratios="0.3:0.3")
    score.main(score_args(world, full, **extra))
    cmd = [sys.executable, os.path.join(HERE, "score.py"), *score_args(world, killed, **extra)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (killed / "shards" / "block_000004.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    blocks = len(os.listdir(killed / "shards"))
    assert 5 <= blocks < 50 and not (killed / "selections-c0.3-r0.3.jsonl").exists(), blocks  # really interrupted
    score.main(score_args(world, killed, **extra))
    assert (killed / "selections-c0.3-r0.3.jsonl").read_bytes() == (full / "selections-c0.3-r0.3.jsonl").read_bytes()
    # the same folder with other models is refused rather than mixed
    with pytest.raises(SystemExit, match="holds scores of another run"):
        score.main(score_args(world, killed, **{**extra, "reference": world["llama-small"]}))


def test_two_ranks_score_like_one(world, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    score.main(score_args(world, one, save_scores=True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "score.py"), *score_args(world, two, save_scores=True)]
    proc = subprocess.run(cmd, env=ENV, cwd=HERE, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = read_jsonl(one / "selections-c0.3-r0.3.jsonl"), read_jsonl(two / "selections-c0.3-r0.3.jsonl")
    assert [r["row"] for r in a] == [r["row"] for r in b]
    for x, y in zip(a, b):
        assert x["chosen_selected"] == y["chosen_selected"] and x["rejected_selected"] == y["rejected_selected"]
        torch.testing.assert_close(torch.tensor(x["chosen_scores"]), torch.tensor(y["chosen_scores"]))


def test_tokenizer_mismatch_fails_with_its_message(world, tmp_path):
    char_model = tiny.build_tiny_model(str(tmp_path / "char-llama"), world["tokenizer_char"], "llama", "tiny")
    with pytest.raises(SystemExit, match=r"different tokenizers: vocabulary .* pass --cross_tokenizer"):
        score.main(score_args(world, tmp_path / "a", policy=char_model))
    with pytest.raises(SystemExit, match="the oracle and the reference must share a tokenizer"):
        score.main(score_args(world, tmp_path / "b", reference=char_model))
    # train.py refuses selections that index another tokenizer's tokens
    score.main(score_args(world, tmp_path / "c"))
    with pytest.raises(SystemExit, match="index the tokens of another tokenizer"):
        train.main(["--method", "sepo", "--model", char_model, "--data", world["small"], "--selections",
                    str(tmp_path / "c" / "selections-c0.3-r0.3.jsonl"), "--output_dir", str(tmp_path / "t"),
                    "--cache_dir", world["cache"], "--global_batch_size", "8"])


def test_map_across_tokenizers_selects_the_known_spans(world):
    """A perfect oracle in the BPE tokenization (it selects the tokens overlapping the key span) carried to the
    one-token-per-character tokenizer selects exactly the characters of those BPE tokens: the key and nothing
    beyond the BPE tokens that contain it."""
    bpe = tokenized_rows(world, world["tokenizer"], offsets=True)
    char = tokenized_rows(world, world["tokenizer_char"], offsets=True)
    pairs = {i: json.loads(line) for i, line in enumerate(open(world["small"]))}
    for row, pair in pairs.items():
        for side in ("chosen", "rejected"):
            src = torch.tensor(data.response_part(bpe[row], side, "offsets"))
            dst = torch.tensor(data.response_part(char[row], side, "offsets"))
            key = torch.tensor(data.response_part(bpe[row], side, "key")).bool()
            scores = torch.where(key, 1.0, -1.0)
            sel, mapped, covered = models.map_across_tokenizers(src, key, scores, dst)
            assert covered.all()
            (a, b), = pair[f"{side}_key_spans"]
            covered = set()
            for (s, e), k in zip(src.tolist(), key.tolist()):
                if k:
                    covered |= set(range(s, e))
            assert set(range(a, b)) <= covered
            chars = {s for (s, e), x in zip(dst.tolist(), sel.tolist()) if x and s >= 0}
            assert chars == covered, (row, side)
            assert sel[-1].item() is False and dst[-1, 0] == -1  # the EOS follows the source EOS (not selected)
            torch.testing.assert_close(mapped[sel], torch.ones(int(sel.sum())))


def test_cross_tokenizer_end_to_end(world, tmp_path):
    """An oracle of one tokenizer selects for a policy of another; train.py accepts the result."""
    char_model = tiny.build_tiny_model(str(tmp_path / "char-llama"), world["tokenizer_char"], "llama", "tiny")
    out = tmp_path / "scores"
    score.main(score_args(world, out, policy=char_model, cross_tokenizer=True, save_scores=True))
    char_rows = tokenized_rows(world, char_model)
    for rec in read_jsonl(out / "selections-c0.3-r0.3.jsonl"):
        for side in ("chosen", "rejected"):
            n = sum(1 for x in char_rows[rec["row"]][f"{side}_labels"] if x != -100)
            assert rec[f"{side}_n"] == n == len(rec[f"{side}_scores"])
            assert rec[f"{side}_selected"] and max(rec[f"{side}_selected"]) < n
    assert json.loads((out / "manifest.json").read_text())["cross_tokenizer"] is True
    train.main(["--method", "sepo", "--model", char_model, "--data", world["small"], "--selections",
                str(out / "selections-c0.3-r0.3.jsonl"), "--output_dir", str(tmp_path / "policy"), "--cache_dir",
                world["cache"], "--global_batch_size", "8", "--micro_batch_size", "4", "--max_steps", "2",
                "--lr", "1e-3", "--export", "false"])
    assert (tmp_path / "policy" / "metrics.jsonl").exists()


def test_report_shows_tokens_scores_selections_and_histograms(world, tmp_path):
    out = tmp_path / "scores"
    report = tmp_path / "report.html"
    score.main(score_args(world, out, report=str(report), report_pairs=4, save_scores=True, data=world["train"],
                          max_pairs=40))
    html = report.read_text()
    assert html.startswith("<!DOCTYPE html>") and html.count("<svg") == 2
    assert "SePO Fig. 6" in html and "ConfPO Fig. 12" in html and "precision" in html
    records = {r["row"]: r for r in read_jsonl(out / "selections-c0.3-r0.3.jsonl")}
    shown = [int(x) for x in re.findall(r"<h3>pair (\d+)</h3>", html)]
    assert len(shown) == 4
    blocks = html.split("<h3>pair ")[1:]
    for row, block in zip(shown, blocks):
        for side, part in zip(("chosen", "rejected"), block.split("<div class='resp'>")[1:]):
            part = part.split("</div>")[0]
            assert part.count("class='tok sel") == len(records[row][f"{side}_selected"])
            assert part.count(" key'") >= 1  # the synthetic task's key tokens are marked
            assert part.count("<span") == records[row][f"{side}_n"]
            titles = [float(t) for t in re.findall(r"title='score (-?[\d.]+)", part)]
            torch.testing.assert_close(torch.tensor(titles), torch.tensor(records[row][f"{side}_scores"]),
                                       rtol=0, atol=6e-4)
        assert re.search(r"chosen: \d+ of \d+ tokens selected \(\d+%\)", block)


def test_confpo_selection_under_a_model(world, tmp_path):
    out = tmp_path / "confpo"
    score.main(["--confpo", "--model", world["llama-tiny"], "--data", world["small"], "--output_dir", str(out),
                "--cache_dir", world["cache"], "--report", str(tmp_path / "confpo.html")])
    records = read_jsonl(out / "confpo.jsonl")
    rows = tokenized_rows(world, world["llama-tiny"])
    for rec in records:
        for side in ("chosen", "rejected"):
            logps = torch.tensor(direct_logps(world["llama-tiny"], rows[rec["row"]], side))[None]
            sel, _ = confpo.confpo_mask(logps, torch.ones_like(logps, dtype=torch.bool))
            assert rec[f"{side}_selected"] == sel[0].nonzero().squeeze(-1).tolist()
    assert "ConfPO selection under" in (tmp_path / "confpo.html").read_text()


def test_sepo_pipeline_end_to_end(world, tmp_path):
    out = tmp_path / "sepo"
    final = sepo_pipeline.main(["--tiny_world", os.path.dirname(world["data"]), "--output_dir", str(out),
                               "--cache_dir", world["cache"], "--max_steps", "3", "--subset", "64"])
    assert final == str(out / "policy" / "final")
    assert len(read_jsonl(out / "subset.jsonl")) == 64
    for stage in ("oracle_sft", "oracle_dpo", "policy"):
        assert (out / stage / "final" / "config.json").exists()
    config = json.loads((out / "policy" / "config.json").read_text())
    assert config["method"] == "sepo" and config["model"].endswith("llama-small-sft")
    manifest = json.loads((out / "scores" / "manifest.json").read_text())
    assert manifest["paths"]["oracle"].endswith("oracle_dpo/final")
    assert manifest["paths"]["reference"].endswith("oracle_sft/final")
    assert (out / "scores" / "report.html").exists()
    evals = [json.loads(x) for x in (out / "policy" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in evals if m["split"] == "eval"] == [0, 3]
    # the oracle was trained with the policy's tokenizer, so it reads the data as the policy does
    for stage in ("oracle_sft", "oracle_dpo"):
        used = json.loads((out / stage / "config.json").read_text())
        assert (used["tokenizer"] or used["model"]).endswith(("llama-small-sft", "oracle_sft/final"))
    assert json.loads((out / "oracle_sft" / "config.json").read_text())["tokenizer"].endswith("llama-small-sft")
    # run again: every stage is found done, nothing is retrained
    mtime = (out / "policy" / "final" / "model.safetensors").stat().st_mtime
    sepo_pipeline.main(["--tiny_world", os.path.dirname(world["data"]), "--output_dir", str(out),
                       "--cache_dir", world["cache"], "--max_steps", "3", "--subset", "64"])
    assert (out / "policy" / "final" / "model.safetensors").stat().st_mtime == mtime
    # ... and with other settings the folder is refused rather than half reused
    with pytest.raises(SystemExit, match="holds another SePO pipeline .*chosen_ratio"):
        sepo_pipeline.main(["--tiny_world", os.path.dirname(world["data"]), "--output_dir", str(out),
                           "--cache_dir", world["cache"], "--max_steps", "3", "--subset", "64",
                           "--chosen_ratio", "0.5"])


def test_selections_land_on_the_scored_tokens_in_training_batches(world, tmp_path):
    """Selections written as response-token indices come back, through attach_selections and the collator, on
    exactly the tokens they name: here the synthetic task's key tokens, compared position by position."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(world["llama-tiny"])
    ds, _ = data.tokenize_preferences(data.load_preferences(world["small"], cache_dir=world["cache"]), tok)
    path = tmp_path / "sel.jsonl"
    with open(path, "w") as fh:
        for ex in ds:
            rec = {"row": ex["row"]}
            for side in ("chosen", "rejected"):
                key = data.response_part(ex, side, "key")
                rec.update({f"{side}_n": len(key), f"{side}_selected": [i for i, k in enumerate(key) if k]})
            fh.write(json.dumps(rec) + "\n")
    attached = sepo.attach_selections(ds, sepo.load_selections(str(path)), str(path))
    batch = data.collate_pairs([attached[i] for i in range(len(attached))], tok.pad_token_id,
                               token_fields=("select", "key"))
    assert batch["select"].sum() > 0 and torch.equal(batch["select"], batch["key"])
    # and the training loop's mask of those positions is the response mask restricted to them
    logps_mask = batch["labels"] != -100
    assert not (batch["select"].bool() & ~logps_mask).any()


def test_map_across_tokenizers_weights_overlaps_and_pairs_template_tokens():
    src = torch.tensor([[0, 4], [4, 8], [-1, -1], [-1, -1]])  # two words, then <eot> and EOS
    dst = torch.tensor([[0, 2], [2, 6], [6, 8], [-1, -1], [-1, -1]])
    selected, scores, covered = models.map_across_tokenizers(src, torch.tensor([False, True, True, False]),
                                                            torch.tensor([1.0, 3.0, 9.0, 5.0]), dst)
    assert selected.tolist() == [False, True, True, True, False]  # [2, 6) overlaps the selected [4, 8)
    torch.testing.assert_close(scores, torch.tensor([1.0, 2.0, 3.0, 9.0, 5.0]))  # (2 * 1 + 2 * 3) / 4 = 2
    assert covered.all()
    # a destination cut by truncation keeps no tail pairing: its template tokens take nothing from the source EOS
    cut = torch.tensor([[0, 2], [2, 5]])
    selected, scores, covered = models.map_across_tokenizers(src, torch.tensor([True, False, False, True]),
                                                            torch.tensor([1.0, 3.0, 9.0, 5.0]), cut, align_tail=False)
    assert selected.tolist() == [True, True] and covered.all()
    # text that no source token covers (the source was truncated earlier) is reported
    short = torch.tensor([[0, 4], [-1, -1]])
    _, _, covered = models.map_across_tokenizers(short, torch.tensor([True, True]), torch.tensor([1.0, 2.0]), dst,
                                                align_tail=False)
    assert covered.tolist() == [True, True, False, True, True]


def test_changed_data_or_models_are_not_resumed(world, tmp_path):
    src = tmp_path / "pairs.jsonl"
    src.write_text(open(world["small"]).read())
    score.main(score_args(world, tmp_path / "s", data=str(src)))
    lines = src.read_text().splitlines()
    swapped = [json.dumps({**json.loads(x), "chosen": json.loads(x)["rejected"], "rejected": json.loads(x)["chosen"]})
               for x in lines]
    src.write_text("\n".join(swapped) + "\n")  # same path, other content
    with pytest.raises(SystemExit, match="holds scores of another run .*data"):
        score.main(score_args(world, tmp_path / "s", data=str(src)))
    with pytest.raises(SystemExit, match="holds scores of another run .*dtype"):
        score.main(score_args(world, tmp_path / "s", data=str(src), dtype="bf16"))


def test_cross_tokenizer_with_truncation_drops_nothing_silently(world, tmp_path, capsys):
    """A one-token-per-character oracle loses whole responses to max_length where the BPE policy keeps them: those
    pairs get empty selections (not a missing row), and the uncovered share of policy tokens is reported."""
    char_oracle = tiny.build_tiny_model(str(tmp_path / "char-oracle"), world["tokenizer_char"], "llama", "tiny")
    char_ref = tiny.build_tiny_model(str(tmp_path / "char-ref"), world["tokenizer_char"], "gpt_neox", "tiny")
    out = tmp_path / "scores"
    score.main(score_args(world, out, oracle=char_oracle, reference=char_ref, policy=world["llama-tiny"],
                          cross_tokenizer=True, max_length=60, max_prompt_length=40))
    printed = capsys.readouterr().out
    records = read_jsonl(out / "selections-c0.3-r0.3.jsonl")
    policy_rows = tokenized_rows(world, world["llama-tiny"], max_length=60, max_prompt_length=40)
    assert sorted(r["row"] for r in records) == sorted(policy_rows)  # every pair the policy trains on
    assert "overlap no oracle token" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0 < manifest["selections"]["uncovered_policy_tokens"] < 1
    train.main(["--method", "sepo", "--model", world["llama-tiny"], "--data", world["small"], "--selections",
                str(out / "selections-c0.3-r0.3.jsonl"), "--output_dir", str(tmp_path / "policy"), "--cache_dir",
                world["cache"], "--global_batch_size", "8", "--max_steps", "1", "--max_length", "60",
                "--max_prompt_length", "40", "--export", "false"])


def test_report_escapes_token_text(world, tmp_path):
    pairs = tmp_path / "odd.jsonl"
    odd = {"prompt": "Say it.", "chosen": "<script>alert('x')</script> & \"quotes\" done",
           "rejected": "plain <b>bold</b> answer"}
    pairs.write_text(json.dumps(odd) + "\n")
    report = tmp_path / "r.html"
    score.main(score_args(world, tmp_path / "s", data=str(pairs), report=str(report), report_pairs=1))
    text = report.read_text()
    assert "<script>" not in text and "<b>" not in text
    assert "&lt;" in text and "&amp;" in text


def test_datasets_format_is_read_by_train(world, tmp_path):
    out = tmp_path / "scores"
    score.main(score_args(world, out, format="datasets"))
    folder = out / "selections-c0.3-r0.3"
    assert folder.is_dir() and (folder / "dataset_info.json").exists()
    train.main(["--method", "sepo", "--model", world["llama-tiny"], "--data", world["small"], "--selections",
                str(folder), "--output_dir", str(tmp_path / "policy"), "--cache_dir", world["cache"],
                "--global_batch_size", "8", "--max_steps", "1", "--export", "false"])
    assert (tmp_path / "policy" / "metrics.jsonl").exists()


def test_an_unfinished_scoring_run_is_refused_by_train(world, tmp_path):
    out = tmp_path / "scores"
    score.main(score_args(world, out))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(SystemExit, match="has not finished"):
        train.main(["--method", "sepo", "--model", world["llama-tiny"], "--data", world["small"], "--selections",
                    str(out / "selections-c0.3-r0.3.jsonl"), "--output_dir", str(tmp_path / "policy"),
                    "--cache_dir", world["cache"], "--global_batch_size", "8"])


def test_exclude_eos_never_selects_the_end_of_turn_and_selects_floor_k_of_the_rest(world, tmp_path):
    """score.py --exclude_eos (a departure, off by default): the final EOS of a response is no candidate; the
    selection is Eq. 25 over the response's other tokens, floor(k (n - 1)) of them, the same as without the flag
    on scores where the EOS is removed."""
    plain, excluded = tmp_path / "plain", tmp_path / "excluded"
    score.main(score_args(world, plain, ratios="0.5:0.5", save_scores=True))
    score.main(score_args(world, excluded, ratios="0.5:0.5", save_scores=True, exclude_eos=True))
    rows = tokenized_rows(world, world["llama-tiny"])
    from transformers import AutoTokenizer
    eos = AutoTokenizer.from_pretrained(world["llama-tiny"]).eos_token_id
    name = "selections-c0.5-r0.5.jsonl"
    eos_kept = 0
    for a, b in zip(read_jsonl(plain / name), read_jsonl(excluded / name)):
        for side, highest in (("chosen", True), ("rejected", False)):
            n = b[f"{side}_n"]
            assert data.response_part(rows[b["row"]], side, "input_ids")[-1] == eos  # none of these is cut
            assert n - 1 not in b[f"{side}_selected"]
            assert len(b[f"{side}_selected"]) == math.floor(Fraction(1, 2) * (n - 1))
            scores = torch.tensor([a[f"{side}_scores"][:-1]], dtype=torch.float64)
            expected = sepo.select_tokens(scores, torch.ones_like(scores, dtype=torch.bool), 0.5, highest)
            assert b[f"{side}_selected"] == expected[0].nonzero().squeeze(-1).tolist()
            eos_kept += n - 1 in a[f"{side}_selected"]
    assert eos_kept > 0  # without the flag the end of turn is selected somewhere: the flag changes something
    assert json.loads((excluded / "manifest.json").read_text())["exclude_eos"] is True
    with pytest.raises(utils.UserError, match="--exclude_eos: SePO's"):
        score.check_config(score.parse_config(["--confpo", "--model", "m", "--data", "d", "--output_dir", "o",
                                               "--exclude_eos"])[0])


def test_the_scorers_build_no_kv_cache_and_score_with_a_float32_head(world):
    """A checkpoint's use_cache: true made every scoring forward build a KV cache (+4 GB at 8B in bf16); the
    scorers now turn it off. SePO's scores (Eq. 24) difference two models' log-probs: with a bf16 body the head is
    computed in float32 on a float32 copy of the output embedding, which rounds less than bf16 logits."""
    import onpolicy
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForSequenceClassification
    cfg = score.ScoreConfig(dtype="bf16", device="cpu")
    scorer = score.load_scorer(world["llama-tiny"], cfg, torch.device("cpu"))
    assert scorer.model.config.use_cache is False
    assert scorer.model(input_ids=torch.tensor([[5, 6, 7]])).past_key_values is None
    reward = os.path.join(world["root"], "reward-with-cache")
    if not os.path.exists(reward):
        LlamaForSequenceClassification(LlamaConfig(vocab_size=1024, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                   use_cache=True)).save_pretrained(reward)
        __import__("transformers").AutoTokenizer.from_pretrained(world["llama-tiny"]).save_pretrained(reward)
    scores = onpolicy.reward_model_scorer(reward, torch.device("cpu"), torch.float32, 4)
    assert scores.model.config.use_cache is False and len(scores(["Hi?"], ["Hello."])) == 1
    # the float32 head against bf16 logits, both on the bf16 body, measured from the float32 model's own scores
    rows = list(tokenized_rows(world, world["llama-tiny"]).values())[:4]
    batch = data.collate_pairs(rows, 0)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    full = AutoModelForCausalLM.from_pretrained(world["llama-tiny"], dtype=torch.float32)
    exact = models.PolicyLogps(full, "chunked", None, together=False)(**inputs)[0]
    body = AutoModelForCausalLM.from_pretrained(world["llama-tiny"], dtype=torch.bfloat16)
    mask = batch["labels"] != -100
    with torch.no_grad():
        head32 = (models.PolicyLogps(body, "chunked", None, together=False, fp32_head=True)(**inputs)[0] - exact)
        head16 = (models.PolicyLogps(body, "chunked", None, together=False)(**inputs)[0] - exact)
    assert head32[mask].abs().mean() < head16[mask].abs().mean()
