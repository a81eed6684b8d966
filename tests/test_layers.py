"""The package layering of docs/architecture.md, enforced on the source (ast, no imports run):

- no import cycle among llmjax modules (module-level imports, package __init__ included);
- `errors.py` and every config section module are leaves;
- every import, module-level or inside a function, goes to the same or a lower layer
  (LAYERS below), except the pairs listed in KNOWN (each with its reason; the list may only
  shrink: a listed pair that no longer exists fails too);
- `import llmjax.config` alone imports no model, PEFT, training module, nor jax.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmjax"

# Lowest first. A module belongs to the layer of the longest prefix that names it (a package
# prefix covers its submodules; "llmjax" is only the package's __init__); it may import
# modules of its own layer or of lower ones. A new module must be placed here.
LAYERS = [
    ("errors", ["llmjax.errors"]),
    ("config", ["llmjax.config", "llmjax.data.config", "llmjax.peft.config"]),
    # llmjax.launch (the launchers and the TPU slice table) uses only config and errors, so any
    # layer may read launch.topology (`llmjax plan --target`).
    ("utilities", ["llmjax.console", "llmjax.compile_cache", "llmjax.pypi_data", "llmjax.tree",
                   "llmjax.paths", "llmjax.metrics_files",
                   "llmjax.outdir", "llmjax.plot", "llmjax.launch",
                   "llmjax.distributed"]),
    ("storage", ["llmjax.checkpoint"]),
    ("data, models", ["llmjax.data", "llmjax.models"]),
    ("objectives, parallel", ["llmjax.objectives", "llmjax.parallel"]),
    ("peft, model loading", ["llmjax.peft", "llmjax.loader"]),
    # llmjax.evaluation's scoring, task files and lm-eval model sit below the trainer, which
    # scores eval.tasks with them; its path-loading harness and CLI sit on top.
    ("train", ["llmjax.train", "llmjax.metrics", "llmjax.generate",
               "llmjax.export", "llmjax.classify", "llmjax.evaluation"]),
    ("top: conversion, pretrained, command lines", [
        "llmjax", "llmjax.convert", "llmjax.pretrained", "llmjax.cli", "llmjax.data.cli",
        "llmjax.peft.cli", "llmjax.generate_cli", "llmjax.export_cli", "llmjax.demo",
        "llmjax.config_reference", "llmjax.__main__", "llmjax.plan",
        "llmjax.evaluation.harness", "llmjax.evaluation.cli"]),
]

# Upward imports that remain (importer, imported): each is a function-level import.
KNOWN = {
    # check_labelled reads the labelled files at config load and fills data.label_names.
    ("llmjax.config", "llmjax.data"): "package of llmjax.data.labelled, below",
    ("llmjax.config", "llmjax.data.labelled"):
        "labelled-file check at config load; belongs in preflight/build",
}

# The config layer: llmjax.config defines every section and imports nothing of llmjax but
# llmjax.errors; data/config.py and peft/config.py re-export their sections from it.
LEAVES = {
    "llmjax.errors": set(),
    # llmjax.data.labelled: the labelled-file check at config load (see KNOWN).
    "llmjax.config": {"llmjax.errors", "llmjax.data", "llmjax.data.labelled"},
    "llmjax.data.config": {"llmjax.config"},
    "llmjax.peft.config": {"llmjax.config"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _targets(module: str, node: ast.AST, is_package: bool) -> list[str]:
    """The llmjax modules an import statement loads (`from a import b`: a.b if a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "llmjax"]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    if base.split(".")[0] != "llmjax":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _imports(module: str) -> list[tuple[str, bool, int]]:
    """(imported module, inside a function?, line) for every import in `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for target in _targets(module, child, path.name == "__init__.py"):
                    found.append((target, in_function, child.lineno))
            walk(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))
    walk(tree, False)
    return found


def _loaded(target: str) -> list[str]:
    """Importing `a.b.c` runs a, a.b and a.b.c: the llmjax modules among them."""
    parts = target.split(".")
    return [m for m in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if m in MODULES]


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or (module.startswith(prefix + ".") and prefix != "llmjax")
            if inside and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{module} is in no layer of tests/test_layers.py"
    return rank


def test_every_module_has_a_layer():
    for module in MODULES:
        _layer(module)


def test_no_import_cycles():
    """Module-level imports (what runs at import time) form no cycle. Importing a.b.c runs the
    packages a and a.b first, except those the importer is inside (already being imported)."""
    edges = {m: set() for m in MODULES}
    for module in MODULES:
        for target, in_function, _ in _imports(module):
            if not in_function:
                edges[module].update(t for t in _loaded(target)
                                     if t != module and not module.startswith(t + "."))
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_config_sections_and_errors_are_leaves():
    for module, allowed in LEAVES.items():
        imported = {t for target, _, _ in _imports(module) for t in _loaded(target)
                    if not module.startswith(t + ".")}  # its own packages
        assert imported <= allowed, f"{module} imports {sorted(imported - allowed)}"
    for path in PACKAGE.rglob("config.py"):  # every */config.py is listed
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        assert module in LEAVES, f"{module}: add it to LEAVES (a config section is a leaf)"


def test_imports_follow_the_layers():
    upward, seen = [], set()
    for module in MODULES:
        for target, in_function, line in _imports(module):
            for loaded in _loaded(target):
                if loaded == "llmjax" or _layer(loaded) <= _layer(module):
                    continue
                if (module, loaded) in KNOWN:
                    seen.add((module, loaded))
                    assert in_function, f"{module} imports {loaded} at module level"
                    continue
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} "
                              f"({LAYERS[_layer(module)][0]}) imports {loaded} "
                              f"({LAYERS[_layer(loaded)][0]})")
    assert not upward, "imports against the layering (docs/architecture.md):\n" + "\n".join(upward)
    assert not set(KNOWN) - seen, f"no longer needed, remove from KNOWN: {set(KNOWN) - seen}"


@pytest.mark.parametrize("module,absent", [
    ("llmjax.config", ["llmjax.models", "llmjax.peft.plan", "llmjax.train", "llmjax.parallel",
                       "llmjax.objectives", "llmjax.checkpoint", "jax"]),
    ("llmjax.errors", ["llmjax.config", "jax"]),
])
def test_importing_config_imports_no_model_peft_or_training(module, absent):
    code = (f"import sys; import {module}; "
            f"print([m for m in sys.modules if m.split('.')[0] in ('llmjax', 'jax')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    loaded = ast.literal_eval(out.strip())
    bad = [m for m in loaded if any(m == a or m.startswith(a + ".") for a in absent)]
    assert not bad, f"import {module} loads {bad}"


# Modules that exist to bridge to an optional extra (they say which extra in their ImportError).
OPTIONAL = {"llmjax.evaluation.harness": "lm_eval", "llmjax.evaluation.lm": "lm_eval"}


def test_every_module_imports():
    """Each module imports (in one fresh interpreter, in sorted order): no ImportError from a
    partly initialised module, no missing name after a move."""
    import importlib.util
    names = [m for m in MODULES if not m.endswith("__main__")
             and (m not in OPTIONAL or importlib.util.find_spec(OPTIONAL[m]) is not None)]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n"
            "    importlib.import_module(name)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
