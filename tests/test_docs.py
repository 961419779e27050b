"""The documents held to the code: every relative link and anchor resolves, README stays
short, every setting is documented, and the README's Docker quickstart works as written.

The quickstart test takes the shell blocks under README's quickstart heading as they are:
it runs the first ones (up to `docker compose up`) in a scratch directory holding a copy of
`.env.example`, with `docker` standing in for the engine; starts an API and a worker with
the settings docker-compose.yml gives them from the `.env` those blocks made (only the
database, Redis, key prefix and a loopback port are the test's); then runs the rest with
bash against that API, the base URL the only change, and checks every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from devtools.processes import ROOT, free_port, spawn
from devtools.waiting import wait_ready
from shared.settings import Settings

DOCUMENTS = sorted(
    [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        ROOT / "CONTRIBUTING.md",
        *(ROOT / "docs").glob("*.md"),
    ]
)
README_MAX_LINES = 350
QUICKSTART_HEADING = "## Quickstart with Docker Compose"
README_BASE_URL = "http://localhost:8000"  # what the quickstart's curls call
BASH_SECONDS = 120
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# What the quickstart must show: register, a token, two wallets, a deposit, a transfer, the
# wallet read back with its ledger.
QUICKSTART_ROUTES = {
    ("POST", "/api/auth/users"),
    ("POST", "/api/auth/token"),
    ("POST", "/api/v1/wallets"),
    ("POST", "/api/v1/wallets/{id}/operation"),
    ("POST", "/api/v1/transfers"),
    ("GET", "/api/v1/wallets/{id}"),
    ("GET", "/api/v1/wallets/{id}/operations"),
}

FENCE = re.compile(r"^(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_LINK = re.compile(
    r"!?\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
SCHEME = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


# -- links and anchors ---------------------------------------------------------------------


def prose_lines(text: str) -> Iterator[str]:
    """The lines outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line.strip()):
            fenced = not fenced
            continue
        if not fenced:
            yield line


def slug(heading: str) -> str:
    """The anchor GitHub makes of a heading: its text, lower-case, without punctuation but
    hyphens and underscores, spaces as hyphens."""
    text = CODE_SPAN.sub(lambda m: m[2], heading)
    text = INLINE_LINK.sub(lambda m: m[1], text)
    text = re.sub(r"<[^>]+>", "", text).replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose_lines(text):
        heading = HEADING.match(line)
        if not heading:
            continue
        base = slug(heading[2])
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", text))
    return found


def links(text: str) -> Iterator[str]:
    for line in prose_lines(text):
        line = CODE_SPAN.sub("", line)
        yield from (m[2] for m in INLINE_LINK.finditer(line))
        reference = REFERENCE.match(line)
        if reference:
            yield reference[1]


def broken_links(document: Path) -> list[str]:
    """Each relative link of `document` whose file, or whose #anchor in it, is missing."""
    text = document.read_text()
    broken = []
    for target in links(text):
        if SCHEME.match(target):
            continue  # http(s), mailto: not this test's business
        path, _, anchor = target.partition("#")
        linked = (document.parent / path).resolve() if path else document
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(f"{target}: no heading makes #{anchor}")
    return broken


def test_anchors_are_made_as_github_makes_them() -> None:
    assert slug("A lone request's path") == "a-lone-requests-path"
    assert slug("Health, readiness, metrics") == "health-readiness-metrics"
    assert slug("`SHARD_COUNT` and [Redis](https://redis.io)") == "shard_count-and-redis"
    assert slug("[0.1.0] - 2026-12-06") == "010---2026-12-06"
    assert anchors("# Tests\n## Tests\n```\n# not a heading\n```\n") == {"tests", "tests-1"}


def test_a_broken_link_or_anchor_is_found(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## Its part\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n[fine](other.md#its-part), [fine too](#page), [web](https://example.com)\n"
        "[gone](missing.md) and [wrong](other.md#nowhere) and [here](#nothing)\n"
        "`[in code](nowhere.md)`\n```\n[in a block](nowhere.md)\n```\n[ref]: other.md#other\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nowhere: no heading makes #nowhere",
        "#nothing: no heading makes #nothing",
    ]


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(document: Path) -> None:
    assert broken_links(document) == []


def test_the_documents_are_there() -> None:
    names = {str(p.relative_to(ROOT)) for p in DOCUMENTS}
    for topic in (
        "architecture",
        "api",
        "configuration",
        "deployment",
        "operations",
        "security",
        "commands",
        "benchmarks",
        "testing",
        "decisions",
    ):
        assert f"docs/{topic}.md" in names
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_readme_is_short() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; the rest belongs in docs/"


def test_every_setting_is_documented() -> None:
    documented = (ROOT / "docs" / "configuration.md").read_text()
    example = (ROOT / ".env.example").read_text()
    names = {f.name.upper() for f in dataclasses.fields(Settings)}
    names |= set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, re.MULTILINE))
    missing = sorted(n for n in names if f"`{n}`" not in documented)
    assert missing == [], f"docs/configuration.md does not name {missing}"


# -- the README's Docker quickstart ---------------------------------------------------------


def quickstart_blocks() -> tuple[str, str]:
    """The quickstart's shell blocks as README has them: those up to `docker compose up`,
    and those after."""
    text = (ROOT / "README.md").read_text()
    assert QUICKSTART_HEADING in text, f"README.md has no {QUICKSTART_HEADING!r}"
    section = text.split(QUICKSTART_HEADING, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    starts = [i for i, b in enumerate(blocks) if re.search(r"^docker compose up", b, re.M)]
    assert starts, "the quickstart never runs `docker compose up`"
    setup, rest = blocks[: starts[0] + 1], blocks[starts[0] + 1 :]
    assert rest, "no commands after `docker compose up`"
    return "\n".join(setup), "\n".join(rest)


def read_dotenv(path: Path) -> dict[str, str]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            name, _, value = line.partition("=")
            found[name.strip()] = value.strip().strip("'\"")
    return found


VARIABLE = re.compile(
    r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """`value` as docker compose interpolates it from `env` (its `.env`)."""

    def one(m: re.Match[str]) -> str:
        if m[1]:
            return "$"
        name, operator, argument = m[2] or m[5], m[3], m[4] or ""
        if operator is None:
            return env.get(name, "")
        present = bool(env.get(name)) if operator.startswith(":") else name in env
        if present:
            return env[name]
        if operator.endswith("?"):
            raise ValueError(f"docker compose would refuse to start: {name}: {argument}")
        return argument

    return VARIABLE.sub(one, value)


async def run_bash(script: str, cwd: Path, env: Mapping[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        script,
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), BASH_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError(f"the README's commands ran longer than {BASH_SECONDS}s") from None
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


# Stand-ins for the engine (the test runs the stack itself) and, where it is missing, for
# openssl's random hex.
SETUP_PREAMBLE = """set -eo pipefail
docker() { echo "docker $*" >> "$DOCKER_CALLS"; }
command -v openssl >/dev/null ||
  openssl() { python3 -c 'import secrets,sys; print(secrets.token_hex(int(sys.argv[-1])))' "$@"; }
"""
# Each curl also reports its status to stderr, and ends its answer with a newline.
CURL_PREAMBLE = """set -eo pipefail
curl() {
  local rc=0
  command curl -w '%{stderr}<<curl %{http_code} %{method} %{url_effective}>>\\n' "$@" || rc=$?
  echo
  return $rc
}
"""


@contextlib.asynccontextmanager
async def compose_stack(
    env_file: Path, settings: Settings, logs: Path
) -> AsyncIterator[tuple[str, Settings]]:
    """An API and a worker with the environment docker-compose.yml gives each from
    `env_file`, on the test's PostgreSQL, Redis and key prefix and a loopback port."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dotenv = read_dotenv(env_file)
    port = free_port()
    local = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "REDIS_CLUSTER": str(settings.redis_cluster).lower(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKER_METRICS_PORT": str(free_port()),
    }
    processes = []
    served = None
    try:
        for service in ("worker", "api"):
            given = compose["services"][service]["environment"]
            env = {name: interpolate(str(value), dotenv) for name, value in given.items()}
            assert dotenv["POSTGRES_PASSWORD"] in env["DATABASE_URL"]
            served = Settings.from_env({**env, **local})
            with (logs / f"{service}.log").open("wb") as log:
                processes.append(
                    spawn(service, {**env, **local}, stdout=log, stderr=subprocess.STDOUT)
                )
        assert served is not None
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"{base}/ready")
        yield base, served
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def answers(stdout: str) -> list[dict[str, Any]]:
    """The JSON answers the commands printed, one a line."""
    return [orjson.loads(line) for line in stdout.splitlines() if line.strip()]


def one(found: list[dict[str, Any]], what: str) -> dict[str, Any]:
    assert len(found) == 1, f"expected one {what} among the answers, found {found}"
    return found[0]


async def test_the_readme_docker_quickstart_works_as_written(
    settings: Settings, pg: Any, tmp_path: Path
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the README's quickstart is curl commands")
    setup, commands = quickstart_blocks()
    assert README_BASE_URL in commands
    shell_env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DOCKER_CALLS": str(tmp_path / "docker-calls"),
    }
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(ROOT / ".env.example", checkout / ".env.example")

    code, _, err = await run_bash(SETUP_PREAMBLE + setup, checkout, shell_env)
    assert code == 0, err
    assert "compose up" in (tmp_path / "docker-calls").read_text()
    dotenv = read_dotenv(checkout / ".env")
    for secret in ("POSTGRES_PASSWORD", "JWT_SECRET"):
        assert dotenv.get(secret), f"the quickstart leaves {secret} empty"
        assert dotenv[secret] != read_dotenv(ROOT / ".env.example").get(secret)

    async with compose_stack(checkout / ".env", settings, tmp_path) as (base, served):
        # The stack the README describes: authentication on, with the secret it made.
        assert served.auth_enabled
        assert served.jwt_secret == dotenv["JWT_SECRET"]
        script = CURL_PREAMBLE + commands.replace(README_BASE_URL, base)
        code, out, err = await run_bash(script, tmp_path, shell_env)
    assert code == 0, f"exit {code}\n{err}\n{out}"

    # Every call the commands made, by route, with its statuses (the wait for the stack aside).
    seen: dict[tuple[str, str], list[int]] = {}
    for status, method, url in re.findall(r"<<curl (\d{3}) (\S+) (\S+)>>", err):
        route = UUID.sub("{id}", url.removeprefix(base)).split("?")[0]
        if route != "/ready":
            seen.setdefault((method, route), []).append(int(status))
    refused = {route: s for route, s in seen.items() if not all(200 <= c < 300 for c in s)}
    assert refused == {}, f"answers that were not 2xx: {refused}\n{out}"
    assert set(seen) >= QUICKSTART_ROUTES, f"routes never called: {QUICKSTART_ROUTES - set(seen)}"
    assert seen[("POST", "/api/auth/users")] == [201]
    assert seen[("POST", "/api/v1/wallets")] == [201, 201]

    printed = answers(out)
    user = one([a for a in printed if "username" in a], "registered user")
    deposit = one([a for a in printed if a.get("operation_type") == "DEPOSIT"], "deposit")
    transfer = one([a for a in printed if "from" in a and "to" in a], "transfer")
    wallet = one(
        [
            a
            for a in printed
            if set(a) == {"id", "balance", "held", "available", "created_at", "updated_at"}
        ],
        "wallet",
    )
    ledger = one([a for a in printed if "items" in a], "ledger page")

    assert deposit["status"] == "applied"
    assert deposit["balance"] == deposit["amount"]
    assert transfer["status"] == "completed"
    assert transfer["from"] == deposit["wallet_id"] == wallet["id"]
    left = Decimal(deposit["amount"]) - Decimal(transfer["amount"])
    assert Decimal(transfer["balance"]) == left
    assert Decimal(wallet["balance"]) == left
    assert [(i["operation_type"], Decimal(i["balance"])) for i in ledger["items"]] == [
        ("TRANSFER_OUT", left),
        ("DEPOSIT", Decimal(deposit["amount"])),
    ]
    assert ledger["items"][0]["counterparty"] == transfer["to"]

    # What PostgreSQL holds: both wallets exact, and both the registered user's.
    rows = {
        str(r["id"]): r
        for r in await pg.fetch(
            "SELECT id, balance, owner_id FROM wallets WHERE id = any($1::uuid[])",
            [transfer["from"], transfer["to"]],
        )
    }
    assert rows[transfer["from"]]["balance"] == int(left * 100)
    assert rows[transfer["to"]]["balance"] == int(Decimal(transfer["amount"]) * 100)
    assert {str(r["owner_id"]) for r in rows.values()} == {user["id"]}
