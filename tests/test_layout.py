"""The runtime packages stand alone: `api`, `worker` and `shared` are what the images ship,
so none of them may import the development tooling, the load runs or the tests."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.processes import ROOT

RUNTIME = ("api", "worker", "shared")
NOT_SHIPPED = ("devtools", "load", "tests")


def imported(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """(line, module) of every absolute import in `tree`, and of every import_module() or
    __import__() of a literal name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute | ast.Name)
            and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id)
            in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def forbidden(source: str, filename: str) -> list[str]:
    return [
        f"{filename}:{line} imports {module}"
        for line, module in imported(ast.parse(source, filename))
        if module.split(".")[0] in NOT_SHIPPED
    ]


def runtime_modules() -> list[Path]:
    return sorted(path for package in RUNTIME for path in (ROOT / package).rglob("*.py"))


def test_the_check_finds_every_form_of_import() -> None:
    source = "\n".join(
        [
            "import devtools",
            "import load.bench as bench",
            "from tests.helpers import operate",
            "from devtools import servers",
            "import importlib; importlib.import_module('load.chaos')",
            "__import__('tests')",
            "from . import keys",  # relative: inside its own package
            "import shared.keys, loader, testsuite",
        ]
    )
    assert [line.split(" imports ")[1] for line in forbidden(source, "x.py")] == [
        "devtools",
        "load.bench",
        "tests.helpers",
        "devtools",
        "load.chaos",
        "tests",
    ]


@pytest.mark.parametrize("package", RUNTIME)
def test_a_runtime_package_imports_no_tooling_load_or_tests(package: str) -> None:
    modules = [p for p in runtime_modules() if p.relative_to(ROOT).parts[0] == package]
    assert modules, f"no modules found in {package}/"
    problems = [
        problem
        for path in modules
        for problem in forbidden(path.read_text(), str(path.relative_to(ROOT)))
    ]
    assert problems == []


def test_the_installed_packages_are_the_runtime_ones_and_the_checks_cover_the_rest() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    included = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(name.rstrip("*") for name in included) == sorted(RUNTIME)
    checked = set(pyproject["tool"]["mypy"]["files"])
    assert checked >= {*RUNTIME, *NOT_SHIPPED, "alembic"}


# The write path's Redis commands: only shared/queue.py names them. As a string, as the
# redis-py method of the same name, or, for its Lua scripts (shared/scripts.py), as the
# script a call runs (loading one is no call).
QUEUE_COMMANDS = (
    "XADD",
    "XREAD",
    "XRANGE",
    "XREVRANGE",
    "XTRIM",
    "XDEL",
    "PUBLISH",
    "SPUBLISH",
    "SADD",
    "SREM",
)
QUEUE_SCRIPTS = ("ENQUEUE_SHA", "ACKNOWLEDGE_READ_SHA", "DIRTY_SINCE", "TRIM_WAKES")


def queue_commands(source: str) -> list[tuple[int, str]]:
    """(line, command) of every write-path command a module spells."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in QUEUE_COMMANDS:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Attribute) and node.attr.upper() in QUEUE_COMMANDS:
            found.append((node.lineno, node.attr))
        elif (
            isinstance(node, ast.Name | ast.alias)
            and (node.id if isinstance(node, ast.Name) else node.name) in QUEUE_SCRIPTS
        ):
            found.append((getattr(node, "lineno", 0), "a queue script"))
    return sorted(found)


def test_the_command_check_finds_strings_and_method_calls() -> None:
    source = (
        'send(("XADD", key))\nawait redis.xrange(k)\nlog("the XREAD")\n'
        "pipe.evalsha(ENQUEUE_SHA, 4)\nredis.script_load(ENQUEUE)\n"
    )
    assert queue_commands(source) == [(1, "XADD"), (2, "xrange"), (4, "a queue script")]


@pytest.mark.parametrize("package", ["api", "worker"])
def test_only_the_queue_protocol_spells_the_write_path_s_commands(package: str) -> None:
    spelled = [
        f"{path.relative_to(ROOT)}:{line}: {command}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for line, command in queue_commands(path.read_text())
    ]
    assert spelled == [], "use shared/queue.py"


MODULE_LINES_MAX = 400  # a module of the service that grows past it does two jobs
FUNCTION_LINES_MAX = 60


def test_the_service_s_modules_stay_small() -> None:
    long = [
        f"{path.relative_to(ROOT)}: {n} lines"
        for package in RUNTIME
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text().splitlines())) > MODULE_LINES_MAX
    ]
    assert long == []


def test_no_function_outside_the_tests_is_long() -> None:
    long = []
    for package in (*RUNTIME, "alembic", "devtools", "load"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = (node.end_lineno or node.lineno) - node.lineno + 1
                    if lines > FUNCTION_LINES_MAX:
                        long.append(f"{path.relative_to(ROOT)}: {node.name}, {lines} lines")
    assert long == []
