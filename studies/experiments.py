"""The papers' findings in miniature, on the tiny world's synthetic task (tiny/), where the tokens that decide a
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

    python studies/experiments.py --threads 1    # both protocols, 3 seeds, into docs/experiments/{base,instruct}
    python studies/experiments.py --tables_only  # their tables and plots again, from the results files alone
    python studies/experiments.py --protocols "" --regimes minimal & python studies/experiments.py --protocols "" \
        --regimes independent & wait     # the first study's regimes, a core each
    python studies/experiments.py --quick        # every stage and output on a sliver, in runs/experiments-quick

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
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

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
from experiments_report import DEFAULT_SHARE, DEFAULT_SIZE, write_outputs  # noqa: E402
from measures import anatomy, cached, sequence_kl  # noqa: E402
from models import load_weights  # noqa: E402
from rundir import atomic_write  # noqa: E402
from utils import UserError, log0, run_in_group  # noqa: E402

# --quick: a smoke run, in folders of its own (never over the committed results in docs/experiments)
QUICK = dict(seeds="0", lrs="3e-4", ratios="0.1,0.3", shares="0.25,0.5", oracle_sizes="micro,tiny", curve_every=1,
             protocol_max_new_tokens=32,
             eval_prompts=16, output_dir="runs/experiments-quick", figures="runs/experiments-quick/figures")
QUICK_PAIRS = {"train": 128, "valid": 16, "test": 16}
SHAPE = ["--max_length", str(tiny.TRAIN_DEFAULTS["max_length"]), "--max_prompt_length",
         str(tiny.TRAIN_DEFAULTS["max_prompt_length"])]  # train.py's tiny shapes, for every stage and for scoring
BATCH = ["--global_batch_size", str(tiny.TRAIN_DEFAULTS["global_batch_size"]), "--micro_batch_size",
         str(tiny.TRAIN_DEFAULTS["micro_batch_size"])]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of one model
# ---------------------------------------------------------------------------------------------------------------

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

def essential(argv):
    """A run's flags without those that do not change its result (the datasets cache, the device)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--cache_dir", "--device", "--threads", "--activation_checkpointing"):
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
        for path in rundir.checkpoints(out, ctx["curve_every"]):
            load_weights(model, path)
            points.append({"step": rundir.checkpoint_step(path), **evaluate(model, ctx, split),
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
        split_data = {s: head_lines(p, os.path.join(folder, f"{s}.jsonl"), QUICK_PAIRS[s])
                      for s, p in split_data.items()}
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
                         ["--judge", "none", "--cache_dir", cfg.cache_dir, "--device", cfg.device,
                          "--activation_checkpointing", "false"] + steps +
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
# Main
# ---------------------------------------------------------------------------------------------------------------

def configure(argv=None):
    """The study's config from flags, with --quick's defaults where the flags say nothing."""
    cfg, explicit = parse_config(argv)
    if cfg.quick:
        tiny.fill_defaults(cfg, QUICK, explicit)
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


if __name__ == "__main__":
    sys.exit(utils.cli(main))
