"""onpolicy.py on the tiny world: the sampler against a slow loop without a cache, pairs that follow the rule,
scores that rescoring gives again, K samples per prompt, kill -9 and 2 ranks against an uninterrupted run (bytes),
every mistake in one line, and train.py on the pairs."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import models
import onpolicy
import tiny
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("DEBUG", None)


@pytest.fixture(scope="module")
def reward_model(world, tmp_path_factory):
    """A tiny LlamaForSequenceClassification built from a config, with the tiny tokenizer and its chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    path = str(tmp_path_factory.mktemp("rm") / "reward")
    tok = AutoTokenizer.from_pretrained(world["tokenizer"])
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2, num_labels=1,
                                                       pad_token_id=tok.pad_token_id))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def flags(**kw):
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def base(world, policy, out, **extra):
    return flags(**{"model": policy, "prompts": world["train"], "max_prompts": 24, "max_new_tokens": 24,
                    "max_prompt_length": 64, "reward": "tiny:synthetic_reward", "batch_size": 5, "block_size": 8,
                    "output_dir": out, "cache_dir": world["cache"], "device": "cpu", **extra})


def read(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def command(argv, cwd, n=0, timeout=300):
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n else \
        [sys.executable]
    return subprocess.run(runner + [os.path.join(HERE, "onpolicy.py"), *argv], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def outputs(out):
    return {name: open(os.path.join(out, name), "rb").read() for name in ("samples.jsonl", "pairs.jsonl")}


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------

def slow_nucleus(logits, u, temperature, top_p):
    """The nucleus from its definition, one row at a time: sort, keep the most likely tokens until their mass
    reaches top_p, renormalise, invert the CDF at u."""
    out = []
    for row, x in zip(logits.float(), u.tolist()):
        p = torch.softmax(row / temperature, -1)
        order = sorted(range(len(p)), key=lambda i: -float(p[i])) if top_p < 1 else list(range(len(p)))
        kept, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            kept.append(i)
            mass += float(p[i])
        total, acc = sum(float(p[i]) for i in kept), 0.0
        pick = kept[-1]
        for i in kept:
            acc += float(p[i])
            if acc >= x * total:
                pick = i
                break
        out.append(pick)
    return torch.tensor(out)


@pytest.mark.parametrize("V,top_p,scale", [(50, 0.9, 3.0), (300, 0.95, 0.3), (2000, 0.99, 0.05), (80, 1.0, 2.0)])
def test_nucleus_pick_against_its_definition(V, top_p, scale):
    """Peaked and flat distributions: the top-64, top-1024 and full-vocabulary rounds all give the definition's
    token."""
    gen = torch.Generator().manual_seed(V)
    logits = torch.randn(40, V, generator=gen) * scale / 0.1
    u = torch.rand(40, generator=gen)
    got = models.nucleus_pick(logits, u, 0.8, top_p)
    assert torch.equal(got, slow_nucleus(logits, u, 0.8, top_p))
    assert torch.equal(models.nucleus_pick(logits, u, 0, top_p), logits.argmax(-1))


def test_sample_equals_a_loop_without_cache(world, policy):
    """Every token of every sample equals the one a full forward of the whole sequence so far gives, with the same
    uniform: the shared prefill, the repeated cache, left padding, positions and rows leaving the batch are right.
    Greedy answers equal model.generate's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy).eval()
    prompts = [r["prompt"] for r in data.load_preferences(world["small"], cache_dir=world["cache"])][:5]
    ids = [data.encode_prompt(data.render_prompt(p, tok, True), tok, 64)[0] for p in prompts]
    assert len({len(x) for x in ids}) > 1  # padding is exercised
    seeds = [[models.draw_seed(7, r, k) for k in range(3)] for r in range(len(ids))]
    eos = models.eos_token_ids(model, tok)
    out = models.sample(model, ids, seeds, 20, 0.8, 0.95, eos, tok.pad_token_id)
    lengths = []
    with torch.no_grad():
        for p, row in enumerate(out):
            assert len(row) == 3
            for k, (tokens, ended) in enumerate(row):
                u = torch.rand(20, generator=torch.Generator().manual_seed(seeds[p][k]))
                seq = list(ids[p])
                for t, y in enumerate(tokens):
                    logits = model(input_ids=torch.tensor([seq])).logits[:, -1]
                    assert y == int(models.nucleus_pick(logits, u[t:t + 1], 0.8, 0.95)), (p, k, t)
                    seq.append(y)
                assert ended == (tokens[-1] in eos) and (ended or len(tokens) == 20)
                assert not any(y in eos for y in tokens[:-1])
                lengths.append(len(tokens))
        assert len(set(lengths)) > 1  # rows left the batch at different steps
        greedy = models.sample(model, ids, [[0]] * len(ids), 20, 0, 1.0, eos, tok.pad_token_id)
        for p, row in enumerate(greedy):
            ref = model.generate(torch.tensor([ids[p]]), max_new_tokens=20, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=eos)[0, len(ids[p]):].tolist()
            assert row[0][0] == ref


# ---------------------------------------------------------------------------------------------------------------
# The pairs
# ---------------------------------------------------------------------------------------------------------------

def check_pairs(out, K, min_gap, rescore):
    pairs, samples = read(os.path.join(out, "pairs.jsonl")), read(os.path.join(out, "samples.jsonl"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["complete"] and manifest["summary"]["pairs"] == len(pairs) > 0
    by_row = {}
    for s in samples:
        by_row.setdefault(s["row"], []).append(s)
    assert all([s["sample"] for s in group] == list(range(K)) for group in by_row.values())  # K per prompt
    assert len(by_row) == manifest["summary"]["prompts"] and len(samples) == K * len(by_row)
    for pair in pairs:
        group = [s for s in by_row[pair["row"]] if s["ended"] and s["response"]]
        assert pair["chosen_score"] >= pair["rejected_score"] + min_gap and pair["chosen_score"] > pair[
            "rejected_score"]
        assert pair["chosen_score"] == max(s["score"] for s in group)
        assert pair["rejected_score"] == min(s["score"] for s in group)
        best = next(s for s in group if s["score"] == pair["chosen_score"])  # ties go to the earliest sample
        chosen = pair["chosen"][-1]["content"] if isinstance(pair["chosen"], list) else pair["chosen"]
        assert chosen == best["response"]
    prompts = [p["prompt"] for p in pairs]
    chosen = [p["chosen"][-1]["content"] if isinstance(p["chosen"], list) else p["chosen"] for p in pairs]
    rejected = [p["rejected"][-1]["content"] if isinstance(p["rejected"], list) else p["rejected"] for p in pairs]
    torch.testing.assert_close(rescore(prompts, chosen), [p["chosen_score"] for p in pairs], rtol=0, atol=1e-5)
    torch.testing.assert_close(rescore(prompts, rejected), [p["rejected_score"] for p in pairs], rtol=0, atol=1e-5)
    return pairs, manifest


def test_pairs_with_the_synthetic_judge_follow_the_rule(world, policy, tmp_path):
    out = str(tmp_path / "op")
    onpolicy.main(base(world, policy, out, min_gap=0.5, key_spans="tiny:synthetic_key_spans"))
    pairs, manifest = check_pairs(out, 5, 0.5, lambda ps, rs: [tiny.synthetic_reward(p, r) for p, r in zip(ps, rs)])
    assert all(p["chosen_key_spans"] == tiny.synthetic_key_spans(p["prompt"], p["chosen"]) for p in pairs)
    assert set(manifest["summary"]["dropped"]) <= {"tie", "gap below --min_gap", "fewer than 2 finished samples"}
    # the same folder with other pairing settings re-pairs the stored samples without sampling again
    before = os.path.getmtime(os.path.join(out, "blocks", "block_000000.jsonl"))
    onpolicy.main(base(world, policy, out, min_gap=0.0))
    assert os.path.getmtime(os.path.join(out, "blocks", "block_000000.jsonl")) == before
    more, _ = check_pairs(out, 5, 0.0, lambda ps, rs: [tiny.synthetic_reward(p, r) for p, r in zip(ps, rs)])
    assert len(more) >= len(pairs)


def test_pairs_with_a_reward_model_and_conversational_prompts(world, policy, reward_model, tmp_path):
    """A sequence-classification reward model scores (prompt, response) rendered with its own chat template;
    conversational prompts give conversational pairs, which train.py takes as they are."""
    conv = tmp_path / "conv.jsonl"
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}]} for r in read(world["small"])]
    conv.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = str(tmp_path / "op")
    onpolicy.main(base(world, policy, out, prompts=conv, reward=reward_model, num_samples=3, reward_batch_size=3))
    scorer = onpolicy.reward_model_scorer(reward_model, torch.device("cpu"), torch.float32, batch_size=7)
    pairs, _ = check_pairs(out, 3, 0.0, scorer)
    assert isinstance(pairs[0]["prompt"], list) and pairs[0]["chosen"][0]["role"] == "assistant"
    loaded = data.load_preferences(os.path.join(out, "pairs.jsonl"))
    assert len(loaded) == len(pairs)


def test_train_takes_the_pairs(world, policy, tmp_path):
    out = str(tmp_path / "op")
    onpolicy.main(base(world, policy, out, max_prompts=48))
    run = tmp_path / "dpo"
    train.main(flags(method="dpo", model=policy, data=os.path.join(out, "pairs.jsonl"), output_dir=run,
                     cache_dir=world["cache"], global_batch_size=4, micro_batch_size=2, max_steps=2, save_every=0,
                     judge="none", max_length=128, max_prompt_length=64))
    lines = [m for m in read(run / "metrics.jsonl") if m["split"] == "train"]
    assert lines and all(torch.isfinite(torch.tensor(m["loss"])) for m in lines)


# ---------------------------------------------------------------------------------------------------------------
# Runs like score.py: 2 ranks, kill -9, the same bytes; batch and block sizes change nothing
# ---------------------------------------------------------------------------------------------------------------

def test_two_ranks_and_other_batches_give_the_same_bytes(world, policy, tmp_path):
    one, two, other = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "other")
    proc = command(base(world, policy, one), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = command(base(world, policy, two), tmp_path, n=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert outputs(one) == outputs(two)
    onpolicy.main(base(world, policy, other, batch_size=2, block_size=5))  # other batches and blocks: same texts
    assert outputs(one) == outputs(other)


def test_kill_then_resume_gives_the_same_bytes(world, policy, tmp_path):
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    argv = base(world, policy, killed, max_prompts=80, block_size=4, batch_size=1)
    done = killed_after_blocks("onpolicy.py", argv, killed, 3, tmp_path)
    assert 3 <= done < 20 and not json.load(open(os.path.join(killed, "manifest.json")))["complete"]
    proc = command(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    onpolicy.main(base(world, policy, full, max_prompts=80, block_size=4, batch_size=1))
    assert outputs(full) == outputs(killed)
    # a block cut short and another holding garbage are named and sampled again (other pairing settings: a merge)
    blocks = sorted(os.listdir(os.path.join(killed, "blocks")))
    path1, path2 = (os.path.join(killed, "blocks", blocks[i]) for i in (1, 2))
    lines = open(path1).read().splitlines()
    open(path1, "w").write("\n".join(lines[:3]) + "\n")
    open(path2, "w").write("garbage\n")
    proc = command(base(world, policy, killed, max_prompts=80, block_size=4, batch_size=1, min_gap=0.25), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for path in (path1, path2):
        assert f"warning: {path} is damaged (not the samples of its prompts); sampling it again" in proc.stdout
    assert outputs(full)["samples.jsonl"] == outputs(killed)["samples.jsonl"]


# ---------------------------------------------------------------------------------------------------------------
# --samples: samples drawn elsewhere (vLLM), scored and paired as the policy's own
# ---------------------------------------------------------------------------------------------------------------

def without(argv, *names):
    """argv without the flags named (each with its value)."""
    drop = {i for i, a in enumerate(argv) if a in names} | {i + 1 for i, a in enumerate(argv) if a in names}
    return [a for i, a in enumerate(argv) if i not in drop]


def as_samples_file(samples, path, keep=("ended", "n_tokens")):
    """onpolicy.py's samples.jsonl in the --samples format: row, sample, text (and the optional fields kept)."""
    lines = [{"row": s["row"], "sample": s["sample"], "text": s["response"], **{k: s[k] for k in keep}}
             for s in samples]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def test_samples_from_elsewhere_give_the_same_pairs(world, policy, tmp_path, monkeypatch):
    """The policy's own samples, written in the --samples format and given back: the same pairs.jsonl, byte for
    byte, and the same summary, without the policy ever loading; without n_tokens (counted with the tokenizer) and
    ended (true unless said), the pairs are still the same. The identity holds the file's fingerprint, not the
    sampling settings."""
    own, elsewhere, counted = str(tmp_path / "own"), str(tmp_path / "elsewhere"), str(tmp_path / "counted")
    onpolicy.main(base(world, policy, own, max_prompts=16))
    samples = read(os.path.join(own, "samples.jsonl"))
    given = as_samples_file(samples, tmp_path / "given.jsonl")
    import transformers
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("the policy loaded with --samples"))
    onpolicy.main(without(base(world, policy, elsewhere, max_prompts=16, samples=given), "--max_new_tokens"))
    assert open(os.path.join(own, "pairs.jsonl"), "rb").read() == open(os.path.join(elsewhere, "pairs.jsonl"),
                                                                        "rb").read()
    assert outputs(own) == outputs(elsewhere)
    mine, theirs = (json.load(open(os.path.join(d, "manifest.json"))) for d in (own, elsewhere))
    assert mine["summary"] == theirs["summary"]
    assert theirs["identity"]["samples"] and not {"temperature", "seed", "policy"} & set(theirs["identity"])
    assert theirs["paths"]["samples"] == given
    bare = as_samples_file(samples, tmp_path / "bare.jsonl", keep=() if all(s["ended"] for s in samples) else
                           ("ended",))  # ended: true unless said
    onpolicy.main(without(base(world, policy, counted, max_prompts=16, samples=bare), "--max_new_tokens"))
    assert open(os.path.join(own, "pairs.jsonl"), "rb").read() == open(os.path.join(counted, "pairs.jsonl"),
                                                                        "rb").read()
    tok = transformers.AutoTokenizer.from_pretrained(policy)
    for s, c in zip(samples, read(os.path.join(counted, "samples.jsonl"))):
        assert c["n_tokens"] == len(tok(s["response"], add_special_tokens=False)["input_ids"]) + s["ended"]


def test_a_bad_samples_file_is_one_line(world, policy, tmp_path, capsys):
    """A row missing, a (row, sample) twice, a field of the wrong type, a count per row other than --num_samples, a
    row that is no prompt's, a sampling flag beside --samples: one line each, naming the file, the line and the
    field, and nothing written."""
    import utils
    K = 3
    good = [{"row": r, "sample": k, "text": f"Sure. {r + k}."} for r in range(4) for k in range(K)]
    out = str(tmp_path / "out")

    def go(lines, **kw):
        path = tmp_path / "given.jsonl"
        path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
        capsys.readouterr()
        argv = without(base(world, policy, out, max_prompts=4, num_samples=K, samples=path, **kw), "--max_new_tokens")
        code = utils.cli(onpolicy.main, argv)
        return Said(code, capsys.readouterr().err)
    one_line(go(good[3:]), "given.jsonl, field 'sample': row 0 has 0 samples, --num_samples is 3")
    one_line(go(good[:4] + good[5:]), "given.jsonl, field 'sample': row 1 has 2 samples (lines 4, 5), "
             "--num_samples is 3")
    one_line(go(good + [good[4]]), "given.jsonl line 13, field 'sample': row 1, sample 1 again (line 5 has it)")
    one_line(go(good[:2] + [{**good[2], "text": 3}] + good[3:]), "given.jsonl line 3, field 'text': must be text")
    one_line(go(good[:2] + [{**good[2], "ended": "yes"}] + good[3:]), "line 3, field 'ended': must be true or false")
    one_line(go(good[:2] + [{**good[2], "n_tokens": 2.5}] + good[3:]), "line 3, field 'n_tokens': must be a count")
    one_line(go(good[:2] + [{k: v for k, v in good[2].items() if k != "row"}] + good[3:]),
             "line 3, field 'row': missing (an integer: the prompt's row in --prompts)")
    one_line(go(good + [{"row": 9, "sample": 0, "text": "x"}]), "line 13, field 'row': 9 is not the row of a prompt")
    one_line(go(good[:1] + [{"row": 0, "sample": 3, "text": "x"}]), "line 2, field 'sample': must be an integer in "
             "0..2 (--num_samples 3)")
    one_line(go(good[:1] + ["{not json"]), "given.jsonl line 2: not valid JSON")
    one_line(go(good, temperature=0.5, seed=1), "--temperature, --seed: no effect with --samples", code=2)
    assert not os.path.exists(out)


# ---------------------------------------------------------------------------------------------------------------
# Mistakes: one line each, before any model loads where possible
# ---------------------------------------------------------------------------------------------------------------

def killed_after_blocks(script, argv, out, n, cwd):
    """`script argv` killed with SIGKILL once out/blocks holds n finished blocks -> the blocks it had finished."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, script), *argv], env=ENV, cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    blocks = os.path.join(out, "blocks")
    finished = lambda: [f for f in os.listdir(blocks) if f.endswith(".jsonl")] if os.path.isdir(blocks) else []  # noqa
    deadline = time.time() + 240
    while time.time() < deadline and len(finished()) < n:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return len(finished())


def one_line(proc, match, code=1):
    """A command's one error line (exit code 1, or 2 for a flag's value refused before anything runs)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == code and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert match in lines[0], lines[0]
    return lines[0]


class Said:
    """What utils.cli made of a command run in this process: its exit code and what it printed to stderr."""

    def __init__(self, returncode, stderr):
        self.returncode, self.stderr = returncode, stderr


def test_every_mistake_is_one_line(world, policy, reward_model, tmp_path, capsys):
    """One mistake through the real command line; the others through utils.cli in this process (the same path,
    without a process start each)."""
    import utils
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification
    one_line(command(base(world, policy, str(tmp_path / "out"), reward="nosuchmodule:score"), tmp_path),
             "cannot import nosuchmodule")

    def go(**kw):
        capsys.readouterr()
        code = utils.cli(onpolicy.main, base(world, policy, str(tmp_path / "out"), **kw))
        return Said(code, capsys.readouterr().err)
    one_line(go(reward="tiny:no_such_function"), "tiny has no function no_such_function")
    one_line(go(num_samples=1), "at least 2 samples", code=2)
    one_line(go(prompts=str(tmp_path / "missing.jsonl")), "does not exist")
    two = str(tmp_path / "two_outputs")
    LlamaForSequenceClassification(LlamaConfig(vocab_size=700, hidden_size=16, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2,
                                               num_labels=2)).save_pretrained(two)
    one_line(go(reward=two), "has 2 outputs")
    one_line(go(reward=policy), "not a sequence-classification reward model")
    damaged = str(tmp_path / "damaged")
    shutil.copytree(reward_model, damaged)
    with open(os.path.join(damaged, "model.safetensors"), "r+b") as fh:
        fh.truncate(100)
    one_line(go(reward=damaged), "could not be loaded")
    no_template = str(tmp_path / "no_template")
    shutil.copytree(policy, no_template)
    tok = AutoTokenizer.from_pretrained(no_template)
    tok.chat_template = None
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if os.path.exists(os.path.join(no_template, name)):
            os.remove(os.path.join(no_template, name))
    tok.save_pretrained(no_template)
    conv = tmp_path / "conv.jsonl"
    conv.write_text(json.dumps({"prompt": [{"role": "user", "content": "Add 2 and 3."}]}) + "\n")
    one_line(go(model=no_template, prompts=conv), "has no chat template")
    assert not os.path.exists(tmp_path / "out")  # no failed start left a folder behind
    # a callable that fails on a sample, or gives a score that is not finite, names the sample
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def boom(prompt, response):\n    raise ValueError('no opinion')\n\n\n"
                       "def nan(prompt, response):\n    return float('nan')\n")
    one_line(go(reward=f"{rewards}:boom", output_dir=str(tmp_path / "boom")),
             f"--reward {rewards}:boom failed on row 0, sample 0 (")
    one_line(go(reward=f"{rewards}:nan", output_dir=str(tmp_path / "nan")),
             f"--reward {rewards}:nan gave nan for row 0, sample 0 (")


def test_the_default_run_is_the_tiny_world_offline(world, policy, tmp_path, capsys):
    """`python onpolicy.py` with no arguments (here shortened): the tiny world's SFT model, its training prompts,
    its judge and its key spans, offline; it says where the pairs went."""
    out = tmp_path / "default"
    onpolicy.main(["--tiny_world", os.path.dirname(world["data"]), "--output_dir", str(out), "--max_prompts", "16",
                   "--cache_dir", world["cache"]])
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["paths"]["reward"] == "tiny:synthetic_reward" and manifest["pairing"]["key_spans"]
    assert manifest["paths"]["model"].endswith("llama-small-sft") and manifest["summary"]["prompts"] == 16
    assert all("chosen_key_spans" in p for p in read(out / "pairs.jsonl"))
    assert f"wrote {out / 'pairs.jsonl'}" in capsys.readouterr().out
