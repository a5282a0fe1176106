"""The package's structure: no import circles among its modules, zarr behind the store."""

from __future__ import annotations

import ast
from pathlib import Path

import observatory

PACKAGE = Path(observatory.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name, parsed."""
    return {module_name(path): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}


def imported(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports anywhere (module level or in a function).

    ``from package import name`` counts as importing the submodule ``package.name`` if there is
    one, else the package itself.
    """
    is_package = (PACKAGE.parent / name.replace(".", "/")).is_dir()
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                child = f"{base}.{alias.name}"
                out.add(child if child in known else base)
    return {target for target in out if target in known and target != name}


def import_graph() -> dict[str, set[str]]:
    parsed = modules()
    known = set(parsed)
    return {name: imported(name, tree, known) for name, tree in parsed.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_reports_a_cycle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_import_graph_sees_function_level_and_relative_imports():
    tree = ast.parse(
        "def f():\n    from observatory.store import FamilyStore\n"
        "from . import errors\nfrom .models import parameter_dims\n"
    )
    known = {"observatory.store", "observatory.errors", "observatory.models", "observatory.spec"}
    assert imported("observatory.spec", tree, known) == {
        "observatory.store",
        "observatory.errors",
        "observatory.models",
    }


def test_no_import_cycle_among_observatory_modules():
    graph = import_graph()
    assert "observatory.store" in graph["observatory.query.datasets"]  # the graph is really read
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def imported_packages(tree: ast.Module) -> set[str]:
    """Top-level names of every absolute import in ``tree``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add((node.module or "").partition(".")[0])
    return names


def test_only_the_store_imports_zarr():
    importers = [name for name, tree in modules().items() if "zarr" in imported_packages(tree)]
    assert importers and all(name.startswith("observatory.store.") for name in importers)


def test_importing_the_trainer_leaves_the_analyses_unimported():
    """Every dask worker that trains imports the trainer: it must not pay for the analyses."""
    import subprocess
    import sys

    code = (
        "import sys, observatory.train, observatory.analysis as a; "
        "names = ('ruptures', 'observatory.analysis.'); "
        "print(sorted(m for m in sys.modules if m.startswith(names))); "
        "a.head_scores; print('observatory.analysis.heads' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["['observatory.analysis.phase']", "True"]


def test_importing_the_query_api_leaves_the_training_loop_unimported():
    """Reading a store must not pay for the trainer: only a replay imports it."""
    import subprocess
    import sys

    code = (
        "import sys, observatory.query; "
        "print(sorted(m for m in sys.modules if m.startswith('observatory.train')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_checking_a_specs_architecture_does_not_import_torch():
    """The CLI loads a spec while torch imports in the background: the check must not wait."""
    import subprocess
    import sys

    code = (
        "import sys; from observatory.spec import load_run_spec; "
        "from observatory.models.registry import names; "
        "print(names(), 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "('attn_only', 'gpt_neox') False"


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 60


def code_lines(tree: ast.Module, lines: list[str], first: int, last: int) -> int:
    """Lines of code in ``first..last`` (1-based): docstrings, comments and blanks not counted."""
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    return sum(
        1
        for number in range(first, last + 1)
        if number not in docstrings
        and lines[number - 1].strip()
        and not lines[number - 1].strip().startswith("#")
    )


def oversized(source: str, name: str) -> list[str]:
    """The module (over 600 lines of code) and functions (over 60) of ``source`` too long."""
    tree, lines = ast.parse(source), source.splitlines()
    out = []
    if (n := code_lines(tree, lines, 1, len(lines))) > MAX_MODULE_LINES:
        out.append(f"{name}: {n} lines of code")
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            n = code_lines(tree, lines, node.lineno, node.end_lineno)
            if n > MAX_FUNCTION_LINES:
                out.append(f"{name}:{node.lineno} {node.name}: {n} lines of code")
    return out


def test_oversized_counts_code_and_not_docstrings_or_comments():
    body = "\n".join(f"    x{i} = {i}  # one" for i in range(60))
    long_function = f'def f():\n    """Doc.\n\n    More.\n    """\n    # why\n{body}\n'
    assert oversized(long_function, "m") == ["m:1 f: 61 lines of code"]
    short = long_function.replace("    x59 = 59  # one\n", "")
    assert oversized(short, "m") == []


def test_no_module_over_600_lines_and_no_function_over_60():
    found = [
        problem
        for path in sorted(PACKAGE.rglob("*.py"))
        for problem in oversized(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    ]
    assert found == []
