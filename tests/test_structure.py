"""The package's structure: no import cycle inside colintern/ (imports inside functions count too), a cheap
`import colintern`, thin scripts, and no reference outside the repository."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "colintern"


def imports_of(path) -> set[str]:
    """colintern modules imported anywhere in a file (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "colintern" or node.module.startswith("colintern."):
                folder = PACKAGE.joinpath(*node.module.split(".")[1:])
                # from colintern.backbones import internvl, qwen3vl: the modules themselves
                modules = {f"{node.module}.{a.name}" for a in node.names if (folder / f"{a.name}.py").exists()}
                found |= modules or {node.module}
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


def module_name(path) -> str:
    """colintern/scripts/train.py -> colintern.scripts.train"""
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_inside_the_package():
    graph = {module_name(p): imports_of(p) - {module_name(p)} for p in PACKAGE.rglob("*.py")}
    graph = {k: {m for m in v if m in graph} for k, v in graph.items()}
    assert "colintern.backbones.registry" in graph["colintern.retriever.model"]  # the graph is real: model asks the registry
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
    for script in ("colintern/scripts/train.py", "colintern/scripts/mine.py"):
        long = {name: n for name, n in function_lengths(REPO / script).items() if n > 80 and name != "parse_args"}
        assert not long, f"{script}: {long}"


def test_code_cites_the_repository_not_outside_it():
    outside = subprocess.run(["git", "grep", "-n", "-E", r"\.\./shared|SPEC[ ]§", "--", "*.py", "Makefile", ".ci/*"],
                             cwd=REPO, capture_output=True, text=True)
    assert outside.stdout == ""


SCRIPTS = ("train", "eval", "mine", "search", "plot_training_loss", "plot_vidore_metrics")


def test_the_package_installs_with_console_scripts_that_run_the_root_scripts_code():
    """pyproject.toml declares the package, its console scripts and an MIT licence; `make venv` installs it
    editable, so each console script is on the venv's PATH and answers --help; each root script is the same code."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["name"] == "colintern" and project["license"] == "MIT"
    assert (REPO / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    scripts = project["scripts"]
    assert scripts["colintern-train"] == "colintern.scripts.train:console"
    assert {target.split(":")[0] for target in scripts.values()} == \
        {f"colintern.scripts.{s}" for s in SCRIPTS} | {"colintern.data.make_dataset"}
    bin_dir = Path(sys.executable).parent
    for command, target in scripts.items():
        out = subprocess.run([str(bin_dir / command), "--help"], capture_output=True, text=True, timeout=120,
                             cwd="/")  # from anywhere: the installed package, not the checkout beside it
        assert out.returncode == 0 and out.stdout.startswith("usage: "), (command, out.stderr[-500:])
    for name in SCRIPTS:  # the root scripts are shims over the same modules
        tree = ast.parse((REPO / f"{name}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported == {f"colintern.scripts.{name}"} and len(tree.body) <= 4, name
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd="/")
    assert out.returncode == 0 and "--model_id" in out.stdout


def test_no_sys_path_edits_in_the_package_or_the_scripts():
    for path in [*PACKAGE.rglob("*.py"), *(REPO / f"{name}.py" for name in SCRIPTS), REPO / "mteb_model.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edits = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "path"
                 and isinstance(n.value, ast.Name) and n.value.id == "sys"]
        assert not edits, f"{path}: sys.path at lines {edits}"


# ------------------------------------------------------------------------------------------------ typed core (#23)


def package_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def test_the_package_never_reads_an_argparse_namespace():
    """Settings are typed objects (colintern.settings): no `args.X` read and no argparse.Namespace anywhere in the
    package; the parsers are generated from the settings classes (colintern/cli.py)."""
    for path in package_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        reads = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
                 and n.value.id == "args"]
        namespaces = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "Namespace"]
        assert not reads and not namespaces, f"{path}: args.X at {reads}, Namespace at {namespaces}"


def test_every_flag_is_written_once():
    """add_argument is called only by the generator (colintern/cli.py) and for train.py's --task; every settings
    field is declared by exactly one option(...) in colintern/settings/ (a command's own default goes through
    with_default, which keeps the one help text). The one name two commands use for different things is
    plot_training_loss.py's --lr switch beside train.py's learning rate."""
    callers = {}
    declared: dict[str, list[str]] = {}
    for path in package_modules():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                 and n.func.attr == "add_argument"]
        if calls:
            callers[path.relative_to(REPO).as_posix()] = len(calls)
        for node in ast.walk(tree):
            if isinstance(node, ast.AnnAssign) and isinstance(node.value, ast.Call) and \
                    getattr(node.value.func, "id", None) == "option":
                declared.setdefault(node.target.id, []).append(path.name)
    assert set(callers) == {"colintern/cli.py", "colintern/settings/train.py"}, callers
    assert callers["colintern/settings/train.py"] == 1  # --task
    twice = {name: where for name, where in declared.items() if len(where) > 1}
    assert twice == {"lr": ["tools.py", "train.py"]}, twice
    assert len(declared) > 150  # the scan is real: every command's flags


def test_at_most_six_modules_at_the_package_root_and_a_folder_per_concern():
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(root) <= 6, root
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == ["backbones", "data", "eval", "index", "itr", "mine", "retriever", "scripts", "settings", "testing",
                       "train"]
    for folder in folders:  # each folder says what lives there
        doc = ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text(encoding="utf-8")))
        assert doc and len(doc) > 40, folder


LIMITS = {"module": 500, "class": 250, "function": 80}


def test_modules_classes_and_functions_stay_small():
    found = {}
    for path in package_modules():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > LIMITS["module"]:
            found[rel] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > LIMITS["class"]:
                found[f"class {node.name}"] = size
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > LIMITS["function"]:
                found[f"def {node.name} ({rel})"] = size
    assert not found, found
    assert len(package_modules()) > 80  # the scan is real


def test_one_optimizer_step_and_one_loop_in_the_package():
    """optimizer.step() is called in one place (train/step.optimizer_step), and both training tasks run the one loop
    (train/loop.run_loop); no fault injection in the package outside colintern/testing/."""
    steps, loops = [], []
    for path in package_modules():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step":
                owner = node.func.value
                name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
                if "optimizer" in name:
                    steps.append(rel)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_loop":
                loops.append(rel)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "kill":
                assert rel.startswith("colintern/testing/"), f"{rel}: a kill outside the tests' fault hooks"
        assert "COLINTERN_FAULT" not in text, rel
    assert steps == ["colintern/train/step.py"], steps
    assert sorted(loops) == ["colintern/itr/train.py", "colintern/train/trainer.py"], loops


def test_faiss_is_imported_by_one_module():
    """FAISS in one place (colintern/index/faiss_index.py); mining and search take its index objects."""
    importers = set()
    for path in package_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(name == "faiss" or name.startswith("faiss.") for name in names):
                importers.add(path.relative_to(REPO).as_posix())
    assert importers == {"colintern/index/faiss_index.py"}, importers
