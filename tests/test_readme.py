"""The README stays true: every link of its equation map lands on the commented line that computes that equation,
and every file the README's file table names exists."""

import os
import re

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
LINK = re.compile(r"\[`(\w+\.py):(\d+)`\]\((\w+\.py)#L(\d+)\)")


def readme():
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as fh:
        return fh.read()


def expected_labels(first_cell):
    """"Eq. 3-4 (DPO)" -> {"Eq. 3", "Eq. 4"}; "Eq. 13" -> {"Eq. 13"}; a method name such as "SLiC-HF" -> itself."""
    m = re.match(r"Eq\. (\d+)(?:-(\d+))?", first_cell)
    if not m:
        return {first_cell}
    lo, hi = int(m[1]), int(m[2] or m[1])
    return {f"Eq. {k}" for k in range(lo, hi + 1)}


def names(line, label):
    """label appears on the line, as a whole equation number ("Eq. 1" does not match "Eq. 13")."""
    return re.search(re.escape(label) + (r"(?!\d)" if label.startswith("Eq.") else ""), line) is not None


def test_equation_links_land_on_their_lines():
    rows = [line for line in readme().splitlines() if line.startswith("|") and LINK.search(line)]
    assert len(rows) >= 20, "the equation map has lost its links"
    for row in rows:
        labels = expected_labels(row.split("|")[1].strip())
        for name, n, target, n2 in LINK.findall(row):
            assert name == target and n == n2, row
            with open(os.path.join(HERE, name), encoding="utf-8") as fh:
                lines = fh.read().splitlines()
            line = lines[int(n) - 1] if int(n) <= len(lines) else ""
            found = [i + 1 for i, text in enumerate(lines) if "#" in text and any(names(text, lb) for lb in labels)]
            assert "#" in line and any(names(line, lb) for lb in labels), (
                f"README links {name}:{n} for {sorted(labels)}, but that line is {line.strip()!r}; "
                f"lines of {name} naming it: {found}")


def test_files_in_the_file_table_exist():
    table = readme().split("## Files", 1)[1].split("\n\n", 2)[1]
    named = re.findall(r"^\| `([\w.-]+\.(?:py|txt))` \|", table, flags=re.M)
    assert len(named) >= 10
    for name in named:
        assert os.path.exists(os.path.join(HERE, name)), name


def readme_commands():
    """(script, argv) of every `python X.py ...` and `torchrun ... X.py ...` in the README's shell blocks, with
    continuation lines joined and comments dropped; a placeholder value `...` becomes `x`, a trailing `...` (the
    rest of the flags) goes."""
    import shlex
    blocks = re.findall(r"```bash\n(.*?)```", readme(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].strip() if line.lstrip().startswith("#") else line.split(" #")[0].strip()
            for part in line.split("&"):  # `python a.py & python b.py & wait`
                tokens = shlex.split(part)
                scripts = [i for i, t in enumerate(tokens) if t.endswith(".py") and not t.startswith("-")]
                if not scripts or tokens[0] not in ("python", "torchrun") or tokens[1:2] == ["-m"]:
                    continue  # `python -m pytest ...` runs a module, not one of the scripts
                argv = tokens[scripts[0] + 1:]
                while argv and argv[-1] == "...":  # "and the rest of the flags"
                    argv.pop()
                argv = [("x" if i > 0 and argv[i - 1].startswith("--") else None) if t == "..." else t
                        for i, t in enumerate(argv)]
                commands.append((tokens[scripts[0]], [t for t in argv if t is not None]))
    return commands


def test_every_readme_command_parses_with_the_real_flags():
    import bench
    import data
    import experiments
    import onpolicy
    import real_study
    import score
    import sepo_pipeline
    import tiny
    import train
    parse = {"train.py": lambda a: train.resolve(*train.parse_config(a)), "score.py": score.parse_config,
             "sepo_pipeline.py": sepo_pipeline.parse_config, "experiments.py": experiments.parse_config,
             "data.py": data.command_line().parse_args, "tiny.py": tiny.command_line().parse_args,
             "bench.py": bench.command_line().parse_args, "onpolicy.py": onpolicy.parse_config,
             "real_study.py": real_study.parse_config}
    commands = readme_commands()
    assert len(commands) >= 15 and {script for script, _ in commands} >= set(parse) - {"tiny.py"}
    for script, argv in commands:
        parse[script](argv)  # raises (SystemExit) on a flag the script does not have


def section(heading):
    """The README's text from a heading to the next heading of the same or a higher level."""
    text = readme()
    level = heading.split(" ")[0]
    body = text.split(heading + "\n", 1)[1]
    stops = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), body, flags=re.M)]
    return body[:stops[0]] if stops else body


def unquoted(text, sources):
    """The decimal numbers of text that no source holds (each as a whole number there, not inside another)."""
    joined = "\n".join(open(os.path.join(HERE, p), encoding="utf-8").read() for p in sources)
    return [n for n in re.findall(r"(?<![\w.])[+-]?\d+\.\d+", text)
            if not re.search(r"(?<![\d.])" + re.escape(n) + r"(?![\d])", joined)]


def test_protocol_numbers_come_from_their_results_files():
    text = section("### The papers' protocols, in a world with headroom")
    assert len(re.findall(r"\d+\.\d+", text)) > 100
    assert unquoted(text, ["docs/experiments/base/results.md", "docs/experiments/instruct/results.md"]) == []


def test_real_study_numbers_come_from_its_results_file():
    text = section("### What it shows")
    assert len(re.findall(r"\d+\.\d+", text)) > 50
    assert unquoted(text, ["docs/real/results.md"]) == []
