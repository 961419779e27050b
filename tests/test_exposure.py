"""What the API shows about itself, and to whom: the metrics on a port of their own, one
per process; the live view computed at most once a second, and only for a signed-in
caller when authentication is on."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import uuid
from typing import Any

import aiohttp
import pytest

from api.app import create_app
from devtools.processes import free_port
from shared.settings import Settings
from tests.conftest import AiohttpClient
from tests.helpers import Client, eventually


async def scrape(port: int) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        assert r.status == 200
        return await r.text()


async def test_each_api_process_serves_its_metrics_on_a_port_of_its_own(
    aiohttp_client: AiohttpClient, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Two API processes on one host with one API_METRICS_PORT (as with REUSE_PORT): the
    second takes the next free port and says so; each port shows one process's figures,
    and the public port shows none."""
    caplog.set_level(logging.INFO, logger="api")
    port = free_port()
    local = dataclasses.replace(settings, host="127.0.0.1", api_metrics_port=port)
    first = await aiohttp_client(create_app(local))
    second = await aiohttp_client(create_app(local))
    taken = [
        re.fullmatch(r"metrics on port (\d+)(?: \(API_METRICS_PORT (\d+) is taken\))?", m)
        for m in caplog.messages
        if m.startswith("metrics on port")
    ]
    assert [m and m.group(2) for m in taken] == [None, str(port)]
    ports = [int(m.group(1)) for m in taken if m]
    assert ports[0] == port
    assert ports[1] > port

    for _ in range(3):
        assert (await first.get("/health")).status == 200
    health = 'wallet_http_requests_total{method="GET",route="/health",status="200"}'
    assert f"{health} 3.0" in await scrape(ports[0])
    assert health not in await scrape(ports[1])
    for app in (first, second):
        assert (await app.get("/metrics")).status == 404


async def live(client: Client, **headers: str) -> Any:
    r = await client.get("/api/live", headers=headers)
    assert r.status == 200, await r.text()
    return await r.json()


async def test_the_live_view_is_computed_at_most_once_a_second(api: Client) -> None:
    views = await asyncio.gather(*(live(api) for _ in range(20)))
    computed = {view["computed_at"] for view in views}
    assert len(computed) == 1  # twenty callers, one computation
    first = computed.pop()
    seen: list[float] = []

    async def recomputed() -> bool:
        seen.append((await live(api))["computed_at"])
        return bool(seen[-1] != first)

    await eventually(recomputed, within=5, what="the view to be computed again")
    assert seen[-1] - first >= 0.99  # the next computation came a second later, not sooner
    assert set(seen[:-1]) <= {first}  # meanwhile, callers had the one computed


async def test_with_auth_on_the_live_view_needs_a_signed_in_caller(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    secured = dataclasses.replace(settings, auth_enabled=True, jwt_secret="live-" + "k" * 40)
    http = await aiohttp_client(create_app(secured))
    r = await http.get("/api/live")
    assert r.status == 401
    assert r.headers["WWW-Authenticate"].startswith("Bearer ")
    name = f"watcher-{uuid.uuid4().hex[:8]}"
    credentials = {"username": name, "password": "a long enough password"}
    assert (await http.post("/api/auth/users", json=credentials)).status == 201
    r = await http.post("/api/auth/token", json=credentials)
    token = (await r.json())["access_token"]
    assert (await live(http, Authorization=f"Bearer {token}"))["series"]
