"""Small helpers the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient

from devtools.processes import ROOT, free_port, spawn
from devtools.waiting import until, wait_ready
from shared.keys import KeySpace
from shared.settings import Settings
from worker.apply import Resending

Client = TestClient[Any, Any]


async def operate(
    client: Client, wallet: str, kind: str, amount: Any, key: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POSTs one operation; returns (status, body, headers)."""
    headers = {"Idempotency-Key": key} if key else {}
    r = await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operationType": kind, "amount": amount},
        headers=headers,
    )
    return r.status, await r.json(content_type=None), dict(r.headers)


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "condition"
) -> None:
    """Waits until `check()` is true, polling; fails the test after `within` seconds."""
    try:
        await until(check, within, what, every=0.02)
    except TimeoutError as e:
        raise AssertionError(str(e)) from None


async def ledger(pg: Any, wallet: str) -> list[Any]:
    return await pg.fetch(  # type: ignore[no-any-return]
        "SELECT id::text, seq, kind, amount, status, reason, balance_after FROM operations"
        " WHERE wallet_id = $1 ORDER BY seq",
        wallet,
    )


@contextlib.asynccontextmanager
async def serving(settings: Settings, **overrides: Any) -> AsyncIterator[tuple[str, Settings]]:
    """`python -m worker` and `python -m api` as real processes on `settings` (a free
    loopback port, and `overrides`), ready; yields the base URL and the settings used."""
    served = dataclasses.replace(settings, host="127.0.0.1", port=free_port(), **overrides)
    processes = [spawn(m, served.to_env(), stderr=subprocess.DEVNULL) for m in ("worker", "api")]
    base = f"http://127.0.0.1:{served.port}"
    try:
        async with aiohttp.ClientSession() as http:
            await wait_ready(http, f"{base}/ready")
        yield base, served
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=20)


async def run_module(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from the project's root, configured by `settings` alone."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=settings.to_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def wallet_in(keys: KeySpace, shard: int) -> str:
    """A new wallet id that falls in `shard`."""
    while True:
        wallet = str(uuid.uuid4())
        if keys.shard_of(wallet) == shard:
            return wallet


def resending(settings: Settings) -> Resending:
    """How the settings' workers schedule the resending of the transfers a batch moves."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    return Resending(keys.shard_of, settings.transfer_resend_after)
