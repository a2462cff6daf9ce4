"""Preference optimization for every method of the two papers, in one handwritten FSDP2 loop.

    python train.py                                   # tiny offline model + synthetic task, ConfPO, ~1 min on CPU
    python train.py --method dpo --max_steps 20       # any method on the same tiny world
    torchrun --standalone --nproc_per_node 8 train.py --method confpo \
        --model princeton-nlp/Llama-3-Base-8B-SFT --data princeton-nlp/llama3-ultrafeedback-armorm \
        --beta 1.0 --gamma 2.0 --lr 6e-7 --activation_checkpointing --output_dir runs/confpo-llama3-base
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 train.py ... --hybrid_shard

Top to bottom: the config (every field is a flag, declared with its checks) and the method table; `train`: the
set-up and the loop, whose save / halt / SIGTERM decisions are calls; then one micro-step, the metrics, the held-out
evaluation and the data feeding. Each micro-step is one forward over chosen and rejected rows together. Under
torchrun the model is sharded with FSDP2 (models.py); without torchrun variables it runs as a world of one, which
trains the model itself. The run owns its output folder (rundir.py: a lock, its config.json, checkpoints written
to a temporary folder and renamed, the metrics file, the export), writes nothing there before every check has
passed, saves a checkpoint and stops at the next step boundary on SIGTERM, and resumes from its newest intact
checkpoint when the same command runs again.

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
import resource
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


@dataclass
class Config:
    # what to train
    method: MethodName = arg("confpo", "objective: a method of the table METHODS below")
    model: str = arg("", "policy: a Hugging Face model name or folder ('' = the tiny offline world's llama-small)")
    ref_model: str = arg("", "reference model for DPO-style methods ('' = the initial policy)")
    tokenizer: str = arg("", "tokenizer (and chat template) to use ('' = the model's own); exported with the model")
    data: str = arg("", "preference data: JSONL/JSON/Parquet file, save_to_disk folder or hub name ('' = the "
                        "synthetic task)")
    split: str = arg("train", "split of --data")
    eval_data: str = arg("", "held-out data ('' = --data's --eval_split, or the synthetic test set)")
    eval_split: str = arg("", "held-out split ('' = no held-out evaluation unless --eval_data is given)")
    form: str = arg("auto", "data form", options=FORMS)
    skip_bad_rows: bool = arg(False, "skip (and count) bad rows instead of stopping at the first", resumable=True)
    selections: str = arg("", "SePO: token selections written by score.py (required for --method sepo)")
    output_dir: str = arg("", "where checkpoints, metrics.jsonl and the final model go ('' = runs/<method>)",
                          resumable=True)
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world, built on first use", resumable=True)
    # data shape (ConfPO App. D, following SimPO)
    max_length: int = arg(2048, "prompt + response tokens, responses cut from the right", check=AT_LEAST_1)
    max_prompt_length: int = arg(1800, "prompt tokens, cut from the left", check=AT_LEAST_1)
    num_proc: int = arg(1, "processes for tokenization (datasets.map)", check=AT_LEAST_1, resumable=True)
    cache_dir: str = arg("", "datasets cache folder ('' = Hugging Face's default)", resumable=True)
    # optimisation (ConfPO App. D: batch 128, 1 epoch, AdamW, cosine with 10% warm-up; clip 1.0 as SePO)
    global_batch_size: int = arg(128, "preference pairs per optimizer step, over all ranks and micro-steps",
                                 check=AT_LEAST_1)
    # micro_batch_size changes only the float summation order (ConfPO-rand draws per pair, whatever the micro-batch),
    # except for KTO, whose z_ref is estimated per micro-step over all ranks: KTO depends on micro-batches and ranks
    micro_batch_size: int = arg(2, "pairs per rank per forward (the batch holds 2x rows: chosen and rejected)",
                                check=AT_LEAST_1, resumable=True)
    epochs: int = arg(1, "passes over the data", check=AT_LEAST_1)
    max_steps: int = arg(-1, "optimizer steps (-1 = epochs x pairs // global_batch_size); sets the schedule length")
    halt_after: int = arg(0, "stop after this many steps in this invocation, with a checkpoint (0 = never); the "
                             "schedule is unchanged, so a later run resumes exactly", check=NON_NEGATIVE,
                          resumable=True)
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
    device: str = arg("auto", "where to run", options=DEVICES, resumable=True)
    threads: int = arg(0, "CPU threads per process (0 = OMP_NUM_THREADS if you set it, else the cores available "
                          "divided among this node's ranks)", check=NON_NEGATIVE, resumable=True)
    precompute_ref: bool = arg(False, "reference methods: compute the reference's per-token log-probs once, in one "
                                      "pass before training, into output_dir/ref_logps (resumable); training then "
                                      "holds no reference model (as TRL's precompute_ref_log_probs)")
    activation_checkpointing: bool = arg(False, "recompute decoder layers in backward (saves memory)", resumable=True)
    logp_path: str = arg("auto", "chunked: log-probs from hidden states, never the full logits", resumable=True,
                         options=("auto", "chunked", "logits"))
    chunk_size: int = arg(0, "response tokens per vocabulary block in the log-prob computation (0 = as many as "
                             "fit in 32 MiB of float32 logits on a CPU, 512 MiB on a GPU)", check=NON_NEGATIVE,
                          resumable=True)
    disable_dropout: bool = arg(True, "set every dropout probability of policy and reference to 0 (as TRL)")
    hybrid_shard: bool = arg(False, "replicate across nodes, shard within a node (2-D mesh)", resumable=True)
    accumulate_unsharded: bool = arg(False, "FSDP: keep gradients unsharded across micro-steps and reduce them once "
                                            "per step (less communication, but a full fp32 gradient per GPU: 32 GB "
                                            "at 8B); the default reduce-scatters every micro-step", resumable=True)
    deterministic: bool = arg(False, "torch.use_deterministic_algorithms: the same bits on every run on a GPU too "
                                     "(slower kernels; a CPU run is deterministic without it)", resumable=True)
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)",
                            check=AT_LEAST_1, resumable=True)
    # bookkeeping
    log_every: int = arg(10, "steps between lines of metrics.jsonl", check=AT_LEAST_1, resumable=True)
    eval_every: int = arg(100, "steps between held-out evaluations (and one at the end)", check=AT_LEAST_1,
                          resumable=True)
    eval_max_pairs: int = arg(1000, "held-out pairs used per evaluation (0 = all)", check=NON_NEGATIVE,
                              resumable=True)
    save_every: int = arg(100, "steps between checkpoints (0 = none before the end)", check=NON_NEGATIVE,
                          resumable=True)
    save_final: bool = arg(True, "also save a checkpoint at the last step (to resume from; the result is the export "
                                 "in final/, and a rerun finds the run finished either way)", resumable=True)
    keep_last: int = arg(2, "checkpoints kept", check=NON_NEGATIVE, resumable=True)
    resume: bool = arg(True, "continue from the newest checkpoint in output_dir if there is one", resumable=True)
    export: bool = arg(True, "write a Hugging Face folder output_dir/final at the end", resumable=True)
    judge: str = arg("auto", "after the export, score greedy answers: synthetic (the tiny world's task) | none | "
                             "auto (synthetic when training on the tiny world)", options=("auto", "synthetic", "none"),
                     resumable=True)
    skip_nonfinite: bool = arg(False, "skip (and count) an optimizer step whose loss or gradient norm is not finite, "
                                      "instead of stopping the run there", resumable=True)
    save_on_signal: bool = arg(True, "on SIGTERM (a scheduler's preemption): finish the step, save a checkpoint, "
                                     "stop; a second SIGTERM stops at once (false: stop at once, as Ctrl-C)",
                               resumable=True)


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
    return hparams


def main(argv=None):
    cfg, explicit = parse_config(argv)
    hparams = resolve(cfg, explicit)
    return run_in_group(cfg.device, lambda rank, world, device: train(cfg, hparams, rank, world, device),
                        cfg.threads, cfg.dist_timeout)


# ---------------------------------------------------------------------------------------------------------------
# The run: set-up, then the loop and the export, in an output folder that this job alone writes
# ---------------------------------------------------------------------------------------------------------------

def train(cfg, hparams, rank, world, device):
    method = METHODS[cfg.method]
    on_tiny_world = not cfg.model
    if cfg.deterministic:  # cuBLAS needs a fixed workspace for deterministic results
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if on_tiny_world:  # the offline tiny world's data and SFT start (its data checked first)
        import tiny
        tiny.training_start(cfg, method.chosen_only, main)
    if cfg.global_batch_size % (world * cfg.micro_batch_size):
        raise UserError(f"--global_batch_size {cfg.global_batch_size} is not a multiple of ranks x micro batch "
                        f"({world} x {cfg.micro_batch_size})")
    with rundir.FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it was
        run = set_up(cfg, method, rank, world, device)
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
    rundir.claim(cfg.output_dir, "config.json", mine, "the checkpoints or export of another run", utils.resumable_fields(Config),
                 replaceable=lambda: not (found or os.path.exists(os.path.join(cfg.output_dir, "final", "config.json"))),
                 hint=f"to continue it, run with its settings: python train.py --config "
                      f"{os.path.join(cfg.output_dir, 'config.json')};")
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
        else None
    log0(f"policy {cfg.model}: log-probs via the {policy.path} path; reference: "
         f"{(cfg.ref_model or cfg.model) if ref is not None else 'none'}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    run = SimpleNamespace(tokenizer=tokenizer, pad_id=data.pad_id(tokenizer), ds=ds, refs={}, policy=policy, ref=ref,
                          optimizer=optimizer, scheduler=scheduler, meter=Meter(device), step=0, skipped=0,
                          total=total, steps_per_epoch=steps_per_epoch,
                          metrics_path=os.path.join(cfg.output_dir, "metrics.jsonl"))
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
    if ref is not None and cfg.precompute_ref and run.step < total:
        # one pass of the reference, after config.json is written: a killed pass resumes in a folder known as ours
        for split, pairs in ds.items():
            identity = {"reference": fingerprints["ref_model"] or fingerprints["model"],
                        "data": (fingerprints["eval_data"] or fingerprints["data"]) if split == "eval" else
                        fingerprints["data"], "split": (cfg.eval_split or cfg.split) if split == "eval" else cfg.split,
                        "pairs": len(pairs), "tokenizer": data.tokenizer_hash(tokenizer), "max_length": cfg.max_length,
                        "max_prompt_length": cfg.max_prompt_length,
                        "dtype": repr(models.compute_dtype(cfg.dtype, device))}
            run.refs[split] = models.reference_logps(
                ref, len(pairs), lambda idx, p=pairs: collate(p, idx, run.pad_id, Method(None), device),
                os.path.join(cfg.output_dir, "ref_logps"), split, identity, cfg.micro_batch_size, rank, world)
        run.ref = None  # no reference model during training
    return run


def loop(cfg, method, hparams, run, on_tiny_world, rank, world, device):
    """The optimizer steps from run.step to run.total, their metrics and checkpoints; then the export and the
    synthetic judge, each done once however often the finished command is run again."""
    ds, total = run.ds, run.total
    write = (lambda line: rundir.append_metrics(run.metrics_path, line)) if rank == 0 else (lambda line: None)
    if "eval" in ds and run.step == 0:  # the starting point, for comparison
        write({**evaluate(cfg, method, run, hparams, device, world), "step": 0, "split": "eval"})
    if run.step == total and run.step > 0:
        log0(f"{cfg.output_dir}: this run had already finished; only what is missing is done again")
    bar = tqdm(total=total, initial=run.step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    t_last, halt_at = time.perf_counter(), run.step + cfg.halt_after if cfg.halt_after else None
    utils.SIGTERM_STATE.update(defer=cfg.save_on_signal, pending=False)  # SIGTERM: save at the next step boundary
    try:
        while run.step < total:
            grad_norm, lr = optimizer_step(cfg, method, hparams, run, rank, world, device)
            bar.update(1)
            step = run.step
            if step % cfg.log_every == 0 or step == total:
                line = run.meter.result()
                elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
                line.update(step=step, split="train", lr=lr, grad_norm=grad_norm, skipped_steps=run.skipped,
                            tokens_per_s=line.pop("tokens_timed") / elapsed, peak_memory_mib=peak_memory_mib(device))
                bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                write(line)
            if "eval" in ds and (step % cfg.eval_every == 0 or step == total):
                line = evaluate(cfg, method, run, hparams, device, world)
                write({**line, "step": step, "split": "eval"})
                log0(f"\nstep {step} eval: loss {line['loss']:.4f}" +
                     (f", reward accuracy {line['accuracy']:.3f}" if "accuracy" in line else ""))
            halting = halt_at is not None and step >= halt_at
            signalled = cfg.save_on_signal and step < total and any_rank(utils.SIGTERM_STATE["pending"], device)
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
        rundir.export(cfg.output_dir, run.policy.model, run.tokenizer, cfg.model, run.step, rank)
    if cfg.export and rank == 0 and (cfg.judge == "synthetic" or (cfg.judge == "auto" and on_tiny_world)) and \
            not any(line.get("split") == "generate" for line in rundir.read_metrics(run.metrics_path)):
        import tiny  # the synthetic task has a programmatic judge: greedy answers to held-out prompts, scored
        write(tiny.judge(cfg, final, run.step, device))
    log0(f"done: {cfg.output_dir} (metrics.jsonl, checkpoints/, {'final/' if cfg.export else 'no export'})")
    return cfg.output_dir


def optimizer_step(cfg, method, hparams, run, rank, world, device):
    """One optimizer step over this rank's micro-batches of the global batch -> (gradient norm, its lr). A loss or
    gradient norm that is not finite stops the run before the weights change (or skips the step)."""
    step = run.step
    order = batch_order(len(run.ds["train"]), cfg, step // run.steps_per_epoch)
    micro = rank_micro_batches(order, step, run.steps_per_epoch, cfg, rank, world)
    batches = [collate(run.ds["train"], idx, run.pad_id, method, device, run.refs.get("train")) for idx in micro]
    # Loss normaliser: FSDP averages gradients over ranks, so each rank scales by world / global count.
    if method.chosen_only:  # a token mean over the whole global batch (Hugging Face's SFT convention)
        count = torch.tensor(float(sum(int((b["labels"][:b["labels"].shape[0] // 2] != -100).sum())
                                       for b in batches)), device=device)
        dist.all_reduce(count)
    else:  # a mean over the pairs of the global batch; empty-selection pairs count with loss 0
        count = torch.tensor(float(cfg.global_batch_size), device=device)
    not_finite = torch.zeros((), device=device)
    for i, batch in enumerate(batches):
        if world > 1 and cfg.accumulate_unsharded:  # FSDP: reduce on the last micro-step only
            run.policy.set_requires_gradient_sync(i == len(batches) - 1)
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
    return float(grad_norm), lr


def save(cfg, run, rank):
    """A checkpoint of this step: the model and optimizer shards, the schedule, the skipped steps and this rank's
    partial metric sums (rundir.save_checkpoint adds the RNG states)."""
    rundir.save_checkpoint(cfg.output_dir, run.step, run.policy, run.optimizer,
                           {"scheduler": run.scheduler.state_dict(), "skipped_steps": run.skipped},
                           {"meter": run.meter.state()}, rank, cfg.keep_last)


def any_rank(flag, device):
    """Whether a flag is set on any rank (a signal reaches the ranks at different moments; they must stop at the
    same step)."""
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t)


def cosine_with_warmup(step, total, warmup):
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
                ref_logps, _ = ref(**inputs)
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
    return int(batch["attention_mask"][rows].sum())


class Meter:
    """Sums of per-pair metrics over micro-steps and ranks; `result()` turns them into the logged averages. Its
    partial sums go into checkpoints, so a line after a resume covers the same pairs as an uninterrupted run's;
    `tokens_timed` counts only what this process read since the last line (tokens/s)."""

    def __init__(self, device):
        self.sums, self.device = {}, device

    def add(self, losses_, metrics, tokens):
        rows = {"loss": losses_.detach().float(), **{k: v.float() for k, v in metrics.items()}}
        for suffix in ("", "_all"):  # over the selected tokens, and (selective methods) over all response tokens
            if f"rewards_chosen{suffix}" in metrics:
                chosen, rejected = metrics[f"rewards_chosen{suffix}"], metrics[f"rewards_rejected{suffix}"]
                rows[f"margin{suffix}"] = chosen - rejected
                rows[f"accuracy{suffix}"] = (chosen > rejected).float()
        rows["n_pairs"] = torch.ones_like(rows["loss"])
        for k, v in rows.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.sum()
        for k in ("n_tokens", "tokens_timed"):
            self.sums[k] = self.sums.get(k, 0.0) + float(tokens)

    def state(self):
        """The partial sums for a checkpoint, each in its own type (float32 tensors stay float32, so that a resumed
        run adds up exactly as an uninterrupted one); tokens_timed is not kept."""
        return {k: v.cpu() if torch.is_tensor(v) else v for k, v in self.sums.items() if k != "tokens_timed"}

    def load(self, sums):
        self.sums = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in sums.items()}

    def result(self):
        keys = sorted(self.sums)
        totals = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).to(self.device) for k in keys])
        dist.all_reduce(totals)
        s = dict(zip(keys, totals.tolist()))
        pairs = max(s.pop("n_pairs"), 1.0)
        out = {"pairs": int(pairs), "tokens": int(s.pop("n_tokens")), "tokens_timed": s.pop("tokens_timed", 0.0)}
        for side in ("chosen", "rejected"):  # token-level selection ratio (ConfPO Fig. 8)
            if f"selected_{side}" in s:
                out[f"selected_ratio_{side}"] = s[f"selected_{side}"] / max(s[f"length_{side}"], 1.0)
        if "empty" in s:
            out["empty_pairs"] = int(s.pop("empty"))
        if "tau_chosen" in s:
            out["tau_mean"] = (s.pop("tau_chosen") + s.pop("tau_rejected")) / (2 * pairs)
        for k, v in s.items():
            if not (k.startswith("selected_") or k.startswith("length_")):
                out[k] = v / pairs
        self.sums = {}
        return out


def evaluate(cfg, method, run, hparams, device, world):
    """Held-out loss and rewards; every rank runs the same number of forwards (FSDP needs it), pairs beyond the
    end are repeats with zero weight."""
    eval_ds, policy = run.ds["eval"], run.policy
    n = len(eval_ds) if not cfg.eval_max_pairs else min(len(eval_ds), cfg.eval_max_pairs)
    per_rank = math.ceil(n / world)
    idx = [dist.get_rank() * per_rank + j for j in range(per_rank)]
    meter = Meter(device)
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
    line.pop("tokens_timed")
    return line


# ---------------------------------------------------------------------------------------------------------------
# Data feeding
# ---------------------------------------------------------------------------------------------------------------

def prepare_data(cfg, method, tokenizer, data_fingerprint=None):
    """Tokenized train (and held-out) pairs, with SePO's selections attached. Rank 0 goes first and fills the
    datasets cache; the others then read it, so that N ranks do not tokenize N times (nor write the same files)."""
    def load(source, split):
        ds = data.load_preferences(source, split=split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                   num_proc=cfg.num_proc, cache_dir=cfg.cache_dir or None)
        ds, stats = data.tokenize_preferences(ds, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.num_proc)
        named = source if os.path.isfile(source) else f"{source} [{split}]"  # a file is one split by itself
        log0(f"{named}: {stats['kept']} pairs kept, {stats['dropped_empty']} dropped (empty response); of those "
             f"kept, {stats['truncated_prompt']} have a truncated prompt and {stats['truncated_response']} a "
             "truncated response")
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

    if method.selections:  # score.py's manifest: finished, on these very data, in this tokenizer's positions
        manifest = sepo.read_manifest(os.path.dirname(os.path.abspath(cfg.selections)))
        if manifest is None:
            log0(f"warning: no manifest.json beside {cfg.selections}: cannot check that it selects tokens of these "
                 "data and this tokenizer")
        else:
            problem = sepo.provenance_problem(manifest, cfg.selections, cfg.data, cfg.split,
                                              data_fingerprint or rundir.fingerprint(cfg.data),
                                              data.tokenizer_hash(tokenizer))
            if problem:
                raise UserError(problem)
    out = rank_zero_first(load_all)
    if len(out["train"]) < cfg.global_batch_size:
        raise UserError(f"{cfg.data}: {len(out['train'])} pairs, fewer than one global batch "
                        f"({cfg.global_batch_size}); lower --global_batch_size")
    return out


def batch_order(n_pairs, cfg, epoch):
    """The pair order of an epoch: a permutation seeded by (seed, epoch), the same on every rank and every resume."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
    return torch.randperm(n_pairs, generator=g).tolist()


def rank_micro_batches(order, step, steps_per_epoch, cfg, rank, world):
    """The micro-batches (lists of pair indices) of this rank at a global step. The global batch is split into
    contiguous per-rank slices, each into micro-batches: the same micro-batches as a 1-rank run's."""
    i = step % steps_per_epoch
    global_batch = order[i * cfg.global_batch_size:(i + 1) * cfg.global_batch_size]
    per_rank = cfg.global_batch_size // world
    mine = global_batch[rank * per_rank:(rank + 1) * per_rank]
    return [mine[j:j + cfg.micro_batch_size] for j in range(0, per_rank, cfg.micro_batch_size)]


def collate(ds, indices, pad_id, method, device, refs=None):
    """A padded batch of the pairs at `indices`, chosen rows first; `index` holds the pairs' positions in ds, and
    with `refs` (models.reference_logps) `ref` the reference's per-token log-probs, aligned with the labels."""
    rows = [ds[int(i)] for i in indices]
    batch = data.collate_pairs(rows, pad_id, token_fields=tuple(method.batch_fields))
    batch["index"] = torch.tensor([int(i) for i in indices])
    if refs is not None:
        batch["ref"] = torch.zeros(batch["labels"].shape)
        for side, offset in ((0, 0), (1, len(rows))):  # responses follow the prompt (right padding)
            for j, (i, row) in enumerate(zip(indices, rows)):
                values = refs[int(i)][side]
                batch["ref"][offset + j, row["prompt_len"]:row["prompt_len"] + len(values)] = values
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


if __name__ == "__main__":
    sys.exit(utils.cli(main))
