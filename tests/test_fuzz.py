"""Hostile input everywhere: schemathesis generates requests from the served OpenAPI
document and sends them to real processes. The document is held to the server both ways:
every request it allows is accepted (no 4xx but those of state: 401, 404, 409, 429), every
request it forbids is refused with a 4xx; and no answer may be a 5xx or break the
documented schema, status codes or content types. Bounded for the suite (FUZZ_EXAMPLES per
operation, default 100); docs/testing.md says how to run it longer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from shared.settings import Settings
from tests.helpers import serving

CHECKS = ",".join(
    (
        "not_a_server_error",
        "response_schema_conformance",
        "status_code_conformance",
        "content_type_conformance",
        "positive_data_acceptance",
        "negative_data_rejection",
    )
)
HOOKS = Path(__file__).with_name("fuzz_hooks.py")


@pytest.fixture(params=[False, True], ids=["auth-off", "auth-on"])
async def service(
    request: pytest.FixtureRequest, settings: Settings
) -> AsyncIterator[tuple[str, dict[str, str]]]:
    auth = {
        "auth_enabled": request.param,
        "jwt_secret": "fuzz-" + "k" * 40 if request.param else "",
        "login_user_limit": 1_000_000,
        "login_address_limit": 1_000_000,
        "registration_address_limit": 1_000_000,
        "registration_total_limit": 1_000_000,
    }
    async with serving(settings, **auth) as (base, _):
        headers: dict[str, str] = {}
        if request.param:
            user = {"username": "fuzzer", "password": "a fuzzing password"}
            async with aiohttp.ClientSession(base) as http:
                async with http.post("/api/auth/users", json=user) as r:
                    assert r.status == 201
                async with http.post("/api/auth/token", json=user) as r:
                    headers["Authorization"] = f"Bearer {(await r.json())['access_token']}"
        yield base, headers


async def test_schemathesis_finds_no_server_error_and_no_schema_break(
    service: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    base, headers = service
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base}/api/openapi.json",
        "--checks",
        CHECKS,
        "--max-examples",
        os.environ.get("FUZZ_EXAMPLES", "100"),
        "--seed",
        os.environ.get("FUZZ_SEED", "1"),
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--no-color",
        "--report-dir",
        str(tmp_path),
        *(arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")),
    ]
    run = await asyncio.to_thread(
        subprocess.run,
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "SCHEMATHESIS_HOOKS": str(HOOKS)},
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "passed" in run.stdout
