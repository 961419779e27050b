"""Nothing queued is lost, and nothing is applied twice, whatever the worker went through."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from devtools.servers import kill_client, redis_clients
from shared.codec import OperationRequest, decode_request, encode_request
from shared.keys import KeySpace
from shared.scripts import ENQUEUE
from shared.settings import Settings
from tests.conftest import AiohttpClient, running_worker
from tests.helpers import Client, eventually, ledger, operate, resending
from worker.apply import apply_batch
from worker.decide import Entry
from worker.ownership import take_shard
from worker.worker import Worker


def keyspace(settings: Settings) -> KeySpace:
    return KeySpace(settings.redis_key_prefix, settings.shard_count)


async def new_wallet(pg: Any) -> str:
    return str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))


async def test_operations_queued_without_a_worker_are_applied_when_one_starts(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any, redis: Redis
) -> None:
    impatient = dataclasses.replace(settings, reply_timeout=0.05)
    api = await aiohttp_client(create_app(impatient))
    wallet = await new_wallet(pg)
    pending = []
    for amount in (5, 7, 11):
        status, body, headers = await operate(api, wallet, "DEPOSIT", amount)
        assert status == 202
        assert body["status"] == "pending"
        pending.append(headers["Location"])
    r = await api.get(pending[0])
    assert (await r.json())["status"] == "pending"
    keys = keyspace(settings)
    stream = keys.wallet_stream(wallet)
    assert await redis.xlen(stream) == 3  # what an operator sees with XRANGE

    async with running_worker(settings):

        async def all_applied() -> bool:
            bodies = [await (await api.get(url)).json() for url in pending]
            return all(b["status"] == "applied" for b in bodies)

        await eventually(all_applied, what="the queued operations to be applied")
        await eventually(lambda: _gone(redis, stream), what="the stream to be acknowledged")
    assert not await redis.sismember(keys.dirty_set(keys.shard_of(wallet)), wallet)
    r = await api.get(f"/api/v1/wallets/{wallet}")
    assert (await r.json())["balance"] == "23.00"


async def _gone(redis: Redis, key: str) -> bool:
    """An acknowledged stream is left empty (and expires later)."""
    return not await redis.xlen(key)


async def test_entries_committed_but_not_acknowledged_are_not_applied_again(
    settings: Settings, pg: Any, redis: Redis
) -> None:
    """A worker died between COMMIT and trimming the stream: the next one reads the same
    entries again and must recognise them."""
    keys = keyspace(settings)
    wallet = await new_wallet(pg)
    shard = keys.shard_of(wallet)
    stream = keys.wallet_stream(wallet)
    requests = [
        OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", 100 * (i + 1), "", 0)
        for i in range(4)
    ]
    for r in requests:
        await redis.xadd(stream, {"m": encode_request(r)})
        await redis.sadd(keys.dirty_set(shard), wallet)
    raw: Any = await redis.xrange(stream)
    async with pg.acquire() as conn:
        epoch = await take_shard(conn, shard, "the worker that died")
        first, *_ = await apply_batch(
            conn,
            [Entry(i.decode(), decode_request(f[b"m"])) for i, f in raw[:3]],
            {shard: epoch},
            resending=resending(settings),
        )
    assert [o.replayed for o in first] == [False] * 3

    async with running_worker(settings):
        await eventually(lambda: _gone(redis, stream), what="the stream to be acknowledged")
    rows = await ledger(pg, wallet)
    assert [r["id"] for r in rows] == [r.op_id for r in requests]
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 1000


async def test_an_undecodable_entry_does_not_block_its_wallet(
    client: Client, wallet: str, settings: Settings, redis: Redis
) -> None:
    keys = keyspace(settings)
    shard = keys.shard_of(wallet)
    stream = keys.wallet_stream(wallet, shard)
    enqueue = redis.register_script(ENQUEUE)
    await enqueue(
        keys=keys.enqueue_keys(wallet),
        args=[wallet, b"\x00not a message", 10, 10],
    )
    status, body, _ = await operate(client, wallet, "DEPOSIT", 3)
    assert status == 200
    assert body["balance"] == "3.00"
    await eventually(lambda: _gone(redis, stream), what="the stream to be acknowledged")
    letters: Any = await redis.xrange(keys.dead_letters(shard))  # kept for an operator
    [(_, letter)] = letters
    assert letter[b"wallet"].decode() == wallet
    assert letter[b"m"] == b"\x00not a message"


@pytest.mark.parametrize(
    ("op_id", "amount"),
    [("not-a-uuid", 100), (str(uuid.uuid4()), 2**63), (str(uuid.uuid4()).upper(), 100)],
)
async def test_an_entry_postgresql_would_refuse_goes_to_the_dead_letters(
    client: Client, wallet: str, settings: Settings, redis: Redis, op_id: str, amount: int
) -> None:
    """An entry that decodes but that no batch could apply (an id that is not a UUID as the
    service writes it, an amount past BIGINT) does not park its wallet: it is set aside with
    its error, and the operations behind it are applied."""
    keys = keyspace(settings)
    shard = keys.shard_of(wallet)
    poison = encode_request(OperationRequest(op_id, wallet, "DEPOSIT", amount, "", 0))
    enqueue = redis.register_script(ENQUEUE)
    await enqueue(keys=keys.enqueue_keys(wallet), args=[wallet, poison, 10, 10])
    status, body, _ = await operate(client, wallet, "DEPOSIT", 3)
    assert (status, body["balance"]) == (200, "3.00")
    letters: Any = await redis.xrange(keys.dead_letters(shard))
    [(_, letter)] = letters
    assert letter[b"m"] == poison
    assert b"invalid operation message" in letter[b"error"]


async def test_a_stopped_worker_finishes_its_batch_and_answers(
    api: Client, settings: Settings, pg: Any
) -> None:
    wallet = await new_wallet(pg)
    async with running_worker(settings) as worker:
        calls = [asyncio.create_task(operate(api, wallet, "DEPOSIT", 1)) for _ in range(200)]
        await eventually(lambda: _positive(pg, wallet), what="the first operations to be applied")
        worker.stop()
    # Whatever the stopped worker did not read waits in the stream for the next one.
    async with running_worker(settings):
        results = await asyncio.gather(*calls)
    assert {status for status, _, _ in results} == {200}
    assert await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet) == 20_000


async def _positive(pg: Any, wallet: str) -> bool:
    return bool(await pg.fetchval("SELECT balance > 0 FROM wallets WHERE id = $1", wallet))


async def test_a_redelivered_entry_is_answered_as_before_and_a_client_retry_as_a_replay(
    settings: Settings, pg: Any, redis: Redis
) -> None:
    """An entry read again after its COMMIT (the worker died before trimming it) is not a
    client's retry, so its answer is not flagged as a replay; the same key sent again by
    the client, a later entry, is."""
    keys = keyspace(settings)
    wallet = await new_wallet(pg)
    shard = keys.shard_of(wallet)
    stream = keys.wallet_stream(wallet)
    request = OperationRequest(str(uuid.uuid4()), wallet, "DEPOSIT", 700, "", 0)
    added: list[Any] = [await redis.xadd(stream, {"m": encode_request(request)}) for _ in "12"]
    first_id, retry_id = (entry_id.decode() for entry_id in added)
    async with pg.acquire() as conn:
        epoch = await take_shard(conn, shard, "a worker")
        [applied], *_ = await apply_batch(
            conn, [Entry(first_id, request)], {shard: epoch}, resending=resending(settings)
        )
        [redelivered], *_ = await apply_batch(
            conn, [Entry(first_id, request)], {shard: epoch}, resending=resending(settings)
        )
        [retried], *_ = await apply_batch(
            conn, [Entry(retry_id, request)], {shard: epoch}, resending=resending(settings)
        )
    assert (applied.status, applied.replayed) == ("applied", False)
    assert (redelivered.seq, redelivered.replayed) == (applied.seq, False)
    assert (retried.seq, retried.replayed) == (applied.seq, True)
    assert len(await ledger(pg, wallet)) == 1


async def test_a_worker_whose_sessions_postgresql_ends_goes_on_committing(
    client: Client, wallet: str, worker: Worker, pg: Any
) -> None:
    """PostgreSQL ends the worker's sessions between two batches, twenty times: each next
    batch meets a connection that is gone (asyncpg says so in more than one way), and the
    worker takes a new one and goes on, without stepping aside for a moment's loss."""
    for i in range(20):
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            worker.worker_id,
        )
        status, body, _ = await operate(client, wallet, "DEPOSIT", 1)
        assert (status, body["balance"]) == (200, f"{i + 1}.00"), body


@pytest.mark.parametrize(
    ("committed_minor", "status", "balance"),
    [(500, 200, "5.00"), (700, 422, None)],  # the request's own, or another under its key
)
async def test_a_reply_published_while_the_api_subscribed_again_is_found_in_the_ledger(
    api: Client,
    settings: Settings,
    pg: Any,
    redis: Redis,
    committed_minor: int,
    status: int,
    balance: str | None,
) -> None:
    """The API's reply channel drops while a request waits; its operation is committed and
    its reply goes out before the API has subscribed again (here: never published at all,
    the commit done by hand). Pub/sub does not keep it; once subscribed again the API looks
    in the ledger and answers as the reply would have, instead of a 202 after
    REPLY_TIMEOUT: the outcome, or, if the ledger holds another operation under the
    request's key, that the key was reused."""
    keys = keyspace(settings)
    wallet = await new_wallet(pg)
    shard = keys.shard_of(wallet)
    stream = keys.wallet_stream(wallet)
    request = asyncio.create_task(operate(api, wallet, "DEPOSIT", 5))
    await eventually(lambda: _queued(redis, stream), what="the operation to be queued")
    raw: Any = await redis.xrange(stream)
    [(entry_id, fields)] = raw
    committed = dataclasses.replace(decode_request(fields[b"m"]), amount=committed_minor)
    async with pg.acquire() as conn:
        epoch = await take_shard(conn, shard, "a worker whose reply is lost")
        await apply_batch(
            conn,
            [Entry(entry_id.decode(), committed)],
            {shard: epoch},
            resending=resending(settings),
        )
    [(node, subscriber)] = [
        (node, c)
        for node, c in await redis_clients(redis)
        if c["name"].startswith(f"{settings.redis_key_prefix}:api:")
        and c["cmd"] in ("subscribe", "ssubscribe")
    ]
    started = asyncio.get_running_loop().time()
    await kill_client(redis, node, subscriber)
    answered, body, _ = await request
    assert (answered, body.get("balance")) == (status, balance), body
    if status == 422:
        assert body["type"].endswith("idempotency-key-reused")
    assert asyncio.get_running_loop().time() - started < settings.reply_timeout


async def _queued(redis: Redis, key: str) -> bool:
    return bool(await redis.xlen(key))
