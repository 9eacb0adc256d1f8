"""Ember's import graph, read from the source: no cycles, `model.py` free of the engine and the kernels,
and every module's Ember dependencies named at its top.

The graph is built statically (every import statement, those inside functions included, with relative
imports resolved, `from ember import x` read as the submodule `ember.x` when that module exists and as
the module a package's `_EXPORTS` table names for x otherwise), so a lazy import inside a function still
counts as an edge: a cycle hidden behind one is still a cycle.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "ember"

# What the model may not reach, directly or through another module: it is plain PyTorch, and kernels
# are swapped in once when a model is prepared for inference, not branched into from model.py.
MODEL = "ember.model"
FORBIDDEN_FOR_MODEL = ("ember.engine", "ember.gemv", "ember.packed_linear", "ember.cpu_inference", "ember.quant")



def _command_modules() -> set[str]:
    """The command groups `ember/cli.py` lists in COMMAND_MODULES (read from its source, not imported)."""
    for node in ast.parse((PACKAGE / "cli.py").read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMMAND_MODULES"
                                                for t in node.targets):
            return set(ast.literal_eval(node.value))
    raise AssertionError("ember/cli.py no longer lists COMMAND_MODULES; say here which modules are the CLI's")


# Modules whose imports inside functions are deliberate: the CLI imports each command's code only when
# that command runs, so `ember --help` answers without importing torch, and the command groups that live
# beside their library code (cli.py's COMMAND_MODULES) are part of the CLI in that respect.
# `__init__.py` files resolve their exports on first use, for the same reason.
LAZY_BY_DESIGN = {"ember.cli"} | _command_modules()


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the Ember module imported
    line: int
    top_level: bool  # a statement of the module body (or of an if/try at module level), not inside a def


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def ember_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "csrc" not in p.parts}


def _resolve_relative(source: str, is_package: bool, level: int, module: str | None) -> str:
    base = source.split(".") if is_package else source.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def lazy_exports(modules: dict[str, Path]) -> dict[str, dict[str, str]]:
    """{package: {name: module}} from each `__init__.py`'s `_EXPORTS` table (names resolved on first use)."""
    out = {}
    for name, path in modules.items():
        if path.name != "__init__.py":
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
                out[name] = ast.literal_eval(node.value)
    return out


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, known: set[str],
             exports: dict[str, dict[str, str]] | None = None) -> list[str]:
    """The Ember modules one import statement loads: for `from m import x`, m.x when that is a module, the
    module m's `_EXPORTS` names for x when m is a package that resolves it lazily, else m."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name == "ember" or a.name.startswith("ember.")]
    base = _resolve_relative(source, is_package, node.level, node.module) if node.level else (node.module or "")
    if base != "ember" and not base.startswith("ember."):
        return []
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in known else (exports or {}).get(base, {}).get(alias.name, base))
    return out


def _walk(tree: ast.Module):
    """(import node, at module level?) for every import statement in the file."""
    def visit(node: ast.AST, top: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, top
            # A class body runs at import time too, but its imports belong at the module's top all the same.
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            yield from visit(child, inner)
    yield from visit(tree, True)


def read_imports() -> list[Import]:
    modules = ember_modules()
    known, exports = set(modules), lazy_exports(modules)
    found = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, top in _walk(tree):
            for target in _targets(node, name, path.name == "__init__.py", known, exports):
                if target != name:
                    found.append(Import(name, target, node.lineno, top))
    return found


def graph(imports: list[Import]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in ember_modules()}
    for imp in imports:
        edges.setdefault(imp.source, set()).add(imp.target)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """The groups of two or more modules that each reach one another (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return groups


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path a -> ... -> a) through each strongly connected group of modules."""
    return [_cycle_in(group, edges) for group in strongly_connected(edges)]


def _cycle_in(group: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest cycle through the group's first module, found breadth first inside the group."""
    start = min(group)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & group):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def path_between(edges: dict[str, set[str]], start: str, goal) -> list[str] | None:
    """The shortest import chain from `start` to a module satisfying `goal`, or None."""
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, ())):
                if w in parents:
                    continue
                parents[w] = v
                if goal(w):
                    chain = [w]
                    while parents[chain[-1]] is not None:
                        chain.append(parents[chain[-1]])
                    return chain[::-1]
                nxt.append(w)
        frontier = nxt
    return None


def test_the_graph_reader_sees_lazy_relative_and_submodule_imports(tmp_path):
    """The reader on a known file: without these edges the checks below would pass on a cyclic package."""
    source = ("from ember import errors\nfrom . import files\nimport ember.model as m\n"
              "def f():\n    from .checkpoint import load_config\n    from ember.quant import api, METHODS\n")
    tree = ast.parse(source)
    known = set(ember_modules())
    exports = {"ember.quant": {"METHODS": "ember.quant.api"}}
    got = [(t, top) for node, top in _walk(tree) for t in _targets(node, "ember.load", False, known, exports)]
    assert got == [("ember.errors", True), ("ember.files", True), ("ember.model", True),
                   ("ember.checkpoint", False), ("ember.quant.api", False), ("ember.quant.api", False)]
    assert lazy_exports(ember_modules())["ember"]["load_model"] == "ember.load"
    # `from .. import x` inside a subpackage's module climbs one package per extra dot.
    assert _resolve_relative("ember.quant.io", False, 2, "checkpoint") == "ember.checkpoint"
    assert _resolve_relative("ember.quant", True, 1, "api") == "ember.quant.api"
    # A cycle through three modules is found and printed closed; a chain without one is not a cycle.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_ember():
    edges = graph(read_imports())
    groups = strongly_connected(edges)
    assert not groups, "import cycles in ember/ (a closed chain, then every module caught in it):\n" + "\n".join(
        f"  {' -> '.join(_cycle_in(g, edges))}   [{', '.join(sorted(g))}]" for g in groups)


def test_model_imports_neither_the_engine_nor_a_kernel():
    edges = graph(read_imports())
    chain = path_between(edges, MODEL, lambda m: any(m == f or m.startswith(f + ".") for f in FORBIDDEN_FOR_MODEL))
    assert chain is None, f"{MODEL} reaches {chain[-1]}: " + " -> ".join(chain)


def test_ember_imports_sit_at_the_top_of_each_module():
    paths = ember_modules()
    lazy = sorted({(str(paths[i.source].relative_to(ROOT)), i.line, i.target) for i in read_imports()
                   if not i.top_level and i.source not in LAZY_BY_DESIGN and paths[i.source].name != "__init__.py"})
    assert not lazy, "Ember imports inside functions (move them to the top of the module):\n" + "\n".join(
        f"  {path}:{line} imports {target}" for path, line, target in lazy)


def test_the_cli_builds_its_parser_without_importing_torch():
    """What the command modules' lazy imports buy (and so why they are exempt above): `ember --help` is instant."""
    code = "import sys, ember.cli; ember.cli.build_parser(); print(sorted(m for m in sys.modules if m == 'torch'))"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]", "building the CLI's parser imported torch"


def forward_assignments(source: str) -> list[int]:
    """Lines that set `forward` on an object rather than define it in a class body: `x.forward = ...`,
    `x.__dict__["forward"] = ...`, `setattr(x, "forward", ...)` (patching a live module)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            if isinstance(t, ast.Attribute) and t.attr == "forward":
                lines.append(node.lineno)
            if (isinstance(t, ast.Subscript) and isinstance(t.value, ast.Attribute) and t.value.attr == "__dict__"
                    and isinstance(t.slice, ast.Constant) and t.slice.value == "forward"):
                lines.append(node.lineno)
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and node.args[1].value == "forward"):
            lines.append(node.lineno)
    return lines


def test_the_reader_of_forward_assignments_finds_each_way_of_patching():
    source = ("class A:\n    def forward(self):\n        pass\n"
              "m.forward = f\nm.__dict__['forward'] = f\nsetattr(m, 'forward', f)\nm.other = f\n")
    assert forward_assignments(source) == [4, 5, 6]


def test_no_forward_is_assigned_on_a_live_module():
    """Kernels are swapped in as modules of their own (ember.cpu_inference), never patched into a forward."""
    found = {name: lines for name, path in ember_modules().items()
             if (lines := forward_assignments(path.read_text(encoding="utf-8")))}
    assert not found, f"forward assigned outside a class body: {found}"
