"""The papers' findings in miniature, on the tiny world's synthetic task (tiny.py), where the tokens that decide a
preference and the reward of any generated answer are known.

The papers' two protocols (the default), in the headroom world (one-digit sums, a review's polarity, a forbidden
word; models pretrained on its language; the start is llama-small after SFT on an instruction set of mixed quality,
apart from the pairs, so that it has something left to learn):
  base         preference training on off-policy pairs (written by the world's generator);
  instruct     on pairs the start wrote: onpolicy.py, 4 samples per prompt at temperature 1, judged, best against
               worst (ConfPO's Instruct rows, SimPO's recipe).
The first study's regimes (--regimes), the SFT start trained on the chosen answers of the pairs themselves:
  minimal      chosen and rejected share every word but the key (a minimal pair), as the task was first built;
  independent  two answers written each on its own (openers, fillers, order, length), several sentences long, the
               preference still decided by known key content: built like real preference data.

    python experiments.py --threads 1              # both protocols, 3 seeds, into docs/experiments/{base,instruct}
    python experiments.py --tables_only            # their tables and plots again, from the results files alone
    python experiments.py --protocols "" --regimes minimal & python experiments.py --protocols "" \
        --regimes independent & wait               # the first study's regimes, a core each
    python experiments.py --quick                  # every stage and output on a sliver, in runs/experiments-quick

Starting points that know the language: llama micro / tiny / small pretrained from random weights on a corpus of
the world (tiny.pretrained_model); the policy is small, SFT-trained as above; the SePO
oracles start from the pretrained models of their size (SFT, then DPO, on a share of the data: sepo_pipeline.py).

Per regime:
  1. lr sweep: every method at each of --lrs, seed --sweep_seed, judged by the reward of its greedy answers to the
     validation prompts; each method then trains at its own best lr (ties: the smaller KL).
  2. comparison: DPO, IPO, SimPO, ConfPO, ConfPO-rand, ConfPO_DPO and SePO over --seeds (the same data order per
     seed for every method: paired), evaluated on the test split, with curves every --curve_every steps.
  3. SePO: its k, its oracle's data share and size (weak-to-strong), and a remedy, an NLL anchor on the chosen
     response (sepo_loss's lambda_ = --anchor), all at SePO's lr (the regimes; the protocols: SePO's default only).
  4. selections against the planted keys (precision, recall), the share of selected tokens that are neutral words
     selected on one side only, and SePO's selected rejected tokens over training, beside the same words in
     held-out chosen answers.
Every model is evaluated the same way (`evaluate`): reward of greedy answers (the papers' win rates), KL from the
SFT model on sampled answers (ConfPO Fig. 7), accuracy and margin of mean token log-probs on held-out pairs, and the
mean token log-prob of held-out chosen answers. A claimed ordering between two methods holds on every seed or its
95% t-interval of per-seed differences excludes zero (`paired`). Output (`--figures`): results.json, results.md and
SVG plots per regime; runs under --output_dir (a rerun skips what is done; results of another configuration are
never reused).
"""

import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, one folder up

import utils
from utils import DEVICES, arg


@dataclass
class ExperimentConfig:
    output_dir: str = arg("runs/experiments", "runs, models and evaluations (a rerun skips what is done)")
    figures: str = arg("docs/experiments", "where results.json, results.md and the SVG plots go (one folder per "
                                           "regime)")
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world (tokenizers, data)")
    protocols: str = arg("base,instruct", "the papers' protocols, in the headroom world: base (SFT on an instruction "
                                          "set of mixed quality, then off-policy pairs) and instruct (pairs sampled "
                                          "from that start by onpolicy.py, judged, best against worst)")
    regimes: str = arg("", "the first study's regimes, also: minimal, independent (their results are in "
                           "docs/experiments/minimal and independent)")
    protocol_max_new_tokens: int = arg(96, "answer length limit of the protocols' evaluation and sampling (most "
                                           "of the start's answers end within it)")
    threads: int = arg(0, "CPU threads of this process and its runs (0 = every core; 1 when two studies share 2)")
    seeds: str = arg("0,1,2", "seeds of the comparison: data order, ConfPO-rand's draws, the oracle's data share")
    methods: str = arg("dpo,ipo,simpo,confpo,confpo_rand,confpo_dpo,sepo", "the methods compared")
    lrs: str = arg("3e-5,1e-4,3e-4", "the learning rates of the sweep, for every method")
    sweep_seed: int = arg(0, "seed of the sweep's runs (their folders serve the comparison's seed too)")
    ratio: float = arg(0.3, "SePO's k (chosen and rejected) in the comparison and the oracle studies")
    ratios: str = arg("0.1,0.3,0.5,0.7,0.9", "SePO's k swept with the default oracle")
    shares: str = arg("0.1,0.25,0.5,1.0", "oracle data shares (the default oracle uses 0.5)")
    oracle_sizes: str = arg("micro,tiny,small", "oracle sizes (tiny.MODEL_SIZES; the policy is small)")
    anchor: float = arg(1.0, "lambda_ of the remedy: SePO plus an NLL anchor on the chosen response")
    curve_every: int = arg(20, "steps between the checkpoints evaluated for the curves")
    eval_prompts: int = arg(200, "held-out prompts for reward and KL")
    max_new_tokens: int = arg(40, "answer length limit for reward and KL")
    pretrain_epochs: int = arg(2, "epochs of the pretraining corpus (19,000 texts)")
    quick: bool = arg(False, "a smoke run: 1 seed, 1 lr, 2 steps per stage, 128 training pairs, 16 held-out pairs, "
                             "in folders of its own")
    setup_only: bool = arg(False, "build the starting points (pretrained models, SFT models), then stop")
    tables_only: bool = arg(False, "no runs: write results.md and the plots again from each results.json in "
                                   "--figures (after a change to the tables, or without the runs folder)")
    cache_dir: str = arg("", "datasets cache folder")
    device: str = arg("auto", "where to run", options=DEVICES)


def parse_config(argv=None):
    return utils.parse_dataclass(ExperimentConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)

import data  # noqa: E402
import losses  # noqa: E402
import onpolicy  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import sepo_pipeline  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
import rundir  # noqa: E402
from rundir import atomic_write, load_weights  # noqa: E402
from utils import UserError, log0, run_in_group  # noqa: E402

# --quick: a smoke run, in folders of its own (never over the committed results in docs/experiments)
QUICK = dict(seeds="0", lrs="3e-4", ratios="0.1,0.3", shares="0.25,0.5", oracle_sizes="micro,tiny", curve_every=1,
             protocol_max_new_tokens=32,
             eval_prompts=16, output_dir="runs/experiments-quick", figures="runs/experiments-quick/figures")
QUICK_PAIRS = {"train": 128, "valid": 16, "test": 16}
DEFAULT_SHARE, DEFAULT_SIZE = 0.5, "tiny"
SHAPE = ["--max_length", str(tiny.TRAIN_DEFAULTS["max_length"]), "--max_prompt_length",
         str(tiny.TRAIN_DEFAULTS["max_prompt_length"])]  # train.py's tiny shapes, for every stage and for scoring
BATCH = ["--global_batch_size", str(tiny.TRAIN_DEFAULTS["global_batch_size"]), "--micro_batch_size",
         str(tiny.TRAIN_DEFAULTS["micro_batch_size"])]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of one model
# ---------------------------------------------------------------------------------------------------------------

def position_ids(attention_mask):
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each text


@torch.no_grad()
def sequence_kl(model, sft, sequences, answer_mask, pad_id, batch_size=50, attention_mask=None):
    """Per answer: sum over its tokens t of KL(pi(.|x, y<t) || pi_sft(.|x, y<t)), from full distributions.
    attention_mask: the real tokens of the left-padded sequences (default: those that are not pad_id, which is
    right only where the pad token appears nowhere in a prompt)."""
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, answer = sequences[i:i + batch_size], answer_mask[i:i + batch_size]
        attention = ((ids != pad_id) if attention_mask is None else attention_mask[i:i + batch_size].bool()) | answer
        kw = dict(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids(attention))
        logp = torch.log_softmax(model(**kw).logits[:, :-1].float(), -1)  # position t predicts token t + 1
        logq = torch.log_softmax(sft(**kw).logits[:, :-1].float(), -1)
        kl_t = (logp.exp() * (logp - logq)).sum(-1)
        out.append(losses.masked_sum(kl_t, answer[:, 1:]))
    return torch.cat(out)


def left_padded(answers, pad):
    """[(prompt ids, answer ids, ended)] -> left-padded prompt + answer ids (N, T), their attention mask and the
    answer mask (True on answer tokens)."""
    T = max(len(p) + len(a) for p, a, _ in answers)
    ids = torch.full((len(answers), T), pad)
    attention = torch.zeros(len(answers), T, dtype=torch.bool)
    answer = torch.zeros(len(answers), T, dtype=torch.bool)
    for i, (p, a, _) in enumerate(answers):
        ids[i, T - len(p) - len(a):] = torch.tensor(p + a)
        attention[i, T - len(p) - len(a):] = True
        answer[i, T - len(a):] = True
    return ids, attention, answer


@torch.no_grad()
def mean_token_logp(model, answers, pad, device, batch_size=32):
    """A model's mean token log-prob of answers [(prompt ids, answer ids, ended)]: the mean over answers of each
    one's mean."""
    out = []
    for i in range(0, len(answers), batch_size):
        ids, attention, answer = (x.to(device) for x in left_padded(answers[i:i + batch_size], pad))
        logits = model(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids(attention)).logits
        logps, mask = losses.token_logps(logits, torch.where(answer, ids, losses.IGNORE_INDEX))
        out += losses.masked_mean(logps, mask).tolist()
    return statistics.fmean(out)


def distinct2(strings):
    """Distinct-2: unique word bigrams over all bigrams of the answers."""
    grams = [tuple(w[i:i + 2]) for s in strings for w in [s.lower().split()] for i in range(len(w) - 1)]
    return len(set(grams)) / max(len(grams), 1)


@torch.no_grad()
def token_logps(model, batch):
    """Per-token log-probs and response mask of a collated batch (chosen rows, then rejected rows)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return losses.token_logps(logits, batch["labels"])


@torch.no_grad()
def preference(model, batches):
    """Per held-out pair: the mean token log-prob of its chosen and of its rejected answer -> (chosen, rejected)."""
    chosen, rejected = [], []
    for batch in batches:
        logps, mask = token_logps(model, batch)
        avg = losses.masked_mean(logps, mask)
        B = avg.shape[0] // 2
        chosen.append(avg[:B])
        rejected.append(avg[B:])
    return torch.cat(chosen), torch.cat(rejected)


def evaluate(model, ctx, split, sample_seed=1234):
    """reward (greedy answers), KL from the SFT model (sampled answers), accuracy and margin (held-out pairs), and
    chosen_logp: the mean token log-prob of held-out chosen answers, on the split (valid or test)."""
    tok, device, prompts = ctx["tokenizer"], ctx["device"], ctx["prompts"][split]
    greedy = judged(tok, prompts, *tiny.generate_answers(model, tok, prompts, device, ctx["max_new_tokens"]))
    torch.manual_seed(sample_seed)
    seqs, answer = tiny.generate_answers(model, tok, prompts, device, ctx["max_new_tokens"], sample=True)
    kl = sequence_kl(model, ctx["sft"], seqs, answer, tok.pad_token_id)
    chosen, rejected = preference(model, ctx["batches"][split])
    margin = chosen - rejected
    return {"reward": greedy["reward"], "kl": float(kl.mean()), "accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean()), "chosen_logp": float(chosen.mean()), "reward_by_task": greedy["by_task"],
            "ended": greedy["ended"]}


def judged(tok, prompts, sequences, answer_mask):
    """The judge's verdict on generated answers: mean reward, mean per task, the share that ended with an EOS, and
    every reward."""
    answers = tiny.answer_texts(tok, sequences, answer_mask)
    rewards = [tiny.synthetic_reward(p, a) for p, a in zip(prompts, answers)]
    tasks = [tiny.task_of(p) for p in prompts]
    ends = [bool(m.any()) and int(s[m][-1]) == tok.eos_token_id for s, m in zip(sequences, answer_mask)]
    return {"reward": statistics.fmean(rewards), "rewards": rewards, "ended": statistics.fmean(ends),
            "by_task": {t: statistics.fmean(r for r, u in zip(rewards, tasks) if u == t) for t in sorted(set(tasks))}}


def headroom(ctx, split="test", n=4, seed=4321):
    """What the start can reach: its greedy reward, the mean reward of its answers sampled at temperature 1, and
    best-of-n (per prompt the best of n samples), per task too."""
    tok, device, prompts, model = ctx["tokenizer"], ctx["device"], ctx["prompts"][split], ctx["sft"]
    greedy = judged(tok, prompts, *tiny.generate_answers(model, tok, prompts, device, ctx["max_new_tokens"]))
    torch.manual_seed(seed)
    draws = [judged(tok, prompts, *tiny.generate_answers(model, tok, prompts, device, ctx["max_new_tokens"],
                                                         sample=True)) for _ in range(n)]
    best = [max(d["rewards"][i] for d in draws) for i in range(len(prompts))]
    tasks = [tiny.task_of(p) for p in prompts]
    return {"greedy": greedy["reward"], "greedy_by_task": greedy["by_task"], "greedy_ended": greedy["ended"],
            "sampled": statistics.fmean(d["reward"] for d in draws), f"best_of_{n}": statistics.fmean(best),
            f"best_of_{n}_by_task": {t: statistics.fmean(b for b, u in zip(best, tasks) if u == t)
                                     for t in sorted(set(tasks))}}


@torch.no_grad()
def token_analysis(model, a):
    """What SePO does to the tokens it selects (a: analysis_context, the first training pairs with their
    selections, and the held-out chosen answers): the mean log-prob of the selected rejected and chosen tokens,
    and of the same word types as the selected rejected ones where they appear in held-out chosen answers."""
    sums = {"selected_rejected": [0.0, 0], "selected_chosen": [0.0, 0], "same_types_heldout_chosen": [0.0, 0]}
    for batch in a["train"]:
        logps, mask = token_logps(model, batch)
        B = logps.shape[0] // 2
        select = batch["select"].bool() & mask
        for key, rows in (("selected_chosen", slice(0, B)), ("selected_rejected", slice(B, None))):
            sums[key][0] += float(logps[rows][select[rows]].sum())
            sums[key][1] += int(select[rows].sum())
    for batch in a["heldout"]:
        logps, mask = token_logps(model, batch)
        B = logps.shape[0] // 2
        same = mask[:B] & torch.isin(batch["input_ids"][:B], a["types"])
        sums["same_types_heldout_chosen"][0] += float(logps[:B][same].sum())
        sums["same_types_heldout_chosen"][1] += int(same.sum())
    return {k: s / max(n, 1) for k, (s, n) in sums.items()}


# ---------------------------------------------------------------------------------------------------------------
# Runs: each trained once per configuration, each evaluation done once per configuration
# ---------------------------------------------------------------------------------------------------------------

def cached(path, key, fn):
    """fn() once: its result is kept in `path` beside the configuration that produced it (`key`). A result of
    another configuration is never reused: the study stops and names the file."""
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("config") != key:
            raise UserError(f"{path} holds a result of another configuration of the study; choose another "
                            "--output_dir (or delete that file to compute it again)")
        return saved["result"]
    result = fn()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write(path, json.dumps({"config": key, "result": result}, indent=1))
    return result


def essential(argv):
    """A run's flags without those that do not change its result (the datasets cache, the device)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--cache_dir", "--device", "--threads"):
            skip = True
        else:
            keep.append(a)
    return keep


def evaluation(ctx, out, argv, split, curve=False, analysis=None):
    """train.py with `argv` into `out` (a checkpoint every --curve_every steps; train.py finds a finished run
    finished and refuses a folder of another run), then its evaluation on `split`: the final model, and with
    `curve` every checkpoint (step 0 is the SFT model); `analysis`: a selection file whose tokens to follow."""
    key = {"train": essential(argv), "split": split, "curve": curve, "analysis": analysis, "eval": ctx["eval_key"]}

    def go():
        train.main(argv + ["--output_dir", out, "--save_every", str(ctx["curve_every"]), "--keep_last", "0"])
        return evaluate_run(ctx, out, split, curve, analysis)
    return cached(os.path.join(out, f"evaluation_{split}{'_curve' if curve else ''}.json"), key, go)


def evaluate_run(ctx, out, split, curve, analysis):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ctx["sft_path"]).to(ctx["device"])
    actx = analysis_context(ctx, analysis) if analysis else None
    points = []
    if curve:
        points.append({"step": 0, **ctx["sft_eval"][split], **(token_analysis(ctx["sft"], actx) if actx else {})})
        for path in rundir.checkpoints(out):
            load_weights(model, path)
            points.append({"step": int(os.path.basename(path).split("_")[1]), **evaluate(model, ctx, split),
                           **(token_analysis(model, actx) if actx else {})})
    final = points[-1] if curve else evaluate(load_weights(model, os.path.join(out, "final")), ctx, split)
    lines = rundir.read_metrics(os.path.join(out, "metrics.jsonl"))
    own = [line for line in lines if line.get("split") == "eval"][-1]
    selected = [{"step": line["step"], "chosen": line["selected_ratio_chosen"],
                 "rejected": line["selected_ratio_rejected"]}
                for line in lines if line.get("split") == "train" and "selected_ratio_chosen" in line]
    return {"final": {k: v for k, v in final.items() if k != "step"}, "curve": points,
            "own_accuracy": own.get("accuracy"), "own_margin": own.get("margin"), "selected": selected}


def method_run(ctx, method, seed, lr, split, curve=False):
    """A train.py method from the SFT model (every method, SePO included through sepo_run, with the same data,
    steps, batch and optimizer settings)."""
    if method == "sepo":
        return sepo_run(ctx, seed, lr, split, curve=curve)
    out = os.path.join(ctx["dir"], method, f"seed{seed}_lr{lr:g}")
    return evaluation(ctx, out, ctx["train_argv"] + ["--method", method, "--seed", str(seed), "--lr", str(lr)], split,
                      curve)


def oracle(ctx, seed, size=DEFAULT_SIZE, share=DEFAULT_SHARE):
    """sepo_pipeline.py up to its scores: D_m (a share of the training pairs), SFT then DPO from the pretrained
    model of `size`, Eq. 24 scores of every training token -> (pipeline folder, its config)."""
    out = os.path.join(ctx["dir"], "oracles", f"{size}_{share:g}_seed{seed}")
    cfg = sepo_pipeline.PipelineConfig(**{
        **sepo_pipeline.PIPELINE_TINY, "data": ctx["data"]["train"], "eval_data": ctx["data"]["test"],
        "oracle_base": ctx["pretrained"][size], "policy": ctx["sft_path"], "output_dir": out, "subset": share,
        "seed": seed, "chosen_ratio": ctx["ratio"], "rejected_ratio": ctx["ratio"], "max_steps": ctx["max_steps"],
        "cache_dir": ctx["cache_dir"], "device": ctx["device_flag"], "tiny_world": ctx["tiny_world"],
        "until": "scores"})
    if not sepo.scoring_complete(os.path.join(out, "scores")):
        sepo_pipeline.main([f"--{k}={v}" for k, v in asdict(cfg).items()])
    return out, cfg


def selections(ctx, seed, k, size=DEFAULT_SIZE, share=DEFAULT_SHARE):
    """The selection file of ratio k from an oracle; the default oracle's scores are selected at every k of the
    sweep at once (score.py finds every block scored and only selects again)."""
    out, cfg = oracle(ctx, seed, size, share)
    scores = os.path.join(out, "scores")
    ks = sorted({*ctx["ratios"], ctx["ratio"]}) if (size, share) == (DEFAULT_SIZE, DEFAULT_SHARE) else [ctx["ratio"]]
    if not {sepo.selection_name(r, r) for r in ks} <= set(sepo.read_manifest(scores)["selections"]):
        score.main(sepo_pipeline.scoring_argv(cfg, os.path.join(out, "oracle_dpo", "final"),
                                              os.path.join(out, "oracle_sft", "final"), [(r, r) for r in ks], scores))
    return os.path.join(scores, sepo.selection_name(k, k))


def sepo_run(ctx, seed, lr, split, k=None, size=DEFAULT_SIZE, share=DEFAULT_SHARE, anchor=0.0, curve=False):
    """SePO's policy (Eq. 26) from the SFT model on an oracle's selection, with the comparison's settings."""
    k = ctx["ratio"] if k is None else k
    path = selections(ctx, seed, k, size, share)
    name = f"sepo_{size}_{share:g}_k{k:g}" + (f"_anchor{anchor:g}" if anchor else "")
    out = os.path.join(ctx["dir"], name, f"seed{seed}_lr{lr:g}")
    argv = ctx["train_argv"] + ["--method", "sepo", "--selections", path, "--seed", str(seed), "--lr", str(lr)]
    return evaluation(ctx, out, argv + (["--lambda_", str(anchor)] if anchor else []), split, curve,
                      analysis=path if curve else None)


def oracle_report(ctx, seed, size=DEFAULT_SIZE, share=DEFAULT_SHARE):
    """The oracle's stages on held-out pairs: pi_ref's token loss (SFT), the oracle's DPO accuracy and margin."""
    out, _ = oracle(ctx, seed, size, share)
    sft = [m for m in rundir.read_metrics(os.path.join(out, "oracle_sft", "metrics.jsonl")) if m["split"] == "eval"]
    dpo = [m for m in rundir.read_metrics(os.path.join(out, "oracle_dpo", "metrics.jsonl")) if m["split"] == "eval"]
    return {"sft_loss_start": sft[0]["loss"], "sft_loss_end": sft[-1]["loss"], "dpo_accuracy_start":
            dpo[0]["accuracy"], "dpo_accuracy_end": dpo[-1]["accuracy"], "dpo_margin_end": dpo[-1]["margin"]}


# ---------------------------------------------------------------------------------------------------------------
# Selections: against the planted keys, and their anatomy
# ---------------------------------------------------------------------------------------------------------------

def confpo_selection(ctx):
    """ConfPO's selection (Eq. 12-14) under the SFT model on the training data, scored by score.py --confpo."""
    out = os.path.join(ctx["dir"], "confpo_selection")
    if not sepo.scoring_complete(out):
        score.main(["--confpo", "--model", ctx["sft_path"], "--data", ctx["data"]["train"], "--output_dir", out,
                    "--cache_dir", ctx["cache_dir"], "--device", ctx["device_flag"]] + SHAPE)
    return os.path.join(out, "confpo.jsonl")


def anatomy(ctx, path, seed=0):
    """How a selection sits in the responses, beside a random selection of the same sizes: precision and recall
    of the planted key tokens, `one_sided`: the share of selected tokens that are neutral words (not keys, found
    in chosen and rejected answers alike) selected on this side and never on the other, and for rejected answers
    how often the key itself and the token right after it are selected."""
    rows = {r["row"]: r for r in map(json.loads, open(path))}
    tok = ctx["tokenized_train"]
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for kind in ("selection", "random"):
        counts = {"chosen": {}, "rejected": {}}
        neutral_sides = {"chosen": set(), "rejected": set()}
        stats = {s: dict(selected=0, key=0, hit=0, tokens=0) for s in ("chosen", "rejected")}
        at_key, after_key, with_key, picks = 0, 0, 0, {}
        for ex in tok:
            for side in ("chosen", "rejected"):
                ids, keys = data.response_part(ex, side, "input_ids"), data.response_part(ex, side, "key")
                chosen = set(rows[ex["row"]][f"{side}_selected"])
                if kind == "random":
                    order = torch.randperm(len(ids), generator=gen).tolist()
                    chosen = set(order[:len(chosen)])
                picks[(ex["row"], side)] = chosen
                for j, (v, key) in enumerate(zip(ids, keys)):
                    if not key:
                        neutral_sides[side].add(v)
                    if j in chosen:
                        counts[side][v] = counts[side].get(v, 0) + 1
                s = stats[side]
                s["selected"] += len(chosen)
                s["key"] += sum(keys)
                s["hit"] += sum(1 for j in chosen if keys[j])
                s["tokens"] += len(ids)
                if side == "rejected" and any(keys):
                    last = max(j for j, key in enumerate(keys) if key)
                    with_key += 1
                    at_key += any(keys[j] for j in chosen)
                    after_key += (last + 1) in chosen and last + 1 < len(ids) and not keys[last + 1]
        neutral = neutral_sides["chosen"] & neutral_sides["rejected"]
        result = {}
        for side, other in (("chosen", "rejected"), ("rejected", "chosen")):
            one_sided = 0
            for ex in tok:
                ids, keys = data.response_part(ex, side, "input_ids"), data.response_part(ex, side, "key")
                one_sided += sum(1 for j in picks[(ex["row"], side)] if not keys[j] and ids[j] in neutral
                                 and ids[j] not in counts[other])
            s = stats[side]
            result[side] = {"selected_fraction": s["selected"] / max(s["tokens"], 1),
                            "precision": s["hit"] / max(s["selected"], 1), "recall": s["hit"] / max(s["key"], 1),
                            "one_sided": one_sided / max(s["selected"], 1)}
        result["rejected"].update(key_selected=at_key / max(with_key, 1), after_key_selected=after_key / max(with_key, 1))
        out[kind] = result
    return out


def analysis_context(ctx, path):
    """The batches token_analysis reads for a selection: the first 256 training pairs with their selections, the
    types of the non-key tokens selected on their rejected side, and the held-out pairs."""
    rows = {r["row"]: r for r in map(json.loads, open(path))}
    tok = ctx["tokenized_train"].select(range(min(256, len(ctx["tokenized_train"]))))
    tok = sepo.attach_selections(tok, sepo.load_selections(path), path)
    pad = ctx["tokenizer"].pad_token_id
    batches = [{k: v.to(ctx["device"]) for k, v in data.collate_pairs([tok[j] for j in range(i, min(i + 32, len(tok)))],
                                                                      pad, token_fields=("select",)).items()}
               for i in range(0, len(tok), 32)]
    types = set()
    for ex in tok:
        ids, keys = data.response_part(ex, "rejected", "input_ids"), data.response_part(ex, "rejected", "key")
        types |= {ids[j] for j in rows[ex["row"]]["rejected_selected"] if not keys[j]}
    return {"train": batches, "heldout": ctx["batches"]["test"],
            "types": torch.tensor(sorted(types), dtype=torch.long, device=ctx["device"])}


# ---------------------------------------------------------------------------------------------------------------
# Setting up: the starting points, the data of a regime, the evaluation sets
# ---------------------------------------------------------------------------------------------------------------

def starting_points(cfg, paths, regimes=("minimal", "independent"), sizes=None):
    """The pretrained models of every size asked for (policy and oracles; the sizes of --oracle_sizes by default),
    built once in --output_dir/models, and their held-out losses before and after pretraining."""
    sizes = sorted({*(sizes or cfg.oracle_sizes.split(",")), "small"}, key=list(tiny.MODEL_SIZES).index)
    steps = {"max_steps": 2} if cfg.quick else {}
    pretrained = {size: tiny.pretrained_model(cfg.output_dir, paths, size, train.main, epochs=cfg.pretrain_epochs,
                                              cache_dir=cfg.cache_dir, regimes=regimes, **steps) for size in sizes}
    return pretrained, {size: held_out_loss(path) for size, path in pretrained.items()}


def held_out_loss(model_path):
    """The first and last held-out loss of the run that trained a cached model (tiny.trained keeps its metrics)."""
    evals = [m for m in rundir.read_metrics(os.path.join(model_path, "metrics.jsonl")) if m["split"] == "eval"]
    return {"start": evals[0]["loss"], "end": evals[-1]["loss"]}


def head_lines(src, dst, n):
    with open(src) as fh:
        lines = [next(fh) for _ in range(n)]
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    atomic_write(dst, "".join(lines))
    return dst


def split_files(cfg, folder, paths, regime):
    """The train / valid / test pairs of a regime (--quick: their first lines, copied into folder)."""
    split_data = {s: paths[f"{s}_{regime}"] for s in ("train", "valid", "test")}
    if cfg.quick:
        split_data = {s: head_lines(p, os.path.join(folder, f"{s}.jsonl"), QUICK_PAIRS[s]) for s, p in split_data.items()}
    return split_data


def sft_start(cfg, name, data_path, eval_path, pretrained):
    """The small pretrained llama after SFT on data_path (2 epochs), built once: a study's start."""
    return tiny.trained(cfg.output_dir, name, {
        **tiny.TRAIN_DEFAULTS, "method": "sft", "model": pretrained["small"], "data": data_path,
        "eval_data": eval_path, "eval_every": 10**9, "epochs": 2, "tiny_world": cfg.tiny_world,
        "cache_dir": cfg.cache_dir, "seed": 42, "judge": "none", "threads": cfg.threads,
        **({"max_steps": 2} if cfg.quick else {})}, train.main)


def setup(cfg, regime, paths, pretrained, device):
    """Everything a regime's runs share: its data, the SFT model (pretrained small, SFT on the chosen answers)."""
    folder = os.path.join(cfg.output_dir, regime)
    split_data = split_files(cfg, folder, paths, regime)
    sft_path = sft_start(cfg, f"llama-small-pt-sft-{regime}", split_data["train"], split_data["test"], pretrained)
    return contexts_of(cfg, regime, folder, split_data, sft_path, pretrained, device, cfg.max_new_tokens)


def setup_protocol(cfg, protocol, paths, pretrained, device):
    """A protocol of the papers in the headroom world. The start, for both: the small llama pretrained on the
    world's language, then SFT on an instruction set of its own, of mixed quality (tiny.write_instructions).
    base: preference training on the world's off-policy pairs. instruct: on pairs the start wrote (onpolicy.py:
    4 samples per training prompt at temperature 1, judged, best against worst)."""
    folder = os.path.join(cfg.output_dir, protocol)
    split_data = split_files(cfg, folder, paths, "headroom")
    instructions = paths["instructions_train"] if not cfg.quick else head_lines(
        paths["instructions_train"], os.path.join(cfg.output_dir, "instructions-quick.jsonl"), QUICK_PAIRS["train"])
    sft_path = sft_start(cfg, "llama-small-pt-headroom-sft-mixed", instructions, split_data["test"], pretrained)
    if protocol == "instruct":
        out = os.path.join(folder, "onpolicy")
        prompts = split_data["train"] if not cfg.quick else head_lines(  # --quick: an untrained start ties often
            paths["train_headroom"], os.path.join(folder, "prompts-quick.jsonl"), 4 * QUICK_PAIRS["train"])
        onpolicy.main(["--model", sft_path, "--prompts", prompts, "--reward", "tiny:synthetic_reward",
                       "--key_spans", "tiny:synthetic_key_spans", "--num_samples", "4", "--temperature", "1.0",
                       "--top_p", "1.0", "--max_new_tokens", str(cfg.protocol_max_new_tokens), "--max_prompt_length",
                       str(tiny.TRAIN_DEFAULTS["max_prompt_length"]), "--batch_size", "32", "--block_size", "512",
                       "--output_dir", out, "--cache_dir", cfg.cache_dir, "--device", cfg.device, "--threads",
                       str(cfg.threads)] + (["--keep_unfinished"] if cfg.quick else []))  # --quick: an untrained start
        split_data["train"] = os.path.join(out, "pairs.jsonl")
        with open(os.path.join(out, "manifest.json")) as fh:
            kept = json.load(fh)["summary"]["pairs"]
        if kept < 2 * int(tiny.TRAIN_DEFAULTS["global_batch_size"]):  # SePO's oracle trains on half of them
            raise UserError(f"{out}: {kept} on-policy pairs, fewer than two batches: the start's samples tie")
    return contexts_of(cfg, protocol, folder, split_data, sft_path, pretrained, device, cfg.protocol_max_new_tokens)


def contexts_of(cfg, name, folder, split_data, sft_path, pretrained, device, max_new_tokens):
    """What every run of a regime or protocol shares: the evaluation sets of valid and test, the start's
    evaluation, the base flags of every run."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    steps = ["--max_steps", "2"] if cfg.quick else ["--max_steps", "-1"]
    tokenizer = AutoTokenizer.from_pretrained(sft_path, padding_side="left")
    tokenized, batches, prompts = {}, {}, {}
    for s in ("train", "valid", "test"):
        pairs = data.load_preferences(split_data[s], cache_dir=cfg.cache_dir or None)
        tokenized[s], _ = data.tokenize_preferences(pairs, tokenizer, tiny.TRAIN_DEFAULTS["max_length"],
                                                    tiny.TRAIN_DEFAULTS["max_prompt_length"])
        prompts[s] = [row["prompt"] for row in pairs][:cfg.eval_prompts]
        held = tokenized[s].select(range(min(200, len(tokenized[s]))))
        batches[s] = [{k: v.to(device) for k, v in data.collate_pairs([held[j] for j in range(i, min(i + 50, len(
            held)))], tokenizer.pad_token_id).items()} for i in range(0, len(held), 50)]
    ctx = dict(dir=folder, regime=name, tiny_world=cfg.tiny_world, cache_dir=cfg.cache_dir, device=device,
               device_flag=cfg.device, sft_path=sft_path, data=split_data, pretrained=pretrained, ratio=cfg.ratio,
               ratios=[float(k) for k in cfg.ratios.split(",")], curve_every=cfg.curve_every, max_steps=int(steps[1]),
               tokenizer=tokenizer, prompts=prompts, batches=batches, tokenized_train=tokenized["train"],
               max_new_tokens=max_new_tokens, threads=cfg.threads, sepo_studies=name in tiny.REGIMES and name !=
               "headroom", eval_key={"prompts": cfg.eval_prompts, "max_new_tokens": max_new_tokens, "sft": sft_path,
                                     "data": split_data})
    ctx["train_argv"] = (["--model", sft_path, "--data", split_data["train"], "--eval_data", split_data["test"],
                          "--eval_every", str(10**9), "--log_every", "1" if cfg.quick else "5"] + SHAPE + BATCH +
                         ["--judge", "none", "--cache_dir", cfg.cache_dir, "--device", cfg.device] + steps +
                         (["--threads", str(cfg.threads)] if cfg.threads else []))
    ctx["sft"] = AutoModelForCausalLM.from_pretrained(sft_path).to(device).eval()
    ctx["sft_eval"] = {s: evaluate(ctx["sft"], ctx, s) for s in ("valid", "test")}
    ctx["sft_loss"] = held_out_loss(sft_path)
    return ctx


# ---------------------------------------------------------------------------------------------------------------
# The study of one regime
# ---------------------------------------------------------------------------------------------------------------

def study_regime(cfg, ctx):
    """Sweep, comparison, SePO's studies and the selections' anatomy of one regime -> its results."""
    methods, seeds = cfg.methods.split(","), [int(s) for s in cfg.seeds.split(",")]
    lrs = [float(x) for x in cfg.lrs.split(",")]
    res = {"stages": {"sft_loss": ctx["sft_loss"]}, "sweep": {}, "best_lr": {}, "runs": {}, "anatomy": {},
           "sft_valid": ctx["sft_eval"]["valid"]}
    # 1. the lr sweep, judged on the validation split
    for method in methods:
        log0(f"\n==== {ctx['regime']}: sweep {method} ====")
        sweep = {f"{lr:g}": method_run(ctx, method, cfg.sweep_seed, lr, "valid")["final"] for lr in lrs}
        res["sweep"][method] = sweep
        res["best_lr"][method] = float(max(sweep, key=lambda lr: (sweep[lr]["reward"], -sweep[lr]["kl"])))
    lr_sepo = res["best_lr"].get("sepo", lrs[0])
    # 2-3. the comparison and SePO's studies, on the test split
    for seed in seeds:
        r = res["runs"][seed] = {"sft": {"final": ctx["sft_eval"]["test"], "curve": [], "own_accuracy": None,
                                         "own_margin": None, "selected": []}}
        for method in methods:
            log0(f"\n==== {ctx['regime']}: seed {seed}, {method} at lr {res['best_lr'][method]:g} ====")
            r[method] = method_run(ctx, method, seed, res["best_lr"][method], "test", curve=True)
        if "sepo" not in methods:
            continue
        if not ctx["sepo_studies"]:  # the protocols: SePO at its default oracle and k only
            res["stages"].setdefault("oracles", {})[seed] = {f"{DEFAULT_SIZE}_{DEFAULT_SHARE:g}": oracle_report(
                ctx, seed)}
            res["anatomy"][f"sepo_seed{seed}"] = {f"k{ctx['ratio']:g}": anatomy(ctx, selections(ctx, seed,
                                                                                             ctx["ratio"]))}
            continue
        log0(f"\n==== {ctx['regime']}: seed {seed}, SePO's studies at lr {lr_sepo:g} ====")
        r["sepo_anchor"] = sepo_run(ctx, seed, lr_sepo, "test", anchor=cfg.anchor, curve=True)
        for k in ctx["ratios"]:
            r[f"sepo_k{k:g}"] = r["sepo"] if k == ctx["ratio"] else sepo_run(ctx, seed, lr_sepo, "test", k=k)
        for share in [float(x) for x in cfg.shares.split(",")]:
            r[f"sepo_{DEFAULT_SIZE}_{share:g}"] = r["sepo"] if share == DEFAULT_SHARE else sepo_run(
                ctx, seed, lr_sepo, "test", share=share)
        for size in cfg.oracle_sizes.split(","):
            r[f"sepo_{size}_{DEFAULT_SHARE:g}"] = r["sepo"] if size == DEFAULT_SIZE else sepo_run(
                ctx, seed, lr_sepo, "test", size=size)
        res["stages"].setdefault("oracles", {})[seed] = {
            f"{size}_{share:g}": oracle_report(ctx, seed, size, share)
            for size, share in [(DEFAULT_SIZE, float(s)) for s in cfg.shares.split(",")]
            + [(z, DEFAULT_SHARE) for z in cfg.oracle_sizes.split(",")]}
        res["anatomy"][f"sepo_seed{seed}"] = {f"k{k:g}": anatomy(ctx, selections(ctx, seed, k)) for k in ctx["ratios"]}
    # 4. ConfPO's selection under the SFT model
    res["anatomy"]["confpo"] = anatomy(ctx, confpo_selection(ctx))
    for run_dir in (os.path.join(root, d) for root, dirs, _ in os.walk(ctx["dir"]) for d in dirs if d == "checkpoints"):
        shutil.rmtree(run_dir, ignore_errors=True)  # only the curves needed them; every evaluation is kept
    return res


# ---------------------------------------------------------------------------------------------------------------
# Summaries: mean and spread over seeds, and differences paired by seed
# ---------------------------------------------------------------------------------------------------------------

METRICS = ("reward", "kl", "accuracy", "margin", "chosen_logp")


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs):
    """{run name: {metric: [mean, std]}} over seeds."""
    out = {}
    for name in next(iter(runs.values())):
        rows = [runs[s][name] for s in runs if name in runs[s]]
        out[name] = {m: mean_std([r["final"][m] for r in rows]) for m in METRICS}
        out[name].update({m: mean_std([r[m] for r in rows]) for m in ("own_accuracy", "own_margin")})
    return out


def paired(runs, name, base, metric):
    """The per-seed differences name - base on a metric, their mean, 95% t-interval, and what may be claimed:
    "higher" or "lower" when every seed agrees or the interval excludes zero, else "no claim"."""
    diffs = [runs[s][name]["final"][metric] - runs[s][base]["final"][metric] for s in runs
             if name in runs[s] and base in runs[s]]
    mean = statistics.fmean(diffs)
    half = T_975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0
    sure = all(d > 0 for d in diffs) or all(d < 0 for d in diffs) or (len(diffs) > 1 and abs(mean) > half)
    verdict = ("higher" if mean > 0 else "lower") if sure and mean != 0 else "no claim"
    return {"diffs": diffs, "mean": mean, "ci95": [mean - half, mean + half], "verdict": verdict}


# The papers' orderings between two methods (a, b: "a beats b"), besides every method against SimPO and the start
CLAIMS = [("confpo", "confpo_rand", "ConfPO beats random selection (ConfPO Table 2)"),
          ("confpo_dpo", "dpo", "ConfPO_DPO beats DPO (ConfPO Table 4)"),
          ("sepo", "dpo", "SePO beats DPO (SePO Tables 1-2)")]


def pairs_of(runs, summary):
    """The paired comparisons: "name-sft" (reward), "name" against SimPO (reward and accuracy), "a-b" of CLAIMS."""
    pairs = {}
    for name in summary:
        if name != "sft":
            pairs[f"{name}-sft"] = paired(runs, name, "sft", "reward")
        if name not in ("sft", "simpo") and "simpo" in summary:
            pairs[name] = {m: paired(runs, name, "simpo", m) for m in ("reward", "accuracy")}
    for a, b, _ in CLAIMS:
        if a in summary and b in summary:
            pairs[f"{a}-{b}"] = paired(runs, a, b, "reward")
    return pairs


def mean_curve(runs, name, key):
    """The mean over seeds of a run's curve: [(step, mean of key)] on the steps every seed has."""
    curves = [{p["step"]: p[key] for p in runs[s][name]["curve"] if key in p} for s in runs if name in runs[s]]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    return steps, [statistics.fmean(c[t] for c in curves) for t in steps]


# ---------------------------------------------------------------------------------------------------------------
# Plots: hand-written SVG (no plotting dependency)
# ---------------------------------------------------------------------------------------------------------------

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
def _ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def svg_panel(x0, y0, w, h, panel):
    """One chart at (x0, y0): panel = {title, xlabel, ylabel, series: [{label, x, y, err?, colour?, dashed?}],
    xticks? / yticks?: [(value, text)] (categorical?: the x are category indices), points_only?: no lines}."""
    xs = [v for s in panel["series"] for v in s["x"]]
    ys = [v + sgn * e for s in panel["series"] for v, e in zip(s["y"], s.get("err") or [0] * len(s["y"]))
          for sgn in (-1, 1)]
    xt = [t for t, _ in panel["xticks"]] if panel.get("xticks") else _ticks(min(xs), max(xs))
    yt = [t for t, _ in panel["yticks"]] if panel.get("yticks") else _ticks(min(ys), max(ys))
    xlo, xhi = min(xt + xs), max(xt + xs)
    if panel.get("categorical"):
        xlo, xhi = xlo - 0.5, xhi + 0.5
    ylo, yhi = min(yt + ys), max(yt + ys)
    legend = 24 + 6.5 * max(len(s["label"]) for s in panel["series"])  # the legend sits right of the axes
    below = 62 if panel.get("categorical") else 38  # room for slanted category names
    left, right, top, bottom = x0 + 52, x0 + w - 10 - legend, y0 + 24, y0 + h - below
    px = lambda v: left + (v - xlo) / ((xhi - xlo) or 1) * (right - left)  # noqa: E731
    py = lambda v: bottom - (v - ylo) / ((yhi - ylo) or 1) * (bottom - top)  # noqa: E731
    o = [f'<text x="{(left + right) / 2}" y="{y0 + 14}" text-anchor="middle" font-weight="bold">'
         f'{escape(panel["title"])}</text>',
         f'<rect x="{left}" y="{top}" width="{right - left}" height="{bottom - top}" fill="none" stroke="#999"/>']
    for v, text in panel.get("yticks") or [(v, f"{v:g}") for v in yt]:
        o.append(f'<line x1="{left}" x2="{right}" y1="{py(v):.1f}" y2="{py(v):.1f}" stroke="#eee"/>'
                 f'<text x="{left - 4}" y="{py(v) + 4:.1f}" text-anchor="end">{escape(str(text))}</text>')
    for v, text in panel.get("xticks") or [(v, f"{v:g}") for v in xt]:
        slant = f' text-anchor="end" transform="rotate(-30 {px(v):.1f} {bottom + 14})"' if panel.get("categorical") \
            else ' text-anchor="middle"'
        o.append(f'<text x="{px(v):.1f}" y="{bottom + 14}"{slant}>{escape(str(text))}</text>')
    o.append(f'<text x="{(left + right) / 2}" y="{y0 + h - 6}" text-anchor="middle">{escape(panel["xlabel"])}</text>')
    o.append(f'<text transform="translate({x0 + 12},{(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
             f'{escape(panel["ylabel"])}</text>')
    for i, s in enumerate(panel["series"]):
        c = s.get("colour") or COLOURS[i % len(COLOURS)]
        pts = [(px(a), py(b)) for a, b in zip(s["x"], s["y"])]
        if len(pts) > 1 and not panel.get("points_only"):
            dash = ' stroke-dasharray="4 3"' if s.get("dashed") else ""
            o.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.6"{dash} points="' +
                     " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for (a, b), v, e in zip(pts, s["y"], s.get("err") or [None] * len(pts)):
            if e:
                o.append(f'<line x1="{a:.1f}" x2="{a:.1f}" y1="{py(v - e):.1f}" y2="{py(v + e):.1f}" stroke="{c}"/>')
            o.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>')
        o.append(f'<rect x="{right + 8}" y="{top + 6 + 14 * i}" width="10" height="10" fill="{c}"/>'
                 f'<text x="{right + 22}" y="{top + 15 + 14 * i}">{escape(s["label"])}</text>')
    return o


def write_svg(path, panels, width=420, height=300):
    """Panels side by side in one SVG file, written through a temporary file."""
    body = [line for i, p in enumerate(panels) for line in svg_panel(i * width, 0, width, height, p)]
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(panels)}" height="{height}" '
           f'font-family="sans-serif" font-size="11"><rect width="100%" height="100%" fill="white"/>'
           + "".join(body) + "</svg>\n")
    atomic_write(path, svg)
    return path


def plot_regime(cfg, regime, res, summary, d):
    """The SVG plots of one regime into folder d."""
    runs = res["runs"]
    methods = ["sft"] + cfg.methods.split(",")
    cat = list(enumerate(methods))

    def dots(metric, label):
        return {"title": label, "xlabel": "", "ylabel": label, "xticks": cat, "categorical": True, "points_only": True,
                "series": [{"label": "mean ± std over seeds", "x": list(range(len(methods))),
                            "y": [summary[m][metric][0] for m in methods],
                            "err": [summary[m][metric][1] for m in methods]}]}
    files = {"methods": write_svg(os.path.join(d, "methods.svg"), [
        dots("reward", f"reward of greedy answers ({regime})"), dots("accuracy", "held-out accuracy")], width=560)}
    with_curves = [m for m in methods[1:] + ["sepo_anchor"] if runs[next(iter(runs))].get(m, {}).get("curve")]
    by_kl, kl_by_step, reward_by_step = [], [], []
    for i, m in enumerate(with_curves):
        steps, kl = mean_curve(runs, m, "kl")
        _, reward = mean_curve(runs, m, "reward")
        log_kl = [math.log1p(max(v, 0.0)) for v in kl]
        colour = COLOURS[i % len(COLOURS)]
        by_kl.append({"label": m, "x": log_kl, "y": reward, "colour": colour})
        kl_by_step.append({"label": m, "x": steps, "y": log_kl, "colour": colour})
        reward_by_step.append({"label": m, "x": steps, "y": reward, "colour": colour})
    top = max(max(s["x"]) for s in by_kl)
    kl_ticks = [(math.log1p(v), f"{v:g}") for v in (0, 1, 3, 10, 30, 100, 300, 1000, 3000, 10000)]
    kl_ticks = kl_ticks[:next((i + 1 for i, (t, _) in enumerate(kl_ticks) if t >= top), len(kl_ticks))]
    kl_label = "KL from SFT, nats per answer (log scale)"
    files["kl_reward"] = write_svg(os.path.join(d, "kl_reward.svg"), [
        {"title": "reward against KL (ConfPO Fig. 7)", "xticks": kl_ticks, "xlabel": kl_label, "ylabel": "reward",
         "series": by_kl},
        {"title": "reward over training", "xlabel": "step", "ylabel": "reward", "series": reward_by_step},
        {"title": "KL from the SFT model over training", "xlabel": "step", "ylabel": kl_label, "series": kl_by_step,
         "yticks": kl_ticks}], width=500, height=330)
    sel = []
    for colour, m in zip(COLOURS, ("confpo", "confpo_dpo")):
        rows = [runs[s][m]["selected"] for s in runs if m in runs[s] and runs[s][m]["selected"]]
        if rows:
            steps = [p["step"] for p in rows[0]]
            for side in ("chosen", "rejected"):
                sel.append({"label": f"{m} {side}", "x": steps, "dashed": side == "rejected", "colour": colour,
                            "y": [statistics.fmean(r[i][side] for r in rows) for i in range(len(steps))]})
    if sel:
        files["confpo_selected"] = write_svg(os.path.join(d, "confpo_selected.svg"), [
            {"title": "ConfPO: share of response tokens selected", "xlabel": "step", "ylabel": "selected tokens",
             "series": sel}], width=520)
    if "sepo" in methods and "sepo_anchor" in summary:  # SePO's studies (the first study's regimes)
        files.update(plot_sepo(cfg, res, summary, d))
    return files


def plot_sepo(cfg, res, summary, d):
    """SePO's studies (k, oracle share, oracle size) and the collapse: its selected rejected tokens over training,
    beside the same words in held-out chosen answers, with and without the anchor."""
    runs = res["runs"]

    def sweep(names, xs, metric, title, xlabel, xticks=None):
        return {"title": title, "xlabel": xlabel, "ylabel": metric, "xticks": xticks, "categorical": bool(xticks),
                "series": [{"label": "SePO", "x": xs, "y": [summary[n][metric][0] for n in names],
                            "err": [summary[n][metric][1] for n in names]},
                           {"label": "SFT", "x": xs, "y": [summary["sft"][metric][0]] * len(xs), "dashed": True,
                            "colour": "#7f7f7f"}]}
    ks = [float(k) for k in cfg.ratios.split(",")]
    shares = [float(s) for s in cfg.shares.split(",")]
    sizes = cfg.oracle_sizes.split(",")
    files = {"sepo": write_svg(os.path.join(d, "sepo.svg"), [
        sweep([f"sepo_k{k:g}" for k in ks], ks, "accuracy", "SePO: token ratio k", "k (chosen and rejected)"),
        sweep([f"sepo_k{k:g}" for k in ks], ks, "reward", "SePO: token ratio k", "k (chosen and rejected)"),
        sweep([f"sepo_{DEFAULT_SIZE}_{s:g}" for s in shares], shares, "reward", "SePO: oracle data share",
              "share of the data the oracle saw"),
        sweep([f"sepo_{z}_{DEFAULT_SHARE:g}" for z in sizes], list(range(len(sizes))), "reward",
              "SePO: oracle size (policy: small)", "oracle", list(enumerate(sizes)))], width=330)}
    series = []
    for colour, name in zip(COLOURS, ("sepo", "sepo_anchor")):
        for key, dashed in (("selected_rejected", False), ("same_types_heldout_chosen", True)):
            steps, ys = mean_curve(runs, name, key)
            if steps:
                series.append({"label": f"{name}: {key.replace('_', ' ')}", "x": steps, "y": ys, "colour": colour,
                               "dashed": dashed})
    if series:
        files["collapse"] = write_svg(os.path.join(d, "collapse.svg"), [
            {"title": "SePO's selected rejected tokens, and the same words in held-out chosen answers",
             "xlabel": "step", "ylabel": "mean log-prob", "series": series}], width=760, height=340)
    return files


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def fmt(pair, digits=3):
    mean, std = pair
    return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def regime_markdown(cfg, regime, res, summary, pairs):
    """The tables of one regime (results.md)."""
    runs, stages = res["runs"], res["stages"]
    n = len(runs)
    kind = "Regime" if regime in ("minimal", "independent") else "Protocol"
    out = [f"## {kind}: {regime}", "", f"Mean ± standard deviation over {n} seed(s), test split.", ""]
    if "headroom" in stages:  # what the start can reach, before any preference training
        h = stages["headroom"]
        tasks = sorted(h["greedy_by_task"])
        out += ["The start's headroom (test prompts; best of 4: per prompt the best of 4 answers sampled at "
                "temperature 1):", "", "| | all | " + " | ".join(tasks) + " |",
                "| --- |" + " --- |" * (len(tasks) + 1),
                f"| greedy | {h['greedy']:.3f} | " + " | ".join(f"{h['greedy_by_task'][t]:.3f}" for t in tasks) + " |",
                f"| best of 4 | {h['best_of_4']:.3f} | " + " | ".join(f"{h['best_of_4_by_task'][t]:.3f}"
                                                                    for t in tasks) + " |",
                "", f"Sampled answers' mean reward {h['sampled']:.3f}; {h['greedy_ended']:.0%} of the greedy answers "
                "end within the evaluation's length limit.", ""]
        names = [m for m in ["sft"] + cfg.methods.split(",") if all(m in runs[s] for s in runs)]
        by_task = {m: {t: statistics.fmean(runs[s][m]["final"]["reward_by_task"][t] for s in runs) for t in tasks}
                   for m in names}
        out += ["Greedy reward per task, mean of seeds:", "", "| method | " + " | ".join(tasks) + " |",
                "| --- |" + " --- |" * len(tasks)]
        out += [f"| {m} | " + " | ".join(f"{v[t]:.3f}" for t in tasks) + " |" for m, v in by_task.items()]
        out.append("")
    out += [
           "Starting points (held-out token loss, nats):", "",
           "| model | before | after |", "| --- | --- | --- |"]
    for size, loss in stages["pretrain"].items():
        out.append(f"| llama-{size} pretrained | {loss['start']:.3f} | {loss['end']:.3f} |")
    out.append(f"| llama-small-pt SFT ({regime}) | {stages['sft_loss']['start']:.3f} | {stages['sft_loss']['end']:.3f} |")
    oracles = stages.get("oracles", {})
    if oracles:
        out += ["", "The oracles on held-out pairs: pi_ref's token loss after its SFT on D_m, and the DPO oracle's "
                    "reward accuracy and margin (beta log pi_oracle/pi_ref summed; at the start every margin is 0).",
                "", "| oracle (size, share of the data) | pi_ref loss | DPO accuracy | DPO margin |",
                "| --- | --- | --- | --- |"]
        for name in next(iter(oracles.values())):
            rows = [o[name] for o in oracles.values()]
            m = lambda k: fmt(mean_std([r[k] for r in rows]))  # noqa: E731
            out.append(f"| {name} | {m('sft_loss_end')} | {m('dpo_accuracy_end')} | {m('dpo_margin_end')} |")
    lrs = list(next(iter(res["sweep"].values()))) if res["sweep"] else []
    out += ["", f"Learning-rate sweep (seed {cfg.sweep_seed}, validation split): reward of greedy answers (KL from "
                f"SFT); each method trains at its best (bold; ties go to the smaller KL). The SFT model's reward "
                f"there: {res['sft_valid']['reward']:.3f}.", "",
            "| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " |", "| --- |" + " --- |" * len(lrs)]
    for method, sweep in res["sweep"].items():
        cells = [(f"**{v['reward']:.3f}** ({v['kl']:.1f})" if float(lr) == res["best_lr"][method] else
                  f"{v['reward']:.3f} ({v['kl']:.1f})") for lr, v in sweep.items()]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    out += ["", "| method | lr | reward (greedy) | KL from SFT | accuracy | margin | chosen log-prob | reward - SFT, "
                "per seed | reward - SimPO, per seed | accuracy - SimPO, per seed |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in ["sft"] + cfg.methods.split(",") + (["sepo_anchor"] if "sepo_anchor" in summary else []):
        s = summary[m]
        lr = res["best_lr"].get(m, res["best_lr"].get("sepo") if m == "sepo_anchor" else None)
        vs = [pairs.get(f"{m}-sft")] + [pairs.get(m, {}).get(k) for k in ("reward", "accuracy")]
        cells = ["–" if v is None else f"{v['mean']:+.3f} [{', '.join(f'{d:+.3f}' for d in v['diffs'])}] "
                 f"{v['verdict']}" for v in vs]
        out.append(f"| {m} | {'–' if lr is None else f'{lr:g}'} | {fmt(s['reward'])} | {fmt(s['kl'], 1)} | "
                   f"{fmt(s['accuracy'])} | {fmt(s['margin'])} | {fmt(s['chosen_logp'])} | " + " | ".join(cells) + " |")
    claims = [(text, pairs[f"{a}-{b}"]) for a, b, text in CLAIMS if f"{a}-{b}" in pairs]
    if claims:
        out += ["", "The papers' other orderings (reward of greedy answers, paired by seed):", "",
                "| claim | difference per seed | mean | verdict |", "| --- | --- | --- | --- |"]
        out += [f"| {text} | {', '.join(f'{d:+.3f}' for d in v['diffs'])} | {v['mean']:+.3f} | {v['verdict']} |"
                for text, v in claims]
    names = [n for n in summary if n.startswith("sepo_") and n != "sepo_anchor"]
    if names:
        out += ["", "| SePO run | reward (greedy) | accuracy | KL from SFT | reward - SFT, per seed |",
                "| --- | --- | --- | --- | --- |"]
        for name in names:
            v = pairs[f"{name}-sft"]
            out.append(f"| {name} | {fmt(summary[name]['reward'])} | {fmt(summary[name]['accuracy'])} | "
                       f"{fmt(summary[name]['kl'], 1)} | {v['mean']:+.3f} {v['verdict']} |")
    out += ["", "Selections against the planted keys (a random selection of the same sizes beside each):", "",
            "| selection | side | selected | key precision | key recall | one-sided neutral | random: precision "
            "| random: one-sided |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, a in selection_rows(res):
        for side in ("chosen", "rejected"):
            x, r = a["selection"][side], a["random"][side]
            out.append(f"| {name} | {side} | {x['selected_fraction']:.3f} | {x['precision']:.3f} | {x['recall']:.3f} | "
                       f"{x['one_sided']:.3f} | {r['precision']:.3f} | {r['one_sided']:.3f} |")
    out += ["", "Rejected answers: how often the selection holds the key itself, and the token right after it:", "",
            "| selection | key selected | token after the key selected | random: key | random: after |",
            "| --- | --- | --- | --- | --- |"]
    for name, a in selection_rows(res):
        x, r = a["selection"]["rejected"], a["random"]["rejected"]
        out.append(f"| {name} | {x['key_selected']:.3f} | {x['after_key_selected']:.3f} | {r['key_selected']:.3f} | "
                   f"{r['after_key_selected']:.3f} |")
    collapse = [(name, key) for name in ("sepo", "sepo_anchor") for key in ("selected_rejected", "selected_chosen",
                                                                              "same_types_heldout_chosen")
                if mean_curve(runs, name, key)[0]]
    if collapse:
        out += ["", "What SePO does to the tokens it selects (mean log-prob over training, mean of seeds):", "",
                "| run | tokens | at the SFT start | at the end |", "| --- | --- | --- | --- |"]
        for name, key in collapse:
            steps, ys = mean_curve(runs, name, key)
            out.append(f"| {name} | {key.replace('_', ' ')} | {ys[0]:.3f} | {ys[-1]:.3f} |")
    return "\n".join(out) + "\n"


def selection_rows(res):
    """(name, anatomy) of ConfPO's selection and of SePO's at each k, averaged over seeds."""
    rows = [("ConfPO (SFT model)", res["anatomy"]["confpo"])]
    seeds = [v for k, v in res["anatomy"].items() if k.startswith("sepo_seed")]
    for k in (seeds[0] if seeds else {}):
        rows.append((f"SePO {k.replace('k', 'k=')}", average_anatomy([s[k] for s in seeds])))
    return rows


def average_anatomy(items):
    return {kind: {side: {m: statistics.fmean(i[kind][side][m] for i in items) for m in items[0][kind][side]}
                   for side in items[0][kind]} for kind in items[0]}


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def configure(argv=None):
    """The study's config from flags, with --quick's defaults where the flags say nothing."""
    cfg, explicit = parse_config(argv)
    if cfg.quick:
        for key, value in QUICK.items():
            if key not in explicit:
                setattr(cfg, key, value)
    return cfg


def main(argv=None):
    cfg = configure(argv)
    return run_in_group(cfg.device, lambda rank, world, device: study(cfg, world, device))


def study(cfg, world, device):
    t0 = time.time()
    if world > 1:
        raise UserError("experiments.py runs in one process (its runs are tiny); start it with python, not torchrun")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    protocols, regimes = [x for x in cfg.protocols.split(",") if x], [x for x in cfg.regimes.split(",") if x]
    if cfg.tables_only:
        for name in protocols + regimes:
            path = os.path.join(cfg.figures, name, "results.json")
            if not os.path.exists(path):
                raise UserError(f"{path} does not exist: --tables_only writes the tables of a finished study")
            with open(path) as fh:
                saved = json.load(fh)
            was = ExperimentConfig(**{k: v for k, v in saved["config"].items() if hasattr(cfg, k)})
            res = {k: saved[k] for k in ("stages", "sweep", "best_lr", "runs", "anatomy", "sft_valid")}
            write_outputs(replace(was, figures=cfg.figures), name, res, saved["minutes_so_far"], saved["config"])
        return True
    paths = tiny.build_tiny_world(cfg.tiny_world)
    contexts, losses_of = {}, {}
    if protocols:  # the headroom world: models pretrained on its language, the default oracle's size and the policy
        pretrained, losses_of["protocols"] = starting_points(cfg, paths, ("headroom",), [DEFAULT_SIZE])
        for protocol in protocols:
            contexts[protocol] = setup_protocol(cfg, protocol, paths, pretrained, device)
            contexts[protocol]["headroom"] = headroom(contexts[protocol])
            contexts[protocol]["pretrain_loss"] = losses_of["protocols"]
    if regimes:
        pretrained, pretrain_loss = starting_points(cfg, paths)
        for regime in regimes:
            contexts[regime] = setup(cfg, regime, paths, pretrained, device)
            contexts[regime]["pretrain_loss"] = pretrain_loss
    for name, ctx in contexts.items():
        log0(f"{name}: the start's test reward {ctx['sft_eval']['test']['reward']:.3f} "
             f"{ctx['sft_eval']['test']['reward_by_task']}, {ctx['sft_eval']['test']['ended']:.0%} of its answers end"
             + (f"; best of 4 samples {ctx['headroom']['best_of_4']:.3f}" if "headroom" in ctx else ""))
    if cfg.setup_only:
        return True
    for regime, ctx in contexts.items():
        res = study_regime(cfg, ctx)
        res["stages"]["pretrain"] = ctx["pretrain_loss"]
        if "headroom" in ctx:
            res["stages"]["headroom"] = ctx["headroom"]
        write_outputs(cfg, regime, res, (time.time() - t0) / 60)
    print(f"the study took {(time.time() - t0) / 60:.1f} minutes in this invocation")
    return True


def write_outputs(cfg, regime, res, minutes, config=None):
    """A regime's results.json (its runs, their summary and paired comparisons, the study's config or the one it
    was run with), results.md and plots."""
    summary = summarize(res["runs"])
    pairs = pairs_of(res["runs"], summary)
    d = os.path.join(cfg.figures, regime)
    os.makedirs(d, exist_ok=True)
    files = plot_regime(cfg, regime, res, summary, d)
    atomic_write(os.path.join(d, "results.json"), json.dumps(
        {"config": config or asdict(cfg), "minutes_so_far": minutes, "summary": summary, "paired": pairs, **res},
        indent=1))
    table = regime_markdown(cfg, regime, res, summary, pairs)
    atomic_write(os.path.join(d, "results.md"), table)
    print(table)
    print("wrote " + ", ".join(sorted(files.values())) + f" and results.json / results.md in {d}")


if __name__ == "__main__":
    sys.exit(utils.cli(main))
