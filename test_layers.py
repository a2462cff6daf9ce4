"""Imports point one way. Every import statement of a top-level module counts, those inside functions included:
a module imports only modules of lower layers, confpo.py and sepo.py only losses.py, and nothing imports in a
circle."""

import ast
import glob
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

# module -> layer; a module may import project modules of lower layers only
LAYERS = {
    "losses": 0, "data": 0, "utils": 0,  # the core, the data, settings and processes
    "confpo": 1, "sepo": 1,  # the methods
    "rundir": 1,  # an output folder that survives kills: lock, claim, atomic files, block store, checkpoints
    "models": 2,  # a causal LM as per-token log-probs, sharded with FSDP2; the reference pre-pass
    "tiny": 2, "report": 2, "real_task": 2,  # the offline tiny world; score.py's HTML report; the real study's prompts
    "train": 3,
    "score": 4, "onpolicy": 4,  # SePO's scores; on-policy pairs (sampled by the policy, scored by a reward)
    "sepo_pipeline": 5,
    "experiments": 6, "bench": 6,  # studies and measurements on top
    "real_study": 7,  # the real model's study: shares experiments.py's evaluation helpers
}
ONLY = {"losses": set(), "data": set(), "confpo": {"losses"}, "sepo": {"losses"}}


def modules():
    return sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))
                  if not os.path.basename(p).startswith("test_") and os.path.basename(p) != "conftest.py")


def project_imports(name):
    """The project modules that `name`.py imports anywhere in its source, function bodies included."""
    with open(os.path.join(HERE, f"{name}.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(modules())


def test_every_module_has_a_layer():
    assert set(modules()) == set(LAYERS), "give each new top-level module a layer in test_layers.py"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_point_down(name):
    imported = project_imports(name)
    upward = {m for m in imported if LAYERS[m] >= LAYERS[name]}
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
    assert project_imports("a") == {"b"} and project_imports("b") == {"a"}
    with pytest.raises(AssertionError, match="import cycle: a -> b -> a"):
        test_no_import_cycle()
