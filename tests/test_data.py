"""Tests for data.py: the three forms, truncation, bad input, loading, the collator, key masks, offsets. Offline,
CPU, on the tiny world of conftest.py (its tokenizers and synthetic pairs); the world itself is tested in
test_tiny.py."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / transformers are imported: everything here is offline
os.environ["HF_DATASETS_OFFLINE"] = "1"

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

import data
from data import DataError, collate_pairs, load_preferences, tokenize_preferences


@pytest.fixture(scope="module")
def test_pairs(world, tmp_path_factory):
    return load_preferences(world["test"], cache_dir=str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def toks(world):
    return {"bpe": AutoTokenizer.from_pretrained(world["tokenizer"]),
            "char": AutoTokenizer.from_pretrained(world["tokenizer_char"])}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def response_text(ids, labels, tok):
    """Decode the tokens the loss sees (labels != -100)."""
    return tok.decode([i for i, l in zip(ids, labels) if l != -100])


def check_pair(tok, tokenized, prompt_text, chosen_text, rejected_text):
    """Masked tokens decode to each response plus EOS; the prompt part to BOS (once) + the prompt text."""
    (row,) = tokenized
    for side, text in (("chosen", chosen_text), ("rejected", rejected_text)):
        ids, labels = row[f"{side}_input_ids"], row[f"{side}_labels"]
        assert response_text(ids, labels, tok) == text + tok.eos_token
        assert ids[-1] == tok.eos_token_id and ids.count(tok.eos_token_id) == prompt_text.count(tok.eos_token) + 1
        assert labels[:row["prompt_len"]] == [-100] * row["prompt_len"] and -100 not in labels[row["prompt_len"]:]
        assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id  # exactly one BOS
        assert tok.decode(ids[:row["prompt_len"]]) == tok.bos_token + prompt_text.removeprefix(tok.bos_token)


# --------------------------------------------------------------------------------------------- the three forms

@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("template", [True, False])
def test_standard_form(toks, kind, template):
    tok = toks[kind]
    ds = load_preferences([{"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."}])
    assert ds.column_names == ["prompt", "chosen", "rejected", "row"] and ds[0]["row"] == 0
    out, stats = tokenize_preferences(ds, tok, chat_template=template)
    assert stats == {"kept": 1, "dropped_empty": 0, "truncated_prompt": 0, "truncated_response": 0}
    turn = tok.extra_special_tokens[0]
    prompt = (tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], tokenize=False,
                                      add_generation_prompt=True) if template else "What is 2 + 3?")
    assert not template or prompt.endswith(f"{turn}assistant\n")
    check_pair(tok, out, prompt, "2 + 3 = 5.", "2 + 3 = 6.")


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("template", [True, False])
def test_conversational_form(toks, kind, template):
    tok = toks[kind]
    user = [{"role": "user", "content": "Name a colour."}]
    first = user + [{"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another one?"}]
    rows = [  # explicit prompt (TRL), then UltraFeedback-binarized: whole conversations and a redundant prompt string
        {"prompt": first, "chosen": [{"role": "assistant", "content": "Blue."}],
         "rejected": [{"role": "assistant", "content": "Red again."}]},
        {"prompt": "Name a colour.", "chosen": first + [{"role": "assistant", "content": "Blue."}],
         "rejected": first + [{"role": "assistant", "content": "Red again."}]}]
    for row in rows:
        ds = load_preferences([row], form="auto")
        assert ds[0]["prompt"] == first and ds[0]["chosen"] == [{"role": "assistant", "content": "Blue."}]
        out, _ = tokenize_preferences(ds, tok, chat_template=template)
        prompt = (tok.apply_chat_template(first, tokenize=False, add_generation_prompt=True) if template else
                  "user: Name a colour.\n\nassistant: Red.\n\nuser: Another one?\n\nassistant: ")
        check_pair(tok, out, prompt, "Blue.", "Red again.")


HH = {"chosen": "\n\nHuman: Is the sun hot?\n\nAssistant: Yes, very hot.",
      "rejected": "\n\nHuman: Is the sun hot?\n\nAssistant: Yes, it is cold."}


@pytest.mark.parametrize("kind", ["bpe", "char"])
@pytest.mark.parametrize("template", [True, False])
def test_implicit_form_hh(toks, kind, template, tmp_path):
    tok = toks[kind]
    ds = load_preferences(write_jsonl(tmp_path / "hh.jsonl", [HH]), cache_dir=str(tmp_path / "cache"))
    prompt = "\n\nHuman: Is the sun hot?\n\nAssistant:"  # the shared prefix "... Yes, " backs off to the marker
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == (prompt, " Yes, very hot.", " Yes, it is cold.")
    out, _ = tokenize_preferences(ds, tok, chat_template=template)
    if template:
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    check_pair(tok, out, prompt, " Yes, very hot.", " Yes, it is cold.")


def test_implicit_split_without_marker():
    assert data.split_implicit("Q: 2+2= 4", "Q: 2+2= 5") == len("Q: 2+2=")  # the response starts with " 4"
    assert data.split_implicit("The cat sat", "The cab sat") == len("The")  # never inside a word
    ds = load_preferences([{"chosen": "Say hi. Hello there", "rejected": "Say hi. Hey"}], form="implicit")
    assert (ds[0]["prompt"], ds[0]["chosen"], ds[0]["rejected"]) == ("Say hi.", " Hello there", " Hey")


def test_template_whose_end_of_turn_is_not_eos(toks):
    """A template ending turns with its own token (as Llama-3's <|eot_id|>) keeps it, then gets one EOS."""
    tok = AutoTokenizer.from_pretrained(toks["bpe"].name_or_path)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}[END]\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    ds = load_preferences([{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."}])
    out, _ = tokenize_preferences(ds, tok, offsets=True)
    row = out[0]
    assert response_text(row["chosen_input_ids"], row["chosen_labels"], tok) == "Hello.[END]" + tok.eos_token
    assert tok.decode(row["chosen_input_ids"][:row["prompt_len"]]) == tok.bos_token + "user: Hi?[END]\nassistant: "
    # offsets cover exactly "Hello." and nothing of the template's "[END]"
    spans = [s for s in row["chosen_offsets"] if s != [-1, -1]]
    assert "".join("Hello."[s:e] for s, e in spans) == "Hello." and spans[-1][1] == len("Hello.")


# ------------------------------------------------------------------------------------------------- truncation

def test_truncation(toks):
    tok = toks["char"]  # one token per character: lengths are easy to reason about
    rows = [{"prompt": "0123456789", "chosen": "abc", "rejected": "abcdefgh"},  # prompt cut to 6, responses to 4
            {"prompt": "xy", "chosen": "a", "rejected": "b"},  # untouched
            {"prompt": "p" * 20, "chosen": "a", "rejected": "b"}]  # prompt fills max_length: dropped
    ds = load_preferences(rows)
    out, stats = tokenize_preferences(ds, tok, max_length=6, max_prompt_length=6, chat_template=False)
    assert stats == {"kept": 1, "dropped_empty": 2, "truncated_prompt": 0, "truncated_response": 0}
    assert list(out["row"]) == [1]  # the prompts of rows 0 and 2 fill all 6 positions: no response token is left
    out, stats = tokenize_preferences(ds, tok, max_length=10, max_prompt_length=6, chat_template=False)
    assert stats == {"kept": 3, "dropped_empty": 0, "truncated_prompt": 2, "truncated_response": 1}
    first = out[0]
    assert first["row"] == 0 and first["prompt_len"] == 6
    assert tok.decode(first["chosen_input_ids"][:6]) == "456789"  # the prompt keeps its end (and loses its BOS)
    assert tok.decode(first["chosen_input_ids"][6:]) == "abc" + tok.eos_token  # 4 tokens fit: EOS kept
    assert tok.decode(first["rejected_input_ids"][6:]) == "abcd"  # cut from the right, no EOS
    assert len(first["rejected_labels"]) == 10 and first["rejected_labels"][:6] == [-100] * 6
    assert out[1]["chosen_input_ids"] == [tok.bos_token_id] + tok.encode("xya", add_special_tokens=False) + [
        tok.eos_token_id]


def test_defaults_match_simpo(toks):
    import inspect
    params = inspect.signature(tokenize_preferences).parameters
    assert params["max_length"].default == 2048 and params["max_prompt_length"].default == 1800


# ------------------------------------------------------------------------------------------------- bad input

GOOD = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."}
CONV = {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Bye."}]}
BAD_ROWS = {  # name: (row 1 of a file whose row 0 is fine, the field the error must name, words it must contain)
    "missing field": ({"prompt": "Hi?", "rejected": "Bye."}, "chosen", "missing"),
    "wrong type": ({**GOOD, "chosen": 3}, "chosen", "int"),
    "empty prompt": ({**GOOD, "prompt": "  "}, "prompt", "empty"),
    "empty response": ({**GOOD, "rejected": ""}, "rejected", "empty"),
    "string and list mixed": ({**GOOD, "chosen": [{"role": "assistant", "content": "Hello."}]}, "chosen", "list"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_bad_rows_name_file_row_field(case, tmp_path):
    bad, field, words = BAD_ROWS[case]
    path = write_jsonl(tmp_path / "pairs.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError, match=rf"pairs\.jsonl row 1, field '{field}': .*{words}"):
        load_preferences(path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=rf"<in-memory> row 1, field '{field}': .*{words}"):
        load_preferences([GOOD, bad, GOOD])  # Arrow would refuse the mixed list before naming the row


def test_conversations_whose_prompts_differ(tmp_path):
    other = {**CONV, "prompt": None, "chosen": CONV["prompt"] + CONV["chosen"],
             "rejected": [{"role": "user", "content": "Hello?"}] + CONV["rejected"]}
    path = write_jsonl(tmp_path / "conv.jsonl", [CONV, other])
    with pytest.raises(DataError, match=r"conv\.jsonl row 1, field 'rejected': .*differs"):
        load_preferences(path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"row 0, field 'chosen': the last message must be an assistant turn"):
        load_preferences([{**CONV, "chosen": CONV["prompt"]}])


@pytest.mark.parametrize("text", [b"Hel\xff\xfelo", b"\xff"])  # Arrow keeps the first, refuses the second
def test_invalid_utf8(tmp_path, text):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "Hi?", "chosen": "' + text + b'", "rejected": "x"}\n')
    with pytest.raises(DataError, match=r"bytes\.jsonl row 1, field 'chosen': invalid UTF-8"):
        load_preferences(str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"row 0, field 'rejected': .*not valid UTF-8"):
        load_preferences([{**GOOD, "rejected": b"Bye\xff".decode("utf-8", "surrogateescape")}])


def test_missing_file_and_no_shared_prefix(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file does not exist"):
        load_preferences(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match=r"row 0, field 'prompt': .*no prefix"):
        load_preferences([{"chosen": "Yes", "rejected": "No"}])


def test_skip_bad_rows_counts_and_prints(tmp_path, capsys):
    rows = [GOOD, {**GOOD, "chosen": 3}, GOOD, {**GOOD, "prompt": ""}, GOOD]
    ds = load_preferences(write_jsonl(tmp_path / "p.jsonl", rows), cache_dir=str(tmp_path / "c"), skip_bad_rows=True)
    assert list(ds["row"]) == [0, 2, 4]
    printed = capsys.readouterr().out
    assert "skipped 2 bad rows of 5" in printed and "row 1, field 'chosen'" in printed
    assert "row 3, field 'prompt'" in printed
    with pytest.raises(DataError, match="no valid rows"):
        load_preferences([{**GOOD, "chosen": 3}], skip_bad_rows=True)


@pytest.mark.parametrize("text", [b"Hel\xff\xfelo", b"\xff"])
def test_skip_bad_rows_skips_invalid_utf8_and_a_cut_off_last_line(tmp_path, capsys, text):
    """--skip_bad_rows used to stop at invalid UTF-8 and at a last line cut off by a kill, which the README says it
    skips; both are now bad rows like any other, counted and named."""
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b'\n{"prompt": "Hi?", "chosen": "' + text + b'", "rejected": "x"}\n'
                     + json.dumps(GOOD).encode() + b'\n{"prompt": "Hi?", "chosen": "a", "rej')
    ds = load_preferences(str(path), cache_dir=str(tmp_path / "c"), skip_bad_rows=True)
    assert list(ds["row"]) == [0, 2]
    printed = capsys.readouterr().out
    assert "skipped 2 bad rows of 4" in printed and "row 1, field 'chosen'" in printed and "UTF-8" in printed
    assert "row 3, field '<row>': invalid JSON" in printed
    with pytest.raises(DataError, match=r"bytes\.jsonl row 1, field 'chosen': invalid UTF-8"):
        load_preferences(str(path), cache_dir=str(tmp_path / "c2"))  # without the flag: the first bad row, named


def test_an_empty_file_says_so(tmp_path):
    for text in ("", "\n  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty$"):
            load_preferences(str(tmp_path / "empty.jsonl"), cache_dir=str(tmp_path / "c"))


def test_chosen_equal_rejected_warns():
    with pytest.warns(UserWarning, match="2 pairs have chosen == rejected"):
        ds = load_preferences([GOOD, {**GOOD, "rejected": "Hello."}, {**GOOD, "rejected": "Hello."}])
    assert len(ds) == 3


def test_check_command(world, tmp_path, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD, {**GOOD, "chosen": 3}, {**GOOD, "prompt": "x" * 50}])
    cache = ["--cache-dir", str(tmp_path / "cache")]
    assert data.main(["check", path] + cache) == 1
    assert "row 1, field 'chosen'" in capsys.readouterr().err
    assert data.main(["check", path, "--skip-bad-rows", "--tokenizer", world["tokenizer_char"], "--max-length", "30",
                      "--max-prompt-length", "30"] + cache) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad rows of 3" in out and "2 valid pairs" in out and '"dropped_empty": 1' in out


# -------------------------------------------------------------------------------------------------- loading

def test_file_formats_load_the_same(tmp_path):
    rows = [{**GOOD, "score": i, "chosen_key_spans": [[0, 5]]} for i in range(3)]
    ref = datasets.Dataset.from_list(rows)
    paths = {"jsonl": write_jsonl(tmp_path / "p.jsonl", rows), "parquet": str(tmp_path / "p.parquet")}
    (tmp_path / "p.json").write_text(json.dumps(rows))
    paths["json"] = str(tmp_path / "p.json")
    ref.to_parquet(paths["parquet"])
    ref.save_to_disk(str(tmp_path / "flat"))
    datasets.DatasetDict({"train": ref.select([0]), "test": ref}).save_to_disk(str(tmp_path / "dict"))
    paths["folder"], paths["dict folder"] = str(tmp_path / "flat"), str(tmp_path / "dict")
    for name, path in paths.items():
        ds = load_preferences(path, split="test", cache_dir=str(tmp_path / "cache"))
        assert ds.to_list() == [{**r, "row": i} for i, r in enumerate(rows)], name
    with pytest.raises(DataError, match="no split 'valid'"):
        load_preferences(paths["dict folder"], split="valid")


def test_tokenization_is_cached_and_resumable(world, toks, tmp_path):
    """Same data, tokenizer and lengths -> the same cache files; a lost shard is redone, the other re-used."""
    def run():
        ds = load_preferences(world["test"], cache_dir=str(tmp_path), num_proc=2)
        assert list(ds["row"]) == list(range(200))  # row indices stay global across the checking shards
        return tokenize_preferences(ds, toks["bpe"], num_proc=2)

    out, stats = run()
    files = [f["filename"] for f in out.cache_files]
    assert len(files) == 2 and all(f.startswith(str(tmp_path)) for f in files) and stats["kept"] == 200
    mtime = os.path.getmtime(files[0])
    os.remove(files[1])  # as if the run had been killed before the second shard was written
    again, _ = run()
    assert [f["filename"] for f in again.cache_files] == files and os.path.getmtime(files[0]) == mtime
    assert again.to_list() == out.to_list()


# ------------------------------------------------------------------------------------------------- collator

def test_collate_pairs_right_and_left(toks):
    tok = toks["bpe"]
    ds = load_preferences([{**GOOD, "chosen_key_spans": [[0, 5]], "rejected_key_spans": [[0, 3]]},
                           {"prompt": "A much longer question here?", "chosen": "Yes indeed.", "rejected": "No.",
                            "chosen_key_spans": [[0, 3]], "rejected_key_spans": [[0, 2]]}])
    rows = list(tokenize_preferences(ds, tok)[0])
    for r in rows:  # a float per-token field, as score.py's scores
        r["chosen_score"] = [0.5 * i for i in range(len(r["chosen_input_ids"]))]
        r["rejected_score"] = [-1.0] * len(r["rejected_input_ids"])
    order = [(r, s) for s in ("chosen", "rejected") for r in rows]  # chosen rows first
    T = max(len(r[f"{s}_input_ids"]) for r, s in order)
    for side in ("right", "left"):
        b = collate_pairs(rows, tok.pad_token_id, token_fields=("key", "score"), pad_side=side)
        assert b["input_ids"].shape == b["attention_mask"].shape == b["labels"].shape == b["key"].shape == (4, T)
        assert b["input_ids"].dtype == b["key"].dtype == torch.long and b["score"].dtype == torch.float32
        for k, (r, s) in enumerate(order):
            n = len(r[f"{s}_input_ids"])
            real = slice(0, n) if side == "right" else slice(T - n, T)
            pad = slice(n, T) if side == "right" else slice(0, T - n)
            assert b["input_ids"][k, real].tolist() == r[f"{s}_input_ids"]
            assert b["labels"][k, real].tolist() == r[f"{s}_labels"]
            assert b["key"][k, real].tolist() == r[f"{s}_key"] and b["score"][k, real].tolist() == r[f"{s}_score"]
            assert (b["input_ids"][k, pad] == tok.pad_token_id).all() and (b["labels"][k, pad] == -100).all()
            assert b["attention_mask"][k].sum() == n and (b["key"][k, pad] == 0).all()
        # the key field selects the same tokens as the ids it is aligned with
        assert tok.decode(b["input_ids"][0][b["key"][0] == 1]) == "Hello"
    b = collate_pairs(rows, tok.pad_token_id, pad_to_multiple_of=8)
    assert b["input_ids"].shape == (4, -(-T // 8) * 8)
    rows[0]["chosen_key"] = rows[0]["chosen_key"][:-1]
    with pytest.raises(ValueError, match="not aligned"):
        collate_pairs(rows, tok.pad_token_id, token_fields=("key",))


# ---------------------------------------------------------------------------------------- key masks, offsets

@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_key_masks_select_the_key_tokens(test_pairs, toks, kind):
    tok, ds = toks[kind], test_pairs
    out, _ = tokenize_preferences(ds.select(range(100)), tok, offsets=True)
    for pair, row in zip(ds.select(range(100)), out):
        for side in ("chosen", "rejected"):
            (s, e), = pair[f"{side}_key_spans"]
            key = row[f"{side}_key"]
            assert len(key) == len(row[f"{side}_input_ids"]) and sum(key) >= 1
            picked = tok.decode([i for i, k in zip(row[f"{side}_input_ids"], key) if k])
            assert picked.strip() == pair[side][s:e]  # a BPE token may carry the space before the word
            # offsets: the response tokens tile the response text exactly; prompt, template and EOS get [-1, -1]
            offs = row[f"{side}_offsets"]
            assert all(o == [-1, -1] for o in offs[:row["prompt_len"]]) and offs[-1] == [-1, -1]
            assert "".join(pair[side][a:b] for a, b in offs if a >= 0) == pair[side]
            assert all(tok.decode([i]) == pair[side][a:b] for i, (a, b) in zip(row[f"{side}_input_ids"], offs)
                       if a >= 0)


def test_micro_batches_grouped_by_length_cover_the_same_pairs_with_less_padding():
    """--group_by_length: each rank's share of a step is sorted by length (longest first) before it is cut into
    micro-batches: the step covers the same pairs on every rank, and the padding shrinks."""
    import random
    from data import epoch_order, rank_micro_batches
    rng = random.Random(0)
    lengths = [rng.randint(5, 400) for _ in range(64)]
    order = epoch_order(64, 3, 0)
    for world in (1, 2):
        for step in (0, 1, 2):
            plain = [rank_micro_batches(order, step, 4, 16, 2, r, world) for r in range(world)]
            grouped = [rank_micro_batches(order, step, 4, 16, 2, r, world, lengths) for r in range(world)]
            for a, b in zip(plain, grouped):  # per rank: the same pairs, sorted longest first
                assert sorted(i for m in a for i in m) == sorted(i for m in b for i in m)
                flat = [i for m in b for i in m]
                assert [lengths[i] for i in flat] == sorted((lengths[i] for i in flat), reverse=True)
            pad = lambda parts: sum(len(m) * max(lengths[i] for i in m) - sum(lengths[i] for i in m)  # noqa: E731
                                    for micro in parts for m in micro)
            assert pad(grouped) < pad(plain)
    assert epoch_order(64, 3, 0) == order and epoch_order(64, 3, 1) != order  # seeded by (seed, epoch)
