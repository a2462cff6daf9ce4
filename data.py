"""Preference data: load and check pairs, tokenize them with response masks, batch them.

Top to bottom: 1. load_preferences: any source (JSONL / JSON / Parquet file, `save_to_disk` folder, hub name,
in-memory rows) and any of TRL's three forms -> one explicit-prompt layout, every row checked; 2.
tokenize_preferences: prompt ids + response ids, labels -100 on the prompt, TRL/SimPO truncation, a cached `map`; 3.
batches: chosen and rejected rows in one padded batch, an epoch's order, each rank's micro-batches; 4. the command
line: `python data.py check FILE [--form auto] [--skip_bad_rows] [--tokenizer PATH]`.

TRL conventions followed (trl.data_utils, DPOTrainer.tokenize_row):
  - standard form: `prompt`, `chosen`, `rejected` strings; conversational form: lists of {role, content} messages,
    either with an explicit `prompt` or with the whole conversation in `chosen`/`rejected` (UltraFeedback-binarized);
    implicit prompt: only `chosen`/`rejected` strings whose shared prefix is the prompt (Anthropic HH-RLHF).
  - with a chat template the prompt is `apply_chat_template(prompt, add_generation_prompt=True)` and the response is
    the rendered conversation minus that prefix; prompt and response are tokenized separately and concatenated.
  - the response ends with exactly one EOS; labels are -100 on the prompt and equal to the ids on the response.
  - truncation keeps the end of the prompt and the start of each response (truncation_mode="keep_end").
Where TRL leaves room, each choice is commented at its line (docs/data.md lists them). Repo-wide convention:
response tokens (the final EOS included) are the positions where labels != -100.
"""
import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import re
import sys
import warnings


FORMS = ("auto", "standard", "conversational", "implicit")  # (utils.FORMS: data.py imports nothing of the project)


def command_line():
    """`python data.py check`'s flags, in both spellings (--skip_bad_rows, --skip-bad-rows), before slow imports."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a preference dataset and print kept/dropped counts")
    check.add_argument("file")
    check.add_argument("--form", default="auto", choices=FORMS)
    check.add_argument("--skip_bad_rows", "--skip-bad-rows", action="store_true")
    check.add_argument("--cache_dir", "--cache-dir", help="datasets cache folder (default: the Hugging Face cache)")
    check.add_argument("--tokenizer", help="also tokenize with this tokenizer and print the truncation counts")
    check.add_argument("--max_length", "--max-length", type=int, default=2048)
    check.add_argument("--max_prompt_length", "--max-prompt-length", type=int, default=1800)
    return parser


if __name__ == "__main__":
    command_line().parse_args()  # --help and a mistyped flag answer here, before datasets and torch load

import datasets  # noqa: E402
import torch  # noqa: E402

IGNORE = -100  # label of prompt and padding positions (PyTorch's cross-entropy ignore_index)


class DataError(ValueError):
    """Bad input data; the message names the file (or "<in-memory>"), the 0-based row and the field. A user's
    mistake: the scripts report it in one line (utils.cli reads `user_error`)."""
    user_error = True


# ------------------------------------------------------------------------------------------------- 1. loading

class _BadLine:
    """A line of a JSON Lines file that is not JSON (a cut-off last line, garbage): a bad row like any other."""

    def __init__(self, reason):
        self.reason = reason


def _read_source(source, split, cache_dir, skip_bad_rows=False):
    """-> (datasets.Dataset or list of rows, name used in error messages). A local JSON file that Arrow refuses
    (invalid JSON, invalid UTF-8) names its bad row, or with skip_bad_rows is read line by line in Python, its bad
    lines kept as _BadLine rows for the caller to skip and count."""
    if isinstance(source, datasets.Dataset):
        return source, "<in-memory>"
    if isinstance(source, (list, tuple)):
        return list(source), "<in-memory>"
    path = os.fspath(source)
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except FileNotFoundError as e:
            raise DataError(f"{path}: not a folder written by Dataset.save_to_disk ({e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{path}: no split '{split}' (has {sorted(ds)})")
            ds = ds[split]
        return ds, path
    ext = path.lower().rsplit(".", 1)[-1]
    builder = {"jsonl": "json", "json": "json", "parquet": "parquet"}.get(ext)
    if builder is None and not os.path.exists(path):
        try:  # not a local path: a hub dataset name
            return datasets.load_dataset(path, split=split, cache_dir=cache_dir), path
        except Exception as e:
            raise DataError(f"{path}: not a local file or folder, and loading it as a hub dataset failed: {e}") from e
    if not os.path.isfile(path):
        raise DataError(f"{path}: file does not exist")
    if builder is None:
        raise DataError(f"{path}: unknown file type (expected .jsonl, .json or .parquet)")
    if builder == "json":
        with open(path, "rb") as fh:
            if not fh.read(1 << 16).strip() and os.path.getsize(path) < 1 << 16:
                raise DataError(f"{path}: the file is empty")
    json_log = logging.getLogger("datasets.packaged_modules.json.json")
    level = json_log.level
    try:
        # A local file is one split by itself: `split` is ignored. The JSON reader's own complaint is silenced: a
        # bad file gets one message, naming the row, from _locate_bad_json below.
        json_log.setLevel(logging.CRITICAL)
        ds = datasets.load_dataset(builder, data_files=path, split="train", cache_dir=cache_dir)
        # Arrow's JSON reader may keep invalid UTF-8 inside strings, to fail later when a row is read: check now.
        ds.data.table.validate(full=True)
        return ds, path
    except Exception as e:  # Arrow's errors name neither the row nor the field: find them ourselves
        if skip_bad_rows and builder == "json" and path.lower().endswith(".jsonl"):
            return _json_lines(path), path
        raise _locate_bad_json(path, builder) or DataError(f"{path}: could not be read: {reason_of(e)}") from e
    finally:
        json_log.setLevel(level)


def reason_of(e):
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _json_lines(path):
    """The rows of a JSON Lines file read in Python: invalid bytes become lone surrogates (which the row checks
    refuse as invalid UTF-8), lines that are not JSON become _BadLine rows."""
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")
    rows = []
    for line in (l for l in text.splitlines() if l.strip()):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(_BadLine(f"invalid JSON: {e}"))
    return rows


def _locate_bad_json(path, builder):
    """Re-read a JSON/JSONL file that Arrow refused, to name the row and field of invalid UTF-8 or invalid JSON."""
    if builder != "json":
        return None
    with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="surrogateescape")  # bad bytes become lone surrogates
    try:
        rows = json.loads(text)
        rows = rows if isinstance(rows, list) else [rows]
    except json.JSONDecodeError:
        rows = _json_lines(path)  # one row per line: the first bad one, in file order, is named
    for i, row in enumerate(rows):
        if isinstance(row, _BadLine):
            return DataError(f"{path} row {i}: {row.reason}")
        if not isinstance(row, dict):
            return DataError(f"{path} row {i}, field '<row>': expected a JSON object with prompt, chosen and "
                             f"rejected, got {type(row).__name__} {json.dumps(row)[:80]}")
        for field, value in row.items():
            if re.search("[\udc80-\udcff]", json.dumps(value, ensure_ascii=False)):
                return DataError(f"{path} row {i}, field '{field}': invalid UTF-8 bytes")
    return None


def _text(value, field, form):
    """Check one string field of a row and return it; raise DataError("field ...") otherwise."""
    if value is None:
        raise DataError(f"field '{field}': missing")
    if not isinstance(value, str):
        raise DataError(f"field '{field}': expected a string ({form} form), got {type(value).__name__}")
    try:
        value.encode("utf-8")  # lone surrogates: text that was decoded with errors="surrogateescape" upstream
    except UnicodeEncodeError:
        raise DataError(f"field '{field}': text is not valid UTF-8") from None
    if not value.strip():
        raise DataError(f"field '{field}': empty")
    return value


def _messages(value, field):
    """Check a list of {role, content} messages; return it reduced to those two keys."""
    if value is None:
        raise DataError(f"field '{field}': missing")
    if not isinstance(value, list):
        raise DataError(f"field '{field}': expected a list of messages (conversational form), "
                        f"got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"field '{field}': message {k} is not a dict with string 'role' and 'content'")
        try:
            m["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise DataError(f"field '{field}': message {k} is not valid UTF-8") from None
        out.append({"role": m["role"], "content": m["content"]})
    return out


def split_implicit(chosen, rejected):
    """Index where the responses start in an implicit-prompt pair (prompt = chosen[:index] = rejected[:index]).

    Rule: take the longest common prefix of the two strings; if it contains "\\n\\nAssistant:" (HH-RLHF), cut right
    after the last one; otherwise cut at its last whitespace character, which then starts the response (" word", as
    TRL's extract_prompt and GPT-style tokenizers do). So a response never starts in the middle of a word.
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    common = chosen[:n]
    marker = common.rfind("\n\nAssistant:")
    if marker >= 0:
        return marker + len("\n\nAssistant:")
    spaces = [m.start() for m in re.finditer(r"\s", common)]
    return spaces[-1] if spaces else 0


def _to_explicit(ex, form):
    """One raw row -> (prompt, chosen, rejected) in the explicit-prompt layout; raises DataError("field ...")."""
    if form == "standard":
        return tuple(_text(ex.get(f), f, form) for f in ("prompt", "chosen", "rejected"))
    if form == "implicit":
        chosen, rejected = _text(ex.get("chosen"), "chosen", form), _text(ex.get("rejected"), "rejected", form)
        cut = split_implicit(chosen, rejected)
        if not chosen[:cut].strip():
            raise DataError("field 'prompt': chosen and rejected share no prefix to use as the prompt")
        for field, text in (("chosen", chosen), ("rejected", rejected)):
            _text(text[cut:], field, "implicit")  # a response that is empty once the prompt is removed
        return chosen[:cut], chosen[cut:], rejected[cut:]
    # Conversational: the prompt is every message before the final assistant turn, which must be shared.
    chosen, rejected = _messages(ex.get("chosen"), "chosen"), _messages(ex.get("rejected"), "rejected")
    prompt = ex.get("prompt")
    if isinstance(prompt, str) and len(chosen) == 1:  # string prompt with message responses
        prompt = [{"role": "user", "content": _text(prompt, "prompt", "standard")}]
    elif isinstance(prompt, str) or prompt is None:  # UltraFeedback: the prompt string repeats chosen[0]
        prompt = []
    else:
        prompt = _messages(prompt, "prompt")
    for field, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"field '{field}': the last message must be an assistant turn")
        if not msgs[-1]["content"].strip():
            raise DataError(f"field '{field}': empty response")
    if chosen[:-1] != rejected[:-1]:
        raise DataError("field 'rejected': the conversation before the final assistant turn differs from chosen's")
    prompt = prompt + chosen[:-1]
    if not any(m["content"].strip() for m in prompt):
        raise DataError("field 'prompt': empty")
    return prompt, chosen[-1:], rejected[-1:]


def _explicit_row(ex, idx, form):
    """`datasets.map` function: the converted row plus `_error` ("" when fine) and `_same` (chosen == rejected)."""
    try:
        prompt, chosen, rejected = _to_explicit(ex, form)
    except DataError as e:
        return {"prompt": None, "chosen": None, "rejected": None, "row": idx, "_error": f"row {idx}, {e}",
                "_same": False}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "row": idx, "_error": "",
            "_same": chosen == rejected}


def _not_a_row(ex, i):
    if isinstance(ex, _BadLine):
        return f"row {i}, field '<row>': {ex.reason}"
    return f"row {i}, field '<row>': expected a dict, got {type(ex).__name__}"


def _report_bad(errors, name, skip_bad_rows):
    """The rows' errors ("" when fine) -> the bad ones: the first raised as a DataError, or with skip_bad_rows
    counted and printed (every row bad is an error either way)."""
    bad = [e for e in errors if e]
    if bad and not skip_bad_rows:
        raise DataError(f"{name} {bad[0]}")
    if len(bad) == len(errors):
        raise DataError(f"{name}: no valid rows ({bad[0]})")
    if bad:
        print(f"{name}: skipped {len(bad)} bad rows of {len(errors)}; first reasons:")
        for reason in bad[:5]:
            print(f"  {name} {reason}")
    return bad


def _detect_form(rows):
    """First row with a `chosen`: messages -> conversational; else standard if there is a prompt, else implicit."""
    for ex in rows:
        if ex.get("chosen") is not None:
            if isinstance(ex["chosen"], list):
                return "conversational"
            return "standard" if ex.get("prompt") is not None else "implicit"
    return "standard"


def load_preferences(source, split="train", form="auto", cache_dir=None, skip_bad_rows=False, num_proc=1):
    """Load preference pairs from any source into TRL's explicit-prompt layout, checking every row.

    source: .jsonl / .json / .parquet path (one split), a `save_to_disk` folder, a hub dataset name, a
        datasets.Dataset or a list of dicts. form: "auto" | "standard" | "conversational" | "implicit".
    Returns a Dataset with `prompt`, `chosen`, `rejected` (strings; or for conversations: the prompt messages and
    a one-message list holding the final assistant turn), `row` (0-based index in the source) and every other
    original column. Bad rows raise DataError (file, row, field) or, with skip_bad_rows, are skipped and counted.
    Every row is checked in Python: Arrow silently turns a column mixing strings and lists into a `Json` column.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    data, name = _read_source(source, split, cache_dir, skip_bad_rows)
    if len(data) == 0:
        raise DataError(f"{name}: no rows")
    if form == "auto":
        form = _detect_form([ex for ex in data[:100] if isinstance(ex, dict)] if isinstance(data, list) else
                            data.select(range(min(len(data), 100))))
    if isinstance(data, list):  # Arrow would refuse mixed types before we could name the row: check in Python
        rows = [{**ex, **_explicit_row(ex, i, form)} if isinstance(ex, dict) else {"_error": _not_a_row(ex, i)}
                for i, ex in enumerate(data)]
        errors = [r["_error"] for r in rows]
    else:
        ds = data.map(_explicit_row, with_indices=True, fn_kwargs={"form": form}, desc="checking rows",
                      num_proc=num_proc if num_proc > 1 else None)
        errors = list(ds["_error"])
    bad = _report_bad(errors, name, skip_bad_rows)
    if isinstance(data, list):
        ds = datasets.Dataset.from_list([r for r in rows if not r["_error"]])
    elif bad:
        ds = ds.select([i for i, e in enumerate(errors) if not e])
    same = sum(ds["_same"])
    if same:
        warnings.warn(f"{name}: {same} pairs have chosen == rejected (kept; they carry no preference signal)")
    return ds.remove_columns(["_error", "_same"])


def _prompt_row(ex, idx):
    """`datasets.map` function for prompt data: the checked prompt (a string, or messages that end before an
    assistant turn), `row`, and `_error` ("" when fine)."""
    value = ex.get("prompt")
    try:
        if isinstance(value, list):
            value = _messages(value, "prompt")
            if not value or value[-1]["role"] == "assistant" or not any(m["content"].strip() for m in value):
                raise DataError("field 'prompt': a conversation must be non-empty and end before an assistant turn")
        else:
            value = _text(value, "prompt", "standard")
    except DataError as e:
        return {"prompt": None, "row": idx, "_error": f"row {idx}, {e}"}
    return {"prompt": value, "row": idx, "_error": ""}


def load_prompts(source, split="train", form="auto", cache_dir=None, skip_bad_rows=False):
    """Prompts to sample responses for -> Dataset with `prompt` (a string, or a list of {role, content} messages)
    and `row` (0-based index in the source). A `prompt` column is read as it is; preference data (with `chosen`
    and `rejected`) go through load_preferences, whose prompts are kept and responses dropped. Bad rows raise
    DataError (file, row, field) or, with skip_bad_rows, are skipped and counted."""
    data, name = _read_source(source, split, cache_dir, skip_bad_rows)
    if len(data) == 0:
        raise DataError(f"{name}: no rows")
    rows = data[:100] if isinstance(data, list) else data.select(range(min(len(data), 100)))
    if any(isinstance(ex, dict) and ex.get("chosen") is not None for ex in rows):  # preference data
        ds = load_preferences(source, split=split, form=form, cache_dir=cache_dir, skip_bad_rows=skip_bad_rows)
        return ds.select_columns(["prompt", "row"])
    checked = [_prompt_row(ex, i) if isinstance(ex, dict) else {"_error": _not_a_row(ex, i)}
               for i, ex in enumerate(data)]
    _report_bad([r["_error"] for r in checked], name, skip_bad_rows)
    good = [{"prompt": r["prompt"], "row": r["row"]} for r in checked if not r["_error"]]
    kind = lambda r: "conversation" if isinstance(r["prompt"], list) else "string"  # noqa: E731
    other = next((r for r in good if kind(r) != kind(good[0])), None)
    if other is not None:
        raise DataError(f"{name} row {other['row']}, field 'prompt': a {kind(other)}, while row {good[0]['row']} holds "
                        f"a {kind(good[0])}: one form per file")
    return datasets.Dataset.from_list(good)


# -------------------------------------------------------------------------------------------- 2. tokenizing

def render_prompt(prompt, tokenizer, use_template):
    """The text a model continues with its response: the chat template's rendering with the generation prompt (a
    string prompt is one user turn), or without a template the string itself ("role: content" lines for a
    conversation)."""
    if not use_template:
        if isinstance(prompt, list):  # plain rendering of a conversation for tokenizers without a template
            return "".join(f"{m['role']}: {m['content']}\n\n" for m in prompt) + "assistant: "
        return prompt
    messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompt(prompt_text, tokenizer, max_prompt_length):
    """The prompt's token ids as training sees them -> (ids, truncated): BOS first (unless the template already
    starts with it), then its last max_prompt_length tokens."""
    ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and ids[:1] != [tokenizer.bos_token_id]:  # the template may start with BOS
        ids = [tokenizer.bos_token_id] + ids
    # NOTE(deviation): TRL <= 0.11 / SimPO cut the prompt only when the pair overflowed max_length; we always
    # keep the last max_prompt_length prompt tokens (newer TRL), then cut responses to fit in max_length.
    truncated = len(ids) > max_prompt_length  # a prompt cut from the left loses its BOS, as in TRL
    return (ids[-max_prompt_length:] if truncated else ids), truncated


def _render(prompt, response, tokenizer, use_template):
    """One pair side -> (prompt_text, response_text, content, content_start).

    response_text is what the model must generate after prompt_text, without the final EOS (added as an id);
    content is the response as written in the data (the string, or the final assistant message's content) and
    content_start its index in response_text (-1 if the template altered it).
    """
    content = response[-1]["content"] if isinstance(prompt, list) else response
    prompt_text = render_prompt(prompt, tokenizer, use_template)
    if not use_template:
        return prompt_text, content, content, 0
    if not isinstance(prompt, list):  # NOTE(deviation): TRL leaves strings untemplated; we wrap them as one turn each
        prompt, response = [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}]
    full = tokenizer.apply_chat_template(prompt + response, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError("the chat template renders the prompt differently once the response follows")
    text = full[len(prompt_text):]
    start = text.find(content)
    end = start + len(content) if start >= 0 else 0
    # The turn ends at the first EOS after the content: cut it (re-added as an id) and whatever the template renders
    # after it (ChatML's "\n"). A template whose end-of-turn token is not the EOS (Llama-3's <|eot_id|> with
    # eos <|end_of_text|>) keeps that token, minus trailing whitespace, and gets the EOS after it: generation can
    # then stop on either, and every response still ends with exactly one EOS.
    eot = text.find(tokenizer.eos_token, end)
    text = text[:eot] if eot >= 0 else text[:end] + text[end:].rstrip()
    return prompt_text, text, content, start


def _tokenize_batch(batch, tokenizer, max_length, max_prompt_length, use_template, offsets):
    """Batched `datasets.map` function: see tokenize_preferences. Drops pairs left with an empty response."""
    keys = "chosen_key_spans" in batch
    need_offsets = offsets or keys
    eos = tokenizer.eos_token_id
    out = {k: [] for k in ("row", "prompt_len", "_trunc_prompt", "_trunc_response")}
    for i in range(len(batch["row"])):
        sides = {}
        for side in ("chosen", "rejected"):  # prompt_text comes out the same from both sides
            prompt_text, text, content, start = _render(batch["prompt"][i], batch[side][i], tokenizer, use_template)
            enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=need_offsets)
            if need_offsets and start < 0:
                raise DataError(f"row {batch['row'][i]}, field '{side}': the chat template alters the response "
                                f"text, so its character offsets are unknown")
            # Offsets within `content`: the part of each token inside it, [-1, -1] outside (template tokens, EOS).
            spans = [[max(s, start) - start, min(e, start + len(content)) - start] for s, e in
                     enc["offset_mapping"]] if need_offsets else []
            spans = [sp if sp[1] > sp[0] else [-1, -1] for sp in spans] + [[-1, -1]]
            sides[side] = (enc["input_ids"] + [eos], spans)
        prompt_ids, trunc_prompt = encode_prompt(prompt_text, tokenizer, max_prompt_length)
        budget = max_length - len(prompt_ids)
        if budget <= 0:
            continue  # both responses would be empty: drop the pair
        # A response cut from the right keeps no EOS, as in TRL and SimPO: the model is not taught to stop there.
        out["_trunc_response"].append(any(len(sides[s][0]) > budget for s in sides))
        out["_trunc_prompt"].append(trunc_prompt)
        out["row"].append(batch["row"][i])
        out["prompt_len"].append(len(prompt_ids))
        for side, (ids, spans) in sides.items():
            ids, spans = ids[:budget], spans[:budget]
            n = len(prompt_ids)
            out.setdefault(f"{side}_input_ids", []).append(prompt_ids + ids)
            out.setdefault(f"{side}_labels", []).append([IGNORE] * n + ids)
            if offsets:
                out.setdefault(f"{side}_offsets", []).append([[-1, -1]] * n + spans)
            if keys:  # 1 where a response token's character span overlaps a [start, end) key span
                key_spans = batch[f"{side}_key_spans"][i] or []
                key = [int(s >= 0 and any(s < b and a < e for a, b in key_spans)) for s, e in spans]
                out.setdefault(f"{side}_key", []).append([0] * n + key)
    return out


def tokenizer_hash(tokenizer):
    """A stable hash of everything in the tokenizer that changes the ids (datasets' own hash of it is not stable)."""
    state = (tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False)
             else json.dumps(sorted(tokenizer.get_vocab().items())))
    extra = [type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token]
    return hashlib.sha256((state + json.dumps(extra)).encode()).hexdigest()


def tokenize_preferences(ds, tokenizer, max_length=2048, max_prompt_length=1800, num_proc=1, offsets=False,
                         chat_template=None):
    """Tokenize explicit-prompt pairs (the output of load_preferences) once, with a cached, resumable `map`.

    Per pair: `row`, `prompt_len`, `chosen_input_ids` / `rejected_input_ids` (prompt ids + response ids, the
    response ending with one EOS unless truncated), `chosen_labels` / `rejected_labels` (-100 on the prompt).
    With `chosen_key_spans` / `rejected_key_spans` in ds: `chosen_key` / `rejected_key`, 0/1 per token, 1 on
    response tokens overlapping a key span. offsets=True: `chosen_offsets` / `rejected_offsets`, per token
    [start, end) in the response text, [-1, -1] on prompt, template and EOS tokens.
    chat_template: None uses the tokenizer's template if it has one; False forces plain concatenation.
    Returns (dataset, {"kept", "dropped_empty", "truncated_prompt", "truncated_response"}); the truncation counts
    are numbers of kept pairs.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token: every response must end with one")
    use_template = bool(getattr(tokenizer, "chat_template", None)) if chat_template is None else bool(chat_template)
    if (offsets or "chosen_key_spans" in ds.column_names) and not getattr(tokenizer, "is_fast", False):
        raise ValueError("offsets and key masks need a fast tokenizer (return_offsets_mapping)")
    if num_proc > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers; avoids the tokenizers warning
    # A fingerprint fixed by the data, the tokenizer, the options and this code: the same call finds its cache
    # files again, and with num_proc > 1 re-uses every shard a killed run had finished.
    args = [ds._fingerprint, tokenizer_hash(tokenizer), max_length, max_prompt_length, use_template, offsets,
            inspect.getsource(_tokenize_batch), inspect.getsource(_render), inspect.getsource(render_prompt),
            inspect.getsource(encode_prompt)]
    fingerprint = hashlib.sha256(json.dumps(args).encode()).hexdigest()[:32]
    out = ds.map(_tokenize_batch, batched=True, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1
                 else None, new_fingerprint=fingerprint, desc="tokenizing",
                 fn_kwargs=dict(tokenizer=tokenizer, max_length=max_length, max_prompt_length=max_prompt_length,
                                use_template=use_template, offsets=offsets))
    if len(out) == 0:
        raise DataError(f"no pair keeps a non-empty response within max_length {max_length} and max_prompt_length "
                        f"{max_prompt_length} ({len(ds)} pairs, all dropped)")
    stats = {"kept": len(out), "dropped_empty": len(ds) - len(out), "truncated_prompt": sum(out["_trunc_prompt"]),
             "truncated_response": sum(out["_trunc_response"])}
    return out.remove_columns(["_trunc_prompt", "_trunc_response"]), stats


def pad_id(tokenizer):  # the id that pads a batch: the pad token, else the EOS (never attended to nor labelled)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def response_part(tok_row, side, field):
    """A per-token field of a tokenized pair (`<side>_<field>`, e.g. key flags or offsets), response tokens only."""
    return [x for x, lab in zip(tok_row[f"{side}_{field}"], tok_row[f"{side}_labels"]) if lab != IGNORE]


# ---------------------------------------------------------------------------------------------- 3. batching

def _as_list(x):
    return x.tolist() if hasattr(x, "tolist") else list(x)


def collate_pairs(rows, pad_token_id, token_fields=(), pad_side="right", pad_to_multiple_of=None):
    """Stack B tokenized pairs into one batch of 2B rows: chosen rows 0..B-1, rejected rows B..2B-1.

    Returns input_ids [2B, T] (padded with pad_token_id), attention_mask [2B, T], labels [2B, T] (-100 on prompt
    and padding), and per name f in token_fields a tensor f [2B, T] from `chosen_<f>` / `rejected_<f>` (float32
    if any value is a float, else long; padded with 0). T = longest row, rounded up to pad_to_multiple_of.
    pad_side="left" puts the padding first (generation, scoring).
    """
    if pad_side not in ("right", "left"):
        raise ValueError(f"pad_side must be 'right' or 'left', got {pad_side!r}")
    sides = [(r, "chosen") for r in rows] + [(r, "rejected") for r in rows]
    ids = [_as_list(r[f"{s}_input_ids"]) for r, s in sides]
    T = max(len(x) for x in ids)
    if pad_to_multiple_of:
        T = math.ceil(T / pad_to_multiple_of) * pad_to_multiple_of

    def pad(seqs, value):
        return [[value] * (T - len(x)) + x if pad_side == "left" else x + [value] * (T - len(x)) for x in seqs]

    batch = {"input_ids": torch.tensor(pad(ids, pad_token_id), dtype=torch.long),
             "attention_mask": torch.tensor(pad([[1] * len(x) for x in ids], 0), dtype=torch.long),
             "labels": torch.tensor(pad([_as_list(r[f"{s}_labels"]) for r, s in sides], IGNORE), dtype=torch.long)}
    for f in token_fields:
        vals = [_as_list(r[f"{s}_{f}"]) for r, s in sides]
        if any(len(v) != len(x) for v, x in zip(vals, ids)):
            raise ValueError(f"token field '{f}' is not aligned with input_ids (lengths differ)")
        is_float = any(isinstance(v, float) for row in vals for v in row)
        batch[f] = torch.tensor(pad(vals, 0), dtype=torch.float32 if is_float else torch.long)
    return batch


def collate_indices(ds, indices, pad_id, token_fields=(), refs=None):
    """collate_pairs of the pairs at `indices` (ds positions, in `index`); with `refs` ({position: (chosen,
    rejected) values over each response}: a reference's log-probs) `ref` holds them aligned with the labels."""
    rows = [ds[int(i)] for i in indices]
    batch = collate_pairs(rows, pad_id, token_fields=token_fields)
    batch["index"] = torch.tensor([int(i) for i in indices])
    if refs is not None:
        batch["ref"] = torch.zeros(batch["labels"].shape)
        for side, offset in ((0, 0), (1, len(rows))):  # responses follow the prompt (right padding)
            for j, (i, row) in enumerate(zip(indices, rows)):
                values = refs[int(i)][side]
                batch["ref"][offset + j, row["prompt_len"]:row["prompt_len"] + len(values)] = values
    return batch


def epoch_order(n_pairs, seed, epoch):  # a permutation seeded by (seed, epoch): the same on every rank and resume
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_pairs, generator=g).tolist()


def pair_lengths(ds):  # per tokenized pair, the longer of its two rows (what a batch of it is padded to)
    return [max(len(c), len(r)) for c, r in zip(ds["chosen_input_ids"], ds["rejected_input_ids"])]


def rank_micro_batches(order, step, steps_per_epoch, global_batch_size, micro_batch_size, rank, world, lengths=None):
    """This rank's micro-batches (lists of pair indices) at a global step: the global batch cut into contiguous
    per-rank slices, each into micro-batches. With `lengths` (pair_lengths) a rank's slice is sorted, longest first:
    the same pairs (the gradient changes only by summation order), less padding, the largest micro-batch first."""
    i = step % steps_per_epoch
    per_rank = global_batch_size // world
    mine = order[i * global_batch_size:(i + 1) * global_batch_size][rank * per_rank:(rank + 1) * per_rank]
    if lengths is not None:
        mine = sorted(mine, key=lambda j: -lengths[j])  # stable: equal lengths keep the epoch's order
    return [mine[j:j + micro_batch_size] for j in range(0, per_rank, micro_batch_size)]


# ---------------------------------------------------------------------------------------- 4. command line

def main(argv=None):
    args = command_line().parse_args(argv)
    try:
        ds = load_preferences(args.file, form=args.form, cache_dir=args.cache_dir, skip_bad_rows=args.skip_bad_rows)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{args.file}: {len(ds)} valid pairs")
    if args.tokenizer:
        from transformers import AutoTokenizer
        _, stats = tokenize_preferences(ds, AutoTokenizer.from_pretrained(args.tokenizer), args.max_length,
                                        args.max_prompt_length)
        print(json.dumps(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
