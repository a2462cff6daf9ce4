"""Imports point one way. Every import statement of a project module counts, those inside functions included: a
module imports only modules of lower layers, confpo.py and sepo.py only losses.py, and nothing imports in a circle.
The layers are also the layout: the library and the commands at the root, the tiny world in tiny/, the studies in
studies/, the benchmarks in benchmarks/; the root holds no module of those folders' kinds."""

import ast
import glob
import os

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root

# module -> (its folder, its layer); a module may import project modules of lower layers only
LAYERS = {
    "losses": ("", 0), "data": ("", 0), "utils": ("", 0),  # the core; the data; settings and processes
    "confpo": ("", 1), "sepo": ("", 1),  # the methods
    "rundir": ("", 1),  # an output folder that survives kills: lock, claim, atomic files, block store, checkpoints
    "models": ("", 2),  # a causal LM as per-token log-probs, sharded with FSDP2; the reference pre-pass
    "tiny": ("tiny", 2),  # the offline tiny world (a package), imported by the commands only without --model
    "train": ("", 3),
    "score": ("", 4), "onpolicy": ("", 4),  # SePO's scores; on-policy pairs (sampled by the policy, scored by a reward)
    "sepo_pipeline": ("", 5), "generate": ("", 5),  # SePO end to end; the benchmarks' answers (imports onpolicy)
    "real_task": ("studies", 6), "measures": ("studies", 6),  # the real study's task; the studies' shared measures
    "experiments_report": ("studies", 7), "real_report": ("studies", 7),  # the two studies' results files
    "experiments": ("studies", 8), "real_study": ("studies", 8),  # the miniature study; the real model's study
    "bench": ("benchmarks", 7),  # speed and memory, side by side
    "gpu_check": ("benchmarks", 7),  # the first GPU run's check: one verdict line per check
}
ONLY = {"losses": set(), "data": set(), "confpo": {"losses"}, "sepo": {"losses"}}


def source(name):
    folder = LAYERS[name][0] if name in LAYERS else ""
    return os.path.join(HERE, folder, "__init__.py" if folder == name else f"{name}.py")


def modules():
    """Every project module: the root's, the tiny package, the studies' and the benchmarks' (tests aside)."""
    found = [os.path.basename(p)[:-3] for folder in ("", "studies", "benchmarks")
             for p in glob.glob(os.path.join(HERE, folder, "*.py"))]
    found += [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(HERE, "*", "__init__.py"))]
    return sorted(m for m in found if not m.startswith("test_") and m != "conftest")


def project_imports(name):
    """The project modules that `name` imports anywhere in its source, function bodies included."""
    with open(source(name), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(modules())


def test_every_module_has_a_layer_and_lives_in_its_folder():
    assert set(modules()) == set(LAYERS), "give each new module a folder and a layer in test_layers.py"
    for name in LAYERS:
        assert os.path.exists(source(name)), f"{name} belongs in {LAYERS[name][0] or 'the root'}/"
    root = [os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.py"))
            if not os.path.basename(p).startswith("test_")]
    assert len(root) <= 12, f"the root holds the library and its commands only: {sorted(root)}"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_point_down(name):
    imported = project_imports(name)
    upward = {m for m in imported if LAYERS[m][1] >= LAYERS[name][1]}
    assert not upward, f"{name}.py imports {sorted(upward)}, which are not below it"
    if name in ONLY:
        assert imported <= ONLY[name], f"{name}.py may import only {sorted(ONLY[name])}, imports {sorted(imported)}"


def test_no_import_cycle():
    graph = {m: project_imports(m) for m in modules()}
    state = {}

    def visit(m, path):
        if state.get(m) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if state.get(m) != "done":
            state[m] = "open"
            for n in sorted(graph[m]):
                visit(n, path + [m])
            state[m] = "done"

    for m in graph:
        visit(m, [])


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """The parser sees an import inside a function, and the cycle check finds a planted cycle."""
    (tmp_path / "a.py").write_text("def f():\n    import b\n")
    (tmp_path / "b.py").write_text("from a import f\n")
    monkeypatch.setattr(__import__(__name__), "HERE", str(tmp_path))
    monkeypatch.setattr(__import__(__name__), "LAYERS", {})
    assert project_imports("a") == {"b"} and project_imports("b") == {"a"}
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        test_no_import_cycle()
