"""Appending operations to their wallets' streams, many requests to one Redis round trip.

Requests that arrive while a round trip is in flight go out together in the next one, so
redis-py's per-command cost, and the round trip, are shared; under light load a round
trip holds one call. The calls go over a connection of the enqueuer's own (one per node
on a Redis Cluster), written and read directly: no pool checkout and no pipeline object
per round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from shared import connections
from shared.backoff import backoff
from shared.connections import REDIS_ERRORS
from shared.errors import DependencyUnavailable
from shared.queue import Command
from shared.scripts import ENQUEUE

log = logging.getLogger("api.enqueue")
# A call: the commands to send (ENQUEUE last; its answer is the call's), and its future.
_Call = tuple[tuple[tuple[Any, ...], ...], asyncio.Future[Any]]
RESTART_DELAY_FIRST, RESTART_DELAY_MAX = 0.05, 2.0  # after failures of its own, not Redis's


class Enqueuer:
    def __init__(
        self, redis: connections.RedisClient, direct: connections.DirectLine | None = None
    ) -> None:
        self.redis = redis
        self._direct = direct or connections.direct(redis)
        self._pending: list[_Call] = []
        self._sending: list[_Call] = []
        self._wake = asyncio.Event()
        self._closing = False
        self.restarts = 0

    async def __call__(self, enqueue: Command, before: Sequence[Command] = ()) -> Any:
        """Sends the queue's `enqueue` command (shared/queue.py) after the commands `before`,
        in the same round trip as other requests' calls; returns its answer (the entry id,
        or None when full)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(((*before, enqueue), future))
        self._wake.set()
        return await future

    async def run(self) -> None:
        """Sends what is pending, one round trip at a time, until close(). Supervised: if
        sending fails in a way it does not handle (a bug), the calls it held fail with 503
        and it starts again on a new connection, so that no request waits for ever."""
        failures, last_failure = 0, -math.inf
        while not self._closing:
            try:
                await self._serve()
            except Exception as e:
                self.restarts += 1
                # Failures in a row back off; one after a quiet minute starts again at once.
                failures = failures + 1 if time.monotonic() - last_failure < 60 else 1
                last_failure = time.monotonic()
                log.exception("the enqueuer failed; its calls get 503, and it starts again")
                failed, self._sending = self._sending, []
                error = DependencyUnavailable(f"Queueing the operation failed: {e!r}")
                for _, future in failed:
                    if not future.done():
                        future.set_exception(error)
                await self._direct.close()
                await asyncio.sleep(backoff(failures, RESTART_DELAY_FIRST, RESTART_DELAY_MAX))
        await self._direct.close()

    async def _serve(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            self._sending, self._pending = self._pending, []
            if self._sending:
                await self._send(self._sending)
            self._sending = []

    def close(self) -> None:
        self._closing = True
        self._wake.set()

    async def _send(self, calls: list[_Call]) -> None:
        commands = [command for sent, _ in calls for command in sent]
        try:
            try:
                results = await self._direct.round_trip(commands)
            except RedisConnectionError:
                # A connection Redis has closed (a restart, a killed client) fails when next
                # used: once more on a new one. If only the answer was lost, the operations
                # are queued twice, and the worker answers the second of each as a replay.
                results = await self._direct.round_trip(commands)
        except REDIS_ERRORS as e:  # Redis is unreachable: every call failed
            for _, future in calls:
                if not future.done():
                    future.set_exception(e)
            return
        unknown_script = []
        answers = iter(results)
        for sent, future in calls:
            *before, result = [next(answers) for _ in sent]
            failed = next((r for r in before if isinstance(r, Exception)), None)
            if isinstance(result, NoScriptError):  # Redis restarted and forgot it
                unknown_script.append((sent, future))
            elif future.done():  # the request went away
                continue
            elif isinstance(failed or result, Exception):
                future.set_exception(failed or result)
            else:
                future.set_result(result)
        if unknown_script:
            try:
                await self.redis.script_load(ENQUEUE)
            except Exception as e:
                for _, future in unknown_script:
                    with contextlib.suppress(asyncio.InvalidStateError):
                        future.set_exception(e)
                return
            self._pending[:0] = unknown_script
            self._wake.set()
