"""The write path end to end: API -> wallet stream -> worker -> PostgreSQL -> reply."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from typing import Any

from shared.money import format_minor
from shared.settings import Settings
from tests.conftest import running_worker
from tests.helpers import Client, ledger, operate, replay_ledger
from worker.worker import Worker


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
    final = replay_ledger(rows)  # every recorded decision follows from one serial order
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
    assert bodies[0]["id"] == key
    first_answers = [h for _, _, h in results if "Idempotent-Replayed" not in h]
    assert len(first_answers) == 1
    rows = await ledger(pg, wallet)
    assert [(r["id"], r["amount"]) for r in rows] == [(key, 1234)]
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
    batches_before = worker.batches
    results = await asyncio.gather(
        *(operate(client, wallet, "DEPOSIT", "1.00") for _ in range(1000))
    )
    assert {status for status, _, _ in results} == {200}
    # Each transaction that wrote ledger rows stamped them with its own xid (xmin).
    transactions = await pg.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM operations WHERE wallet_id = $1", wallet
    )
    assert transactions < 100, f"{transactions} commits for 1000 operations"
    assert worker.batches - batches_before == transactions
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 100_000


async def test_a_busy_worker_commits_at_most_once_per_batch_interval(
    api: Client, settings: Settings, pg: Any
) -> None:
    """Ten operations every 20 ms for a second: with BATCH_INTERVAL=0.25 that is a handful of
    commits (one per interval, and a first batch of one, which does not wait); without the
    interval it would be about one per wave."""
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
    r = await client.get("/api/live")
    series = (await r.json())["series"]
    assert sum(s["answered"] for s in series) >= 50
    assert sum(s["committed"] for s in series) >= 50
    batches = [s["mean_batch"] for s in series if s["mean_batch"] is not None]
    assert batches
    assert all(b >= 1 for b in batches)
    assert all(s["p99_ms"] >= s["p50_ms"] for s in series if s["p50_ms"] is not None)
