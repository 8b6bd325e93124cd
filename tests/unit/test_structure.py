"""The shape of the code base: avgk's layers (import-linter's contracts in pyproject.toml), no import
cycle, no private name used across modules, short modules, documented packages, a tests/ folder
without benchmarks. Static checks only (files and `ast`, no import of avgk): a few seconds, no Ray.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("avgk", "pipelines")
"""The first-party packages the import rules cover (pyproject.toml's root_packages)."""
FIRST_PARTY = (*PACKAGES, "tests", "benchmarks")
MAX_LINES = 450

# The console script `lint-imports` is this entry point; calling it through sys.executable needs no
# bin folder on PATH. --no-cache: nothing is written beside the checked tree.
LINT_IMPORTS = [
    sys.executable,
    "-c",
    "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())",
    "--no-cache",
    "--no-logo",
]


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(LINT_IMPORTS, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def source_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


# ---------------------------------------------------------------- (a), (b) the layer contracts


def test_import_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


# Each case adds one import that a contract forbids; the contracts must name the importing module.
FORBIDDEN_IMPORTS = [
    ("upward", "avgk/runtime/console.py", "from avgk.experiments import summary\n", "avgk.runtime.console"),
    (
        "type-only upward",
        "avgk/models/small_cnn.py",
        "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from avgk.training.parts import Parts\n",
        "avgk.models.small_cnn",
    ),
    (
        "function-local upward",
        "avgk/config/registry.py",
        "def _late_loaders():\n    from avgk.data import loaders\n\n    return loaders\n",
        "avgk.config.registry",
    ),
    ("ray", "avgk/method/thresholds.py", "import ray\n", "avgk.method.thresholds"),
    ("pipelines", "avgk/inference/predict.py", "from pipelines import cli\n", "avgk.inference.predict"),
    ("a subpackage with no layer", "avgk/extras/__init__.py", '"""Not in the layers contract."""\n', "avgk.extras"),
]


@pytest.mark.parametrize(
    ("path", "code", "named"), [case[1:] for case in FORBIDDEN_IMPORTS], ids=[case[0] for case in FORBIDDEN_IMPORTS]
)
def test_import_contracts_catch_a_forbidden_import(tmp_path, path, code, named):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / path
    target.parent.mkdir(parents=True, exist_ok=True)
    before = target.read_text(encoding="utf-8") if target.exists() else ""
    target.write_text(before + "\n\n" + code, encoding="utf-8")

    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "BROKEN" in result.stdout and named in result.stdout, result.stdout + result.stderr


# ---------------------------------------------------------------- (c) no import cycle


def first_party_modules() -> dict[str, Path]:
    return {module_name(path): path for path in source_files(*PACKAGES)}


def reexports(init: Path, package: str) -> dict[str, tuple[str, str]]:
    """name -> (module, name there) for each `from X import name [as alias]` at the top of a package's __init__."""
    names: dict[str, tuple[str, str]] = {}
    for node in parse(init).body:
        if isinstance(node, ast.ImportFrom):
            source = resolve_from(node, package, is_package=True)
            for alias in node.names:
                names[alias.asname or alias.name] = (source, alias.name)
    return names


def resolve_from(node: ast.ImportFrom, module: str, *, is_package: bool) -> str:
    """The absolute module a (possibly relative) `from ... import` names."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the first-party modules it imports anywhere in its file (top level, in functions,
    under `if TYPE_CHECKING:`).

    `from P import name` goes to the module P.name if there is one, else to the module that a
    package's __init__ re-exports `name` from (followed through nested re-exports), else to P.
    Edges to a module's own ancestor packages are left out: Python imports those before the module
    anyway, so they order nothing (a package importing its children is kept: that is real).
    """
    modules = first_party_modules()
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    exported = {name: reexports(modules[name], name) for name in packages}

    def target_of(source: str, name: str) -> str:
        for _ in range(10):  # nested re-exports are at most a few levels deep
            if f"{source}.{name}" in modules:
                return f"{source}.{name}"
            if source in exported and name in exported[source] and exported[source][name][0] != source:
                source, name = exported[source][name]
                continue
            break
        return source

    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = resolve_from(node, module, is_package=module in packages)
                edges.update(target_of(source, alias.name) for alias in node.names)
        graph[module] = {
            edge for edge in edges if edge in modules and edge != module and not module.startswith(edge + ".")
        }
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in sorted(graph[node]):
            if edge not in index:
                visit(edge)
                low[node] = min(low[node], low[edge])
            elif edge in on_stack:
                low[node] = min(low[node], index[edge])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_resolves_re_exports_and_keeps_lazy_imports():
    graph = import_graph()
    # `from avgk.config import LossConfig` is an import of the module that defines LossConfig
    assert "avgk.config.model" in graph["avgk.method.losses.baselines"]
    # a function-local import counts
    assert "avgk.records.tracking" in graph["avgk.training.preflight"]
    # a package's __init__ imports its children
    assert "avgk.config.model" in graph["avgk.config"]


def test_no_import_cycle():
    cycles = strongly_connected(import_graph())
    assert not cycles, "modules that import each other (directly or through others):\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


# ---------------------------------------------------------------- (d) no private names across modules


def private_names_used(path: Path, modules: set[str]) -> tuple[list[str], list[str]]:
    """(`from M import _name` of a first-party M, `m._name` where m is another first-party module).

    Third-party private names are the business of the pins in pyproject.toml, not checked here.
    """
    module = module_name(path)
    is_package = path.name == "__init__.py"
    imported, accessed = [], []
    module_aliases: dict[str, str] = {}
    tree = parse(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = resolve_from(node, module, is_package=is_package)
            if source.split(".")[0] not in FIRST_PARTY:
                continue
            for alias in node.names:
                if alias.name.startswith("_") and not (alias.name.startswith("__") and alias.name.endswith("__")):
                    imported.append(f"{path.relative_to(ROOT)}:{node.lineno}: from {source} import {alias.name}")
                if f"{source}.{alias.name}" in modules:
                    module_aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules and alias.asname:
                    module_aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = ast.unparse(node.value)
            owner = module_aliases.get(owner, owner)
            if owner in modules and owner != module:
                accessed.append(f"{path.relative_to(ROOT)}:{node.lineno}: {owner}.{node.attr}")
    return imported, accessed


# Tests may reach into the private state of the module they test (guardian._proc, ray_env._free_port):
# for tests/ only imports are checked.
@pytest.mark.parametrize(
    ("folder", "check_attributes"),
    [("avgk", True), ("pipelines", True), ("benchmarks", True), ("tests", False)],
)
def test_no_private_name_crosses_a_module(folder, check_attributes):
    modules = {module_name(path) for path in source_files(*FIRST_PARTY)}
    found = []
    for path in source_files(folder):
        imported, accessed = private_names_used(path, modules)
        found += imported + (accessed if check_attributes else [])
    assert not found, "underscored names used outside their module (make them public):\n" + "\n".join(found)


# ---------------------------------------------------------------- (e), (f), (g) files and folders


@pytest.mark.parametrize("package", PACKAGES)
def test_modules_are_short(package):
    long = {
        str(path.relative_to(ROOT)): lines
        for path in source_files(package)
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines (split them by role): {long}"


def test_every_avgk_package_says_what_it_holds():
    folders = {path.parent for path in source_files("avgk")}
    problems = []
    for folder in sorted(folders):
        init = folder / "__init__.py"
        if not init.exists():
            problems.append(f"{folder.relative_to(ROOT)}: no __init__.py")
            continue
        docstring = ast.get_docstring(parse(init))
        if folder != ROOT / "avgk" and (not docstring or docstring.strip().upper() == "TODO"):
            problems.append(f"{init.relative_to(ROOT)}: no docstring")
    assert not problems, "\n".join(problems)


def test_tests_hold_no_benchmarks_or_gpu_checks():
    misplaced = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("*")
        if "__pycache__" not in path.parts
        and ((path.is_file() and path.name.startswith("bench_")) or (path.is_dir() and path.name.lower() == "gpu"))
    )
    assert not misplaced, f"benchmarks/ holds benchmarks and GPU checks, not tests/: {misplaced}"
