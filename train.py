"""Preference optimization for every method of the two papers, in one handwritten FSDP2 loop.

    python train.py                                   # tiny offline model + synthetic task, ConfPO, ~1 min on CPU
    python train.py --method dpo --max_steps 20       # any method on the same tiny world
    torchrun --standalone --nproc_per_node 8 train.py --method confpo \
        --model princeton-nlp/Llama-3-Base-8B-SFT --data princeton-nlp/llama3-ultrafeedback-armorm \
        --beta 1.0 --gamma 2.0 --lr 6e-7 --activation_checkpointing --output_dir runs/confpo-llama3-base
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 train.py ... --hybrid_shard

Top to bottom: the config (every field is a flag) and the method table; `train`: the checks, the set-up and the
loop with its export; then what they call: data, one micro-step, metrics, checkpoints (torch.distributed.checkpoint,
written to a temporary folder and renamed) and the Hugging Face export (models.py loads and shards the models).
Each micro-step is one forward over chosen and rejected rows together. Under torchrun the model is sharded with
FSDP2; without torchrun variables it runs as a world of one, which trains the model itself (FSDP would only add
copies). A run owns its output folder (a lock), writes nothing there before every check has passed, saves a
checkpoint and stops at the next step boundary on SIGTERM, and resumes from its newest intact checkpoint when the
same command runs again.

Defaults are the papers' (ConfPO App. D). Without --model (the tiny offline world) these change, where no flag or
--config file sets them: global_batch_size 32, micro_batch_size 8, lr 3e-4, max_length 128, max_prompt_length 64,
log_every 5, eval_every 20, eval_max_pairs 200, save_every 50 (tiny.TRAIN_DEFAULTS).
"""

import dataclasses
import glob
import inspect
import json
import math
import os
import random
import resource
import shutil
import sys
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Literal, NamedTuple, Optional

import utils
from utils import arg

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
    form: str = arg("auto", "data form: auto | standard | conversational | implicit")
    skip_bad_rows: bool = arg(False, "skip (and count) bad rows instead of stopping at the first")
    selections: str = arg("", "SePO: token selections written by score.py (required for --method sepo)")
    output_dir: str = arg("", "where checkpoints, metrics.jsonl and the final model go ('' = runs/<method>)")
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world, built on first use")
    # data shape (ConfPO App. D, following SimPO)
    max_length: int = arg(2048, "prompt + response tokens, responses cut from the right")
    max_prompt_length: int = arg(1800, "prompt tokens, cut from the left")
    num_proc: int = arg(1, "processes for tokenization (datasets.map)")
    cache_dir: str = arg("", "datasets cache folder ('' = Hugging Face's default)")
    # optimisation (ConfPO App. D: batch 128, 1 epoch, AdamW, cosine with 10% warm-up; clip 1.0 as SePO)
    global_batch_size: int = arg(128, "preference pairs per optimizer step, over all ranks and micro-steps")
    micro_batch_size: int = arg(2, "pairs per rank per forward (the batch holds 2x rows: chosen and rejected)")
    epochs: int = arg(1, "passes over the data")
    max_steps: int = arg(-1, "optimizer steps (-1 = epochs x pairs // global_batch_size); sets the schedule length")
    halt_after: int = arg(0, "stop after this many steps in this invocation, with a checkpoint (0 = never); the "
                             "schedule is unchanged, so a later run resumes exactly")
    lr: float = arg(6e-7, "peak learning rate (ConfPO Table 6, Llama-3-Base)")
    warmup_ratio: float = arg(0.1, "linear warm-up fraction of the steps, then cosine decay to 0")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    adam_beta1: float = arg(0.9, "AdamW beta1")
    adam_beta2: float = arg(0.999, "AdamW beta2 (SePO uses 0.95)")
    adam_eps: float = arg(1e-8, "AdamW epsilon")
    grad_clip: float = arg(1.0, "max global gradient norm (0 = no clipping)")
    seed: int = arg(42, "seed of the data order and of ConfPO-rand's draws")
    # objective hyper-parameters; None = the method's own default (see its docstring)
    beta: Optional[float] = arg(None, "beta of the objective")
    gamma: Optional[float] = arg(None, "target margin gamma (SimPO, ConfPO, SePO)")
    tau: Optional[float] = arg(None, "IPO's tau")
    label_smoothing: Optional[float] = arg(None, "conservative label smoothing (DPO, SimPO)")
    lambda_: Optional[float] = arg(None, "weight of the NLL / odds-ratio term (CPO, RRHF, SLiC-HF, ORPO)")
    lambda_w: Optional[float] = arg(None, "KTO desirable weight")
    lambda_l: Optional[float] = arg(None, "KTO undesirable weight")
    delta: Optional[float] = arg(None, "SLiC-HF margin delta")
    alpha: Optional[float] = arg(None, "R-DPO length coefficient alpha")
    threshold: Optional[str] = arg(None, "ConfPO tau: arithmetic | geometric | a probability such as 0.6")
    strict: Optional[bool] = arg(None, "ConfPO: select pi < tau (released code) instead of pi <= tau (paper)",
                                 nargs="?", const=True)
    normalize: Optional[str] = arg(None, "ConfPO: normalise by |y_s| (selected) or |y| (response)")
    # systems
    dtype: str = arg("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    device: str = arg("auto", "auto | cpu | cuda")
    threads: int = arg(0, "CPU threads per process (0 = OMP_NUM_THREADS if you set it, else the cores available "
                          "divided among this node's ranks)")
    precompute_ref: bool = arg(False, "reference methods: compute the reference's per-token log-probs once, in one "
                                      "pass before training, into output_dir/ref_logps (resumable); training then "
                                      "holds no reference model (as TRL's precompute_ref_log_probs)")
    activation_checkpointing: bool = arg(False, "recompute decoder layers in backward (saves memory)")
    logp_path: str = arg("auto", "chunked: log-probs from hidden states, never the full logits | logits | auto")
    chunk_size: int = arg(0, "response tokens per vocabulary block in the log-prob computation (0 = as many as "
                             "fit in 32 MiB of float32 logits on a CPU, 512 MiB on a GPU)")
    disable_dropout: bool = arg(True, "set every dropout probability of policy and reference to 0 (as TRL)")
    hybrid_shard: bool = arg(False, "replicate across nodes, shard within a node (2-D mesh)")
    accumulate_unsharded: bool = arg(False, "FSDP: keep gradients unsharded across micro-steps and reduce them once "
                                            "per step (less communication, but a full fp32 gradient per GPU: 32 GB "
                                            "at 8B); the default reduce-scatters every micro-step")
    deterministic: bool = arg(False, "torch.use_deterministic_algorithms: the same bits on every run on a GPU too "
                                     "(slower kernels; a CPU run is deterministic without it)")
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)")
    # bookkeeping
    log_every: int = arg(10, "steps between lines of metrics.jsonl")
    eval_every: int = arg(100, "steps between held-out evaluations (and one at the end)")
    eval_max_pairs: int = arg(1000, "held-out pairs used per evaluation (0 = all)")
    save_every: int = arg(100, "steps between checkpoints (0 = none before the end)")
    save_final: bool = arg(True, "also save a checkpoint at the last step (to resume from; the result is the export "
                                 "in final/, and a rerun finds the run finished either way)")
    keep_last: int = arg(2, "checkpoints kept")
    resume: bool = arg(True, "continue from the newest checkpoint in output_dir if there is one")
    export: bool = arg(True, "write a Hugging Face folder output_dir/final at the end")
    judge: str = arg("auto", "after the export, score greedy answers: synthetic (the tiny world's task) | none | "
                             "auto (synthetic when training on the tiny world)")
    skip_nonfinite: bool = arg(False, "skip (and count) an optimizer step whose loss or gradient norm is not finite, "
                                      "instead of stopping the run there")
    save_on_signal: bool = arg(True, "on SIGTERM (a scheduler's preemption): finish the step, save a checkpoint, "
                                     "stop; a second SIGTERM stops at once (false: stop at once, as Ctrl-C)")


# Fields that may differ when a run is resumed (everything else must match the run in output_dir). Paths are
# compared by their contents, so a moved or copied run folder, or data given by another path, resumes.
# micro_batch_size changes only the float summation order (ConfPO-rand draws per pair, whatever the micro-batch),
# except for KTO, whose z_ref is estimated per micro-step over all ranks: KTO depends on micro-batches and ranks.
RESUMABLE_FIELDS = {"judge", "halt_after", "log_every", "eval_every", "eval_max_pairs", "save_every", "keep_last",
                    "resume", "export", "num_proc", "cache_dir", "skip_bad_rows", "device", "hybrid_shard",
                    "activation_checkpointing", "chunk_size", "logp_path", "micro_batch_size", "skip_nonfinite",
                    "output_dir", "tiny_world", "threads", "save_final", "accumulate_unsharded", "deterministic",
                    "dist_timeout", "save_on_signal"}
PATH_FIELDS = ("model", "ref_model", "tokenizer", "data", "eval_data", "selections")  # compared by content
HPARAMS = ["beta", "gamma", "tau", "label_smoothing", "lambda_", "lambda_w", "lambda_l", "delta", "alpha",
           "threshold", "strict", "normalize"]


def parse_config(argv=None):
    """The training config from flags and --config. Returns (Config, names set explicitly)."""
    return utils.parse_dataclass(Config, argv, __doc__, numbers_as_text={"threshold"})


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import numpy as np  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,  # noqa: E402
                                                     get_state_dict, set_state_dict)
from tqdm import tqdm  # noqa: E402

import confpo  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import sepo  # noqa: E402
import tiny  # noqa: E402
from models import check_source, compute_dtype, load_model, make_mesh  # noqa: E402
from utils import (FolderLock, UserError, atomic_write, differences, fingerprint, fsync_dir, log0,  # noqa: E402
                   on_rank_zero, rank_zero_first, read_marker, remove, run_in_group)


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
        for key, value in tiny.TRAIN_DEFAULTS.items():
            if key not in explicit:
                setattr(cfg, key, value)
    if not cfg.output_dir:
        cfg.output_dir = os.path.join("runs", cfg.method)
    method = METHODS[cfg.method]
    if method.selections and not cfg.selections:
        raise UserError(f"--method {cfg.method} needs --selections: the token selections written by score.py "
                        "(or run the whole pipeline with `python sepo_pipeline.py`)")
    if cfg.selections and not method.selections:
        raise UserError(f"--selections is only used by --method sepo, not {cfg.method}")
    accepted = inspect.signature(method.objective).parameters
    hparams = {}
    for name in HPARAMS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in accepted:
            takes = [p for p in HPARAMS if p in accepted]
            raise UserError(f"--{name} is not a parameter of {cfg.method} (it takes: {', '.join(takes) or 'none'})")
        if name == "threshold":
            try:
                value = confpo.parse_threshold(value)
            except ValueError as e:
                raise UserError(f"--{e}") from None
        if name == "normalize" and value not in ("selected", "response"):
            raise UserError(f"--normalize must be selected or response, got {value!r}")
        hparams[name] = value
    check_ranges(cfg, hparams)
    return hparams


def check_ranges(cfg, hparams):
    """Every number in its range, before anything loads: a negative beta would train the inverted objective with
    exit 0, a NaN would surface only at the first step, a zero micro-batch as a ZeroDivisionError."""
    def need(ok, name, what):
        if not ok:
            raise UserError(f"--{name} {getattr(cfg, name, hparams.get(name))}: {what}")
    finite = lambda x: isinstance(x, (int, float)) and math.isfinite(x)  # noqa: E731
    need(finite(cfg.lr) and cfg.lr > 0, "lr", "the learning rate must be a positive number")
    for name in ("global_batch_size", "micro_batch_size", "epochs", "log_every", "eval_every", "max_length",
                 "max_prompt_length", "dist_timeout"):
        need(getattr(cfg, name) >= 1, name, "must be at least 1")
    for name in ("save_every", "keep_last", "halt_after", "chunk_size", "threads", "eval_max_pairs"):
        need(getattr(cfg, name) >= 0, name, "must not be negative")
    for name in ("weight_decay", "grad_clip", "adam_eps"):
        need(finite(getattr(cfg, name)) and getattr(cfg, name) >= 0, name, "must be a finite number >= 0")
    need(cfg.adam_eps > 0, "adam_eps", "must be positive")
    need(finite(cfg.warmup_ratio) and 0 <= cfg.warmup_ratio <= 1, "warmup_ratio", "must lie in [0, 1]")
    for name in ("adam_beta1", "adam_beta2"):
        need(finite(getattr(cfg, name)) and 0 <= getattr(cfg, name) < 1, name, "must lie in [0, 1)")
    need(cfg.max_prompt_length < cfg.max_length, "max_prompt_length", f"must be below --max_length {cfg.max_length}")
    for name, value in hparams.items():
        if name in ("threshold", "strict", "normalize"):  # checked above
            continue
        need(finite(value), name, "must be a finite number")
        if name in ("beta", "tau"):
            need(value > 0, name, "must be positive (a negative beta trains the inverted objective)")
        if name in ("lambda_", "lambda_w", "lambda_l", "delta"):
            need(value >= 0, name, "must not be negative")
        if name == "label_smoothing":
            need(0 <= value < 0.5, name, "must lie in [0, 0.5)")


def main(argv=None):
    cfg, explicit = parse_config(argv)
    hparams = resolve(cfg, explicit)
    return run_in_group(cfg.device, lambda rank, world, device: train(cfg, hparams, rank, world, device),
                        cfg.threads, cfg.dist_timeout)


# ---------------------------------------------------------------------------------------------------------------
# The run: checks and set-up, then the loop and the export, in an output folder that this job alone writes
# ---------------------------------------------------------------------------------------------------------------

def train(cfg, hparams, rank, world, device):
    method = METHODS[cfg.method]
    on_tiny_world = not cfg.model
    if cfg.deterministic:  # cuBLAS needs a fixed workspace for deterministic results
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if on_tiny_world:  # the offline tiny world (rank 0 builds it once), from an SFT model as in both papers
        paths = rank_zero_first(lambda: tiny.build_tiny_world(cfg.tiny_world))
        if cfg.data or cfg.eval_data:  # the user's data are checked before the SFT start is built (minutes)
            sources = [(src, split) for src, split in ((cfg.data, cfg.split), (cfg.eval_data, cfg.eval_split or
                                                                                cfg.split)) if src]
            on_rank_zero(lambda: [data.load_preferences(src, split=split, form=cfg.form, cache_dir=cfg.cache_dir or
                                                        None, skip_bad_rows=cfg.skip_bad_rows)
                                  for src, split in sources], share=False)
        if not cfg.data:
            cfg.data, cfg.eval_data = paths["train"], cfg.eval_data or paths["test"]
        cfg.model = (paths["llama-small"] if method.chosen_only else
                     tiny.sft_model(cfg.tiny_world, paths, main, cfg.seed, cfg.cache_dir, cfg.device))
    if cfg.global_batch_size % (world * cfg.micro_batch_size):
        raise UserError(f"--global_batch_size {cfg.global_batch_size} is not a multiple of ranks x micro batch "
                        f"({world} x {cfg.micro_batch_size})")
    with FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it found it
        run = set_up(cfg, method, rank, world, device)
        return loop(cfg, method, hparams, run, on_tiny_world, rank, world, device)


def set_up(cfg, method, rank, world, device):
    """Every check that can fail (the folder, the models, the data, the selections), then the models, the optimizer
    and the newest intact checkpoint. Only then is the folder written: its config.json, a tidy metrics.jsonl."""
    from transformers import AutoConfig, AutoTokenizer
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    saved = on_rank_zero(lambda: read_marker(cfg.output_dir, "config.json", "run"))
    fingerprints = on_rank_zero(lambda: {k: fingerprint(getattr(cfg, k)) for k in PATH_FIELDS})
    # what the folder holds decides collectives: rank 0 looks, every rank follows (ranks on other nodes may see a
    # shared filesystem late, and ranks that disagree hang in the next collective)
    found = on_rank_zero(lambda: checkpoints(cfg.output_dir))
    check_same_run(cfg, saved, fingerprints, found)
    for flag, path in (("--model", cfg.model), ("--ref_model", cfg.ref_model), ("--tokenizer", cfg.tokenizer)):
        check_source(path, flag)

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if cfg.tokenizer and len(tokenizer) > AutoConfig.from_pretrained(cfg.model).vocab_size:
        raise UserError(f"--tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens, more than {cfg.model}'s "
                        "vocabulary")
    ds = prepare_data(cfg, method, tokenizer, fingerprints["data"])
    steps_per_epoch = len(ds["train"]) // cfg.global_batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    unused = len(ds["train"]) - steps_per_epoch * cfg.global_batch_size
    log0(f"{total} steps of {cfg.global_batch_size} pairs ({world} ranks x {cfg.micro_batch_size} pairs x "
         f"{cfg.global_batch_size // (world * cfg.micro_batch_size)} micro-steps); {unused} pairs per epoch left "
         "over")

    mesh = make_mesh(cfg, world, device)
    policy = load_model(cfg.model, cfg, mesh, device, trainable=True)
    ref = load_model(cfg.ref_model or cfg.model, cfg, mesh, device, trainable=False) if method.reference else None
    log0(f"policy {cfg.model}: log-probs via the {policy.path} path; reference: "
         f"{(cfg.ref_model or cfg.model) if ref is not None else 'none'}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))
    meter = Meter(device)
    step, skipped = 0, 0
    if cfg.resume and on_rank_zero(lambda: finished_at(cfg.output_dir)) == total:  # exported at its last step
        step = total
    elif found and cfg.resume:
        step, skipped = resume(found, policy, optimizer, scheduler, meter, rank)

    dist.barrier()  # every check passed and every rank has read the checkpoint: the folder is now this run's
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if rank == 0:
        atomic_write(os.path.join(cfg.output_dir, "config.json"),
                     json.dumps({**dataclasses.asdict(cfg), "_fingerprints": fingerprints}, indent=2))
        if found and not cfg.resume:  # --resume false: start over, and leave no old checkpoint to resume from
            log0(f"--resume false: removing {len(found)} checkpoints of the previous run")
            for old in found:
                remove(old)
        trim_metrics(metrics_path, step)
        for leftover in glob.glob(os.path.join(cfg.output_dir, "checkpoints", "*.tmp")):
            shutil.rmtree(leftover, ignore_errors=True)  # a save that was killed before its rename
    refs = {}
    if ref is not None and cfg.precompute_ref and step < total:
        # one pass of the reference, after config.json is written: a killed pass resumes in a folder known as ours
        refs = {split: with_ref_logps(cfg, ref, pairs, split, tokenizer, fingerprints, device, rank, world)
                for split, pairs in ds.items()}
        ref = None  # no reference model during training
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return SimpleNamespace(tokenizer=tokenizer, pad_id=pad_id, ds=ds, refs=refs, policy=policy, ref=ref,
                           optimizer=optimizer, scheduler=scheduler, meter=meter, step=step, skipped=skipped,
                           total=total, steps_per_epoch=steps_per_epoch, metrics_path=metrics_path)


def check_same_run(cfg, saved, fingerprints, found):
    """A folder holding another run with something to resume (a checkpoint or an export) is refused; the settings
    of a run that saved nothing are simply replaced."""
    if saved is None:
        return
    diff = differences(saved, dataclasses.asdict(cfg), fingerprints, RESUMABLE_FIELDS)
    if not diff:
        return
    said = "; ".join(f"{k} {theirs!r} there, {mine!r} now" + (" (other contents)" if theirs == mine else "")
                     for k, theirs, mine in diff)
    if not found and not os.path.exists(os.path.join(cfg.output_dir, "final", "config.json")):
        log0(f"note: {cfg.output_dir} held the settings of a run that saved nothing ({said}); replacing them")
        return
    raise UserError(f"{cfg.output_dir} holds a different run with checkpoints or an export (differs in: {said}). "
                    f"To continue it, run with its settings: python train.py --config "
                    f"{os.path.join(cfg.output_dir, 'config.json')}; to train something else, choose another "
                    "--output_dir")


def loop(cfg, method, hparams, run, on_tiny_world, rank, world, device):
    """The optimizer steps from run.step to run.total, their metrics and checkpoints; then the export and the
    synthetic judge, each done once however often the finished command is run again."""
    step, total, ds, policy = run.step, run.total, run.ds, run.policy

    def write(line):
        if rank == 0:
            with open(run.metrics_path, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    def held_out(at_step):
        line = evaluate(cfg, method, policy, run.ref, ds["eval"], hparams, run.pad_id, device, world,
                        run.refs.get("eval"))
        write({**line, "step": at_step, "split": "eval"})
        return line

    if "eval" in ds and step == 0:  # the starting point, for comparison
        held_out(0)
    if step == total and step > 0:
        log0(f"{cfg.output_dir}: this run had already finished; only what is missing is done again")
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    t_last, halt_at = time.perf_counter(), step + cfg.halt_after if cfg.halt_after else None
    utils.SIGTERM_STATE.update(defer=cfg.save_on_signal, pending=False)  # SIGTERM: save at the next step boundary
    try:
        while step < total:
            epoch = step // run.steps_per_epoch
            order = batch_order(len(ds["train"]), cfg, epoch)
            micro = rank_micro_batches(order, step, run.steps_per_epoch, cfg, rank, world)
            batches = [collate(ds["train"], idx, run.pad_id, method, device, run.refs.get("train")) for idx in micro]
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
                    policy.set_requires_gradient_sync(i == len(batches) - 1)
                per_pair, metrics = micro_step(method, policy, run.ref, batch, hparams, (cfg.seed, step))
                (per_pair.sum() * world / count).backward()
                not_finite += (~torch.isfinite(per_pair.detach())).sum()
                run.meter.add(logged_loss(method, per_pair, metrics), metrics, forwarded_tokens(method, batch))
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                                       float("inf"))
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            dist.all_reduce(not_finite)
            lr = run.scheduler.get_last_lr()[0]
            if not_finite or not torch.isfinite(grad_norm):  # never let a NaN into the weights
                if not cfg.skip_nonfinite:
                    raise UserError(f"step {step + 1}: the loss or the gradient norm ({float(grad_norm)}) is not "
                                    f"finite; stopped before the optimizer step. {last_checkpoint(cfg)}. Lower "
                                    "--lr, or pass --skip_nonfinite to skip such steps")
                run.skipped += 1
                log0(f"\nstep {step + 1}: loss or gradient norm not finite, step skipped ({run.skipped} so far)")
            else:
                run.optimizer.step()
            with warnings.catch_warnings():  # the schedule follows the step count, skipped steps included
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == total:
                line = run.meter.result()
                elapsed, t_last = time.perf_counter() - t_last, time.perf_counter()
                line.update(step=step, split="train", lr=lr, grad_norm=float(grad_norm), skipped_steps=run.skipped,
                            tokens_per_s=line.pop("tokens_timed") / elapsed, peak_memory_mib=peak_memory_mib(device))
                bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                write(line)
            if "eval" in ds and (step % cfg.eval_every == 0 or step == total):
                line = held_out(step)
                log0(f"\nstep {step} eval: loss {line['loss']:.4f}" +
                     (f", reward accuracy {line['accuracy']:.3f}" if "accuracy" in line else ""))
            halting = halt_at is not None and step >= halt_at
            signalled = cfg.save_on_signal and step < total and any_rank(utils.SIGTERM_STATE["pending"], device)
            if (cfg.save_every and step % cfg.save_every == 0) or (step == total and cfg.save_final) or halting \
                    or signalled:
                save_checkpoint(cfg, run, step, rank)
            if signalled:
                bar.close()
                raise UserError(f"stopped by SIGTERM after step {step}, saved in {checkpoints(cfg.output_dir)[-1]}; "
                                "run the same command to resume there", code=143)
            if halting:
                bar.close()
                log0(f"halted after step {step} (--halt_after); run the same command again to continue")
                return None
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM without --save_on_signal (or a second one)
        what = "terminated (SIGTERM)" if isinstance(e, utils.Terminated) else "interrupted"
        raise UserError(f"{what} during step {step + 1}: nothing new was saved. {last_checkpoint(cfg)}; run the "
                        "same command to resume", code=143 if isinstance(e, utils.Terminated) else 130) from None
    finally:
        utils.SIGTERM_STATE.update(defer=False)
        bar.close()  # before any message: the bar's line ends first
    final = os.path.join(cfg.output_dir, "final")
    if cfg.export and not on_rank_zero(lambda: os.path.exists(os.path.join(final, "config.json"))):
        export(cfg, policy, run.tokenizer, cfg.model, step, rank)
    judged = rank == 0 and any(line.get("split") == "generate" for line in read_metrics(run.metrics_path))
    if cfg.export and (cfg.judge == "synthetic" or (cfg.judge == "auto" and on_tiny_world)) and rank == 0 \
            and not judged:  # the synthetic task has a programmatic judge: score greedy answers to held-out prompts
        source = cfg.eval_data or cfg.data
        prompts = [row["prompt"] for row in data.load_preferences(source, cache_dir=cfg.cache_dir or None)][:100]
        before = tiny.synthetic_reward_of(cfg.model, prompts, device, tokenizer_path=cfg.tokenizer or cfg.model)
        after = tiny.synthetic_reward_of(final, prompts, device)
        write({"step": step, "split": "generate", "reward_before": before, "reward_after": after,
               "prompts": len(prompts)})
        log0(f"synthetic reward of greedy answers to {len(prompts)} held-out prompts: {before:.3f} before, "
             f"{after:.3f} after {cfg.method}")
    log0(f"done: {cfg.output_dir} (metrics.jsonl, checkpoints/, {'final/' if cfg.export else 'no export'})")
    return cfg.output_dir


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
# Data
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

    if method.selections:
        check_selections(cfg, tokenizer, data_fingerprint or fingerprint(cfg.data))
    out = rank_zero_first(load_all)
    if len(out["train"]) < cfg.global_batch_size:
        raise UserError(f"{cfg.data}: {len(out['train'])} pairs, fewer than one global batch "
                        f"({cfg.global_batch_size}); lower --global_batch_size")
    return out


def check_selections(cfg, tokenizer, data_fingerprint):
    """score.py writes manifest.json beside its selections: the scoring must have finished, on these very data, and
    in the positions of this tokenizer's tokens."""
    path = cfg.selections
    manifest = sepo.read_manifest(os.path.dirname(os.path.abspath(path)))
    if manifest is None:
        log0(f"warning: no manifest.json beside {path}: cannot check that it selects tokens of these data and this "
             "tokenizer")
        return
    if not manifest.get("complete"):
        raise UserError(f"{path}: the score.py run that writes it has not finished (see its manifest.json); run it "
                        "again")
    scored = manifest.get("data", {})
    if scored and (scored.get("fingerprint"), scored.get("split")) != (data_fingerprint, cfg.split):
        raise UserError(f"{path}: these selections were scored on other data ({scored.get('path')} [{scored.get('split')}],"
                        f" fingerprint {scored.get('fingerprint')}) than --data {cfg.data} [{cfg.split}] (fingerprint "
                        f"{data_fingerprint}); score these data with score.py, or train on the data that were scored")
    if manifest.get("policy_tokenizer") != data.tokenizer_hash(tokenizer):
        raise UserError(f"{path}: these selections index the tokens of another tokenizer (see its manifest.json); "
                        "score again with --policy set to this model")


def with_ref_logps(cfg, ref, pairs, split, tokenizer, fingerprints, device, rank, world, block=256):
    """The reference's per-token log-probs of every pair -> {pair index: (chosen (n_w,), rejected (n_l,))}, over
    its response tokens, computed once: block by block, every rank forwarding its share of a block's pairs
    through the sharded reference, rank 0 writing the block to output_dir/ref_logps/<split>_NNNNNN.pt (tensors
    only) through a temporary file. A killed pass resumes at the first missing block; a damaged block (cut short,
    of other pairs) is computed again. Rank 0 decides which blocks are missing, and every rank forwards as many
    micro-batches as the others, an empty share of the last block included (FSDP's collectives must match)."""
    folder = os.path.join(cfg.output_dir, "ref_logps")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # what the blocks are the log-probs of (from set_up's fingerprints): blocks of anything else are cleared first
    source = fingerprints["eval_data"] or fingerprints["data"] if split == "eval" else fingerprints["data"]
    identity = {"reference": fingerprints["ref_model"] or fingerprints["model"], "data": source,
                "split": cfg.eval_split or cfg.split if split == "eval" else cfg.split, "pairs": len(pairs),
                "tokenizer": data.tokenizer_hash(tokenizer), "max_length": cfg.max_length,
                "max_prompt_length": cfg.max_prompt_length, "dtype": repr(compute_dtype(cfg.dtype, device))}
    paths = [os.path.join(folder, f"{split}_{b:06d}.pt") for b in range(math.ceil(len(pairs) / block))]
    blocks = lambda b: list(range(b * block, min(len(pairs), (b + 1) * block)))  # noqa: E731

    def missing():  # rank 0: clear the blocks of anything else, check the others, name what is left to compute
        os.makedirs(folder, exist_ok=True)
        marker = os.path.join(folder, f"{split}.json")
        if os.path.exists(marker) and read_json(marker) != identity:
            for stale in glob.glob(os.path.join(folder, f"{split}_*.pt")):
                os.remove(stale)
        atomic_write(marker, json.dumps(identity))
        todo = []
        for b, path in enumerate(paths):
            if os.path.exists(path) and ref_block(path, blocks(b)) is None:
                log0(f"warning: {path} is damaged; computing it again")
                os.remove(path)
            if not os.path.exists(path):
                todo.append(b)
        return todo
    todo = on_rank_zero(missing)
    for b in tqdm(todo, desc=f"reference log-probs ({split})", disable=rank != 0 or not todo, dynamic_ncols=True):
        idx = blocks(b)
        mine = idx[rank::world]
        # every rank the same forwards (FSDP): a short share repeats a pair, an empty one forwards the block's first
        work = (mine or idx[:1]) * math.ceil(len(idx) / world)
        work = work[:math.ceil(len(idx) / world)]
        rows = {}
        for s in range(0, len(work), cfg.micro_batch_size):
            chunk = work[s:s + cfg.micro_batch_size]
            batch = collate(pairs, chunk, pad_id, Method(None), device)
            with torch.no_grad():
                logps, mask = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  labels=batch["labels"])
            for j, i in enumerate(chunk):  # per pair of this rank's share: its response tokens' log-probs
                if i in mine:
                    rows[i] = (logps[j][mask[j]].cpu(), logps[len(chunk) + j][mask[len(chunk) + j]].cpu())
        gathered = [None] * world
        dist.all_gather_object(gathered, rows)
        if rank == 0:
            rows = {i: r for part in gathered for i, r in part.items()}
            torch.save({"index": torch.tensor(idx), "chosen": [rows[i][0] for i in idx],
                        "rejected": [rows[i][1] for i in idx]}, paths[b] + ".tmp")
            os.replace(paths[b] + ".tmp", paths[b])
        dist.barrier()
    values = {}
    for b, path in enumerate(paths):
        saved = ref_block(path, blocks(b))
        if saved is None:
            raise UserError(f"{path} is damaged (changed after it was checked); run the same command again")
        values.update(zip(saved["index"].tolist(), zip(saved["chosen"], saved["rejected"])))
    return values


def ref_block(path, expected):
    """A reference block as written (tensors only: loading runs no code), or None when it cannot be read or holds
    other pairs than `expected`."""
    try:
        saved = torch.load(path, weights_only=True)
        if saved["index"].tolist() != expected or not len(saved["chosen"]) == len(saved["rejected"]) == len(expected):
            return None
        return saved
    except Exception:  # cut short, garbage, another format: any error of the reader
        return None


def read_json(path):
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


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
    with `refs` (with_ref_logps) `ref` the reference's per-token log-probs, aligned with the labels."""
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


def evaluate(cfg, method, policy, ref, eval_ds, hparams, pad_id, device, world, refs=None):
    """Held-out loss and rewards; every rank runs the same number of forwards (FSDP needs it), pairs beyond the
    end are repeats with zero weight."""
    n = len(eval_ds) if not cfg.eval_max_pairs else min(len(eval_ds), cfg.eval_max_pairs)
    per_rank = math.ceil(n / world)
    idx = [dist.get_rank() * per_rank + j for j in range(per_rank)]
    meter = Meter(device)
    policy.eval()
    with torch.no_grad():
        for s in range(0, per_rank, cfg.micro_batch_size):
            chunk = idx[s:s + cfg.micro_batch_size]
            valid = torch.tensor([i < n for i in chunk], device=device)
            batch = collate(eval_ds, [min(i, n - 1) for i in chunk], pad_id, method, device, refs)
            per_pair, metrics = micro_step(method, policy, ref, batch, hparams, (cfg.seed, -1))
            keep = valid.nonzero().squeeze(-1)
            meter.add(logged_loss(method, per_pair, metrics)[keep], {k: v[keep] for k, v in metrics.items()},
                      forwarded_tokens(method, batch, valid))
    policy.train()
    line = meter.result()
    line.pop("tokens_timed")
    return line


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and export
# ---------------------------------------------------------------------------------------------------------------

def checkpoints(out_dir):
    """Complete checkpoints, oldest first: folders step_NNNNNNNN holding trainer_state.json (written last)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(root, d, "trainer_state.json"))]
    return [os.path.join(root, d) for d in sorted(done)]


def last_checkpoint(cfg):
    """Where a stopped run would resume from, in words."""
    found = checkpoints(cfg.output_dir)
    return f"The last checkpoint is {found[-1]}" if found else "There is no checkpoint yet"


def save_checkpoint(cfg, run, step, rank):
    """Model and optimizer shards through torch.distributed.checkpoint, plus scheduler, step, RNG states and the
    meter's partial sums (tensors only: loading runs no code), into step_N.tmp, renamed to step_N once complete:
    a kill at any moment leaves the previous checkpoint intact. The size of every file is recorded, so that a
    damaged checkpoint is recognised at resume."""
    root = os.path.join(cfg.output_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        model_sd, optim_sd = get_state_dict(run.policy, run.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
        torch.save({"rng": rng_state(), "meter": run.meter.state()}, os.path.join(tmp, f"rank_{rank}.pt"))
        dist.barrier()
        if rank == 0:
            files = {name: os.path.getsize(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
            state = {"step": step, "scheduler": run.scheduler.state_dict(), "world_size": dist.get_world_size(),
                     "skipped_steps": run.skipped, "files": files}
            atomic_write(os.path.join(tmp, "trainer_state.json"), json.dumps(state))
            if os.path.exists(final):  # re-saving a step (a run restarted from scratch): retire the old one first
                remove(final)
            os.replace(tmp, final)
            fsync_dir(root)
            for old in checkpoints(cfg.output_dir)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
                remove(old)
    except Exception as e:
        if utils.disk_full(e, tmp):
            raise UserError(f"the disk is full: saving {final} failed ({type(e).__name__}). Free some space and run "
                            f"the same command again; {last_checkpoint(cfg).lower()}, intact", everywhere=False) from e
        raise
    dist.barrier()


def resume(found, policy, optimizer, scheduler, meter, rank):
    """Load the newest intact checkpoint of `found` -> (its step, the steps skipped before it). A checkpoint that is
    incomplete or unreadable on any rank is skipped with a warning that names it; when none is intact, the run
    stops."""
    for path in reversed(found):
        problem = ""
        try:
            step, skipped = load_checkpoint(path, policy, optimizer, scheduler, meter, rank)
        except Exception as e:  # a damaged checkpoint: any error of the readers
            problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        verdicts = [None] * dist.get_world_size()
        dist.all_gather_object(verdicts, problem)
        bad = [(r, p) for r, p in enumerate(verdicts) if p]
        if not bad:
            log0(f"resumed from {path} at step {step}")
            return step, skipped
        log0(f"warning: skipping checkpoint {path}: unreadable on rank {bad[0][0]} ({bad[0][1]})")
    raise UserError(f"no checkpoint of {os.path.dirname(found[0])} is intact ({len(found)} tried, each named "
                    "above); to start over in this folder, pass --resume false")


def load_checkpoint(path, policy, optimizer, scheduler, meter, rank):
    """One checkpoint into the model, optimizer, scheduler, RNGs and meter -> (its step, the steps skipped before
    it); raises when it is damaged."""
    with open(os.path.join(path, "trainer_state.json")) as fh:
        trainer_state = json.load(fh)
    for name, size in trainer_state.get("files", {}).items():
        actual = os.path.getsize(os.path.join(path, name)) if os.path.exists(os.path.join(path, name)) else None
        if actual != size:
            raise OSError(f"{name} has {actual} bytes, {size} were written")
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    scheduler.load_state_dict(trainer_state["scheduler"])
    mine = os.path.join(path, f"rank_{rank}.pt")
    if os.path.exists(mine):  # absent when resuming on more ranks than saved
        saved = torch.load(mine, weights_only=True)  # tensors and numbers only: loading runs no code
        set_rng_state(saved["rng"])
        meter.load(saved["meter"])
    return trainer_state["step"], trainer_state.get("skipped_steps", 0)


def rng_state():
    """Python's, NumPy's, torch's (and this rank's GPU's) generator states as tensors and numbers. Only this rank's
    device: a resume with another number of visible GPUs (CUDA_VISIBLE_DEVICES) still reads it."""
    version, mt, gauss = random.getstate()
    _, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": torch.tensor(mt, dtype=torch.int64), "python_version": version, "python_gauss": gauss,
            "numpy": torch.from_numpy(keys.astype(np.int64)), "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss),
            "numpy_gauss": float(cached), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8)}


def set_rng_state(s):
    random.setstate((s["python_version"], tuple(s["python"].tolist()), s["python_gauss"]))
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], s["numpy_has_gauss"],
                         s["numpy_gauss"]))
    torch.set_rng_state(s["torch"])
    cuda = s["cuda"]
    if isinstance(cuda, (list, tuple)):  # checkpoints before this version saved every visible GPU's state
        cuda = cuda[torch.cuda.current_device()] if torch.cuda.is_available() and len(cuda) > \
            torch.cuda.current_device() else torch.zeros(0, dtype=torch.uint8)
    if len(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def read_metrics(path):
    """The lines of metrics.jsonl that parse (a line cut short by a kill does not)."""
    lines = []
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return lines


def trim_metrics(path, step):
    """Drop the lines a stopped run wrote after its last checkpoint (they will be written again): all of them when
    starting from step 0, and a line cut short by a kill."""
    if os.path.exists(path):
        kept = [line for line in read_metrics(path) if step > 0 and isinstance(line, dict)
                and isinstance(line.get("step"), int) and line["step"] <= step]
        atomic_write(path, "".join(json.dumps(line) + "\n" for line in kept))


def finished_at(out_dir):
    """The step at which final/ was exported (its run.json), or None."""
    path = os.path.join(out_dir, "final", "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh).get("step")


def export(cfg, policy, tokenizer, model_path, step, rank):
    """A Hugging Face folder (safetensors + config + tokenizer) at output_dir/final, with run.json naming the step
    it holds. Parameters are gathered one at a time to rank 0's CPU memory; the other ranks never hold the whole
    model."""
    from transformers import AutoConfig, AutoModelForCausalLM
    sd = get_model_state_dict(policy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        config = AutoConfig.from_pretrained(model_path)
        dtype = getattr(config, "dtype", None) or torch.float32  # the source checkpoint's dtype (bf16 stays bf16)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, assign=True)
        model.tie_weights()
        out = os.path.join(cfg.output_dir, "final")
        tmp = out + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write(os.path.join(tmp, "run.json"), json.dumps({"step": step}))
        if os.path.exists(out):  # a run resumed after its export: retire the old folder first
            remove(out)
        os.replace(tmp, out)
        fsync_dir(cfg.output_dir)
        log0(f"exported {out}")
    dist.barrier()


if __name__ == "__main__":
    sys.exit(utils.cli(main))
