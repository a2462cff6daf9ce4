"""The offline tiny world: a synthetic preference task whose deciding tokens are known, a tokenizer and tiny models
built locally in seconds, the SFT model both papers start from, and a programmatic judge of generated answers.

    python tiny.py [--root tiny_world] [--seed 0]      # build (or re-use) the world and print its paths

It is what `python train.py` and `python sepo_pipeline.py` use when no model is given, and what the tests and the
miniature study (experiments.py) run on. Nothing of the methods lives here.

The synthetic task: three kinds of pairs whose preference is decided by one key word or number, located by
`*_key_spans` ([start, end) characters in each response); `synthetic_reward` judges any answer from its prompt.
"""

import argparse
import json
import os
import random
import re
import shutil
import sys
import time



def command_line():
    """`python tiny.py`'s flags (defined above the slow imports, so that --help answers at once)."""
    parser = argparse.ArgumentParser(description="build (or re-use) the offline tiny world and print its paths")
    parser.add_argument("--root", default="tiny_world", help="the folder of the world")
    parser.add_argument("--seed", type=int, default=0, help="the seed of everything in it")
    return parser


if __name__ == "__main__":
    command_line().parse_args()  # --help and a mistyped flag answer here, before torch loads

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils import log0  # noqa: E402

WORLD_VERSION = 1  # bump when anything the tiny world writes changes, so old folders are rebuilt

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


def synthetic_pairs(n, seed):
    """n pairs from a generator seeded with `seed` (the same seed always gives the same pairs)."""
    rng = random.Random(seed)
    return [synthetic_pair(rng) for _ in range(n)]


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_synthetic_task(out_dir, n_train=2000, n_test=200, seed=0):
    """Write train.jsonl and test.jsonl (standard form + task and key spans) -> {"train": path, "test": path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"train": os.path.join(out_dir, "train.jsonl"), "test": os.path.join(out_dir, "test.jsonl")}
    _write_jsonl(paths["train"], synthetic_pairs(n_train, seed))
    _write_jsonl(paths["test"], synthetic_pairs(n_test, seed + 1_000_003))  # an independent stream
    return paths


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
        raise FileExistsError(f"{path} exists and is not a tiny-world folder; not overwriting it")
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
    neox-tiny (models with their tokenizer), data (folder), train, test (JSONL files)."""
    os.makedirs(os.path.join(root, "models"), exist_ok=True)
    p = {"data": os.path.join(root, "data"), "tokenizer": os.path.join(root, "tokenizer"),
         "tokenizer_char": os.path.join(root, "tokenizer_char")}
    _build_piece(p["data"], seed, lambda d: write_synthetic_task(d, seed=seed))
    _build_piece(p["tokenizer"], seed, lambda d: build_tokenizer(d, "bpe", seed=seed))
    _build_piece(p["tokenizer_char"], seed, lambda d: build_tokenizer(d, "char", seed=seed))
    for name, family, size in [("llama-tiny", "llama", "tiny"), ("llama-small", "llama", "small"),
                               ("neox-tiny", "gpt_neox", "tiny")]:
        p[name] = os.path.join(root, "models", name)
        _build_piece(p[name], seed, lambda d, f=family, s=size: build_tiny_model(d, p["tokenizer"], f, s, seed))
    p["train"], p["test"] = os.path.join(p["data"], "train.jsonl"), os.path.join(p["data"], "test.jsonl")
    return p


# ---------------------------------------------------------------------------------------------------------------
# The SFT starting point (SePO Eq. 23), trained once with train.py's own loop
# ---------------------------------------------------------------------------------------------------------------

def sft_model(root, paths, train_main, seed=42, cache_dir=""):
    """llama-small fine-tuned on the chosen responses of the synthetic train set, built once and cached as
    root/models/llama-small-sft. `train_main` is train.main (passed in: this module sits below train.py)."""
    path = os.path.join(root, "models", "llama-small-sft")
    if not os.path.exists(os.path.join(path, "config.json")):
        log0(f"building the tiny SFT model once ({path})")
        run = path + ".run"
        if dist.get_rank() == 0:
            shutil.rmtree(run, ignore_errors=True)
        dist.barrier()
        flags = {**TRAIN_DEFAULTS, "lr": 1e-3, "epochs": 2, "save_every": 0, "method": "sft",
                 "model": paths["llama-small"], "data": paths["train"], "tiny_world": root, "output_dir": run,
                 "resume": False, "cache_dir": cache_dir, "seed": seed}
        train_main([x for k, v in flags.items() for x in (f"--{k}", str(v))])
        if dist.get_rank() == 0:
            os.replace(os.path.join(run, "final"), path)
            shutil.rmtree(run, ignore_errors=True)
        dist.barrier()
    return path


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


def main(argv=None):
    args = command_line().parse_args(argv)
    t0 = time.time()
    for name, path in build_tiny_world(args.root, args.seed).items():
        print(f"{name:15s} {path}")
    print(f"tiny world ready in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
