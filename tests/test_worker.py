"""The worker's bookkeeping of which wallets have work, at the moments where it can slip."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from shared.codec import OperationRequest
from shared.connections import round_trip
from shared.keys import KeySpace
from shared.settings import Settings
from tests.conftest import REDIS_CLUSTER, running_worker
from tests.helpers import eventually, ledger, operate, wallet_in
from worker.apply import Fenced, Known, Resending, apply_batch
from worker.decide import Entry, WalletState
from worker.ownership import take_shard
from worker.sql import (
    DUE,
    EPOCHS,
    HELD_IN_SHARDS,
    READ_HOLDS,
    READ_WALLETS,
    RECORD_BATCH,
    RECORD_WALLET,
    RESCHEDULE,
    UNSETTLED_COUNTS,
)
from worker.worker import Worker, connect


async def test_a_wallet_whose_stream_empties_and_fills_again_is_served_in_order(
    client: Any, wallet: str, settings: Settings, pg: Any, redis: Redis
) -> None:
    """Each operation sent right after the answer to the one before: each batch empties the
    wallet's stream, whose acknowledgement marks the wallet clean, and the next operation
    makes it dirty again and comes through the wake stream. Every one is applied once, in
    order, and in the end nothing is left queued or marked dirty."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    sent = []
    for minor in range(1, 31):
        status, body, _ = await operate(client, wallet, "DEPOSIT", minor)
        assert status == 200, body
        sent.append(body["id"])
    assert [r["id"] for r in await ledger(pg, wallet)] == sent
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 46_500
    shard = keys.shard_of(wallet)

    async def acknowledged() -> bool:
        stream_left = await redis.xlen(keys.wallet_stream(wallet, shard))
        return not stream_left and not await redis.sismember(keys.dirty_set(shard), wallet)

    await eventually(acknowledged, what="the last operation to be acknowledged")


async def test_each_wallet_of_a_batch_over_several_shards_is_acknowledged(
    client: Any, settings: Settings, pg: Any, redis: Redis
) -> None:
    """Operations on 40 wallets of several shards at once, several per wallet: batches hold
    many wallets, acknowledged by one call. Every wallet's operations are applied once, and
    in the end every stream is trimmed, no wallet dirty and no shard counts anything
    queued."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    wallets = [(await (await client.post("/api/v1/wallets")).json())["id"] for _ in range(40)]
    assert len({keys.shard_of(w) for w in wallets}) > 1
    results = await asyncio.gather(
        *(operate(client, w, "DEPOSIT", minor) for minor in range(1, 6) for w in wallets)
    )
    assert {status for status, _, _ in results} == {200}
    balances = dict(
        await pg.fetch("SELECT id::text, balance FROM wallets WHERE id = any($1::uuid[])", wallets)
    )
    assert balances == dict.fromkeys(wallets, 1500)
    shards = sorted({keys.shard_of(w) for w in wallets})

    async def all_acknowledged() -> bool:
        async with redis.pipeline(transaction=False) as pipe:
            for w in wallets:
                pipe.xlen(keys.wallet_stream(w, keys.shard_of(w)))
            for shard in shards:
                pipe.scard(keys.dirty_set(shard))
                pipe.get(keys.queued(shard))
            found = await pipe.execute()
        return not any(int(n or 0) for n in found)

    await eventually(all_acknowledged, what="every wallet of the batches to be acknowledged")


async def test_after_a_busy_batch_the_wake_ups_of_its_commit_go_into_the_next_batch(
    client: Any, worker: Worker, settings: Settings, pg: Any, redis: Redis
) -> None:
    """Batches are held in their commits by locks on wallets' rows, so that wake-ups pile up
    in between: X and Y end up woken in one batch (so wake-ups come faster than the
    batches), and while that batch commits P's operation comes, then Q's. P and Q then go
    into the next batch together: after a busy batch, the wake-ups of its commit's time
    are read before the next batch starts, not one of them per batch as they happened to
    be read. All of one shard, whose wake stream has one reader on a Redis Cluster too."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    new = "INSERT INTO wallets (id) VALUES ($1) RETURNING id::text"
    z, w, x, y, p, q = [await pg.fetchval(new, wallet_in(keys, 1)) for _ in range(6)]
    sent: dict[str, asyncio.Task[Any]] = {}

    async def send(wallet: str) -> None:
        sent[wallet] = asyncio.create_task(operate(client, wallet, "DEPOSIT", 1))

        async def queued() -> bool:
            return bool(await redis.xlen(keys.wallet_stream(wallet, keys.shard_of(wallet))))

        await eventually(queued, what="the operation to be queued")

    async def held_by_a_lock() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s USING (pid)"
                " WHERE NOT l.granted AND s.datname = current_database()"
            )
        )

    async def the_worker_knows(*wallets: str) -> bool:
        return all(worker.has_work_for(wallet) for wallet in wallets)

    async with contextlib.AsyncExitStack() as locks:
        held = {}
        for wallet in (z, w, x):
            conn = await locks.enter_async_context(pg.acquire())
            held[wallet] = conn.transaction()
            await held[wallet].start()
            await conn.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", wallet)
        await send(z)
        await eventually(held_by_a_lock, what="Z's batch to wait for its row")
        await send(w)
        await eventually(lambda: the_worker_knows(w), what="W's wake-up to be read")
        await send(x)
        await send(y)
        await held[z].rollback()
        await eventually(held_by_a_lock, what="W's batch to wait for its row")
        await eventually(lambda: the_worker_knows(x, y), what="X's and Y's wake-ups")
        await held[w].rollback()
        await asyncio.wait_for(sent[w], 30)
        await eventually(held_by_a_lock, what="X's and Y's batch to wait for X's row")
        await send(p)
        await send(q)
        await held[x].rollback()
    for task in sent.values():
        status, body, _ = await asyncio.wait_for(task, 30)
        assert status == 200, body
    commits = dict(
        await pg.fetch(
            "SELECT wallet_id::text, xmin::text FROM operations WHERE wallet_id = any($1::uuid[])",
            list(sent),
        )
    )
    assert commits[x] == commits[y]
    assert commits[p] == commits[q] != commits[x]


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

        async def unparked() -> bool:  # once the round is done with the batch it answered
            return not worker.backlog.is_parked(broken)

        await eventually(unparked, what="the mended wallet to be taken back")


async def _parked(worker: Worker, wallet: str) -> bool:
    return worker.backlog.is_parked(wallet)


class StatementLog:
    """A real connection that notes the statements sent through it."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.sent: list[str] = []
        self.args: list[tuple[Any, ...]] = []

    async def fetch(self, query: str, *args: Any) -> Any:
        self.sent.append(query)
        self.args.append(args)
        return await self.conn.fetch(query, *args)

    def transaction(self) -> Any:
        self.sent.append("BEGIN")
        return self.conn.transaction()


async def test_a_batch_on_wallets_the_worker_knows_is_one_statement_that_checks_them(
    pg: Any,
) -> None:
    """The worker keeps how its last batch left each wallet, so the next batch can skip
    reading them: one statement, one round trip with its COMMIT; a wallet it does not know
    is read first, alone. That statement still
    finds out when the wallet is not as remembered, when an operation was recorded before,
    and when the shard has a new owner; then the answer is the same as the long way's,
    which reads the wallets first and writes through the same statement, with no
    transaction around the two."""
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    shard = 7
    one_shard = Resending(lambda _: shard, 5.0)
    entry_ids = (f"1700000000000-{n}" for n in itertools.count())

    def entry(kind: str, minor: int, op_id: str | None = None) -> Entry:
        request = OperationRequest(op_id or str(uuid.uuid4()), wallet, kind, minor, "", 0)
        return Entry(next(entry_ids), request)

    async with pg.acquire() as conn:
        log = StatementLog(conn)
        epoch = await take_shard(conn, shard, "a worker")
        _, states, *_ = await apply_batch(
            log, [entry("DEPOSIT", 500)], {shard: epoch}, resending=one_shard
        )
        assert states == {wallet: WalletState(500, 1)}
        # One wallet's ledger rows alone: the lighter statement, with the same guards.
        assert log.sent == [READ_WALLETS, RECORD_WALLET]

        log.sent.clear()
        withdrawal = entry("WITHDRAW", 200)
        [second], states, *_ = await apply_batch(
            log, [withdrawal], {shard: epoch}, Known(states, {}), resending=one_shard
        )
        assert log.sent == [RECORD_WALLET]
        assert (second.status, second.balance_after, second.seq) == ("applied", 300, 2)
        assert states == {wallet: WalletState(300, 2)}

        # Not as remembered: someone corrected the balance by hand.
        await pg.execute("UPDATE wallets SET balance = 1000 WHERE id = $1", wallet)
        log.sent.clear()
        [third], states, *_ = await apply_batch(
            log, [entry("WITHDRAW", 900)], {shard: epoch}, Known(states, {}), resending=one_shard
        )
        assert (third.status, third.balance_after) == ("applied", 100)
        assert log.sent == [RECORD_WALLET, EPOCHS, READ_WALLETS, RECORD_WALLET]

        # Recorded before: the client sent the withdrawal's key again.
        retry = entry("WITHDRAW", 200, withdrawal.request.op_id)
        [again], states, *_ = await apply_batch(
            log, [retry], {shard: epoch}, Known(states, {}), resending=one_shard
        )
        assert (again.seq, again.balance_after, again.replayed) == (2, 300, True)
        assert log.sent[-3:] == [RECORD_WALLET, READ_WALLETS, RECORD_WALLET]
        assert states == {wallet: WalletState(100, 3)}

        # A wallet it does not know beside one it does: only the unknown one is read.
        other = str(await pg.fetchval("INSERT INTO wallets (balance) VALUES (7) RETURNING id"))
        request = OperationRequest(str(uuid.uuid4()), other, "WITHDRAW", 5, "", 0)
        log.sent.clear()
        log.args.clear()
        mixed = [entry("DEPOSIT", 50), Entry(next(entry_ids), request)]
        outcomes, states, *_ = await apply_batch(
            log, mixed, {shard: epoch}, Known(states, {}), resending=one_shard
        )
        assert log.sent == [READ_WALLETS, RECORD_BATCH]
        assert log.args[0] == ([other], [request.op_id])
        assert [o.balance_after for o in outcomes] == [150, 2]
        assert states == {wallet: WalletState(150, 4), other: WalletState(2, 1)}

        await take_shard(conn, shard, "the next owner")
        with pytest.raises(Fenced):
            await apply_batch(
                log, [entry("DEPOSIT", 1)], {shard: epoch}, Known(states, {}), resending=one_shard
            )
    assert [r["balance_after"] for r in await ledger(pg, wallet)] == [500, 300, 100, 150]
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 150


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
    for table in ("wallets", "operations", "shards", "transfers", "holds"):
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
                await conn.execute("ANALYZE wallets, operations, shards, transfers, holds")
            for name, statement in {
                "read_wallets": READ_WALLETS,
                "record_batch": RECORD_BATCH,
                "record_wallet": RECORD_WALLET,
                "epochs": EPOCHS,
                "due": DUE,
                "reschedule": RESCHEDULE,
                "unsettled_counts": UNSETTLED_COUNTS,
                "read_holds": READ_HOLDS,
                "held_in_shards": HELD_IN_SHARDS,
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


@pytest.mark.skipif(REDIS_CLUSTER, reason="one connection to one Redis")
async def test_a_round_trip_sends_any_bytes_and_answers_each_command_in_turn(
    settings: Settings, redis: Redis
) -> None:
    """The batch loop, the wake listener and the API's enqueuer talk to Redis through
    round_trip, packed by hiredis: values with CR LF, non-ASCII text, negative
    numbers, and an error reply in the middle of the answers; a value Redis has no form
    for (None) is refused before anything is sent."""
    key = f"{settings.redis_key_prefix}:protocol"
    value = "naïve\r\n€".encode() + bytes(range(256))
    connection = redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
    try:
        answers = await round_trip(
            connection,
            [
                ("SET", key, value),
                ("GET", key),
                ("INCRBY", f"{key}:n", -5),
                ("LPUSH", key, "a list on a string"),
                ("SET", f"{key}:ключ", "значение"),
                ("GET", f"{key}:ключ"),
            ],
        )
    finally:
        await connection.disconnect()
        await redis.delete(key, f"{key}:n", f"{key}:ключ")
    assert answers[:3] == [b"OK", value, -5]
    assert isinstance(answers[3], ResponseError)
    assert answers[5] == "значение".encode()
    with pytest.raises(TypeError):
        await round_trip(connection, [("SET", key, None)])
