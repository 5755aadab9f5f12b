"""The layout rules of camelid/, read from the source with `ast`: no import cycles (an import inside a function
counts: it runs sooner or later), no `from module import _private` across modules, and the reference model
(camelid/model.py) imports nothing from the kernels or the variants derived from it.

An edge goes to the module an import names: `from camelid.tokenizer import hf_json` is an edge to
camelid.tokenizer.hf_json, `from camelid.tokenizer import Tokenizer` one to the package camelid.tokenizer. The
packages a module sits in are not edges (Python runs them first, but a package's __init__ importing its own
submodules is not a cycle of the code)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_MODEL = ("camelid.ops", "camelid.kernels", "camelid.variants")


def module_names(package_dir: Path) -> dict[str, Path]:
    """Every module of the package: dotted name -> file (a package's name -> its __init__.py)."""
    out = {}
    for file in sorted(package_dir.rglob("*.py")):
        parts = file.relative_to(package_dir.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return out


def _imports(name: str, file: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import statement, wherever it is."""
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from .. import z
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.append((base, [alias.name for alias in node.names], node.lineno))
    return out


def import_graph(package_dir: Path) -> tuple[dict[str, set[str]], list[str]]:
    """The module graph of a package, and its `from x import _private` reach-ins ("file:line: ...")."""
    modules = module_names(package_dir)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for name, file in modules.items():
        for target, names, line in _imports(name, file):
            if target.split(".")[0] != package_dir.name:
                continue
            for imported in names or [""]:
                sub = f"{target}.{imported}"
                if imported and sub in modules:
                    graph[name].add(sub)
                    continue
                resolved = target
                while resolved not in modules and "." in resolved:  # `import camelid.x.y` of a non-module
                    resolved = resolved.rpartition(".")[0]
                if resolved != name:
                    graph[name].add(resolved)
                    if imported.startswith("_") and not imported.startswith("__"):
                        rel = file.relative_to(package_dir.parent)
                        private.append(f"{rel}:{line}: from {target} import {imported}")
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One concrete cycle (a -> b -> ... -> a) for every strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for group in groups:
        start = min(group)
        path, seen = [start], {start: None}
        frontier = [start]
        while frontier:  # breadth-first inside the group, back to `start`
            v = frontier.pop(0)
            nxt = [w for w in sorted(graph[v]) if w in group]
            if start in nxt:
                path = [v]
                while seen[path[-1]] is not None:
                    path.append(seen[path[-1]])
                out.append([*reversed(path), start])
                break
            for w in nxt:
                if w not in seen:
                    seen[w] = v
                    frontier.append(w)
    return out


# ---- the rules, on camelid/ ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def camelid_graph() -> tuple[dict[str, set[str]], list[str]]:
    return import_graph(ROOT / "camelid")


def test_no_import_cycles(camelid_graph):
    found = cycles(camelid_graph[0])
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_no_private_names_imported_across_modules(camelid_graph):
    private = camelid_graph[1]
    assert not private, "private names imported from another module:\n" + "\n".join(private)


def test_reference_model_imports_no_kernels_or_variants(camelid_graph):
    bad = sorted(m for m in camelid_graph[0]["camelid.model"] if m.startswith(FORBIDDEN_IN_MODEL))
    assert not bad, f"camelid/model.py imports {', '.join(bad)}; variants are applied from outside the model"


# ---- the checks themselves can fail ----------------------------------------------------------------------------


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_lazy_import_cycle_is_found(tmp_path):
    pkg = _package(tmp_path, {
        "__init__.py": "from pkg.a import f\n",
        "a.py": "from pkg import b\n\ndef f():\n    return b.g()\n",
        "b.py": "def g():\n    from pkg.sub.c import h\n    return h()\n",
        "sub/__init__.py": "",
        "sub/c.py": "def h():\n    from ..a import f  # relative, and inside a function\n    return f\n",
        "d.py": "import pkg.a\nfrom pkg.a import _hidden\nfrom pkg import __doc__\n",
    })
    graph, private = import_graph(pkg)
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"} and graph["pkg.sub.c"] == {"pkg.a"}
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]]
    assert private == ["pkg/d.py:2: from pkg.a import _hidden"]


def test_a_package_importing_its_submodules_is_no_cycle(tmp_path):
    pkg = _package(tmp_path, {"__init__.py": "from pkg.a import x\nfrom pkg.b import y\n",
                              "a.py": "x = 1\n", "b.py": "from pkg.a import x\ny = x\n"})
    graph, _ = import_graph(pkg)
    assert cycles(graph) == []
