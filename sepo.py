"""SePO (Yang et al. 2024, arXiv 2408.13518): selective preference optimization with an oracle's token rewards.

    Eq. 23  SFT on the chosen responses of a random subset D_m: L = -E log pi(y^w | x); the result is pi_ref
    (oracle) DPO on D_m from pi_ref gives pi_oracle
    Eq. 24  s(y_t) = beta log( pi_oracle(y_t) / pi_ref(y_t) )                        score of every response token
    Eq. 25  I_k(y_t^w) = 1 if s(y_t^w) ranks in the highest k% of its response; rejected: the lowest k%
    Eq. 26  L = -log sigmoid( beta/|S^w| sum_t I_k(y_t^w) log pi(y_t^w) - beta/|S^l| sum_t I_k(y_t^l) log pi(y_t^l) )

Shapes as in losses.py: (B, T), position t holds log pi(y_t | x, y_<t), masks True on response tokens.
"""

import json
import os
import shlex
from dataclasses import dataclass, field

import torch

from losses import selective_loss, simpo_loss, top_k_mask


def token_scores(oracle_logps, ref_logps, beta=1.0):
    """Eq. 24: s(y_t) = beta * log( pi_oracle(y_t | x, y_<t) / pi_ref(y_t | x, y_<t) ) -> (B, T) float32.

    Both log-probs are over exactly the same token ids. beta only rescales: the selection (Eq. 25) ranks scores
    within a response, so it does not depend on beta > 0; the released code uses beta = 1.
    """
    return beta * (oracle_logps.float() - ref_logps.float())


def selection_counts(mask, ratio):
    """floor(ratio * n) for each response of n tokens -> (B,) long. A 1e-9 slack makes 0.29 * 100 give 29, as
    meant, rather than float rounding's 28."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"selection ratio must be in [0, 1], got {ratio}")
    return (mask.sum(-1).double() * ratio + 1e-9).floor().long()


def select_tokens(scores, mask, ratio, highest=True):
    """Eq. 25: per response, the floor(ratio * n) tokens with the highest (chosen) or lowest (rejected) scores among
    its n response tokens (the first response token and the EOS included) -> (B, T) bool.

    Ties go to the earliest position (a stable sort), as in the released code; vectorised (losses.top_k_mask).
    NOTE(deviation): the paper says "the highest k%"; floor(ratio * n) is the released code's count (a response
    shorter than 1/ratio tokens selects nothing, which the losses turn into a zero-loss pair). Unlike the released
    scorer, the first response token is scored and can be selected.
    """
    # I_k(y_t) = 1 if s(y_t) ranks in the highest (chosen) / lowest (rejected) k% of its response
    return top_k_mask(scores if highest else -scores, mask, selection_counts(mask, ratio))


def sepo_loss(chosen_logps, chosen_mask, rejected_logps, rejected_mask, chosen_selected, rejected_selected,
              beta=1.0, gamma=0.0):
    """SePO objective (Eq. 26), reference-free and length-normalised over the selected tokens:
    L = -log sigmoid( beta/|S^w| sum_t I(y_t^w) log pi(y_t^w) - beta/|S^l| sum_t I(y_t^l) log pi(y_t^l) - gamma ),
    that is SimPO over the oracle's selection.

    beta 1.0 and gamma 0.0 as the released code (which has no beta; the paper's Eq. 26 has one).
    chosen_selected / rejected_selected: (B, T) bool, from `select_tokens` (score.py writes them); they are
    intersected with the response masks. A pair with an empty selection on either side has loss 0.
    Metrics: rewards over the selection and over all tokens (`*_all`), selected counts, lengths, `empty`.
    """
    # -log sigmoid( beta/|S^w| sum_t I log pi(y_t^w) - beta/|S^l| sum_t I log pi(y_t^l) - gamma )
    return selective_loss(simpo_loss, chosen_logps, chosen_mask, rejected_logps, rejected_mask,
                          chosen_selected & chosen_mask, rejected_selected & rejected_mask, beta=beta, gamma=gamma)


# ---------------------------------------------------------------------------------------------------------------
# Selections on disk (written by score.py, read by train.py --method sepo)
#   one row per pair: row (index in the source data), chosen_n / rejected_n (response tokens, EOS included),
#   chosen_selected / rejected_selected (indices of the selected tokens, 0 = the first response token),
#   optionally chosen_scores / rejected_scores (Eq. 24 per response token)
# ---------------------------------------------------------------------------------------------------------------

def load_selections(path):
    """A selections file (JSONL) or folder (datasets.save_to_disk) -> datasets.Dataset."""
    import datasets
    if os.path.isdir(path):
        return datasets.load_from_disk(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such selections file (write one with score.py)")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} row {i}: not valid JSON ({e})") from None
    return datasets.Dataset.from_list(rows)


def attach_selections(tokenized, selections, source="selections"):
    """Add per-token fields `chosen_select` / `rejected_select` (0/1, aligned with *_input_ids) to tokenized pairs
    (data.tokenize_preferences), from their selections. Fails when a pair has no selection or when its response
    length differs from the one scored (another tokenizer or max_length)."""
    index = {int(r): i for i, r in enumerate(selections["row"])}

    def add(ex):
        if ex["row"] not in index:
            raise ValueError(f"{source}: no selection for row {ex['row']}")
        sel = selections[index[ex["row"]]]
        out = {}
        for side in ("chosen", "rejected"):
            n = sum(1 for x in ex[f"{side}_labels"] if x != -100)
            if sel[f"{side}_n"] != n:
                raise ValueError(f"{source} row {ex['row']}, field '{side}_n': {sel[f'{side}_n']} tokens were scored "
                                 f"but the response has {n} here (another tokenizer or max_length?)")
            flags = [0] * len(ex[f"{side}_input_ids"])
            for j in sel[f"{side}_selected"]:
                if not 0 <= j < n:
                    raise ValueError(f"{source} row {ex['row']}, field '{side}_selected': index {j} outside 0..{n - 1}")
                flags[ex["prompt_len"] + j] = 1
            out[f"{side}_select"] = flags
        return out

    return tokenized.map(add, desc="attaching selections")


# ---------------------------------------------------------------------------------------------------------------
# The whole pipeline as one command: python sepo.py
# (train.py imports this module for the loss, so train and score are imported inside the functions below)
# ---------------------------------------------------------------------------------------------------------------

def _f(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class PipelineConfig:
    data: str = _f("", "target preference data ('' = the tiny world's synthetic task)")
    split: str = _f("train", "split of --data")
    eval_data: str = _f("", "held-out pairs for the final policy ('' = none, or the synthetic test set)")
    oracle_base: str = _f("", "the model the oracle starts from, SFT then DPO ('' = the tiny world's llama-tiny)")
    policy: str = _f("", "the policy to align ('' = the tiny world's SFT llama-small, 5x the oracle)")
    output_dir: str = _f("runs/sepo", "one folder for every stage")
    subset: float = _f(0.5, "D_m: a fraction (<= 1) or a count (> 1) of the target pairs, drawn at random")
    seed: int = _f(42, "seed of D_m and of every stage")
    chosen_ratio: float = _f(0.3, "k for chosen responses: top k% of tokens (Eq. 25)")
    rejected_ratio: float = _f(0.3, "k for rejected responses: bottom k% of tokens (Eq. 25)")
    dpo_beta: float = _f(0.1, "beta of the oracle's DPO")
    beta: float = _f(1.0, "beta of Eq. 24 and Eq. 26 (the released code: 1)")
    gamma: float = _f(0.0, "margin gamma of Eq. 26 (the released code: 0)")
    sft_lr: float = _f(5e-7, "learning rate of the oracle's SFT (Eq. 23)")
    dpo_lr: float = _f(5e-7, "learning rate of the oracle's DPO")
    policy_lr: float = _f(5e-7, "learning rate of the policy (SePO: 5e-7, cosine, 3% warm-up, AdamW (0.9, 0.95))")
    sft_epochs: int = _f(1, "epochs of the oracle's SFT")
    global_batch_size: int = _f(128, "pairs per optimizer step in every stage")
    micro_batch_size: int = _f(2, "pairs per rank per forward")
    max_length: int = _f(2048, "prompt + response tokens")
    max_prompt_length: int = _f(1800, "prompt tokens")
    max_steps: int = _f(-1, "cap every training stage at this many steps (-1 = epochs)")
    policy_args: str = _f("", "more train.py flags for the policy stage, e.g. '--save_every 10 --keep_last 0'")
    cross_tokenizer: bool = _f(False, "allow an oracle tokenizer other than the policy's (map selections by text)")
    tiny_world: str = _f("tiny_world", "folder of the offline tiny world")
    cache_dir: str = _f("", "datasets cache folder")
    device: str = _f("auto", "auto | cpu | cuda")


# `python sepo.py` without --data: small batches and learning rates that suit the tiny world (a policy lr of 1e-4
# already collapses the tiny policy: see the README)
PIPELINE_TINY = dict(global_batch_size=32, micro_batch_size=8, sft_lr=1e-3, dpo_lr=1e-4, policy_lr=3e-5, sft_epochs=2,
                     max_length=128, max_prompt_length=64)
# Fields that may change when the same pipeline folder is run again (the others decide what its stages hold)
PIPELINE_RESUMABLE = {"cache_dir", "device", "tiny_world"}


def write_subset(cfg, out_path):
    """D_m: a seeded random subset of the target pairs, written as JSONL in the explicit-prompt layout."""
    import data
    import train
    ds = data.load_preferences(cfg.data, split=cfg.split, cache_dir=cfg.cache_dir or None)
    m = round(cfg.subset * len(ds)) if cfg.subset <= 1 else int(cfg.subset)
    if not 1 <= m <= len(ds):
        raise SystemExit(f"--subset {cfg.subset}: D_m would hold {m} of {len(ds)} pairs")
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(cfg.seed))[:m].sort().values.tolist()
    lines = [json.dumps({k: ds[i][k] for k in ("prompt", "chosen", "rejected")}) for i in order]
    train.atomic_write(out_path, "\n".join(lines) + "\n")
    return m


def scoring_complete(scores_dir):
    """score.py marks its manifest complete only once every selection file is in place."""
    path = os.path.join(scores_dir, "manifest.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        return bool(json.load(fh).get("complete"))


def stage_argv(cfg):
    """train.py's flags shared by every training stage of the pipeline."""
    return ["--cache_dir", cfg.cache_dir, "--seed", str(cfg.seed), "--max_length", str(cfg.max_length),
            "--max_prompt_length", str(cfg.max_prompt_length), "--global_batch_size", str(cfg.global_batch_size),
            "--micro_batch_size", str(cfg.micro_batch_size), "--max_steps", str(cfg.max_steps), "--device",
            cfg.device, "--judge", "none"]


def scoring_argv(cfg, oracle, ref, ratios, scores_dir):
    """score.py's flags for Eq. 24-25: the whole target data, one selection file per (k_w, k_l) in `ratios`."""
    return ["--oracle", oracle, "--reference", ref, "--policy", cfg.policy, "--data", cfg.data, "--split", cfg.split,
            "--beta", str(cfg.beta), "--ratios", ",".join(f"{rc}:{rl}" for rc, rl in ratios), "--output_dir",
            scores_dir, "--max_length", str(cfg.max_length), "--max_prompt_length", str(cfg.max_prompt_length),
            "--cache_dir", cfg.cache_dir, "--device", cfg.device, "--report", os.path.join(scores_dir, "report.html"),
            "--cross_tokenizer", str(cfg.cross_tokenizer)]


def policy_argv(cfg, selections):
    """train.py's flags for the policy stage (Eq. 26) with SePO's optimiser settings, after the common ones."""
    return ["--method", "sepo", "--model", cfg.policy, "--data", cfg.data, "--split", cfg.split, "--selections",
            selections, "--eval_data", cfg.eval_data, "--lr", str(cfg.policy_lr), "--warmup_ratio", "0.03",
            "--adam_beta2", "0.95", "--beta", str(cfg.beta), "--gamma", str(cfg.gamma)]


def run_pipeline(argv=None):
    """SFT (Eq. 23) and DPO on D_m give pi_ref and pi_oracle; score.py scores and selects (Eq. 24-25) the whole
    target data; train.py trains the policy with Eq. 26. Each stage is skipped when its output exists, and each
    training stage resumes from its own checkpoints: run the same command again after an interruption."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    import data
    import score
    import train
    cfg, explicit = train.parse_dataclass(PipelineConfig, argv, run_pipeline.__doc__)
    owner = not dist.is_initialized()
    rank, world, device = train.init_distributed(cfg)
    try:
        tiny = not cfg.data
        if tiny:
            for key, value in PIPELINE_TINY.items():
                if key not in explicit:
                    setattr(cfg, key, value)
            if rank == 0:
                data.build_tiny_world(cfg.tiny_world)
            dist.barrier()
            paths = data.build_tiny_world(cfg.tiny_world)
            cfg.data, cfg.eval_data = paths["train"], cfg.eval_data or paths["test"]
            cfg.oracle_base = cfg.oracle_base or paths["llama-tiny"]
            cfg.policy = cfg.policy or train.tiny_sft_model(cfg, paths, rank, world, device)
        if not (cfg.oracle_base and cfg.policy):
            raise SystemExit("sepo.py needs --oracle_base and --policy (or neither, with no --data: the tiny world)")
        # before any training: can the oracle select the policy's tokens? With one vocabulary the oracle is trained
        # with the policy's tokenizer, so that it reads the data in the format the policy does
        crossing = score.check_tokenizers(AutoTokenizer.from_pretrained(cfg.oracle_base),
                                          AutoTokenizer.from_pretrained(cfg.policy), cfg.oracle_base, cfg.policy,
                                          cfg.cross_tokenizer)
        oracle_tokenizer = [] if crossing else ["--tokenizer", cfg.policy]
        # stages are skipped when their output exists: a folder must not be reused with other settings
        train.check_output_dir(cfg, rank, "pipeline.json", PIPELINE_RESUMABLE, "a SePO pipeline with other settings")
        out = cfg.output_dir
        subset = os.path.join(out, "subset.jsonl")
        if rank == 0 and not os.path.exists(subset):
            train.log0(f"D_m: {write_subset(cfg, subset)} pairs -> {subset}")
        dist.barrier()
        common = stage_argv(cfg)

        def stage(name, args):
            final = os.path.join(out, name, "final")
            if not os.path.exists(os.path.join(final, "config.json")):
                train.log0(f"\n== {name} ==")
                train.main(common + args + ["--output_dir", os.path.join(out, name)])  # later flags win
            return final

        # Eq. 23: SFT on the chosen responses of D_m; the result is pi_ref
        ref = stage("oracle_sft", ["--method", "sft", "--model", cfg.oracle_base, "--data", subset,
                                   "--lr", str(cfg.sft_lr), "--epochs", str(cfg.sft_epochs)] + oracle_tokenizer)
        # the oracle: DPO on D_m from pi_ref
        oracle = stage("oracle_dpo", ["--method", "dpo", "--model", ref, "--data", subset, "--lr", str(cfg.dpo_lr),
                                      "--beta", str(cfg.dpo_beta)])
        # Eq. 24-25: score every token of the target data, keep the top / bottom k% of each response
        scores_dir = os.path.join(out, "scores")
        if not scoring_complete(scores_dir):
            train.log0("\n== scores ==")
            score.main(scoring_argv(cfg, oracle, ref, [(cfg.chosen_ratio, cfg.rejected_ratio)], scores_dir))
        # Eq. 26: the policy, on the selected tokens only
        selections = os.path.join(scores_dir, score.selection_name(cfg.chosen_ratio, cfg.rejected_ratio))
        final = stage("policy", policy_argv(cfg, selections) + ["--judge", "synthetic" if tiny else "none"] +
                      shlex.split(cfg.policy_args))
        train.log0(f"done: {out} (oracle_sft/, oracle_dpo/, scores/ with report.html, policy/final)")
        return final
    finally:
        if owner:
            dist.destroy_process_group()


if __name__ == "__main__":
    import sys
    sys.exit(0 if run_pipeline() else 1)
