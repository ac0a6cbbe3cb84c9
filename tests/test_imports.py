"""The import graph of the library: what a reader of the imports at the top of a file learns
is the whole truth.

- An import inside a function is allowed only for an optional or heavy extra, and says
  why on its line (`# lazy: ...`).
- No two modules import each other, directly or around a circle (imports at any level).
- `videodpo/data` reads and writes data and knows no model; models know no losses or data.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "llmpost", "videodpo")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, child.end_lineno + 1))
    return lines


def imports_of(source: str, modules: set[str]) -> tuple[set[str], list[tuple[int, str]]]:
    """(project modules imported at run time, function-local imports without a `# lazy:` reason)."""
    tree = ast.parse(source)
    lines = source.splitlines()
    typing_only = _type_checking_lines(tree)
    found, unexplained = set(), []
    local = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            local.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or node.lineno in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            names = [a.name for a in node.names]
        found.update(n for n in names if n in modules)
        if id(node) in local and "# lazy:" not in lines[node.lineno - 1]:
            unexplained.append((node.lineno, lines[node.lineno - 1].strip()))
    return found, unexplained


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    modules = _modules()
    graph, unexplained = {}, {}
    for name, path in modules.items():
        graph[name], bad = imports_of(path.read_text(), set(modules))
        graph[name].discard(name)
        if bad:
            unexplained[name] = bad
    return graph, unexplained


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_function_local_imports_say_why():
    _, unexplained = _graph()
    assert not unexplained, "\n".join(f"{m}:{line}: {text}" for m, items in unexplained.items()
                                      for line, text in items)


def test_no_import_circles():
    graph, _ = _graph()
    cycles = find_cycles(graph)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_data_knows_no_model_and_models_no_losses():
    graph, _ = _graph()
    rules = {"videodpo.data": ("videodpo.models", "videodpo.state", "videodpo.step", "videodpo.trainer",
                               "videodpo.losses"),
             "videodpo.models": ("videodpo.losses", "videodpo.data", "videodpo.trainer", "videodpo.step")}
    wrong = [f"{m} imports {t}" for m, targets in graph.items() for t in targets
             for scope, banned in rules.items() if m.startswith(scope) and t.startswith(banned)]
    assert not wrong, "\n".join(wrong)


def test_the_checks_catch_what_they_look_for():
    source = "import os\n\ndef f():\n    import common.run\n    import common.io  # lazy: optional\n"
    found, unexplained = imports_of(source, {"common.run", "common.io"})
    assert found == {"common.run", "common.io"} and [n for n, _ in unexplained] == [4]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
