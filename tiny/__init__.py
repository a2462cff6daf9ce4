"""The offline tiny world: a synthetic preference task whose deciding tokens are known, a tokenizer and tiny models
built locally in seconds, the SFT model both papers start from, and a programmatic judge of generated answers.

    python -m tiny [--root tiny_world] [--seed 0]      # build (or re-use) the world and print its paths

It is what `python train.py`, `python sepo_pipeline.py`, `python onpolicy.py` and `python generate.py` use when no
model is given (they import it only then: a run on a real model needs none of it), and what the tests and the
miniature study (studies/experiments.py) run on. Nothing of the methods lives here.

The synthetic task: three kinds of pairs whose preference is decided by one key word or number, located by
`*_key_spans` ([start, end) characters in each response); `synthetic_reward` judges any answer from its prompt.
"""

import fcntl
import json
import os
import random
import re
import shutil



import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
from utils import UserError, log0, on_rank_zero, rank_zero_first

WORLD_VERSION = 2  # bump when anything the tiny world writes changes, so old folders are rebuilt

# `python train.py` without --model: a small model and batch, so that a run finishes in about a minute on two CPU
# cores. train.py applies these only to fields not set on the command line or in --config.
TRAIN_DEFAULTS = dict(max_length=128, max_prompt_length=64, global_batch_size=32, micro_batch_size=8, lr=3e-4,
                      log_every=5, eval_every=20, eval_max_pairs=200, save_every=50)


# ---------------------------------------------------------------------------------------------------------------
# The synthetic task
# ---------------------------------------------------------------------------------------------------------------
# Three kinds of pairs; chosen and rejected share their wording and differ in one key word or number, which the
# `*_key_spans` fields locate ([start, end) characters in the response). Openers and closers add noise: in about a
# fifth of the pairs chosen and rejected get different openers, a difference that carries no preference.
OPENERS = ["", "Sure. ", "Okay. ", "Here you go. ", "Of course. "]
CLOSERS = ["", " Hope this helps.", " Let me know if you need more."]
SUM_PROMPTS = ["What is {a} + {b}?", "Add {a} and {b}.", "Compute {a} + {b}.",
               "What do you get when you add {a} and {b}?"]
SUM_ANSWERS = ["{a} + {b} = {k}.", "The sum is {k}.", "Adding them gives {k}.", "{a} plus {b} is {k}."]
TOPICS = {  # topic: (the word a plain answer would use, which the prompt forbids; words that avoid it)
    "ocean": ("blue", ["deep", "vast", "wide"]), "sky": ("blue", ["clear", "open", "bright"]),
    "grass": ("green", ["fresh", "soft", "tall"]), "snow": ("white", ["cold", "soft", "fresh"]),
    "night": ("dark", ["quiet", "still", "long"]), "desert": ("hot", ["dry", "wide", "quiet"]),
    "lemon": ("sour", ["bright", "fresh", "sharp"]), "forest": ("green", ["tall", "deep", "quiet"]),
    "fire": ("hot", ["bright", "fierce", "loud"]), "coffee": ("bitter", ["strong", "rich", "warm"]),
    "ice": ("cold", ["hard", "smooth", "clear"]), "honey": ("sweet", ["thick", "golden", "rich"]),
}
WORD_PROMPTS = ['Describe the {t} without using the word "{w}".', 'Write one sentence about the {t}. Do not use '
                'the word "{w}".', 'Tell me about the {t}, but avoid the word "{w}".']
WORD_ANSWERS = ["The {t} is {k} and {y} today.", "I think the {t} looks {k} and {y}.", "In short, the {t} is {k}, "
                "{y} and calm."]
POSITIVE = ["great", "wonderful", "excellent", "delightful", "lovely", "superb"]
NEGATIVE = ["terrible", "awful", "boring", "disappointing", "dreadful", "poor"]
ITEMS = ["cafe", "movie", "book", "hotel", "phone", "concert", "restaurant", "game", "jacket", "museum"]
REVIEW_PROMPTS = ["Write a {p} review of the {i}.", "Give a short {p} review of the {i}.",
                  "Review the {i} in a {p} tone."]
REVIEW_ANSWERS = ["The {i} was {k}.", "I found the {i} {k}, to be honest.", "Overall, the {i} was {k} from start "
                  "to end.", "My time with the {i} was {k}."]


def _response(template, key, opener, closer, **fields):
    """Fill a template whose {k} is the key text -> (response, [start, end) of the key)."""
    before, after = template.format(k="\0", **fields).split("\0")
    text = opener + before + key + after + closer
    return text, [len(opener) + len(before), len(opener) + len(before) + len(key)]


def synthetic_pair(rng):
    """One pair: {task, prompt, chosen, rejected, chosen_key_spans, rejected_key_spans}, drawn from random.Random."""
    task = rng.choice(["sum", "forbidden_word", "polarity"])
    opener = rng.choice(OPENERS)
    other_opener = rng.choice(OPENERS) if rng.random() < 0.25 else opener  # noise outside the key
    closer = rng.choice(CLOSERS)
    if task == "sum":
        a, b = rng.randint(10, 89), rng.randint(10, 89)
        good, bad = str(a + b), str(a + b + rng.choice([-1, 1]))  # off by one
        # Key = the digits that differ ("7"/"8" in 57 vs 58; the whole number in 59 vs 60).
        i = 0 if len(good) != len(bad) else min(j for j in range(len(good)) if good[j] != bad[j])
        prompt, template = rng.choice(SUM_PROMPTS).format(a=a, b=b), rng.choice(SUM_ANSWERS)
        chosen, cs = _response(template.replace("{k}", good[:i] + "{k}"), good[i:], opener, closer, a=a, b=b)
        rejected, rs = _response(template.replace("{k}", bad[:i] + "{k}"), bad[i:], other_opener, closer, a=a, b=b)
    elif task == "forbidden_word":
        t = rng.choice(sorted(TOPICS))
        w, alternatives = TOPICS[t]
        k, y = rng.sample(alternatives, 2)
        prompt, template = rng.choice(WORD_PROMPTS).format(t=t, w=w), rng.choice(WORD_ANSWERS)
        chosen, cs = _response(template, k, opener, closer, t=t, y=y)
        rejected, rs = _response(template, w, other_opener, closer, t=t, y=y)
    else:
        p, i = rng.choice(["positive", "negative"]), rng.choice(ITEMS)
        good, bad = (POSITIVE, NEGATIVE) if p == "positive" else (NEGATIVE, POSITIVE)
        prompt, template = rng.choice(REVIEW_PROMPTS).format(p=p, i=i), rng.choice(REVIEW_ANSWERS)
        chosen, cs = _response(template, rng.choice(good), opener, closer, i=i)
        rejected, rs = _response(template, rng.choice(bad), other_opener, closer, i=i)
    return {"task": task, "prompt": prompt, "chosen": chosen, "rejected": rejected,
            "chosen_key_spans": [cs], "rejected_key_spans": [rs]}


# The independent regime, built like real preference data: chosen and rejected are two answers written on their
# own (each draws its opener, fillers, sentence order, length and closer), several sentences long; the preference
# is still decided by known key content (one or more key spans per response), judged by the same reward.
FILLERS = ["That is a good question.", "I thought about it for a moment.", "Here is what I would say.",
           "Let me keep this short.", "I hope that is clear.", "This is how I see it.", "It is easy to check.",
           "There is not much more to add.", "I can put it simply.", "Thanks for asking."]  # no number, no key word
SUM_SENTENCES = ["The answer is {k}.", "So {a} + {b} = {k}.", "Adding {a} and {b} gives {k}.",
                 "The total comes to {k}.", "All together that makes {k}."]
WORD_SENTENCES = ["The {t} is {k}.", "To me the {t} feels {k}.", "You could call the {t} {k}.",
                  "Most of all, the {t} seems {k}."]
REVIEW_SENTENCES = ["The {i} was {k}.", "I would call the {i} {k}.", "Honestly, the {i} felt {k}.",
                    "My whole time with the {i} was {k}."]


def _answer(rng, key_sentences):
    """One answer written on its own: an opener, the key sentences and 0-3 fillers in a random order, a closer.
    key_sentences: [(template with {k} and other fields filled, key text)] -> (text, key spans)."""
    parts = [(template, key) for template, key in key_sentences] + [(f, None) for f in
                                                                     rng.sample(FILLERS, rng.randint(0, 3))]
    rng.shuffle(parts)
    text, spans = rng.choice(OPENERS), []
    for template, key in parts:
        text += " " if text and not text.endswith(" ") else ""
        if key is None:
            text += template
        else:
            before, after = template.split("{k}")
            spans.append([len(text) + len(before), len(text) + len(before) + len(key)])
            text += before + key + after
    return text + rng.choice(CLOSERS), spans


def _keyed(rng, templates, field, value, keys):
    """Key sentences, one per key, each from its own template (no sentence twice) -> [(template, key)]."""
    return [(template.replace(field, value), k) for template, k in zip(rng.sample(templates, len(keys)), keys)]


def independent_pair(rng, low=10, high=89, errors=(-10, -2, -1, 1, 2, 10)):
    """One pair of the independent regime: the same prompts and keys as synthetic_pair, but chosen and rejected
    are drawn each on its own. The sum's key is the whole stated number (the last number of the answer); the
    forbidden word's keys are the words that describe the topic (chosen) or the forbidden word itself (rejected);
    a review's keys are its words of polarity. Sums of numbers in [low, high], a wrong one off by one of errors."""
    task = rng.choice(["sum", "forbidden_word", "polarity"])
    if task == "sum":
        a, b = rng.randint(low, high), rng.randint(low, high)
        prompt = rng.choice(SUM_PROMPTS).format(a=a, b=b)
        wrong = a + b + rng.choice(list(errors))
        sides = [[(rng.choice(SUM_SENTENCES).replace("{a}", str(a)).replace("{b}", str(b)), str(k))] for k in
                 (a + b, wrong)]
    elif task == "forbidden_word":
        t = rng.choice(sorted(TOPICS))
        w, alternatives = TOPICS[t]
        prompt = rng.choice(WORD_PROMPTS).format(t=t, w=w)
        n_good, n_bad = rng.randint(1, 2), rng.randint(1, 2)
        sides = [_keyed(rng, WORD_SENTENCES, "{t}", t, rng.sample(alternatives, n_good)), _keyed(
            rng, WORD_SENTENCES, "{t}", t, [w] * n_bad)]
    else:
        p, i = rng.choice(["positive", "negative"]), rng.choice(ITEMS)
        prompt = rng.choice(REVIEW_PROMPTS).format(p=p, i=i)
        good, bad = (POSITIVE, NEGATIVE) if p == "positive" else (NEGATIVE, POSITIVE)
        sides = [_keyed(rng, REVIEW_SENTENCES, "{i}", i, rng.sample(words, rng.randint(1, 2))) for words in (good, bad)]
    (chosen, cs), (rejected, rs) = (_answer(rng, side) for side in sides)
    return {"task": task, "prompt": prompt, "chosen": chosen, "rejected": rejected, "chosen_key_spans": cs,
            "rejected_key_spans": rs}


def headroom_pair(rng):
    """One pair of the headroom world (issue 20's miniature): the independent regime with sums of one-digit
    numbers, wrong by one or two: 64 facts that a small model can learn, where two-digit sums were beyond it."""
    return independent_pair(rng, 2, 9, (-2, -1, 1, 2))


REGIMES = {"minimal": synthetic_pair, "independent": independent_pair, "headroom": headroom_pair}


def synthetic_reward(prompt, response):
    """Judge a generated answer to a synthetic prompt from the prompt alone -> reward in [0, 1].

    sum: 1 if the last number is the correct sum, 0.5 if it appears elsewhere, else 0. forbidden word: 0 if the
    word is used, 1 if the answer avoids it and names the topic, 0.5 otherwise. polarity: 0 if any word of the
    opposite polarity appears, 1 if a word of the asked polarity does, 0.5 otherwise.
    """
    words = set(re.findall(r"[a-z]+", response.lower()))
    forbidden = re.search(r'the word "([^"]+)"', prompt)
    if forbidden:
        topic = re.search(r"the (\w+)", prompt).group(1)
        return 0.0 if forbidden.group(1).lower() in words else 1.0 if topic in words else 0.5
    polarity = re.search(r"\b(positive|negative)\b", prompt)
    if polarity:
        good, bad = (POSITIVE, NEGATIVE) if polarity.group(1) == "positive" else (NEGATIVE, POSITIVE)
        return 0.0 if words & set(bad) else 1.0 if words & set(good) else 0.5
    a, b = (int(x) for x in re.findall(r"\d+", prompt)[:2])
    numbers = [int(x) for x in re.findall(r"\d+", response)]
    return 1.0 if numbers[-1:] == [a + b] else 0.5 if a + b in numbers else 0.0


def task_of(prompt):
    """The synthetic task a prompt belongs to: forbidden_word, polarity or sum."""
    if re.search(r'the word "([^"]+)"', prompt):
        return "forbidden_word"
    return "polarity" if re.search(r"\b(positive|negative)\b", prompt) else "sum"


def synthetic_key_spans(prompt, response):
    """Where synthetic_reward's verdict on any answer is decided -> [[start, end), ...] characters of the response:
    the forbidden word where the answer uses it (else the topic's name); every word of either polarity; the last
    number of a sum's answer (the one the judge checks). Lets key-token precision be measured on answers a policy
    wrote (onpolicy.py --key_spans tiny:synthetic_key_spans)."""
    forbidden = re.search(r'the word "([^"]+)"', prompt)
    if forbidden:
        spans = [m.span() for m in re.finditer(rf"\b{re.escape(forbidden.group(1))}\b", response, flags=re.I)]
        topic = re.search(r"the (\w+)", prompt).group(1)
        return [list(s) for s in spans or [m.span() for m in re.finditer(rf"\b{topic}\b", response, flags=re.I)]]
    if re.search(r"\b(positive|negative)\b", prompt):
        words = "|".join(POSITIVE + NEGATIVE)
        return [list(m.span()) for m in re.finditer(rf"\b({words})\b", response, flags=re.I)]
    numbers = list(re.finditer(r"\d+", response))
    return [list(numbers[-1].span())] if numbers else []


def synthetic_pairs(n, seed, regime="minimal"):
    """n pairs of a regime ("minimal": chosen and rejected share every word but the key; "independent": two answers
    written each on its own) from a generator seeded with `seed` (the same seed always gives the same pairs)."""
    rng = random.Random(seed)
    return [REGIMES[regime](rng) for _ in range(n)]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_synthetic_task(out_dir, n_train=2000, n_test=200, seed=0, regime="minimal", n_valid=0):
    """Write train.jsonl and test.jsonl (and valid.jsonl if n_valid), standard form + task and key spans ->
    {"train": path, "test": path[, "valid": path]}. Each file is its own stream of the generator."""
    os.makedirs(out_dir, exist_ok=True)
    sizes = {"train": (n_train, seed), "test": (n_test, seed + 1_000_003), "valid": (n_valid, seed + 2_000_006)}
    paths = {}
    for name, (n, s) in sizes.items():
        if n:
            paths[name] = os.path.join(out_dir, f"{name}.jsonl")
            _write_jsonl(paths[name], synthetic_pairs(n, s, regime))
    return paths


def write_pretraining_corpus(out_dir, n_pairs=10000, seed=0, regimes=("minimal", "independent")):
    """A corpus for pretraining the tiny models on the task's language: pairs of the regimes from streams of
    their own (not the train, valid or test pairs), each response once as the text to learn (`chosen`, good or
    bad alike, as uncurated text is) and the other beside it (`rejected`, which train.py --method sft ignores)."""
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for k, regime in enumerate(regimes):
        for pair in synthetic_pairs(n_pairs // 2, seed + 7_000_001 * (k + 1), regime):
            rows.append({"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]})
            rows.append({"prompt": pair["prompt"], "chosen": pair["rejected"], "rejected": pair["chosen"]})
    random.Random(seed).shuffle(rows)
    held = max(1, len(rows) // 20)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "test": os.path.join(out_dir, "test.jsonl")}
    _write_jsonl(paths["train"], rows[held:])
    _write_jsonl(paths["test"], rows[:held])
    return paths


def write_instructions(out_dir, n=2000, seed=0, good=0.5):
    """An instruction set for SFT, apart from the preference pairs (a stream of its own), of mixed quality as
    instruction data is: each prompt's answer is the good one of a headroom pair with probability `good`, else the
    bad one (`chosen` is the answer to learn; `rejected` the other, which train.py --method sft ignores). A start
    fine-tuned on it answers well about half the time, and can be taught by preferences which half."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed + 9_000_011)
    rows = []
    for pair in synthetic_pairs(n, seed + 5_000_003, "headroom"):
        keep = rng.random() < good
        rows.append({"prompt": pair["prompt"], "chosen": pair["chosen"] if keep else pair["rejected"],
                     "rejected": pair["rejected"] if keep else pair["chosen"], "good": keep})
    path = os.path.join(out_dir, "train.jsonl")
    _write_jsonl(path, rows)
    return {"train": path}


# ---------------------------------------------------------------------------------------------------------------
# The tiny world: tokenizers, models, data
# ---------------------------------------------------------------------------------------------------------------
# ChatML-like templates whose end-of-turn token is the EOS. The BPE one starts with BOS (as Llama-3's does), the
# byte one does not (as ChatML's does not), so both branches of the BOS rule are exercised.
TOKENIZERS = {
    "bpe": dict(bos="<|bos|>", eos="<|im_end|>", pad="<|pad|>", turn="<|im_start|>", template_bos=True),
    "char": dict(bos="<s>", eos="</s>", pad="<pad>", turn="<turn>", template_bos=False),
}


def build_tokenizer(path, kind="bpe", vocab_size=1024, seed=0):
    """Train a byte-level tokenizer on the synthetic corpus and save it as a PreTrainedTokenizerFast at `path`.

    kind="bpe": byte-level BPE, digits split one per token (as Llama-3). kind="char": no merges, one token per
    UTF-8 byte (one per character on the ASCII synthetic task), with different special-token names.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = TOKENIZERS[kind]
    specials = [spec["pad"], spec["bos"], spec["eos"], spec["turn"]]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    corpus = [text for pair in synthetic_pairs(2000, seed) for text in (pair["prompt"], pair["chosen"],
                                                                       pair["rejected"])]
    corpus += ["user", "assistant", "system", "\n\nHuman: Hello\n\nAssistant: Hi"]
    size = vocab_size if kind == "bpe" else len(alphabet) + len(specials)  # "char": room for no merge at all
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=size, min_frequency=2, special_tokens=specials,
                                                        initial_alphabet=alphabet, show_progress=False))
    turn, eos = spec["turn"], spec["eos"]
    template = (("{{ bos_token }}" if spec["template_bos"] else "")
                + "{% for m in messages %}" + turn + "{{ m['role'] }}\n{{ m['content'] }}" + eos + "\n{% endfor %}"
                + "{% if add_generation_prompt %}" + turn + "assistant\n{% endif %}")
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=spec["bos"], eos_token=eos, pad_token=spec["pad"],
                                 extra_special_tokens=[turn], model_max_length=2048,
                                 clean_up_tokenization_spaces=False)  # decode must give back the exact text
    hf.chat_template = template
    hf.save_pretrained(path)
    return path


MODEL_SIZES = {"micro": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
               "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
               "small": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256)}


def build_tiny_model(path, tokenizer_path, family="llama", size="tiny", seed=0):
    """A randomly initialised causal LM (bit-identical for a seed) saved with its tokenizer at `path`."""
    from transformers import (AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM)

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    common = dict(vocab_size=len(tok), max_position_embeddings=2048, bos_token_id=tok.bos_token_id,
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODEL_SIZES[size])
    torch.manual_seed(seed)  # the weights are drawn from torch's global generator at construction
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **common))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**common))
    else:
        raise ValueError(f"family must be 'llama' or 'gpt_neox', got {family!r}")
    model.generation_config.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _build_piece(path, seed, build):
    """Build one world piece into a temporary folder and rename it into place; re-use it if its manifest matches.

    A killed build leaves only a `*.tmp*` folder, never a half-written folder under the final name.
    """
    manifest = {"version": WORLD_VERSION, "seed": seed}
    marker = os.path.join(path, "tiny_world.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == manifest:
                return path
        shutil.rmtree(path)  # ours, but from another seed or version
    elif os.path.exists(path):
        raise UserError(f"{path} exists and is not a tiny-world folder; not overwriting it: choose another folder")
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    with open(os.path.join(tmp, "tiny_world.json"), "w") as f:
        json.dump(manifest, f)
    try:
        os.replace(tmp, path)
    except OSError:  # another process (another rank) finished the same piece first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def build_tiny_world(root="tiny_world", seed=0):
    """Create (or re-use) the offline world -> dict of paths: tokenizer, tokenizer_char, llama-tiny, llama-small,
    neox-tiny (models with their tokenizer); data, data_independent, data_headroom and instructions (folders); train
    and test (the minimal regime's), {train,valid,test}_{minimal,independent,headroom} and instructions_train (JSONL
    files)."""
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    p = {"data": os.path.join(root, "data"), "tokenizer": os.path.join(root, "tokenizer"),
         "tokenizer_char": os.path.join(root, "tokenizer_char")}
    _build_piece(p["data"], seed, lambda d: write_synthetic_task(d, seed=seed, n_valid=200))
    p["data_independent"] = os.path.join(root, "data_independent")
    _build_piece(p["data_independent"], seed, lambda d: write_synthetic_task(d, seed=seed, regime="independent",
                                                                              n_valid=200))
    p["data_headroom"], p["instructions"] = os.path.join(root, "data_headroom"), os.path.join(root, "instructions")
    _build_piece(p["data_headroom"], seed, lambda d: write_synthetic_task(d, seed=seed + 3_000_009,
                                                                           regime="headroom", n_valid=200))
    _build_piece(p["instructions"], seed, lambda d: write_instructions(d, seed=seed))
    _build_piece(p["tokenizer"], seed, lambda d: build_tokenizer(d, "bpe", seed=seed))
    _build_piece(p["tokenizer_char"], seed, lambda d: build_tokenizer(d, "char", seed=seed))
    for name, family, size in [("llama-tiny", "llama", "tiny"), ("llama-small", "llama", "small"),
                               ("neox-tiny", "gpt_neox", "tiny")]:
        p[name] = os.path.join(root, "models", name)
        _build_piece(p[name], seed, lambda d, f=family, s=size: build_tiny_model(d, p["tokenizer"], f, s, seed))
    p["train"], p["test"] = os.path.join(p["data"], "train.jsonl"), os.path.join(p["data"], "test.jsonl")
    for split in ("train", "valid", "test"):
        p[f"{split}_minimal"] = os.path.join(p["data"], f"{split}.jsonl")
        p[f"{split}_independent"] = os.path.join(p["data_independent"], f"{split}.jsonl")
        p[f"{split}_headroom"] = os.path.join(p["data_headroom"], f"{split}.jsonl")
    p["instructions_train"] = os.path.join(p["instructions"], "train.jsonl")
    return p


# ---------------------------------------------------------------------------------------------------------------
# Trained starting points, each built once with train.py's own loop and cached in root/models
# ---------------------------------------------------------------------------------------------------------------

def trained(root, name, flags, train_main):
    """root/models/<name>: the export of `train_main(flags)` (train.main, passed in: this module sits below
    train.py), trained once and then re-used, with the run's metrics.jsonl beside the weights. On every rank; rank 0
    decides whether it exists and moves the export into place. A second job that needs the same model while the
    first builds it waits for it (an OS lock beside the folder), then uses it."""
    path = os.path.join(root, "models", name)
    fd = None
    if dist.get_rank() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # blocks while another job builds this model
        except OSError:  # a filesystem without locks: no waiting, as before
            pass
    try:
        if not on_rank_zero(lambda: os.path.exists(os.path.join(path, "config.json"))):
            log0(f"building {path} once")
            run = path + ".run"
            if dist.get_rank() == 0:
                shutil.rmtree(run, ignore_errors=True)
            dist.barrier()
            train_main([x for k, v in {"activation_checkpointing": False, **flags, "output_dir": run, "resume": False,
                                        "save_every": 0}.items() for x in (f"--{k}", str(v))])  # tiny: no need
            if dist.get_rank() == 0:  # the run's metrics (held-out losses included) stay with the model
                shutil.copy(os.path.join(run, "metrics.jsonl"), os.path.join(run, "final", "metrics.jsonl"))
                os.replace(os.path.join(run, "final"), path)
                shutil.rmtree(run, ignore_errors=True)
            dist.barrier()
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock
    return path


def sft_model(root, paths, train_main, cache_dir="", device="auto"):
    """llama-small fine-tuned on the chosen responses of the synthetic train set (SePO Eq. 23), with seed 42: the
    one starting point of every command on the tiny world, whatever the seed of the run that starts from it (as the
    papers' seeds share one SFT model) -> root/models/llama-small-sft."""
    return trained(root, "llama-small-sft", {**TRAIN_DEFAULTS, "lr": 1e-3, "epochs": 2, "method": "sft",
                                            "model": paths["llama-small"], "data": paths["train"],
                                            "tiny_world": root, "cache_dir": cache_dir, "seed": 42,
                                            "device": device}, train_main)


# ---------------------------------------------------------------------------------------------------------------
# The hooks of the commands: what train.py, onpolicy.py, generate.py and sepo_pipeline.py do without --model
# ---------------------------------------------------------------------------------------------------------------

def fill_defaults(cfg, defaults, explicit):
    """The tiny world's settings (TRAIN_DEFAULTS, ...) on the fields of a config that no flag or --config set."""
    for key, value in defaults.items():
        if key not in explicit:
            setattr(cfg, key, value)


def training_start(cfg, chosen_only, train_main):
    """train.py without --model: the world (rank 0 builds it once); the user's data, if given, checked before the
    SFT start is built (minutes); the synthetic data where none is given; the model: llama-small for SFT, its SFT
    model for every preference method (as in both papers)."""
    paths = rank_zero_first(lambda: build_tiny_world(cfg.tiny_world))
    sources = [(src, split) for src, split in ((cfg.data, cfg.split), (cfg.eval_data, cfg.eval_split or cfg.split))
               if src]
    if sources:
        on_rank_zero(lambda: [data.load_preferences(src, split=split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                                    cache_dir=cfg.cache_dir or None) for src, split in sources],
                     share=False)
    if not cfg.data:
        cfg.data, cfg.eval_data = paths["train"], cfg.eval_data or paths["test"]
    cfg.model = paths["llama-small"] if chosen_only else sft_model(cfg.tiny_world, paths, train_main,
                                                                   cfg.cache_dir, cfg.device)
    return paths


def judge(cfg, final, step, device, n=100):
    """train.py's judge of the synthetic task: the mean reward of greedy answers to the first n held-out prompts,
    before (the start) and after (the export) -> its metrics line."""
    prompts = [row["prompt"] for row in data.load_preferences(cfg.eval_data or cfg.data,
                                                              cache_dir=cfg.cache_dir or None)][:n]
    before = synthetic_reward_of(cfg.model, prompts, device, tokenizer_path=cfg.tokenizer or cfg.model)
    after = synthetic_reward_of(final, prompts, device)
    log0(f"synthetic reward of greedy answers to {len(prompts)} held-out prompts: {before:.3f} before, {after:.3f} "
         f"after {cfg.method}")
    return {"step": step, "split": "generate", "reward_before": before, "reward_after": after, "prompts": len(prompts)}


def model_of_size(root, paths, size, seed=0):
    """The randomly initialised llama of a MODEL_SIZES size (the world holds tiny and small; others are built here,
    from the same tokenizer) -> its folder."""
    path = os.path.join(root, "models", f"llama-{size}")
    _build_piece(path, seed, lambda d: build_tiny_model(d, paths["tokenizer"], "llama", size, seed))
    return path


def pretrained_model(root, paths, size, train_main, epochs=2, lr=1e-3, seed=0, cache_dir="", max_steps=-1,
                     regimes=("minimal", "independent")):
    """A llama of `size` that knows the task's language before any preference training: next-token training on
    a corpus of the regimes' prompts and responses, good and bad alike (write_pretraining_corpus), from random
    weights -> root/models/llama-<size>-pt (-<regime> for other regimes than the two of the first study); its
    held-out loss is the last eval line of its metrics.jsonl."""
    suffix = "" if tuple(regimes) == ("minimal", "independent") else "-" + "-".join(regimes)
    corpus = os.path.join(root, "pretrain" + suffix)
    _build_piece(corpus, seed, lambda d: write_pretraining_corpus(d, seed=seed, regimes=regimes))
    return trained(root, f"llama-{size}-pt{suffix}", {
        **TRAIN_DEFAULTS, "method": "sft", "model": model_of_size(root, paths, size, seed),
        "data": os.path.join(corpus, "train.jsonl"), "eval_data": os.path.join(corpus, "test.jsonl"),
        "eval_every": 10**9, "eval_max_pairs": 0, "lr": lr, "epochs": epochs, "max_steps": max_steps,
        "tiny_world": root, "cache_dir": cache_dir, "seed": seed, "judge": "none"}, train_main)


# ---------------------------------------------------------------------------------------------------------------
# Generation and the judge
# ---------------------------------------------------------------------------------------------------------------

def generate_answers(model, tokenizer, prompts, device, max_new_tokens=40, batch_size=50, sample=False):
    """Answers of a causal LM to user prompts in its chat template -> (sequences, answer_mask), both [N, T]:
    left-padded prompt ids followed by the answer, and True on answer tokens up to and including the first EOS.
    Greedy, or (sample=True) drawn at temperature 1 from the full distribution (no top-k or top-p), with torch's
    global generator: seed it for repeatable samples."""
    if tokenizer.padding_side != "left":
        raise ValueError("generate_answers needs a tokenizer with padding_side='left'")
    sequences, masks = [], []
    for i in range(0, len(prompts), batch_size):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                               tokenize=False) for p in prompts[i:i + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                 **(dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sample else
                                    dict(do_sample=False)))
        answer = out[:, enc["input_ids"].shape[1]:]
        is_eos = answer == tokenizer.eos_token_id
        before_eos = (is_eos.int().cumsum(-1) - is_eos.int()) == 0  # up to and including the first EOS
        sequences.append(out)
        masks.append(torch.cat([torch.zeros_like(enc["input_ids"], dtype=torch.bool), before_eos], dim=1))
    width = max(s.shape[1] for s in sequences)
    pad = lambda x, v: F.pad(x, (width - x.shape[1], 0), value=v)  # noqa: E731  (left, as the prompts)
    return (torch.cat([pad(s, tokenizer.pad_token_id) for s in sequences]),
            torch.cat([pad(m, False) for m in masks]))


def answer_texts(tokenizer, sequences, answer_mask):
    """The answers of generate_answers as text (EOS and padding dropped)."""
    return [tokenizer.decode(s[m], skip_special_tokens=True) for s, m in zip(sequences, answer_mask)]


def greedy_synthetic_reward(model, tokenizer, prompts, device, max_new_tokens=40, batch_size=50):
    """Mean programmatic reward (synthetic_reward) of a loaded model's greedy answers to synthetic prompts."""
    answers = answer_texts(tokenizer, *generate_answers(model, tokenizer, prompts, device, max_new_tokens,
                                                        batch_size))
    return sum(synthetic_reward(p, a) for p, a in zip(prompts, answers)) / len(prompts)


def synthetic_reward_of(model_path, prompts, device, max_new_tokens=40, batch_size=50, tokenizer_path=None):
    """greedy_synthetic_reward of the model in a folder (or hub name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    return greedy_synthetic_reward(model, tokenizer, prompts, device, max_new_tokens, batch_size)
