"""The run: each step of the plan driven against its design, then checked against the ledger
and the balances, and what it measured kept."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

from devtools.servers import RedisClusterNodes
from devtools.waiting import wait_ready
from load.bench import report
from load.bench.designs import Running, restart_worker, started
from load.bench.generator import Effects, drive_closed, drive_open
from load.bench.phases import Design, Model, Phase, Shape, Step, constant, plan
from load.bench.results import Result, Results
from load.bench.workloads import Workload, deposits, holds, operations, transfers

FUNDING_MINOR = 100_000_000_000  # each wallet starts with 1,000,000,000.00
STEP_TRIES = 2  # tries of a step of the search for the highest rate before it fails
# A transfer shape's wallets and workload, from its `n` wallets and the hot one.
ShapeWallets = dict[Shape, tuple[list[str], Workload]]
# The servers every design shares, measured whole: each process on the machine whose
# command name (/proc/PID/comm) is the given one, by the name the tables give it.
SHARED_SERVERS = {"redis": "redis-server", "postgres": "postgres"}
# A reading is taken again until two in a row agree on which processes there are and on
# what their ended children spent, at most this many times (see `settled`).
SETTLE_TRIES = 5


class Reading(NamedTuple):
    """A process's CPU seconds so far, its own and those of the children it has waited for
    (its ended children's, which the kernel adds to it as it reaps each), and its parent's
    pid."""

    cpu: float
    reaped: float
    parent: int


# Each process's reading by its identity, (pid, start time): a pid ended and reused in
# between is another process.
CpuTimes = dict[tuple[int, int], Reading]


def process_cpu(pid: int) -> tuple[tuple[int, int], Reading] | None:
    """A process's identity and reading (Linux); None where /proc is missing or the process
    has ended."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    own, reaped = (int(fields[11]) + int(fields[12])), (int(fields[13]) + int(fields[14]))
    return (pid, int(fields[19])), Reading(own / tick, reaped / tick, int(fields[1]))


def named(command: str) -> list[int]:
    """Every process on the machine whose command name is `command`; none without /proc."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() == command:
                pids.append(int(entry.name))
    return pids


def cpu_times(pids: dict[str, list[int]]) -> dict[str, CpuTimes]:
    return {name: dict(filter(None, map(process_cpu, each))) for name, each in pids.items()}


def settled(pids: dict[str, list[int]]) -> dict[str, CpuTimes]:
    """The processes' readings, taken again until two in a row agree on which processes
    there are and on what their ended children spent: a child reaped between the reading of
    it and that of its parent would count twice (or not at all)."""
    last = cpu_times(pids)
    for _ in range(SETTLE_TRIES):
        again = cpu_times(pids)
        if reaped(again) == reaped(last):
            return again
        last = again
    return last


def reaped(times: dict[str, CpuTimes]) -> dict[str, dict[tuple[int, int], float]]:
    return {name: {p: r.reaped for p, r in each.items()} for name, each in times.items()}


def spent(before: CpuTimes, after: CpuTimes) -> float:
    """CPU seconds the processes spent between two readings. Each present at the second
    counts from the first reading, or from its start if it started in between (a
    connection a pool opened), with the children it reaped in between. One that ended in
    between (a backend whose pool closed its connection: the row lock's asyncpg pool
    replaces each after 50,000 queries) counts up to its end: its parent, reaping it, added
    all it spent to its own children's time, less what it had spent at the first reading.
    That holds where the parent is one of them (PostgreSQL's postmaster, a redis-server
    that forked); an ended process whose parent is not counts for nothing."""
    alive = {pid for pid, _ in after}
    total = 0.0
    for identity, now in after.items():
        then = before.get(identity)
        total += now.cpu + now.reaped - (then.cpu + then.reaped if then else 0.0)
    for identity, then in before.items():
        if identity not in after and then.parent in alive:
            total -= then.cpu + then.reaped
    return total


def cores(
    before: dict[str, CpuTimes], after: dict[str, CpuTimes], elapsed: float
) -> dict[str, float]:
    """Each name's CPU between the two readings (`spent`), in cores over `elapsed`."""
    return {name: spent(before[name], after.get(name, {})) / elapsed for name in before}


async def bench(
    args: argparse.Namespace,
    pg_server: str,
    redis_url: str,
    baseline: Path | None,
    cluster: RedisClusterNodes | None = None,
) -> Results:
    """Starts the designs, warms each up, and runs the plan's steps in order."""
    results = Results()
    async with started(args, pg_server, redis_url, baseline, cluster) as compared:
        async with aiohttp.ClientSession() as http:
            for running in compared:
                if running.queued is not None:
                    await wait_ready(http, f"{running.base}/ready")
                await warm_up(running)
        designs = [r.design for r in compared]
        transferring = [r.design for r in compared if r.transfers]
        holding = [r.design for r in compared if r.holds]
        by_design = {r.design: r for r in compared}
        shapes: dict[Design, ShapeWallets] = {}
        for step in plan(args, designs, transferring, holding):
            running = by_design[step.design]
            if step.phase.interval is not None:
                restart_worker(running, {"BATCH_INTERVAL": str(step.phase.interval)})
                await warm_up(running)
            if step.phase.transfers is not None and not shapes:
                # every design's transfer wallets at once, before the first transfer phase
                for design in transferring:
                    shapes[design] = await transfer_shapes(by_design[design].pg, step.phase.wallets)
            wallets, workload = await wallets_for(step.phase, running, shapes)
            if step.rates:
                best, steps = await find_max(running, step, wallets, workload, args.p99_limit)
                results.best[(step.phase, step.design)] = best
                results.runs += steps
                continue
            result = Result(step.phase, step.design, step.phase.rate, step.seconds)
            results.runs.append(await run_phase(running, wallets, result, workload))
            print(report.line(result), flush=True)
    return results


async def wallets_for(
    phase: Phase, running: Running, shapes: dict[Design, ShapeWallets]
) -> tuple[list[str], Workload]:
    """The wallets a step touches and the workload over them: new wallets for deposits and
    withdrawals and for holds, the design's transfer wallets of the phase's shape for
    transfers."""
    if phase.transfers is not None:
        return shapes[running.design][phase.transfers]
    wallets = await new_wallets(running.pg, phase.wallets)
    if phase.holds:
        return wallets, holds(wallets)
    return wallets, deposits(wallets) if phase.model is Model.CLOSED else operations(wallets)


async def transfer_shapes(pg: Any, count: int) -> ShapeWallets:
    """The transfer phases' shapes, on new wallets: each shape's wallets and workload."""
    many = await new_wallets(pg, count)
    hot = (await new_wallets(pg, 1))[0]
    return {
        Shape.TO_ONE: ([*many, hot], transfers(many, [hot])),
        Shape.FROM_ONE: ([hot, *many], transfers([hot], many)),
        Shape.AMONG: (many, transfers(many, many)),
    }


async def warm_up(running: Running) -> None:
    """Connections, prepared statements, caches, a worker owning its shards; not reported."""
    wallets = await new_wallets(running.pg, 2)
    phase = constant(200, 2)
    await run_phase(running, wallets, Result(phase, running.design, 200, 3), operations(wallets))
    if running.transfers:
        transferring = Result(phase, running.design, 100, 2)
        await run_phase(running, wallets, transferring, transfers(wallets, wallets))
    if running.holds:
        holding = Phase(Model.CONSTANT, 2, rate=100, holds=True)
        await run_phase(running, wallets, Result(holding, running.design, 100, 1), holds(wallets))


async def find_max(
    running: Running, step: Step, wallets: Sequence[str], workload: Workload, p99_limit: float
) -> tuple[int, list[Result]]:
    """The highest of the step's rates the design sustains, stepping up until it does not.
    The same wallets at every rate, as a deployment's load is spread over the wallets it
    has: the first step meets them unknown to the workers, the next ones as they run.

    A step that fails is run once more, and holds if the second try passes: one stall of
    PostgreSQL (a checkpoint, autovacuum) takes a short step's p99 past the limit at any
    rate. A rate past capacity fails both tries, its queue growing each time."""
    best, results = 0, []
    for rate in step.rates:
        for _ in range(STEP_TRIES):
            result = Result(step.phase, step.design, rate, step.seconds)
            await run_phase(running, wallets, result, workload)
            results.append(result)
            print(report.line(result), flush=True)
            held = result.sustained(p99_limit) and result.balance_ok
            if held or not result.balance_ok:
                break
        if not held:
            break
        best = rate
    return best, results


async def run_phase(
    running: Running, wallets: Sequence[str], result: Result, workload: Workload
) -> Result:
    """Drives `workload` over `wallets` (every wallet it touches), then checks the
    balances (and, of holds, the held amounts)."""
    pg = running.pg
    before = await balances(pg, wallets)
    held_before = await held(pg, wallets) if result.phase.holds else {}
    started_at = await pg.fetchval("SELECT clock_timestamp()")
    wal_at = await pg.fetchval("SELECT pg_current_wal_lsn()::text")
    pids = running.pids() | {name: named(command) for name, command in SHARED_SERVERS.items()}
    cpu = settled(pids)
    drive = drive_closed if result.phase.model is Model.CLOSED else drive_open
    host = running.base.removeprefix("http://").partition(":")[0]
    pick = workload(host, random.Random(zlib.crc32(result.phase.name.encode()) & 0xFFFF))
    effects = await drive(running.base, wallets, result, pick)
    # Listed again: the servers' processes started during the phase count too, and those
    # that ended count through their parent's reaped children.
    pids |= {name: named(command) for name, command in SHARED_SERVERS.items()}
    result.server_cpu = cores(cpu, settled(pids), result.elapsed)
    await until_quiet(running)
    result.wal_bytes = await pg.fetchval(
        "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint", wal_at
    )
    # Each transaction stamps the ledger rows it wrote with its own xid (xmin). The ledger
    # and the balances are read in one snapshot: a design without a queue to wait for (the
    # row lock) may still be applying requests the generator gave up on.
    async with pg.acquire() as snapshot, snapshot.transaction(isolation="repeatable_read"):
        rows, after = await ledger_and_balances(snapshot, wallets, started_at)
        held_rows = await held_and_ledger(snapshot, wallets) if result.phase.holds else []
    check(result, rows, before, after, effects.balance)
    if result.phase.holds:
        result.balance_ok = result.balance_ok and held_exact(
            held_rows, held_before, effects, answered=result.bad == 0
        )
    return result


def check(
    result: Result,
    rows: list[Any],
    before: dict[str, int],
    after: dict[str, int],
    effects: dict[str, int],
) -> None:
    """The balances must be what the ledger says; and, when every request was answered,
    what the answers say (with answers missing, requests the generator gave up on, only the
    ledger knows what happened to those). And money is conserved: the wallets together
    moved by what was deposited and withdrawn (transfers only move it between them;
    nothing is in flight once quiet)."""
    total = next((r for r in rows if r["wallet_id"] is None), None)
    result.commits = total["commits"] if total else 0
    result.operations = total["operations"] if total else 0
    recorded = dict.fromkeys(before, 0) | {
        r["wallet_id"]: r["effect"] for r in rows if r["wallet_id"] is not None
    }
    brought = total["brought"] if total else 0
    conserved = sum(after.values()) - sum(before.values()) == brought
    result.balance_ok = (
        conserved
        and all(after[w] == before[w] + recorded[w] for w in before)
        and (result.bad > 0 or recorded == effects)
    )


async def ledger_and_balances(
    conn: Any, wallets: Sequence[str], since: Any
) -> tuple[list[Any], dict[str, int]]:
    """Per wallet and in all (the row whose wallet_id is None), the commits, operations,
    change in balance and money brought in or out of the ledger rows written since
    `since`; and the wallets' balances. A hold placed, voided or expired moves no balance;
    a capture takes its amount out (the bench's captures pay no wallet)."""
    rows = await conn.fetch(
        "SELECT wallet_id::text, count(DISTINCT xmin::text) AS commits, count(*) AS operations,"
        " coalesce(sum(CASE WHEN status <> 'applied' OR kind IN ('HOLD', 'HOLD_VOID',"
        " 'HOLD_EXPIRE') THEN 0 WHEN kind IN ('WITHDRAW', 'TRANSFER_OUT', 'HOLD_CAPTURE')"
        " THEN -amount ELSE amount END), 0) AS effect,"
        " coalesce(sum(CASE WHEN status <> 'applied' THEN 0 WHEN kind = 'DEPOSIT' THEN amount"
        " WHEN kind IN ('WITHDRAW', 'HOLD_CAPTURE') THEN -amount ELSE 0 END), 0) AS brought"
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


async def held(pg: Any, wallets: Sequence[str]) -> dict[str, int]:
    rows = await pg.fetch(
        "SELECT id::text, held FROM wallets WHERE id = any($1::uuid[])", list(wallets)
    )
    return {r["id"]: r["held"] for r in rows}


async def held_and_ledger(conn: Any, wallets: Sequence[str]) -> list[Any]:
    """Each wallet's balance and held amount, what its held holds add up to, and the
    balance and held amount its newest ledger row says it left (None if it has none)."""
    return list(
        await conn.fetch(
            "SELECT w.id::text, w.balance, w.held, (SELECT coalesce(sum(h.amount), 0)"
            " FROM holds h WHERE h.wallet_id = w.id AND h.status = 'held') AS holding,"
            " o.balance_after, o.held_after FROM wallets w LEFT JOIN LATERAL"
            " (SELECT balance_after, held_after FROM operations WHERE wallet_id = w.id"
            " ORDER BY seq DESC LIMIT 1) o ON true WHERE w.id = any($1::uuid[])",
            list(wallets),
        )
    )


def held_exact(rows: list[Any], before: dict[str, int], effects: Effects, answered: bool) -> bool:
    """Each wallet holds what its held holds add up to, no more than its balance
    (available is not negative), and its newest ledger row says its balance and held
    amount, so the available funds it records; and, when every request was answered, the
    held amount moved by what the answers said (back where it was once every hold placed
    was captured)."""
    return len(rows) == len(before) and all(
        r["held"] == r["holding"]
        and 0 <= r["held"] <= r["balance"]
        and (
            r["held_after"] is None
            or (r["balance_after"], r["held_after"]) == (r["balance"], r["held"])
        )
        and (not answered or r["held"] == before[r["id"]] + effects.held[r["id"]])
        for r in rows
    )


async def until_quiet(running: Running, within: float = 60) -> None:
    """Waits until no other session works in the database and the design has nothing
    queued: an overloaded server may still be draining requests its clients gave up on,
    and would weigh on the next phase."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        busy = await running.pg.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND state = 'active' AND pid <> pg_backend_pid()"
        )
        unsettled = running.transfers and await running.pg.fetchval(
            "SELECT count(*) FROM transfers WHERE status IN ('in_flight', 'returning')"
        )
        if not busy and not unsettled and (running.queued is None or not await running.queued()):
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
