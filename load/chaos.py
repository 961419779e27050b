"""The bank-style chaos run: `python -m load.chaos --help`.

Real processes on one machine: an API and three workers on a database and Redis namespace
of their own (beside DATABASE_URL's database and on REDIS_URL, or on embedded servers).
Clients send deposits and withdrawals with Idempotency-Keys to one hot wallet and 50 others
and record every answer: 200 (applied), 409 (refused), anything else or nothing (unknown).
Meanwhile a schedule drawn from the seed strikes: a worker is killed with SIGKILL; the owner
of the hot wallet is stopped (SIGSTOP) inside a batch until its lease has run out and
another worker has taken its shards, then continued; a fourth worker starts; PostgreSQL
terminates every session of the database; Redis drops every connection of the service.

Then the faults are healed and every unknown is sent again with its key until it has an
answer, and the run checks: every 200 is in the ledger exactly once and applied, every 409
is not applied, nothing is in the ledger that no client sent, every balance follows from its
ledger and is never negative, every shard has exactly one owner among the live workers, the
stopped worker's late batch was refused by its fence, and no answer was a 500.

A failing run prints its seed and exits 1; `--seed` replays the same schedule, and
`--schedule-only` prints it without running. `--report` writes the report as JSON (what
tests/test_chaos.py reads). Traffic goes to loopback only; the run stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError

from devtools.ledger import replay_ledger
from devtools.processes import Cluster, free_port
from devtools.servers import migrate, servers_from_env, with_database
from devtools.waiting import until, wait_ready
from shared.keys import KeySpace
from shared.money import format_minor

SHARDS = 16
LEASE_TTL = 2.0
REPLY_TIMEOUT = 5.0
FUNDING_MINOR = 50_000  # 500.00 for each wallet, so that withdrawals are refused now and then
REFUSED = "batch refused"  # what a worker logs when the fence refuses its batch
CHAOS_APPLICATION = "chaos-runner"  # spared when the sessions are terminated
FAULTS = ("kill", "pause", "start", "terminate_postgres_sessions", "drop_redis_connections")


@dataclasses.dataclass(frozen=True)
class Fault:
    at: float  # seconds after the load started
    kind: str
    pick: int  # which worker, where the fault picks one


def schedule(seed: int, seconds: float) -> list[Fault]:
    """The faults of a run: each kind once, in an order and at times drawn from the seed,
    spread over the load's first three quarters so that each has time to play out."""
    rng = random.Random(seed)
    kinds = list(FAULTS)
    rng.shuffle(kinds)
    slot = seconds * 0.75 / len(kinds)
    return [
        Fault(round(slot * (i + rng.uniform(0.2, 0.8)), 2), kind, rng.randrange(1000))
        for i, kind in enumerate(kinds)
    ]


@dataclasses.dataclass
class Sent:
    key: str
    wallet: str
    kind: str
    minor: int
    statuses: list[int]  # every answer, in order; 0 for none (timeout, connection lost)

    @property
    def final(self) -> int:
        return self.statuses[-1]


@dataclasses.dataclass
class Report:
    seed: int
    sent: int = 0
    answers: Counter[int] = dataclasses.field(default_factory=Counter)
    resolved: int = 0
    fenced_refusals: int = 0
    events: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.sent} operations sent, answers {dict(self.answers)}, "
            f"{self.resolved} unknowns resolved by retrying with their keys, "
            f"{self.fenced_refusals} late batches refused by a fence",
            *(f"  {e}" for e in self.events),
        ]
        if self.problems:
            lines += ["PROBLEMS:", *(f"  {p}" for p in self.problems)]
            lines.append(f"replay with: python -m load.chaos --seed {self.seed}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report for a program (`--report`): answers keyed by status as text."""
        fields = dataclasses.asdict(self)
        fields["answers"] = {str(status): n for status, n in sorted(self.answers.items())}
        return json.dumps(fields, indent=2)


class Chaos:
    def __init__(
        self, args: argparse.Namespace, database_url: str, redis_url: str, logs: Path
    ) -> None:
        self.args = args
        self.database_url = database_url
        self.prefix = f"chaos-{uuid.uuid4().hex[:10]}"
        self.keys = KeySpace(self.prefix, SHARDS)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.cluster = Cluster(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "REDIS_KEY_PREFIX": self.prefix,
                "SHARD_COUNT": str(SHARDS),
                "WORKER_LEASE_TTL": str(LEASE_TTL),
                "WORKER_METRICS_PORT": "0",
                "REPLY_TIMEOUT": str(REPLY_TIMEOUT),
                "HOST": "127.0.0.1",
                "PORT": str(port),
            },
            logs,
        )
        self.redis = Redis.from_url(redis_url)
        self.report = Report(args.seed)
        self.sent: list[Sent] = []
        self.paused: subprocess.Popen[bytes] | None = None
        self.hot = ""
        self.wallets: list[str] = []

    # --- the clients ---

    async def operate(self, http: aiohttp.ClientSession, op: Sent) -> None:
        try:
            async with http.post(
                f"/api/v1/wallets/{op.wallet}/operation",
                json={"operationType": op.kind, "amount": format_minor(op.minor)},
                headers={"Idempotency-Key": op.key},
            ) as r:
                await r.read()
                op.statuses.append(r.status)
        except (aiohttp.ClientError, TimeoutError):
            op.statuses.append(0)
        self.report.answers[op.statuses[-1]] += 1

    async def client(self, http: aiohttp.ClientSession, rng: random.Random, until: float) -> None:
        while time.monotonic() < until:
            wallet = self.hot if rng.random() < 0.5 else rng.choice(self.wallets[1:])
            kind = "DEPOSIT" if rng.random() < 0.45 else "WITHDRAW"
            op = Sent(str(uuid.uuid4()), wallet, kind, rng.randrange(1, 200) * 100, [])
            self.sent.append(op)
            await self.operate(http, op)
            await asyncio.sleep(self.args.think)

    # --- the faults ---

    async def strike(self, fault: Fault, pg: Any) -> None:
        live = self.cluster.live_workers()
        if fault.kind == "kill":
            victim = live[fault.pick % len(live)]
            victim.kill()
            self.event(f"killed worker pid {victim.pid} with SIGKILL")
        elif fault.kind == "pause":
            await self.pause_hot_owner(pg)
        elif fault.kind == "start":
            self.event(f"started worker pid {self.cluster.start('worker').pid}")
        elif fault.kind == "terminate_postgres_sessions":
            ended = await pg.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name <> $1",
                CHAOS_APPLICATION,
            )
            self.event(f"PostgreSQL terminated {ended} sessions")
        elif fault.kind == "drop_redis_connections":
            clients: Any = await self.redis.client_list()
            ours = [c["id"] for c in clients if c.get("name", "").startswith(f"{self.prefix}:")]
            for client_id in ours:
                await self.redis.client_kill_filter(_id=client_id)
            self.event(f"Redis dropped {len(ours)} connections of the service")

    async def pause_hot_owner(self, pg: Any) -> None:
        """Stops the hot wallet's writer in the middle of a batch, and continues it once
        another worker has taken its shard: its batch must then be refused. The batch is
        caught in flight by holding the hot wallet's row, which it waits for."""
        shard = self.keys.shard_of(self.hot)
        owner = ""

        async def live_owner() -> bool:
            # A worker killed a moment ago still holds its leases until they run out.
            nonlocal owner
            lease: Any = await self.redis.get(self.keys.lease(shard))
            owner = lease.decode() if lease else ""
            process = self.cluster.worker_named(owner) if owner else None
            return process is not None and process.poll() is None

        await until(live_owner, LEASE_TTL * 10, f"a live worker to own shard {shard}")
        victim = self.cluster.worker_named(owner)
        assert victim is not None
        async with pg.acquire() as blocker, blocker.transaction():
            await blocker.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", self.hot)

            blocker_pid = await blocker.fetchval("SELECT pg_backend_pid()")

            async def victim_waits() -> bool:
                return bool(
                    await pg.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"
                        " AND $2 = any(pg_blocking_pids(pid))",
                        owner,
                        blocker_pid,
                    )
                )

            await until(victim_waits, 10, "the hot wallet's writer to wait in a batch")
            victim.send_signal(signal.SIGSTOP)
            self.paused = victim

            async def taken_over() -> bool:
                now: Any = await self.redis.get(self.keys.lease(shard))
                recorded = await pg.fetchval("SELECT owner FROM shards WHERE shard = $1", shard)
                return bool(now and now.decode() != owner and recorded == now.decode())

            await until(taken_over, LEASE_TTL * 10, f"another worker to take shard {shard}")
            victim.send_signal(signal.SIGCONT)

        async def refused() -> bool:
            return REFUSED in self.cluster.log_of(victim)

        # Before anything else can strike it: the victim's batch meets the fence.
        await until(refused, 10, "the continued worker's late batch to be refused")
        self.event(
            f"stopped worker pid {victim.pid} inside a batch past its lease; continued it after "
            f"shard {shard} changed hands"
        )

    # --- the run ---

    async def run(self) -> Report:
        pg = await asyncpg.create_pool(
            self.database_url,
            min_size=2,
            max_size=4,
            server_settings={"application_name": CHAOS_APPLICATION},
        )
        timeout = aiohttp.ClientTimeout(total=REPLY_TIMEOUT + 5)
        connector = aiohttp.TCPConnector(limit=self.args.clients + 4)
        try:
            async with aiohttp.ClientSession(
                self.base, timeout=timeout, connector=connector
            ) as http:
                self.cluster.start("api")
                for _ in range(3):
                    self.cluster.start("worker")
                await wait_ready(http, f"{self.base}/ready")
                await self.set_up_wallets(http)
                await self.load_with_faults(http, pg)
                await self.heal_and_resolve(http)
                await self.check(pg)
        finally:
            self.cluster.stop()
            await pg.close()
        return self.report

    async def set_up_wallets(self, http: aiohttp.ClientSession) -> None:
        for _ in range(self.args.wallets + 1):
            async with http.post("/api/v1/wallets") as r:
                self.wallets.append((await r.json())["id"])
        self.hot = self.wallets[0]
        funding = [Sent(str(uuid.uuid4()), w, "DEPOSIT", FUNDING_MINOR, []) for w in self.wallets]
        self.sent += funding
        await asyncio.gather(*(self.operate(http, op) for op in funding))

    async def load_with_faults(self, http: aiohttp.ClientSession, pg: Any) -> None:
        rng = random.Random(self.args.seed)
        start = time.monotonic()
        end = start + self.args.seconds
        clients = [
            asyncio.create_task(self.client(http, random.Random(rng.random()), end))
            for _ in range(self.args.clients)
        ]
        try:
            for fault in schedule(self.args.seed, self.args.seconds):
                await asyncio.sleep(max(0.0, start + fault.at - time.monotonic()))
                try:
                    await self.strike(fault, pg)
                except (TimeoutError, OSError, asyncpg.PostgresError, RedisError) as e:
                    self.problem(f"{fault.kind} at {fault.at}s failed: {e}")
        finally:
            if self.paused is not None:
                self.paused.send_signal(signal.SIGCONT)
            await asyncio.gather(*clients)

    async def heal_and_resolve(self, http: aiohttp.ClientSession) -> None:
        """Sends every operation without a definite answer again, with its key, until it
        has one: the retry either finds it applied or refused, or applies it now."""
        unknown = [op for op in self.sent if op.final not in (200, 409)]
        for attempt in range(20):
            if not unknown:
                break
            await asyncio.gather(*(self.operate(http, op) for op in unknown))
            unknown = [op for op in unknown if op.final not in (200, 409)]
            if unknown:
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        self.report.resolved = sum(1 for op in self.sent if len(op.statuses) > 1)
        for op in unknown:
            self.problem(f"operation {op.key} has no answer after retries: {op.statuses}")

    async def check(self, pg: Any) -> None:
        self.report.sent = len(self.sent)
        if any(500 <= s < 600 and s != 503 for op in self.sent for s in op.statuses):
            self.problem("a request was answered with a 5xx other than 503")
        rows = await pg.fetch(
            "SELECT wallet_id::text, id::text, seq, kind, amount, status, reason, balance_after"
            " FROM operations WHERE wallet_id = any($1::uuid[]) ORDER BY wallet_id, seq",
            self.wallets,
        )
        by_id = {r["id"]: r for r in rows}
        if len(by_id) != len(rows):
            self.problem("an operation id appears in the ledger more than once")
        sent_ids = {op.key for op in self.sent}
        for r in rows:
            if r["id"] not in sent_ids:
                self.problem(f"ledger row {r['id']} was never sent by a client")
        for op in self.sent:
            row = by_id.get(op.key)
            if op.final == 200 and (
                row is None
                or row["status"] != "applied"
                or (row["wallet_id"], row["kind"], row["amount"]) != (op.wallet, op.kind, op.minor)
            ):
                self.problem(f"200 for {op.key} but the ledger has {row and dict(row)}")
            if op.final == 409 and row is not None and row["status"] == "applied":
                self.problem(f"409 for {op.key} but the ledger applied it")
        balances = dict(
            await pg.fetch(
                "SELECT id::text, balance FROM wallets WHERE id = any($1::uuid[])", self.wallets
            )
        )
        for wallet in self.wallets:
            final, problems = replay_ledger([r for r in rows if r["wallet_id"] == wallet])
            self.report.problems += problems
            if balances[wallet] != final:
                self.problem(f"wallet {wallet}: balance {balances[wallet]}, ledger says {final}")
        await self.check_ownership(pg)
        if self.paused is not None:
            log = self.cluster.log_of(self.paused)
            self.report.fenced_refusals = log.count(REFUSED)
            if not self.report.fenced_refusals:
                self.problem(
                    f"the paused worker (pid {self.paused.pid}) had no batch refused; its log "
                    f"ends:\n{log[-3000:]}"
                )

    async def check_ownership(self, pg: Any) -> None:
        async def settled() -> bool:
            live = {str(w.pid) for w in self.cluster.live_workers()}
            leases: list[Any] = [await self.redis.get(self.keys.lease(s)) for s in range(SHARDS)]
            owners = [lease.decode() if lease else "" for lease in leases]
            recorded = dict(await pg.fetch("SELECT shard, owner FROM shards"))
            counts = Counter(o.rsplit("-", 2)[-2] for o in owners if o)
            return (
                all(owners)
                and all(recorded.get(s) == o for s, o in enumerate(owners))
                and set(counts) == live
                and max(counts.values()) - min(counts.values()) <= 1
            )

        try:
            await until(settled, LEASE_TTL * 10, "every shard to have one owner, evenly")
        except TimeoutError as e:
            self.problem(str(e))

    def event(self, text: str) -> None:
        self.report.events.append(text)

    def problem(self, text: str) -> None:
        self.report.problems.append(text)


async def chaos(args: argparse.Namespace, pg_server: str, redis_url: str, logs: Path) -> Report:
    """One run on a database of its own, dropped after, and a Redis namespace of its own."""
    name = f"wallet_chaos_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_server)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = with_database(pg_server, name)
    run = Chaos(args, database_url, redis_url, logs)
    try:
        await asyncio.to_thread(migrate, database_url)
        return await run.run()
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
        async for key in run.redis.scan_iter(match=run.keys.pattern(), count=1000):
            await run.redis.unlink(key)
        await run.redis.aclose()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seed", type=int, default=None, help="replays a run's schedule")
    p.add_argument("--seconds", type=float, default=30, help="length of the load (30)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    p.add_argument("--wallets", type=int, default=50, help="wallets beside the hot one (50)")
    p.add_argument("--think", type=float, default=0.02, help="a client's pause, s (0.02)")
    p.add_argument("--report", type=Path, help="also writes the report to this file, as JSON")
    p.add_argument(
        "--logs", type=Path, help="keeps the processes' logs in this directory (default: dropped)"
    )
    p.add_argument(
        "--schedule-only",
        action="store_true",
        help="prints the seed's schedule of faults as JSON and exits, starting nothing",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if args.schedule_only:
        print(json.dumps([dataclasses.asdict(f) for f in schedule(args.seed, args.seconds)]))
        return 0
    print(f"chaos seed {args.seed}", flush=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        servers_from_env(Path(tmp)) as (pg_server, redis_url),
    ):
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(chaos(args, pg_server, redis_url, logs))
    print(report.summary())
    if args.report:
        args.report.write_text(report.to_json())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
