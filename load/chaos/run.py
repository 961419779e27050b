"""The run: the service started on the stage, the wallets funded, the load with the faults
struck on their schedule, every unknown answered, then the checks."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time
from pathlib import Path

import aiohttp
import asyncpg

from devtools.servers import (
    EmbeddedPostgres,
    RedisClusterNodes,
    RedisProcess,
    migrate,
    with_database,
)
from devtools.waiting import wait_ready
from load.chaos.checks import Checks
from load.chaos.clients import Clients
from load.chaos.faults import REGISTRY, Fault
from load.chaos.hostile import CONNECTIONS, Hostile
from load.chaos.report import Report
from load.chaos.schedule import schedule
from load.chaos.stage import REPLY_TIMEOUT, Stage, staged
from shared.connections import REDIS_ERRORS

FAILED = (TimeoutError, asyncpg.PostgresError, RuntimeError, *REDIS_ERRORS)  # a fault's own


async def chaos(
    args: argparse.Namespace,
    postgres: EmbeddedPostgres,
    redis_server: RedisProcess | RedisClusterNodes,
    logs: Path,
) -> Report:
    """One run on servers of its own, in a database of its own."""
    database_url = with_database(postgres.url, "chaos")
    admin = await asyncpg.connect(postgres.url)
    await admin.execute('CREATE DATABASE "chaos"')
    await admin.close()
    await asyncio.to_thread(migrate, database_url)
    report = Report(args.seed)
    async with staged(postgres, redis_server, database_url, logs) as stage:
        timeout = aiohttp.ClientTimeout(total=REPLY_TIMEOUT + 5)
        # The honest clients', a few more, and the hostile client's (CONNECTIONS).
        connector = aiohttp.TCPConnector(limit=args.clients + 4 + CONNECTIONS)
        async with aiohttp.ClientSession(stage.base, timeout=timeout, connector=connector) as http:
            stage.start_service()
            await wait_ready(http, f"{stage.base}/ready")
            clients = Clients(http, args.seed, report)
            await clients.set_up_wallets(args.wallets)
            attacker = Hostile(clients, args.think)
            await load_with_faults(args, stage, clients, attacker, report)
            await clients.resolve()
            await Checks(stage, clients, attacker.squatted, report).run()
    return report


async def load_with_faults(
    args: argparse.Namespace, stage: Stage, clients: Clients, attacker: Hostile, report: Report
) -> None:
    """The load runs `--seconds`, or until the last fault has played out if later."""
    rng = random.Random(args.seed)
    hostile_rng = random.Random(rng.random())
    if not args.no_hostile:
        await attacker.squat_first(hostile_rng)
    start = time.monotonic()
    tasks = [
        asyncio.create_task(clients.client(random.Random(rng.random()), args.think))
        for _ in range(args.clients)
    ]
    if not args.no_hostile:
        tasks += [asyncio.create_task(attack) for attack in attacker.attacks(hostile_rng)]
    try:
        for strike in schedule(args.seed, args.seconds, stage.on_cluster):
            await asyncio.sleep(max(0.0, start + strike.at - time.monotonic()))
            fault = REGISTRY[strike.kind](stage, clients.hot, report)
            try:
                await play(fault, strike.pick, clients, report)
            except FAILED as e:
                report.problem(f"{strike.kind} at {strike.at}s failed: {e}")
        await asyncio.sleep(max(0.0, start + args.seconds - time.monotonic()))
    finally:
        clients.load_over = True
        if stage.paused is not None:
            stage.paused.send_signal(signal.SIGCONT)
        await asyncio.gather(*tasks)


async def play(fault: Fault, pick: int, clients: Clients, report: Report) -> None:
    """Strikes the fault and heals it, and holds the service to its bound: every wallet
    answers 200 again within it, counted from the fault."""
    since = await fault.strike(pick)
    if not fault.served_while_struck:
        await fault.heal()
    slowest = await clients.served_again(since, fault.bound)
    report.recovery[fault.name] = round(slowest, 2)
    report.event(f"{fault.name}: every wallet answered 200 again {slowest:.2f} s after the fault")
    if slowest > fault.bound:
        report.problem(
            f"{fault.name}: a wallet went unserved {slowest:.2f} s, beyond {fault.bound} s"
        )
    if fault.served_while_struck:
        await fault.heal()
