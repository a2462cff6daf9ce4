"""On-policy preference pairs, the papers' Instruct setting (SimPO's recipe, Meng et al. 2024): sample K responses
per prompt from the policy itself, score each with a reward model, keep the best as chosen and the worst as rejected.

    python onpolicy.py                   # the tiny world: its SFT model, training prompts and judge, offline
    torchrun --standalone --nproc_per_node 8 onpolicy.py --model meta-llama/Meta-Llama-3-8B-Instruct \
        --prompts HuggingFaceH4/ultrafeedback_binarized --split train_prefs \
        --reward Skywork/Skywork-Reward-Llama-3.1-8B-v0.2 --output_dir runs/llama3-onpolicy
    torchrun ... train.py --method confpo --model meta-llama/Meta-Llama-3-8B-Instruct \
        --data runs/llama3-onpolicy/pairs.jsonl ...

--reward is a sequence-classification reward model (its scalar output on the (prompt, response) rendered with its
own chat template) or a Python callable `module:function` / `path/to/file.py:function`, (prompt, response) -> float.
--samples FILE takes samples drawn elsewhere (vLLM, ...; docs/onpolicy.md has the format and a script) instead of
drawing them: they are scored, paired and written exactly as the policy's own.

Output folder:
    blocks/block_NNNNNN.jsonl  per block of prompts: every sample's text, token count, EOS flag and score (written
                               atomically: a killed run resumes at the first missing block)
    samples.jsonl              every sample: row, sample, prompt, response, score, n_tokens, ended
    pairs.jsonl                per kept prompt, in TRL's standard form (conversational when the prompts are): prompt,
                               chosen, rejected, chosen_score, rejected_score, row (+ key spans with --key_spans)
    manifest.json              what was sampled and scored with what (content fingerprints), how the pairs were
                               chosen, the summary; "complete" once every file is in place
Sample k of the prompt at source row r draws its tokens from a generator seeded by (seed, r, k): the same text
whatever the batch, the block, the number of ranks or a resume (up to float rounding of the logits when the batch
changes).
"""

import hashlib
import inspect
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import utils
from utils import AT_LEAST_1, DEVICES, DTYPES, FORMS, NON_NEGATIVE, Check, arg


@dataclass
class OnPolicyConfig:
    model: str = arg("", "the policy that samples, with its chat template (folder or hub name; '' = the tiny "
                         "world's SFT llama-small)")
    prompts: str = arg("", "prompts: a file, save_to_disk folder or hub dataset with a `prompt` column (a string "
                           "or a conversation), or preference data, whose responses are ignored ('' = the tiny "
                           "world's training prompts)")
    split: str = arg("train", "split of --prompts")
    form: str = arg("auto", "form of preference data given as --prompts", options=FORMS)
    skip_bad_rows: bool = arg(False, "skip (and count) bad rows instead of stopping at the first")
    max_prompts: int = arg(0, "the first N prompts only (0 = all)", check=NON_NEGATIVE)
    max_prompt_length: int = arg(1800, "prompt tokens, cut from the left as training cuts them", check=AT_LEAST_1)
    num_samples: int = arg(5, "K: responses sampled per prompt (SimPO: 5)",
                           check=Check(lambda v: v >= 2, "a pair needs at least 2 samples per prompt"))
    temperature: float = arg(0.8, "sampling temperature (SimPO: 0.8; 0 = greedy)", check=NON_NEGATIVE)
    top_p: float = arg(0.95, "nucleus sampling: the smallest set of tokens holding this probability (SimPO: 0.95)",
                       check=Check(lambda v: 0 < v <= 1, "must lie in (0, 1]"))
    max_new_tokens: int = arg(1024, "response tokens at most; a response cut here has no EOS", check=AT_LEAST_1)
    seed: int = arg(42, "sample k of source row r draws from a generator seeded by (seed, r, k)")
    samples: str = arg("", "samples drawn elsewhere (vLLM, ...) instead of by the policy: a JSONL file, one line per "
                           "sample: row (the prompt's row in --prompts), sample (0..K-1), text, and optionally ended "
                           "(default true) and n_tokens (default: counted with --model's tokenizer, whose policy is "
                           "then never loaded); the sampling settings above are not used ('' = sample here)")
    reward: str = arg("", "a sequence-classification reward model (folder or hub name), or a callable "
                          "(prompt, response) -> float as module:function or path/to/file.py:function ('' = "
                          "tiny:synthetic_reward on the tiny world)")
    key_spans: str = arg("", "optional module:function (prompt, response) -> [[start, end), ...]: the characters "
                             "that decide a response's reward, written as chosen_key_spans / rejected_key_spans "
                             "(score.py then measures key-token precision)", resumable=True)
    min_gap: float = arg(0.0, "drop a prompt when best - worst score < min_gap (a tie is always dropped)",
                         check=NON_NEGATIVE, resumable=True)
    keep_unfinished: bool = arg(False, "let a response cut by max_new_tokens be chosen or rejected (training adds "
                                       "an EOS to every response, as if it had ended there)", resumable=True)
    batch_size: int = arg(8, "prompts per forward; each decodes its K samples together", check=AT_LEAST_1)
    reward_batch_size: int = arg(16, "responses per reward-model forward", check=AT_LEAST_1)
    block_size: int = arg(128, "prompts per block file: the unit of resumption and of work between ranks",
                          check=AT_LEAST_1)
    output_dir: str = arg("", "where blocks, samples, pairs and manifest.json go ('' = runs/onpolicy on the tiny "
                              "world)")
    dtype: str = arg("auto", "auto (bf16 on GPU, fp32 on CPU), of the policy and the reward model", options=DTYPES)
    device: str = arg("auto", "where to run", options=DEVICES)
    attn_implementation: str = arg("sdpa", "attention kernel of the policy and the reward model",
                                   options=utils.ATTENTION)
    threads: int = arg(0, "CPU threads per process (0 = as train.py)", check=NON_NEGATIVE)
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)",
                            check=AT_LEAST_1)
    cache_dir: str = arg("", "datasets cache folder ('' = Hugging Face's default)")
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world, built on first use")


# resumable=True above marks the settings of the merge alone (the pairing): a rerun with other values merges the
# samples again; everything that decides the samples themselves is in identity() below.
SAMPLING = ("temperature", "top_p", "max_new_tokens", "seed")  # what --samples replaces (refused beside it)
# without --model: the tiny world's shapes (train.py's max_prompt_length) and its judge
TINY = dict(max_new_tokens=40, max_prompt_length=64, batch_size=64, block_size=512, reward="tiny:synthetic_reward",
            key_spans="tiny:synthetic_key_spans")


def parse_config(argv=None):
    return utils.parse_dataclass(OnPolicyConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import rundir  # noqa: E402
import train  # noqa: E402
from utils import UserError, log0, on_rank_zero, rank_zero_first, run_in_group, together  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Rewards: a Hugging Face reward model, or a Python callable
# ---------------------------------------------------------------------------------------------------------------

def is_callable_spec(spec):
    return ":" in spec and spec.rsplit(":", 1)[1].isidentifier()


def callable_fingerprint(spec):
    """What scored the samples, for a callable: the function's own source (an edit elsewhere in its module does not
    count), else its module's file."""
    fn = utils.load_callable(spec, "--reward")
    try:
        text = inspect.getsource(fn)
    except (OSError, TypeError):
        return rundir.fingerprint(getattr(inspect.getmodule(fn), "__file__", "") or "")
    return hashlib.sha256(f"{fn.__module__}.{fn.__qualname__}\n{text}".encode()).hexdigest()[:32]


def check_reward_model(path, flag="--reward"):
    """Before any weights load: a sequence-classification model with one output."""
    from transformers import AutoConfig
    models.check_source(path, flag)
    config = AutoConfig.from_pretrained(path)
    kinds = getattr(config, "architectures", None) or []
    if kinds and not any("SequenceClassification" in k or "Reward" in k for k in kinds):
        raise UserError(f"{flag} {path}: a {', '.join(kinds)}, not a sequence-classification reward model (give a "
                        "reward model, or a callable as module:function)")
    if config.num_labels != 1:
        raise UserError(f"{flag} {path}: the model has {config.num_labels} outputs; a reward model has one (wrap a "
                        "multi-objective model in a callable, module:function)")


def reward_model_scorer(path, device, dtype, batch_size, attention="sdpa"):
    """A sequence-classification reward model -> scores(prompts, responses) -> [float]: each (prompt, response) is
    rendered with the reward model's own chat template (or, without one, encoded as a text pair), batched with
    right padding, scored without gradients; the score is its single output at the last token."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UserError(f"--reward {path}: could not be loaded ({utils.reason(e)})") from None
    model = models.load_for_inference(path, dtype, device, attention, "--reward", AutoModelForSequenceClassification)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:  # HF pools at the last token that is not padding
        model.config.pad_token_id = tok.pad_token_id
    tok.padding_side = "right"

    def encode(prompt, response):
        if getattr(tok, "chat_template", None):
            messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + [
                {"role": "assistant", "content": response}]
            return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        return tok(data.render_prompt(prompt, tok, False), response)["input_ids"]

    @torch.no_grad()
    def scores(prompts, responses):
        out = []
        for i in range(0, len(prompts), batch_size):
            enc = tok.pad({"input_ids": [encode(p, r) for p, r in zip(prompts[i:i + batch_size],
                                                                      responses[i:i + batch_size])]},
                          return_tensors="pt").to(device)
            out += model(**enc).logits[:, 0].float().tolist()
        return out
    scores.model = model  # (what it runs, for a look from outside)
    return scores


def reward_scorer(cfg, device, dtype):
    """--reward as scores(prompts, responses, where=None) -> [float]. A callable that fails on a response, or a score
    that is not finite, is one error line naming the response (where: a label for each, such as 'row 3, sample 1')."""
    if is_callable_spec(cfg.reward):
        fn = utils.load_callable(cfg.reward, "--reward")

        def call(prompt, response, named):
            try:
                return float(fn(prompt, response))
            except Exception as e:
                raise UserError(f"--reward {cfg.reward} failed on {named} ({utils.reason(e)})") from None
        score = lambda prompts, responses, where: list(map(call, prompts, responses, where))  # noqa: E731
    else:
        model = reward_model_scorer(cfg.reward, device, dtype, cfg.reward_batch_size,
                                    getattr(cfg, "attn_implementation", "sdpa"))
        score = lambda prompts, responses, where: model(prompts, responses)  # noqa: E731

    def scores(prompts, responses, where=None):
        where = where or [f"response {i}" for i in range(len(responses))]
        values = score(prompts, responses, where)
        for named, value in zip(where, values):
            if not math.isfinite(value):
                raise UserError(f"--reward {cfg.reward} gave {value} for {named}")
        return values
    return scores


# ---------------------------------------------------------------------------------------------------------------
# Blocks: each rank samples and scores its own, written atomically
# ---------------------------------------------------------------------------------------------------------------

def blocks(cfg, prompts):
    """The samples' block store (rundir.Blocks): blocks/block_NNNNNN.jsonl, block b the prompts b*block_size ... A
    block is damaged when it cannot be read or does not hold K samples of each of its prompts, in order."""
    def rows(b):
        return [prompts[i]["row"] for i in range(b * cfg.block_size, min(len(prompts), (b + 1) * cfg.block_size))]

    def check(lines):
        for line in lines:
            line["score"] = float(line["score"])
            assert isinstance(line["response"], str) and isinstance(line["ended"], bool)
        return [(line["row"], line["sample"]) for line in lines] == [(r, k) for r in rows(b_[0])
                                                                      for k in range(cfg.num_samples)]
    b_ = [0]

    def read(path, b):
        b_[0] = b
        return rundir.read_jsonl_block(path, check)
    return rundir.Blocks(os.path.join(cfg.output_dir, "blocks"), math.ceil(len(prompts) / cfg.block_size), read,
                         damaged="(not the samples of its prompts); sampling it again")


def load_models(cfg, device, dtype):
    """(the reward's scores function, the policy) for sampling; the reward first, so that a reward model that
    cannot load fails before the policy loads. With --samples, no policy (None): nothing is sampled."""
    scores = reward_scorer(cfg, device, dtype)
    if cfg.samples:
        return scores, None
    return scores, models.load_for_inference(cfg.model, dtype, device, cfg.attn_implementation)


def sample_blocks(cfg, store, todo, prompts, prompt_ids, tokenizer, scores, model, rank, given=None):
    """Sample and score this rank's missing blocks (todo); one JSONL line per sample (row, sample, response,
    n_tokens, ended, score), in prompt order, written through a temporary file. given (--samples): the samples by
    (row, sample), taken instead of drawn."""
    bar = tqdm(total=sum(len(range(b * cfg.block_size, min(len(prompts), (b + 1) * cfg.block_size))) for b in todo),
               desc="scoring prompts" if given else "sampling prompts", disable=rank != 0, dynamic_ncols=True)
    n_samples, n_tokens, t_sample, t_score = 0, 0, 0.0, 0.0
    try:  # (the bar ends its line before an error is said)
        for b in todo:
            idx = list(range(b * cfg.block_size, min(len(prompts), (b + 1) * cfg.block_size)))
            t0 = time.perf_counter()
            if given:
                lines = [{"row": prompts[i]["row"], "sample": k, **given[prompts[i]["row"], k]} for i in idx
                         for k in range(cfg.num_samples)]
                bar.update(len(idx))
            else:
                lines = draw_block(cfg, idx, prompts, prompt_ids, tokenizer, model, bar)
            t1 = time.perf_counter()
            values = scores([prompts[i]["prompt"] for i in idx for _ in range(cfg.num_samples)],
                            [line["response"] for line in lines],
                            [f"row {line['row']}, sample {line['sample']} ({line['response'][:60]!r})"
                             for line in lines])
            for line, value in zip(lines, values):
                line["score"] = value
            t_sample, t_score = t_sample + t1 - t0, t_score + time.perf_counter() - t1
            n_samples, n_tokens = n_samples + len(lines), n_tokens + sum(line["n_tokens"] for line in lines)
            store.write_text(b, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    finally:
        bar.close()
    if given:
        print(f"rank {rank}: {n_samples} samples of {cfg.samples} scored in {t_score:.1f} s", flush=True)
    else:
        print(f"rank {rank}: {n_samples} samples, {n_tokens} tokens in {t_sample:.1f} s: "
              f"{n_samples / max(t_sample, 1e-9):.1f} samples/s, {n_tokens / max(t_sample, 1e-9):.0f} tokens/s; "
              f"scored in {t_score:.1f} s", flush=True)


def draw_block(cfg, idx, prompts, prompt_ids, tokenizer, model, bar):
    """The K samples of each prompt of a block (idx), drawn by the policy -> lines (row, sample, response, n_tokens,
    ended), in prompt order."""
    eos, pad = models.eos_token_ids(model, tokenizer), data.pad_id(tokenizer)
    order = sorted(idx, key=lambda i: len(prompt_ids[i]))  # batches of similar lengths: little padding
    drawn = {}
    for s in range(0, len(order), cfg.batch_size):
        batch = order[s:s + cfg.batch_size]
        rows = [prompts[i]["row"] for i in batch]
        out = models.sample(model, [prompt_ids[i] for i in batch], [[models.draw_seed(cfg.seed, r, k) for k in
                            range(cfg.num_samples)] for r in rows], cfg.max_new_tokens, cfg.temperature, cfg.top_p,
                            eos, pad)
        drawn.update(zip(batch, out))
        bar.update(len(batch))
    lines = []
    for i in idx:
        for k, (ids, ended) in enumerate(drawn[i]):
            text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).strip()
            lines.append({"row": prompts[i]["row"], "sample": k, "response": text, "n_tokens": len(ids),
                          "ended": ended})
    return lines


def read_samples(cfg, prompts, tokenizer):
    """--samples, checked line by line -> {(row, sample): {response, n_tokens, ended}} for every prompt's K
    samples. A line that is not an object, a row that is not a prompt's, a sample outside 0..K-1, a (row, sample)
    given twice, a field of the wrong type, or a prompt without its K samples is one UserError naming the file, the
    line (or the row) and the field. The response is stored stripped, as a sampled one; n_tokens, when absent, is
    the text's tokens under --model's tokenizer, plus its EOS when it ended."""
    path, K = cfg.samples, cfg.num_samples
    if not os.path.isfile(path):
        raise UserError(f"--samples {path}: no such file")
    rows = {r: n for n, r in enumerate(prompts["row"])}
    found, lines_of = {}, {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                obj = json.loads(line)
            except ValueError as e:
                raise UserError(f"{where}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise UserError(f"{where}: a {type(obj).__name__}, not an object with row, sample and text")

            def need(name, ok, what, default=None):
                if name not in obj and default is not None:
                    return default
                value = obj.get(name)
                if name not in obj or not ok(value):
                    raise UserError(f"{where}, field {name!r}: " + (f"must be {what}, got {json.dumps(value)[:60]}"
                                                                   if name in obj else f"missing ({what})"))
                return value
            is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
            row = need("row", is_int, "an integer: the prompt's row in --prompts")
            if row not in rows:
                raise UserError(f"{where}, field 'row': {row} is not the row of a prompt of --prompts {cfg.prompts} "
                                f"({len(prompts)} prompts{', after --max_prompts' if cfg.max_prompts else ''})")
            k = need("sample", lambda v: is_int(v) and 0 <= v < K, f"an integer in 0..{K - 1} (--num_samples {K})")
            if (row, k) in found:
                raise UserError(f"{where}, field 'sample': row {row}, sample {k} again (line {lines_of[row][k]} has "
                                "it)")
            text = need("text", lambda v: isinstance(v, str), "text: the response")
            ended = need("ended", lambda v: isinstance(v, bool), "true or false", default=True)
            n_tokens = need("n_tokens", lambda v: is_int(v) and v >= 0, "a count of tokens", default=-1)
            found[row, k] = {"response": text.strip(), "n_tokens": n_tokens, "ended": ended, "_text": text}
            lines_of.setdefault(row, {})[k] = n
    for row in rows:
        if len(lines_of.get(row, {})) != K:
            where = lines_of.get(row, {})
            raise UserError(f"{path}, field 'sample': row {row} has {len(where)} samples"
                            + (f" (lines {', '.join(str(n) for n in sorted(where.values()))})" if where else "")
                            + f", --num_samples is {K}")
    counting = [key for key, s in found.items() if s["n_tokens"] < 0]
    if counting:
        ids = tokenizer([found[key]["_text"] for key in counting], add_special_tokens=False)["input_ids"]
        for key, x in zip(counting, ids):
            found[key]["n_tokens"] = len(x) + found[key]["ended"]
    for s in found.values():
        del s["_text"]
    return found


# ---------------------------------------------------------------------------------------------------------------
# Pairs: the best against the worst of each prompt's samples
# ---------------------------------------------------------------------------------------------------------------

def choose_pair(samples, min_gap, keep_unfinished):
    """(chosen, rejected, None) of one prompt's samples, or (None, None, why it is dropped): the best score is
    chosen and the worst rejected (ties go to the earliest sample); a prompt is dropped when fewer than two samples
    are eligible (ended with an EOS, unless keep_unfinished, and not empty), when best and worst tie, or when
    best - worst < min_gap."""
    eligible = [s for s in samples if (s["ended"] or keep_unfinished) and s["response"]]
    if len(eligible) < 2:
        return None, None, "fewer than 2 finished samples"
    best = max(eligible, key=lambda s: (s["score"], -s["sample"]))
    worst = min(eligible, key=lambda s: (s["score"], s["sample"]))
    gap = best["score"] - worst["score"]
    if gap <= 0:
        return None, None, "tie"
    if gap < min_gap:
        return None, None, "gap below --min_gap"
    return best, worst, None


def merge(cfg, store, prompts, conversational):
    """Rank 0: read the blocks in order, write samples.jsonl and pairs.jsonl through temporary files -> summary."""
    key_spans = utils.load_callable(cfg.key_spans, "--key_spans") if cfg.key_spans else None
    with rundir.writing(os.path.join(cfg.output_dir, "samples.jsonl")) as samples_file, \
            rundir.writing(os.path.join(cfg.output_dir, "pairs.jsonl")) as pairs_file:
        dropped, all_, pairs = write_pairs(cfg, store, prompts, conversational, key_spans, samples_file, pairs_file)
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    return {"prompts": len(prompts), "samples": len(all_), "pairs": len(pairs), "dropped": dropped,
            "mean_score": mean([s["score"] for s in all_]), "mean_chosen_score": mean([c["score"] for c, _ in pairs]),
            "mean_rejected_score": mean([r["score"] for _, r in pairs]),
            "mean_tokens": mean([s["n_tokens"] for s in all_]),
            "mean_chosen_tokens": mean([c["n_tokens"] for c, _ in pairs]),
            "mean_rejected_tokens": mean([r["n_tokens"] for _, r in pairs]),
            "cut_by_max_new_tokens": mean([not s["ended"] for s in all_])}


def write_pairs(cfg, store, prompts, conversational, key_spans, samples_file, pairs_file):
    """Every block's samples to samples_file, each kept prompt's pair to pairs_file -> (why prompts were dropped,
    every sample, the pairs)."""
    dropped, all_, pairs = {}, [], []
    for b in range(store.n_blocks):
        idx = range(b * cfg.block_size, min(len(prompts), (b + 1) * cfg.block_size))
        lines = store.load(b)
        for j, i in enumerate(idx):
            prompt, samples = prompts[i]["prompt"], lines[j * cfg.num_samples:(j + 1) * cfg.num_samples]
            for s in samples:
                samples_file.write(json.dumps({"row": s["row"], "sample": s["sample"], "prompt": prompt,
                                                       **{k: s[k] for k in ("response", "score", "n_tokens",
                                                                             "ended")}}, ensure_ascii=False) + "\n")
            all_ += samples
            chosen, rejected, why = choose_pair(samples, cfg.min_gap, cfg.keep_unfinished)
            if why:
                dropped[why] = dropped.get(why, 0) + 1
                continue
            as_turn = (lambda text: [{"role": "assistant", "content": text}]) if conversational else (lambda t: t)
            pair = {"prompt": prompt, "chosen": as_turn(chosen["response"]), "rejected": as_turn(rejected["response"]),
                    "chosen_score": chosen["score"], "rejected_score": rejected["score"], "row": prompts[i]["row"]}
            if key_spans:
                pair.update(chosen_key_spans=key_spans(prompt, chosen["response"]),
                            rejected_key_spans=key_spans(prompt, rejected["response"]))
            pairs_file.write(json.dumps(pair, ensure_ascii=False) + "\n")
            pairs.append((chosen, rejected))
    return dropped, all_, pairs


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def identity(cfg, tokenizer, dtype):
    """What decides the blocks' contents, by content (not by path); the pairing settings are apart. With --samples,
    the samples file's fingerprint stands for the policy and the sampling settings."""
    reward = callable_fingerprint(cfg.reward) if is_callable_spec(cfg.reward) else rundir.fingerprint(cfg.reward)
    sampling = {"samples": rundir.fingerprint(cfg.samples)} if cfg.samples else {
        "policy": rundir.fingerprint(cfg.model), "max_prompt_length": cfg.max_prompt_length,
        "temperature": cfg.temperature, "top_p": cfg.top_p, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed}
    return {**sampling, "tokenizer": data.tokenizer_hash(tokenizer), "prompts": rundir.fingerprint(cfg.prompts),
            "split": cfg.split, "form": cfg.form, "skip_bad_rows": cfg.skip_bad_rows, "max_prompts": cfg.max_prompts,
            "num_samples": cfg.num_samples, "reward": reward, "dtype": repr(dtype), "block_size": cfg.block_size}


def main(argv=None):
    cfg, explicit = parse_config(argv)
    if not cfg.model:
        import tiny
        tiny.fill_defaults(cfg, TINY, explicit)
        cfg.output_dir = cfg.output_dir or os.path.join("runs", "onpolicy")
    if not cfg.reward:
        raise UserError("onpolicy.py needs --reward: a reward model, or a callable as module:function")
    if not cfg.output_dir:
        raise UserError("onpolicy.py needs --output_dir")
    unused = [f"--{k}" for k in SAMPLING if k in explicit]
    if cfg.samples and unused:
        raise UserError(f"{', '.join(unused)}: no effect with --samples (its samples were drawn elsewhere): drop "
                        f"{'it' if len(unused) == 1 else 'them'}", code=2)
    return run_in_group(cfg.device, lambda rank, world, device: run(cfg, rank, world, device), cfg.threads,
                        cfg.dist_timeout, cfg.dtype, model_given=bool(cfg.model))


def run(cfg, rank, world, device):
    from transformers import AutoTokenizer
    if not cfg.model:  # the tiny world (rank 0 builds it once) and its SFT model
        import tiny
        paths = rank_zero_first(lambda: tiny.build_tiny_world(cfg.tiny_world))
        cfg.prompts = cfg.prompts or paths["train"]
        cfg.model = tiny.sft_model(cfg.tiny_world, paths, train.main, cache_dir=cfg.cache_dir, device=cfg.device)
    if not cfg.prompts:
        raise UserError("onpolicy.py needs --prompts")
    models.check_source(cfg.model, "--model")
    if is_callable_spec(cfg.reward):  # import the callables now: a mistake is found before anything loads
        utils.load_callable(cfg.reward, "--reward")
    else:
        check_reward_model(cfg.reward)
    if cfg.key_spans:
        utils.load_callable(cfg.key_spans, "--key_spans")
    dtype = models.compute_dtype(cfg.dtype, device)

    def load():
        ds = data.load_prompts(cfg.prompts, cfg.split, cfg.form, cfg.cache_dir or None, cfg.skip_bad_rows)
        return ds.select(range(min(cfg.max_prompts, len(ds)))) if cfg.max_prompts else ds
    prompts = rank_zero_first(load)
    conversational = isinstance(prompts[0]["prompt"], list)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    use_template = bool(getattr(tokenizer, "chat_template", None))
    if conversational and not use_template:
        raise UserError(f"--prompts {cfg.prompts} holds conversations, and the policy {cfg.model} has no chat "
                        "template to render them")
    if cfg.samples:  # taken as they are: nothing to render or draw
        given, prompt_ids = rank_zero_first(lambda: read_samples(cfg, prompts, tokenizer)), None
    else:
        given, prompt_ids = None, [data.encode_prompt(data.render_prompt(p, tokenizer, use_template), tokenizer,
                                                      cfg.max_prompt_length)[0] for p in prompts["prompt"]]
    with rundir.FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it was
        mine = on_rank_zero(lambda: identity(cfg, tokenizer, dtype))
        saved = rundir.claim(cfg.output_dir, "manifest.json", mine, "samples of another run", key="identity")
        pairing = {k: getattr(cfg, k) for k in sorted(utils.resumable_fields(OnPolicyConfig))}
        paths = {k: getattr(cfg, k) for k in ("model", "prompts", "reward")}
        manifest = {"identity": mine, "paths": {**paths, "samples": cfg.samples} if cfg.samples else paths,
                    "pairing": pairing}
        path = os.path.join(cfg.output_dir, "manifest.json")
        if saved and saved.get("complete") and saved.get("pairing") == pairing:
            log0(f"{cfg.output_dir}: already complete")
        else:
            store = blocks(cfg, prompts)
            todo = store.missing()[rank::world]  # rank 0 decides; a damaged block is sampled again
            # every model loads before anything is written: a failed start leaves the folder as it found it
            loaded = together(lambda: load_models(cfg, device, dtype) if todo else None)
            if rank == 0:
                rundir.remove_leftovers(os.path.join(cfg.output_dir, "*.jsonl.tmp*"))  # a merge's killed write
                rundir.atomic_write(path, json.dumps({**manifest, "complete": False}, indent=2))
            dist.barrier()
            together(lambda: todo and sample_blocks(cfg, store, todo, prompts, prompt_ids, tokenizer, *loaded, rank,
                                                    given))
            dist.barrier()
            if rank == 0:
                summary = merge(cfg, store, prompts, conversational)
                rundir.atomic_write(path, json.dumps({**manifest, "complete": True, "summary": summary}, indent=2))
            dist.barrier()
        if rank == 0:
            with open(path) as fh:
                summary = json.load(fh)["summary"]
            log0(f"{summary['pairs']} pairs of {summary['prompts']} prompts ({summary['dropped'] or 'none dropped'}); "
                 f"mean score {summary['mean_score']:.3f}, chosen {summary['mean_chosen_score']:.3f}, rejected "
                 f"{summary['mean_rejected_score']:.3f}; {summary['mean_tokens']:.1f} tokens per sample, "
                 f"{summary['cut_by_max_new_tokens']:.1%} cut by --max_new_tokens")
            log0(f"wrote {os.path.join(cfg.output_dir, 'pairs.jsonl')} (train on it: python train.py --data "
                 f"{os.path.join(cfg.output_dir, 'pairs.jsonl')} ...), samples.jsonl and manifest.json")
        return cfg.output_dir


if __name__ == "__main__":
    sys.exit(utils.cli(main))
