"""The papers' key findings in miniature, on the synthetic key-token task of data.py, where the tokens that decide a
preference and the reward of any generated answer are known.

    python experiments.py              # the full study: 3 seeds, about an hour on 2 CPU cores
    python experiments.py --quick      # every stage and every output on a sliver of the data (under a minute)

From one SFT model (the tiny world's llama-small-sft), with the same data, steps and batch for every method, it trains
DPO, IPO, SimPO, ConfPO, ConfPO-rand, ConfPO-DPO and SePO (an oracle of llama-tiny, 5x smaller than the policy, on
half of the data; k = 0.1 ... 0.9) for every seed, plus SePO with oracles on shrinking shares of the data and of
shrinking size (weak-to-strong). Every model, and every checkpoint of the runs that draw curves, is evaluated the
same way (`evaluate`):
  - reward: the task's programmatic reward (tiny.synthetic_reward) of greedy answers to held-out prompts, the
    analogue of the papers' win rates;
  - KL from the SFT model: sum over answer tokens of KL(pi(.|y<t) || pi_sft(.|y<t)), on answers sampled from pi,
    an unbiased estimate of the sequence KL (ConfPO Fig. 7);
  - accuracy and margin: how often, and by how much, the mean token log-prob of the chosen response beats the
    rejected one's on held-out pairs (the same yardstick for every method; train.py's own eval, in each method's
    reward, is reported beside it as own_accuracy / own_margin).
Selections are checked against the planted key tokens with score.py (`--confpo` for ConfPO under the SFT model;
the oracle's scores for SePO). Output (`--figures`, default docs/experiments): results.json, results.md (the tables
of the README) and SVG plots; runs and checkpoints go to `--output_dir` (a rerun skips finished runs).
"""

import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from xml.sax.saxutils import escape

import utils
from utils import arg


@dataclass
class ExperimentConfig:
    output_dir: str = arg("runs/experiments", "runs, checkpoints and per-run results (reruns skip finished runs)")
    figures: str = arg("docs/experiments", "where results.json, results.md and the SVG plots go")
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world")
    seeds: str = arg("0,1,2", "seeds: data order, ConfPO-rand's draws, the oracle's data share")
    methods: str = arg("dpo,ipo,simpo,confpo,confpo_rand,confpo_dpo", "train.py methods compared with SePO")
    lr: float = arg(3e-4, "learning rate of every method, SePO included (train.py's tiny default)")
    sepo_lr: float = arg(3e-5, "learning rate of sepo_pipeline.py's own policy stage (its tiny default), reported beside SePO at "
                              "--lr as sepo_lr<value>")
    ratio: float = arg(0.3, "SePO's k (chosen and rejected) in the comparison of methods and the oracle studies")
    ratios: str = arg("0.1,0.3,0.5,0.7,0.9", "SePO's k swept with the default oracle")
    shares: str = arg("0.1,0.25,0.5,1.0", "oracle data shares (the default oracle uses 0.5)")
    oracle_sizes: str = arg("micro,tiny,small", "oracle sizes (tiny.MODEL_SIZES; the policy is small)")
    curve_every: int = arg(10, "steps between the checkpoints evaluated for the KL-reward curves")
    eval_prompts: int = arg(200, "held-out prompts for reward and KL (at most the test set's 200)")
    max_new_tokens: int = arg(40, "answer length limit for reward and KL")
    quick: bool = arg(False, "a smoke run: 1 seed, 2 steps per stage, 128 training pairs, 16 held-out prompts")
    setup_only: bool = arg(False, "build what every seed shares (SFT model, oracle bases, ConfPO's selection), then "
                                 "stop: run it once before starting one process per seed")
    cache_dir: str = arg("", "datasets cache folder")
    device: str = arg("auto", "auto | cpu | cuda")


# --quick: a smoke run, in folders of its own (never over the committed results in docs/experiments)
QUICK = dict(seeds="0", ratios="0.1,0.3", shares="0.25,0.5", oracle_sizes="micro,tiny", curve_every=1,
             eval_prompts=16, output_dir="runs/experiments-quick", figures="runs/experiments-quick/figures")


def parse_config(argv=None):
    return utils.parse_dataclass(ExperimentConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.distributed.checkpoint as dcp  # noqa: E402

import data  # noqa: E402
import losses  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import sepo_pipeline  # noqa: E402
import tiny  # noqa: E402
import train  # noqa: E402
from utils import UserError, atomic_write, log0, run_in_group  # noqa: E402

DEFAULT_SHARE, DEFAULT_SIZE = 0.5, "tiny"
TRAIN_PAIRS_QUICK, TEST_PAIRS_QUICK = 128, 16
# train.py's tiny shapes, for every stage and for scoring
SHAPE = ["--max_length", str(tiny.TRAIN_DEFAULTS["max_length"]), "--max_prompt_length",
         str(tiny.TRAIN_DEFAULTS["max_prompt_length"])]
BATCH = ["--global_batch_size", str(tiny.TRAIN_DEFAULTS["global_batch_size"]), "--micro_batch_size",
         str(tiny.TRAIN_DEFAULTS["micro_batch_size"])]


# ---------------------------------------------------------------------------------------------------------------
# Evaluation of one model
# ---------------------------------------------------------------------------------------------------------------

def load_weights(model, path):
    """Weights of a train.py checkpoint (DCP shards, keys `model.<HF key>`) or an exported folder into `model`."""
    if os.path.exists(os.path.join(path, "trainer_state.json")):
        sd = {f"model.{k}": v for k, v in model.state_dict().items()}
        dcp.load({"model": sd}, checkpoint_id=path)
        model.load_state_dict({k[len("model."):]: v for k, v in sd.items()})
    else:
        from transformers import AutoModelForCausalLM
        model.load_state_dict(AutoModelForCausalLM.from_pretrained(path).state_dict())
    return model.eval()


def position_ids(attention_mask):
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each text


@torch.no_grad()
def sequence_kl(model, sft, sequences, answer_mask, pad_id, batch_size=50):
    """Per answer: sum over its tokens t of KL(pi(.|x, y<t) || pi_sft(.|x, y<t)), from full distributions."""
    out = []
    for i in range(0, len(sequences), batch_size):
        ids, answer = sequences[i:i + batch_size], answer_mask[i:i + batch_size]
        attention = (ids != pad_id) | answer
        kw = dict(input_ids=ids, attention_mask=attention.long(), position_ids=position_ids(attention))
        logp = torch.log_softmax(model(**kw).logits[:, :-1].float(), -1)  # position t predicts token t + 1
        logq = torch.log_softmax(sft(**kw).logits[:, :-1].float(), -1)
        kl_t = (logp.exp() * (logp - logq)).sum(-1)
        out.append(losses.masked_sum(kl_t, answer[:, 1:]))
    return torch.cat(out)


@torch.no_grad()
def preference(model, batches):
    """Mean token log-prob of chosen minus rejected, per held-out pair."""
    margins = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, mask = losses.token_logps(logits, batch["labels"])
        avg = losses.masked_mean(logps, mask)
        B = avg.shape[0] // 2
        margins.append(avg[:B] - avg[B:])
    return torch.cat(margins)


def evaluate(model, ctx, sample_seed=1234):
    """reward (greedy answers), kl from the SFT model (sampled answers), accuracy and margin (held-out pairs)."""
    tok, device = ctx["tokenizer"], ctx["device"]
    reward = tiny.greedy_synthetic_reward(model, tok, ctx["prompts"], device, ctx["max_new_tokens"])
    torch.manual_seed(sample_seed)
    seqs, answer = tiny.generate_answers(model, tok, ctx["prompts"], device, ctx["max_new_tokens"], sample=True)
    kl = sequence_kl(model, ctx["sft"], seqs, answer, tok.pad_token_id)
    margin = preference(model, ctx["batches"])
    return {"reward": reward, "kl": float(kl.mean()), "accuracy": float((margin > 0).float().mean()),
            "margin": float(margin.mean())}


def evaluate_run(ctx, out, curve):
    """Evaluate a train.py run folder: its final model, and with `curve` every checkpoint (step 0 is the SFT
    model). Adds train.py's own last held-out evaluation and ConfPO's selected-token ratios over training."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ctx["sft_path"]).to(ctx["device"])
    points = [{"step": 0, **ctx["sft_eval"]}] if curve else []
    for path in train.checkpoints(out) if curve else []:
        step = int(os.path.basename(path).split("_")[1])
        points.append({"step": step, **evaluate(load_weights(model, path), ctx)})
    final = points[-1] if curve else evaluate(load_weights(model, os.path.join(out, "final")), ctx)
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    own = [line for line in lines if line.get("split") == "eval"][-1]
    selected = [{"step": line["step"], "chosen": line["selected_ratio_chosen"],
                 "rejected": line["selected_ratio_rejected"]}
                for line in lines if line.get("split") == "train" and "selected_ratio_chosen" in line]
    return {"final": {k: v for k, v in final.items() if k != "step"}, "curve": points,
            "own_accuracy": own.get("accuracy"), "own_margin": own.get("margin"), "selected": selected}


# ---------------------------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------------------------

def finished(out, key, fn):
    """Run fn() -> result once per folder and configuration: out/result.json keeps the result beside the
    configuration that produced it (`key`), and the checkpoints, which only the evaluation needed, are deleted
    afterwards. A result of another configuration is never reused: the study stops and names the folder."""
    path = os.path.join(out, "result.json")
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("config") != key:
            raise UserError(f"{out} holds the result of another configuration of the study; choose another "
                            "--output_dir (or delete that folder to run it again)")
        return saved["result"]
    result = fn()
    atomic_write(path, json.dumps({"config": key, "result": result}, indent=1))
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return result


def train_run(ctx, out, argv, curve):
    """train.py with these flags into `out` (with `curve`, a checkpoint every --curve_every steps), then its
    evaluation; skipped when already done with the same configuration (train.py itself resumes, or finds the run
    finished, and refuses a folder holding another run)."""
    argv = argv + ["--output_dir", out, "--save_every", str(ctx["curve_every"] if curve else 0), "--keep_last", "0"]

    def go():
        train.main(argv)
        return evaluate_run(ctx, out, curve)
    return finished(out, {"train": without_paths_of_no_consequence(argv), "curve": curve, "eval": ctx["eval_key"]},
                    go)


def without_paths_of_no_consequence(argv):
    """A run's flags without those that do not change its result (the datasets cache, the device)."""
    keep, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--cache_dir", "--device"):
            skip = True
        else:
            keep.append(a)
    return keep


def sepo_pipeline_cfg(ctx, seed, size, share, out):
    """sepo_pipeline.py's settings for an oracle of `size` trained on `share` of the data (the tiny defaults, spelled out)."""
    cfg = sepo_pipeline.PipelineConfig(**{**sepo_pipeline.PIPELINE_TINY, "data": ctx["train_data"], "eval_data": ctx["test_data"],
                                 "oracle_base": ctx["oracles"][size], "policy": ctx["sft_path"], "output_dir": out,
                                 "subset": share, "seed": seed, "chosen_ratio": ctx["ratio"],
                                 "rejected_ratio": ctx["ratio"], "policy_lr": ctx["sepo_lr"],
                                 "max_steps": ctx["max_steps"], "cache_dir": ctx["cache_dir"],
                                 "device": ctx["device_flag"], "tiny_world": ctx["tiny_world"]})
    cfg.policy_args = f"--save_every {ctx['curve_every']} --keep_last 0 " + ctx["eval_flags"]
    return cfg


def sepo_run(ctx, seed, size, share, curve):
    """The whole SePO pipeline (sepo_pipeline.py, its policy at --sepo_lr), then a policy from the same selections at the
    comparison's --lr -> (result at --lr, result of the pipeline's policy, the selections' key-token statistics)."""
    out = os.path.join(ctx["output_dir"], f"seed{seed}", f"sepo_{size}_{share}")
    cfg = sepo_pipeline_cfg(ctx, seed, size, share, out)

    def go():
        sepo_pipeline.main([f"--{k}={v}" for k, v in asdict(cfg).items()])
        return evaluate_run(ctx, os.path.join(out, "policy"), curve)
    key = {k: v for k, v in asdict(cfg).items() if k not in ("cache_dir", "device")}
    own = finished(os.path.join(out, "policy"), {"pipeline": key, "curve": curve, "eval": ctx["eval_key"]}, go)
    selections = os.path.join(out, "scores", sepo.selection_name(ctx["ratio"], ctx["ratio"]))
    common = sepo_policy(ctx, cfg, selections, os.path.join(out, f"policy_lr{ctx['lr']:g}"), curve)
    return common, own, manifest_stats(os.path.join(out, "scores"))


def sepo_sweep(ctx, seed):
    """SePO with the default oracle of this seed at every k of the sweep (one policy per k, at --lr) -> ({k: result,
    None for --ratio, which sepo_run trained}, key-token statistics). The selections come from the pipeline's own
    scores folder: score.py finds every block already scored and only selects again, at every k."""
    out = os.path.join(ctx["output_dir"], f"seed{seed}", f"sepo_{DEFAULT_SIZE}_{DEFAULT_SHARE}")
    cfg = sepo_pipeline_cfg(ctx, seed, DEFAULT_SIZE, DEFAULT_SHARE, out)
    scores = os.path.join(out, "scores")
    ks = sorted({*ctx["ratios"], ctx["ratio"]})  # the pipeline's own k stays in the manifest
    if not (sepo.scoring_complete(scores) and
            {sepo.selection_name(k, k) for k in ks} <= set(manifest_stats(scores))):
        score.main(sepo_pipeline.scoring_argv(cfg, os.path.join(out, "oracle_dpo", "final"),
                                     os.path.join(out, "oracle_sft", "final"), [(k, k) for k in ks], scores))
    results = {}
    for k in ctx["ratios"]:
        selections = os.path.join(scores, sepo.selection_name(k, k))
        results[k] = None if k == ctx["ratio"] else sepo_policy(
            ctx, cfg, selections, os.path.join(out, f"policy_k{k}_lr{ctx['lr']:g}"), curve=False)
    return results, manifest_stats(scores)


def sepo_policy(ctx, cfg, selections, out, curve):
    """SePO's policy (Eq. 26) from a selection file with the pipeline's settings but the comparison's --lr."""
    return train_run(ctx, out, sepo_pipeline.stage_argv(cfg) + sepo_pipeline.policy_argv(cfg, selections) +
                     ctx["eval_flags"].split() + ["--lr", str(ctx["lr"])], curve)


def manifest_stats(scores_dir):
    return sepo.read_manifest(scores_dir)["selections"]


def confpo_selection(ctx):
    """ConfPO's selection (Eq. 12-14) under the SFT model on the training data, scored by score.py --confpo."""
    out = os.path.join(ctx["output_dir"], "confpo_selection")
    if not sepo.scoring_complete(out):
        score.main(["--confpo", "--model", ctx["sft_path"], "--data", ctx["train_data"], "--output_dir", out,
                    "--cache_dir", ctx["cache_dir"], "--device", ctx["device_flag"]] + SHAPE)
    return manifest_stats(out)["confpo.jsonl"]


# ---------------------------------------------------------------------------------------------------------------
# Setting up: the world, the SFT model, held-out data
# ---------------------------------------------------------------------------------------------------------------

def head_lines(src, dst, n):
    with open(src) as fh:
        lines = [next(fh) for _ in range(n)]
    atomic_write(dst, "".join(lines))
    return dst


def setup(cfg, rank, world, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    paths = tiny.build_tiny_world(cfg.tiny_world)
    os.makedirs(cfg.output_dir, exist_ok=True)
    oracles = {size: paths.get(f"llama-{size}") for size in cfg.oracle_sizes.split(",")}
    for size in oracles:
        if oracles[size] is None:  # sizes the world does not hold (micro) are built here, from the same tokenizer
            oracles[size] = os.path.join(cfg.tiny_world, "models", f"llama-{size}")
            if not os.path.exists(os.path.join(oracles[size], "config.json")):
                tiny.build_tiny_model(oracles[size] + ".tmp", paths["tokenizer"], "llama", size)
                os.replace(oracles[size] + ".tmp", oracles[size])
    train_data, test_data = paths["train"], paths["test"]
    steps = ["--max_steps", "-1"]
    if cfg.quick:
        train_data = head_lines(paths["train"], os.path.join(cfg.output_dir, "train.jsonl"), TRAIN_PAIRS_QUICK)
        test_data = head_lines(paths["test"], os.path.join(cfg.output_dir, "test.jsonl"), TEST_PAIRS_QUICK)
        steps = ["--max_steps", "2"]
        sft_path = os.path.join(cfg.output_dir, "sft", "final")
        if not os.path.exists(os.path.join(sft_path, "config.json")):
            train.main(["--method", "sft", "--model", paths["llama-small"], "--data", train_data, "--max_steps",
                        "2", "--output_dir", os.path.dirname(sft_path), "--lr", "1e-3", "--save_every", "0",
                        "--judge", "none", "--cache_dir", cfg.cache_dir] + SHAPE + BATCH)
    else:
        sft_path = tiny.sft_model(cfg.tiny_world, paths, train.main, seed=42, cache_dir=cfg.cache_dir)
    eval_flags = (f"--eval_data {test_data} --log_every {1 if cfg.quick else 5} --eval_every 20 "
                  f"--eval_max_pairs 200")
    tokenizer = AutoTokenizer.from_pretrained(sft_path, padding_side="left")
    test = data.load_preferences(test_data)
    tokenized, _ = data.tokenize_preferences(test, tokenizer, tiny.TRAIN_DEFAULTS["max_length"],
                                             tiny.TRAIN_DEFAULTS["max_prompt_length"])
    batches = [{k: v.to(device) for k, v in data.collate_pairs([tokenized[j] for j in range(i, min(i + 50, len(
        tokenized)))], tokenizer.pad_token_id).items()} for i in range(0, len(tokenized), 50)]
    ctx = dict(output_dir=cfg.output_dir, tiny_world=cfg.tiny_world, cache_dir=cfg.cache_dir, device=device,
               device_flag=cfg.device, sft_path=sft_path, train_data=train_data, test_data=test_data,
               oracles=oracles, ratio=cfg.ratio, ratios=[float(k) for k in cfg.ratios.split(",")],
               lr=cfg.lr, sepo_lr=cfg.sepo_lr, curve_every=cfg.curve_every, max_steps=int(steps[1]),
               eval_flags=eval_flags,
               tokenizer=tokenizer, prompts=[row["prompt"] for row in test][:cfg.eval_prompts],
               max_new_tokens=cfg.max_new_tokens, batches=batches,
               eval_key={"prompts": cfg.eval_prompts, "max_new_tokens": cfg.max_new_tokens, "test": test_data,
                         "sft": sft_path})
    ctx["train_argv"] = (["--model", sft_path, "--data", train_data] + SHAPE + BATCH + ["--judge", "none",
                          "--cache_dir", cfg.cache_dir, "--device", cfg.device] + steps + eval_flags.split())
    ctx["sft"] = AutoModelForCausalLM.from_pretrained(sft_path).to(device).eval()
    ctx["sft_eval"] = evaluate(ctx["sft"], ctx)
    return ctx


# ---------------------------------------------------------------------------------------------------------------
# The study
# ---------------------------------------------------------------------------------------------------------------

def run_study(cfg, ctx):
    """Every run of every seed -> {seed: {name: result}} and the selections' key-token statistics."""
    runs, keys = {}, {"confpo": confpo_selection(ctx), "sepo": {}}
    for seed in [int(s) for s in cfg.seeds.split(",")]:
        r = runs[seed] = {"sft": {"final": ctx["sft_eval"], "curve": [], "own_accuracy": None, "own_margin": None,
                                  "selected": []}}
        for method in cfg.methods.split(","):
            log0(f"\n==== seed {seed}: {method} ====")
            out = os.path.join(cfg.output_dir, f"seed{seed}", method)
            r[method] = train_run(ctx, out, ctx["train_argv"] + ["--method", method, "--seed", str(seed), "--lr",
                                                                 str(cfg.lr)], True)
        log0(f"\n==== seed {seed}: sepo (oracle {DEFAULT_SIZE}, share {DEFAULT_SHARE}) ====")
        r["sepo"], r[f"sepo_lr{cfg.sepo_lr:g}"], keys["sepo"][f"{seed}/{DEFAULT_SIZE}/{DEFAULT_SHARE}"] = sepo_run(
            ctx, seed, DEFAULT_SIZE, DEFAULT_SHARE, True)
        sweep, keys["sepo"][f"{seed}/sweep"] = sepo_sweep(ctx, seed)
        for k, result in sweep.items():
            r[f"sepo_k{k}"] = result or r["sepo"]  # k = --ratio is the pipeline's own policy
        for size, share in [(DEFAULT_SIZE, s) for s in cfg.shares.split(",")] + \
                           [(z, DEFAULT_SHARE) for z in cfg.oracle_sizes.split(",")]:
            share = float(share)
            if (size, share) != (DEFAULT_SIZE, DEFAULT_SHARE):
                log0(f"\n==== seed {seed}: sepo (oracle {size}, share {share}) ====")
                r[f"sepo_{size}_{share}"], _, keys["sepo"][f"{seed}/{size}/{share}"] = sepo_run(ctx, seed, size,
                                                                                              share, False)
        r[f"sepo_{DEFAULT_SIZE}_{DEFAULT_SHARE}"] = r["sepo"]
    return runs, keys


def compared(cfg):
    """The runs of the comparison of methods: SFT, every --methods, SePO at --lr and SePO at --sepo_lr."""
    return ["sft"] + cfg.methods.split(",") + ["sepo", f"sepo_lr{cfg.sepo_lr:g}"]


def mean_std(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs):
    """{run name: {metric: [mean, std]}} over seeds."""
    names = list(next(iter(runs.values())))
    out = {}
    for name in names:
        rows = [runs[s][name] for s in runs if name in runs[s]]
        metrics = {m: mean_std([r["final"][m] for r in rows]) for m in ("reward", "kl", "accuracy", "margin")}
        metrics.update({m: mean_std([r[m] for r in rows]) for m in ("own_accuracy", "own_margin")})
        out[name] = metrics
    return out


def mean_curve(runs, name, key):
    """The mean over seeds of a run's curve: [(step, mean of key)] on the steps every seed has."""
    curves = [{p["step"]: p[key] for p in runs[s][name]["curve"]} for s in runs if name in runs[s]]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
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


def plot_all(cfg, runs, summary, keys):
    d = cfg.figures
    methods = compared(cfg)
    cat = [(i, m) for i, m in enumerate(methods)]

    def dots(metric, label):
        return {"title": label, "xlabel": "", "ylabel": label, "xticks": cat, "categorical": True,
                "points_only": True,
                "series": [{"label": "mean ± std over seeds", "x": list(range(len(methods))),
                            "y": [summary[m][metric][0] for m in methods],
                            "err": [summary[m][metric][1] for m in methods]}]}
    files = {"methods": write_svg(os.path.join(d, "methods.svg"),
                                  [dots("reward", "reward of greedy answers"), dots("accuracy", "held-out accuracy")],
                                  width=560)}
    curves = [m for m in methods[1:] if runs[next(iter(runs))][m]["curve"]]
    by_kl, kl_by_step, reward_by_step = [], [], []
    for i, m in enumerate(curves):
        steps, kl = mean_curve(runs, m, "kl")
        _, reward = mean_curve(runs, m, "reward")
        log_kl = [math.log1p(v) for v in kl]
        by_kl.append({"label": m, "x": log_kl, "y": reward, "colour": COLOURS[i % len(COLOURS)]})
        kl_by_step.append({"label": m, "x": steps, "y": log_kl, "colour": COLOURS[i % len(COLOURS)]})
        reward_by_step.append({"label": m, "x": steps, "y": reward, "colour": COLOURS[i % len(COLOURS)]})
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
    files["confpo_selected"] = write_svg(os.path.join(d, "confpo_selected.svg"), [
        {"title": "ConfPO: share of response tokens selected", "xlabel": "step", "ylabel": "selected tokens",
         "series": sel}], width=520)

    def sweep(names, xs, metric, title, xlabel, xticks=None):
        sepo_series = {"label": "SePO", "x": xs, "y": [summary[n][metric][0] for n in names],
                       "err": [summary[n][metric][1] for n in names]}
        sft_series = {"label": "SFT", "x": xs, "y": [summary["sft"][metric][0]] * len(xs), "dashed": True,
                      "colour": "#7f7f7f"}
        return {"title": title, "xlabel": xlabel, "ylabel": metric, "xticks": xticks, "categorical": bool(xticks),
                "series": [sepo_series, sft_series]}
    ks = [float(k) for k in cfg.ratios.split(",")]
    shares = [float(s) for s in cfg.shares.split(",")]
    sizes = cfg.oracle_sizes.split(",")
    share_names = [f"sepo_{DEFAULT_SIZE}_{s}" for s in shares]
    size_names = [f"sepo_{z}_{DEFAULT_SHARE}" for z in sizes]
    size_ticks = [(i, z) for i, z in enumerate(sizes)]
    files["sepo"] = write_svg(os.path.join(d, "sepo.svg"), [
        sweep([f"sepo_k{k}" for k in ks], ks, "accuracy", "SePO: token ratio k", "k (chosen and rejected)"),
        sweep(share_names, shares, "accuracy", "SePO: oracle data share", "share of the data the oracle saw"),
        sweep(size_names, list(range(len(sizes))), "accuracy", "SePO: oracle size (policy: small)", "oracle",
              size_ticks),
        sweep([f"sepo_k{k}" for k in ks], ks, "reward", "SePO: token ratio k", "k (chosen and rejected)"),
    ], width=330)
    files["key_tokens"] = write_svg(os.path.join(d, "key_tokens.svg"), key_panels(keys, ks), width=480)
    return files


def key_table(keys, ks):
    """Rows (selector, side, selected fraction, precision, recall, random precision, random recall), mean over
    seeds. A random selection of the same size has, in expectation, precision = the key fraction and recall =
    the selected fraction."""
    rows = []
    c = keys["confpo"]
    for side in ("chosen", "rejected"):
        e = c[f"key_{side}"]
        rows.append(("ConfPO (SFT model)", side, e["selected_fraction"], e["precision"], e["recall"],
                     e["key_fraction"], e["selected_fraction"]))
    sweeps = [v for k, v in keys["sepo"].items() if k.endswith("/sweep")]
    for k in ks:
        name = sepo.selection_name(k, k)
        for side in ("chosen", "rejected"):
            es = [s[name][f"key_{side}"] for s in sweeps]
            m = lambda f: statistics.fmean(e[f] for e in es)  # noqa: E731
            rows.append((f"SePO k={k:g}", side, m("selected_fraction"), m("precision"), m("recall"),
                         m("key_fraction"), m("selected_fraction")))
    return rows


def key_panels(keys, ks):
    rows = key_table(keys, ks)
    panels = []
    for side in ("chosen", "rejected"):
        mine = [r for r in rows if r[1] == side]
        panels.append({"title": f"key tokens among the selected ({side})", "xlabel": "share of tokens selected",
                       "ylabel": "precision", "points_only": True, "series": [
                           {"label": r[0], "x": [r[2]], "y": [r[3]]} for r in mine] + [
                           {"label": "random (expected)", "x": [r[6] for r in mine], "y": [r[5] for r in mine],
                            "colour": "#7f7f7f"}]})
    return panels


# ---------------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------------

def fmt(pair, digits=3):
    mean, std = pair
    return "–" if mean is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def results_markdown(cfg, summary, keys, n_seeds):
    methods = compared(cfg)
    out = [f"Mean ± standard deviation over {n_seeds} seed(s).", "",
           "| method | reward (greedy) | KL from SFT | accuracy | margin | own accuracy | own margin |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for m in methods:
        s = summary[m]
        out.append(f"| {m} | {fmt(s['reward'])} | {fmt(s['kl'], 2)} | {fmt(s['accuracy'])} | {fmt(s['margin'])} | "
                   f"{fmt(s['own_accuracy'])} | {fmt(s['own_margin'])} |")
    out += ["", "| SePO run | reward (greedy) | accuracy | margin | KL from SFT |", "| --- | --- | --- | --- | --- |"]
    names = ([f"sepo_k{float(k)}" for k in cfg.ratios.split(",")] +
             [f"sepo_{DEFAULT_SIZE}_{float(s)}" for s in cfg.shares.split(",")] +
             [f"sepo_{z}_{DEFAULT_SHARE}" for z in cfg.oracle_sizes.split(",")])
    for n in dict.fromkeys(names):
        s = summary[n]
        out.append(f"| {n} | {fmt(s['reward'])} | {fmt(s['accuracy'])} | {fmt(s['margin'])} | {fmt(s['kl'], 2)} |")
    out += ["", "| selection | side | selected | key precision | key recall | random precision | random recall |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in key_table(keys, [float(k) for k in cfg.ratios.split(",")]):
        out.append(f"| {r[0]} | {r[1]} | " + " | ".join(f"{v:.3f}" for v in r[2:]) + " |")
    return "\n".join(out) + "\n"


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
    return run_in_group(cfg.device, lambda rank, world, device: study(cfg, rank, world, device))


def study(cfg, rank, world, device):
    t0 = time.time()
    if world > 1:
        raise UserError("experiments.py runs in one process (its runs are tiny); start it with python, not torchrun")
    ctx = setup(cfg, rank, world, device)
    if cfg.setup_only:
        confpo_selection(ctx)
        return True
    runs, keys = run_study(cfg, ctx)
    summary = summarize(runs)
    os.makedirs(cfg.figures, exist_ok=True)
    files = plot_all(cfg, runs, summary, keys)
    minutes = (time.time() - t0) / 60
    atomic_write(os.path.join(cfg.figures, "results.json"), json.dumps(
        {"config": asdict(cfg), "invocation_minutes": minutes, "summary": summary, "keys": keys, "runs": runs},
        indent=1))
    table = results_markdown(cfg, summary, keys, len(runs))
    atomic_write(os.path.join(cfg.figures, "results.md"), table)
    print(table)
    print("wrote " + ", ".join(sorted(files.values())) + f" and results.json / results.md in {cfg.figures}")
    return True


if __name__ == "__main__":
    sys.exit(utils.cli(main))
