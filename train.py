"""Preference optimization for every method of the two papers, in one handwritten FSDP2 loop.

    python train.py                                   # tiny offline model + synthetic task, ConfPO, ~1 min on CPU
    python train.py --method dpo --max_steps 20       # any method on the same tiny world
    torchrun --standalone --nproc_per_node 8 train.py --method confpo \
        --model princeton-nlp/Llama-3-Base-8B-SFT --data princeton-nlp/llama3-ultrafeedback-armorm \
        --beta 1.0 --gamma 2.0 --lr 6e-7 --output_dir runs/confpo-llama3-base
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 train.py ... --hybrid_shard

Top to bottom: the config (every field a flag, declared with its checks) and the method table; `train`: set-up and
the loop, whose save / halt / SIGTERM decisions are calls; one optimizer step and one micro-step (one forward over
chosen and rejected rows together); the held-out evaluation; the data feeding. Under torchrun the model is sharded
with FSDP2 (models.py); without, it runs as a world of one. The run owns its output folder (rundir.py), writes
nothing there before every check has passed, saves and stops at the next step boundary on SIGTERM, and resumes from
its newest intact checkpoint when the same command runs again.

Defaults are the papers' (ConfPO App. D). Without --model the offline tiny world (tiny/) supplies the model and
the data, and these change, where no flag or --config file sets them: global_batch_size 32, micro_batch_size 8, lr
3e-4, max_length 128, max_prompt_length 64, log_every 5, eval_every 20, eval_max_pairs 200, save_every 50
(tiny.TRAIN_DEFAULTS). A run on a real model never imports the tiny world.
"""

import dataclasses
import inspect
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Literal, NamedTuple, Optional

import utils
from utils import (AT_LEAST_1, BELOW_1, DEVICES, DTYPES, FINITE, FORMS, NON_NEGATIVE, POSITIVE, THRESHOLD, UNIT,
                   Check, arg)

MethodName = Literal["sft", "dpo", "ipo", "simpo", "cpo", "rrhf", "slic", "orpo", "rdpo", "kto", "confpo",
                     "confpo_dpo", "confpo_rand", "sepo"]  # the keys of METHODS (test_train.py checks it)


R = {"resumable": True}  # a setting that may change when a run resumes in the same folder


@dataclass
class Config:
    # what to train
    method: MethodName = arg("confpo", "objective: a method of the table METHODS below")
    model: str = arg("", "policy: a Hugging Face model name or folder ('' = the tiny offline world's llama-small)")
    ref_model: str = arg("", "reference model for DPO-style methods ('' = the initial policy)")
    tokenizer: str = arg("", "tokenizer (and chat template) to use ('' = the model's own); exported with the model")
    data: str = arg("", "preference data: JSONL/JSON/Parquet, save_to_disk folder or hub name ('' = synthetic task)")
    split: str = arg("train", "split of --data")
    eval_data: str = arg("", "held-out data ('' = --data's --eval_split, or the synthetic test set)")
    eval_split: str = arg("", "held-out split ('' = no held-out evaluation unless --eval_data is given)")
    form: str = arg("auto", "data form", options=FORMS)
    skip_bad_rows: bool = arg(False, "skip (and count) bad rows instead of stopping at the first", **R)
    selections: str = arg("", "SePO: token selections written by score.py (required for --method sepo)")
    output_dir: str = arg("", "checkpoints, metrics.jsonl and the final model ('' = runs/<method>)", **R)
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world, built on first use", **R)
    # data shape (ConfPO App. D, following SimPO)
    max_length: int = arg(2048, "prompt + response tokens, responses cut from the right", check=AT_LEAST_1)
    max_prompt_length: int = arg(1800, "prompt tokens, cut from the left", check=AT_LEAST_1)
    num_proc: int = arg(1, "processes for tokenization (datasets.map)", check=AT_LEAST_1, **R)
    cache_dir: str = arg("", "datasets cache folder ('' = Hugging Face's default)", **R)
    # optimisation (ConfPO App. D: batch 128, 1 epoch, AdamW, cosine with 10% warm-up; clip 1.0 as SePO)
    global_batch_size: int = arg(128, "pairs per optimizer step, over all ranks and micro-steps", check=AT_LEAST_1)
    # micro_batch_size changes only the float summation order (ConfPO-rand draws per pair, whatever the micro-batch),
    # except for KTO, whose z_ref is estimated per micro-step over all ranks: KTO depends on micro-batches and ranks
    micro_batch_size: int = arg(2, "pairs per rank per forward (2x rows: chosen and rejected)", check=AT_LEAST_1, **R)
    epochs: int = arg(1, "passes over the data", check=AT_LEAST_1)
    max_steps: int = arg(-1, "optimizer steps (-1 = epochs x pairs // global_batch_size); sets the schedule length")
    halt_after: int = arg(0, "stop after this many steps in this invocation, with a checkpoint (0 = never); the "
                             "schedule is unchanged, so a later run resumes exactly", check=NON_NEGATIVE, **R)
    lr: float = arg(6e-7, "peak learning rate (ConfPO Table 6, Llama-3-Base)",
                    check=Check(POSITIVE[0], "the learning rate must be a positive finite number"))
    warmup_ratio: float = arg(0.1, "linear warm-up fraction of the steps, then cosine decay to 0", check=UNIT)
    weight_decay: float = arg(0.0, "AdamW weight decay", check=NON_NEGATIVE)
    adam_beta1: float = arg(0.9, "AdamW beta1", check=BELOW_1)
    adam_beta2: float = arg(0.999, "AdamW beta2 (SePO uses 0.95)", check=BELOW_1)
    adam_eps: float = arg(1e-8, "AdamW epsilon", check=POSITIVE)
    grad_clip: float = arg(1.0, "max global gradient norm (0 = no clipping)", check=NON_NEGATIVE)
    seed: int = arg(42, "seed of the data order and of ConfPO-rand's draws")
    # objective hyper-parameters; None = the method's own default (see its docstring)
    beta: Optional[float] = arg(None, "beta of the objective", check=Check(
        POSITIVE[0], "must be positive and a finite number (a negative beta trains the inverted objective)"))
    gamma: Optional[float] = arg(None, "target margin gamma (SimPO, ConfPO, SePO)", check=FINITE)
    tau: Optional[float] = arg(None, "IPO's tau", check=POSITIVE)
    label_smoothing: Optional[float] = arg(None, "conservative label smoothing (DPO, SimPO)",
                                           check=Check(lambda v: FINITE[0](v) and 0 <= v < 0.5, "must lie in [0, 0.5)"))
    lambda_: Optional[float] = arg(None, "weight of the NLL / odds-ratio term (CPO, RRHF, SLiC-HF, ORPO)",
                                   check=NON_NEGATIVE)
    lambda_w: Optional[float] = arg(None, "KTO desirable weight", check=NON_NEGATIVE)
    lambda_l: Optional[float] = arg(None, "KTO undesirable weight", check=NON_NEGATIVE)
    delta: Optional[float] = arg(None, "SLiC-HF margin delta", check=NON_NEGATIVE)
    alpha: Optional[float] = arg(None, "R-DPO length coefficient alpha", check=FINITE)
    threshold: Optional[str] = arg(None, "ConfPO tau: arithmetic | geometric | a probability such as 0.6",
                                   check=THRESHOLD)
    strict: Optional[bool] = arg(None, "ConfPO: select pi < tau (released code) instead of pi <= tau (paper)",
                                 nargs="?", const=True)
    normalize: Optional[str] = arg(None, "ConfPO: normalise by |y_s| (selected) or |y| (response)",
                                   options=("selected", "response"))
    # systems
    dtype: str = arg("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU)", options=DTYPES)
    device: str = arg("auto", "where to run", options=DEVICES, **R)
    threads: int = arg(0, "CPU threads per process (0 = OMP_NUM_THREADS if set, else the cores available divided "
                          "among this node's ranks)", check=NON_NEGATIVE, **R)
    precompute_ref: bool = arg(False, "reference methods: the reference's per-token log-probs computed once, before "
                                      "training, into output_dir/ref_logps (resumable); no reference model in training "
                                      "(as TRL's precompute_ref_log_probs)")
    activation_checkpointing: Optional[bool] = arg(None, "recompute decoder layers in backward (None = on with "
                                                         "--model, off on the tiny world)", nargs="?", const=True, **R)
    attn_implementation: str = arg("sdpa", "attention kernel of every model loaded (flash_attention_2 needs the "
                                           "flash-attn package)", options=utils.ATTENTION, **R)
    group_by_length: bool = arg(True, "sort each rank's share of a step by length before cutting micro-batches", **R)
    tf32: bool = arg(True, "on a GPU, float32 matmuls in TensorFloat-32 (with --dtype fp32)", **R)
    export_dtype: str = arg("auto", "exported weights (auto: the source checkpoint's dtype)", options=DTYPES, **R)
    lora_r: int = arg(0, "LoRA rank (peft; 0 = off); the reference is the model with its adapters off",
                      check=NON_NEGATIVE)
    lora_alpha: float = arg(16.0, "LoRA alpha (the adapters' scale is alpha / r)", check=POSITIVE)
    lora_dropout: float = arg(0.0, "LoRA dropout (set to 0 by --disable_dropout, as TRL)", check=BELOW_1)
    lora_target_modules: str = arg("all-linear", "modules with adapters: all-linear (attention and MLP projections) "
                                                 "or names, a comma list")
    report_to: str = arg("none", "also log metrics.jsonl's scalars to tensorboard, wandb (a comma list)",
                         check=utils.REPORT_TO, **R)
    logp_path: str = arg("auto", "chunked: log-probs from hidden states, never the full logits",
                         options=("auto", "chunked", "logits"), **R)
    chunk_size: int = arg(0, "response tokens per vocabulary block of the log-probs (0 = as many as fit in 32 MiB of "
                             "float32 logits on a CPU, 512 MiB on a GPU)", check=NON_NEGATIVE, **R)
    disable_dropout: bool = arg(True, "set every dropout probability of policy and reference to 0 (as TRL)")
    hybrid_shard: bool = arg(False, "replicate across nodes, shard within a node (2-D mesh)", **R)
    accumulate_unsharded: bool = arg(False, "FSDP: reduce gradients once per step, keeping them unsharded across "
                                            "micro-steps (a full fp32 gradient per GPU: 32 GB at 8B)", **R)
    deterministic: bool = arg(False, "torch.use_deterministic_algorithms: the same bits on every run on a GPU too "
                                     "(slower kernels; a CPU run is deterministic without it)", **R)
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)",
                            check=AT_LEAST_1, **R)
    # bookkeeping
    log_every: int = arg(10, "steps between lines of metrics.jsonl", check=AT_LEAST_1, **R)
    eval_every: int = arg(100, "steps between held-out evaluations (and one at the end)", check=AT_LEAST_1, **R)
    eval_max_pairs: int = arg(1000, "held-out pairs used per evaluation (0 = all)", check=NON_NEGATIVE, **R)
    save_every: int = arg(100, "steps between checkpoints (0 = none before the end)", check=NON_NEGATIVE, **R)
    save_final: bool = arg(True, "also save a checkpoint at the last step (the result is the export in final/; a "
                                 "rerun finds the run finished either way)", **R)
    keep_last: int = arg(2, "checkpoints kept", check=NON_NEGATIVE, **R)
    resume: bool = arg(True, "continue from the newest checkpoint in output_dir if there is one", **R)
    export: bool = arg(True, "write a Hugging Face folder output_dir/final at the end", **R)
    judge: str = arg("auto", "after the export, score greedy answers with the tiny world's judge (auto: when training "
                             "on the tiny world)", options=("auto", "synthetic", "none"), **R)
    skip_nonfinite: bool = arg(False, "skip (and count) an optimizer step whose loss or gradient norm is not finite, "
                                      "instead of stopping the run there", **R)
    save_on_signal: bool = arg(True, "on SIGTERM (a preemption): finish the step, save a checkpoint, stop; a SIGTERM "
                                     "10 s after the first stops at once (false: stop at once, as Ctrl-C)", **R)


PATH_FIELDS = ("model", "ref_model", "tokenizer", "data", "eval_data", "selections")  # compared by content
HPARAMS = ["beta", "gamma", "tau", "label_smoothing", "lambda_", "lambda_w", "lambda_l", "delta", "alpha",
           "threshold", "strict", "normalize"]


def parse_config(argv=None):
    """The training config from flags and --config, every field checked. Returns (Config, names set explicitly)."""
    return utils.parse_dataclass(Config, argv, __doc__, numbers_as_text={"threshold"})


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import numpy as np  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import confpo  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import rundir  # noqa: E402
import sepo  # noqa: E402
from utils import UserError, log0, on_rank_zero, rank_zero_first, run_in_group  # noqa: E402


class Method(NamedTuple):
    """What the loop must know of a method. Each objective documents its equation and defaults; nothing in this
    file tests a method's name."""
    objective: Callable
    reference: bool = False  # takes pi_ref's per-token log-probs: a frozen reference model runs every micro-step
    chosen_only: bool = False  # SFT (SePO Eq. 23): forward the chosen rows only; the loss is a token mean
    selections: bool = False  # SePO: token selections from score.py (--selections), attached to the data
    batch_fields: dict = {}  # per-token data fields collated into the batch -> the objective's chosen_/rejected_ arg
    random: bool = False  # ConfPO-rand: draws its tokens with one generator per pair, keyed by (seed, step, pair)
    shared_z_ref: bool = False  # KTO: z_ref estimated over the micro-batches of every rank, not this rank's alone


METHODS = {
    "sft": Method(losses.sft_loss, chosen_only=True),
    "dpo": Method(losses.dpo_loss, reference=True),
    "ipo": Method(losses.ipo_loss, reference=True),
    "simpo": Method(losses.simpo_loss),
    "cpo": Method(losses.cpo_loss),
    "rrhf": Method(losses.rrhf_loss),
    "slic": Method(losses.slic_loss),
    "orpo": Method(losses.orpo_loss),
    "rdpo": Method(losses.rdpo_loss, reference=True),
    "kto": Method(losses.kto_loss, reference=True, shared_z_ref=True),
    "confpo": Method(confpo.confpo_loss),
    "confpo_dpo": Method(confpo.confpo_dpo_loss, reference=True),
    "confpo_rand": Method(confpo.confpo_rand_loss, random=True),
    "sepo": Method(sepo.sepo_loss, selections=True, batch_fields={"select": "selected"}),
}


def resolve(cfg, explicit):
    """Fill the offline defaults, check the combination, and return the objective's keyword arguments."""
    if not cfg.model:
        import tiny
        tiny.fill_defaults(cfg, tiny.TRAIN_DEFAULTS, explicit)
    cfg.output_dir = cfg.output_dir or os.path.join("runs", cfg.method)
    if cfg.activation_checkpointing is None:  # a real model's activations are what runs out of memory first
        cfg.activation_checkpointing = bool(cfg.model)
    method = METHODS[cfg.method]
    if method.selections and not cfg.selections:
        raise UserError(f"--method {cfg.method} needs --selections: the token selections written by score.py "
                        "(or run the whole pipeline with `python sepo_pipeline.py`)")
    if cfg.selections and not method.selections:
        raise UserError(f"--selections is only used by --method sepo, not {cfg.method}")
    if cfg.max_prompt_length >= cfg.max_length:
        raise UserError(f"--max_prompt_length {cfg.max_prompt_length}: must be below --max_length {cfg.max_length}")
    accepted = inspect.signature(method.objective).parameters
    hparams = {name: getattr(cfg, name) for name in HPARAMS if getattr(cfg, name) is not None}
    for name in hparams:
        if name not in accepted:
            takes = [p for p in HPARAMS if p in accepted]
            raise UserError(f"--{name} is not a parameter of {cfg.method} (it takes: {', '.join(takes) or 'none'})")
    if "threshold" in hparams:
        hparams["threshold"] = confpo.parse_threshold(hparams["threshold"])
    utils.require({"--lora_r": "peft"} if cfg.lora_r else {}, {f"--report_to {t}": t for t in cfg.report_to.split(",")
                                                              if t != "none"})  # optional extras, said before loading
    return hparams


def main(argv=None):
    cfg, explicit = parse_config(argv)
    hparams = resolve(cfg, explicit)
    return run_in_group(cfg.device, lambda rank, world, device: train(cfg, hparams, rank, world, device),
                        cfg.threads, cfg.dist_timeout, cfg.dtype, model_given=bool(cfg.model))


# ---------------------------------------------------------------------------------------------------------------
# The run: set-up, then the loop and the export, in an output folder that this job alone writes
# ---------------------------------------------------------------------------------------------------------------

def train(cfg, hparams, rank, world, device):
    method = METHODS[cfg.method]
    on_tiny_world = not cfg.model
    models.set_numerics(cfg.deterministic, cfg.tf32, device)
    if on_tiny_world:  # the offline tiny world's data and SFT start (its data checked first)
        import tiny
        tiny.training_start(cfg, method.chosen_only, main)
    if cfg.global_batch_size % (world * cfg.micro_batch_size):
        raise UserError(f"--global_batch_size {cfg.global_batch_size} is not a multiple of ranks x micro batch "
                        f"({world} x {cfg.micro_batch_size})")
    with rundir.FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it was
        run = set_up(cfg, method, rank, world, device)
        with rundir.Trackers(cfg.output_dir, cfg.report_to if rank == 0 else "none", dataclasses.asdict(cfg),
                             run.step) as run.trackers:  # --report_to, on rank 0
            return loop(cfg, method, hparams, run, on_tiny_world, rank, world, device)


def set_up(cfg, method, rank, world, device):
    """Every check that can fail (the folder, the models, the data, the selections), then the models, the optimizer
    and the newest intact checkpoint. Only then is the folder written: its config.json, a tidy metrics.jsonl."""
    from transformers import AutoConfig, AutoTokenizer
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    fingerprints = on_rank_zero(lambda: {k: rundir.fingerprint(getattr(cfg, k)) for k in PATH_FIELDS})
    mine = {**dataclasses.asdict(cfg), "_fingerprints": fingerprints}
    # what the folder holds decides collectives: rank 0 looks, every rank follows
    found = on_rank_zero(lambda: rundir.checkpoints(cfg.output_dir))
    rundir.claim(cfg.output_dir, "config.json", mine, "the checkpoints or export of another run",
                 utils.resumable_fields(Config), hint=f"to continue it, run with its settings: python train.py "
                 f"--config {os.path.join(cfg.output_dir, 'config.json')};", replaceable=lambda: not found and
                 not os.path.exists(os.path.join(cfg.output_dir, "final", "config.json")))
    for flag, path in (("--model", cfg.model), ("--ref_model", cfg.ref_model), ("--tokenizer", cfg.tokenizer)):
        models.check_source(path, flag)

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if cfg.tokenizer and len(tokenizer) > AutoConfig.from_pretrained(cfg.model).vocab_size:
        raise UserError(f"--tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens, more than {cfg.model}'s "
                        "vocabulary")
    ds = prepare_data(cfg, method, tokenizer, fingerprints["data"])
    steps_per_epoch = len(ds["train"]) // cfg.global_batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    log0(f"{total} steps of {cfg.global_batch_size} pairs ({world} ranks x {cfg.micro_batch_size} pairs x "
         f"{cfg.global_batch_size // (world * cfg.micro_batch_size)} micro-steps); "
         f"{len(ds['train']) - steps_per_epoch * cfg.global_batch_size} pairs per epoch left over")

    mesh = models.make_mesh(cfg, world, device)
    policy = models.load_model(cfg.model, cfg, mesh, device, trainable=True)
    ref = models.load_model(cfg.ref_model or cfg.model, cfg, mesh, device, trainable=False) if method.reference \
        and not cfg.lora_r else None  # with LoRA, the policy with its adapters off
    log0(f"policy {cfg.model}: log-probs via the {policy.path} path; reference: "
         f"{(cfg.ref_model or cfg.model) if ref is not None else 'the policy, adapters off' if cfg.lora_r else 'none'}")
    trained = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters alone
    optimizer = torch.optim.AdamW(trained, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    run = SimpleNamespace(tokenizer=tokenizer, pad_id=data.pad_id(tokenizer), ds=ds, refs={}, policy=policy, ref=ref,
                          optimizer=optimizer, scheduler=scheduler, meter=rundir.Meter(device), step=0, skipped=0,
                          total=total, steps_per_epoch=steps_per_epoch,
                          lengths=data.pair_lengths(ds["train"]) if cfg.group_by_length else None,
                          metrics_path=os.path.join(cfg.output_dir, "metrics.jsonl"))
    log0(models.memory_estimate(policy.model.config, cfg, world, ref is not None and not cfg.precompute_ref, device))
    if cfg.resume and on_rank_zero(lambda: rundir.finished_at(cfg.output_dir)) == total:  # exported at its end
        run.step = total
    elif found and cfg.resume:
        trainer_state, mine_state = rundir.resume(found, policy, optimizer, rank)
        scheduler.load_state_dict(trainer_state["scheduler"])
        run.step, run.skipped = trainer_state["step"], trainer_state.get("skipped_steps", 0)
        if mine_state is not None:
            run.meter.load(mine_state["meter"])

    dist.barrier()  # every check passed and every rank has read the checkpoint: the folder is now this run's
    if rank == 0:
        rundir.atomic_write(os.path.join(cfg.output_dir, "config.json"), json.dumps(mine, indent=2))
        if found and not cfg.resume:  # --resume false: start over, and leave no old checkpoint to resume from
            log0(f"--resume false: removing {len(found)} checkpoints of the previous run")
            for old in found:
                rundir.remove(old)
        rundir.trim_metrics(run.metrics_path, run.step)
        rundir.remove_leftovers(os.path.join(cfg.output_dir, "checkpoints", "*.tmp"))  # a save killed before its rename
    if method.reference and cfg.precompute_ref and run.step < total:
        # one pass of the reference, after config.json is written: a killed pass resumes in a folder known as ours
        for split, pairs in ds.items():
            identity = models.reference_identity(cfg, fingerprints, split, len(pairs), tokenizer, device)
            batch_of = lambda idx, p=pairs: collate(p, idx, run.pad_id, Method(None), device)  # noqa: E731
            run.refs[split] = models.reference_logps(ref or policy.as_reference, len(pairs), batch_of, os.path.join(
                cfg.output_dir, "ref_logps"), split, identity, 4 * cfg.micro_batch_size, rank, world)
        run.ref = None  # no reference model during training
    return run


def loop(cfg, method, hparams, run, on_tiny_world, rank, world, device):
    """The optimizer steps from run.step to run.total, their metrics and checkpoints; then the export and the
    synthetic judge, each done once however often the finished command runs again."""
    ds, total = run.ds, run.total

    def write(line):  # a line of metrics.jsonl (rank 0), and of the trackers of --report_to
        if rank == 0:
            rundir.append_metrics(run.metrics_path, line)
            run.trackers.log(line)
    if "eval" in ds and run.step == 0:  # the starting point, for comparison
        write({**evaluate(cfg, method, run, hparams, device, world), "step": 0, "split": "eval"})
    if run.step == total and run.step > 0:
        log0(f"{cfg.output_dir}: this run had already finished; only what is missing is done again")
    bar = tqdm(total=total, initial=run.step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    halt_at = run.step + cfg.halt_after if cfg.halt_after else None
    utils.SIGTERM_STATE.update(defer=cfg.save_on_signal, pending=False)  # SIGTERM: save at the next step boundary
    try:
        while run.step < total:
            grad_norm, lr = optimizer_step(cfg, method, hparams, run, rank, world, device)
            bar.update(1)
            step = run.step
            if step % cfg.log_every == 0 or step == total:
                line = run.meter.result()
                line.update(step=step, split="train", lr=lr, grad_norm=grad_norm, skipped_steps=run.skipped,
                            tokens_per_s=line.pop("tokens_timed") / max(line.pop("seconds"), 1e-9),
                            peak_memory_mib=utils.peak_memory_mib(device))
                bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                write(line)
            if "eval" in ds and (step % cfg.eval_every == 0 or step == total):
                line = evaluate(cfg, method, run, hparams, device, world)
                write({**line, "step": step, "split": "eval"})
                log0(f"\nstep {step} eval: loss {line['loss']:.4f}" +
                     (f", reward accuracy {line['accuracy']:.3f}" if "accuracy" in line else ""))
            halting = halt_at is not None and step >= halt_at
            signalled = cfg.save_on_signal and step < total and utils.any_rank(utils.SIGTERM_STATE["pending"], device)
            if (cfg.save_every and step % cfg.save_every == 0) or (step == total and cfg.save_final) or halting \
                    or signalled:
                save(cfg, run, rank)
            if signalled:
                bar.close()
                raise UserError(f"stopped by SIGTERM after step {step}, saved in "
                                f"{rundir.checkpoints(cfg.output_dir)[-1]}; run the same command to resume there",
                                code=143)
            if halting:
                bar.close()
                log0(f"halted after step {step} (--halt_after); run the same command again to continue")
                return None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM without --save_on_signal (or a second one)
        what = "terminated (SIGTERM)" if isinstance(e, utils.Terminated) else "interrupted"
        raise UserError(f"{what} during step {run.step + 1}: nothing new was saved. "
                        f"{rundir.last_checkpoint(cfg.output_dir)}; run the same command to resume",
                        code=143 if isinstance(e, utils.Terminated) else 130) from None
    finally:
        utils.SIGTERM_STATE.update(defer=False)
        bar.close()  # before any message: the bar's line ends first
    final = os.path.join(cfg.output_dir, "final")
    if cfg.export and not on_rank_zero(lambda: os.path.exists(os.path.join(final, "config.json"))):
        models.export(cfg.output_dir, run.policy.model, run.tokenizer, cfg.model, run.step, rank, cfg.export_dtype,
                      cfg.lora_r and models.lora_config(cfg))
    if cfg.export and rank == 0 and (cfg.judge == "synthetic" or (cfg.judge == "auto" and on_tiny_world)) and \
            not any(line.get("split") == "generate" for line in rundir.read_metrics(run.metrics_path)):
        import tiny  # the synthetic task has a programmatic judge: greedy answers to held-out prompts, scored
        write(tiny.judge(cfg, final, run.step, device))
    log0(f"done: {cfg.output_dir} (metrics.jsonl, checkpoints/, {'final/' if cfg.export else 'no export'})")
    return cfg.output_dir


def optimizer_step(cfg, method, hparams, run, rank, world, device):
    """One optimizer step over this rank's micro-batches of the global batch -> (gradient norm, its lr). A loss or
    gradient norm that is not finite stops the run before the weights change (or skips the step)."""
    step, t0 = run.step, time.perf_counter()
    order = data.epoch_order(len(run.ds["train"]), cfg.seed, step // run.steps_per_epoch)
    micro = data.rank_micro_batches(order, step, run.steps_per_epoch, cfg.global_batch_size, cfg.micro_batch_size,
                                    rank, world, run.lengths)
    batches = [collate(run.ds["train"], idx, run.pad_id, method, device, run.refs.get("train")) for idx in micro]
    # Loss normaliser: FSDP averages gradients over ranks, so each rank scales by world / global count.
    if method.chosen_only:  # a token mean over the whole global batch (Hugging Face's SFT convention)
        count = sum((b["labels"][:b["labels"].shape[0] // 2] != -100).sum() for b in batches).float()
        dist.all_reduce(count)
    else:  # a mean over the pairs of the global batch; empty-selection pairs count with loss 0
        count = torch.tensor(float(cfg.global_batch_size), device=device)
    not_finite = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        if world > 1 and cfg.accumulate_unsharded:  # FSDP: reduce on the last micro-step only
            run.policy.set_requires_gradient_sync(last)
        elif cfg.hybrid_shard:  # HSDP: reduce-scatter within the node every micro-step, across nodes once a step
            run.policy.set_requires_all_reduce(last)
        per_pair, metrics = micro_step(method, run.policy, run.ref, batch, hparams, (cfg.seed, step))
        (per_pair.sum() * world / count).backward()
        not_finite += (~torch.isfinite(per_pair.detach())).sum()
        run.meter.add(logged_loss(method, per_pair, metrics), metrics, forwarded_tokens(method, batch))
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                               float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    dist.all_reduce(not_finite)
    lr = run.scheduler.get_last_lr()[0]
    if not_finite or not torch.isfinite(grad_norm):  # never let a NaN into the weights
        if not cfg.skip_nonfinite:
            raise UserError(f"step {step + 1}: the loss or the gradient norm ({float(grad_norm)}) is not finite; "
                            f"stopped before the optimizer step. {rundir.last_checkpoint(cfg.output_dir)}. Lower "
                            "--lr, or pass --skip_nonfinite to skip such steps")
        run.skipped += 1
        log0(f"\nstep {step + 1}: loss or gradient norm not finite, step skipped ({run.skipped} so far)")
    else:
        run.optimizer.step()
    with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    run.meter.timed(time.perf_counter() - t0)  # tokens/s over the steps alone (no evaluation, no save)
    return float(grad_norm), lr


def save(cfg, run, rank):  # model and optimizer shards, the schedule, skipped steps, this rank's partial metric sums
    state = {"scheduler": run.scheduler.state_dict(), "skipped_steps": run.skipped}
    rundir.save_checkpoint(cfg.output_dir, run.step, run.policy, run.optimizer, state, {"meter": run.meter.state()},
                           rank, cfg.keep_last)


def cosine_with_warmup(step, total, warmup):
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------------------------
# One micro-step: forward, objective, metrics
# ---------------------------------------------------------------------------------------------------------------

def micro_step(method, policy, ref, batch, hparams, draw_key):
    """Per-pair losses (B,) and metrics of one micro-batch; one policy forward over chosen and rejected rows.
    draw_key: (seed, step); ConfPO-rand draws pair i's tokens with a generator seeded by (seed, step, i), so its
    draws do not depend on how pairs are grouped into micro-batches or ranks."""
    B = batch["input_ids"].shape[0] // 2
    rows = slice(0, B) if method.chosen_only else slice(None)
    inputs = {k: batch[k][rows] for k in ("input_ids", "attention_mask", "labels")}
    logps, mask = policy(**inputs)
    if method.chosen_only:  # SFT: the summed NLL of each chosen response, normalised by the loop
        return method.objective(logps, mask, length_normalize=False)
    kw = dict(chosen_logps=logps[:B], chosen_mask=mask[:B], rejected_logps=logps[B:], rejected_mask=mask[B:])
    if method.reference:
        if "ref" in batch:  # computed once before training (--precompute_ref)
            ref_logps = batch["ref"]
        else:
            with torch.no_grad():
                ref_logps, _ = ref(**inputs) if ref is not None else policy.as_reference(**inputs)
        kw.update(ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:])
    for field, name in method.batch_fields.items():  # SePO: chosen_selected / rejected_selected
        kw[f"chosen_{name}"], kw[f"rejected_{name}"] = batch[field][:B].bool(), batch[field][B:].bool()
    if method.random:
        kw["generator"] = [torch.Generator(logps.device).manual_seed(hash((*draw_key, int(i))) % 2**63)
                           for i in batch["index"]]
    if method.shared_z_ref:  # z_ref over the micro-batches of all ranks (TRL's estimate), not this rank's alone
        beta = hparams.get("beta", inspect.signature(method.objective).parameters["beta"].default)
        total, count = losses.kto_reference_point(**kw, beta=beta)
        both = torch.stack([total, torch.tensor(float(count), device=total.device)]).double()
        dist.all_reduce(both)
        kw["z_ref"] = max(0.0, float(both[0] / both[1]))
    return method.objective(**kw, **hparams)


def logged_loss(method, per_pair, metrics):
    """What the logs call the loss of a pair: the objective, or for SFT the mean token NLL (not its sum)."""
    return metrics["nll"] if method.chosen_only else per_pair


def forwarded_tokens(method, batch, valid=None):
    """Tokens the policy read in this micro-batch (SFT reads the chosen rows only), over valid pairs only."""
    B = batch["input_ids"].shape[0] // 2
    pairs = torch.ones(B, dtype=torch.bool, device=batch["input_ids"].device) if valid is None else valid
    rows = torch.cat([pairs, torch.zeros_like(pairs) if method.chosen_only else pairs])
    return batch["attention_mask"][rows].sum()  # a tensor: no wait for the device here


def evaluate(cfg, method, run, hparams, device, world):
    """Held-out loss and rewards; every rank runs the same number of forwards (FSDP needs it), pairs beyond the
    end are repeats with zero weight."""
    eval_ds, policy = run.ds["eval"], run.policy
    n = len(eval_ds) if not cfg.eval_max_pairs else min(len(eval_ds), cfg.eval_max_pairs)
    per_rank = math.ceil(n / world)
    idx = [dist.get_rank() * per_rank + j for j in range(per_rank)]
    meter = rundir.Meter(device)
    policy.eval()
    with torch.no_grad():
        for s in range(0, per_rank, cfg.micro_batch_size):
            chunk = idx[s:s + cfg.micro_batch_size]
            valid = torch.tensor([i < n for i in chunk], device=device)
            batch = collate(eval_ds, [min(i, n - 1) for i in chunk], run.pad_id, method, device, run.refs.get("eval"))
            per_pair, metrics = micro_step(method, policy, run.ref, batch, hparams, (cfg.seed, -1))
            keep = valid.nonzero().squeeze(-1)
            meter.add(logged_loss(method, per_pair, metrics)[keep], {k: v[keep] for k, v in metrics.items()},
                      forwarded_tokens(method, batch, valid))
    policy.train()
    line = meter.result()
    line.pop("tokens_timed"), line.pop("seconds")
    return line


# ---------------------------------------------------------------------------------------------------------------
# Data feeding
# ---------------------------------------------------------------------------------------------------------------

def prepare_data(cfg, method, tokenizer, data_fingerprint):
    """Tokenized train (and held-out) pairs, with SePO's selections attached. Rank 0 goes first and fills the
    datasets cache; the others then read it, so that N ranks do not tokenize N times (nor write the same files)."""
    def load(source, split):
        ds = data.load_preferences(source, split=split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                   num_proc=cfg.num_proc, cache_dir=cfg.cache_dir or None)
        ds, stats = data.tokenize_preferences(ds, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.num_proc)
        named = source if os.path.isfile(source) else f"{source} [{split}]"  # a file is one split by itself
        log0(f"{named}: {stats['kept']} pairs kept, {stats['dropped_empty']} dropped (empty response); truncated: "
             f"{stats['truncated_prompt']} prompts, {stats['truncated_response']} responses")
        return ds

    def load_all():
        out = {"train": load(cfg.data, cfg.split)}
        if cfg.eval_data or cfg.eval_split:
            out["eval"] = load(cfg.eval_data or cfg.data, cfg.eval_split or cfg.split)
        if method.selections:
            out["train"] = sepo.attach_selections(out["train"], sepo.load_selections(cfg.selections), cfg.selections)
            if "eval" in out:  # held-out pairs have no oracle selection: evaluate over all response tokens
                out["eval"] = sepo.select_all(out["eval"])
        return out

    # score.py's manifest beside the selections: finished, on these very data, in this tokenizer's positions
    manifest = sepo.read_manifest(os.path.dirname(os.path.abspath(cfg.selections))) if method.selections else {}
    if manifest is None:
        log0(f"warning: no manifest.json beside {cfg.selections}: cannot check that it selects tokens of these "
             "data and this tokenizer")
    elif manifest and (problem := sepo.provenance_problem(manifest, cfg.selections, cfg.data, cfg.split,
                                                          data_fingerprint, data.tokenizer_hash(tokenizer))):
        raise UserError(problem)
    out = rank_zero_first(load_all)
    if len(out["train"]) < cfg.global_batch_size:
        raise UserError(f"{cfg.data}: {len(out['train'])} pairs, fewer than one global batch "
                        f"({cfg.global_batch_size}); lower --global_batch_size")
    return out


def collate(ds, indices, pad_id, method, device, refs=None):
    """A micro-batch of the pairs at `indices` on the device (data.collate_indices; `index` stays on the CPU)."""
    batch = data.collate_indices(ds, indices, pad_id, tuple(method.batch_fields), refs)
    return {k: v if k == "index" else v.to(device, non_blocking=True) for k, v in batch.items()}


if __name__ == "__main__":
    sys.exit(utils.cli(main))
