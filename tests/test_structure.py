"""The package's structure: no import cycle inside colintern/ (imports inside functions count too), a cheap
`import colintern`, thin scripts, and no reference outside the repository."""
from __future__ import annotations

import ast
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "colintern"


def imports_of(path) -> set[str]:
    """colintern modules imported anywhere in a file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "colintern":  # from colintern import internvl, qwen3vl
                found |= {f"colintern.{a.name}" for a in node.names if (PACKAGE / f"{a.name}.py").exists()}
            elif node.module.startswith("colintern."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("colintern.")}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_the_package():
    graph = {f"colintern.{p.stem}": imports_of(p) - {f"colintern.{p.stem}"}
             for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    assert "colintern.families" in graph["colintern.model"]  # the graph is real: model asks the registry
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_import_colintern_does_not_import_torch():
    code = "import colintern, sys; assert 'torch' not in sys.modules; print(colintern.UserError.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "UserError"


def function_lengths(path) -> dict[str, int]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def test_train_and_mine_are_thin_front_ends():
    """No function over 80 lines in train.py and mine.py, argument parsers aside: the work is in the package."""
    for script in ("train.py", "mine.py"):
        long = {name: n for name, n in function_lengths(REPO / script).items() if n > 80 and name != "parse_args"}
        assert not long, f"{script}: {long}"


def test_code_cites_the_repository_not_outside_it():
    outside = subprocess.run(["git", "grep", "-n", "-E", r"\.\./shared|SPEC[ ]§", "--", "*.py", "Makefile", ".ci/*"],
                             cwd=REPO, capture_output=True, text=True)
    assert outside.stdout == ""
