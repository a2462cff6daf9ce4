"""Score every response token with an oracle and a reference (SePO Eq. 24), select (Eq. 25), write the selections
that `train.py --method sepo` reads; or show ConfPO's selection under one model. Optionally an HTML report.

    python score.py --oracle runs/sepo/oracle_dpo/final --reference runs/sepo/oracle_sft/final --data DATA \
        --policy PATH_OR_NAME --ratios 0.3:0.3,0.5:0.1 --output_dir runs/sepo/scores --report report.html
    torchrun --standalone --nproc_per_node 8 score.py ...            # each rank scores its blocks; rank 0 merges
    python score.py --confpo --model PATH --data DATA --report confpo.html --output_dir runs/confpo-scores

Output folder:
    shards/block_NNNNNN.jsonl   per block of pairs: the Eq. 24 score of every response token (written atomically;
                                a killed run resumes at the first missing block, and its output equals an
                                uninterrupted run's)
    selections-c{kw}-r{kl}.jsonl  one per ratio pair: row, chosen_n, rejected_n, chosen_selected, rejected_selected
                                (indices of the selected tokens, 0 = the first response token), + scores with
                                --save_scores (`confpo.jsonl` with --confpo)
    manifest.json               what was scored with what (fingerprints of models and data), the policy tokenizer's
                                fingerprint, key-token precision and recall; "complete" once every file is written
Positions are in the policy's tokenization: the oracle, the reference and the policy must share a vocabulary, or
`--cross_tokenizer` maps the oracle's selection onto the policy's tokens through character offsets.
"""

import contextlib
import html
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass

import utils
from utils import AT_LEAST_1, DEVICES, DTYPES, FORMS, NON_NEGATIVE, POSITIVE, THRESHOLD, Check, arg


def parse_ratios(text):
    """--ratios "0.3:0.3,0.5:0.1" -> [(k_w, k_l), ...], each in (0, 1] (0 would select nothing: every loss 0)."""
    pairs = [tuple(float(x) for x in part.split(":")) for part in text.split(",")]
    if not all(len(p) == 2 and 0 < p[0] <= 1 and 0 < p[1] <= 1 for p in pairs):
        raise ValueError(text)
    return pairs


def _parses(parse):
    def test(value):
        try:
            parse(value)
            return True
        except (TypeError, ValueError):
            return False
    return test


@dataclass
class ScoreConfig:
    oracle: str = arg("", "pi_oracle: the DPO-trained oracle (folder or hub name)")
    reference: str = arg("", "pi_ref: the SFT model the oracle started from")
    confpo: bool = arg(False, "score with one model's confidence instead (ConfPO Eq. 12-14): needs --model")
    model: str = arg("", "--confpo: the policy whose confidence selects tokens")
    policy: str = arg("", "the policy to be trained (its tokenizer fixes the token positions; '' = the oracle's)")
    cross_tokenizer: bool = arg(False, "allow a policy tokenizer other than the oracle's: map selections by characters")
    data: str = arg("", "target preference data (file, save_to_disk folder or hub name)")
    split: str = arg("train", "split of --data")
    form: str = arg("auto", "data form", options=FORMS)
    skip_bad_rows: bool = arg(False, "skip (and count) bad rows")
    cache_dir: str = arg("", "datasets cache folder ('' = Hugging Face's default)")
    max_length: int = arg(2048, "prompt + response tokens (use the training run's value)", check=AT_LEAST_1)
    max_prompt_length: int = arg(1800, "prompt tokens (use the training run's value)", check=AT_LEAST_1)
    max_pairs: int = arg(0, "score only the first N pairs (0 = all)", check=NON_NEGATIVE)
    beta: float = arg(1.0, "beta of Eq. 24 (rescales scores; the selection does not depend on it)", check=POSITIVE)
    ratios: str = arg("0.3:0.3", "chosen:rejected selection ratios k (Eq. 25), comma-separated for several",
                      check=Check(_parses(parse_ratios), "expected chosen:rejected pairs of ratios in (0, 1], such "
                                                         "as 0.3:0.3 or 0.3:0.3,0.5:0.1"))
    threshold: str = arg("arithmetic", "--confpo: arithmetic | geometric | a probability",
                         check=THRESHOLD)
    strict: bool = arg(False, "--confpo: pi < tau instead of pi <= tau")
    exclude_eos: bool = arg(False, "SePO: never select a response's last token when it is the EOS (the end of turn "
                                   "of ChatML templates); the top / bottom k of the rest (a departure, off by default)")
    save_scores: bool = arg(False, "also write each token's score into the selection files")
    format: str = arg("jsonl", "jsonl, or datasets (a save_to_disk folder per ratio pair)",
                      options=("jsonl", "datasets"))
    output_dir: str = arg("", "where shards, selections and manifest.json go")
    batch_size: int = arg(8, "pairs per forward", check=AT_LEAST_1)
    shard_size: int = arg(512, "pairs per shard file (the unit of resumption and of work split between ranks)",
                          check=AT_LEAST_1)
    device: str = arg("auto", "where to run", options=DEVICES)
    # Eq. 24's scores are a few hundredths of a nat, which a bf16 forward rounds: top-30% selections from bf16 kept
    # 62% of float32's, 66% with a float32 head (docs/sepo-pipeline.md). So float32 on any device, the head always.
    dtype: str = arg("fp32", "the scorers' dtype (bf16 halves their memory, at the selections' cost)", options=DTYPES)
    attn_implementation: str = arg("sdpa", "attention kernel (flash_attention_2 needs the flash-attn package)",
                                   options=utils.ATTENTION)
    dist_timeout: int = arg(120, "minutes a collective waits for the slowest rank (nccl's default is 10)",
                            check=AT_LEAST_1)
    report: str = arg("", "write an HTML report here (of the first ratio pair)")
    report_pairs: int = arg(12, "pairs shown token by token in the report", check=NON_NEGATIVE)
    seed: int = arg(0, "seed of the report's sample of pairs")


def parse_config(argv=None):
    return utils.parse_dataclass(ScoreConfig, argv, __doc__)


if __name__ == "__main__":  # answer --help and a mistyped flag now, before the imports below load torch (seconds)
    utils.check_flags(parse_config)

import torch  # noqa: E402  (the imports that take seconds, after the early flag check above)
import torch.distributed as dist  # noqa: E402
from tqdm import tqdm  # noqa: E402

import confpo  # noqa: E402
import data  # noqa: E402
import losses  # noqa: E402
import models  # noqa: E402
import sepo  # noqa: E402
import rundir  # noqa: E402
from utils import UserError, log0, on_rank_zero, rank_zero_first, run_in_group, together  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# What was scored: content fingerprints, so that a folder is never resumed with other models or data, and a moved
# folder (or data given by another path) still is
# ---------------------------------------------------------------------------------------------------------------

def identity(cfg, score_tok, crossing, device):
    """Everything that decides the shards' contents: the models' and the data's contents, and how the data are
    read, tokenized and scored (not how their paths are spelled)."""
    scorers = {"model": cfg.model} if cfg.confpo else {"oracle": cfg.oracle, "reference": cfg.reference}
    dtype = models.compute_dtype(cfg.dtype, device)
    return {"mode": "confpo" if cfg.confpo else "sepo",
            "models": {k: rundir.fingerprint(v) for k, v in scorers.items()}, "data": rundir.fingerprint(cfg.data),
            "split": cfg.split, "form": cfg.form, "skip_bad_rows": cfg.skip_bad_rows, "max_pairs": cfg.max_pairs,
            "max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length, "beta": cfg.beta,
            "shard_size": cfg.shard_size, "batch_size": cfg.batch_size, "dtype": repr(dtype),
            "scoring_tokenizer": data.tokenizer_hash(score_tok), "offsets": crossing, "attn": cfg.attn_implementation,
            **({"head": "float32"} if dtype != torch.float32 else {})}


# ---------------------------------------------------------------------------------------------------------------
# Scoring (each rank its blocks), shards written atomically
# ---------------------------------------------------------------------------------------------------------------

def load_scorer(path, cfg, device):
    """A causal LM for inference that returns per-token log-probs (models.PolicyLogps), no FSDP: ranks split data.
    No KV cache (a checkpoint's use_cache would build one every forward: +4 GB at 8B in bf16), and on the chunked
    path the head in float32 whatever --dtype: Eq. 24 differences log-probs, which a bf16 logit would round."""
    model = models.load_for_inference(path, models.compute_dtype(cfg.dtype, device), device, cfg.attn_implementation)
    return models.PolicyLogps(model, models.choose_logp_path("auto", model), chunk_size=None, together=False,
                              fp32_head=True)


def response_values(values, labels):
    """Per row, the values at the response positions (labels != -100), as lists."""
    mask = labels != losses.IGNORE_INDEX
    return [v[m].tolist() for v, m in zip(values, mask)]


def shards(cfg, tokenized):
    """The scores' block store (rundir.Blocks): shards/block_NNNNNN.jsonl, shard b the pairs b*shard_size ... A shard
    is damaged when it cannot be read, holds other rows than its block's, or a score list whose length is not its
    response's."""
    def read(path, b):
        expected = tokenized.select(range(b * cfg.shard_size, min(len(tokenized), (b + 1) * cfg.shard_size)))
        lengths = [[sum(1 for label in ex[f"{side}_labels"] if label != losses.IGNORE_INDEX)
                    for side in ("chosen", "rejected")] for ex in expected]
        return rundir.read_jsonl_block(path, lambda rows: [r["row"] for r in rows] == list(expected["row"]) and all(
            r[f"{side}_n"] == len(r[f"{side}_scores"]) == n for r, ns in zip(rows, lengths)
            for side, n in zip(("chosen", "rejected"), ns)))
    return rundir.Blocks(os.path.join(cfg.output_dir, "shards"), math.ceil(len(tokenized) / cfg.shard_size), read,
                         damaged="(not the scores of its block's pairs); scoring it again")


def score_blocks(cfg, store, todo, tokenized, pad_id, rank, device):
    """Score this rank's missing blocks of pairs (todo). A block line: row, chosen_n, rejected_n, chosen_scores,
    rejected_scores (Eq. 24, or log pi(y_t) with --confpo)."""
    if not todo:
        return
    if cfg.confpo:
        scorer = load_scorer(cfg.model, cfg, device)
    else:
        oracle, reference = load_scorer(cfg.oracle, cfg, device), load_scorer(cfg.reference, cfg, device)
    pairs = sum(min(cfg.shard_size, len(tokenized) - b * cfg.shard_size) for b in todo)
    bar = tqdm(total=pairs, desc=f"scoring (rank {rank})", disable=rank != 0, unit="pair", dynamic_ncols=True,
               mininterval=1.0)
    tokens, t0 = 0, time.perf_counter()
    for b in todo:
        lines = {}
        block = range(b * cfg.shard_size, min(len(tokenized), (b + 1) * cfg.shard_size))
        lengths = data.pair_lengths(tokenized.select(block))
        order = sorted(block, key=lambda i: -lengths[i - block.start])  # batches of similar lengths: little padding
        for s in range(0, len(order), cfg.batch_size):
            rows = [tokenized[i] for i in order[s:s + cfg.batch_size]]
            batch = {k: v.to(device) for k, v in data.collate_pairs(rows, pad_id).items()}
            inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            with torch.no_grad():
                if cfg.confpo:  # the policy's own confidence, log pi(y_t)
                    scores, _ = scorer(**inputs)
                else:  # Eq. 24: s(y_t) = beta log(pi_oracle(y_t) / pi_ref(y_t)), on the same token ids
                    scores = sepo.token_scores(oracle(**inputs)[0], reference(**inputs)[0], cfg.beta)
            per_row = response_values(scores.float().cpu(), batch["labels"].cpu())
            B = len(rows)
            for i, (index, row) in enumerate(zip(order[s:s + cfg.batch_size], rows)):
                lines[index] = json.dumps({"row": row["row"], "chosen_n": len(per_row[i]),
                                           "rejected_n": len(per_row[B + i]), "chosen_scores": per_row[i],
                                           "rejected_scores": per_row[B + i]})
            tokens += int(batch["attention_mask"].sum())
            bar.update(B)
            bar.set_postfix(tok_s=f"{tokens / (time.perf_counter() - t0):.0f}", refresh=False)
        store.write_text(b, "\n".join(lines[i] for i in block) + "\n")
    bar.close()


# ---------------------------------------------------------------------------------------------------------------
# Selection (Eq. 25, or ConfPO's Eq. 12-14), merged block by block on rank 0
# ---------------------------------------------------------------------------------------------------------------

def padded(lists):
    """Lists of per-token values -> (values (N, L) float64, mask (N, L) bool)."""
    L = max((len(x) for x in lists), default=1) or 1
    values = torch.zeros((len(lists), L), dtype=torch.float64)
    mask = torch.zeros(len(lists), L, dtype=torch.bool)
    for i, x in enumerate(lists):
        values[i, :len(x)] = torch.tensor(x, dtype=torch.float64)
        mask[i, :len(x)] = True
    return values, mask


def per_response(rule, lists, drop_last=None):
    """Apply a batched selection rule (values (N, L), mask (N, L)) -> (N, L) bool to a list of per-response
    value lists -> list of bool lists. drop_last: per response, whether its last token is no candidate (the rule
    then selects among the others, and never selects it)."""
    values, mask = padded(lists)
    for i, drop in enumerate(drop_last or []):
        if drop and lists[i]:
            mask[i, len(lists[i]) - 1] = False
    return [sel[:len(x)].tolist() for sel, x in zip(rule(values, mask), lists)]


def selectors(cfg):
    """{file name: (select chosen, select rejected)}: one entry per ratio pair, or ConfPO's single selection."""
    if cfg.confpo:  # ConfPO's Eq. 12-14
        threshold = confpo.parse_threshold(cfg.threshold)
        pick = lambda s, _: per_response(lambda v, m: confpo.confpo_mask(v, m, threshold, cfg.strict)[0], s)  # noqa
        return {"confpo.jsonl": (pick, pick)}
    # Eq. 25: the top k_w of each chosen response, the bottom k_l of each rejected one (NOTE(deviation): with
    # --exclude_eos, of its tokens but a final EOS, which is never selected)
    return {sepo.selection_name(rc, rl, cfg.format): (
        lambda s, drop, r=rc: per_response(lambda v, m: sepo.select_tokens(v, m, r, highest=True), s, drop),
        lambda s, drop, r=rl: per_response(lambda v, m: sepo.select_tokens(v, m, r, highest=False), s, drop))
        for rc, rl in parse_ratios(cfg.ratios)}


class Tally:
    """Per ratio pair and side: selected, key, hit and total token counts (key precision and recall), and tokens of
    the policy that no oracle token covers (cross-tokenizer)."""

    def __init__(self):
        self.n = {}

    def add(self, key, value):
        self.n[key] = self.n.get(key, 0) + value

    def stats(self, name):
        out = {}
        for side in ("chosen", "rejected"):
            g = lambda k: self.n.get((name, side, k), 0)  # noqa: E731
            out[f"selected_fraction_{side}"] = g("selected") / max(g("tokens"), 1)
            if g("key"):
                out[f"key_{side}"] = {"precision": g("hit") / max(g("selected"), 1), "recall": g("hit") / g("key"),
                                      "key_fraction": g("key") / max(g("tokens"), 1),
                                      "selected_fraction": g("selected") / max(g("tokens"), 1)}
        return out


def merge(cfg, store, scored_ds, policy_ds, eos_ids=None, end_id=None):
    """Rank 0: read the blocks in order, select for every ratio pair, write each selection file through a
    temporary file (renamed at the end). Returns (per-file statistics, the report's material).

    scored_ds: the tokenized pairs that were scored (block b holds its rows b*shard_size ...). policy_ds: the
    policy's tokenization; eos_ids: (the scoring tokenizer's EOS, the policy's) when the two tokenizers differ,
    else None (policy_ds is then scored_ds); end_id: the scoring tokenizer's EOS (--exclude_eos)."""
    tokenizer_crossing, n_pairs = eos_ids is not None, len(scored_ds)
    files = selectors(cfg)
    policy_index = {r: i for i, r in enumerate(policy_ds["row"])} if tokenizer_crossing else None
    tally, report_name = Tally(), next(iter(files))
    sample_rows = set(random.Random(cfg.seed).sample(range(n_pairs), min(cfg.report_pairs, n_pairs)))
    report = new_report(report_name)
    written = set()
    with contextlib.ExitStack() as out:  # every selection file renamed into place at the end (a JSONL first)
        tmp = {name: out.enter_context(rundir.writing(os.path.join(cfg.output_dir, name) + (
            "" if name.endswith(".jsonl") else ".jsonl"))) for name in files}
        for b in range(store.n_blocks):
            rows = store.load(b)
            for name, pickers in files.items():
                for rec in block_records(cfg, b, rows, pickers, scored_ds, policy_ds, policy_index, eos_ids, tally,
                                         name, end_id):
                    tmp[name].write(json.dumps(rec["out"]) + "\n")
                    written.add(rec["out"]["row"])
                    if name == report_name:
                        collect_report(report, rec, sample_rows)
        if tokenizer_crossing:  # pairs the policy keeps but the oracle's tokenization dropped: nothing selected
            missing = [i for i, r in enumerate(policy_ds["row"]) if r not in written]
            for i in missing:
                ex = policy_ds[i]
                empty = {"row": ex["row"], **{f"{s}_n": len(data.response_part(ex, s, "labels"))
                                              for s in ("chosen", "rejected")},
                         "chosen_selected": [], "rejected_selected": []}
                for fh in tmp.values():
                    fh.write(json.dumps(empty) + "\n")
            if missing:
                log0(f"warning: {len(missing)} pairs are empty in the oracle's tokenization: nothing selected")
    for name in files:
        if not name.endswith(".jsonl"):
            to_folder(os.path.join(cfg.output_dir, name))
    stats = {name: {"file": name, **tally.stats(name)} for name in files}
    if tokenizer_crossing:
        uncovered = tally.n.get("uncovered", 0) / max(tally.n.get("text_tokens", 0), 1)
        stats["uncovered_policy_tokens"] = uncovered
        if uncovered:
            log0(f"warning: {uncovered:.1%} of the policy's response tokens overlap no oracle token (the two "
                       "tokenizations truncate at different places): they are never selected")
    return stats, report


def block_records(cfg, b, rows, pickers, scored_ds, policy_ds, policy_index, eos_ids, tally, name, end_id=None):
    """The selection records of one block for one ratio pair, in the policy's positions; updates the tally."""
    def ends(i, side):  # --exclude_eos: the response ends with its end-of-turn token (it was not cut)
        return data.response_part(scored_ds[b * cfg.shard_size + i], side, "input_ids")[-1:] == [end_id]
    picked = {side: pick([r[f"{side}_scores"] for r in rows], [ends(i, side) for i in range(len(rows))]
                         if cfg.exclude_eos else None) for side, pick in zip(("chosen", "rejected"), pickers)}
    for i, r in enumerate(rows):
        index = b * cfg.shard_size + i
        scored = scored_ds[index]
        target = scored if policy_index is None else policy_ds[policy_index[r["row"]]] if r["row"] in policy_index \
            else None
        if target is None:  # dropped by the policy's tokenization: not needed for training
            continue
        out, sides = {"row": r["row"]}, {}
        for side in ("chosen", "rejected"):
            sel, scores = picked[side][i], r[f"{side}_scores"]
            if policy_index is not None:
                # pair the trailing template tokens only when neither response was cut before its EOS
                tail = (data.response_part(scored, side, "input_ids")[-1:] == [eos_ids[0]]
                        and data.response_part(target, side, "input_ids")[-1:] == [eos_ids[1]])
                sel, scores, covered = models.map_across_tokenizers(
                    torch.tensor(data.response_part(scored, side, "offsets")), torch.tensor(sel), torch.tensor(scores),
                    torch.tensor(data.response_part(target, side, "offsets")), align_tail=tail)
                has_text = torch.tensor([s >= 0 for s, _ in data.response_part(target, side, "offsets")])
                tally.add("uncovered", int((has_text & ~covered).sum()))
                tally.add("text_tokens", int(has_text.sum()))
                sel, scores = sel.tolist(), scores.tolist()
            out[f"{side}_n"] = len(sel)
            out[f"{side}_selected"] = [j for j, s in enumerate(sel) if s]
            if cfg.save_scores or cfg.confpo:
                out[f"{side}_scores"] = scores
            sides[side] = (sel, scores)
            tally.add((name, side, "selected"), sum(sel))
            tally.add((name, side, "tokens"), len(sel))
            if f"{side}_key" in target:
                key = data.response_part(target, side, "key")
                tally.add((name, side, "key"), sum(key))
                tally.add((name, side, "hit"), sum(1 for s, k in zip(sel, key) if s and k))
        yield {"out": out, "sides": sides, "target": target, "index": index}


def to_folder(path):
    """--format datasets: the selection file path.jsonl (written) as a save_to_disk folder at path (via path.tmp)."""
    import datasets
    folder_tmp = path + ".tmp"
    shutil.rmtree(folder_tmp, ignore_errors=True)
    datasets.Dataset.from_list(sepo.load_selections(path + ".jsonl").to_list()).save_to_disk(folder_tmp)
    os.remove(path + ".jsonl")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(folder_tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------

def check_config(cfg):
    """What the flags require of each other (each flag's own value is checked where it is declared)."""
    if cfg.confpo:
        if not cfg.model:
            raise UserError("--confpo needs --model: the policy whose confidence selects tokens")
    elif not (cfg.oracle and cfg.reference):
        raise UserError("score.py needs --oracle and --reference (or --confpo --model)")
    if not cfg.data:
        raise UserError("score.py needs --data")
    if not cfg.output_dir:
        raise UserError("score.py needs --output_dir")
    ignored = [flag for flag, given in (("--exclude_eos", cfg.exclude_eos), ("--policy", cfg.policy), ("--format "
               "datasets", cfg.format != "jsonl"), ("--cross_tokenizer", cfg.cross_tokenizer)) if given]
    if cfg.confpo and ignored:
        raise UserError(f"{', '.join(ignored)}: SePO's (a policy's positions, Eq. 25's files), not --confpo's")


def tokenizers(cfg):
    """(scoring tokenizer, policy tokenizer, crossing). With one vocabulary the policy's tokenizer (its chat
    template included) renders the data for oracle and reference alike, so positions are the policy's own."""
    from transformers import AutoTokenizer
    if cfg.confpo:
        tok = AutoTokenizer.from_pretrained(cfg.model)
        return tok, tok, False
    oracle_tok = AutoTokenizer.from_pretrained(cfg.oracle)
    diffs = models.tokenizer_differences(oracle_tok, AutoTokenizer.from_pretrained(cfg.reference))
    if diffs:
        raise UserError(f"the oracle and the reference must share a tokenizer (Eq. 24 compares the same token ids); "
                         f"they differ in: {'; '.join(diffs)}")
    if not cfg.policy:
        return oracle_tok, oracle_tok, False
    policy_tok = AutoTokenizer.from_pretrained(cfg.policy)
    crossing = models.check_tokenizers(oracle_tok, policy_tok, cfg.oracle, cfg.policy, cfg.cross_tokenizer)
    return (oracle_tok if crossing else policy_tok), policy_tok, crossing


def main(argv=None):
    cfg, _ = parse_config(argv)
    check_config(cfg)
    return run_in_group(cfg.device, lambda rank, world, device: run(cfg, rank, world, device),
                        timeout=cfg.dist_timeout, dtype=cfg.dtype, model_given=True)


def run(cfg, rank, world, device):
    with rundir.FolderLock(cfg.output_dir, rank):  # one job at a time; a failed start leaves the folder as it was
        for flag in ("model", "oracle", "reference", "policy"):
            models.check_source(getattr(cfg, flag), f"--{flag}")
        score_tok, policy_tok, crossing = tokenizers(cfg)
        mine = on_rank_zero(lambda: identity(cfg, score_tok, crossing, device))
        saved = rundir.claim(cfg.output_dir, "manifest.json", mine, "scores of another run", key="identity")

        def load():
            ds = data.load_preferences(cfg.data, split=cfg.split, form=cfg.form, skip_bad_rows=cfg.skip_bad_rows,
                                       cache_dir=cfg.cache_dir or None)
            ds = ds.select(range(min(cfg.max_pairs, len(ds)))) if cfg.max_pairs else ds
            return ds, *data.tokenize_preferences(ds, score_tok, cfg.max_length, cfg.max_prompt_length,
                                                  offsets=crossing)

        ds, tokenized, stats = rank_zero_first(load)
        log0(f"{cfg.data}: {stats['kept']} pairs to score ({stats['dropped_empty']} dropped: empty response)")
        manifest_path = os.path.join(cfg.output_dir, "manifest.json")
        scored = {"identity": mine, "paths": {k: getattr(cfg, k) for k in ("oracle", "reference", "model", "policy")
                                               if getattr(cfg, k)},
                  "data": {"path": cfg.data, "split": cfg.split, "fingerprint": mine["data"],
                           "max_pairs": cfg.max_pairs}, "policy_tokenizer": data.tokenizer_hash(policy_tok),
                  "exclude_eos": cfg.exclude_eos}
        dist.barrier()
        store = shards(cfg, tokenized)
        todo = store.missing()  # rank 0 decides; a damaged shard is scored again
        if rank == 0:
            rundir.remove_leftovers(os.path.join(cfg.output_dir, "*.tmp[0-9]*"))  # a selection file's killed write
            if not (saved and saved.get("complete")):  # a complete manifest stays complete until the new one
                rundir.atomic_write(manifest_path, json.dumps({**scored, "complete": False}, indent=2))
        dist.barrier()
        # ranks score on their own: a failure on one (a model that cannot load, a head check) ends them all
        together(lambda: score_blocks(cfg, store, todo[rank::world], tokenized, data.pad_id(score_tok), rank, device))
        dist.barrier()
        if rank == 0:
            finish(cfg, store, ds, tokenized, stats, score_tok, policy_tok, crossing, scored, manifest_path)
        dist.barrier()
        return cfg.output_dir


def finish(cfg, store, ds, tokenized, stats, score_tok, policy_tok, crossing, scored, manifest_path):
    """Rank 0: merge, select, write the selection files, then the complete manifest, then the report."""
    policy_ds = data.tokenize_preferences(ds, policy_tok, cfg.max_length, cfg.max_prompt_length,
                                          offsets=True)[0] if crossing else tokenized
    eos_ids = (score_tok.eos_token_id, policy_tok.eos_token_id) if crossing else None
    selection_stats, report = merge(cfg, store, tokenized, policy_ds, eos_ids, score_tok.eos_token_id)
    manifest = {**scored, "complete": True, "pairs": len(policy_ds), "tokenize": stats, "cross_tokenizer": crossing,
                "selections": selection_stats}
    rundir.atomic_write(manifest_path, json.dumps(manifest, indent=2))
    for name in selectors(cfg):
        entry, line = selection_stats[name], f"wrote {os.path.join(cfg.output_dir, name)}"
        if "key_chosen" in entry:
            line += (f" (known key tokens: chosen precision {entry['key_chosen']['precision']:.3f} / recall "
                     f"{entry['key_chosen']['recall']:.3f}, rejected {entry['key_rejected']['precision']:.3f} / "
                     f"{entry['key_rejected']['recall']:.3f})")
        log0(line)
    if cfg.report:
        write_report(cfg, cfg.report, report, selection_stats, policy_tok)
        log0(f"wrote {cfg.report}")


# ---------------------------------------------------------------------------------------------------------------
# The HTML report (--report): tokens coloured by score, selections outlined, known key tokens underlined,
# histograms of scores (SePO Fig. 6) and of selected positions (ConfPO Fig. 12); one self-contained file
# ---------------------------------------------------------------------------------------------------------------

HISTOGRAM_PAIRS = 20000  # the report's histograms use the first pairs up to this many (memory stays bounded)


def new_report(name):
    """An empty report of the selection file `name`."""
    return {"name": name, "pairs": [], "scores": {"chosen": [], "rejected": []},
            "positions": {"chosen": [], "rejected": []}}


def collect_report(report, rec, sample_rows):
    """Keep what the report needs: the sampled pairs whole, and scores and selected positions of the first pairs."""
    if rec["index"] in sample_rows:
        report["pairs"].append(rec)
    if rec["index"] < HISTOGRAM_PAIRS:
        for side, (sel, scores) in rec["sides"].items():
            report["scores"][side].extend(v for v in scores if math.isfinite(v))
            report["positions"][side].extend(j / max(len(sel) - 1, 1) for j, s in enumerate(sel) if s)


def _colour(score, scale, confpo_mode):
    """Diverging colours: red for high oracle scores (or, for ConfPO, low confidence), blue for the other end."""
    if not math.isfinite(score):
        return "transparent"
    if confpo_mode:  # score = log pi: probability 1 is white, probability 0 red
        t = 1.0 - math.exp(min(score, 0.0))
        return f"rgba(220,40,40,{0.85 * t:.3f})"
    t = max(-1.0, min(1.0, score / scale)) if scale > 0 else 0.0
    return f"rgba(220,40,40,{0.85 * t:.3f})" if t >= 0 else f"rgba(40,90,220,{-0.85 * t:.3f})"


def _histogram_svg(series, title, bins=30, lo=None, hi=None, width=520, height=170):
    """An inline SVG histogram of one or more named value lists, overlaid; each normalised to sum to 1."""
    values = [v for _, vals, _ in series for v in vals]
    if not values:
        return f"<p>{html.escape(title)}: no values</p>"
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    hi = hi if hi > lo else lo + 1.0
    counts = []
    for name, vals, colour in series:
        c = [0] * bins
        for v in vals:
            c[min(bins - 1, max(0, int((v - lo) / (hi - lo) * bins)))] += 1
        counts.append((name, [x / max(len(vals), 1) for x in c], colour))
    top = max(max(c) for _, c, _ in counts) or 1.0
    w = (width - 40) / bins
    parts = [f'<svg width="{width}" height="{height + 40}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="20" y="14" font-size="13">{html.escape(title)}</text>']
    for name, c, colour in counts:
        for i, x in enumerate(c):
            h = x / top * height
            parts.append(f'<rect x="{30 + i * w:.1f}" y="{20 + height - h:.1f}" width="{w - 1:.1f}" height="{h:.1f}" '
                         f'fill="{colour}" fill-opacity="0.55"><title>{html.escape(name)}: {x:.3f} in '
                         f'[{lo + i * (hi - lo) / bins:.3g}, {lo + (i + 1) * (hi - lo) / bins:.3g})</title></rect>')
    parts.append(f'<text x="30" y="{height + 36}" font-size="11">{lo:.3g}</text>'
                 f'<text x="{width - 40}" y="{height + 36}" font-size="11">{hi:.3g}</text>')
    for k, (name, _, colour) in enumerate(counts):
        parts.append(f'<rect x="{width - 170}" y="{22 + 16 * k}" width="10" height="10" fill="{colour}"/>'
                     f'<text x="{width - 155}" y="{31 + 16 * k}" font-size="11">{html.escape(name)}</text>')
    return "".join(parts) + "</svg>"


def token_texts(tokenizer, ids):
    """The text each token adds, decoding prefixes: a character split over several byte-level tokens shows on the
    token that completes it (decoding tokens one by one would show U+FFFD halves)."""
    texts, done = [], ""
    for i in range(len(ids)):
        cur = tokenizer.decode(ids[:i + 1])
        if cur.endswith("\ufffd") and i + 1 < len(ids):  # an incomplete character: wait for the next token
            texts.append("")
            continue
        texts.append(cur[len(done):] if cur.startswith(done) else tokenizer.decode([ids[i]]))
        done = cur
    return texts


def write_report(cfg, path, report, stats, tokenizer):
    """One HTML file, no dependency: key-token precision, the two histograms, a sample of pairs token by token."""
    name, entry = report["name"], stats[report["name"]]
    magnitudes = sorted(abs(v) for side in ("chosen", "rejected") for v in report["scores"][side])
    scale = magnitudes[int(0.99 * (len(magnitudes) - 1))] if magnitudes else 1.0
    title = ("ConfPO selection under " + cfg.model) if cfg.confpo else f"SePO selection ({name})"
    legend = ("colour: 1 - pi(y_t) (red = unsure); outlined: selected (pi <= tau)" if cfg.confpo else
              "colour: score s(y_t) = beta log(pi_oracle / pi_ref) (red high, blue low); outlined: selected")
    has_keys = "key_chosen" in entry
    legend += "; green wavy underline: a known key token of the synthetic task" if has_keys else ""
    out = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>", html.escape(title), "</title><style>",
           "body{font-family:sans-serif;max-width:1100px;margin:20px auto;color:#222}",
           ".resp{font-family:monospace;white-space:pre-wrap;line-height:1.9;border:1px solid #ddd;padding:6px}",
           ".tok{padding:1px 0;border-radius:2px}.sel{outline:2px solid #111;outline-offset:-1px}",
           ".key{text-decoration:underline wavy #0a0;text-underline-offset:4px}",
           "h3{margin-bottom:4px}.meta{color:#666;font-size:13px}table{border-collapse:collapse}",
           "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}</style></head><body>",
           f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(legend)}. Hover a token for its value. "
           f"Data: {html.escape(cfg.data)}; histograms over the first {HISTOGRAM_PAIRS} pairs at most.</p>"]
    if has_keys:
        out.append("<table><tr><th>known key tokens</th><th>precision</th><th>recall</th><th>key fraction</th>"
                   "<th>selected fraction</th></tr>")
        for side in ("chosen", "rejected"):
            k = entry[f"key_{side}"]
            out.append(f"<tr><td>{side}</td><td>{k['precision']:.3f}</td><td>{k['recall']:.3f}</td>"
                       f"<td>{k['key_fraction']:.3f}</td><td>{k['selected_fraction']:.3f}</td></tr>")
        out.append("</table><p class='meta'>A random selection of the same size has precision = key fraction.</p>")
    colours = {"chosen": "#d62728", "rejected": "#1f77b4"}
    out.append(_histogram_svg([(s, report["scores"][s], colours[s]) for s in colours],
                              "log pi(y_t) of every response token" if cfg.confpo else
                              "token scores s(y_t), chosen vs rejected (SePO Fig. 6)"))
    out.append(_histogram_svg([(s, report["positions"][s], colours[s]) for s in colours],
                              "selected tokens by relative position in the response (ConfPO Fig. 12)", bins=20,
                              lo=0.0, hi=1.0))
    for rec in sorted(report["pairs"], key=lambda r: r["out"]["row"]):
        out.append(f"<h3>pair {rec['out']['row']}</h3>")
        for side, (sel, scores) in rec["sides"].items():
            ids = data.response_part(rec["target"], side, "input_ids")
            keys = data.response_part(rec["target"], side, "key") if has_keys else [0] * len(ids)
            spans = []
            for text, s, v, k in zip(token_texts(tokenizer, ids), sel, scores, keys):
                label = (f"{'log pi' if cfg.confpo else 'score'} {v:.3f}" + (" (selected)" if s else "")
                         + (" (key token)" if k else ""))
                classes = "tok" + (" sel" if s else "") + (" key" if k else "")
                spans.append(f"<span class='{classes}' style='background:{_colour(v, scale, cfg.confpo)}'"
                             f" title='{html.escape(label)}'>{html.escape(text)}</span>")
            out.append(f"<p class='meta'>{side}: {sum(sel)} of {len(sel)} tokens selected "
                       f"({sum(sel) / max(len(sel), 1):.0%})</p><div class='resp'>{''.join(spans)}</div>")
    out.append("</body></html>")
    rundir.atomic_write(path, "".join(out))


if __name__ == "__main__":
    sys.exit(utils.cli(main))
