"""The write path end to end: API -> wallet stream -> worker -> PostgreSQL -> reply."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from devtools.ledger import replay_ledger
from shared.ids import client_operation_id
from shared.money import format_minor
from shared.settings import Settings
from tests.conftest import running_worker
from tests.helpers import Client, eventually, ledger, operate
from worker.worker import Worker, connect, new_worker_id


async def test_2000_concurrent_operations_on_one_wallet_are_serializable(
    client: Client, wallet: str, pg: Any
) -> None:
    rng = random.Random(20261123)
    status, body, _ = await operate(client, wallet, "DEPOSIT", "500.00")
    assert status == 200, body
    plan = [
        (rng.choice(["DEPOSIT", "WITHDRAW", "WITHDRAW"]), rng.randint(1, 5000)) for _ in range(2000)
    ]
    results = await asyncio.gather(
        *(operate(client, wallet, kind, format_minor(minor)) for kind, minor in plan)
    )

    rows = await ledger(pg, wallet)
    assert len(rows) == 2001
    # every recorded decision follows from one serial order
    final, problems = replay_ledger(rows)
    assert problems == []
    by_id = {row["id"]: row for row in rows}
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 409}, [r for r in results if r[0] not in (200, 409)][:3]
    assert 409 in statuses  # the plan overdraws some of the time
    assert 200 in statuses
    for status, body, _ in results:
        op = body if status == 200 else body["operation"]
        row = by_id[op["id"]]
        assert op["status"] == row["status"] == ("applied" if status == 200 else "rejected")
        assert op["balance"] == format_minor(row["balance_after"])
        assert op["seq"] == row["seq"]

    applied = sum(
        (r["amount"] if r["kind"] == "DEPOSIT" else -r["amount"])
        for r in rows
        if r["status"] == "applied"
    )
    balance = await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet)
    assert balance == final == applied
    r = await client.get(f"/api/v1/wallets/{wallet}")
    assert (await r.json())["balance"] == format_minor(balance)


async def test_every_200_is_already_committed(client: Client, wallet: str, pg: Any) -> None:
    async with pg.acquire() as conn:  # a connection apart from the API's and the worker's
        for i in range(25):
            status, body, _ = await operate(client, wallet, "DEPOSIT", i + 1)
            assert status == 200
            row = await conn.fetchrow(
                "SELECT o.status, o.balance_after, w.balance FROM operations o"
                " JOIN wallets w ON w.id = o.wallet_id WHERE o.wallet_id = $1 AND o.id = $2",
                wallet,
                body["id"],
            )
            assert row is not None, f"operation {i} answered 200 but is not in PostgreSQL"
            assert row["status"] == "applied"
            assert format_minor(row["balance_after"]) == body["balance"]
            assert row["balance"] >= row["balance_after"]


async def test_one_clients_operations_apply_in_the_order_sent(
    client: Client, wallet: str, pg: Any
) -> None:
    sent = []
    for i in range(30):
        kind = "DEPOSIT" if i % 3 else "WITHDRAW"
        status, body, _ = await operate(client, wallet, kind, f"{i + 1}.{i:02d}")
        assert status in (200, 409)
        sent.append(body["id"] if status == 200 else body["operation"]["id"])
    assert [row["id"] for row in await ledger(pg, wallet)] == sent


async def test_one_idempotency_key_sent_50_times_at_once_applies_once(
    client: Client, wallet: str, pg: Any
) -> None:
    key = str(uuid.uuid4())
    results = await asyncio.gather(
        *(operate(client, wallet, "DEPOSIT", "12.34", key=key) for _ in range(50))
    )
    assert {status for status, _, _ in results} == {200}
    bodies = [body for _, body, _ in results]
    assert all(body == bodies[0] for body in bodies)
    assert bodies[0]["id"] == client_operation_id(key)
    first_answers = [h for _, _, h in results if "Idempotent-Replayed" not in h]
    assert len(first_answers) == 1
    rows = await ledger(pg, wallet)
    assert [(r["id"], r["amount"]) for r in rows] == [(client_operation_id(key), 1234)]
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 1234


async def test_a_replayed_key_returns_the_stored_outcome_later_too(
    client: Client, wallet: str
) -> None:
    first = await operate(client, wallet, "WITHDRAW", 5, key="order-1")
    assert first[0] == 409
    await operate(client, wallet, "DEPOSIT", 100)
    again = await operate(client, wallet, "WITHDRAW", 5, key="order-1")
    # The funds are there now, but the key's outcome was decided: the same 409 again.
    assert again[0] == 409
    assert again[1] == first[1]
    assert again[2]["Idempotent-Replayed"] == "true"
    status, body, _ = await operate(client, wallet, "WITHDRAW", 6, key="order-1")
    assert status == 422
    assert body["type"].endswith(":idempotency-key-reused")


async def test_a_burst_of_1000_is_committed_in_few_transactions(
    client: Client, wallet: str, pg: Any, worker: Worker
) -> None:
    batches_before = worker.committer.batches
    results = await asyncio.gather(
        *(operate(client, wallet, "DEPOSIT", "1.00") for _ in range(1000))
    )
    assert {status for status, _, _ in results} == {200}
    # Each transaction that wrote ledger rows stamped them with its own xid (xmin).
    transactions = await pg.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM operations WHERE wallet_id = $1", wallet
    )
    assert transactions < 100, f"{transactions} commits for 1000 operations"
    assert worker.committer.batches - batches_before == transactions
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 100_000


async def test_a_busy_worker_commits_at_most_once_per_batch_interval(
    api: Client, settings: Settings, pg: Any
) -> None:
    """Ten operations every 20 ms for a second: with BATCH_INTERVAL=0.25 that is a handful of
    commits (one per interval, and a first batch, which does not wait); without the interval
    it would be about one per wave."""
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    async with running_worker(dataclasses.replace(settings, batch_interval=0.25)):
        waves = []
        started = time.monotonic()
        for _ in range(50):
            waves.append(
                asyncio.gather(*(operate(api, wallet, "DEPOSIT", "1.00") for _ in range(10)))
            )
            await asyncio.sleep(0.02)  # the pace of the load, not a wait for a result
        results = [r for wave in await asyncio.gather(*waves) for r in wave]
        elapsed = time.monotonic() - started
    assert {status for status, _, _ in results} == {200}
    transactions = await pg.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM operations WHERE wallet_id = $1", wallet
    )
    assert transactions <= elapsed / 0.25 + 2, f"{transactions} commits in {elapsed:.2f}s"
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 50_000


async def test_operations_on_many_wallets_share_transactions(client: Client, pg: Any) -> None:
    wallets = []
    for _ in range(20):
        r = await client.post("/api/v1/wallets")
        wallets.append((await r.json())["id"])
    results = await asyncio.gather(
        *(operate(client, w, "DEPOSIT", n + 1) for n in range(10) for w in wallets)
    )
    assert {status for status, _, _ in results} == {200}
    balances = dict(
        await pg.fetch("SELECT id::text, balance FROM wallets WHERE id = any($1::uuid[])", wallets)
    )
    assert balances == {w: sum(range(1, 11)) * 100 for w in wallets}
    transactions = await pg.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM operations WHERE wallet_id = any($1::uuid[])",
        wallets,
    )
    assert transactions < 100


async def test_the_live_view_counts_what_was_answered_and_committed(
    client: Client, wallet: str
) -> None:
    results = await asyncio.gather(*(operate(client, wallet, "DEPOSIT", 1) for _ in range(50)))
    assert {status for status, _, _ in results} == {200}
    series: list[Any] = []

    async def all_counted() -> bool:
        # The workers add their counts every second; the view is computed once a second.
        nonlocal series
        series = (await (await client.get("/api/live")).json())["series"]
        return bool(sum(s["committed"] for s in series) >= 50)

    await eventually(all_counted, what="the committed operations to be counted")
    assert sum(s["answered"] for s in series) >= 50
    batches = [s["mean_batch"] for s in series if s["mean_batch"] is not None]
    assert batches
    assert all(b >= 1 for b in batches)
    assert all(s["p99_ms"] >= s["p50_ms"] for s in series if s["p50_ms"] is not None)


class StoppedClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock never moves: no sleep and no timeout ever ends, while
    sockets are served as usual."""

    def __init__(self) -> None:
        super().__init__()
        self._now = super().time()

    def time(self) -> float:
        return self._now


@contextlib.contextmanager
def worker_on_a_stopped_clock(settings: Settings) -> Iterator[None]:
    """A worker running in a thread of its own, on a StoppedClockLoop."""
    loop = StoppedClockLoop()
    running: asyncio.Task[None] | None = None
    workers: list[Worker] = []

    async def work() -> None:
        redis, pool = await connect(settings, new_worker_id())
        workers.append(Worker(settings, redis, pool))
        try:
            await workers[0].run()
        finally:
            await pool.close()
            await redis.aclose()

    def serve() -> None:
        nonlocal running
        asyncio.set_event_loop(loop)
        running = loop.create_task(work())
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(running)
        loop.close()

    thread = threading.Thread(target=serve, name="stopped-clock-worker")
    thread.start()
    try:
        yield
    finally:
        loop.call_soon_threadsafe(lambda: workers[0].stop() if workers else None)
        thread.join(2)  # a worker stops within a read of its wake streams
        if thread.is_alive() and running is not None:  # stuck on a timer: cancel it
            loop.call_soon_threadsafe(running.cancel)
            thread.join(15)
        assert not thread.is_alive()


@pytest.mark.parametrize("batch_interval", [0.0, 0.5])
async def test_no_timer_stands_between_an_operation_and_its_batch(
    api: Client, settings: Settings, pg: Any, batch_interval: float
) -> None:
    """A worker whose clock never moves can still read, commit and answer, but never wait
    for a timer. With the default settings it answers a lone operation, and a burst of
    concurrent ones in batches that grow with it. Given a batch timer (BATCH_INTERVAL), it
    answers the lone operation, after which nobody waits, and then, once a batch has held
    several operations, never starts the next one: the bursts would hang the same way if a
    timer came back."""
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    stopped = dataclasses.replace(
        settings,
        batch_interval=batch_interval,
        worker_lease_ttl=300.0,  # renewals are timers
    )
    with worker_on_a_stopped_clock(stopped):
        status, body, _ = await asyncio.wait_for(operate(api, wallet, "DEPOSIT", "1.00"), 20)
        assert (status, body["balance"]) == (200, "1.00")

        def burst() -> list[asyncio.Task[Any]]:
            return [asyncio.create_task(operate(api, wallet, "DEPOSIT", "1.00")) for _ in range(32)]

        if batch_interval:
            first = burst()
            await asyncio.wait(first, timeout=3)
            _, pending = await asyncio.wait([*first, *burst()], timeout=3)
            assert pending, "a worker stuck on its batch timer answered both bursts"
            for task in pending:
                task.cancel()
            return
        sent = burst()
        results = await asyncio.wait_for(asyncio.gather(*sent), 20)
    assert {status for status, _, _ in results} == {200}
    commits = await pg.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM operations WHERE wallet_id = $1", wallet
    )
    assert commits < 1 + len(sent), "every operation of the burst had a commit of its own"
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 3300
