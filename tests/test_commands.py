"""The commands: wallet-api, wallet-worker, wallet-inspect and wallet-admin answer --help and
--version from a fresh install (`pip install .` into a new venv), and the `python -m` forms
keep working."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.processes import ROOT

COMMANDS = {
    "wallet-api": "The HTTP service",
    "wallet-worker": "One shard worker",
    "wallet-inspect": "Looking into the write path",
    "wallet-admin": "Administration",
}
VERSION_OF_THE_CHECKOUT = next(
    line.split('"')[1]
    for line in (ROOT / "pyproject.toml").read_text().splitlines()
    if line.startswith("version = ")
)
# What a checkout holds that is no part of the package: left out of the copy that is installed.
NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", ".run", "*.egg-info", "build", "__pycache__", ".*_cache", "tests", "load"
)


def bare_environment() -> dict[str, str]:
    """No setting of the service: --help and --version must not need one. pip's own
    configuration (an index, a cache) is kept."""
    kept = ("PATH", "HOME", "LANG", "TMPDIR")
    return {k: v for k, v in os.environ.items() if k in kept or k.startswith("PIP_")}


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a new venv with the project installed from a copy of the
    checkout, not editable, with pip's cache."""
    where = tmp_path_factory.mktemp("fresh-install")
    source = where / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCES)
    venv = where / "venv"
    env = bare_environment()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120, env=env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(source)]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=400, env=env)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    return venv / "bin"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_answers_help_and_version_from_a_fresh_install(
    fresh_install: Path, command: str
) -> None:
    executable = fresh_install / command
    assert executable.exists(), f"{command} is not among the installed scripts"
    run = [str(executable)]
    env = bare_environment()
    version = subprocess.run(
        [*run, "--version"], capture_output=True, text=True, timeout=60, env=env
    )
    assert (version.returncode, version.stdout) == (0, f"{command} {VERSION_OF_THE_CHECKOUT}\n")
    helped = subprocess.run([*run, "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith(f"usage: {command} ")
    assert COMMANDS[command] in helped.stdout
    assert "exit status:\n  0  " in helped.stdout
    assert helped.stderr == ""


@pytest.mark.parametrize(
    ("module", "words"),
    [
        ("api", "--version"),
        ("worker", "--check"),  # --help starts no worker (it would fail here: no settings)
        ("worker.inspect", "dead-letters"),
        ("api.users", "requeue-dead-letters"),
    ],
)
def test_python_dash_m_keeps_working(module: str, words: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=ROOT,
        env=bare_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert words in run.stdout


def test_a_command_line_it_refuses_exits_2() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "api.admin", "requeue-dead-letters"],  # no selection
        cwd=ROOT,
        env=bare_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "choose the dead letters: --all, or --wallet and/or --entry" in run.stderr
