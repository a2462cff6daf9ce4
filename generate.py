"""Answers for the papers' benchmarks: AlpacaEval 2, Arena-Hard and MT-Bench, the tables of both papers' Instruct
settings. Their judges (GPT-4 Turbo) need an API key, so this command writes the answers, exactly as each benchmark's
own tool reads them, with the decoding settings of SimPO's released evaluation configs (DECODING below), from any
exported model; docs/generate.md has the commands that judge them where a key is at hand.

    python generate.py --benchmark prompts    # the tiny world: its SFT model, held-out prompts and judge, offline
    python generate.py --model runs/confpo/final --benchmark alpaca_eval --prompts alpaca_eval.json \
        --output_dir runs/confpo/alpaca_eval
    torchrun --standalone --nproc_per_node 8 generate.py --model runs/confpo/final --benchmark arena_hard \
        --prompts arena-hard-auto/data/arena-hard-v0.1/question.jsonl --output_dir runs/confpo/arena_hard

Inputs (--prompts): alpaca_eval, a JSON list or JSONL of `instruction` (and `dataset`, kept); arena_hard,
Arena-Hard's question.jsonl (`question_id`, `turns: [{"content": ...}]` or `prompt`); mt_bench, FastChat's
question.jsonl (`question_id`, `category`, `turns: [str, str]`: the second turn's prompt holds the first question,
the model's first answer and the second question, rendered with the chat template); prompts, anything
onpolicy.py --prompts takes.

Output folder:
    blocks/block_NNNNNN.jsonl        per block of questions: every turn's answer, its token count, whether it
                                     ended with an end-of-turn token, its reward (written atomically: a killed run
                                     resumes at the first missing block)
    model_outputs.json               alpaca_eval: [{instruction, output, generator, dataset}] (alpaca_eval
                                     --model_outputs)
    model_answer/<generator>.jsonl   arena_hard and mt_bench: {question_id, answer_id, model_id, choices, tstamp}
    answers.jsonl                    prompts: {prompt, response, row, n_tokens, ended, score with --reward}
    manifest.json                    what was answered with what (content fingerprints), the decoding settings,
                                     the summary; "complete" once every file is in place
The answer to turn t of the question at source row r draws its tokens from a generator seeded by (seed, r, t): the
same text whatever the batch, the block, the number of ranks or a resume. answer_id is a hash of the model, the
settings and the question id, and tstamp is 0: a rerun writes the same bytes.
"""

import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Optional

import utils
from utils import AT_LEAST_1, DEVICES, DTYPES, FORMS, NON_NEGATIVE, Check, arg

BENCHMARKS = ("alpaca_eval", "arena_hard", "mt_bench", "prompts")

# FastChat's MT-Bench temperatures per category (fastchat/llm_judge/common.py, temperature_config); a category it
# does not list is sampled at 0.7 (gen_model_answer.py); "*" holds that fallback.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "*": 0.7}

# The decoding of each benchmark, where no flag sets it. Read in the released configs (2025), not from memory:
# - alpaca_eval: princeton-nlp/SimPO eval/alpacaeval2/configs/Llama-3-Instruct-8B-SimPO.yaml (and
#   Llama-3-Base-8B-SFT-SimPO.yaml): vLLM, do_sample, temperature 0.9, top_p 1.0, max_new_tokens 4096, stopping at
#   Llama-3's two end-of-turn ids (models.eos_token_ids finds both). The Mistral configs differ: Mistral-7B-Instruct
#   temperature 0.5 (top_p unset: 1.0), Mistral-7B-Base temperature 0.7, top_p 1.0, both max_new_tokens 2048 (pass
#   --temperature and --max_new_tokens for them). The Llama-3 row is the default: both papers' Instruct tables are
#   Llama-3-8B-Instruct's.
# - arena_hard: eval/arenahard/configs/*/gen_answer_config.yaml (every model): temperature 0.0 (greedy), max_tokens
#   4096, one choice.
# - mt_bench: lm-sys/FastChat fastchat/llm_judge/gen_model_answer.py (SimPO's README sends MT-Bench there):
#   --max-new-token 1024, the temperatures per category above, top_p not set (1.0).
# - prompts: ours, greedy with 1024 new tokens (any prompt file; a look at a model's answers).
DECODING = {
    "alpaca_eval": {"temperature": 0.9, "top_p": 1.0, "max_new_tokens": 4096},
    "arena_hard": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 4096},
    "mt_bench": {"temperature": MT_BENCH_TEMPERATURES, "top_p": 1.0, "max_new_tokens": 1024},
    "prompts": {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 1024},
}


@dataclass
class GenerateConfig:
    model: str = arg("", "the model that answers, with its chat template (a folder such as RUN/final, or a hub "
                         "name; '' = the tiny world's SFT llama-small)")
    benchmark: str = arg("prompts", "whose questions, and which file format is written", options=BENCHMARKS)
    prompts: str = arg("", "the questions: alpaca_eval, a JSON list or JSONL of `instruction`; arena_hard and "
                           "mt_bench, the benchmark's question.jsonl; prompts, a file, save_to_disk folder or hub "
                           "dataset with a `prompt` column, or preference data ('' = the tiny world's held-out "
                           "prompts, for --benchmark prompts)")
    split: str = arg("train", "split of --prompts (--benchmark prompts)")
    form: str = arg("auto", "form of preference data given as --prompts (--benchmark prompts)", options=FORMS)
    skip_bad_rows: bool = arg(False, "skip (and count) bad rows instead of stopping at the first (--benchmark "
                                     "prompts)")
    max_prompts: int = arg(0, "the first N questions only (0 = all)", check=NON_NEGATIVE)
    generator: str = arg("", "the model's name in the answers: AlpacaEval's `generator`, Arena-Hard's and "
                             "MT-Bench's `model_id` and answer file name ('' = the model folder's name; for "
                             "RUN/final, the run's)", resumable=True)
    temperature: Optional[float] = arg(None, "sampling temperature, 0 = greedy (None = the benchmark's: 0.9 "
                                             "alpaca_eval, 0 arena_hard, FastChat's per category for mt_bench, 0 "
                                             "prompts)", check=NON_NEGATIVE)
    top_p: Optional[float] = arg(None, "nucleus sampling (None = the benchmark's: 1.0)",
                                 check=Check(lambda v: 0 < v <= 1, "must lie in (0, 1]"))
    max_new_tokens: Optional[int] = arg(None, "answer tokens at most per turn; an answer cut here has no "
                                              "end-of-turn token (None = the benchmark's: 4096 alpaca_eval and "
                                              "arena_hard, 1024 mt_bench and prompts)", check=AT_LEAST_1)
    max_prompt_length: int = arg(0, "prompt tokens at most, cut from the left (0 = never cut; the summary counts "
                                    "cut prompts)", check=NON_NEGATIVE)
    seed: int = arg(42, "the answer to turn t of source row r draws from a generator seeded by (seed, r, t)")
    reward: str = arg("", "optional: a sequence-classification reward model (folder or hub name) or a callable "
                          "(prompt, response) -> float as module:function, scoring each answer locally (the "
                          "summary's mean reward; a later turn's prompt is the conversation so far) ('' = none; "
                          "tiny:synthetic_reward on the tiny world)")
    batch_size: int = arg(16, "questions per forward", check=AT_LEAST_1)
    reward_batch_size: int = arg(16, "answers per reward-model forward", check=AT_LEAST_1)
    block_size: int = arg(32, "questions per block file: the unit of resumption and of work between ranks",
                          check=AT_LEAST_1)
    output_dir: str = arg("", "where blocks, the answer file and manifest.json go ('' = runs/generate/<benchmark> "
                              "on the tiny world)")
    dtype: str = arg("auto", "auto (bf16 on GPU, fp32 on CPU), of the model and the reward model", options=DTYPES)
    device: str = arg("auto", "where to run", options=DEVICES)
    attn_implementation: str = arg("sdpa", "attention kernel of the model and the reward model",
                                   options=utils.ATTENTION)
    threads: int = arg(0, "CPU threads per process (0 = as train.py)", check=NON_NEGATIVE)
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)",
                            check=AT_LEAST_1)
    cache_dir: str = arg("", "datasets cache folder ('' = Hugging Face's default)")
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world, built on first use")


# resumable=True above marks what only the final file depends on (the generator's name): a rerun with another one
# writes the stored answers again under it; everything that decides the answers is in identity() below.
# without --model: the tiny world's shapes (train.py's max_prompt_length) and its judge
TINY = dict(max_new_tokens=40, max_prompt_length=64, batch_size=64, block_size=128, reward="tiny:synthetic_reward")


def parse_config(argv=None):
    return utils.parse_dataclass(GenerateConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import torch.distributed as dist  # noqa: E402  (the imports that take seconds, after the early flag check above)
from tqdm import tqdm  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import onpolicy  # noqa: E402
import rundir  # noqa: E402
import train  # noqa: E402
from utils import UserError, log0, on_rank_zero, rank_zero_first, run_in_group, together  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Questions: each benchmark's file, checked row by row -> [{row, turns, question_id, category, dataset}]
# ---------------------------------------------------------------------------------------------------------------

def read_rows(path):
    """The objects of a JSON list or a JSONL file -> [(where, object)], where = "FILE row R" (R counts from 0, as
    the answers' `row`; " (line N)" added for JSONL)."""
    if not os.path.isfile(path):
        raise UserError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        return [(f"{path} row {r}", row) for r, row in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append((f"{path} row {len(out)} (line {n})", json.loads(line)))
            except ValueError as e:
                raise UserError(f"{path} line {n}: not valid JSON ({e})") from None
    return out


def field(row, where, name, kinds, what, optional=False):
    """row[name], checked: of one of `kinds` (text must not be blank; a number is never a bool) -> the value, or
    None when optional and absent; else one UserError naming the file, the row and the field."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: a {type(row).__name__}, not an object with field {name!r}")
    if name not in row or row[name] is None:
        if optional:
            return None
        raise UserError(f"{where}, field {name!r}: missing ({what})")
    value = row[name]
    if not isinstance(value, kinds) or isinstance(value, bool) or (isinstance(value, str) and not value.strip()):
        raise UserError(f"{where}, field {name!r}: must be {what}, got {json.dumps(value)[:60]}")
    return value


def read_questions(cfg):
    """--prompts as the benchmark reads them -> [{row, turns (user messages; the first may be a conversation for
    --benchmark prompts), question_id, category, dataset}], the first --max_prompts."""
    if cfg.benchmark == "prompts":
        ds = data.load_prompts(cfg.prompts, cfg.split, cfg.form, cfg.cache_dir or None, cfg.skip_bad_rows)
        questions = [{"row": r, "turns": [p]} for p, r in zip(ds["prompt"], ds["row"])]
    else:
        questions = []
        for r, (where, row) in enumerate(read_rows(cfg.prompts)):
            q = {"row": r, "where": where}
            if cfg.benchmark == "alpaca_eval":
                q["turns"] = [field(row, where, "instruction", str, "the instruction, non-empty text")]
                q["dataset"] = field(row, where, "dataset", str, "text", optional=True)
            else:
                q["question_id"] = field(row, where, "question_id", (str, int), "a string or an integer")
                q["category"] = field(row, where, "category", str, "text", optional=cfg.benchmark == "arena_hard")
                if cfg.benchmark == "arena_hard" and "turns" not in row and "prompt" in row:
                    q["turns"] = [field(row, where, "prompt", str, "non-empty text")]
                else:
                    q["turns"] = read_turns(row, where, cfg.benchmark)
            questions.append(q)
        if not questions:
            raise UserError(f"--prompts {cfg.prompts}: no questions")
        ids = {}
        for q in questions:
            if "question_id" in q and q["question_id"] in ids:
                raise UserError(f"{q['where']}, field 'question_id': {q['question_id']!r} again "
                                f"(row {ids[q['question_id']]} has it)")
            ids[q.get("question_id")] = q["row"]
    for q in questions:
        q.pop("where", None)
    return questions[:cfg.max_prompts] if cfg.max_prompts else questions


def read_turns(row, where, benchmark):
    """A question's turns: Arena-Hard's [{"content": text}, ...], FastChat's [text, ...] -> [text, ...]."""
    arena = benchmark == "arena_hard"
    turns = field(row, where, "turns", list, "a list of turns, " + ('[{"content": ...}, ...]' if arena else
                                                                     "[text, ...]"))
    if not turns:
        raise UserError(f"{where}, field 'turns': an empty list")
    out = []
    for j, turn in enumerate(turns):
        if arena:
            out.append(field(turn, f"{where}, field 'turns', turn {j}", "content", str, "non-empty text"))
        elif not isinstance(turn, str) or not turn.strip():
            raise UserError(f"{where}, field 'turns': turn {j} must be non-empty text, got {json.dumps(turn)[:60]}")
        else:
            out.append(turn)
    return out


def conversation(q, answers, t):
    """The prompt of turn t: the question itself for the first turn (a string, or the conversation given), else the
    messages so far: every earlier question and the model's own answer to it, then the t-th question."""
    if t == 0:
        return q["turns"][0]
    messages = []
    for j in range(t):
        messages += [{"role": "user", "content": q["turns"][j]}, {"role": "assistant", "content": answers[j]}]
    return messages + [{"role": "user", "content": q["turns"][t]}]


def decoding_of(cfg):
    """The benchmark's decoding settings (DECODING), each overridden by its flag when given."""
    return {k: v if getattr(cfg, k) is None else getattr(cfg, k) for k, v in DECODING[cfg.benchmark].items()}


def temperature_of(decoding, q):
    """A question's temperature: one for all, or (MT-Bench) its category's."""
    t = decoding["temperature"]
    return t.get(q.get("category"), t["*"]) if isinstance(t, dict) else t


def default_generator(model):
    """The model folder's name; for an export RUN/final, the run's (final says nothing); a hub name's last part."""
    path = os.path.normpath(model)
    name = os.path.basename(path)
    if name == "final" and os.path.isdir(path):
        name = os.path.basename(os.path.dirname(os.path.abspath(path))) or name
    return name


def check_generator(name, what="--generator"):
    """The model's name in the answers, which names the answer file: letters, digits and . _ + -, no leading dot."""
    if not re.fullmatch(r"[\w.+-]+", name) or name.startswith("."):
        raise UserError(f"{what} {name!r}: must be a file name (letters, digits and . _ + -, not starting with a "
                        "dot): the answer file is named after it" + ("" if what == "--generator" else
                                                                    "; give one with --generator"))
    return name


# ---------------------------------------------------------------------------------------------------------------
# Blocks: each rank answers its own, every turn in order, written atomically
# ---------------------------------------------------------------------------------------------------------------

def blocks(cfg, questions):
    """The answers' block store (rundir.Blocks): blocks/block_NNNNNN.jsonl, block b the questions b*block_size ...,
    one line per question: row and, per turn, text, n_tokens (the end-of-turn token included), ended, truncated
    (the prompt was cut) and score (with --reward). A block is damaged when it cannot be read or does not hold
    every turn of each of its questions, in order."""
    def read(path, b):
        want = questions[b * cfg.block_size:(b + 1) * cfg.block_size]

        def check(lines):
            for line, q in zip(lines, want):
                assert len(line["turns"]) == len(q["turns"])
                for a in line["turns"]:
                    assert isinstance(a["text"], str) and isinstance(a["ended"], bool)
                    assert isinstance(a["truncated"], bool) and isinstance(a["n_tokens"], int)
                    if cfg.reward:
                        a["score"] = float(a["score"])
            return [line["row"] for line in lines] == [q["row"] for q in want]
        return rundir.read_jsonl_block(path, check)
    return rundir.Blocks(os.path.join(cfg.output_dir, "blocks"), math.ceil(len(questions) / cfg.block_size), read,
                         damaged="(not the answers of its questions); answering it again")


def load_models(cfg, device, dtype):
    """(the reward's scores function or None, the model); the reward first, so that a reward model that cannot load
    fails before the model loads."""
    scores = onpolicy.reward_scorer(cfg, device, dtype) if cfg.reward else None
    return scores, models.load_for_inference(cfg.model, dtype, device, cfg.attn_implementation)


def answer_blocks(cfg, store, todo, questions, decoding, tokenizer, scores, model, rank):
    """Answer (and score) this rank's missing blocks (todo); one JSONL line per question (row, turns), in question
    order, written through a temporary file."""
    bar = tqdm(total=sum(len(questions[b * cfg.block_size:(b + 1) * cfg.block_size]) for b in todo),
               desc="answering questions", disable=rank != 0, dynamic_ncols=True)
    n_answers, n_tokens, t_answer, t_score = 0, 0, 0.0, 0.0
    try:  # (the bar ends its line before an error is said)
        for b in todo:
            block = questions[b * cfg.block_size:(b + 1) * cfg.block_size]
            t0 = time.perf_counter()
            turns = answer_block(cfg, block, decoding, tokenizer, model)
            bar.update(len(block))
            t1 = time.perf_counter()
            if scores is not None:
                asked = [(i, t) for i in range(len(block)) for t in range(len(turns[i]))]
                values = scores([conversation(block[i], [a["text"] for a in turns[i]], t) for i, t in asked],
                                [turns[i][t]["text"] for i, t in asked],
                                [f"row {block[i]['row']}, turn {t}" + (" (its prompt a conversation, a list of "
                                                                       "messages)" if t else "") for i, t in asked])
                for (i, t), value in zip(asked, values):
                    turns[i][t]["score"] = value
            t_answer, t_score = t_answer + t1 - t0, t_score + time.perf_counter() - t1
            n_answers, n_tokens = n_answers + sum(map(len, turns)), n_tokens + sum(x["n_tokens"] for a in turns
                                                                                    for x in a)
            store.write_text(b, "".join(json.dumps({"row": q["row"], "turns": a}, ensure_ascii=False) + "\n"
                                        for q, a in zip(block, turns)))
    finally:
        bar.close()
    print(f"rank {rank}: {n_answers} answers, {n_tokens} tokens in {t_answer:.1f} s: "
          f"{n_tokens / max(t_answer, 1e-9):.0f} tokens/s{f'; scored in {t_score:.1f} s' if scores else ''}",
          flush=True)


def answer_block(cfg, block, decoding, tokenizer, model):
    """Every turn of a block's questions, one turn at a time (turn t's prompt holds the answers to the turns before
    it) -> per question, per turn: {text, n_tokens, ended, truncated}. Within a turn, the questions go in batches of
    one temperature and similar prompt lengths; each answer draws from its own generator, seeded by (seed, row,
    turn)."""
    eos, pad = models.eos_token_ids(model, tokenizer), data.pad_id(tokenizer)
    use_template = bool(getattr(tokenizer, "chat_template", None))
    turns = [[] for _ in block]
    for t in range(max(len(q["turns"]) for q in block)):
        asked = [i for i, q in enumerate(block) if len(q["turns"]) > t]
        prompts = {i: data.render_prompt(conversation(block[i], [a["text"] for a in turns[i]], t), tokenizer,
                                         use_template) for i in asked}
        encoded = {i: data.encode_prompt(prompts[i], tokenizer, cfg.max_prompt_length or sys.maxsize) for i in asked}
        groups = {}
        for i in asked:
            groups.setdefault(temperature_of(decoding, block[i]), []).append(i)
        for temperature, members in sorted(groups.items()):
            order = sorted(members, key=lambda i: (len(encoded[i][0]), i))  # batches of similar lengths
            for s in range(0, len(order), cfg.batch_size):
                batch = order[s:s + cfg.batch_size]
                out = models.sample(model, [encoded[i][0] for i in batch],
                                    [[models.draw_seed(cfg.seed, block[i]["row"], t)] for i in batch],
                                    decoding["max_new_tokens"], temperature, decoding["top_p"], eos, pad)
                for i, [(ids, ended)] in zip(batch, out):
                    text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True).strip()
                    turns[i].append({"text": text, "n_tokens": len(ids), "ended": ended, "truncated": encoded[i][1]})
    return turns


# ---------------------------------------------------------------------------------------------------------------
# The answer file, in the benchmark's own format
# ---------------------------------------------------------------------------------------------------------------

def output_file(benchmark, generator):
    return {"alpaca_eval": "model_outputs.json", "prompts": "answers.jsonl"}.get(
        benchmark, os.path.join("model_answer", f"{generator}.jsonl"))


def answer_id(mine, question_id):
    """A stable answer id (22 characters, as shortuuid's): a hash of what the folder computes (the model's
    fingerprint, the decoding settings, ...) and the question's id."""
    text = json.dumps(mine, sort_keys=True) + "\n" + json.dumps(question_id)
    return hashlib.sha256(text.encode()).hexdigest()[:22]


def record(benchmark, q, answers, generator, mine):
    """One question's answers as the benchmark's tool reads them: AlpacaEval's {instruction, output, generator,
    dataset}; Arena-Hard's gen_answer.py line (each turn {content, token_len}; token_len counted with the model's
    tokenizer, not tiktoken's); FastChat's gen_model_answer.py line (each turn a string); ours for prompts."""
    if benchmark == "alpaca_eval":
        out = {"instruction": q["turns"][0], "output": answers[0]["text"], "generator": generator}
        return {**out, "dataset": q["dataset"]} if q.get("dataset") is not None else out
    if benchmark == "prompts":
        a = answers[0]
        return {"prompt": q["turns"][0], "response": a["text"], "row": q["row"], "n_tokens": a["n_tokens"],
                "ended": a["ended"], **({"score": a["score"]} if "score" in a else {})}
    turns = [{"content": a["text"], "token_len": a["n_tokens"] - a["ended"]} for a in answers] \
        if benchmark == "arena_hard" else [a["text"] for a in answers]
    return {"question_id": q["question_id"], "answer_id": answer_id(mine, q["question_id"]), "model_id": generator,
            "choices": [{"index": 0, "turns": turns}], "tstamp": 0.0}


def merge(cfg, store, questions, generator, mine):
    """Rank 0: read the blocks in order, write the benchmark's file through a temporary file -> summary."""
    path = os.path.join(cfg.output_dir, output_file(cfg.benchmark, generator))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    records, every = [], []
    for b in range(store.n_blocks):
        for q, line in zip(questions[b * cfg.block_size:(b + 1) * cfg.block_size], store.load(b)):
            records.append(record(cfg.benchmark, q, line["turns"], generator, mine))
            every += line["turns"]
    with rundir.writing(path) as fh:
        if cfg.benchmark == "alpaca_eval":
            fh.write(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
        else:
            fh.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    mean = lambda xs: sum(xs) / max(len(xs), 1)  # noqa: E731
    summary = {"questions": len(questions), "answers": len(every), "mean_tokens": mean([a["n_tokens"] for a in every]),
               "ended": mean([a["ended"] for a in every]), "truncated_prompts": sum(a["truncated"] for a in every)}
    if cfg.reward:
        summary["mean_reward"] = mean([a["score"] for a in every])
    return summary


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def identity(cfg, tokenizer, dtype, decoding):
    """What decides the blocks' contents, by content (not by path); the generator's name is apart."""
    reward = onpolicy.callable_fingerprint(cfg.reward) if onpolicy.is_callable_spec(cfg.reward) else \
        rundir.fingerprint(cfg.reward)
    return {"model": rundir.fingerprint(cfg.model), "tokenizer": data.tokenizer_hash(tokenizer),
            "benchmark": cfg.benchmark, "prompts": rundir.fingerprint(cfg.prompts), "split": cfg.split,
            "form": cfg.form, "skip_bad_rows": cfg.skip_bad_rows, "max_prompts": cfg.max_prompts,
            "max_prompt_length": cfg.max_prompt_length, "decoding": decoding, "seed": cfg.seed, "reward": reward,
            "dtype": repr(dtype), "block_size": cfg.block_size}


def main(argv=None):
    cfg, explicit = parse_config(argv)
    if not cfg.model:
        import tiny
        tiny.fill_defaults(cfg, TINY, explicit)
        cfg.output_dir = cfg.output_dir or os.path.join("runs", "generate", cfg.benchmark)
    if not cfg.output_dir:
        raise UserError("generate.py needs --output_dir")
    if cfg.generator:
        check_generator(cfg.generator)
    return run_in_group(cfg.device, lambda rank, world, device: run(cfg, rank, world, device), cfg.threads,
                        cfg.dist_timeout, cfg.dtype, model_given=bool(cfg.model))


def run(cfg, rank, world, device):
    from transformers import AutoTokenizer
    if not cfg.prompts and (cfg.model or cfg.benchmark != "prompts"):
        raise UserError(f"generate.py --benchmark {cfg.benchmark} needs --prompts: the benchmark's question file "
                        "(docs/generate.md says where each is)")
    if not cfg.model:  # the tiny world (rank 0 builds it once) and its SFT model
        import tiny
        paths = rank_zero_first(lambda: tiny.build_tiny_world(cfg.tiny_world))
        if cfg.benchmark == "prompts":
            cfg.prompts = cfg.prompts or paths["test"]
        cfg.model = tiny.sft_model(cfg.tiny_world, paths, train.main, cache_dir=cfg.cache_dir, device=cfg.device)
    models.check_source(cfg.model, "--model")
    if onpolicy.is_callable_spec(cfg.reward):  # import the callable now: a mistake is found before anything loads
        utils.load_callable(cfg.reward, "--reward")
    elif cfg.reward:
        onpolicy.check_reward_model(cfg.reward)
    dtype = models.compute_dtype(cfg.dtype, device)
    decoding = decoding_of(cfg)
    questions = rank_zero_first(lambda: read_questions(cfg))
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    several = next((q for q in questions if len(q["turns"]) > 1 or isinstance(q["turns"][0], list)), None)
    if several is not None and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"--prompts {cfg.prompts} row {several['row']} is a conversation, and the model {cfg.model} "
                        "has no chat template to render it")
    generator = cfg.generator or check_generator(default_generator(cfg.model), "the model folder's name")
    with rundir.FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it was
        mine = on_rank_zero(lambda: identity(cfg, tokenizer, dtype, decoding))
        saved = rundir.claim(cfg.output_dir, "manifest.json", mine, "answers of another run", key="identity")
        output = {"generator": generator, "file": output_file(cfg.benchmark, generator)}
        manifest = {"identity": mine, "paths": {k: getattr(cfg, k) for k in ("model", "prompts", "reward")},
                    "output": output}
        path = os.path.join(cfg.output_dir, "manifest.json")
        if saved and saved.get("complete") and saved.get("output") == output:
            log0(f"{cfg.output_dir}: already complete")
        else:
            store = blocks(cfg, questions)
            todo = store.missing()[rank::world]  # rank 0 decides; a damaged block is answered again
            # every model loads before anything is written: a failed start leaves the folder as it found it
            loaded = together(lambda: load_models(cfg, device, dtype) if todo else None)
            if rank == 0:
                rundir.remove_leftovers(os.path.join(cfg.output_dir, "*.tmp*"),
                                        os.path.join(cfg.output_dir, "model_answer", "*.tmp*"))  # a killed merge
                old = (saved or {}).get("output", {}).get("file")
                if old and old != output["file"] and os.path.exists(os.path.join(cfg.output_dir, old)):
                    os.remove(os.path.join(cfg.output_dir, old))  # the answers under the generator's old name
                rundir.atomic_write(path, json.dumps({**manifest, "complete": False}, indent=2))
            dist.barrier()
            together(lambda: todo and answer_blocks(cfg, store, todo, questions, decoding, tokenizer, *loaded, rank))
            dist.barrier()
            if rank == 0:
                summary = merge(cfg, store, questions, generator, mine)
                rundir.atomic_write(path, json.dumps({**manifest, "complete": True, "summary": summary}, indent=2))
            dist.barrier()
        if rank == 0:
            with open(path) as fh:
                summary = json.load(fh)["summary"]
            reward = f"; mean reward {summary['mean_reward']:.3f}" if "mean_reward" in summary else ""
            log0(f"{summary['answers']} answers to {summary['questions']} questions: {summary['mean_tokens']:.1f} "
                 f"tokens per answer, {summary['ended']:.1%} ended with an end-of-turn token, "
                 f"{1 - summary['ended']:.1%} cut by max_new_tokens {decoding['max_new_tokens']}{reward}"
                 + (f"; {summary['truncated_prompts']} prompts cut to --max_prompt_length"
                    if summary["truncated_prompts"] else ""))
            log0(f"wrote {os.path.join(cfg.output_dir, output['file'])} (docs/generate.md: how the benchmark judges "
                 "it) and manifest.json")
        return cfg.output_dir


if __name__ == "__main__":
    sys.exit(utils.cli(main))
