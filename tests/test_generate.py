"""generate.py on the tiny world: each benchmark's answer file holds exactly the fields and types its tool reads
(AlpacaEval, Arena-Hard's gen_answer.py, FastChat's gen_model_answer.py), MT-Bench's second turn follows the first
answer and each category its temperature, kill -9, 2 ranks and another batch size against an uninterrupted run
(bytes), --reward's mean, every mistake in one line; and --config in YAML (utils.parse_dataclass)."""

import json
import os
import subprocess
import sys

import pytest

import generate
import tiny
import train
import utils
from test_onpolicy import killed_after_blocks

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("DEBUG", None)
CATEGORIES = ["writing", "math", "stem", "roleplay", "coding", "humanities", "reasoning", "extraction", "unlisted"]


def prompts_of(world, n):
    with open(world["test"]) as fh:
        return [json.loads(line)["prompt"] for line, _ in zip(fh, range(n))]


def questions(world, tmp_path, benchmark, n=6):
    """A small question file in the benchmark's own format, from the tiny world's held-out prompts."""
    texts = prompts_of(world, n)
    if benchmark == "alpaca_eval":  # a JSON list, as alpaca_eval's own evaluation set
        path = tmp_path / "alpaca_eval.json"
        path.write_text(json.dumps([{"instruction": p, "dataset": "tiny"} for p in texts]))
        return str(path)
    if benchmark == "arena_hard":
        rows = [{"question_id": f"{i:032x}", "category": "arena-hard-v0.1", "cluster": "tiny",
                 "turns": [{"content": p}]} for i, p in enumerate(texts)]
    else:
        rows = [{"question_id": 81 + i, "category": CATEGORIES[i % len(CATEGORIES)],
                 "turns": [p, "Say that again in fewer words."]} for i, p in enumerate(texts)]
    path = tmp_path / f"{benchmark}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def flags(**kw):
    return [x for k, v in kw.items() for x in (f"--{k}", str(v))]


def base(world, policy, benchmark, prompts, out, **extra):
    return flags(**{"model": policy, "benchmark": benchmark, "prompts": prompts, "max_new_tokens": 24,
                    "max_prompt_length": 128, "batch_size": 4, "block_size": 4, "output_dir": out,
                    "cache_dir": world["cache"], "device": "cpu", **extra})


def read_jsonl(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def answer_file(out):
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    return os.path.join(out, manifest["output"]["file"])


def command(argv, cwd, n=0, timeout=300):
    runner = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n else \
        [sys.executable]
    return subprocess.run(runner + [os.path.join(HERE, "generate.py"), *argv], env=ENV, cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Each benchmark's file, as its tool reads it
# ---------------------------------------------------------------------------------------------------------------

def test_alpaca_eval_and_prompts_files(world, policy, tmp_path):
    """AlpacaEval: a JSON list of {instruction, output, generator, dataset}, in the questions' order; prompts: JSONL
    of {prompt, response, row, n_tokens, ended}."""
    src = questions(world, tmp_path, "alpaca_eval")
    out = str(tmp_path / "ae")
    generate.main(base(world, policy, "alpaca_eval", src, out))
    outputs = json.load(open(os.path.join(out, "model_outputs.json")))
    assert isinstance(outputs, list) and [o["instruction"] for o in outputs] == prompts_of(world, 6)
    for o in outputs:
        assert set(o) == {"instruction", "output", "generator", "dataset"} and o["generator"] == "llama-small-sft"
        assert all(isinstance(o[k], str) for k in o) and o["output"] == o["output"].strip()
    summary = json.load(open(os.path.join(out, "manifest.json")))["summary"]
    assert summary["questions"] == summary["answers"] == 6 and "mean_reward" not in summary
    assert json.load(open(os.path.join(out, "manifest.json")))["identity"]["decoding"] == {
        "temperature": 0.9, "top_p": 1.0, "max_new_tokens": 24}  # AlpacaEval's defaults, one overridden
    out = str(tmp_path / "pr")
    generate.main(base(world, policy, "prompts", world["test"], out, max_prompts=5))
    lines = read_jsonl(os.path.join(out, "answers.jsonl"))
    assert [line["row"] for line in lines] == list(range(5))
    for line in lines:
        assert set(line) == {"prompt", "response", "row", "n_tokens", "ended"}
        assert isinstance(line["response"], str) and isinstance(line["n_tokens"], int)
        assert isinstance(line["ended"], bool)


def test_arena_hard_file(world, policy, tmp_path):
    """Arena-Hard's gen_answer.py line: question_id, answer_id, model_id, choices [{index 0, turns [{content,
    token_len}]}], tstamp, at model_answer/<generator>.jsonl; answer ids stable and distinct; another --generator
    writes the stored answers again under its name, answering nothing again."""
    src = questions(world, tmp_path, "arena_hard")
    out = str(tmp_path / "ah")
    generate.main(base(world, policy, "arena_hard", src, out))
    lines = read_jsonl(os.path.join(out, "model_answer", "llama-small-sft.jsonl"))
    assert [line["question_id"] for line in lines] == [f"{i:032x}" for i in range(6)]
    for line in lines:
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["model_id"] == "llama-small-sft" and line["tstamp"] == 0
        assert isinstance(line["answer_id"], str) and len(line["answer_id"]) == 22
        [choice] = line["choices"]
        assert set(choice) == {"index", "turns"} and choice["index"] == 0 and len(choice["turns"]) == 1
        turn = choice["turns"][0]
        assert set(turn) == {"content", "token_len"} and isinstance(turn["content"], str)
        assert isinstance(turn["token_len"], int) and 0 <= turn["token_len"] <= 24
    assert len({line["answer_id"] for line in lines}) == 6
    block = os.path.join(out, "blocks", "block_000000.jsonl")
    before = os.path.getmtime(block)
    generate.main(base(world, policy, "arena_hard", src, out, generator="confpo-tiny"))
    assert os.path.getmtime(block) == before  # nothing answered again
    assert os.listdir(os.path.join(out, "model_answer")) == ["confpo-tiny.jsonl"]
    again = read_jsonl(os.path.join(out, "model_answer", "confpo-tiny.jsonl"))
    assert [a["choices"] for a in again] == [line["choices"] for line in lines]
    assert all(a["model_id"] == "confpo-tiny" for a in again)


def test_mt_bench_file_turns_and_temperatures(world, policy, tmp_path):
    """FastChat's gen_model_answer.py line: choices [{index 0, turns [text, text]}]. The second turn's prompt holds
    the first question, the model's first answer and the second question, through the chat template; each category
    has FastChat's temperature (greedy ones answer as --temperature 0 does)."""
    src = questions(world, tmp_path, "mt_bench", n=9)
    out, greedy = str(tmp_path / "mt"), str(tmp_path / "mt0")
    generate.main(base(world, policy, "mt_bench", src, out))
    lines = read_jsonl(os.path.join(out, "model_answer", "llama-small-sft.jsonl"))
    assert [line["question_id"] for line in lines] == list(range(81, 90))
    for line in lines:
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        [choice] = line["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 2 and all(isinstance(t, str) for t in choice["turns"])
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert manifest["identity"]["decoding"]["temperature"] == generate.MT_BENCH_TEMPERATURES
    assert manifest["summary"]["answers"] == 18
    generate.main(base(world, policy, "mt_bench", src, greedy, temperature=0))
    zero = read_jsonl(os.path.join(greedy, "model_answer", "llama-small-sft.jsonl"))
    for i, (a, b) in enumerate(zip(lines, zero)):
        if generate.MT_BENCH_TEMPERATURES.get(CATEGORIES[i], 0.7) == 0:
            assert a["choices"] == b["choices"], CATEGORIES[i]
    assert [a["choices"] for a in lines] != [b["choices"] for b in zero]  # the sampled categories were sampled
    # the second turn's prompt, as rendered
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(policy)
    q = {"turns": ["first question", "second question"]}
    messages = generate.conversation(q, ["first answer"], 1)
    assert messages == [{"role": "user", "content": "first question"},
                        {"role": "assistant", "content": "first answer"},
                        {"role": "user", "content": "second question"}]
    import data
    text = data.render_prompt(messages, tok, True)
    assert text.index("first question") < text.index("first answer") < text.index("second question")
    assert generate.conversation(q, [], 0) == "first question"


# ---------------------------------------------------------------------------------------------------------------
# Runs like onpolicy.py: kill -9, 2 ranks and other batches give the same bytes
# ---------------------------------------------------------------------------------------------------------------

def test_two_ranks_and_another_batch_size_give_the_same_bytes(world, policy, tmp_path):
    src = questions(world, tmp_path, "mt_bench", n=12)
    one, two, other = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "other")
    generate.main(base(world, policy, "mt_bench", src, one))
    proc = command(base(world, policy, "mt_bench", src, two), tmp_path, n=2)
    assert proc.returncode == 0, proc.stderr[-2000:]
    generate.main(base(world, policy, "mt_bench", src, other, batch_size=1))
    first = open(answer_file(one), "rb").read()
    assert first == open(answer_file(two), "rb").read() == open(answer_file(other), "rb").read()


def test_kill_then_resume_gives_the_same_bytes(world, policy, tmp_path):
    src = questions(world, tmp_path, "alpaca_eval", n=60)
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    argv = base(world, policy, "alpaca_eval", src, killed, batch_size=1)
    done = killed_after_blocks("generate.py", argv, killed, 3, tmp_path)
    assert 3 <= done < 15 and not json.load(open(os.path.join(killed, "manifest.json")))["complete"]
    proc = command(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    generate.main(base(world, policy, "alpaca_eval", src, full, batch_size=1))
    expected = open(answer_file(full), "rb").read()
    assert open(answer_file(killed), "rb").read() == expected
    # a block holding garbage is named and answered again
    damaged = os.path.join(killed, "blocks", "block_000002.jsonl")
    open(damaged, "w").write("garbage\n")
    manifest = json.load(open(os.path.join(killed, "manifest.json")))
    open(os.path.join(killed, "manifest.json"), "w").write(json.dumps({**manifest, "complete": False}))
    proc = command(argv, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"warning: {damaged} is damaged (not the answers of its questions); answering it again" in proc.stdout
    assert open(answer_file(killed), "rb").read() == expected


# ---------------------------------------------------------------------------------------------------------------
# --reward
# ---------------------------------------------------------------------------------------------------------------

def test_reward_reports_its_mean(world, policy, tmp_path, capsys):
    """Each answer scored locally: the summary's mean reward is the mean of the reward over the written answers; a
    later turn's prompt reaches the reward as the conversation so far."""
    src = questions(world, tmp_path, "alpaca_eval", n=8)
    out = str(tmp_path / "ae")
    capsys.readouterr()
    generate.main(base(world, policy, "alpaca_eval", src, out, reward="tiny:synthetic_reward"))
    outputs = json.load(open(os.path.join(out, "model_outputs.json")))
    summary = json.load(open(os.path.join(out, "manifest.json")))["summary"]
    rewards = [tiny.synthetic_reward(o["instruction"], o["output"]) for o in outputs]
    assert summary["mean_reward"] == pytest.approx(sum(rewards) / len(rewards))
    assert f"mean reward {summary['mean_reward']:.3f}" in capsys.readouterr().out
    assert 0 <= summary["ended"] <= 1 and summary["mean_tokens"] > 0
    reward = tmp_path / "turns.py"
    reward.write_text("def score(prompt, response):\n"
                      "    return float(len(prompt)) if isinstance(prompt, list) else 0.5\n")
    src = questions(world, tmp_path, "mt_bench", n=4)
    out = str(tmp_path / "mt")
    generate.main(base(world, policy, "mt_bench", src, out, reward=f"{reward}:score"))
    summary = json.load(open(os.path.join(out, "manifest.json")))["summary"]
    assert summary["answers"] == 8 and summary["mean_reward"] == pytest.approx((4 * 0.5 + 4 * 3.0) / 8)


# ---------------------------------------------------------------------------------------------------------------
# Mistakes: one line each, nothing left behind
# ---------------------------------------------------------------------------------------------------------------

def one_line(code, err, match, expected=1):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == expected and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert match in lines[0], lines[0]
    return lines[0]


def test_every_mistake_is_one_line(world, policy, tmp_path, capsys):
    proc = command(["--benchmark", "alpaca_evl"], tmp_path)  # through the real command line, before torch loads
    one_line(proc.returncode, proc.stderr, "did you mean alpaca_eval", expected=2)
    out = str(tmp_path / "out")

    def go(benchmark, rows=None, text=None, where=out, **kw):
        path = tmp_path / f"q_{benchmark}.jsonl"
        if rows is not None or text is not None:
            path.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))
        capsys.readouterr()
        got = utils.cli(generate.main, base(world, policy, benchmark, str(path), where, **kw))
        return got, capsys.readouterr().err

    ok = {"question_id": 1, "category": "math", "turns": ["Add 2 and 3.", "And 4?"]}
    q = "q_mt_bench.jsonl"
    one_line(*go("alpaca_eval", [{"prompt": "Add 2 and 3."}]), "q_alpaca_eval.jsonl row 0 (line 1), field "
             "'instruction': missing")
    one_line(*go("alpaca_eval", [{"instruction": "Add 2 and 3."}, {"instruction": 7}]),
             "row 1 (line 2), field 'instruction': must be the instruction, non-empty text, got 7")
    one_line(*go("alpaca_eval", text='[{"instruction": "Add 2 and 3.", "dataset": 3}]'),
             "q_alpaca_eval.jsonl row 0, field 'dataset': must be text")
    one_line(*go("arena_hard", [{"turns": [{"content": "Add 2 and 3."}]}]), "field 'question_id': missing")
    one_line(*go("arena_hard", [{"question_id": "a", "turns": ["Add 2 and 3."]}]),
             "field 'turns', turn 0: a str, not an object with field 'content'")
    one_line(*go("mt_bench", [ok, {**ok, "turns": "Add 2 and 3."}]), f"{q} row 1 (line 2), field 'turns': must be "
             "a list of turns")
    one_line(*go("mt_bench", [{**ok, "turns": ["Add 2 and 3.", {"content": "x"}]}]), "field 'turns': turn 1 must "
             "be non-empty text")
    one_line(*go("mt_bench", [{k: v for k, v in ok.items() if k != "category"}]), "field 'category': missing")
    one_line(*go("mt_bench", [ok, ok]), f"{q} row 1 (line 2), field 'question_id': 1 again (row 0 has it)")
    one_line(*go("mt_bench", text=json.dumps(ok) + "\n{not json\n"), f"{q} line 2: not valid JSON")
    one_line(*go("mt_bench", [{**ok, "question_id": True}]), "field 'question_id': must be a string or an integer")
    one_line(*go("mt_bench", [ok], generator="a/b"), "--generator 'a/b': must be a file name")
    one_line(*go("mt_bench", [ok], top_p=0), "--top_p 0.0: must lie in (0, 1]", expected=2)
    capsys.readouterr()
    code = utils.cli(generate.main, flags(model=policy, benchmark="arena_hard", output_dir=out, device="cpu"))
    one_line(code, capsys.readouterr().err, "generate.py --benchmark arena_hard needs --prompts")
    unbuilt = tmp_path / "no_world"  # without --model either: said before the tiny world is built
    code = utils.cli(generate.main, flags(benchmark="mt_bench", tiny_world=str(unbuilt), output_dir=out, device="cpu"))
    one_line(code, capsys.readouterr().err, "generate.py --benchmark mt_bench needs --prompts")
    assert not unbuilt.exists()
    code = utils.cli(generate.main, base(world, policy, "mt_bench", str(tmp_path / "none.jsonl"), out))
    one_line(code, capsys.readouterr().err, "none.jsonl: no such file")
    assert not os.path.exists(out)  # no failed start left a folder behind
    # a reward that fails on an answer names it (here the tiny judge, given MT-Bench's second turn: a conversation)
    one_line(*go("mt_bench", [ok], where=str(tmp_path / "scored"), reward="tiny:synthetic_reward"),
             "--reward tiny:synthetic_reward failed on row 0, turn 1 (its prompt a conversation, a list of messages) "
             "(TypeError")


def test_the_default_run_is_the_tiny_world_offline(world, policy, tmp_path, capsys):
    """`python generate.py --benchmark prompts` (here shortened): the tiny world's SFT model, its held-out prompts
    and its judge, offline; it says where the answers went."""
    out = tmp_path / "default"
    capsys.readouterr()
    generate.main(["--tiny_world", os.path.dirname(world["data"]), "--output_dir", str(out), "--max_prompts", "12",
                   "--cache_dir", world["cache"], "--benchmark", "prompts"])
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["paths"]["reward"] == "tiny:synthetic_reward" and manifest["summary"]["questions"] == 12
    assert manifest["paths"]["model"].endswith("llama-small-sft") and "mean_reward" in manifest["summary"]
    lines = read_jsonl(out / "answers.jsonl")
    assert all(line["score"] == tiny.synthetic_reward(line["prompt"], line["response"]) for line in lines)
    assert f"wrote {out / 'answers.jsonl'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# --config in YAML
# ---------------------------------------------------------------------------------------------------------------

def test_config_in_yaml_is_read_and_checked_as_json_is(tmp_path, capsys, monkeypatch):
    """A .yaml / .yml --config gives the same config as the same fields in JSON (1e-6, which YAML 1.1 reads as
    text, is the number); a bad value gets the flag's own refusal; without PyYAML, one line says how to get it."""
    fields = {"method": "dpo", "lr": 1e-6, "beta": 0.2, "max_steps": 3, "judge": "none"}
    (tmp_path / "c.json").write_text(json.dumps(fields))
    (tmp_path / "c.yaml").write_text("method: dpo\nlr: 1e-6   # YAML 1.1: text\nbeta: 0.2\nmax_steps: 3\n"
                                     "judge: none\n")
    (tmp_path / "c.yml").write_text("{method: dpo, lr: 1.0e-6, beta: 0.2, max_steps: 3, judge: none}\n")
    from_json = train.parse_config(["--config", str(tmp_path / "c.json")])
    assert from_json[0].lr == 1e-6 and from_json[0].method == "dpo"
    for name in ("c.yaml", "c.yml"):
        assert train.parse_config(["--config", str(tmp_path / name)]) == from_json
    assert train.parse_config(["--config", str(tmp_path / "c.yaml"), "--beta", "0.3"])[0].beta == 0.3  # flags win

    def refusal(argv):
        capsys.readouterr()
        code = utils.cli(train.parse_config, argv)
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(lines) == 1, lines
        return lines[0]
    (tmp_path / "bad.yaml").write_text("dtype: fp16\n")
    assert refusal(["--config", str(tmp_path / "bad.yaml")]) == refusal(["--dtype", "fp16"])
    (tmp_path / "bad.yaml").write_text("lr: -1.0\n")
    assert refusal(["--config", str(tmp_path / "bad.yaml")]) == refusal(["--lr", "-1.0"])
    (tmp_path / "bad.yaml").write_text("max_stpes: 3\n")
    assert "unknown field 'max_stpes'; did you mean max_steps?" in refusal(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad.yaml").write_text("method: [dpo\n")
    assert "not valid YAML" in refusal(["--config", str(tmp_path / "bad.yaml")])
    (tmp_path / "bad.yaml").write_text("- dpo\n")
    assert "must hold a mapping" in refusal(["--config", str(tmp_path / "bad.yaml")])
    monkeypatch.setitem(sys.modules, "yaml", None)  # PyYAML missing: imported only for a YAML file
    assert "pip install pyyaml" in refusal(["--config", str(tmp_path / "c.yaml")])
    assert train.parse_config(["--config", str(tmp_path / "c.json")]) == from_json
