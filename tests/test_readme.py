"""The README and the pages of docs/ stay true: every link of an equation map lands on the commented line that
computes that equation; every file the README's layout table names exists; every command they show parses with the
script's real flags; every number of a results section is in its results file; every relative link resolves; and
the README stays a door (at most 300 lines) that links every page of docs/."""

import contextlib
import glob
import io
import json
import os
import re
import shlex
import subprocess

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
# [`sepo.py:29`](sepo.py#L29) in the README, [`sepo.py:29`](../sepo.py#L29) in a page of docs/
LINK = re.compile(r"\[`([\w/]+\.py):(\d+)`\]\(((?:\.\./)*[\w/]+\.py)#L(\d+)\)")
NUMBER = re.compile(r"(?<![\w.])[+-]?\d+\.\d+")
MAX_README_LINES = 300


def read(page):
    with open(os.path.join(HERE, page), encoding="utf-8") as fh:
        return fh.read()


def readme():
    return read("README.md")


def pages():
    """README.md and every Markdown page of docs/ (the studies' results files are not pages)."""
    return ["README.md"] + sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "docs", "*.md")))


def section(text, heading):
    """A page's text from a heading to the next heading of the same or a higher level."""
    level = heading.split(" ")[0]
    assert heading + "\n" in text, f"no heading {heading!r}"
    body = text.split(heading + "\n", 1)[1]
    stops = [m.start() for m in re.finditer(r"^#{1,%d} " % len(level), body, flags=re.M)]
    return body[:stops[0]] if stops else body


# ---------------------------------------------------------------------------------------------------------------
# The equation maps
# ---------------------------------------------------------------------------------------------------------------

def expected_labels(cells):
    """The labels a row's links must name: from its first cell naming an equation ("Eq. 3-4 (DPO)" -> {"Eq. 3",
    "Eq. 4"}; "Eq. 13" -> {"Eq. 13"}), else its first cell (a method name such as "SLiC-HF")."""
    for cell in cells:
        m = re.match(r"Eq\. (\d+)(?:-(\d+))?", cell)
        if m:
            lo, hi = int(m[1]), int(m[2] or m[1])
            return {f"Eq. {k}" for k in range(lo, hi + 1)}
    return {cells[0]}


def names(line, label):
    """label appears on the line, as a whole equation number ("Eq. 1" does not match "Eq. 13")."""
    return re.search(re.escape(label) + (r"(?!\d)" if label.startswith("Eq.") else ""), line) is not None


def link_problems(row, page):
    """What is wrong with the equation links of one table row of `page` (a path from the root): each link's target,
    relative to the page's folder, must be the file its label names (from the root), at the same line, and that
    line must be a comment naming the row's equation."""
    labels = expected_labels([cell.strip() for cell in row.split("|")[1:-1]])
    problems = []
    for name, n, target, n2 in LINK.findall(row):
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), target))
        if resolved != os.path.normpath(name) or n != n2:
            problems.append(f"{page}: [{name}:{n}] points to {target}#L{n2} (from the root: {resolved})")
            continue
        with open(os.path.join(HERE, name), encoding="utf-8") as fh:
            lines = fh.read().splitlines()
        line = lines[int(n) - 1] if int(n) <= len(lines) else ""
        if not ("#" in line and any(names(line, lb) for lb in labels)):
            found = [i + 1 for i, text in enumerate(lines) if "#" in text and any(names(text, lb) for lb in labels)]
            problems.append(f"{page} links {name}:{n} for {sorted(labels)}, but that line is {line.strip()!r}; "
                            f"lines of {name} naming it: {found}")
    return problems


def link_rows(page):
    return [line for line in read(page).splitlines() if line.startswith("|") and LINK.search(line)]


def test_equation_links_land_on_their_lines():
    assert len(link_rows("README.md")) >= 20, "the README's equation map has lost its links"
    problems = [p for page in pages() for row in link_rows(page) for p in link_problems(row, page)]
    assert problems == []


def test_the_link_check_resolves_paths_and_catches_a_wrong_line():
    with open(os.path.join(HERE, "sepo.py"), encoding="utf-8") as fh:  # the comment line of Eq. 26, wherever it is
        n = next(i + 1 for i, line in enumerate(fh) if line.strip().startswith("# Eq. 26"))
    good = f"| Eq. 26 | `sepo.sepo_loss`: [`sepo.py:{n}`](../sepo.py#L{n}) |"
    assert link_problems(good, "docs/page.md") == []
    assert link_problems(good.replace("../sepo.py", "sepo.py"), "docs/page.md") != []  # not relative to docs/
    assert link_problems(good.replace("../", ""), "README.md") == []
    wrong = good.replace(f"py:{n}`", f"py:{n + 1}`").replace(f"#L{n})", f"#L{n + 1})")
    assert link_problems(wrong, "docs/page.md") != []  # a line that names no Eq. 26


# ---------------------------------------------------------------------------------------------------------------
# The layout, the links, the index
# ---------------------------------------------------------------------------------------------------------------

def test_files_in_the_layout_table_exist():
    blocks = [block.strip() for block in section(readme(), "## Layout").split("\n\n")]
    table = [block for block in blocks if block.startswith("| ")][0]
    named = set()
    for row in table.splitlines()[2:]:
        where, what = [cell.strip() for cell in row.split("|")[1:3]]
        folder = where.strip("`") if where.startswith("`") else ""  # "the root: ..." is the root
        assert os.path.isdir(os.path.join(HERE, folder)), where
        for name in re.findall(r"`([\w*.-]+\.(?:py|txt|json))`", what):
            found = glob.glob(os.path.join(HERE, folder, name))
            assert found, f"the README's layout names {name} in {folder or 'the root'}/, which has none"
            named.add(os.path.join(folder, name))
    assert len(named) >= 20
    root = {os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.py"))
            if not os.path.basename(p).startswith("test_")}
    assert root <= named, f"modules at the root that the layout table does not name: {sorted(root - named)}"


def slug(heading):
    """A heading's anchor, as GitHub makes it."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_resolves():
    problems = []
    for page in pages():
        text = re.sub(r"```.*?```", "", read(page), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # https://...
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(HERE, path)):
                problems.append(f"{page}: {target} (no {path})")
            elif anchor and path.endswith(".md") and not anchor.startswith("L"):
                headings = re.findall(r"^#+ (.*)$", re.sub(r"```.*?```", "", read(path), flags=re.S), flags=re.M)
                if anchor not in {slug(h) for h in headings}:
                    problems.append(f"{page}: {target} (no heading of {path} has that anchor)")
    assert problems == []


def test_the_readme_is_a_door_to_every_page():
    lines = readme().count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move detail to a page of docs/"
    index = section(readme(), "## Documentation")
    missing = [page for page in pages()[1:] if f"]({page})" not in index]
    assert missing == [], f"pages of docs/ that the README's index does not link: {missing}"


# ---------------------------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------------------------

def command_lines(text):
    """Every command line of a page: its shell blocks' lines (continuations joined, comments dropped) and its
    inline code that starts with `python ` or `torchrun `."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found.append(line.split("#")[0] if line.lstrip().startswith("#") else line.split(" #")[0])
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    found += [span.replace("\n", " ") for span in re.findall(r"`((?:python|torchrun)\s[^`]+)`", prose)]
    return [line.strip() for line in found if line.strip()]


def commands(text):
    """(script, argv) of every `python X.py ...`, `python -m tiny ...` and `torchrun ... X.py ...` of a page; X.py
    as written, a path from the root (studies/experiments.py). A placeholder value `...` becomes `x`; a trailing
    `...` (the rest of the flags) goes; a leading VAR=value goes."""
    found = []
    for line in command_lines(text):
        for part in re.split(r"&&?|;", line):  # `python a.py & python b.py & wait`, `pip install ... && python ...`
            tokens = shlex.split(part)
            while tokens and re.match(r"^\w+=", tokens[0]):  # OMP_NUM_THREADS=1 python ...
                tokens.pop(0)
            if not tokens or tokens[0] not in ("python", "torchrun"):
                continue
            if tokens[0] == "python" and tokens[1:2] == ["-m"]:
                if tokens[2:3] != ["tiny"]:
                    continue  # `python -m pytest ...` runs a module, not one of the commands
                script, argv = "-m tiny", tokens[3:]
            else:
                scripts = [i for i, t in enumerate(tokens) if t.endswith(".py") and not t.startswith("-")]
                if not scripts:
                    continue
                script, argv = tokens[scripts[0]], tokens[scripts[0] + 1:]
            while argv and argv[-1] == "...":  # "and the rest of the flags"
                argv.pop()
            argv = [("x" if i > 0 and argv[i - 1].startswith("--") else None) if t == "..." else t
                    for i, t in enumerate(argv)]
            found.append((script, [t for t in argv if t is not None]))
    return found


def parsers():
    import generate
    import gpu_check
    import tiny.__main__ as tiny_main
    import bench
    import data
    import experiments
    import onpolicy
    import real_study
    import score
    import sepo_pipeline
    import train
    return {"train.py": lambda a: train.resolve(*train.parse_config(a)), "score.py": score.parse_config,
            "sepo_pipeline.py": sepo_pipeline.parse_config, "onpolicy.py": onpolicy.parse_config,
            "generate.py": generate.parse_config, "benchmarks/gpu_check.py": gpu_check.parse_args,
            "data.py": data.command_line().parse_args, "-m tiny": tiny_main.command_line().parse_args,
            "studies/experiments.py": experiments.parse_config, "studies/real_study.py": real_study.parse_config,
            "benchmarks/bench.py": bench.command_line().parse_args}


def test_every_command_parses_with_the_real_flags():
    parse = parsers()
    found = [(page, script, argv) for page in pages() for script, argv in commands(read(page))]
    unknown = [f"{page}: {script}" for page, script, _ in found if script not in parse]
    assert unknown == [], "not commands of this project (old paths?)"
    assert len(found) >= 40 and {script for _, script, _ in found} == set(parse), "a command no page shows"
    for page, script, argv in found:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
                parse[script](argv)
        except SystemExit as e:  # a flag the script does not have, or --help
            assert e.code == 0 and "--help" in argv, f"{page}: {script} {' '.join(argv)}: {e} {err.getvalue()}"


def test_the_command_finder_reads_blocks_inline_code_and_env():
    text = ("```bash\nOMP_NUM_THREADS=1 python studies/real_study.py --seeds 0,1 &  wait\n"
            "torchrun --nproc_per_node 8 train.py --method dpo \\\n    --beta 0.1 ...\npython -m pytest -q\n```\n"
            "Then `python -m tiny --seed 1`, or `python\nbenchmarks/bench.py --quick`.")
    assert commands(text) == [("studies/real_study.py", ["--seeds", "0,1"]),
                              ("train.py", ["--method", "dpo", "--beta", "0.1"]),
                              ("-m tiny", ["--seed", "1"]), ("benchmarks/bench.py", ["--quick"])]
    with pytest.raises(SystemExit):
        parsers()["-m tiny"](["--sed", "1"])


# ---------------------------------------------------------------------------------------------------------------
# The numbers
# ---------------------------------------------------------------------------------------------------------------

def unquoted(text, sources):
    """The decimal numbers of text that no source text holds (each as a whole number there, not inside another)."""
    joined = "\n".join(sources)
    return [n for n in NUMBER.findall(text) if not re.search(r"(?<![\d.])" + re.escape(n) + r"(?![\d])", joined)]


def results(*paths):
    return [read(p) for p in paths]


PROTOCOLS = ("docs/experiments/base/results.md", "docs/experiments/instruct/results.md")
REGIMES = ("docs/experiments/minimal/results.md", "docs/experiments/independent/results.md")


def test_the_number_check_catches_a_number_not_in_the_results_file():
    assert unquoted("reward 0.396 (greedy 0.456), 12.5 tokens", ["0.396 | 0.4567 | 112.5"]) == ["0.456", "12.5"]


def test_protocol_numbers_come_from_their_results_files():
    text = section(read("docs/miniature-study.md"), "## The papers' protocols, in a world with headroom")
    assert len(NUMBER.findall(text)) > 100
    assert unquoted(text, results(*PROTOCOLS)) == []


def test_first_study_tables_come_from_their_results_files():
    """The first study's tables (its prose also rounds and divides: 3.3 times random)."""
    text = section(read("docs/miniature-study.md"), "## The first study: two regimes without headroom")
    tables = "\n".join(line for line in text.splitlines() if line.startswith("|"))
    assert len(NUMBER.findall(tables)) > 100
    assert unquoted(tables, results(*REGIMES)) == []


def results_at(commit, path):
    """A results file as a commit holds it (the first run of a study that is being re-run)."""
    try:
        return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"git cannot show {path} at {commit} here (a copy without history?): {e}")


def test_real_study_numbers_come_from_its_results_file():
    """The first run's numbers, superseded, against docs/real/results.md as the commit its heading names held it."""
    page = read("docs/real-study.md")
    heading = re.search(r"^## The first run \(superseded.*commit ([0-9a-f]{7,40})\b.*$", page, flags=re.M)
    assert heading, "the real study's page has lost its first run, or the commit its numbers come from"
    text = section(section(page, heading[0]), "### What it showed")  # its results (its design has settings)
    assert len(NUMBER.findall(text)) > 50
    assert unquoted(text, [results_at(heading[1], "docs/real/results.md")]) == []


def bench_tables():
    """benchmarks/bench.json, bench_generation.json and bench_extras.json as bench.py renders them (--table ...
    --markdown)."""
    import bench
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for name in ("bench.json", "bench_generation.json", "bench_extras.json"):
            with open(os.path.join(HERE, "benchmarks", name), encoding="utf-8") as fh:
                bench.print_table(bench.table_rows(json.load(fh))[0], markdown=True)
    return out.getvalue()


def test_benchmark_tables_are_the_results_files_rendered():
    rendered = {line for line in bench_tables().splitlines() if re.match(r"\| (\d|SePO)", line)}
    shown = {line for line in read("docs/benchmarks.md").splitlines() if re.match(r"\| (\d|SePO)", line)}
    assert len(rendered) >= 70 and shown == rendered, (sorted(shown - rendered), sorted(rendered - shown))


def glance(label):
    """The README's results at a glance: the item that starts with **label**."""
    text = section(readme(), "## Results at a glance")
    items = re.split(r"^- ", text, flags=re.M)
    found = [item for item in items if item.startswith(f"**{label}")]
    assert len(found) == 1, f"the README's results at a glance have no item **{label}**"
    return found[0]


def test_results_at_a_glance_come_from_their_results_files():
    for label, sources in (("The papers' protocols", results(*PROTOCOLS)),
                           ("The first study's two regimes", results(*REGIMES)),
                           ("A real model", results("docs/real/results.md")),
                           ("Benchmarks", [bench_tables()])):
        text = glance(label)
        assert len(NUMBER.findall(text)) >= 5, label
        assert unquoted(text, sources) == [], label
    real, done = glance("A real model"), json.loads(read("docs/real/results.json"))["complete"]
    assert "superseded" in real, "the real study's first run's numbers are superseded"
    assert done or "not complete" in real, "results of a study still running are said to be partial"
