"""The shape of the house: imports flow one way (no cycle anywhere in the package, function-level
imports included), code outside ``edgeseq.kinds`` never compares layer-kind names, and the
light modules stay free of torch and onnx."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from edgeseq.kinds import KINDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {"edgeseq": "edgeseq", "kernels": "edgeseq.kernels", "export": "edgeseq.export",
                "runtimes": "edgeseq.runtimes", "targets": "edgeseq.targets"}  # fmt: skip


def package_modules() -> dict[str, Path]:
    """Module name -> file, for every module of the installed package."""
    modules = {}
    for folder, package in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def imported(tree: ast.AST, known: set[str]) -> set[str]:
    """Package modules a module imports anywhere in its body (functions and guards included)."""
    out = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` depends on pkg.sub only; `from pkg import name` on pkg
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        for name in names:
            while name and name not in known:  # `from pkg import name`: the submodule if it is one
                name = name.rpartition(".")[0]
            if name:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    return {m: imported(ast.parse(p.read_text()), known) - {m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_walker_finds_a_planted_cycle():
    graph = import_graph()
    assert "edgeseq.config" in graph["edgeseq.width"]  # it reads real edges
    planted = {**graph, "edgeseq.errors": graph["edgeseq.errors"] | {"edgeseq.deploy.pipeline"}}
    assert any("edgeseq.errors" in c and "edgeseq.deploy.pipeline" in c for c in cycles(planted))


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_no_layer_kind_name_is_compared_outside_the_kinds():
    """``if kind == "mamba2"`` belongs in the kind's object: find every comparison with a
    kind's name (==, !=, in, not in) outside ``edgeseq.kinds``."""
    names = set(KINDS)
    offenders = []
    for module, path in package_modules().items():
        if module.startswith("edgeseq.kinds"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Compare):
                continue
            for operand in [node.left, *node.comparators]:
                elements = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
                if any(isinstance(e, ast.Constant) and e.value in names for e in elements):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


@pytest.mark.parametrize(
    "module",
    ["edgeseq.choices", "edgeseq.config", "edgeseq.width", "edgeseq.sizing", "edgeseq.targets.plan",
     "edgeseq.deploy.bundle", "edgeseq.deploy.runtimes", "edgeseq.deploy.run", "edgeseq.runtimes.session",
     # the runtime-only install (`pip install edgeseq`): the CLI, run, bench, validate --golden, the session
     "edgeseq", "edgeseq.cli", "edgeseq.data", "edgeseq.deploy.bench", "edgeseq.deploy.validation",
     "edgeseq.validate", "edgeseq.runtimes.base", "edgeseq.runtimes.ort_runner"],
)  # fmt: skip
def test_light_modules_import_neither_torch_nor_onnx(module):
    code = f"import sys, {module}; heavy = {{'torch', 'onnx'}} & set(sys.modules); assert not heavy, heavy"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]


BUILTIN_ERRORS = {"ValueError", "TypeError", "RuntimeError", "KeyError", "IndexError", "OSError"}  # AssertionError: edgeseq.testing's to raise


def raised_builtins(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every ``raise BuiltinError(...)`` with a message: an error that
    would reach a Python API user as something other than an EdgeseqError. A bare
    ``raise TypeError`` inside a value check that its caller converts is not counted."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            if node.exc.func.id in BUILTIN_ERRORS:
                out.append((node.lineno, node.exc.func.id))
    return out


def test_the_raise_finder_finds_a_planted_builtin_error():
    tree = ast.parse("def f(x):\n    if x:\n        raise TypeError\n    raise ValueError(f'bad {x}')\n")
    assert raised_builtins(tree) == [(4, "ValueError")]


def test_every_error_the_package_raises_is_an_edgeseq_error():
    found = [f"{path.relative_to(ROOT)}:{line} raises {name}"
             for path in package_modules().values()
             for line, name in raised_builtins(ast.parse(path.read_text()))]  # fmt: skip
    assert not found, "raise an edgeseq.errors class (UsageError is also a ValueError):\n" + "\n".join(found)
