"""Logs: the access log (ACCESS_LOG_SAMPLE), off by default, with no secret in any line, and
LOG_LEVEL obeyed by the processes."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from api.app import create_app
from devtools.processes import free_port, spawn
from devtools.waiting import wait_ready
from shared.logs import JsonFormatter
from shared.settings import Settings
from tests.conftest import AiohttpClient

SECRET = "jwt-secret-never-logged-" + "x" * 16
PASSWORD = "password never logged"


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """Every record as the processes write it: a JSON object. Not aiohttp's own access log,
    which logs the path as sent, query string and all: the test server has it, `wallet-api`
    turns it off."""
    formatter = JsonFormatter()
    return [
        orjson.loads(formatter.format(record))
        for record in caplog.records
        if record.name != "aiohttp.access"
    ]


async def test_an_access_line_per_request_with_no_secret(
    aiohttp_client: AiohttpClient, settings: Settings, worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    logged = dataclasses.replace(
        settings, auth_enabled=True, jwt_secret=SECRET, access_log_sample=1.0
    )
    http = await aiohttp_client(create_app(logged))
    caplog.set_level(logging.DEBUG)
    name = f"user-{uuid.uuid4().hex[:8]}"
    credentials = {"username": name, "password": PASSWORD}
    assert (await http.post("/api/auth/users", json=credentials)).status == 201
    tokens = await (await http.post("/api/auth/token", json=credentials)).json()
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    made = await http.post("/api/v1/wallets", headers=bearer)
    wallet = (await made.json())["id"]
    read = await http.get(
        f"/api/v1/wallets/{wallet}?token={tokens['refresh_token']}", headers=bearer
    )
    assert read.status == 200
    refused = await http.get(f"/api/v1/wallets/{wallet}")  # no token
    assert refused.status == 401

    every = lines(caplog)
    access = [line for line in every if line["logger"] == "api.access"]
    assert [(a["method"], a["route"], a["status"]) for a in access] == [
        ("POST", "/api/auth/users", 201),
        ("POST", "/api/auth/token", 200),
        ("POST", "/api/v1/wallets", 201),
        ("GET", "/api/v1/wallets/{wallet_id}", 200),
        ("GET", "/api/v1/wallets/{wallet_id}", 401),
    ]
    assert access[3]["request_id"] == read.headers["X-Request-Id"]
    assert all(a["level"] == "info" and a["duration_ms"] >= 0 for a in access)
    assert access[3]["message"].startswith("GET /api/v1/wallets/{wallet_id} 200 ")
    text = orjson.dumps(every).decode()
    for secret in (SECRET, PASSWORD, tokens["access_token"], tokens["refresh_token"], "Bearer"):
        assert secret not in text


async def test_no_access_line_by_default(
    aiohttp_client: AiohttpClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    assert settings.access_log_sample == 0
    http = await aiohttp_client(create_app(settings))
    caplog.set_level(logging.DEBUG)
    assert (await http.get("/health")).status == 200
    assert not [line for line in lines(caplog) if line["logger"] == "api.access"]


@pytest.mark.parametrize(("level", "shown"), [("INFO", True), ("WARNING", False)])
async def test_the_api_process_logs_at_its_log_level(
    settings: Settings, tmp_path: Path, level: str, shown: bool
) -> None:
    served = dataclasses.replace(
        settings, host="127.0.0.1", port=free_port(), log_level=level, access_log_sample=1.0
    )
    log = tmp_path / "api.log"
    with log.open("wb") as out:
        api = spawn("api", served.to_env(), stderr=out)
    try:
        base = f"http://127.0.0.1:{served.port}"
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"{base}/health", within=30)
            async with http.get(f"{base}/api/v1/wallets/{uuid.uuid4()}") as r:
                assert r.status == 404
    finally:
        api.terminate()
        api.wait(timeout=20)
    written = [orjson.loads(line) for line in log.read_text().splitlines()]
    starting = [w for w in written if w["message"].startswith("starting with Settings(")]
    access = [w for w in written if w["logger"] == "api.access" and w["status"] == 404]
    assert (bool(starting), bool(access)) == (shown, shown), written
    assert all(w["level"] in ("warning", "error", "critical") for w in written if not shown)
