"""The bank-style chaos run: `python -m load.chaos --help`.

Real processes on one machine: an API and three workers, on a PostgreSQL and a Redis that
the run starts for itself (embedded ones, so that it can crash and restart them). Clients
send deposits and withdrawals with Idempotency-Keys to one hot wallet and 50 others, and
(a third of what they send) transfers between them, half of them to the hot wallet, and
record every answer: 200 (applied), 409 (refused), anything else or nothing (unknown). Their
transfers follow a plan drawn from the seed alone (the n-th transfer's wallets, amount and
Idempotency-Key, an ordinary-looking UUID), so that a client who knows the seed can compute
them before they are sent.

Beside them a hostile client, also drawing from the seed, does what a client may do:
- squats ids: for a share of the planned transfers, half of them before they are sent
  (the first few before the load starts, the others a little ahead of the honest
  clients), half as soon as an honest client has sent them, while they are under way, it
  deposits 0.01 on the transfer's source and destination under Idempotency-Keys equal to
  every id of the transfer it can compute with the service's own derivations
  (shared/ids.py: the transfer's id, its return's, the id its key would become as an
  operation, the id it would have from the destination), each in one of its spellings
  (as is, upper case, braces, urn:uuid:, no hyphens; the first few transfers in all five);
- reuses keys: it sends an honest client's key, once answered 200 or 409, again with
  another body (another amount, the other kind, another destination);
- sends one new request under one key many times at once.
Meanwhile a schedule drawn from the seed strikes each fault once:
- kill: a worker is killed with SIGKILL;
- pause: the owner of the hot wallet is stopped (SIGSTOP) inside a batch until its lease
  has run out and another worker has taken its shards, then continued;
- start: one more worker starts;
- terminate_postgres_sessions: PostgreSQL terminates every session of the service;
- drop_redis_connections: Redis drops every connection of the service;
- restart_postgres: PostgreSQL crashes (an immediate stop), stays down 2 s, and starts,
  recovering from its WAL;
- restart_redis_empty: Redis is killed and started again with nothing (no persistence):
  streams, leases and heartbeats are gone;
- cut_worker_from_postgres: a worker that reaches PostgreSQL through a proxy is cut off
  from it (packets dropped, connections kept) while it keeps Redis, until its shards have
  been served by others; then the network comes back and it takes shards again;
- poison_entry: an entry no batch could apply (an amount past BIGINT) is put on the hot
  wallet's stream, as a broken writer would;
- kill_api: the API process is killed with SIGKILL, and a new one started;
- pause_api: the API process is stopped (SIGSTOP) for 2 s, then continued.
With `--redis-cluster` the run starts a Redis Cluster of Debian's redis-server (3 primaries
with a replica each) instead of one Redis, and its three faults take the place of
restart_redis_empty:
- kill_redis_primary: the primary of the hot wallet's slot is killed with SIGKILL, and its
  replica takes over (2 s node timeout); what it had not passed on is gone;
- move_slot: the hot wallet's slot is moved to another primary under load, keys and all;
- redis_primary_back: the killed primary is started again, and joins as a replica.
After each fault every wallet is sent a deposit until it answers 200; the time from the
fault to the last wallet's 200 is that fault's recovery, and must stay within its bound.

Then the faults are healed and every unknown is sent again with its key until it has an
answer, and the run checks: every transfer is completed or rejected, none in flight; every
200 is in the ledger exactly once and applied (a transfer's two legs), every 409 moved
nothing (a transfer refused, or credited back), nothing is in the ledger that no client
sent, every balance follows from its ledger and is never negative, the balances add up to
the deposits minus the withdrawals, every shard has exactly one owner among the live workers, the
stopped worker's late batch was refused by its fence, the poison entry is in the dead
letters, every fault's recovery stayed within its bound, and no answer was a 500. And for
the hostile client: every squatting deposit was answered 200 and applied once; every
transfer it squatted was completed, or rejected only for want of funds at its source; no
request of a client was refused as a reused key but the reuses, each answered 422 with
the key's first operation left as it was and nothing of the reuse applied; the sends of
one key at once were applied once and all answered alike.

A failing run prints its seed and exits 1; `--seed` replays the same schedule, and
`--schedule-only` prints it without running. `--report` writes the report as JSON (what
tests/test_chaos.py reads), the hostile client's counts under "hostile"; `--no-hostile`
runs without it. Traffic goes to loopback only; the run stops by itself.
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
from redis.asyncio import Redis, RedisCluster
from redis.crc import key_slot

from devtools.blackhole import BlackHole
from devtools.ledger import replay_ledger
from devtools.processes import Cluster, free_port
from devtools.servers import (
    EmbeddedPostgres,
    RedisClusterNodes,
    RedisProcess,
    embedded_postgres,
    embedded_redis,
    kill_client,
    migrate,
    redis_clients,
    redis_cluster,
    redis_server_7,
    with_database,
)
from devtools.waiting import until, wait_ready
from shared.codec import (
    DEPOSIT,
    INSUFFICIENT_FUNDS,
    TRANSFER,
    TRANSFER_IN,
    TRANSFER_OUT,
    TRANSFER_RETURN,
    WITHDRAW,
    OperationRequest,
    encode_request,
)
from shared.connections import REDIS_ERRORS, RedisClient, cluster_client
from shared.ids import client_operation_id, return_op_id, transfer_id_for
from shared.keys import KeySpace
from shared.money import format_minor
from shared.scripts import ENQUEUE

SHARDS = 16
LEASE_TTL = 2.0
REPLY_TIMEOUT = 5.0
FUNDING_MINOR = 50_000  # 500.00 for each wallet, so that withdrawals are refused now and then
REFUSED = "batch refused"  # what a worker logs when the fence refuses its batch
CHAOS_APPLICATION = "chaos-runner"  # spared when the sessions are terminated
PROBE_MINOR = 100  # each recovery probe deposits 1.00
DOWN = 2.0  # how long a crashed PostgreSQL stays down, and a paused API process
RESCAN_INTERVAL = 2.0  # so that a transfer's step lost with Redis is sent again in the run
RESEND_AFTER = 1.0
API_START = 3.0  # time enough for a new API process to start serving
# The hostile client. It squats the ids of the first few planned transfers in every
# spelling before the load starts, then of a share of the others in one spelling each:
# half of them ahead of the honest clients (at most SQUAT_AHEAD planned transfers ahead),
# half as soon as an honest client has sent them, while they are under way.
SQUAT_MINOR = 1
SQUATTED_FIRST = 5
SQUAT_SHARE = 0.1
SQUAT_AHEAD = 40
BEFORE, WHILE = "before", "while"  # when a planned transfer's ids are squatted
REUSE_PAUSE = 0.05  # between two reused keys
TWINS = 8  # sends of one key at once
TWIN_PAUSE = 0.1
HOSTILE_CONNECTIONS = 2 * 8 + TWINS + 1  # two squats' deposits, a key's twins, a reuse
# The hostile client's roles; an honest client's requests have none.
SQUAT, REUSE, TWIN = "squat", "reuse", "twin"
DEFINITE = (200, 409, 422)  # answers that tell what became of a request
# Each fault, and how soon after it every wallet must answer 200 again (seconds). A worker
# killed, stopped or cut off holds its shards until its lease runs out (LEASE_TTL), or until
# it has failed to commit for a lease (cut off); then the others take them at their next
# tend. A request sent meanwhile waits at most REPLY_TIMEOUT before it is answered 202.
FAULTS = {
    "kill": 2 * LEASE_TTL + 2,
    "pause": 2 * LEASE_TTL + 2,
    "start": 3.0,
    "terminate_postgres_sessions": 3.0,
    "drop_redis_connections": 3.0,
    "restart_postgres": DOWN + 3,
    "restart_redis_empty": 3.0,
    "cut_worker_from_postgres": 2 * LEASE_TTL + 1,
    "poison_entry": 3.0,
    "kill_api": API_START + 2,
    "pause_api": DOWN + 3,
}
# On a Redis Cluster: a failover waits for the node timeout (2 s), the failure's news and
# an election (the replica took over 3.6 to 4.7 s after the kill in ten runs), then for the
# service's retries, backing off up to 2 s, to reach the new primary.
CLUSTER_FAULTS = {
    "kill_redis_primary": 2.0 + 6,
    "move_slot": 3.0,
    "redis_primary_back": 3.0,
}


def faults(cluster: bool) -> dict[str, float]:
    """The faults of a run and their bounds."""
    if not cluster:
        return FAULTS
    return {**{k: v for k, v in FAULTS.items() if k != "restart_redis_empty"}, **CLUSTER_FAULTS}


@dataclasses.dataclass(frozen=True)
class Fault:
    at: float  # seconds after the load started
    kind: str
    pick: int  # which worker, where the fault picks one


def schedule(seed: int, seconds: float, cluster: bool = False) -> list[Fault]:
    """The faults of a run: each kind once, in an order and at times drawn from the seed,
    spread over the load's first three quarters so that each has time to play out. A
    killed primary comes back after it was killed."""
    rng = random.Random(seed)
    kinds = list(faults(cluster))
    rng.shuffle(kinds)
    if cluster and kinds.index("redis_primary_back") < kinds.index("kill_redis_primary"):
        back, kill = kinds.index("redis_primary_back"), kinds.index("kill_redis_primary")
        kinds[back], kinds[kill] = kinds[kill], kinds[back]
    slot = seconds * 0.75 / len(kinds)
    return [
        Fault(round(slot * (i + rng.uniform(0.2, 0.8)), 2), kind, rng.randrange(1000))
        for i, kind in enumerate(kinds)
    ]


@dataclasses.dataclass(frozen=True)
class Planned:
    """One of the honest clients' transfers, as the seed alone decides it."""

    source: str
    destination: str
    key: str
    minor: int
    squat: str  # when the hostile client squats its ids: BEFORE, WHILE, or never ("")


def planned_transfer(seed: int, n: int, wallets: list[str]) -> Planned:
    """The honest clients' n-th transfer: from one of the wallets beside the hot one
    (`wallets[0]`), half of them to the hot wallet. Anyone who knows the seed and the
    wallets can compute it, its Idempotency-Key too."""
    rng = random.Random(f"{seed}/transfer/{n}")
    source = rng.choice(wallets[1:])
    destination = source
    while destination == source:
        destination = wallets[0] if rng.random() < 0.5 else rng.choice(wallets)
    minor = rng.randrange(1, 200) * 100
    key = new_key(rng)
    squat = "" if rng.random() >= SQUAT_SHARE else rng.choice((BEFORE, WHILE))
    return Planned(source, destination, key, minor, BEFORE if n < SQUATTED_FIRST else squat)


def spellings(u: str) -> list[str]:
    """A UUID as clients may write it; each is a key of its own."""
    plain = uuid.UUID(u)
    return [str(plain), str(plain).upper(), f"{{{plain}}}", plain.urn, plain.hex]


def computed_ids(p: Planned) -> list[str]:
    """Every id of the transfer that a client can compute with the service's own
    derivations."""
    transfer_id = transfer_id_for(p.source, p.key)
    return [
        transfer_id,
        return_op_id(transfer_id),
        client_operation_id(p.key),
        transfer_id_for(p.destination, p.key),
    ]


def new_key(rng: random.Random) -> str:
    """An Idempotency-Key as clients make them (a random UUID), drawn from `rng`."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


@dataclasses.dataclass
class Sent:
    key: str
    wallet: str  # a transfer's source
    kind: str  # DEPOSIT, WITHDRAW, or TRANSFER
    minor: int
    statuses: list[int]  # every answer, in order; 0 for none (timeout, connection lost)
    to: str = ""  # a transfer's destination
    role: str = ""  # the hostile client's: SQUAT, REUSE or TWIN
    of: Sent | None = None  # the honest request whose key a reuse sends again
    bodies: list[bytes] | None = None  # every answer's body, where kept (twins)

    @property
    def final(self) -> int:
        return self.statuses[-1]

    @property
    def transfer_id(self) -> str:
        return transfer_id_for(self.wallet, self.key)

    @property
    def op_id(self) -> str:
        return client_operation_id(self.key)


@dataclasses.dataclass
class Report:
    seed: int
    sent: int = 0
    answers: Counter[int] = dataclasses.field(default_factory=Counter)
    resolved: int = 0
    fenced_refusals: int = 0
    transfers: Counter[int] = dataclasses.field(default_factory=Counter)  # by final status
    recovery: dict[str, float] = dataclasses.field(default_factory=dict)  # fault -> seconds
    events: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    hostile: Counter[str] = dataclasses.field(default_factory=Counter)  # what it sent, found

    def summary(self) -> str:
        lines = [
            f"seed {self.seed}: {self.sent} operations sent, answers {dict(self.answers)}, "
            f"{self.resolved} unknowns resolved by retrying with their keys, "
            f"transfers {dict(self.transfers)}, "
            f"{self.fenced_refusals} late batches refused by a fence",
            f"  hostile client: {dict(self.hostile)}",
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
        fields["transfers"] = {str(status): n for status, n in sorted(self.transfers.items())}
        fields["hostile"] = dict(sorted(self.hostile.items()))
        return json.dumps(fields, indent=2)


class Chaos:
    def __init__(
        self,
        args: argparse.Namespace,
        postgres: EmbeddedPostgres,
        redis_server: RedisProcess | RedisClusterNodes,
        database_url: str,
        logs: Path,
    ) -> None:
        self.args = args
        self.postgres, self.redis_server = postgres, redis_server
        self.faults = faults(isinstance(redis_server, RedisClusterNodes))
        self.database_url = database_url
        self.prefix = f"chaos-{uuid.uuid4().hex[:10]}"
        self.keys = KeySpace(self.prefix, SHARDS)
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        self.cluster = Cluster(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_server.url,
                "REDIS_CLUSTER": str(isinstance(redis_server, RedisClusterNodes)).lower(),
                "REDIS_KEY_PREFIX": self.prefix,
                "SHARD_COUNT": str(SHARDS),
                "WORKER_LEASE_TTL": str(LEASE_TTL),
                "WORKER_METRICS_PORT": "0",
                "REPLY_TIMEOUT": str(REPLY_TIMEOUT),
                "WORKER_RESCAN_INTERVAL": str(RESCAN_INTERVAL),
                "TRANSFER_RESEND_AFTER": str(RESEND_AFTER),
                "HOST": "127.0.0.1",
                "PORT": str(port),
            },
            logs,
        )
        self.redis: RedisClient = (
            cluster_client(redis_server.url)
            if isinstance(redis_server, RedisClusterNodes)
            else Redis.from_url(redis_server.url)
        )
        self.killed_node: int | None = None
        self.report = Report(args.seed)
        self.sent: list[Sent] = []
        self.paused: subprocess.Popen[bytes] | None = None
        self.killed: set[int] = set()
        self.hot = ""
        self.wallets: list[str] = []
        self.load_over = False
        self.transfers_taken = 0  # how many planned transfers the honest clients have sent
        self.planned_sent: dict[int, Sent] = {}  # the honest clients' n-th transfer
        # (source, key) of each planned transfer squatted -> when: all its squats answered
        # before it was sent, sent while it was not answered yet, or later
        self.squatted: dict[tuple[str, str], str] = {}

    # --- the clients ---

    async def operate(self, http: aiohttp.ClientSession, op: Sent) -> None:
        if op.kind == TRANSFER:
            url = "/api/v1/transfers"
            body = {"from": op.wallet, "to": op.to, "amount": format_minor(op.minor)}
        else:
            url = f"/api/v1/wallets/{op.wallet}/operation"
            body = {"operationType": op.kind, "amount": format_minor(op.minor)}
        try:
            async with http.post(url, json=body, headers={"Idempotency-Key": op.key}) as r:
                answer = await r.read()
                op.statuses.append(r.status)
        except (aiohttp.ClientError, TimeoutError):
            answer = b""
            op.statuses.append(0)
        if op.bodies is not None:
            op.bodies.append(answer)
        self.report.answers[op.statuses[-1]] += 1

    async def client(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        while not self.load_over:
            wallet = self.hot if rng.random() < 0.5 else rng.choice(self.wallets[1:])
            minor = rng.randrange(1, 200) * 100
            if rng.random() < 1 / 3:
                # A third are transfers, the next of the plan.
                p = planned_transfer(self.args.seed, self.transfers_taken, self.wallets)
                op = Sent(p.key, p.source, TRANSFER, p.minor, [], to=p.destination)
                self.planned_sent[self.transfers_taken] = op
                self.transfers_taken += 1
            else:
                kind = "DEPOSIT" if rng.random() < 0.45 else "WITHDRAW"
                op = Sent(str(uuid.uuid4()), wallet, kind, minor, [])
            self.sent.append(op)
            await self.operate(http, op)
            await asyncio.sleep(self.args.think)

    # --- the hostile client ---

    async def squat(
        self, http: aiohttp.ClientSession, p: Planned, rng: random.Random, every_spelling: bool
    ) -> None:
        """Deposits 0.01 on the transfer's two wallets under each id of it a client can
        compute, in every spelling or in one drawn."""
        squats = [
            Sent(key, wallet, DEPOSIT, SQUAT_MINOR, [], role=SQUAT)
            for wallet in (p.source, p.destination)
            for computed in computed_ids(p)
            for key in (
                spellings(computed) if every_spelling else [rng.choice(spellings(computed))]
            )
        ]
        self.sent += squats
        await asyncio.gather(*(self.operate(http, op) for op in squats))

    async def squat_first(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        """Before the load: the first planned transfers' ids, in every spelling."""
        for n in range(SQUATTED_FIRST):
            p = planned_transfer(self.args.seed, n, self.wallets)
            self.squatted[(p.source, p.key)] = "before_sent"
            await self.squat(http, p, rng, True)

    async def squatter(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        """During the load: the ids of the planned transfers to squat before they are sent,
        ahead of the honest clients (or as they are sent, where it falls behind)."""
        n = SQUATTED_FIRST
        while not self.load_over:
            if n >= self.transfers_taken + SQUAT_AHEAD:
                await asyncio.sleep(self.args.think)
                continue
            n = max(n, self.transfers_taken)
            p = planned_transfer(self.args.seed, n, self.wallets)
            if p.squat == BEFORE:
                self.squatted[(p.source, p.key)] = self.when(n)
                await self.squat(http, p, rng, False)
                if n >= self.transfers_taken:
                    self.squatted[(p.source, p.key)] = "before_sent"
            n += 1

    async def squatter_in_flight(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        """During the load: the ids of the planned transfers to squat while they are under
        way, as soon as an honest client has sent them."""
        n = SQUATTED_FIRST
        while not self.load_over:
            if n >= self.transfers_taken:
                await asyncio.sleep(0.005)
                continue
            n = max(n, self.transfers_taken - 1)  # behind: those sent long ago are settled
            p = planned_transfer(self.args.seed, n, self.wallets)
            if p.squat == WHILE:
                self.squatted[(p.source, p.key)] = self.when(n)
                await self.squat(http, p, rng, False)
            n += 1

    def when(self, n: int) -> str:
        """Where the honest clients' n-th transfer stands, as its squats are sent."""
        sent = self.planned_sent.get(n)
        return "late" if sent is not None and sent.statuses else "in_flight"

    async def reuser(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        """Sends honest clients' keys, once answered, again with another body."""
        while not self.load_over:
            await asyncio.sleep(REUSE_PAUSE)
            answered = (rng.choice(self.sent) for _ in range(20))
            original = next(
                (op for op in answered if not op.role and op.statuses[-1:] in ([200], [409])),
                None,
            )
            if original is None:
                continue
            reuse = dataclasses.replace(original, statuses=[], role=REUSE, of=original)
            if rng.random() < 0.5:
                reuse.minor += rng.randrange(1, 100) * 100
            elif original.kind == TRANSFER:
                reuse.to = rng.choice(
                    [w for w in self.wallets if w not in (reuse.wallet, reuse.to)]
                )
            else:
                reuse.kind = WITHDRAW if original.kind == DEPOSIT else DEPOSIT
            self.sent.append(reuse)
            await self.operate(http, reuse)

    async def twins(self, http: aiohttp.ClientSession, rng: random.Random) -> None:
        """Sends a new request, under a new key, TWINS times at once."""
        while not self.load_over:
            kind = rng.choice([DEPOSIT, WITHDRAW, TRANSFER])
            source = rng.choice(self.wallets[1:])
            to = rng.choice([w for w in self.wallets if w != source]) if kind == TRANSFER else ""
            key, minor = new_key(rng), rng.randrange(1, 200) * 100
            group = [
                Sent(key, source, kind, minor, [], to=to, role=TWIN, bodies=[])
                for _ in range(TWINS)
            ]
            self.sent += group
            await asyncio.gather(*(self.operate(http, op) for op in group))
            await asyncio.sleep(TWIN_PAUSE)

    async def recovered(self, http: aiohttp.ClientSession, fault: str, since: float) -> None:
        """Sends every wallet a deposit, and again while it is not answered 200; records the
        time from `since` (the fault) to the last wallet's 200 as the fault's recovery."""
        bound = self.faults[fault]

        async def served(wallet: str) -> float:
            while time.monotonic() - since < bound + REPLY_TIMEOUT:
                probe = Sent(str(uuid.uuid4()), wallet, "DEPOSIT", PROBE_MINOR, [])
                self.sent.append(probe)
                await self.operate(http, probe)
                if probe.final == 200:
                    return time.monotonic() - since
                await asyncio.sleep(0.05)
            return float("inf")

        slowest = max(await asyncio.gather(*(served(w) for w in self.wallets)))
        self.report.recovery[fault] = round(slowest, 2)
        self.event(f"{fault}: every wallet answered 200 again {slowest:.2f} s after the fault")
        if slowest > bound:
            self.problem(f"{fault}: a wallet went unserved {slowest:.2f} s, beyond {bound} s")

    # --- the faults: each strikes, then waits until every wallet is served again ---

    async def kill(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        live = self.cluster.live_workers()
        victim = live[fault.pick % len(live)]
        victim.kill()
        self.killed.add(victim.pid)
        since = time.monotonic()
        self.event(f"killed worker pid {victim.pid} with SIGKILL")
        await self.recovered(http, fault.kind, since)

    async def start(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        since = time.monotonic()
        self.event(f"started worker pid {self.cluster.start('worker').pid}")
        await self.recovered(http, fault.kind, since)

    async def terminate_postgres_sessions(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        ended = await self.pg.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name <> $1",
            CHAOS_APPLICATION,
        )
        since = time.monotonic()
        self.event(f"PostgreSQL terminated {ended} sessions")
        await self.recovered(http, fault.kind, since)

    async def drop_redis_connections(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        ours = [
            (node, c)
            for node, c in await redis_clients(self.redis)
            if (c.get("name") or "").startswith(f"{self.prefix}:")
        ]
        for node, client in ours:
            await kill_client(self.redis, node, client)
        since = time.monotonic()
        self.event(f"Redis dropped {len(ours)} connections of the service")
        await self.recovered(http, fault.kind, since)

    async def restart_postgres(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        await asyncio.to_thread(self.postgres.crash)
        since = time.monotonic()
        await asyncio.sleep(DOWN)
        started = time.monotonic()
        await asyncio.to_thread(self.postgres.start)
        await self.pg.expire_connections()
        self.event(
            f"PostgreSQL crashed, stayed down {DOWN} s and started again (its start took"
            f" {time.monotonic() - started:.2f} s)"
        )
        await self.recovered(http, fault.kind, since)

    async def restart_redis_empty(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        assert isinstance(self.redis_server, RedisProcess)
        await asyncio.to_thread(self.redis_server.kill)
        since = time.monotonic()
        await asyncio.to_thread(self.redis_server.start)
        self.event("Redis was killed and started again empty")
        await self.recovered(http, fault.kind, since)

    async def kill_redis_primary(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        assert isinstance(self.redis_server, RedisClusterNodes)
        nodes = self.redis_server
        primary = await asyncio.to_thread(nodes.owner_of, self.hot_slot())
        nodes.kill(primary)
        since = time.monotonic()
        self.killed_node = primary
        await asyncio.to_thread(nodes.wait_failed_over, primary)
        self.event(
            f"killed the Redis primary on port {primary} with SIGKILL; its replica took over"
            f" {time.monotonic() - since:.2f} s later"
        )
        await self.recovered(http, fault.kind, since)

    async def move_slot(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        assert isinstance(self.redis_server, RedisClusterNodes)
        nodes, slot = self.redis_server, self.hot_slot()
        owner = await asyncio.to_thread(nodes.owner_of, slot)
        others = [p for p in await asyncio.to_thread(nodes.primary_ports) if p != owner]
        target = others[fault.pick % len(others)]
        since = time.monotonic()
        await asyncio.to_thread(nodes.move_slot, slot, target)
        self.event(f"moved slot {slot} from the primary on port {owner} to the one on {target}")
        await self.recovered(http, fault.kind, since)

    async def redis_primary_back(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        assert isinstance(self.redis_server, RedisClusterNodes)
        assert self.killed_node is not None
        since = time.monotonic()
        await asyncio.to_thread(self.redis_server.start, self.killed_node)
        await asyncio.to_thread(self.redis_server.wait_ok)
        self.event(f"started the killed Redis primary on port {self.killed_node} again")
        await self.recovered(http, fault.kind, since)

    def hot_slot(self) -> int:
        return key_slot(self.keys.wallet_stream(self.hot).encode())

    async def cut_worker_from_postgres(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        """A worker reaching PostgreSQL through a network that is cut while it keeps Redis:
        its shards must be served by others; once the network is back it takes some again."""
        worker = self.cluster.start("worker", DATABASE_URL=self.network.url)

        async def owns_shards() -> bool:
            return str(worker.pid) in await self.shard_owner_pids()

        await until(owns_shards, LEASE_TTL * 10, "the worker behind the proxy to own shards")
        self.network.cut()
        since = time.monotonic()
        self.event(f"cut worker pid {worker.pid} off from PostgreSQL")
        await self.recovered(http, fault.kind, since)
        self.network.restore()
        back = time.monotonic()
        await until(owns_shards, LEASE_TTL * 10, "the worker to take shards again")
        self.event(f"it took shards again {time.monotonic() - back:.2f} s after the cut ended")

    async def poison_entry(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        shard = self.keys.shard_of(self.hot)
        op = OperationRequest(str(uuid.uuid4()), self.hot, "DEPOSIT", 2**63, "", 0)
        poison = encode_request(op)
        enqueue = self.redis.register_script(ENQUEUE)
        await enqueue(keys=self.keys.enqueue_keys(self.hot), args=[self.hot, poison, 10**6, 10**6])
        since = time.monotonic()

        async def dead_lettered() -> bool:
            letters: Any = await self.redis.xrange(self.keys.dead_letters(shard))
            return any(fields[b"m"] == poison for _, fields in letters)

        await until(dead_lettered, 10, "the poison entry to go to the dead letters")
        self.event("a poison entry on the hot wallet went to the dead letters")
        await self.recovered(http, fault.kind, since)

    async def kill_api(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        """Its requests in flight are lost to their clients (unknowns, resolved by their
        keys); what it had queued is applied by the workers all the same."""
        api = self.cluster.api
        assert api is not None
        api.kill()
        await asyncio.to_thread(api.wait)
        since = time.monotonic()
        self.event(f"killed the API process pid {api.pid} with SIGKILL; started another")
        self.cluster.start("api")
        await self.recovered(http, fault.kind, since)

    async def pause_api(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        api = self.cluster.api
        assert api is not None
        api.send_signal(signal.SIGSTOP)
        since = time.monotonic()
        await asyncio.sleep(DOWN)
        api.send_signal(signal.SIGCONT)
        self.event(f"stopped the API process for {DOWN} s, then continued it")
        await self.recovered(http, fault.kind, since)

    async def pause(self, http: aiohttp.ClientSession, fault: Fault) -> None:
        """Stops the hot wallet's writer in the middle of a batch, and continues it once
        another worker has taken its shard: its batch must then be refused. The batch is
        caught in flight by holding the hot wallet's row, which it waits for."""
        pg = self.pg
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
            since = time.monotonic()
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
        await self.recovered(http, fault.kind, since)

    async def shard_owner_pids(self) -> set[str]:
        leases: list[Any] = [await self.redis.get(self.keys.lease(s)) for s in range(SHARDS)]
        return {lease.decode().rsplit("-", 2)[-2] for lease in leases if lease}

    # --- the run ---

    async def run(self) -> Report:
        self.pg = await asyncpg.create_pool(
            self.database_url,
            min_size=0,  # no floor to restore, and to log about, while PostgreSQL is down
            max_size=4,
            server_settings={"application_name": CHAOS_APPLICATION},
        )
        self.network = await BlackHole(self.database_url).start()
        if isinstance(self.redis, RedisCluster):
            await self.redis.initialize()  # it knows every node then, not only the seed
        timeout = aiohttp.ClientTimeout(total=REPLY_TIMEOUT + 5)
        connector = aiohttp.TCPConnector(limit=self.args.clients + 4 + HOSTILE_CONNECTIONS)
        try:
            async with aiohttp.ClientSession(
                self.base, timeout=timeout, connector=connector
            ) as http:
                self.cluster.start("api")
                for _ in range(3):
                    self.cluster.start("worker")
                await wait_ready(http, f"{self.base}/ready")
                await self.set_up_wallets(http)
                await self.load_with_faults(http)
                await self.heal_and_resolve(http)
                await self.check(self.pg)
        finally:
            self.network.restore()  # a worker still behind it can then stop as asked
            self.cluster.stop()
            await self.network.close()
            await self.pg.close()
        return self.report

    async def set_up_wallets(self, http: aiohttp.ClientSession) -> None:
        for _ in range(self.args.wallets + 1):
            async with http.post("/api/v1/wallets") as r:
                self.wallets.append((await r.json())["id"])
        self.hot = self.wallets[0]
        funding = [Sent(str(uuid.uuid4()), w, "DEPOSIT", FUNDING_MINOR, []) for w in self.wallets]
        self.sent += funding
        await asyncio.gather(*(self.operate(http, op) for op in funding))

    async def load_with_faults(self, http: aiohttp.ClientSession) -> None:
        """The load runs `--seconds`, or until the last fault has played out if later."""
        rng = random.Random(self.args.seed)
        hostile = random.Random(rng.random())
        if not self.args.no_hostile:
            await self.squat_first(http, hostile)
        start = time.monotonic()
        clients = [
            asyncio.create_task(self.client(http, random.Random(rng.random())))
            for _ in range(self.args.clients)
        ]
        if not self.args.no_hostile:
            clients += [
                asyncio.create_task(attack(http, random.Random(hostile.random())))
                for attack in (self.squatter, self.squatter_in_flight, self.reuser, self.twins)
            ]
        try:
            for fault in schedule(self.args.seed, self.args.seconds, self.args.redis_cluster):
                await asyncio.sleep(max(0.0, start + fault.at - time.monotonic()))
                strike = getattr(self, fault.kind)
                try:
                    await strike(http, fault)
                except (TimeoutError, asyncpg.PostgresError, RuntimeError, *REDIS_ERRORS) as e:
                    self.problem(f"{fault.kind} at {fault.at}s failed: {e}")
            await asyncio.sleep(max(0.0, start + self.args.seconds - time.monotonic()))
        finally:
            self.load_over = True
            if self.paused is not None:
                self.paused.send_signal(signal.SIGCONT)
            await asyncio.gather(*clients)

    async def heal_and_resolve(self, http: aiohttp.ClientSession) -> None:
        """Sends every operation without a definite answer again, with its key, until it
        has one: the retry either finds it applied or refused, or applies it now (or, for
        a reused key, refuses it as reused)."""
        unknown = [op for op in self.sent if op.final not in DEFINITE]
        for attempt in range(20):
            if not unknown:
                break
            await asyncio.gather(*(self.operate(http, op) for op in unknown))
            unknown = [op for op in unknown if op.final not in DEFINITE]
            if unknown:
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        self.report.resolved = sum(1 for op in self.sent if len(op.statuses) > 1)
        for op in unknown:
            self.problem(f"operation {op.key} has no answer after retries: {op.statuses}")

    async def check(self, pg: Any) -> None:
        self.report.sent = len(self.sent)
        if any(500 <= s < 600 and s != 503 for op in self.sent for s in op.statuses):
            self.problem("a request was answered with a 5xx other than 503")
        await self.check_transfers_settle(pg)
        rows = await pg.fetch(
            "SELECT wallet_id::text, id::text, seq, kind, amount, status, reason, balance_after,"
            " transfer_id::text, counterparty::text"
            " FROM operations WHERE wallet_id = any($1::uuid[]) ORDER BY wallet_id, seq",
            self.wallets,
        )
        by_id = {(r["wallet_id"], r["id"]): r for r in rows}
        if len(by_id) != len(rows):
            self.problem("an operation id appears in a wallet's ledger more than once")
        # (wallet, ledger id) -> (kind, amount, counterparty) of every row a client caused
        expected: dict[tuple[str, str], tuple[str, int, str | None]] = {}
        for op in self.sent:
            if op.role == REUSE:
                continue  # nothing of a reuse may be applied
            if op.kind == TRANSFER:
                t = op.transfer_id
                expected[(op.wallet, t)] = (TRANSFER_OUT, op.minor, op.to)
                expected[(op.to, t)] = (TRANSFER_IN, op.minor, op.wallet)
                expected[(op.wallet, return_op_id(t))] = (TRANSFER_RETURN, op.minor, op.to)
            else:
                expected[(op.wallet, op.op_id)] = (op.kind, op.minor, None)
        for key, r in by_id.items():
            if (r["kind"], r["amount"], r["counterparty"]) != expected.get(key):
                self.problem(f"ledger row {dict(r)} was never sent by a client")
        for op in self.sent:
            if op.role == REUSE:
                self.check_reuse(op, by_id)
                continue
            if 422 in op.statuses:
                self.problem(
                    f"{op.kind} {op.key} ({op.role or 'honest'}) was refused as a reused key:"
                    f" {op.statuses}"
                )
            if op.role == SQUAT:
                self.report.hostile["squats"] += 1
                if op.final != 200:
                    self.problem(f"squatting deposit {op.key} on {op.wallet}: {op.statuses}")
            if op.kind == TRANSFER:
                self.check_transfer(op, by_id)
                continue
            row = by_id.get((op.wallet, op.op_id))
            if op.final == 200 and (row is None or row["status"] != "applied"):
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
        # Conservation: transfers only move money between the wallets.
        brought = sum(
            r["amount"] if r["kind"] == "DEPOSIT" else -r["amount"]
            for r in rows
            if r["status"] == "applied" and r["kind"] in ("DEPOSIT", "WITHDRAW")
        )
        if sum(balances.values()) != brought:
            self.problem(
                f"the balances add up to {sum(balances.values())}, the deposits and "
                f"withdrawals to {brought}"
            )
        self.check_twins()
        await self.check_ownership(pg)
        self.check_processes()
        if self.paused is not None:
            log = self.cluster.log_of(self.paused)
            self.report.fenced_refusals = log.count(REFUSED)
            if not self.report.fenced_refusals:
                self.problem(
                    f"the paused worker (pid {self.paused.pid}) had no batch refused; its log "
                    f"ends:\n{log[-3000:]}"
                )

    async def check_transfers_settle(self, pg: Any) -> None:
        """Once the faults are healed, no transfer stays in flight."""

        async def settled() -> bool:
            return not await pg.fetchval(
                "SELECT count(*) FROM transfers WHERE status IN ('in_flight', 'returning')"
            )

        try:
            await until(settled, 30, "every transfer to be completed or rejected")
        except TimeoutError:
            stuck = await pg.fetch(
                "SELECT id::text, status FROM transfers WHERE status IN ('in_flight', 'returning')"
            )
            self.problem(f"transfers still in flight: {[tuple(r) for r in stuck]}")

    def check_transfer(self, op: Sent, by_id: dict[tuple[str, str], Any]) -> None:
        """A 200 has both legs applied; a 409 moved nothing: refused at the source, or
        credited back to it."""
        t = op.transfer_id
        out = by_id.get((op.wallet, t))
        into = by_id.get((op.to, t))
        back = by_id.get((op.wallet, return_op_id(t)))
        legs = tuple(leg and leg["status"] for leg in (out, into, back))
        if op.final == 200 and legs != ("applied", "applied", None):
            self.problem(f"transfer {t} answered 200 but its legs are {legs}")
        if op.final == 409 and legs not in (
            ("rejected", None, None),
            ("applied", "rejected", "applied"),
        ):
            self.problem(f"transfer {t} answered 409 but its legs are {legs}")
        if op.role:
            return
        self.report.transfers[op.final] += 1
        when = self.squatted.get((op.wallet, op.key))
        if when is None:
            return
        # Squatted: completed, or refused only because its source had not the amount.
        hostile = self.report.hostile
        hostile["squatted_transfers"] += 1
        hostile[f"squatted_{when}"] += 1
        hostile[f"squatted_transfers_{op.final}"] += 1
        funds_short = (
            out is not None
            and legs == ("rejected", None, None)
            and out["reason"] == INSUFFICIENT_FUNDS
            and out["balance_after"] < op.minor
        )
        if op.final != 200 and not (op.final == 409 and funds_short):
            self.problem(
                f"squatted transfer {t} ({op.key}) answered {op.statuses}, its legs {legs},"
                f" its debit {out and dict(out)}"
            )

    def check_reuse(self, op: Sent, by_id: dict[tuple[str, str], Any]) -> None:
        """A key sent again with another body: refused as reused, and what the key did
        first stays as it was (nothing of the reuse is in the ledger: `check`)."""
        first = op.of
        assert first is not None
        self.report.hostile["reuses"] += 1
        if op.final != 422 or {200, 409} & set(op.statuses):
            self.problem(
                f"key {op.key} reused ({first.kind} {first.minor} -> {op.kind} {op.minor}"
                f" {op.to}) answered {op.statuses}, not 422"
            )
        else:
            self.report.hostile["reuses_refused"] += 1
        if first.kind == TRANSFER:
            t = first.transfer_id
            row = by_id.get((first.wallet, t))
            was: tuple[Any, ...] = (TRANSFER_OUT, first.minor, first.to)
            if op.to != first.to and by_id.get((op.to, t)) is not None:
                self.problem(f"key {op.key} reused to {op.to}: {dict(by_id[(op.to, t)])}")
        else:
            row = by_id.get((first.wallet, first.op_id))
            was = (first.kind, first.minor, None)
        if row is None or (row["kind"], row["amount"], row["counterparty"]) != was:
            self.problem(f"key {op.key} reused: its first operation is now {row and dict(row)}")

    def check_twins(self) -> None:
        """The sends of one key at once: all answered alike (the ledger holds it once:
        `check`)."""
        groups: dict[str, list[Sent]] = {}
        for op in self.sent:
            if op.role == TWIN:
                groups.setdefault(op.key, []).append(op)
        for key, group in groups.items():
            self.report.hostile["twin_keys"] += 1
            self.report.hostile["twin_sends"] += len(group)
            answers = {
                (status, json.dumps(json.loads(body), sort_keys=True))
                for op in group
                for status, body in zip(op.statuses, op.bodies or [], strict=True)
                if status in DEFINITE
            }
            if len(answers) != 1:
                self.problem(f"key {key} sent {len(group)} times at once: answers {answers}")

    def check_processes(self) -> None:
        """Every process the run did not kill is still running, and none hit an error it
        did not handle."""
        for process in [*self.cluster.workers, self.cluster.api]:
            if process is None or process.pid in self.killed:
                continue
            log = self.cluster.log_of(process)
            if process.poll() is not None:
                self.problem(f"pid {process.pid} exited ({process.returncode}):\n{log[-3000:]}")
            elif "Traceback" in log:
                at = log.index("Traceback")
                self.problem(f"pid {process.pid} logged a traceback:\n{log[at : at + 3000]}")

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


async def chaos(
    args: argparse.Namespace,
    postgres: EmbeddedPostgres,
    redis_server: RedisProcess | RedisClusterNodes,
    logs: Path,
) -> Report:
    """One run on servers of its own, stopped after it."""
    database_url = with_database(postgres.url, "chaos")
    admin = await asyncpg.connect(postgres.url)
    await admin.execute('CREATE DATABASE "chaos"')
    await admin.close()
    await asyncio.to_thread(migrate, database_url)
    run = Chaos(args, postgres, redis_server, database_url, logs)
    try:
        return await run.run()
    finally:
        await run.redis.aclose()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--seed", type=int, default=None, help="replays a run's schedule")
    p.add_argument("--seconds", type=float, default=30, help="length of the load (30)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    p.add_argument("--wallets", type=int, default=50, help="wallets beside the hot one (50)")
    p.add_argument("--think", type=float, default=0.02, help="a client's pause, s (0.02)")
    p.add_argument("--report", type=Path, help="also writes the report to this file, as JSON")
    p.add_argument("--no-hostile", action="store_true", help="without the hostile client")
    p.add_argument(
        "--logs", type=Path, help="keeps the processes' logs in this directory (default: dropped)"
    )
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="on a Redis Cluster of the run's own (Debian's redis-server 7), with its faults",
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
        shown = schedule(args.seed, args.seconds, args.redis_cluster)
        print(json.dumps([dataclasses.asdict(f) for f in shown]))
        return 0
    executable = redis_server_7()
    if args.redis_cluster and executable is None:
        print("--redis-cluster needs redis-server 7 or newer on PATH", file=sys.stderr)
        return 2
    print(f"chaos seed {args.seed}", flush=True)
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp,
        embedded_postgres(Path(tmp) / "postgres") as postgres,
        (
            redis_cluster(Path(tmp) / "cluster", executable)
            if args.redis_cluster and executable
            else embedded_redis(Path(tmp) / "redis", keep_data=False)
        ) as redis_server,
    ):
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(chaos(args, postgres, redis_server, logs))
    print(report.summary())
    if args.report:
        args.report.write_text(report.to_json())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
