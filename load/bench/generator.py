"""The load generator: the two ways of sending a workload's requests (load/bench/workloads.py),
a closed loop and the open model, over keep-alive connections of its own."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from load.bench.results import Result
from load.bench.workloads import SUCCESS, Pick, Request

CLIENT_TIMEOUT = 10.0
OPEN_POOL = 64  # connections the open-model generator opens before it starts


@dataclasses.dataclass
class Effects:
    """What the successful answers say each wallet's balance and held amount moved by."""

    balance: dict[str, int]
    held: dict[str, int]

    @classmethod
    def none(cls, wallets: Iterable[str]) -> Effects:
        return cls(dict.fromkeys(wallets, 0), dict.fromkeys(wallets, 0))


class Connection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection of the generator: it writes prepared requests and
    reads each answer's status line, headers and body by Content-Length (all the service and
    the reference send), one request at a time. A protocol, not a task per request: the
    generator shares the cores with every server, and this costs it the least."""

    def __init__(self, result: Result, effects: Effects, done: asyncio.Future[None]):
        self.result, self.effects, self.done = result, effects, done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.request: tuple[float, Request] | None = None  # (since, the request in flight)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, since: float, request: Request) -> None:
        assert self.transport is not None
        self.request = (since, request)
        self.transport.write(request.raw)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while self.request and (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].lower()
            at = head.find(b"\r\ncontent-length:")
            length = 0
            if at >= 0:
                stop = head.find(b"\r\n", at + 17)
                length = int(head[at + 17 : stop if stop >= 0 else end])
            if len(self.buffer) < end + 4 + length:
                return
            status = int(self.buffer[9:12])
            del self.buffer[: end + 4 + length]
            since, request = self.request
            self.request = None
            now = time.perf_counter()
            self.result.latencies.append(now - since)
            self.result.statuses[status] = self.result.statuses.get(status, 0) + 1
            if status in SUCCESS:
                for wallet, change in request.moves:
                    self.effects.balance[wallet] += change
                for wallet, change in request.holding:
                    self.effects.held[wallet] += change
                if request.then is not None:
                    # Due now that its client knows the first succeeded; sent even past a
                    # closed loop's deadline, so that every pair started is completed.
                    self.send(now, request.then)
                    continue
            self.answered()

    def answered(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.request is not None:  # an answer that will not come
            self.request = None
            self.result.errors += 1
            self.answered()
        if not self.done.done():
            self.done.set_result(None)


async def connect(connection: Connection, host: str, port: int) -> None:
    await asyncio.get_running_loop().create_connection(lambda: connection, host, port)


async def close_all(connections: list[Connection]) -> None:
    """Closes the connections once done; one still waiting for its answer counts as an
    error."""
    for connection in connections:
        connection.close()
    await asyncio.gather(*(c.done for c in connections))


@contextlib.contextmanager
def measured(result: Result) -> Iterator[float]:
    """Times the phase, and the generator's CPU over it; yields its start (perf_counter).
    The collector is off meanwhile: a phase's latencies make its full passes long, and
    requests due meanwhile would be sent late."""
    gc.disable()
    cpu, start = time.process_time(), time.perf_counter()
    try:
        yield start
    finally:
        gc.enable()
        result.elapsed = time.perf_counter() - start
        result.generator_cpu = (time.process_time() - cpu) / result.elapsed


class Outstanding:
    """The open model's requests sent and answered; `all_answered` once they are equal."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sent: int) -> None:
        self.sent, self.answered = sent, 0
        self.all_answered: asyncio.Future[None] = loop.create_future()

    def one_answered(self) -> None:
        self.answered += 1
        if self.answered == self.sent and not self.all_answered.done():
            self.all_answered.set_result(None)


class OpenLoopConnection(Connection):
    """Back among the idle connections once answered."""

    def __init__(self, idle: list[Connection], outstanding: Outstanding, *args: Any) -> None:
        super().__init__(*args)
        self.idle, self.outstanding = idle, outstanding

    def answered(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.idle.append(self)
        self.outstanding.one_answered()


async def drive_open(base: str, wallets: Sequence[str], result: Result, pick: Pick) -> Effects:
    """Sends `result.target_rate` requests per second for `result.seconds`, each the next
    `pick` gives; returns what the successful answers moved. A request goes out on an idle
    connection, or a new one, when it is due, whether or not earlier ones were answered;
    its latency counts from then.

    A pick that carries a second request (a hold's capture) is a slot of the schedule of
    two requests: slots start at half the rate, so the rate still counts every request.
    The second goes out on the same connection once the first is answered, and its
    latency counts from that answer, when its client learns it may send it."""
    clock = time.perf_counter  # the event loop's clock may tick in whole milliseconds
    loop = asyncio.get_running_loop()
    effects = Effects.none(wallets)
    host, _, port = base.removeprefix("http://").partition(":")
    idle: list[Connection] = []
    connections: list[Connection] = []
    per_slot = result.phase.requests_per_slot
    slots = int(result.target_rate * result.seconds / per_slot)
    result.sent = slots * per_slot
    outstanding = Outstanding(loop, slots)

    def new_connection() -> OpenLoopConnection:
        connection = OpenLoopConnection(idle, outstanding, result, effects, loop.create_future())
        connections.append(connection)
        return connection

    async def connect_and_send(due: float, request: Request) -> None:
        connection = new_connection()
        try:
            await connect(connection, host, int(port))
        except OSError:
            connection.request = (due, request)
            connection.connection_lost(None)
            return
        connection.send(due, request)

    # A pool opened beforehand, as clients keep one: a burst of new connections at a busy
    # moment overflows the listen backlog, and a dropped SYN waits a second for its retry.
    for _ in range(OPEN_POOL):
        await connect(connection := new_connection(), host, int(port))
        idle.append(connection)
    interval = per_slot / result.target_rate
    connecting = []
    with measured(result) as start:
        for i in range(slots):
            due = start + i * interval
            delay = due - clock()
            if delay > 0:  # else it is late: sent with the others due, without a sleep each
                await asyncio.sleep(delay)
            request = pick()
            if idle:
                idle.pop().send(due, request)
            else:
                connecting.append(loop.create_task(connect_and_send(due, request)))
        await asyncio.gather(*connecting)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(outstanding.all_answered), CLIENT_TIMEOUT)
        await close_all(connections)
    return effects


class ClosedLoopConnection(Connection):
    """One connection of a closed-loop client: it sends the next request as soon as the
    answer to the last one is in, until `deadline`, and then finishes the one in flight
    (and the second of a pair, if the first of it is answered)."""

    def __init__(self, pick: Pick, deadline: float, *args: Any) -> None:
        super().__init__(*args)
        self.pick, self.deadline = pick, deadline

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.answered()

    def answered(self) -> None:
        if time.perf_counter() >= self.deadline:
            self.close()
            return
        self.send(time.perf_counter(), self.pick())


async def drive_closed(base: str, wallets: Sequence[str], result: Result, pick: Pick) -> Effects:
    """Sends what `pick` gives over the phase's closed-loop connections for `result.seconds`;
    returns what the successful answers moved."""
    host, _, port = base.removeprefix("http://").partition(":")
    effects = Effects.none(wallets)
    loop = asyncio.get_running_loop()
    connections: list[Connection] = []
    with measured(result) as start:
        deadline = start + result.seconds
        for _ in range(result.phase.connections):
            connection = ClosedLoopConnection(pick, deadline, result, effects, loop.create_future())
            await connect(connection, host, int(port))
            connections.append(connection)
        await asyncio.wait([c.done for c in connections], timeout=result.seconds + CLIENT_TIMEOUT)
        await close_all(connections)
    result.sent = result.completed + result.errors
    return effects
