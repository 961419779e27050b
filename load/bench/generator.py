"""The load generator: the requests of each workload, prepared as bytes, and the two ways of
sending them, a closed loop and the open model, over keep-alive connections of its own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from load.bench.results import Result
from shared.money import format_minor

CLIENT_TIMEOUT = 10.0
OPEN_POOL = 64  # connections the open-model generator opens before it starts
AMOUNTS = range(100, 1001, 100)  # minor units: 1.00 to 10.00

# What a request moves if it is answered 200: (wallet, change in minor units) pairs.
Moves = tuple[tuple[str, int], ...]
# The next request of a phase, ready to write, and what it moves.
Pick = Callable[[], tuple[bytes, Moves]]
# A phase's requests: a Pick for the target's host, drawing from a seeded generator.
Workload = Callable[[str, random.Random], Pick]


def request_head(host: str, wallet: str) -> bytes:
    """A request to the wallet's operation route, up to its Content-Length's value."""
    return (
        f"POST /api/v1/wallets/{wallet}/operation HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: "
    ).encode()


def request_tail(kind: str, minor: int) -> bytes:
    """The rest of an operation request: the Content-Length's value and the body."""
    body = f'{{"operationType":"{kind}","amount":"{format_minor(minor)}"}}'.encode()
    return b"%d\r\n\r\n%b" % (len(body), body)


def transfer_request(host: str, source: str, destination: str, minor: int) -> bytes:
    body = (f'{{"from":"{source}","to":"{destination}","amount":"{format_minor(minor)}"}}').encode()
    return (
        f"POST /api/v1/transfers HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def operations(wallets: Sequence[str]) -> Workload:
    """Deposits and withdrawals of 1.00 to 10.00, half each, to wallets drawn at random."""

    def workload(host: str, rng: random.Random) -> Pick:
        heads = {w: request_head(host, w) for w in wallets}
        tails = {
            (kind, minor): request_tail(kind, minor)
            for kind in ("DEPOSIT", "WITHDRAW")
            for minor in AMOUNTS
        }

        def pick() -> tuple[bytes, Moves]:
            kind = "DEPOSIT" if rng.random() < 0.5 else "WITHDRAW"
            wallet = wallets[int(rng.random() * len(wallets))]
            minor = AMOUNTS[int(rng.random() * len(AMOUNTS))]
            return heads[wallet] + tails[(kind, minor)], (
                (wallet, minor if kind == "DEPOSIT" else -minor),
            )

        return pick

    return workload


def deposits(wallets: Sequence[str]) -> Workload:
    """Deposits of 0.01 to wallets drawn at random (the closed loop's)."""

    def workload(host: str, rng: random.Random) -> Pick:
        prepared = {
            w: (request_head(host, w) + request_tail("DEPOSIT", 1), ((w, 1),)) for w in wallets
        }
        if len(wallets) == 1:
            only = prepared[wallets[0]]
            return lambda: only
        choices = list(wallets)
        return lambda: prepared[rng.choice(choices)]

    return workload


def transfers(sources: Sequence[str], destinations: Sequence[str]) -> Workload:
    """Transfers of 1.00 to 10.00 from a source drawn at random to a destination drawn at
    random (another wallet)."""

    def workload(host: str, rng: random.Random) -> Pick:
        def pick() -> tuple[bytes, Moves]:
            source = sources[int(rng.random() * len(sources))]
            destination = source
            while destination == source:
                destination = destinations[int(rng.random() * len(destinations))]
            minor = AMOUNTS[int(rng.random() * len(AMOUNTS))]
            raw = transfer_request(host, source, destination, minor)
            return raw, ((source, -minor), (destination, minor))

        return pick

    return workload


class Connection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection of the generator: it writes prepared requests and
    reads each answer's status line, headers and body by Content-Length (all the service and
    the reference send), one request at a time. A protocol, not a task per request: the
    generator shares the cores with every server, and this costs it the least."""

    def __init__(self, result: Result, effects: dict[str, int], done: asyncio.Future[None]):
        self.result, self.effects, self.done = result, effects, done
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.request: tuple[float, Moves] | None = None  # (since, what a 200 moves)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, since: float, moves: Moves, raw: bytes) -> None:
        assert self.transport is not None
        self.request = (since, moves)
        self.transport.write(raw)

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
            since, moves = self.request
            self.request = None
            self.result.latencies.append(time.perf_counter() - since)
            self.result.statuses[status] = self.result.statuses.get(status, 0) + 1
            if status == 200:
                for wallet, change in moves:
                    self.effects[wallet] += change
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


async def drive_open(
    base: str, wallets: Sequence[str], result: Result, pick: Pick
) -> dict[str, int]:
    """Sends `result.target_rate` requests per second for `result.seconds`, each the next
    `pick` gives; returns each wallet's change in balance implied by the successful answers.
    A request goes out on an idle connection, or a new one, when it is due, whether or not
    earlier ones were answered; its latency counts from then."""
    clock = time.perf_counter  # the event loop's clock may tick in whole milliseconds
    loop = asyncio.get_running_loop()
    effects: dict[str, int] = dict.fromkeys(wallets, 0)
    host, _, port = base.removeprefix("http://").partition(":")
    idle: list[Connection] = []
    connections: list[Connection] = []
    total = result.sent = int(result.target_rate * result.seconds)
    outstanding = Outstanding(loop, total)

    def new_connection() -> OpenLoopConnection:
        connection = OpenLoopConnection(idle, outstanding, result, effects, loop.create_future())
        connections.append(connection)
        return connection

    async def connect_and_send(due: float, moves: Moves, raw: bytes) -> None:
        connection = new_connection()
        try:
            await connect(connection, host, int(port))
        except OSError:
            connection.request = (due, moves)
            connection.connection_lost(None)
            return
        connection.send(due, moves, raw)

    # A pool opened beforehand, as clients keep one: a burst of new connections at a busy
    # moment overflows the listen backlog, and a dropped SYN waits a second for its retry.
    for _ in range(OPEN_POOL):
        await connect(connection := new_connection(), host, int(port))
        idle.append(connection)
    interval = 1 / result.target_rate
    connecting = []
    with measured(result) as start:
        for i in range(total):
            due = start + i * interval
            delay = due - clock()
            if delay > 0:  # else it is late: sent with the others due, without a sleep each
                await asyncio.sleep(delay)
            raw, moves = pick()
            if idle:
                idle.pop().send(due, moves, raw)
            else:
                connecting.append(loop.create_task(connect_and_send(due, moves, raw)))
        await asyncio.gather(*connecting)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(outstanding.all_answered), CLIENT_TIMEOUT)
        await close_all(connections)
    return effects


class ClosedLoopConnection(Connection):
    """One connection of a closed-loop client: it sends the next request as soon as the
    answer to the last one is in, until `deadline`, and then finishes the one in flight."""

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
        raw, moves = self.pick()
        self.send(time.perf_counter(), moves, raw)


async def drive_closed(
    base: str, wallets: Sequence[str], result: Result, pick: Pick
) -> dict[str, int]:
    """Sends what `pick` gives over the phase's closed-loop connections for `result.seconds`;
    returns each wallet's change in balance implied by the successful answers."""
    host, _, port = base.removeprefix("http://").partition(":")
    effects: dict[str, int] = dict.fromkeys(wallets, 0)
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
