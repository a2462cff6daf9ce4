"""SePO end to end, as one command with one output folder (the method itself is sepo.py):

    python sepo_pipeline.py                   # the tiny world, offline: about a minute on 2 CPU cores
    torchrun --standalone --nproc_per_node 8 sepo_pipeline.py --data HuggingFaceH4/ultrafeedback_binarized \
        --split train_prefs --oracle_base TinyLlama/TinyLlama_v1.1 --policy meta-llama/Llama-2-7b-chat-hf

Stages (each skipped when its output exists; each training stage resumes from its own checkpoints, so the same
command continues after an interruption):
    D_m        a seeded random subset of the target data                  subset.jsonl
    Eq. 23     SFT on the chosen responses of D_m: pi_ref                 oracle_sft/final   (train.py --method sft)
    oracle     DPO on D_m from pi_ref: pi_oracle                          oracle_dpo/final   (train.py --method dpo)
    Eq. 24-25  score every token of the target data, keep top / bottom k  scores/            (score.py)
    Eq. 26     the policy on the selected tokens only                     policy/final       (train.py --method sepo)
"""

import dataclasses
import gc
import json
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Optional

import utils
from utils import AT_LEAST_1, DEVICES, DTYPES, POSITIVE, Check, arg

RATIO = Check(lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "must lie in (0, 1]")


@dataclass
class PipelineConfig:
    data: str = arg("", "target preference data ('' = the tiny world's synthetic task)")
    split: str = arg("train", "split of --data")
    eval_data: str = arg("", "held-out pairs for the final policy ('' = none, or the synthetic test set)")
    oracle_base: str = arg("", "the model the oracle starts from, SFT then DPO ('' = the tiny world's llama-tiny)")
    policy: str = arg("", "the policy to align ('' = the tiny world's SFT llama-small, 5x the oracle)")
    output_dir: str = arg("runs/sepo", "one folder for every stage", resumable=True)
    subset: float = arg(0.5, "D_m: a fraction (<= 1) or a count (> 1) of the target pairs, drawn at random",
                        check=POSITIVE)
    seed: int = arg(42, "seed of D_m and of every stage")
    chosen_ratio: float = arg(0.3, "k for chosen responses: top k% of tokens (Eq. 25)", check=RATIO)
    rejected_ratio: float = arg(0.3, "k for rejected responses: bottom k% of tokens (Eq. 25)", check=RATIO)
    exclude_eos: bool = arg(False, "never select a response's end-of-turn token (score.py --exclude_eos; a "
                                   "departure from the paper)")
    dpo_beta: float = arg(0.1, "beta of the oracle's DPO", check=POSITIVE)
    beta: float = arg(1.0, "beta of Eq. 24 and Eq. 26 (the released code: 1)", check=POSITIVE)
    gamma: float = arg(0.0, "margin gamma of Eq. 26 (the released code: 0)")
    sft_lr: float = arg(5e-7, "learning rate of the oracle's SFT (Eq. 23)", check=POSITIVE)
    dpo_lr: float = arg(5e-7, "learning rate of the oracle's DPO", check=POSITIVE)
    policy_lr: float = arg(5e-7, "learning rate of the policy (SePO: 5e-7, cosine, 3% warm-up, AdamW (0.9, 0.95))",
                           check=POSITIVE)
    sft_epochs: int = arg(1, "epochs of the oracle's SFT", check=AT_LEAST_1)
    global_batch_size: int = arg(128, "pairs per optimizer step in every stage", check=AT_LEAST_1)
    micro_batch_size: int = arg(2, "pairs per rank per forward", check=AT_LEAST_1)
    max_length: int = arg(2048, "prompt + response tokens", check=AT_LEAST_1)
    max_prompt_length: int = arg(1800, "prompt tokens", check=AT_LEAST_1)
    max_steps: int = arg(-1, "cap every training stage at this many steps (-1 = epochs)")
    policy_args: str = arg("", "more train.py flags for the policy stage, e.g. '--save_every 10 --keep_last 0'")
    until: str = arg("policy", "the last stage to run (a study that trains its own policies from the selections "
                               "stops at scores)", options=("oracle", "scores", "policy"), resumable=True)
    cross_tokenizer: bool = arg(False, "allow an oracle tokenizer other than the policy's (map selections by text)")
    activation_checkpointing: Optional[bool] = arg(None, "of every training stage (None = train.py's default: on "
                                                         "with a model, off on the tiny world)", nargs="?",
                                                   const=True, resumable=True)
    tiny_world: str = arg("tiny_world", "folder of the offline tiny world", resumable=True)
    cache_dir: str = arg("", "datasets cache folder", resumable=True)
    device: str = arg("auto", "where to run", options=DEVICES, resumable=True)
    dtype: str = arg("auto", "compute dtype of the training stages: auto (bf16 on GPU, fp32 on CPU); scoring and "
                     "the oracle's exports are fp32", options=DTYPES)
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)",
                            check=AT_LEAST_1, resumable=True)




def parse_config(argv=None):
    return utils.parse_dataclass(PipelineConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.distributed as dist  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import rundir  # noqa: E402
import score  # noqa: E402
import sepo  # noqa: E402
import train  # noqa: E402
from utils import UserError, log0, on_rank_zero, rank_zero_first, run_in_group  # noqa: E402

# Without --data: small batches and learning rates that suit the tiny world (a policy lr of 1e-4 already collapses
# the tiny policy: see docs/sepo-pipeline.md)
PIPELINE_TINY = dict(global_batch_size=32, micro_batch_size=8, sft_lr=1e-3, dpo_lr=1e-4, policy_lr=3e-5, sft_epochs=2,
                     max_length=128, max_prompt_length=64, activation_checkpointing=False)
PIPELINE_PATHS = ("data", "eval_data", "oracle_base", "policy")  # compared by their contents


def write_subset(cfg, out_path):
    """D_m: a seeded random subset of the target pairs, written as JSONL in the explicit-prompt layout."""
    ds = data.load_preferences(cfg.data, split=cfg.split, cache_dir=cfg.cache_dir or None)
    m = round(cfg.subset * len(ds)) if cfg.subset <= 1 else int(cfg.subset)
    if not 1 <= m <= len(ds):
        raise UserError(f"--subset {cfg.subset}: D_m would hold {m} of {len(ds)} pairs")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:m].sort().values.tolist()
    lines = [json.dumps({k: ds[i][k] for k in ("prompt", "chosen", "rejected")}) for i in order]
    rundir.atomic_write(out_path, "\n".join(lines) + "\n")
    return m


def free_memory():
    """Between stages: collect the last stage's modules (FSDP keeps reference cycles) and return cached GPU memory."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stage_argv(cfg):
    """train.py's flags shared by every training stage of the pipeline."""
    return ["--cache_dir", cfg.cache_dir, "--seed", str(cfg.seed), "--max_length", str(cfg.max_length),
            "--max_prompt_length", str(cfg.max_prompt_length), "--global_batch_size", str(cfg.global_batch_size),
            "--micro_batch_size", str(cfg.micro_batch_size), "--max_steps", str(cfg.max_steps), "--device",
            cfg.device, "--dtype", cfg.dtype, "--dist_timeout", str(cfg.dist_timeout), "--judge", "none",
            "--save_final", "false"] + ([] if cfg.activation_checkpointing is None else  # the result is the export
                                        ["--activation_checkpointing", str(cfg.activation_checkpointing)])


def scoring_argv(cfg, oracle, ref, ratios, scores_dir):
    """score.py's flags for Eq. 24-25: the whole target data, one selection file per (k_w, k_l) in `ratios`."""
    return ["--oracle", oracle, "--reference", ref, "--policy", cfg.policy, "--data", cfg.data, "--split", cfg.split,
            "--beta", str(cfg.beta), "--ratios", ",".join(f"{rc}:{rl}" for rc, rl in ratios), "--output_dir",
            scores_dir, "--max_length", str(cfg.max_length), "--max_prompt_length", str(cfg.max_prompt_length),
            "--cache_dir", cfg.cache_dir, "--device", cfg.device, "--dtype", "fp32",  # (score.py's dtype says why)
            "--report", os.path.join(scores_dir, "report.html"),
            "--cross_tokenizer", str(cfg.cross_tokenizer), "--exclude_eos", str(cfg.exclude_eos)]


def policy_argv(cfg, selections):
    """train.py's flags for the policy stage (Eq. 26) with SePO's optimiser settings, after the common ones."""
    return ["--method", "sepo", "--model", cfg.policy, "--data", cfg.data, "--split", cfg.split, "--selections",
            selections, "--eval_data", cfg.eval_data, "--lr", str(cfg.policy_lr), "--warmup_ratio", "0.03",
            "--adam_beta2", "0.95", "--beta", str(cfg.beta), "--gamma", str(cfg.gamma)]


def main(argv=None):
    """SFT (Eq. 23) and DPO on D_m give pi_ref and pi_oracle; score.py scores and selects (Eq. 24-25) the whole
    target data; train.py trains the policy with Eq. 26. Each stage is skipped when its output exists, and each
    training stage resumes from its own checkpoints: run the same command again after an interruption."""
    cfg, explicit = parse_config(argv)
    return run_in_group(cfg.device, lambda rank, world, device: run(cfg, explicit, rank), timeout=cfg.dist_timeout,
                        dtype=cfg.dtype, model_given=bool(cfg.data))


def run(cfg, explicit, rank):
    from transformers import AutoTokenizer
    on_tiny_world = not cfg.data
    if on_tiny_world:
        import tiny
        tiny.fill_defaults(cfg, PIPELINE_TINY, explicit)
        paths = rank_zero_first(lambda: tiny.build_tiny_world(cfg.tiny_world))
        cfg.data, cfg.eval_data = paths["train"], cfg.eval_data or paths["test"]
        cfg.oracle_base = cfg.oracle_base or paths["llama-tiny"]
        cfg.policy = cfg.policy or tiny.sft_model(cfg.tiny_world, paths, train.main, cfg.cache_dir, cfg.device)
    if not (cfg.oracle_base and cfg.policy):
        raise UserError("sepo_pipeline.py needs --oracle_base and --policy (or neither, with no --data: the tiny "
                        "world)")
    for flag in ("oracle_base", "policy"):
        models.check_source(getattr(cfg, flag), f"--{flag}")
    # before any training: can the oracle select the policy's tokens? With one vocabulary the oracle is trained
    # with the policy's tokenizer, so that it reads the data in the format the policy does
    crossing = models.check_tokenizers(AutoTokenizer.from_pretrained(cfg.oracle_base),
                                      AutoTokenizer.from_pretrained(cfg.policy), cfg.oracle_base, cfg.policy,
                                      cfg.cross_tokenizer)
    oracle_tokenizer = [] if crossing else ["--tokenizer", cfg.policy]
    with rundir.FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it found it
        return stages(cfg, oracle_tokenizer, on_tiny_world, rank)


def stages(cfg, oracle_tokenizer, on_tiny_world, rank):
    """The stages in order, each skipped when its output exists; so the folder must not be reused with other
    settings (pipeline.json holds them, paths by their contents)."""
    fingerprints = on_rank_zero(lambda: {k: rundir.fingerprint(getattr(cfg, k)) for k in PIPELINE_PATHS})
    mine = {**dataclasses.asdict(cfg), "_fingerprints": fingerprints}
    rundir.claim(cfg.output_dir, "pipeline.json", mine, "another SePO pipeline", utils.resumable_fields(PipelineConfig),
                 hint=f"its stages were made with other settings: rerun with the settings in "
                      f"{os.path.join(cfg.output_dir, 'pipeline.json')} (--config)")
    if rank == 0:
        rundir.atomic_write(os.path.join(cfg.output_dir, "pipeline.json"), json.dumps(mine, indent=2))
    out = cfg.output_dir
    subset = os.path.join(out, "subset.jsonl")
    if rank == 0 and not os.path.exists(subset):
        log0(f"D_m: {write_subset(cfg, subset)} pairs -> {subset}")
    dist.barrier()
    common = stage_argv(cfg)

    def stage(name, args):
        final = os.path.join(out, name, "final")
        if not on_rank_zero(lambda: os.path.exists(os.path.join(final, "config.json"))):  # rank 0 decides for all
            log0(f"\n== {name} ==")
            train.main(common + args + ["--output_dir", os.path.join(out, name)])  # later flags win
            free_memory()  # the stage's FSDP modules and optimizer are garbage now: free them before the next
        return final

    held_out = ["--eval_data", cfg.eval_data] if cfg.eval_data else []  # the oracle's held-out loss and accuracy
    # Eq. 23: SFT on the chosen responses of D_m; the result is pi_ref
    # the oracle's stages are exported in float32: Eq. 24 differences their log-probs, and a bf16 export would round
    # away much of a small learning rate's update
    ref = stage("oracle_sft", ["--method", "sft", "--model", cfg.oracle_base, "--data", subset, "--export_dtype",
                               "fp32", "--lr", str(cfg.sft_lr), "--epochs", str(cfg.sft_epochs)] + oracle_tokenizer +
                held_out)
    # the oracle: DPO on D_m from pi_ref
    oracle = stage("oracle_dpo", ["--method", "dpo", "--model", ref, "--data", subset, "--lr", str(cfg.dpo_lr),
                                  "--beta", str(cfg.dpo_beta), "--export_dtype", "fp32"] + held_out)
    if cfg.until == "oracle":
        return oracle
    # Eq. 24-25: score every token of the target data, keep the top / bottom k% of each response
    scores_dir = os.path.join(out, "scores")
    if not on_rank_zero(lambda: sepo.scoring_complete(scores_dir)):
        log0("\n== scores ==")
        score.main(scoring_argv(cfg, oracle, ref, [(cfg.chosen_ratio, cfg.rejected_ratio)], scores_dir))
        free_memory()
    selections = os.path.join(scores_dir, sepo.selection_name(cfg.chosen_ratio, cfg.rejected_ratio))
    if cfg.until == "scores":
        return selections
    # Eq. 26: the policy, on the selected tokens only
    final = stage("policy", policy_argv(cfg, selections) + ["--judge", "synthetic" if on_tiny_world else "none"] +
                  shlex.split(cfg.policy_args))
    log0(f"done: {out} (oracle_sft/, oracle_dpo/, scores/ with report.html, policy/final)")
    return final


if __name__ == "__main__":
    sys.exit(utils.cli(main))
