"""The worker's bookkeeping of which wallets have work, at the moments where it can slip."""

from __future__ import annotations

import asyncio
import itertools
import re
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis

from shared.codec import OperationRequest, encode_request
from shared.connections import open_pg_pool
from shared.keys import KeySpace
from shared.scripts import ACKNOWLEDGE, ENQUEUE
from shared.settings import Settings
from tests.conftest import running_worker
from tests.helpers import eventually, ledger, operate
from worker.apply import (
    EPOCHS,
    READ_WALLETS,
    RECORD_BATCH,
    Entry,
    Fenced,
    WalletState,
    apply_batch,
    take_shard,
)
from worker.worker import START, Worker, connect


async def test_a_wallet_refilled_right_after_its_stream_emptied_stays_active(
    settings: Settings, pg: Any, redis: Redis
) -> None:
    """A batch empties the wallet's stream, which deletes it; before the worker has looked
    at the acknowledgement's result, a new operation starts the stream anew and its wake-up
    reaches the worker. The wallet must stay active, read from the start of the new stream."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    shard = keys.shard_of(wallet)
    enqueue_script = redis.register_script(ENQUEUE)

    async def enqueue(minor: int) -> None:
        request = OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", minor, "", 0)
        await enqueue_script(
            keys=[
                keys.wallet_stream(wallet, shard),
                keys.dirty_set(shard),
                keys.notify_list(shard),
                keys.queued(shard),
            ],
            args=[wallet, encode_request(request), 100, 100],
        )

    async def deliver_wake_ups() -> None:  # what the shard's listener does
        popped: Any = await redis.lpop(keys.notify_list(shard), 100)
        worker._mark_active(popped or [])

    pool = await open_pg_pool(settings, max_size=1)
    worker = Worker(settings, redis, pool)
    await redis.script_load(ACKNOWLEDGE)  # run() would, on meeting NOSCRIPT
    # The shard's epoch without its lease and listener: this test delivers the wake-ups.
    async with pool.acquire() as conn:
        worker.owned[shard] = await take_shard(conn, shard, worker.worker_id)
    try:
        await enqueue(100)
        await deliver_wake_ups()
        acknowledge = worker._commit_reply_acknowledge

        async def refill_after_acknowledging(*args: Any) -> list[int]:
            left = await acknowledge(*args)
            await enqueue(200)
            await deliver_wake_ups()
            return left

        worker._commit_reply_acknowledge = refill_after_acknowledging  # type: ignore[method-assign,assignment]
        assert await worker.process_round() == 1
        assert worker.active == {wallet: START}

        worker._commit_reply_acknowledge = acknowledge  # type: ignore[method-assign]
        assert await worker.process_round() == 1
        assert worker.active == {}
    finally:
        await worker.close()
        await pool.close()
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 300
    assert not await redis.exists(keys.wallet_stream(wallet, shard))
    assert not await redis.sismember(keys.dirty_set(shard), wallet)


async def test_a_wallet_whose_batches_fail_is_set_aside_and_the_others_go_on(
    api: Any, settings: Settings, pg: Any
) -> None:
    """Someone wrote a ledger row for wallet A by hand, so every batch with A fails on the
    ledger's key. A is parked, its operation waits in its stream; B is served all along;
    once A is mended its operation is applied."""
    new = "INSERT INTO wallets DEFAULT VALUES RETURNING id::text"
    broken, fine = await pg.fetchval(new), await pg.fetchval(new)
    await pg.execute(
        "INSERT INTO operations (wallet_id, seq, id, kind, amount, status, balance_after)"
        " VALUES ($1, 1, gen_random_uuid(), 'DEPOSIT', 100, 'applied', 100)",
        broken,
    )
    async with running_worker(settings) as worker:
        stuck = asyncio.create_task(operate(api, broken, "DEPOSIT", 5))
        await eventually(lambda: _parked(worker, broken), what="the broken wallet to be parked")
        for _ in range(3):
            status, body, _ = await operate(api, fine, "DEPOSIT", 1)
            assert status == 200
        assert body["balance"] == "3.00"
        assert not stuck.done()

        await pg.execute("UPDATE wallets SET op_seq = 1, balance = 100 WHERE id = $1", broken)
        status, body, _ = await asyncio.wait_for(stuck, 30)
        assert (status, body["balance"]) == (200, "6.00")  # 1.00 written by hand, then 5.00
        assert broken not in worker.parked


async def _parked(worker: Worker, wallet: str) -> bool:
    return wallet in worker.parked


class StatementLog:
    """A real connection that notes the statements sent through it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sent: list[str] = []

    async def fetch(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        return await self.conn.fetch(query, *args)

    def transaction(self) -> Any:
        self.sent.append("BEGIN")
        return self.conn.transaction()


async def test_a_batch_on_wallets_the_worker_knows_is_one_statement_that_checks_them(
    pg: Any,
) -> None:
    """The worker keeps how its last batch left each wallet, so the next batch can skip
    reading them: one statement, one round trip with its COMMIT. That statement still
    finds out when the wallet is not as remembered, when an operation was recorded before,
    and when the shard has a new owner; then the answer is the same as the long way's,
    which reads the wallets first and writes through the same statement, with no
    transaction around the two."""
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    shard = 7
    entry_ids = (f"1700000000000-{n}" for n in itertools.count())

    def entry(kind: str, minor: int, op_id: str | None = None) -> Entry:
        request = OperationRequest(op_id or str(uuid.uuid4()), wallet, kind, minor, "", 0)
        return Entry(next(entry_ids), request)

    async with pg.acquire() as conn:
        log = StatementLog(conn)
        epoch = await take_shard(conn, shard, "a worker")
        _, states = await apply_batch(log, [entry("DEPOSIT", 500)], {shard: epoch})
        assert states == {wallet: WalletState(500, 1)}
        assert log.sent == [READ_WALLETS, RECORD_BATCH]

        log.sent.clear()
        withdrawal = entry("WITHDRAW", 200)
        [second], states = await apply_batch(log, [withdrawal], {shard: epoch}, states)
        assert log.sent == [RECORD_BATCH]
        assert (second.status, second.balance_after, second.seq) == ("applied", 300, 2)
        assert states == {wallet: WalletState(300, 2)}

        # Not as remembered: someone corrected the balance by hand.
        await pg.execute("UPDATE wallets SET balance = 1000 WHERE id = $1", wallet)
        log.sent.clear()
        [third], states = await apply_batch(log, [entry("WITHDRAW", 900)], {shard: epoch}, states)
        assert (third.status, third.balance_after) == ("applied", 100)
        assert log.sent == [RECORD_BATCH, EPOCHS, READ_WALLETS, RECORD_BATCH]

        # Recorded before: the client sent the withdrawal's key again.
        retry = entry("WITHDRAW", 200, withdrawal.request.op_id)
        [again], states = await apply_batch(log, [retry], {shard: epoch}, states)
        assert (again.seq, again.balance_after, again.replayed) == (2, 300, True)
        assert states == {wallet: WalletState(100, 3)}

        await take_shard(conn, shard, "the next owner")
        with pytest.raises(Fenced):
            await apply_batch(log, [entry("DEPOSIT", 1)], {shard: epoch}, states)
    assert [r["balance_after"] for r in await ledger(pg, wallet)] == [500, 300, 100]
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 100


async def test_a_balance_changed_by_hand_is_what_the_next_operation_sees(
    client: Any, wallet: str, pg: Any
) -> None:
    status, body, _ = await operate(client, wallet, "DEPOSIT", 1)
    assert (status, body["balance"]) == (200, "1.00")
    await pg.execute("UPDATE wallets SET balance = 50000 WHERE id = $1", wallet)
    status, body, _ = await operate(client, wallet, "WITHDRAW", 400)
    assert (status, body["balance"]) == (200, "100.00")


def scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The plan's nodes that read a table, an index or a bitmap of one."""
    if "Relation Name" in plan or "Index Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from scans(child)


async def test_the_plans_a_worker_keeps_look_rows_up_by_key_even_on_young_tables(
    settings: Settings, pg: Any
) -> None:
    """The worker's connection lives long, asyncpg prepares each statement on it once, and
    the session keeps one generic plan per statement. Planned while the tables are young
    and tiny, a plan could read a whole table or a whole index (a merge join, chosen once
    small tables had statistics), and would go on doing so as the ledger grew. Every read
    must stay a lookup by key: on fresh copies of the tables, before and after ANALYZE."""
    schema = f"plans_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE SCHEMA {schema}")
    for table in ("wallets", "operations", "shards"):
        await pg.execute(f"CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)")
    redis, pool = await connect(settings, "plan-check")  # a worker's pool, its settings
    conn = await pool.acquire()
    try:
        await conn.execute(f"SET search_path = {schema}")
        for step, state in enumerate(("fresh", "analyzed", "a few wallets, analyzed")):
            if state != "fresh":
                if state.startswith("a few"):
                    await conn.execute(
                        "INSERT INTO wallets (id)"
                        " SELECT gen_random_uuid() FROM generate_series(1, 20)"
                    )
                await conn.execute("ANALYZE wallets, operations, shards")
            for name, statement in {
                "read_wallets": READ_WALLETS,
                "record_batch": RECORD_BATCH,
                "epochs": EPOCHS,
            }.items():
                await conn.execute(f"PREPARE {name}_{step} AS {statement}")
                params = max(int(n) for n in re.findall(r"\$(\d+)", statement))
                nulls = ", ".join(["NULL"] * params)
                [plan] = orjson.loads(
                    await conn.fetchval(f"EXPLAIN (FORMAT JSON) EXECUTE {name}_{step}({nulls})")
                )
                found = list(scans(plan["Plan"]))
                assert found, name
                for node in found:
                    scanned = node.get("Index Name") or node.get("Relation Name")
                    where = f"{state}, {name}: {node['Node Type']} on {scanned}"
                    assert node["Node Type"] != "Seq Scan", where
                    if node["Node Type"] in ("Index Scan", "Index Only Scan", "Bitmap Index Scan"):
                        assert "Index Cond" in node, where
    finally:
        await pool.release(conn)
        await pool.close()
        await redis.aclose()
        await pg.execute(f"DROP SCHEMA {schema} CASCADE")
