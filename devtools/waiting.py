"""Waiting for a condition, or for a server to answer ready."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import aiohttp


async def until(
    check: Callable[[], Awaitable[bool]], within: float, what: str, every: float = 0.05
) -> None:
    """Waits until `check()` is true, polling every `every` seconds; raises TimeoutError
    after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {within}s waiting for {what}")
        await asyncio.sleep(every)


async def wait_ready(http: aiohttp.ClientSession, url: str, within: float = 60) -> None:
    """Waits until `url` answers 200; raises RuntimeError after `within` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(url) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready within {within}s")
