"""The layer rules that keep the flow of a question readable, checked on the source tree:

- only the CLI imports the UI;
- engines never import the chat layer (assistant, session) or the recorder;
- nothing in the package imports transformers (a test-only oracle);
- no two modules import each other, directly or through a loop (function-level imports count too).

Imports under `if TYPE_CHECKING:` are left out: they never run.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = (("localmoe", "localmoe"), ("ui", "localmoe.ui"))  # ui/ installs as localmoe.ui


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for folder, package in SOURCES:
        for f in sorted((root / folder).rglob("*.py")):
            parts = [p for p in f.relative_to(root / folder).with_suffix("").parts if p != "__init__"]
            found[".".join([package, *parts])] = f
    return found


def _imported_names(name: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    skipped = {id(n) for node in guarded for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the package modules (and `transformers`) it imports."""
    mods = modules(root)
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imported_names(name, path):
            if imp.split(".")[0] == "transformers":
                deps.add("transformers")
            while imp and imp not in mods:  # `from pkg.mod import func` depends on pkg.mod
                imp = imp.rpartition(".")[0]
            if imp and imp != name:
                deps.add(imp)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in graph:
                    continue
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


ENGINE_MUST_NOT_IMPORT = ("localmoe.chat", "localmoe.record.recorder")


def violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        if "transformers" in deps:
            bad.append(f"{mod} imports transformers (test-only oracle)")
        if not mod.startswith("localmoe.ui") and mod not in ("localmoe.cli", "localmoe.__main__"):
            bad += [f"{mod} imports the UI ({d}): only the CLI may"
                    for d in sorted(deps) if d.startswith("localmoe.ui")]
        if mod.startswith("localmoe.engine"):
            bad += [f"engine module {mod} imports {d}" for d in sorted(deps)
                    if any(d == f or d.startswith(f + ".") for f in ENGINE_MUST_NOT_IMPORT)]
    bad += ["import cycle: " + " <-> ".join(c) for c in cycles(graph)]
    return bad


def test_the_package_keeps_its_layer_rules() -> None:
    graph = import_graph(ROOT)
    assert "localmoe.engine.llamacpp" in graph and "localmoe.ui.chat" in graph  # the walk saw the whole tree
    assert violations(graph) == []


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    for folder, _ in SOURCES:
        shutil.copytree(ROOT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    return tmp_path


def _add_import(root: Path, rel: str, line: str, *, in_function: bool = False) -> None:
    path = root / rel
    text = path.read_text(encoding="utf-8")
    path.write_text(text + (f"\n\ndef _added():\n    {line}\n" if in_function else f"\n{line}\n"), encoding="utf-8")


@pytest.mark.parametrize(("rel", "line", "expected"), [
    ("localmoe/engine/llamacpp.py", "from localmoe.record.recorder import Recorder", "engine module"),
    ("localmoe/engine/remote.py", "from localmoe.chat import session", "engine module"),
    ("localmoe/chat/session.py", "from localmoe.ui.chat import ChatScreen", "imports the UI"),
    ("localmoe/placement/plan.py", "import transformers", "imports transformers"),
    # a function-level import that closes a loop: plan is imported by the llama.cpp engine
    ("localmoe/placement/plan.py", "from localmoe.engine.llamacpp import LlamaCppEngine", "import cycle"),
])
def test_a_forbidden_import_breaks_the_rules(tree_copy: Path, rel: str, line: str, expected: str) -> None:
    assert violations(import_graph(tree_copy)) == []
    _add_import(tree_copy, rel, line, in_function=True)
    bad = violations(import_graph(tree_copy))
    assert any(expected in b for b in bad), bad


def test_type_checking_imports_do_not_count(tree_copy: Path) -> None:
    _add_import(tree_copy, "localmoe/placement/plan.py",
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from localmoe.engine.llamacpp import X")
    assert violations(import_graph(tree_copy)) == []


def test_every_module_says_what_it_is_for() -> None:
    missing = [name for name, path in modules(ROOT).items()
               if name != "localmoe.__main__" and not ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))]
    assert missing == []
