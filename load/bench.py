"""The benchmark: `make bench` (or `python -m load.bench --help`).

On one machine it starts PostgreSQL and Redis (embedded, unless DATABASE_URL and REDIS_URL
name running servers: the benchmark creates its own database beside DATABASE_URL's and
drops it after), the service (`python -m api`, `python -m worker`) and the row-lock
reference (`python -m load.rowlock`), and drives both with the same load from this
process, the service then the reference, phase by phase, so that each pair of figures
comes from the same minutes of the same machine.

Closed loop first, the way most clients call a service: a number of keep-alive
connections, each sending its next deposit as soon as the answer to the last one is in
(1, 8, 64 and 256 connections on one wallet, and 64 over 1,000 wallets). Each phase ends
by letting every request in flight finish, so the balances are checked exactly.

Then the open model: requests start at a constant rate whether or not earlier ones have
finished, and latency counts from when a request was due, so a stalled server cannot
hide its queue (no coordinated omission). A constant rate on one wallet (default 1000/s
for 60 s); then, rising step by step, the highest rate each design sustains on one wallet
and, for the service, over 10,000 wallets (sustained: at least 95% of it completed in
time, nothing but 200 and 409, p99 under --p99-limit); then, optionally, the constant rate
with the worker restarted at each of --intervals (BATCH_INTERVAL, the opt-in linger).

Every phase waits until the service has nothing queued, then checks that the balances
moved by what the ledger's applied rows say and, when every request was answered, that
the ledger says what the answers said. It counts commits from the ledger rows' xmin and
tells how much of a core each server process and the generator used. The run ends with
the targets the service is held to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import uvloop
from redis.asyncio import Redis, RedisCluster

from devtools.processes import ROOT, free_port, spawn
from devtools.servers import (
    RedisClusterNodes,
    migrate,
    redis_cluster,
    redis_server_7,
    servers_from_env,
    with_database,
)
from devtools.waiting import wait_ready
from shared.connections import cluster_client
from shared.keys import KeySpace
from shared.money import format_minor
from shared.settings import Settings

BENCHMARKS = ROOT / "docs" / "benchmarks.md"  # --update-docs rewrites its marked block
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
FUNDING_MINOR = 100_000_000_000  # each wallet starts with 1,000,000,000.00
CLIENT_TIMEOUT = 10.0
QUIET: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
OPEN_POOL = 64  # connections the open-model generator opens before it starts
# (connections, wallets) of the closed-loop phases
CLOSED_LOOPS = [(1, 1), (8, 1), (64, 1), (256, 1), (64, 1000)]
SMOKE_CLOSED_LOOPS = [(1, 1), (8, 1)]
ON_CLUSTER = "service on Redis Cluster"  # the design name of --redis-cluster's service
ONE_PROCESS = "service, 1 API process"  # --one-process-too's
# The steps of the searches for the highest rates. Steps of 500 to the service's top: with
# steps of 1,000 above 3,000, one step was a sixth of its highest rates, too coarse to
# compare two of them.
SERVICE_RATES = [*range(500, 8001, 500), 9000, 10000]
ROW_LOCK_RATES = [250, 500, 750, 1000, 1250, 1500, 2000, 2500]
SERVICE_TRANSFER_RATES = [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 8000]
ROW_LOCK_TRANSFER_RATES = [100, 250, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000]


@dataclasses.dataclass
class Phase:
    name: str
    design: str
    target_rate: int  # requests started per second (open model); 0 in a closed loop
    seconds: float
    connections: int = 0  # closed loop: connections each waiting for its answer
    sent: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0
    generator_cpu: float = 0.0
    server_cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    commits: int | None = None
    operations: int | None = None
    wal_bytes: int | None = None  # WAL PostgreSQL wrote during the phase (all of its databases)
    balance_ok: bool | None = None
    answered: int = 0  # requests answered or failed so far (open model)
    all_answered: asyncio.Future[None] = dataclasses.field(init=False, repr=False)

    @property
    def completed(self) -> int:
        return sum(self.statuses.values())

    @property
    def bad(self) -> int:
        """Answers other than 200 and 409, and requests that got no answer."""
        return self.errors + sum(n for s, n in self.statuses.items() if s not in (200, 409))

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    @classmethod
    def merged(cls, phases: list[Phase]) -> Phase:
        """Repeats of one closed-loop phase as one: their requests, time and CPU together."""
        first = phases[0]
        merged = cls(first.name, first.design, 0, sum(p.seconds for p in phases), first.connections)
        for p in phases:
            merged.latencies += p.latencies
            for status, n in p.statuses.items():
                merged.statuses[status] = merged.statuses.get(status, 0) + n
            merged.errors += p.errors
            merged.sent += p.sent
            merged.elapsed += p.elapsed
            merged.commits = (merged.commits or 0) + (p.commits or 0)
            merged.operations = (merged.operations or 0) + (p.operations or 0)
            merged.wal_bytes = (merged.wal_bytes or 0) + (p.wal_bytes or 0)
        merged.generator_cpu = sum(p.generator_cpu * p.elapsed for p in phases) / merged.elapsed
        merged.server_cpu = {
            name: sum(p.server_cpu.get(name, 0.0) * p.elapsed for p in phases) / merged.elapsed
            for name in first.server_cpu
        }
        merged.balance_ok = all(p.balance_ok for p in phases)
        return merged

    def sustained(self, p99_limit_ms: float) -> bool:
        return (
            self.completed >= 0.95 * self.target_rate * self.seconds
            and self.bad == 0
            and self.percentile(99) <= p99_limit_ms
        )


@dataclasses.dataclass
class Target:
    """A design under load: its name, its URL and its processes by name."""

    design: str
    base: str
    processes: dict[str, subprocess.Popen[bytes]]
    pg: Any  # a pool on the target's database: wallets, balances, the ledger
    # how many operations it holds queued, if it queues them
    queued: Callable[[], Awaitable[int]] | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # its processes' settings
    # processes it uses but the bench did not start for it (a Redis Cluster's nodes), by name:
    # their CPU is measured, summed per name
    observed: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    transfers: bool = True  # it serves transfers (a --baseline from before them does not)


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process so far (Linux); 0 where /proc is missing."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# What a request moves if it is answered 200: (wallet, change in minor units) pairs.
Moves = tuple[tuple[str, int], ...]
# The next request of a phase, ready to write, and what it moves.
Pick = Callable[[], tuple[bytes, Moves]]
# A phase's requests: a Pick for the target's host, drawing from a seeded generator.
Workload = Callable[[str, random.Random], Pick]
AMOUNTS = range(100, 1001, 100)  # minor units: 1.00 to 10.00


def operation_request(host: str, wallet: str, kind: str, minor: int) -> bytes:
    return request_head(host, wallet) + request_tail(kind, minor)


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
        prepared = {w: (operation_request(host, w, "DEPOSIT", 1), ((w, 1),)) for w in wallets}
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


class Connection(asyncio.Protocol):
    """A keep-alive HTTP/1.1 connection of the generator: it writes prepared requests and
    reads each answer's status line, headers and body by Content-Length (all the service and
    the reference send), one request at a time. A protocol, not a task per request: the
    generator shares the two cores with every server, and this costs it the least (aiohttp's
    client took 0.3 ms of CPU a request, asyncio streams and a task per request a quarter
    of a core at 5,000/s)."""

    def __init__(self, phase: Phase, effects: dict[str, int], done: asyncio.Future[None]):
        self.phase, self.effects, self.done = phase, effects, done
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
            self.phase.latencies.append(time.perf_counter() - since)
            self.phase.statuses[status] = self.phase.statuses.get(status, 0) + 1
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
            self.phase.errors += 1
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
def measured(phase: Phase) -> Iterator[float]:
    """Times the phase, and the generator's CPU over it; yields its start (perf_counter).
    The collector is off meanwhile: a phase's latencies make its full passes long (about
    50 ms seen at 1,000/s), and requests due meanwhile would be sent late."""
    gc.disable()
    cpu, start = time.process_time(), time.perf_counter()
    try:
        yield start
    finally:
        gc.enable()
        phase.elapsed = time.perf_counter() - start
        phase.generator_cpu = (time.process_time() - cpu) / phase.elapsed


class OpenLoopConnection(Connection):
    """Back among the idle connections once answered."""

    def __init__(self, idle: list[Connection], *args: Any) -> None:
        super().__init__(*args)
        self.idle = idle

    def answered(self) -> None:
        self.phase.answered += 1
        if self.transport is not None and not self.transport.is_closing():
            self.idle.append(self)
        if self.phase.answered == self.phase.sent and not self.phase.all_answered.done():
            self.phase.all_answered.set_result(None)


async def drive_open(base: str, wallets: Sequence[str], phase: Phase, pick: Pick) -> dict[str, int]:
    """Sends `phase.target_rate` requests per second for `phase.seconds`, each the next
    `pick` gives; returns each wallet's change in balance implied by the successful answers.
    A request goes out on an idle connection, or a new one, when it is due, whether or not
    earlier ones were answered; its latency counts from then."""
    clock = time.perf_counter  # the event loop's clock may tick in whole milliseconds
    loop = asyncio.get_running_loop()
    effects: dict[str, int] = dict.fromkeys(wallets, 0)
    host, _, port = base.removeprefix("http://").partition(":")
    idle: list[Connection] = []
    connections: list[Connection] = []
    phase.all_answered = loop.create_future()

    async def connect_and_send(due: float, moves: Moves, raw: bytes) -> None:
        connection = OpenLoopConnection(idle, phase, effects, loop.create_future())
        connections.append(connection)
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
        connection = OpenLoopConnection(idle, phase, effects, loop.create_future())
        await connect(connection, host, int(port))
        connections.append(connection)
        idle.append(connection)
    interval = 1 / phase.target_rate
    total = phase.sent = int(phase.target_rate * phase.seconds)
    connecting = []
    with measured(phase) as start:
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
            await asyncio.wait_for(asyncio.shield(phase.all_answered), CLIENT_TIMEOUT)
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
    base: str, wallets: Sequence[str], phase: Phase, pick: Pick
) -> dict[str, int]:
    """Sends what `pick` gives over `phase.connections` closed-loop connections for
    `phase.seconds`; returns each wallet's change in balance implied by the successful
    answers."""
    host, _, port = base.removeprefix("http://").partition(":")
    effects: dict[str, int] = dict.fromkeys(wallets, 0)
    loop = asyncio.get_running_loop()
    connections: list[Connection] = []
    with measured(phase) as start:
        deadline = start + phase.seconds
        for _ in range(phase.connections):
            connection = ClosedLoopConnection(pick, deadline, phase, effects, loop.create_future())
            await connect(connection, host, int(port))
            connections.append(connection)
        await asyncio.wait([c.done for c in connections], timeout=phase.seconds + CLIENT_TIMEOUT)
        await close_all(connections)
    phase.sent = phase.completed + phase.errors
    return effects


async def ledger_and_balances(
    conn: Any, wallets: Sequence[str], since: Any
) -> tuple[list[Any], dict[str, int]]:
    """Per wallet and in all (the row whose wallet_id is None), the commits, operations,
    change in balance and money brought in or out of the ledger rows written since
    `since`; and the wallets' balances."""
    rows = await conn.fetch(
        "SELECT wallet_id::text, count(DISTINCT xmin::text) AS commits, count(*) AS operations,"
        " coalesce(sum(CASE WHEN status <> 'applied' THEN 0"
        " WHEN kind IN ('WITHDRAW', 'TRANSFER_OUT') THEN -amount ELSE amount END), 0) AS effect,"
        " coalesce(sum(CASE WHEN status <> 'applied' THEN 0 WHEN kind = 'DEPOSIT' THEN amount"
        " WHEN kind = 'WITHDRAW' THEN -amount ELSE 0 END), 0) AS brought"
        " FROM operations WHERE wallet_id = any($1::uuid[]) AND created_at >= $2"
        " GROUP BY GROUPING SETS ((wallet_id), ())",
        list(wallets),
        since,
    )
    return rows, await balances(conn, wallets)


async def balances(pg: Any, wallets: Sequence[str]) -> dict[str, int]:
    rows = await pg.fetch(
        "SELECT id::text, balance FROM wallets WHERE id = any($1::uuid[])", list(wallets)
    )
    return {r["id"]: r["balance"] for r in rows}


async def run_phase(
    target: Target, wallets: Sequence[str], phase: Phase, workload: Workload
) -> Phase:
    """Drives the phase's `workload` over `wallets` (every wallet it touches), then checks
    the balances."""
    pg = target.pg
    before = await balances(pg, wallets)
    started = await pg.fetchval("SELECT clock_timestamp()")
    wal_at = await pg.fetchval("SELECT pg_current_wal_lsn()::text")
    pids: dict[str, list[int]] = {}
    for name, process in target.processes.items():  # api, api2...: summed as api
        pids.setdefault(name.rstrip("0123456789"), []).append(process.pid)
    pids |= target.observed
    cpu = {name: sum(map(cpu_seconds, each)) for name, each in pids.items()}
    drive = drive_closed if phase.connections else drive_open
    host = target.base.removeprefix("http://").partition(":")[0]
    pick = workload(host, random.Random(hash(phase.name) & 0xFFFF))
    effects = await drive(target.base, wallets, phase, pick)
    phase.server_cpu = {
        name: (sum(map(cpu_seconds, each)) - cpu[name]) / phase.elapsed
        for name, each in pids.items()
    }
    await until_quiet(target)
    phase.wal_bytes = await pg.fetchval(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", wal_at
    )
    # Each transaction stamps the ledger rows it wrote with its own xid (xmin). The ledger
    # and the balances are read in one snapshot: a design without a queue to wait for (the
    # row lock) may still be applying requests the generator gave up on.
    async with pg.acquire() as snapshot, snapshot.transaction(isolation="repeatable_read"):
        rows, after = await ledger_and_balances(snapshot, wallets, started)
    total = next(r for r in rows if r["wallet_id"] is None) if rows else None
    phase.commits = total["commits"] if total else 0
    phase.operations = total["operations"] if total else 0
    recorded = dict.fromkeys(wallets, 0) | {
        r["wallet_id"]: r["effect"] for r in rows if r["wallet_id"] is not None
    }
    # The balances must be what the ledger says; and, when every request was answered, what
    # the answers say. With answers missing (requests the generator gave up on, which the
    # server may still have applied) only the ledger knows what happened to those.
    # And money is conserved: the wallets together moved by what was deposited and withdrawn
    # (transfers only move it between them; nothing is in flight once quiet).
    brought = total["brought"] if total else 0
    conserved = sum(after.values()) - sum(before.values()) == brought
    phase.balance_ok = (
        conserved
        and all(after[w] == before[w] + recorded[w] for w in wallets)
        and (phase.bad > 0 or recorded == effects)
    )
    return phase


async def until_quiet(target: Target, within: float = 60) -> None:
    """Waits until no other session works in the database and the target has nothing
    queued: an overloaded server may still be draining requests its clients gave up on,
    and would weigh on the next phase."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        busy = await target.pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        )
        unsettled = target.transfers and await target.pg.fetchval(
            "SELECT count(*) FROM transfers WHERE status IN ('in_flight', 'returning')"
        )
        if not busy and not unsettled and (target.queued is None or not await target.queued()):
            return
        await asyncio.sleep(0.2)


async def new_wallets(pg: Any, count: int) -> list[str]:
    """`count` funded wallets. The table is vacuumed and analyzed after: a deployment's
    wallets are not all created the second before their load starts, and autovacuum waking
    up on thousands of new rows in the middle of a phase would weigh on that phase alone."""
    rows = await pg.fetch(
        "INSERT INTO wallets (balance) SELECT $1 FROM generate_series(1, $2) RETURNING id::text",
        FUNDING_MINOR,
        count,
    )
    await pg.execute("VACUUM (ANALYZE) wallets")
    return [r["id"] for r in rows]


def table(phases: list[Phase]) -> str:
    """The open-model phases."""
    head = (
        "| phase | design | target/s | achieved/s | p50 ms | p95 ms | p99 ms | max ms "
        "| non-2xx (409s apart) | 409s | commits/op | mean batch | balances "
        "| server CPU (cores) | generator CPU |"
    )
    lines = [head, "|" + "---|" * 15]
    for p in phases:
        lines.append(
            f"| {p.name} | {p.design} | {p.target_rate} | {p.completed / p.elapsed:.0f} "
            f"| {p.percentile(50):.1f} | {p.percentile(95):.1f} | {p.percentile(99):.1f} "
            f"| {p.percentile(100):.1f} | {p.bad} | {p.statuses.get(409, 0)} "
            f"| {commits_per_op(p)} | {mean_batch(p)} | {balance_check(p)} "
            f"| {server_cpu(p)} | {p.generator_cpu:.0%} |"
        )
    return "\n".join(lines)


ROW_LOCK = "row lock"  # the reference's design, with one API process


def row_lock_design(processes: int) -> str:
    return ROW_LOCK if processes == 1 else f"{ROW_LOCK}, {processes} processes"


def is_reference(design: str) -> bool:
    """The row lock's design, with one API process or several."""
    return design == ROW_LOCK or design.startswith(f"{ROW_LOCK}, ")


def best_reference(phases: list[Phase], name: str) -> Phase | None:
    """The row lock's phase `name` with the most requests answered, of its process counts."""
    return max(
        (p for p in phases if p.name == name and is_reference(p.design)), key=rate, default=None
    )


def closed_table(phases: list[Phase]) -> str:
    """The closed-loop phases, each service row with its ratio to the row lock's best."""
    head = (
        "| clients | design | req/s | vs row lock | p50 ms | p99 ms | max ms | non-2xx "
        "| mean batch | WAL B/op | balances | server CPU (cores) | generator CPU |"
    )
    lines = [head, "|" + "---|" * 13]
    for p in phases:
        reference = best_reference(phases, p.name)
        ratio = "-"
        if not is_reference(p.design) and reference is not None and rate(reference):
            ratio = f"{rate(p) / rate(reference):.2f}x"
        lines.append(
            f"| {p.name} | {p.design} | {rate(p):.0f} | {ratio} | {p.percentile(50):.2f} "
            f"| {p.percentile(99):.1f} | {p.percentile(100):.1f} | {p.bad} | {mean_batch(p)} "
            f"| {wal_per_op(p)} | {balance_check(p)} | {server_cpu(p)} | {p.generator_cpu:.0%} |"
        )
    return "\n".join(lines)


def balance_check(p: Phase) -> str:
    if p.balance_ok is None:
        return "-"
    if not p.balance_ok:
        return "MISMATCH"
    return "exact" if p.bad == 0 else "exact by the ledger (answers missing)"


def rate(p: Phase) -> float:
    return p.completed / p.elapsed if p.elapsed else 0.0


def commits_per_op(p: Phase) -> str:
    return f"{p.commits / p.operations:.3f}" if p.commits and p.operations else "-"


def wal_per_op(p: Phase) -> str:
    return f"{p.wal_bytes / p.operations:.0f}" if p.wal_bytes and p.operations else "-"


def mean_batch(p: Phase) -> str:
    return f"{p.operations / p.commits:.1f}" if p.commits and p.operations else "-"


def server_cpu(p: Phase) -> str:
    return ", ".join(f"{name} {cores:.2f}" for name, cores in p.server_cpu.items()) or "-"


@dataclasses.dataclass
class Results:
    closed: list[Phase] = dataclasses.field(default_factory=list)
    open: list[Phase] = dataclasses.field(default_factory=list)
    transfers_closed: list[Phase] = dataclasses.field(default_factory=list)
    transfers_open: list[Phase] = dataclasses.field(default_factory=list)
    # the highest rates sustained: on one wallet by each design, over 10,000 by the service,
    # of transfers to a hot destination by each design
    best: dict[str, int] = dataclasses.field(default_factory=dict)

    def all(self) -> list[Phase]:
        return self.closed + self.open + self.transfers_closed + self.transfers_open

    def closed_summary(self, transfers: bool = False) -> list[Phase]:
        """The closed-loop phases (of operations, or of transfers), the repeats of each
        (--repeat) merged into one."""
        by_phase: dict[tuple[str, str], list[Phase]] = {}
        for p in self.transfers_closed if transfers else self.closed:
            by_phase.setdefault((p.name, p.design), []).append(p)
        names = list(dict.fromkeys(name for name, _ in by_phase))

        # Each phase's designs in one order, whichever ran first: the service, the
        # baseline, the row lock.
        def rank(design: str) -> int:
            return 0 if design == "service" else 2 if is_reference(design) else 1

        order = sorted(by_phase, key=lambda key: (names.index(key[0]), rank(key[1])))
        return [Phase.merged(by_phase[key]) for key in order]

    def closed_pair(
        self, name: str, design: str = "service", reference: str = ROW_LOCK
    ) -> tuple[Phase, Phase] | None:
        """The phase `name` of `design` and of `reference` (the row lock: its best)."""
        summary = [p for p in self.closed_summary() if p.name == name]
        found = next((p for p in summary if p.design == design), None)
        if reference == ROW_LOCK:
            other = best_reference(summary, name)
        else:
            other = next((p for p in summary if p.design == reference), None)
        return (found, other) if found and other else None


def wallets_name(count: int) -> str:
    return "1 wallet" if count == 1 else f"{count} wallets"


def closed_name(connections: int, wallets: int) -> str:
    return f"{connections} connection{'s' if connections > 1 else ''}, {wallets_name(wallets)}"


def targets(
    results: Results, rate_name: str, baseline: str | None = None, transfer_rate: int = 1000
) -> list[tuple[str, str, bool]]:
    """The targets of the service that this run can judge: what each asks, what was
    measured, and whether it holds."""
    rows: list[tuple[str, str, bool]] = []
    best = results.best

    def highest(key: str) -> int | None:
        """The highest rate `key` sustained; the row lock's, the best of its process counts."""
        found = [
            rate
            for k, rate in best.items()
            if k == key or (key.endswith(ROW_LOCK) and k.startswith(f"{key}, "))
        ]
        return max(found) if found else None

    def best_ratio(what: str, design: str, reference: str, least: float) -> None:
        ours, theirs = highest(design), highest(reference)
        if ours is not None and theirs is not None:
            if not theirs:
                rows.append((what, f"{reference} sustained none of its rates: no ratio", False))
                return
            ratio = ours / theirs
            measured = f"{ratio:.2f}x ({ours}/s against {theirs}/s)"
            rows.append((what, measured, ratio >= least))

    if baseline is not None:
        pair = results.closed_pair(closed_name(1, 1), reference=baseline)
        if pair:
            ratio = rate(pair[0]) / rate(pair[1]) if rate(pair[1]) else 0.0
            rows.append(
                (
                    f"1 connection: at most 5% slower than {baseline}",
                    f"{ratio:.2f}x ({rate(pair[0]):.0f} against {rate(pair[1]):.0f} req/s)",
                    ratio >= 0.95,
                )
            )
        best_ratio(
            f"highest rate sustained on 1 wallet: at most 5% below {baseline}'s "
            "(in steps of the search)",
            "service",
            baseline,
            0.95,
        )
    one = results.closed_pair(closed_name(1, 1))
    if one:
        service, reference = one
        limit = 2 * reference.percentile(50) + 1
        rows.append(
            (
                "1 connection: p50 at most 2x the row lock's + 1 ms",
                f"{service.percentile(50):.2f} ms against {reference.percentile(50):.2f} ms "
                f"(limit {limit:.2f})",
                service.percentile(50) <= limit,
            )
        )
    for connections, wallets, factor in ((8, 1, 1.5), (64, 1, 4), (256, 1, 5), (64, 1000, 2)):
        pair = results.closed_pair(closed_name(connections, wallets))
        if pair:
            service, reference = pair
            ratio = rate(service) / rate(reference) if rate(reference) else 0.0
            errors = " with 0 errors" if connections == 256 else ""
            rows.append(
                (
                    f"{closed_name(connections, wallets)}: at least {factor}x the row lock's "
                    f"req/s{errors}",
                    f"{ratio:.2f}x ({rate(service):.0f} against {rate(reference):.0f}/s"
                    f"{f', {service.bad} errors' if errors else ''})",
                    ratio >= factor and (not errors or service.bad == 0),
                )
            )
    constant = next(
        (p for p in results.open if p.name == rate_name and p.design == "service"), None
    )
    if constant is not None:
        rows.append(
            (
                f"{rate_name}: p99 at most 25 ms",
                f"{constant.percentile(99):.1f} ms",
                constant.percentile(99) <= 25 and constant.bad == 0,
            )
        )
    best_ratio(
        "highest rate sustained on 1 wallet: at least 4x the row lock's", "service", ROW_LOCK, 4
    )
    best_ratio(
        "highest rate over 10,000 wallets: at least 80% of 1 wallet's", "many", "service", 0.8
    )
    hot = next(
        (
            p
            for p in results.transfers_open
            if p.design == "service" and p.name == f"{transfer_rate}/s, transfers 1000 wallets -> 1"
        ),
        None,
    )
    if hot is not None:
        rows.append(
            (
                f"transfers to a hot destination at {transfer_rate}/s: p99 at most 50 ms",
                f"{hot.percentile(99):.1f} ms, {hot.bad} errors",
                hot.percentile(99) <= 50 and hot.bad == 0,
            )
        )
    best_ratio(
        "highest transfer rate sustained on a hot destination: at least 4x the row lock's",
        "transfers service",
        "transfers row lock",
        4,
    )
    held = [
        p
        for p in results.transfers_closed + results.transfers_open
        if p.design == "service" and not p.name.startswith("max")
    ]
    if held:
        failed = sum(p.bad for p in held)
        conserved = all(p.balance_ok for p in held)
        rows.append(
            (
                "transfers: 0 errors, every balance and the conservation sum exact",
                f"{failed} errors, " + ("exact" if conserved else "NOT exact"),
                failed == 0 and conserved,
            )
        )
    exact = all(p.balance_ok for p in results.all())
    missing = sum(p.bad for p in results.all())
    rows.append(
        (
            "balances exact in every phase",
            ("yes" if exact else "no")
            + (f" ({missing} answers missing, checked against the ledger)" if missing else ""),
            exact,
        )
    )
    return rows


def targets_table(rows: list[tuple[str, str, bool]]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in rows
    ]
    return "\n".join(lines)


STEP_TRIES = 2  # tries of a step of the search for the highest rate before it fails


async def find_max(
    target: Target,
    name: str,
    wallets: Sequence[str],
    workload: Workload,
    rates: list[int],
    args: argparse.Namespace,
) -> tuple[int, list[Phase]]:
    """The highest of `rates` the target sustains, stepping up until it does not. The same
    wallets at every rate, as a deployment's load is spread over the wallets it has: the
    first step meets them unknown to the workers, the next ones as they run.

    A step that fails is run once more, and holds if the second try passes: one stall of
    PostgreSQL (a checkpoint, autovacuum) takes a 10-s step's p99 past the limit at any
    rate, and decided the same code's highest rate a step up or down from run to run. A
    rate past capacity fails both tries, its queue growing each time."""
    best, phases = 0, []
    for rate in rates:
        for _ in range(STEP_TRIES):
            phase = Phase(name, target.design, rate, args.step_seconds)
            phase = await run_phase(target, wallets, phase, workload)
            phases.append(phase)
            print(table([phase]).splitlines()[-1], flush=True)
            held = phase.sustained(args.p99_limit) and phase.balance_ok
            if held or not phase.balance_ok:
                break
        if not held:
            break
        best = rate
    return best, phases


async def transfer_shapes(pg: Any, count: int) -> list[tuple[str, list[str], Workload]]:
    """The transfer phases' shapes, on new wallets: (name, every wallet, workload)."""
    many = await new_wallets(pg, count)
    hot = (await new_wallets(pg, 1))[0]
    return [
        (f"{count} wallets -> 1", [*many, hot], transfers(many, [hot])),
        (f"1 -> {count} wallets", [hot, *many], transfers([hot], many)),
        (f"among {count} wallets", many, transfers(many, many)),
    ]


@contextlib.contextmanager
def checkout(ref: str, directory: Path) -> Iterator[Path]:
    """The project at `ref`, in a git worktree of its own for the length of the run."""
    subprocess.run(
        ["git", "worktree", "add", "--quiet", "--detach", str(directory), ref],
        cwd=ROOT,
        check=True,
    )
    try:
        yield directory
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(directory)], cwd=ROOT, check=False
        )


async def bench(
    args: argparse.Namespace,
    pg_server: str,
    redis_url: str,
    baseline: Path | None,
    cluster: RedisClusterNodes | None = None,
) -> Results:
    admin = await asyncpg.connect(pg_server)
    redis = Redis.from_url(redis_url)
    databases: list[str] = []
    targets_run: list[Target] = []
    clients: list[RedisCluster] = []

    def serving(
        name: str, module: str, env: dict[str, str], root: Path, count: int
    ) -> dict[str, subprocess.Popen[bytes]]:
        """`count` processes of `module` sharing env's PORT (REUSE_PORT): `name`, then
        `name`2, `name`3... (the CPU column sums them under `name`)."""
        shared_port = {**env, "REUSE_PORT": str(count > 1)}
        return {
            name if n == 0 else f"{name}{n + 1}": spawn(module, shared_port, root, **QUIET)
            for n in range(count)
        }

    async def service_at(
        design: str,
        root: Path,
        cluster: RedisClusterNodes | None = None,
        api_processes: int | None = None,
    ) -> Target:
        """The service as the checkout at `root` has it, on a database and Redis key prefix
        of its own (two sets of workers on one database would fence each other's shards);
        on the Redis Cluster `cluster` if given."""
        name = f"wallet_bench_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        databases.append(name)
        env = {
            "DATABASE_URL": with_database(pg_server, name),
            "REDIS_URL": cluster.url if cluster else redis_url,
            "REDIS_CLUSTER": str(cluster is not None).lower(),
            "REDIS_KEY_PREFIX": f"bench-{name}",
            "WORKER_METRICS_PORT": "0",
            "HOST": "127.0.0.1",
        }
        await asyncio.to_thread(migrate, env["DATABASE_URL"], root)
        port = free_port()
        count = api_processes or args.api_processes
        processes = serving("api", "api", {**env, "PORT": str(port)}, root, count)
        processes["worker"] = spawn("worker", env, root, **QUIET)
        keys = KeySpace(env["REDIS_KEY_PREFIX"], Settings.shard_count)

        async def queued() -> int:
            names = [keys.queued(s) for s in range(keys.shard_count)]
            if on_cluster is not None:
                counts = await on_cluster.mget_nonatomic(names)
            else:
                counts = await redis.mget(names)
            return sum(int(n or 0) for n in counts)

        on_cluster = None
        if cluster is not None:
            on_cluster = cluster_client(cluster.url)
            clients.append(on_cluster)
        pg = await asyncpg.create_pool(env["DATABASE_URL"], min_size=1, max_size=2)
        target = Target(design, f"http://127.0.0.1:{port}", processes, pg, queued, env)
        if cluster is not None:
            target.observed["redis cluster"] = cluster.pids()
        targets_run.append(target)
        return target

    async def warm_up(target: Target) -> None:
        """Connections, prepared statements, caches, a worker owning its shards; not reported."""
        wallets = await new_wallets(target.pg, 2)
        await run_phase(target, wallets, Phase("", target.design, 200, 3), operations(wallets))
        if target.transfers:
            transferring = Phase("", target.design, 100, 2)
            await run_phase(target, wallets, transferring, transfers(wallets, wallets))

    def in_turn(index: int, per_round: int) -> list[Target]:
        """The designs in the order of the index-th phase: who goes first changes from
        phase to phase, as the one after another's phase meets its leftovers (autovacuum, a
        warm or a cold cache)."""
        first = (index % per_round + index // per_round) % len(compared)
        return compared[first:] + compared[:first]

    async def transfer_phases() -> None:
        """Transfers to a hot destination, from a hot source, and among many wallets: a
        closed loop, a constant rate, and the highest rate each design sustains on the hot
        destination."""
        count, connections = (20, 8) if args.smoke else (1000, 64)
        serving = [t for t in compared if t.transfers]
        shapes_of = {t.design: await transfer_shapes(t.pg, count) for t in serving}
        for index in range(3 * args.repeat):
            for target in in_turn(index, 3):
                if not target.transfers:
                    continue
                name, wallets, workload = shapes_of[target.design][index % 3]
                label = f"{connections} connections, transfers {name}"
                phase = Phase(label, target.design, 0, args.closed_seconds, connections)
                results.transfers_closed.append(await run_phase(target, wallets, phase, workload))
                print(closed_table(results.transfers_closed[-1:]).splitlines()[-1], flush=True)
        if args.closed_only:
            return
        for index in range(3):
            for target in in_turn(index, 3):
                if not target.transfers:
                    continue
                name, wallets, workload = shapes_of[target.design][index]
                label = f"{args.transfer_rate}/s, transfers {name}"
                phase = Phase(label, target.design, args.transfer_rate, args.transfer_seconds)
                results.transfers_open.append(await run_phase(target, wallets, phase, workload))
                print(table(results.transfers_open[-1:]).splitlines()[-1], flush=True)
        if args.smoke or args.constant_only:
            return
        for target in (service, *one_process, *rowlocks):
            name, wallets, workload = shapes_of[target.design][0]
            reference = is_reference(target.design)
            steps = ROW_LOCK_TRANSFER_RATES if reference else SERVICE_TRANSFER_RATES
            results.best[f"transfers {target.design}"], more = await find_max(
                target, f"max transfers {name}", wallets, workload, steps, args
            )
            results.transfers_open += more

    results = Results()
    try:
        service = await service_at("service", ROOT)
        # The row lock with as many API processes as the service, and with one: on one
        # wallet a second process only adds waiters for the row's lock. Each phase compares
        # the service with the better of the two.
        rowlocks = []
        for count in sorted({args.api_processes, 1}, reverse=True):
            port = free_port()
            rowlocks.append(
                Target(
                    row_lock_design(count),
                    f"http://127.0.0.1:{port}",
                    serving(
                        "rowlock", "load.rowlock", {**service.env, "PORT": str(port)}, ROOT, count
                    ),
                    service.pg,
                )
            )
        targets_run.extend(rowlocks)
        compared = [service, *rowlocks]
        if baseline is not None:
            compared.insert(1, await service_at(f"service at {args.baseline}", baseline))
            compared[1].transfers = (baseline / "api" / "transfers.py").exists()
        if cluster is not None:
            compared.insert(1, await service_at(ON_CLUSTER, ROOT, cluster))
        one_process = []
        if args.one_process_too and args.api_processes > 1:
            one_process.append(await service_at(ONE_PROCESS, ROOT, api_processes=1))
            compared.insert(1, one_process[0])
        async with aiohttp.ClientSession() as http:
            for target in compared:
                if target.queued is not None:
                    await wait_ready(http, f"{target.base}/ready")
                await warm_up(target)
            if args.transfers_only:
                await transfer_phases()
                return results
            loops = [loop for _ in range(args.repeat) for loop in args.closed_loops]
            for index, (connections, wallet_count) in enumerate(loops):
                label = closed_name(connections, wallet_count)
                for target in in_turn(index, len(args.closed_loops)):
                    wallets = await new_wallets(target.pg, wallet_count)
                    phase = Phase(label, target.design, 0, args.closed_seconds, connections)
                    results.closed.append(
                        await run_phase(target, wallets, phase, deposits(wallets))
                    )
                    print(closed_table(results.closed[-1:]).splitlines()[-1], flush=True)
            if not args.closed_only:
                for target in compared:
                    wallets = await new_wallets(target.pg, args.rate_wallets)
                    label = f"{args.rate}/s on {wallets_name(args.rate_wallets)}"
                    phase = Phase(label, target.design, args.rate, args.seconds)
                    results.open.append(
                        await run_phase(target, wallets, phase, operations(wallets))
                    )
                    print(table(results.open[-1:]).splitlines()[-1], flush=True)
            if not (args.closed_only or args.smoke or args.constant_only):
                searches = [
                    (t.design, t, 1, ROW_LOCK_RATES if is_reference(t.design) else SERVICE_RATES)
                    for t in compared
                ]
                searches.append(("many", service, 10_000, SERVICE_RATES))
                searches += [(f"many, {t.design}", t, 10_000, SERVICE_RATES) for t in one_process]
                for key, target, wallet_count, steps in searches:
                    wallets = await new_wallets(target.pg, wallet_count)
                    name = f"max on {wallets_name(wallet_count)}"
                    results.best[key], more = await find_max(
                        target, name, wallets, operations(wallets), steps, args
                    )
                    results.open += more
            await transfer_phases()
            for interval in args.intervals:
                # A worker of its own for each setting: SIGTERM hands the shards over.
                worker = service.processes["worker"]
                worker.terminate()
                worker.wait(timeout=30)
                env = {**service.env, "BATCH_INTERVAL": str(interval)}
                service.processes["worker"] = spawn("worker", env, **QUIET)
                await warm_up(service)
                label = f"{args.rate}/s, BATCH_INTERVAL={interval}"
                phase = Phase(label, "service", args.rate, args.interval_seconds)
                wallets = await new_wallets(service.pg, 1)
                results.open.append(await run_phase(service, wallets, phase, operations(wallets)))
                print(table(results.open[-1:]).splitlines()[-1], flush=True)
    finally:
        processes = [p for target in targets_run for p in target.processes.values()]
        for p in processes:
            p.terminate()
        for p in processes:
            p.wait(timeout=30)
        for target in targets_run:
            if target.queued is not None:
                await target.pg.close()
        for name in databases:
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            async for key in redis.scan_iter(match=f"bench-{name}:*", count=1000):
                await redis.unlink(key)
        await admin.close()
        await redis.aclose()
        for client in clients:
            await client.aclose()
    return results


def intervals(raw: str) -> list[float]:
    values = [float(v) for v in raw.split(",") if v.strip()]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("intervals are seconds, not negative")
    return values


def closed_loops(raw: str) -> list[tuple[int, int]]:
    try:
        loops = [tuple(int(n) for n in item.split("x")) for item in raw.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("give CONNECTIONSxWALLETS, e.g. 64x1000") from None
    if not all(len(loop) == 2 and min(loop) > 0 for loop in loops):
        raise argparse.ArgumentTypeError("give CONNECTIONSxWALLETS, e.g. 64x1000")
    return [(c, w) for c, w in loops]


def processes_note(count: int) -> str:
    if count == 1:
        return "one API process for each design"
    return (
        f"{count} API processes for each design, sharing its port (REUSE_PORT); the row "
        "lock also with one, and each ratio is to its better figure"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def update_docs(report: str, page: Path = BENCHMARKS) -> None:
    """Puts `report` between the page's markers, leaving the rest of it as it is."""
    text = page.read_text()
    if text.count(MARK_START) != 1 or text.count(MARK_END) != 1:
        raise ValueError(f"{page} must hold {MARK_START} and {MARK_END} once each")
    start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
    if end < start:
        raise ValueError(f"{page}: {MARK_END} comes before {MARK_START}")
    page.write_text(text[:start] + "\n" + report + "\n" + text[end:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=1000, help="constant phase rate (1000)")
    parser.add_argument("--seconds", type=float, default=60, help="constant phase length (60)")
    parser.add_argument(
        "--rate-wallets",
        type=int,
        default=1,
        help="wallets the constant phase spreads its operations over (1)",
    )
    parser.add_argument("--step-seconds", type=float, default=10, help="each max-rate step (10)")
    parser.add_argument("--p99-limit", type=float, default=100, help="ms, for 'sustained' (100)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, correctness only")
    parser.add_argument(
        "--constant-only", action="store_true", help="skip the search for the maximum rates"
    )
    parser.add_argument(
        "--intervals",
        type=intervals,
        help="BATCH_INTERVAL values (the opt-in linger) to run the constant rate at, "
        "comma-separated (none by default)",
    )
    parser.add_argument(
        "--interval-seconds", type=float, default=20, help="each --intervals phase (20)"
    )
    parser.add_argument(
        "--api-processes",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        choices=range(1, 9),
        metavar="N",
        help="API processes sharing each design's port (REUSE_PORT), the service's and the "
        "row lock's alike, 1 to 8; the row lock also runs with one, and each phase takes "
        "its better figure (one per core: %(default)s)",
    )
    parser.add_argument(
        "--one-process-too",
        action="store_true",
        help=f"also run the service with one API process ('{ONE_PROCESS}'), in the same phases",
    )
    parser.add_argument(
        "--closed-seconds", type=float, default=20, help="each closed-loop phase (20)"
    )
    parser.add_argument(
        "--closed-only", action="store_true", help="the closed-loop phases, no open model"
    )
    parser.add_argument(
        "--clients",
        type=closed_loops,
        help="closed-loop phases as CONNECTIONSxWALLETS, comma-separated (the full run: "
        f"{','.join(f'{c}x{w}' for c, w in CLOSED_LOOPS)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="each closed-loop phase N times, the order of the designs turning each time; "
        "the report merges the repeats (1)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the service as git REF has it (a commit, a branch), in the same "
        "phases, to compare a change with what it changes",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help=f"also run the service on a Redis Cluster of the run's own ('{ON_CLUSTER}': 3 "
        "primaries with a replica each, Debian's redis-server 7), in the same phases",
    )
    parser.add_argument("--transfers-only", action="store_true", help="the transfer phases alone")
    parser.add_argument(
        "--transfer-rate", type=int, default=1000, help="transfers' constant rate (1000)"
    )
    parser.add_argument(
        "--transfer-seconds", type=float, default=30, help="each constant transfer phase (30)"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="write the tables into docs/benchmarks.md, between its markers (nothing else)",
    )
    args = parser.parse_args(argv)
    if args.intervals is None:
        args.intervals = []
    args.closed_loops = args.clients or (SMOKE_CLOSED_LOOPS if args.smoke else CLOSED_LOOPS)
    if args.smoke:
        args.rate, args.seconds = min(args.rate, 200), min(args.seconds, 3)
        args.closed_seconds = min(args.closed_seconds, 2)
        args.transfer_rate = min(args.transfer_rate, 100)
        args.transfer_seconds = min(args.transfer_seconds, 2)
    command = "python -m load.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pg_server, redis_url = stack.enter_context(servers_from_env(workdir))
        baseline_root = None
        if args.baseline:
            baseline_root = stack.enter_context(checkout(args.baseline, workdir / "baseline"))
        cluster = None
        if args.redis_cluster:
            executable = redis_server_7()
            if executable is None:
                print("--redis-cluster needs redis-server 7 or newer on PATH", file=sys.stderr)
                return 2
            cluster = stack.enter_context(redis_cluster(workdir / "cluster", executable))
        results = uvloop.run(bench(args, pg_server, redis_url, baseline_root, cluster))
    parts = [
        f"`{command.strip()}` on {datetime.now(UTC):%Y-%m-%d}, {machine()}; "
        f"{'configured' if os.environ.get('DATABASE_URL') else 'embedded'} PostgreSQL and "
        f"Redis, load generator, service and reference all on this machine; "
        f"{processes_note(args.api_processes)}.",
        "Closed loop (deposits of 0.01; each connection sends its next request when the "
        "answer to the last is in):",
        closed_table(results.closed_summary()),
    ]
    if results.open:
        parts += ["Open model (deposits and withdrawals at a constant rate):", table(results.open)]
    if results.transfers_closed:
        parts += [
            "Transfers of 1.00 to 10.00, closed loop (a hot destination receiving from many "
            "sources, a hot source paying many destinations, and transfers among many "
            "wallets at random):",
            closed_table(results.closed_summary(transfers=True)),
        ]
    if results.transfers_open:
        parts += ["Transfers, open model:", table(results.transfers_open)]
    rate_name = f"{args.rate}/s on {wallets_name(args.rate_wallets)}"
    baseline = f"service at {args.baseline}" if args.baseline else None
    rows = targets(results, rate_name, baseline, args.transfer_rate)
    parts += ["Targets:", targets_table(rows)]
    report = "\n\n".join(parts)
    print("\n" + report)
    if args.update_docs:
        update_docs(report)
    phases = results.all()
    mismatched = [p for p in phases if p.balance_ok is False]
    service_failed = any(
        p.design == "service" and (p.bad > 0 or p.balance_ok is not True)
        for p in phases
        if p.connections or p.name == rate_name
    )
    return 1 if mismatched or service_failed else 0


if __name__ == "__main__":
    sys.exit(main())
