"""The structure the design promises, checked on the source: no module reads another module's private
attributes (tests included), and the modules of tierkv import one another without a cycle.

Both checks read the code with `ast`; nothing is imported or run.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tierkv"
OWN = {"self", "cls"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _sources(*dirs: Path) -> Iterator[Tuple[Path, ast.Module]]:
    for d in dirs:
        for path in sorted(d.rglob("*.py")):
            yield path, ast.parse(path.read_text(), filename=str(path))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _defined_privates(tree: ast.Module) -> Set[str]:
    """Private names a module defines: functions, classes, assignments at any level, and attributes it
    sets on its own objects (`self._x = ...`)."""
    names: Set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and _is_private(node.name):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and _is_private(node.id):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) and _is_private(node.attr):
            names.add(node.attr)
        elif isinstance(node, ast.arg) and _is_private(node.arg):
            names.add(node.arg)
        elif isinstance(node, ast.alias) and _is_private(node.asname or ""):
            names.add(node.asname)
    if isinstance(tree, ast.Module):  # __slots__ entries are attributes of the module's own classes
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets):
                for elt in getattr(node.value, "elts", []):
                    if isinstance(elt, ast.Constant) and isinstance(elt.value, str) and _is_private(elt.value):
                        names.add(elt.value)
    return names


def _foreign_private_reads(trees: List[Tuple[Path, ast.Module]], ours: Set[str]) -> List[str]:
    found = []
    for path, tree in trees:
        local = _defined_privates(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _is_private(node.attr):
                base = node.value
                if isinstance(base, ast.Name) and base.id in OWN:
                    continue
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    continue
                if node.attr in ours and node.attr not in local:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("tierkv", ""):
                for alias in node.names:
                    if _is_private(alias.name) and alias.name in ours:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: import {alias.name}")
    return found


def test_no_private_attribute_is_read_across_modules():
    package = list(_sources(PACKAGE))
    ours: Set[str] = set()
    for _, tree in package:
        ours |= _defined_privates(tree)
    found = _foreign_private_reads(package + list(_sources(ROOT / "tests", ROOT / "bench")), ours)
    assert not found, "private attributes read outside the module that owns them:\n" + "\n".join(found)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_graph() -> Dict[str, Set[str]]:
    """Module -> the tierkv modules it imports (at any depth of the file: a lazy import is a dependency
    too). `from package import name` depends on package.name where that is a module, else on package."""
    trees = {_module_name(p): (p, t) for p, t in _sources(PACKAGE)}
    graph: Dict[str, Set[str]] = {m: set() for m in trees}
    for module, (path, tree) in trees.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: List[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in trees else base)
            for t in targets:
                while t and t not in trees:  # import a.b.c where only a.b is ours as a file
                    t = t.rpartition(".")[0]
                if t and t != module:
                    graph[module].add(t)
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _package_edges_removed(graph: Dict[str, Set[str]]) -> Dict[str, Set[str]]:
    """A package's __init__ re-exporting its own submodules is not a cycle of design: drop the edges
    from a submodule to the package it lives in (Python runs the package first anyway)."""
    return {m: {t for t in deps if not m.startswith(t + ".")} for m, deps in graph.items()}


def test_no_import_cycle_inside_tierkv():
    cycles = _cycles(_package_edges_removed(_import_graph()))
    assert not cycles, "import cycles among tierkv modules:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_checks_see_what_they_look_for(tmp_path):
    """Each check finds what it exists to find: a planted private read and a planted cycle."""
    reader = ast.parse("def f(store):\n    return store._meta\n")
    owner = ast.parse("class S:\n    def __init__(self):\n        self._meta = {}\n")
    assert _foreign_private_reads([(ROOT / "tests" / "x.py", reader)], _defined_privates(owner))
    assert _foreign_private_reads([(ROOT / "tests" / "x.py", owner)], _defined_privates(owner)) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
