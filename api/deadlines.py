"""The bound on how long a request waits (REPLY_TIMEOUT), kept by one task for all of them.

`asyncio.timeout` would arm an event-loop timer per request that almost never fires, a
cost the hot path need not pay: every request here has the same bound, so the deadlines
come in the order they end, a queue checked every TICK by one task. A request is cut off
up to TICK late, as asyncio.timeout would cut it: its task is cancelled, and the
cancellation comes out of the `async with` as TimeoutError."""

from __future__ import annotations

import asyncio
import collections
from types import TracebackType

TICK = 0.05  # seconds: how late past its bound a request may be cut off


class Bound:
    """One request's bound: `async with deadlines.bound():`."""

    __slots__ = ("_cancelling", "_deadlines", "_task", "active", "expired", "when")

    def __init__(self, deadlines: Deadlines) -> None:
        self._deadlines = deadlines
        self._task: asyncio.Task[object] | None = None
        self.active = self.expired = False

    async def __aenter__(self) -> Bound:
        task = asyncio.current_task()
        assert task is not None, "a bound is kept on a task"
        self._task, self._cancelling = task, task.cancelling()
        self.when = asyncio.get_running_loop().time() + self._deadlines.seconds
        self.active = True
        self._deadlines.queue.append(self)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # It stays queued until its deadline passes: without the task (and so the
        # request's response) that it would otherwise hold until then.
        task, self._task, self.active = self._task, None, False
        if (
            self.expired
            and task is not None
            and task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def expire(self) -> None:
        self.active, self.expired = False, True
        if self._task is not None:
            self._task.cancel()


class Deadlines:
    """Keeps the bounds of this process's requests, each `seconds` long, until close()."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.queue: collections.deque[Bound] = collections.deque()
        self._closing = asyncio.Event()

    def bound(self) -> Bound:
        return Bound(self)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closing.is_set():
            await asyncio.sleep(TICK)
            now, queue = loop.time(), self.queue
            while queue and queue[0].when <= now:
                bound = queue.popleft()
                if bound.active:
                    bound.expire()

    def close(self) -> None:
        self._closing.set()
