"""Where the wake listener's readers and the round meet (worker/wakes.py)."""

from __future__ import annotations

import asyncio


class ReadGate:
    """The readers that found wake-ups wait here (`wait`) until the round lets them read
    again (`open`). The round may ask for that read to be made at once, without blocking,
    and then waits (`reads_done`) until each reader it let go has made it (`read_done`),
    or was cancelled while parked."""

    def __init__(self) -> None:
        self._parked = 0
        self._opened: asyncio.Future[bool] | None = None  # what the parked readers await
        self._owed = 0  # reads asked for at once and not done yet
        self._all_done = asyncio.Event()
        self._all_done.set()

    async def wait(self) -> bool:
        """Parks a reader until `open()`; whether its next read is owed at once."""
        if self._opened is None:
            self._opened = asyncio.get_running_loop().create_future()
        opened = self._opened
        self._parked += 1
        try:
            return await asyncio.shield(opened)
        except asyncio.CancelledError:
            if not opened.done():
                self._parked -= 1
            elif opened.result():
                self.read_done()  # owed, and never to be made
            raise

    def open(self, at_once: bool = False) -> None:
        """Lets every parked reader go: to read at once (`reads_done` then waits for those
        reads), or to read blocking."""
        if not self._parked or self._opened is None:
            return
        if at_once:
            self._owed += self._parked
            self._all_done.clear()
        self._parked = 0
        self._opened.set_result(at_once)
        self._opened = None

    def read_done(self) -> None:
        """A reader made the read it owed (or gave up on it: a failure, a stop)."""
        self._owed -= 1
        if not self._owed:
            self._all_done.set()

    async def reads_done(self) -> None:
        """Until every read asked for at once is done."""
        await self._all_done.wait()
