"""Preference optimization for every method of the two papers, in one handwritten FSDP2 loop.

    python train.py                                   # tiny offline model + synthetic task, ConfPO, ~2 min on CPU
    python train.py --method dpo --max_steps 20       # any method on the same tiny world
    torchrun --standalone --nproc_per_node 8 train.py --method confpo \
        --model princeton-nlp/Llama-3-Base-8B-SFT --data princeton-nlp/llama3-ultrafeedback-armorm \
        --beta 1.0 --gamma 2.0 --lr 6e-7 --activation_checkpointing --output_dir runs/confpo-llama3-base
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint $HEAD:29500 train.py ... --hybrid_shard

Top to bottom: the config (every field is a flag), the method table, set-up (process group, data, models, FSDP2),
the loop (one forward per micro-step over chosen and rejected together, gradient sync on the last micro-step only),
metrics, checkpoints (torch.distributed.checkpoint, written to a temporary folder and renamed) and the Hugging Face
export. Without torchrun variables it runs as a world of one, through the same FSDP code path.
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
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import confpo
import data
import losses
import sepo


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class Config:
    # what to train
    method: str = _f("confpo", "objective: one of METHODS")
    model: str = _f("", "policy: a Hugging Face model name or folder ('' = the tiny offline world's llama-small)")
    ref_model: str = _f("", "reference model for DPO-style methods ('' = the initial policy)")
    tokenizer: str = _f("", "tokenizer (and chat template) to use ('' = the model's own); exported with the model")
    data: str = _f("", "preference data: JSONL/JSON/Parquet file, save_to_disk folder or hub name ('' = the "
                       "synthetic task)")
    split: str = _f("train", "split of --data")
    eval_data: str = _f("", "held-out data ('' = --data's --eval_split, or the synthetic test set)")
    eval_split: str = _f("", "held-out split ('' = no held-out evaluation unless --eval_data is given)")
    form: str = _f("auto", "data form: auto | standard | conversational | implicit")
    skip_bad_rows: bool = _f(False, "skip (and count) bad rows instead of stopping at the first")
    selections: str = _f("", "SePO: token selections written by score.py (required for --method sepo)")
    output_dir: str = _f("", "where checkpoints, metrics.jsonl and the final model go ('' = runs/<method>)")
    tiny_world: str = _f("tiny_world", "folder of the offline tiny world, built on first use")
    # data shape (ConfPO App. D, following SimPO)
    max_length: int = _f(2048, "prompt + response tokens, responses cut from the right")
    max_prompt_length: int = _f(1800, "prompt tokens, cut from the left")
    num_proc: int = _f(1, "processes for tokenization (datasets.map)")
    cache_dir: str = _f("", "datasets cache folder ('' = Hugging Face's default)")
    # optimisation (ConfPO App. D: batch 128, 1 epoch, AdamW, cosine with 10% warm-up; clip 1.0 as SePO)
    global_batch_size: int = _f(128, "preference pairs per optimizer step, over all ranks and micro-steps")
    micro_batch_size: int = _f(2, "pairs per rank per forward (the batch holds 2x rows: chosen and rejected)")
    epochs: int = _f(1, "passes over the data")
    max_steps: int = _f(-1, "optimizer steps (-1 = epochs x pairs // global_batch_size); sets the schedule length")
    halt_after: int = _f(0, "stop after this many steps in this invocation, with a checkpoint (0 = never); the "
                            "schedule is unchanged, so a later run resumes exactly")
    lr: float = _f(6e-7, "peak learning rate (ConfPO Table 6, Llama-3-Base)")
    warmup_ratio: float = _f(0.1, "linear warm-up fraction of the steps, then cosine decay to 0")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2 (SePO uses 0.95)")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "max global gradient norm (0 = no clipping)")
    seed: int = _f(42, "seed of the data order and of ConfPO-rand's draws")
    # objective hyper-parameters; None = the method's own default (see its docstring)
    beta: float = _f(None, "beta of the objective")
    gamma: float = _f(None, "target margin gamma (SimPO, ConfPO, SePO)")
    tau: float = _f(None, "IPO's tau")
    label_smoothing: float = _f(None, "conservative label smoothing (DPO, SimPO)")
    lambda_: float = _f(None, "weight of the NLL / odds-ratio term (CPO, RRHF, SLiC-HF, ORPO)")
    lambda_w: float = _f(None, "KTO desirable weight")
    lambda_l: float = _f(None, "KTO undesirable weight")
    delta: float = _f(None, "SLiC-HF margin delta")
    alpha: float = _f(None, "R-DPO length coefficient alpha")
    threshold: str = _f(None, "ConfPO tau: arithmetic | geometric | a probability such as 0.6")
    strict: bool = _f(None, "ConfPO: select pi < tau (released code) instead of pi <= tau (paper)")
    normalize: str = _f(None, "ConfPO: normalise by |y_s| (selected) or |y| (response)")
    # systems
    dtype: str = _f("auto", "compute dtype: auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32")
    device: str = _f("auto", "auto | cpu | cuda")
    activation_checkpointing: bool = _f(False, "recompute decoder layers in backward (saves memory)")
    logp_path: str = _f("auto", "chunked: log-probs from hidden states, never the full logits | logits | auto")
    chunk_size: int = _f(0, "response tokens per vocabulary block in the log-prob computation (0 = as many as fit "
                            "in 32 MiB of float32 logits)")
    disable_dropout: bool = _f(True, "set every dropout probability of policy and reference to 0 (as TRL)")
    hybrid_shard: bool = _f(False, "replicate across nodes, shard within a node (2-D mesh)")
    # bookkeeping
    log_every: int = _f(10, "steps between lines of metrics.jsonl")
    eval_every: int = _f(100, "steps between held-out evaluations (and one at the end)")
    eval_max_pairs: int = _f(1000, "held-out pairs used per evaluation (0 = all)")
    save_every: int = _f(100, "steps between checkpoints (0 = only at the end)")
    keep_last: int = _f(2, "checkpoints kept")
    resume: bool = _f(True, "continue from the newest checkpoint in output_dir if there is one")
    export: bool = _f(True, "write a Hugging Face folder output_dir/final at the end")
    judge: str = _f("auto", "after the export, score greedy answers: synthetic (the tiny world's task) | none | auto "
                            "(synthetic when training on the tiny world)")


# The offline default (`python train.py`): a small model and batch, so that it finishes in about two minutes on two
# CPU cores. Applied only to fields not set on the command line or in --config, and only when --model is empty.
TINY_DEFAULTS = dict(max_length=128, max_prompt_length=64, global_batch_size=32, micro_batch_size=8, lr=3e-4,
                     log_every=5, eval_every=20, eval_max_pairs=200, save_every=50)

# Fields that may differ when a run is resumed (everything else must match the run in output_dir).
# micro_batch_size changes only float summation order (and KTO's per-micro-step z_ref estimate).
RESUMABLE_FIELDS = {"judge", "halt_after", "log_every", "eval_every", "eval_max_pairs", "save_every", "keep_last",
                    "resume", "export", "num_proc", "cache_dir", "skip_bad_rows", "device", "hybrid_shard",
                    "activation_checkpointing", "chunk_size", "logp_path", "micro_batch_size"}

# method -> (objective, needs a reference model). Each objective documents its equation and defaults.
METHODS = {
    "sft": (losses.sft_loss, False),
    "dpo": (losses.dpo_loss, True),
    "ipo": (losses.ipo_loss, True),
    "simpo": (losses.simpo_loss, False),
    "cpo": (losses.cpo_loss, False),
    "rrhf": (losses.rrhf_loss, False),
    "slic": (losses.slic_loss, False),
    "orpo": (losses.orpo_loss, False),
    "rdpo": (losses.rdpo_loss, True),
    "kto": (losses.kto_loss, True),
    "confpo": (confpo.confpo_loss, False),
    "confpo_dpo": (confpo.confpo_dpo_loss, True),
    "confpo_rand": (confpo.confpo_rand_loss, False),
    "sepo": (sepo.sepo_loss, False),
}
HPARAMS = ["beta", "gamma", "tau", "label_smoothing", "lambda_", "lambda_w", "lambda_l", "delta", "alpha", "threshold",
           "strict", "normalize"]


# ---------------------------------------------------------------------------------------------------------------
# Config from flags and files
# ---------------------------------------------------------------------------------------------------------------

def _parse_bool(s):
    if s.lower() in ("1", "true", "yes"):
        return True
    if s.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"expected true or false, got {s!r}")


def parse_dataclass(cls, argv=None, description=None, choices=None):
    """Flags override --config FILE.json, which overrides the dataclass defaults; every field is a flag with its
    help text. choices: {field: allowed values}. Returns (instance, names set explicitly). Also used by score.py
    and sepo.py."""
    import argparse
    choices = choices or {}
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="a JSON file of config fields (flags given here override it)")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for f in fields.values():
        help_text = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse formats with %
        if f.type is bool:
            parser.add_argument(f"--{f.name}", type=_parse_bool, nargs="?", const=True, default=argparse.SUPPRESS,
                                help=help_text + "; --flag alone means true")
        else:
            parser.add_argument(f"--{f.name}", type=f.type, choices=choices.get(f.name), default=argparse.SUPPRESS,
                                help=help_text)
    args = vars(parser.parse_args(argv))
    values = {}
    if "config" in args:
        with open(args.pop("config")) as fh:
            values = json.load(fh)
        for key, value in values.items():
            if key not in fields:
                parser.error(f"--config: unknown field {key!r}")
            kind = fields[key].type
            if value is not None and not (isinstance(value, kind) or (kind is float and isinstance(value, int))
                                          or (key == "threshold" and isinstance(value, (int, float)))):
                parser.error(f"--config: field {key!r} must be {kind.__name__}, got {value!r}")
            if key in choices and value not in choices[key]:
                parser.error(f"--config: {key} {value!r} is not one of {choices[key]}")
    values.update(args)
    return cls(**values), set(values)


def parse_config(argv=None):
    """The training config from flags and --config. Returns (Config, names set explicitly)."""
    return parse_dataclass(Config, argv, __doc__, {"method": sorted(METHODS)})


def resolve(cfg, explicit):
    """Fill the offline defaults, check the combination, and return the objective's keyword arguments."""
    if not cfg.model:
        for key, value in TINY_DEFAULTS.items():
            if key not in explicit:
                setattr(cfg, key, value)
    if not cfg.output_dir:
        cfg.output_dir = os.path.join("runs", cfg.method)
    if cfg.method == "sepo" and not cfg.selections:
        raise SystemExit("--method sepo needs --selections: the token selections written by score.py "
                         "(or run the whole pipeline with `python sepo.py`)")
    if cfg.method != "sepo" and cfg.selections:
        raise SystemExit(f"--selections is only used by --method sepo, not {cfg.method}")
    fn, _ = METHODS[cfg.method]
    accepted = inspect.signature(fn).parameters
    hparams = {}
    for name in HPARAMS:
        value = getattr(cfg, name)
        if value is None:
            continue
        if name not in accepted:
            takes = [p for p in HPARAMS if p in accepted]
            raise SystemExit(f"--{name} is not a parameter of {cfg.method} (it takes: {', '.join(takes) or 'none'})")
        if name == "threshold":
            try:
                value = confpo.parse_threshold(value)
            except ValueError as e:
                raise SystemExit(f"--{e}") from None
        if name == "normalize" and value not in ("selected", "response"):
            raise SystemExit(f"--normalize must be selected or response, got {value!r}")
        hparams[name] = value
    return hparams


# ---------------------------------------------------------------------------------------------------------------
# Distributed set-up
# ---------------------------------------------------------------------------------------------------------------

def init_distributed(cfg):
    """Process group from torchrun's environment, or a world of one; an existing group is reused.
    Returns (rank, world, device)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        return dist.get_rank(), dist.get_world_size(), device
    if "RANK" in os.environ:  # torchrun
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    else:  # plain `python train.py`: the same FSDP code path over a world of one
        rank, world, local_rank = 0, 1, 0
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    return rank, world, device


def make_mesh(cfg, world, device):
    if not cfg.hybrid_shard:
        return init_device_mesh(device.type, (world,))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % per_node:
        raise SystemExit(f"--hybrid_shard: world size {world} is not a multiple of {per_node} ranks per node")
    return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def log0(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------

def prepare_data(cfg, tokenizer):
    """Tokenized train (and held-out) pairs, with SePO's selections attached. Rank 0 goes first and fills the
    datasets cache; the others then read it, so that N ranks do not tokenize N times (nor write the same files)."""
    def load(source, split):
        ds = data.load_preferences(source, split=split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                   num_proc=cfg.num_proc, cache_dir=cfg.cache_dir or None)
        ds, stats = data.tokenize_preferences(ds, tokenizer, cfg.max_length, cfg.max_prompt_length, cfg.num_proc)
        log0(f"{source} [{split}]: {stats['kept']} pairs kept, {stats['dropped_empty']} dropped (empty response); "
             f"of those kept, {stats['truncated_prompt']} have a truncated prompt and {stats['truncated_response']} a "
             "truncated response")
        return ds

    def load_all():
        out = {"train": load(cfg.data, cfg.split)}
        if cfg.eval_data or cfg.eval_split:
            out["eval"] = load(cfg.eval_data or cfg.data, cfg.eval_split or cfg.split)
        if cfg.method == "sepo":
            out["train"] = sepo.attach_selections(out["train"], sepo.load_selections(cfg.selections), cfg.selections)
            if "eval" in out:  # held-out pairs have no oracle selection: evaluate over all response tokens
                out["eval"] = out["eval"].map(lambda ex: {f"{side}_select": [int(x != losses.IGNORE_INDEX)
                                                                             for x in ex[f"{side}_labels"]]
                                                          for side in ("chosen", "rejected")})
        return out

    if cfg.method == "sepo":
        check_selections_tokenizer(cfg.selections, tokenizer)
    out = rank_zero_first(load_all)
    if len(out["train"]) < cfg.global_batch_size:
        raise SystemExit(f"{cfg.data}: {len(out['train'])} pairs, fewer than one global batch "
                         f"({cfg.global_batch_size}); lower --global_batch_size")
    return out


def check_selections_tokenizer(path, tokenizer):
    """score.py writes manifest.json beside its selections: the scoring must have finished, and the fingerprint of
    the tokenizer whose positions it wrote must be the policy's."""
    manifest = os.path.join(os.path.dirname(os.path.abspath(path)), "manifest.json")
    if not os.path.exists(manifest):
        log0(f"warning: no manifest.json beside {path}: cannot check that it indexes this tokenizer's tokens")
        return
    with open(manifest) as fh:
        info = json.load(fh)
    if not info.get("complete"):
        raise SystemExit(f"{path}: the score.py run that writes it has not finished ({manifest}); run it again")
    if info.get("policy_tokenizer") != data.tokenizer_hash(tokenizer):
        raise SystemExit(f"{path}: these selections index the tokens of another tokenizer (see {manifest}); "
                         "score again with --policy set to this model")


def rank_zero_first(fn):
    """Run fn on rank 0, then on the other ranks: rank 0 fills the datasets cache, the others read it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    result = fn() if rank == 0 else None
    if world > 1:
        dist.barrier()
        result = result if rank == 0 else fn()
        dist.barrier()
    return result


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


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------

class PolicyLogps(torch.nn.Module):
    """Wraps a causal LM so that its forward returns per-token log-probs (B, T) and the response mask.

    A module rather than a function so that FSDP2's root unit covers the output embedding: the vocabulary
    projection then happens inside forward, where the weight is unsharded, and the full (B, T, V) logits never
    need to exist (chunked path). The logits path lets the model compute logits (for heads with a bias,
    soft-capping or a logit scale), only from the first response position on.
    """

    def __init__(self, model, path, chunk_size):
        super().__init__()
        self.model, self.path, self.chunk_size = model, path, chunk_size
        self.checked = path != "chunked"

    def forward(self, input_ids, attention_mask, labels):
        if self.path == "logits":
            return self.logits_path(input_ids, attention_mask, labels)
        hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
        logps, mask = losses.chunked_token_logps(hidden, self.model.get_output_embeddings().weight, labels,
                                                 self.chunk_size)
        if not self.checked:  # once: the model's own logits must agree (a head may scale them in its forward)
            with torch.no_grad():
                expected, _ = self.logits_path(input_ids[:1], attention_mask[:1], labels[:1])
            gap = float((expected - logps[:1].detach()).abs().max())
            if gap > (1e-3 if logps.dtype == torch.float32 and hidden.dtype == torch.float32 else 5e-2):
                raise RuntimeError(f"{type(self.model).__name__}: log-probs from hidden @ W.T differ from the "
                                   f"model's own logits by {gap:.3g} (its head transforms the logits); use "
                                   "--logp_path logits")
            self.checked = True
        return logps, mask

    def logits_path(self, input_ids, attention_mask, labels):
        """The model's logits from the first response position on (logits_to_keep), reduced by token_logps."""
        has = (labels != losses.IGNORE_INDEX)
        starts = has.float().argmax(-1)[has.any(-1)]  # first labelled position of each row that has one
        first = max(1, int(starts.min())) if starts.numel() else 1
        keep = labels.shape[1] - first + 1  # logits from position first-1, which predicts the first response token
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        logps, mask = losses.token_logps(logits, labels[:, -keep:], chunk_size=self.chunk_size)
        pad = labels.shape[1] - keep
        return torch.nn.functional.pad(logps, (pad, 0)), torch.nn.functional.pad(mask, (pad, 0))


# Config attributes by which a head transforms hidden @ W.T (Gemma-2 soft-capping, Cohere's logit_scale, Granite's
# logits_scaling, Falcon-H1's lm_head_multiplier). Others are caught by PolicyLogps' first-call check.
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0,
                    "lm_head_multiplier": 1.0}


def choose_logp_path(requested, model):
    """chunked when logits are exactly hidden @ W.T; else the model's own logits."""
    head = model.get_output_embeddings()
    plain = (isinstance(head, torch.nn.Linear) and head.bias is None
             and all(getattr(model.config, k, neutral) in (None, neutral) for k, neutral in LOGIT_TRANSFORMS.items()))
    if requested == "chunked" and not plain:
        raise SystemExit(f"--logp_path chunked: {type(model).__name__}'s logits are not hidden @ W.T "
                         "(a bias, soft-capping or a logit scale); use --logp_path logits")
    return requested if requested != "auto" else ("chunked" if plain else "logits")


def load_model(path, cfg, mesh, device, trainable):
    """A causal LM sharded with FSDP2: each decoder layer, then the root (which holds embeddings, final norm and
    the output embedding). Master weights fp32; on GPU bf16 compute with fp32 gradient reduction."""
    from transformers import AutoConfig, AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except ValueError as e:
        kind = type(AutoConfig.from_pretrained(path)).__name__
        raise SystemExit(f"{path}: {kind} has no causal-LM head that AutoModelForCausalLM can load ({e})")
    if cfg.activation_checkpointing and trainable:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    compute_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}.get(
        cfg.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    wrapped = PolicyLogps(model, choose_logp_path(cfg.logp_path, model), cfg.chunk_size)
    layer_classes = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in layer_classes]
    if not layers:
        raise SystemExit(f"{path}: cannot find the decoder layers of {type(model).__name__} to shard")
    for i, layer in enumerate(layers):
        # a trained model needs its last layer again right at the start of backward: keep it gathered; a frozen
        # reference never runs backward, so everything (its root included) is resharded after forward
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=not trainable or i < len(layers) - 1)
    fully_shard(wrapped, mesh=mesh, mp_policy=mp, **({} if trainable else {"reshard_after_forward": True}))
    wrapped.train(trainable)
    if not trainable:
        wrapped.requires_grad_(False)
    if cfg.disable_dropout:  # as TRL: dropout would make the log-probs (and ConfPO's threshold) noisy
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return wrapped


# ---------------------------------------------------------------------------------------------------------------
# One micro-step: forward, objective, metrics
# ---------------------------------------------------------------------------------------------------------------

def micro_step(cfg, policy, ref, batch, hparams, generator):
    """Per-pair losses (B,) and metrics of one micro-batch; one policy forward over chosen and rejected rows."""
    fn, needs_ref = METHODS[cfg.method]
    B = batch["input_ids"].shape[0] // 2
    rows = slice(0, B) if cfg.method == "sft" else slice(None)  # SFT (SePO Eq. 23) trains on chosen responses only
    inputs = dict(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows],
                  labels=batch["labels"][rows])
    logps, mask = policy(**inputs)
    if cfg.method == "sft":
        return fn(logps, mask, length_normalize=False)
    kw = dict(chosen_logps=logps[:B], chosen_mask=mask[:B], rejected_logps=logps[B:], rejected_mask=mask[B:])
    if needs_ref:
        with torch.no_grad():
            ref_logps, _ = ref(**inputs)
        kw.update(ref_chosen_logps=ref_logps[:B], ref_rejected_logps=ref_logps[B:])
    if cfg.method == "kto":  # z_ref over the micro-batches of all ranks (TRL's estimate), not this rank's alone
        beta = hparams.get("beta", inspect.signature(fn).parameters["beta"].default)
        total, count = losses.kto_reference_point(**kw, beta=beta)
        both = torch.stack([total, torch.tensor(float(count), device=total.device)]).double()
        dist.all_reduce(both)
        kw["z_ref"] = max(0.0, float(both[0] / both[1]))
    if cfg.method == "sepo":
        select = batch["select"].bool()
        kw.update(chosen_selected=select[:B], rejected_selected=select[B:])
    if cfg.method == "confpo_rand":
        kw["generator"] = generator
    return fn(**kw, **hparams)


class Meter:
    """Sums of per-pair metrics over micro-steps and ranks; `result()` turns them into the logged averages."""

    def __init__(self, device):
        self.sums, self.device = {}, device

    def add(self, losses_, metrics, tokens):
        rows = {"loss": losses_.detach().float(), **{k: v.float() for k, v in metrics.items()}}
        if "rewards_chosen" in metrics:
            rows["margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
            rows["accuracy"] = (metrics["rewards_chosen"] > metrics["rewards_rejected"]).float()
        if "rewards_chosen_all" in metrics:
            rows["margin_all"] = metrics["rewards_chosen_all"] - metrics["rewards_rejected_all"]
            rows["accuracy_all"] = (metrics["rewards_chosen_all"] > metrics["rewards_rejected_all"]).float()
        rows["n_pairs"] = torch.ones_like(rows["loss"])
        for k, v in rows.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.sum()
        self.sums["n_tokens"] = self.sums.get("n_tokens", 0.0) + float(tokens)

    def result(self):
        keys = sorted(self.sums)
        totals = torch.stack([torch.as_tensor(self.sums[k], dtype=torch.float64).to(self.device) for k in keys])
        dist.all_reduce(totals)
        s = dict(zip(keys, totals.tolist()))
        pairs = max(s.pop("n_pairs"), 1.0)
        out = {"pairs": int(pairs), "tokens": int(s.pop("n_tokens"))}
        for k in ("selected_chosen", "selected_rejected"):  # token-level selection ratio (ConfPO Fig. 8)
            if k in s:
                side = k.split("_")[1]
                out[f"selected_ratio_{side}"] = s[k] / max(s[f"length_{side}"], 1.0)
        if "empty" in s:
            out["empty_pairs"] = int(s.pop("empty"))
        if "tau_chosen" in s:
            out["tau_mean"] = (s.pop("tau_chosen") + s.pop("tau_rejected")) / (2 * pairs)
        for k, v in s.items():
            if not (k.startswith("selected_") or k.startswith("length_")):
                out[k] = v / pairs
        self.sums = {}
        return out


def evaluate(cfg, policy, ref, eval_ds, hparams, pad_id, device, rank, world):
    """Held-out loss and rewards; every rank runs the same number of forwards (FSDP needs it), pairs beyond the
    end are repeats with zero weight."""
    n = len(eval_ds) if not cfg.eval_max_pairs else min(len(eval_ds), cfg.eval_max_pairs)
    per_rank = math.ceil(n / world)
    idx = [rank * per_rank + j for j in range(per_rank)]
    meter = Meter(device)
    policy.eval()
    with torch.no_grad():
        for s in range(0, per_rank, cfg.micro_batch_size):
            chunk = idx[s:s + cfg.micro_batch_size]
            valid = torch.tensor([i < n for i in chunk], device=device)
            batch = collate(eval_ds, [min(i, n - 1) for i in chunk], pad_id, cfg, device)
            per_pair, metrics = micro_step(cfg, policy, ref, batch, hparams, torch.Generator(device).manual_seed(0))
            keep = valid.nonzero().squeeze(-1)
            meter.add(logged_loss(cfg, per_pair, metrics)[keep], {k: v[keep] for k, v in metrics.items()},
                      forwarded_tokens(cfg, batch, valid))
    policy.train()
    return meter.result()


def forwarded_tokens(cfg, batch, valid=None):
    """Tokens the policy read in this micro-batch (SFT reads the chosen rows only), over valid pairs only."""
    B = batch["input_ids"].shape[0] // 2
    pairs = torch.ones(B, dtype=torch.bool, device=batch["input_ids"].device) if valid is None else valid
    rows = torch.cat([pairs, torch.zeros_like(pairs) if cfg.method == "sft" else pairs])
    return int(batch["attention_mask"][rows].sum())


def logged_loss(cfg, per_pair, metrics):
    """What the logs call the loss of a pair: the objective, or for SFT the mean token NLL (not its sum)."""
    return metrics["nll"] if cfg.method == "sft" else per_pair


def collate(ds, indices, pad_id, cfg, device):
    fields = ("select",) if cfg.method == "sepo" else ()
    batch = data.collate_pairs([ds[int(i)] for i in indices], pad_id, token_fields=fields)
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints and export
# ---------------------------------------------------------------------------------------------------------------

def atomic_write(path, text):
    """Write a text file through a temporary file and a rename: a reader sees the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def checkpoints(out_dir):
    """Complete checkpoints, oldest first: folders step_NNNNNNNN holding trainer_state.json (written last)."""
    root = os.path.join(out_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    done = [d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp")
            and os.path.exists(os.path.join(root, d, "trainer_state.json"))]
    return [os.path.join(root, d) for d in sorted(done)]


def save_checkpoint(cfg, policy, optimizer, scheduler, step, rank):
    """Model and optimizer shards through torch.distributed.checkpoint, plus scheduler, step and RNG states, into
    step_N.tmp, renamed to step_N once complete: a kill at any moment leaves the previous checkpoint intact."""
    root = os.path.join(cfg.output_dir, "checkpoints")
    final = os.path.join(root, f"step_{step:08d}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        state = {"step": step, "scheduler": scheduler.state_dict(), "world_size": dist.get_world_size()}
        atomic_write(os.path.join(tmp, "trainer_state.json"), json.dumps(state))
        if os.path.exists(final):  # re-saving a step (a run restarted from scratch): retire the old one first
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in checkpoints(cfg.output_dir)[:-cfg.keep_last] if cfg.keep_last > 0 else []:
            _remove(old)
    dist.barrier()


def _remove(path):
    """Delete a checkpoint (or an export) so that a kill half-way leaves nothing that looks complete: rename it to
    *.tmp (atomic), then delete; leftover *.tmp checkpoint folders are cleared when the next run starts."""
    doomed = f"{path}.old.tmp"
    os.replace(path, doomed)
    _fsync_dir(os.path.dirname(path))
    shutil.rmtree(doomed, ignore_errors=True)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path, policy, optimizer, scheduler, rank):
    model_sd, optim_sd = get_state_dict(policy, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(policy, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, "trainer_state.json")) as fh:
        trainer_state = json.load(fh)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = os.path.join(path, f"rng_{rank}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return trainer_state["step"]


def export(cfg, policy, tokenizer, model_path, rank):
    """A Hugging Face folder (safetensors + config + tokenizer) at output_dir/final. Parameters are gathered one at
    a time to rank 0's CPU memory; the other ranks never hold the whole model."""
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
        if os.path.exists(out):  # a run resumed after its export: retire the old folder first
            _remove(out)
        os.replace(tmp, out)
        _fsync_dir(cfg.output_dir)
        log0(f"exported {out}")
    dist.barrier()


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def cosine_with_warmup(step, total, warmup):
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def check_output_dir(cfg, rank, file="config.json", resumable=RESUMABLE_FIELDS, what="a different run"):
    """Refuse an output folder that holds a different run (its saved config differs outside `resumable`); then
    save this run's config there. Also used by sepo.py for a whole pipeline's folder."""
    path = os.path.join(cfg.output_dir, file)
    mine = dataclasses.asdict(cfg)
    if os.path.exists(path):
        with open(path) as fh:
            theirs = json.load(fh)
        diff = {k for k in mine if k not in resumable and theirs.get(k) != mine[k]}
        if diff:
            raise SystemExit(f"{cfg.output_dir} holds {what} (differs in: {', '.join(sorted(diff))}); "
                             "choose another --output_dir or delete it")
    dist.barrier()
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
        atomic_write(path, json.dumps(mine, indent=2))


def trim_metrics(path, step):
    """Drop the lines a stopped run wrote after its last checkpoint (they will be written again): all of them when
    starting from step 0, and a line cut short by a kill."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as fh:
        for line in fh:
            try:
                if step > 0 and json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass
    atomic_write(path, "".join(kept))


def main(argv=None):
    cfg, explicit = parse_config(argv)
    hparams = resolve(cfg, explicit)
    owner = not dist.is_initialized()  # sepo.py runs several stages in one process group
    rank, world, device = init_distributed(cfg)
    try:
        return train(cfg, hparams, rank, world, device)
    finally:
        if owner:
            dist.destroy_process_group()


def train(cfg, hparams, rank, world, device):
    from transformers import AutoConfig, AutoTokenizer
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    tiny = not cfg.model
    if tiny:  # the offline tiny world (rank 0 builds it once), from an SFT model as in both papers
        if rank == 0:
            data.build_tiny_world(cfg.tiny_world)
        dist.barrier()
        paths = data.build_tiny_world(cfg.tiny_world)
        if not cfg.data:
            cfg.data, cfg.eval_data = paths["train"], cfg.eval_data or paths["test"]
        cfg.model = paths["llama-small"] if cfg.method == "sft" else tiny_sft_model(cfg, paths, rank, world, device)
    per_step = world * cfg.micro_batch_size
    if cfg.global_batch_size % per_step:
        raise SystemExit(f"--global_batch_size {cfg.global_batch_size} is not a multiple of ranks x micro batch "
                         f"({world} x {cfg.micro_batch_size})")
    check_output_dir(cfg, rank)

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    if cfg.tokenizer and len(tokenizer) > AutoConfig.from_pretrained(cfg.model).vocab_size:
        raise SystemExit(f"--tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens, more than {cfg.model}'s "
                         "vocabulary")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = prepare_data(cfg, tokenizer)
    steps_per_epoch = len(ds["train"]) // cfg.global_batch_size
    total = cfg.max_steps if cfg.max_steps > 0 else steps_per_epoch * cfg.epochs
    unused = len(ds["train"]) - steps_per_epoch * cfg.global_batch_size
    log0(f"{total} steps of {cfg.global_batch_size} pairs ({world} ranks x {cfg.micro_batch_size} pairs x "
         f"{cfg.global_batch_size // per_step} micro-steps); {unused} pairs per epoch left over")

    mesh = make_mesh(cfg, world, device)
    policy = load_model(cfg.model, cfg, mesh, device, trainable=True)
    ref = load_model(cfg.ref_model or cfg.model, cfg, mesh, device, trainable=False) if METHODS[cfg.method][1] else None
    log0(f"policy {cfg.model}: log-probs via the {policy.path} path; reference: "
         f"{(cfg.ref_model or cfg.model) if ref is not None else 'none'}")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=device.type == "cuda")
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, total, warmup))

    step = 0
    found = checkpoints(cfg.output_dir)
    if found and cfg.resume:
        step = load_checkpoint(found[-1], policy, optimizer, scheduler, rank)
        log0(f"resumed from {found[-1]} at step {step}")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    dist.barrier()  # every rank has read the checkpoint before rank 0 tidies the folder
    if rank == 0:
        if found and not cfg.resume:  # --resume false: start over, and leave no old checkpoint to resume from
            log0(f"--resume false: removing {len(found)} checkpoints of the previous run")
            for old in found:
                _remove(old)
        trim_metrics(metrics_path, step)
        for leftover in glob.glob(os.path.join(cfg.output_dir, "checkpoints", "*.tmp")):
            shutil.rmtree(leftover, ignore_errors=True)  # a save that was killed before its rename

    def write(line):
        if rank == 0:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(line) + "\n")

    if "eval" in ds and step == 0:  # the starting point, for comparison
        write({**evaluate(cfg, policy, ref, ds["eval"], hparams, pad_id, device, rank, world), "step": 0,
               "split": "eval"})
    meter = Meter(device)
    bar = tqdm(total=total, initial=step, disable=rank != 0, desc=cfg.method, dynamic_ncols=True)
    t_last, halt_at = time.perf_counter(), step + cfg.halt_after if cfg.halt_after else None
    while step < total:
        epoch = step // steps_per_epoch
        micro = rank_micro_batches(batch_order(len(ds["train"]), cfg, epoch), step, steps_per_epoch, cfg, rank, world)
        batches = [collate(ds["train"], idx, pad_id, cfg, device) for idx in micro]
        # Loss normaliser: FSDP averages gradients over ranks, so each rank scales by world / global count.
        if cfg.method == "sft":  # a token mean over the whole global batch (Hugging Face's SFT convention)
            count = torch.tensor(float(sum(int((b["labels"][:b["labels"].shape[0] // 2] != -100).sum())
                                           for b in batches)), device=device)
            dist.all_reduce(count)
        else:  # a mean over the pairs of the global batch; empty-selection pairs count with loss 0
            count = torch.tensor(float(cfg.global_batch_size), device=device)
        for i, batch in enumerate(batches):
            policy.set_requires_gradient_sync(i == len(batches) - 1)
            # ConfPO-rand's draws depend on (seed, step, global micro-batch): the same for any number of ranks
            generator = torch.Generator(device).manual_seed(hash((cfg.seed, step, rank * len(batches) + i)) % 2**63)
            per_pair, metrics = micro_step(cfg, policy, ref, batch, hparams, generator)
            (per_pair.sum() * world / count).backward()
            meter.add(logged_loss(cfg, per_pair, metrics), metrics, forwarded_tokens(cfg, batch))
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                                   float("inf"))
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)

        if step % cfg.log_every == 0 or step == total:
            line = meter.result()
            elapsed = time.perf_counter() - t_last
            t_last = time.perf_counter()
            line.update(step=step, split="train", lr=lr, grad_norm=float(grad_norm),
                        tokens_per_s=line["tokens"] / elapsed, peak_memory_mib=peak_memory_mib(device))
            bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
            write(line)
        if "eval" in ds and (step % cfg.eval_every == 0 or step == total):
            line = evaluate(cfg, policy, ref, ds["eval"], hparams, pad_id, device, rank, world)
            write({**line, "step": step, "split": "eval"})
            log0(f"\nstep {step} eval: loss {line['loss']:.4f}" +
                 (f", reward accuracy {line['accuracy']:.3f}" if "accuracy" in line else ""))
        halting = halt_at is not None and step >= halt_at
        if (cfg.save_every and step % cfg.save_every == 0) or step == total or halting:
            save_checkpoint(cfg, policy, optimizer, scheduler, step, rank)
        if halting:
            log0(f"halted after step {step} (--halt_after); run the same command again to continue")
            bar.close()
            return None
    bar.close()
    if cfg.export:
        export(cfg, policy, tokenizer, cfg.model, rank)
        if (cfg.judge == "synthetic" or (cfg.judge == "auto" and tiny)) and rank == 0:
            # the synthetic task has a programmatic judge: score greedy answers to held-out prompts
            source = cfg.eval_data or cfg.data
            prompts = [row["prompt"] for row in data.load_preferences(source, cache_dir=cfg.cache_dir or None)][:100]
            before = synthetic_reward_of(cfg.model, prompts, device, tokenizer_path=cfg.tokenizer or cfg.model)
            after = synthetic_reward_of(os.path.join(cfg.output_dir, "final"), prompts, device)
            write({"step": step, "split": "generate", "reward_before": before, "reward_after": after,
                   "prompts": len(prompts)})
            log0(f"synthetic reward of greedy answers to {len(prompts)} held-out prompts: {before:.3f} before, "
                 f"{after:.3f} after {cfg.method}")
    log0(f"done: {cfg.output_dir} (metrics.jsonl, checkpoints/, {'final/' if cfg.export else 'no export'})")
    return cfg.output_dir


def tiny_sft_model(cfg, paths, rank, world, device):
    """The tiny world's SFT starting point: llama-small fine-tuned on the chosen responses of the synthetic train
    set with this very loop (SePO Eq. 23), built once and cached beside the other tiny models."""
    path = os.path.join(cfg.tiny_world, "models", "llama-small-sft")
    if not os.path.exists(os.path.join(path, "config.json")):
        log0(f"building the tiny SFT model once ({path})")
        sft = Config(method="sft", model=paths["llama-small"], data=paths["train"], tiny_world=cfg.tiny_world,
                     output_dir=path + ".run", resume=False, cache_dir=cfg.cache_dir, seed=cfg.seed,
                     **{**TINY_DEFAULTS, "lr": 1e-3, "epochs": 2, "save_every": 0})
        if rank == 0:
            shutil.rmtree(sft.output_dir, ignore_errors=True)
        dist.barrier()
        train(sft, {}, rank, world, device)
        if rank == 0:
            os.replace(os.path.join(sft.output_dir, "final"), path)
            shutil.rmtree(sft.output_dir, ignore_errors=True)
        dist.barrier()
    return path


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
    """Mean programmatic reward (data.synthetic_reward) of a loaded model's greedy answers to synthetic prompts."""
    answers = answer_texts(tokenizer, *generate_answers(model, tokenizer, prompts, device, max_new_tokens,
                                                        batch_size))
    return sum(data.synthetic_reward(p, a) for p, a in zip(prompts, answers)) / len(prompts)


def synthetic_reward_of(model_path, prompts, device, max_new_tokens=40, batch_size=50, tokenizer_path=None):
    """greedy_synthetic_reward of the model in a folder (or hub name)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
    return greedy_synthetic_reward(model, tokenizer, prompts, device, max_new_tokens, batch_size)


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


if __name__ == "__main__":
    sys.exit(0 if main() is not False else 1)
