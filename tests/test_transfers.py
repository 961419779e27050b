"""Transfers between wallets: both sides or neither, each side once, whatever fails."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from shared.codec import TRANSFER_OUT, OperationRequest, decode_request, encode_request
from shared.keys import KeySpace
from shared.money import MAX_BALANCE_MINOR
from shared.settings import Settings
from tests.conftest import AiohttpClient, idle_workers, running_worker
from tests.helpers import Client, eventually, ledger, operate, wallet_in
from tests.test_inspect import inspect_cli
from worker.apply import Fenced, Resending, apply_batch
from worker.decide import Entry
from worker.gauges import refresh_gauges
from worker.ownership import take_shard
from worker.transfers import credit


async def transfer(
    client: Client, source: str, destination: str, amount: Any, key: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Idempotency-Key": key} if key else {}
    r = await client.post(
        "/api/v1/transfers",
        json={"from": source, "to": destination, "amount": amount},
        headers=headers,
    )
    return r.status, await r.json(content_type=None), dict(r.headers)


async def new_wallet(client: Client, funds: str | None = None) -> str:
    r = await client.post("/api/v1/wallets")
    wallet = str((await r.json())["id"])
    if funds is not None:
        status, body, _ = await operate(client, wallet, "DEPOSIT", funds)
        assert status == 200, body
    return wallet


async def balance(client: Client, wallet: str) -> str:
    r = await client.get(f"/api/v1/wallets/{wallet}")
    return str((await r.json())["balance"])


async def transfer_status(client: Client, transfer_id: str) -> dict[str, Any]:
    r = await client.get(f"/api/v1/transfers/{transfer_id}")
    assert r.status == 200, await r.text()
    return dict(await r.json())


async def conservation(pg: Any, wallets: list[str]) -> tuple[int, int]:
    """Over `wallets`, which only transfer among themselves: (their balances plus the amounts
    in flight between them, their deposits minus their withdrawals)."""
    held = await pg.fetchval(
        "SELECT (SELECT coalesce(sum(balance), 0) FROM wallets WHERE id = any($1::uuid[]))"
        " + (SELECT coalesce(sum(amount), 0) FROM transfers"
        "    WHERE source_id = any($1::uuid[]) AND status IN ('in_flight', 'returning'))",
        wallets,
    )
    brought = await pg.fetchval(
        "SELECT coalesce(sum(CASE kind WHEN 'DEPOSIT' THEN amount ELSE -amount END), 0)"
        " FROM operations WHERE wallet_id = any($1::uuid[]) AND status = 'applied'"
        " AND kind IN ('DEPOSIT', 'WITHDRAW')",
        wallets,
    )
    return held, brought


async def test_a_transfer_is_answered_once_both_wallets_hold_it(client: Client, pg: Any) -> None:
    source = await new_wallet(client, "100.00")
    destination = await new_wallet(client)
    status, body, _headers = await transfer(client, source, destination, "10.25")
    assert status == 200, body
    assert body["status"] == "completed"
    assert (body["from"], body["to"], body["amount"]) == (source, destination, "10.25")
    assert body["balance"] == "89.75"  # the source's, after it
    assert body["reason"] is None
    assert body["href"] == f"/api/v1/transfers/{body['id']}"
    # Answered after both commits: both wallets show it at once.
    assert await balance(client, source) == "89.75"
    assert await balance(client, destination) == "10.25"
    assert (await transfer_status(client, body["id"]))["status"] == "completed"

    r = await client.get(f"/api/v1/wallets/{source}/operations")
    out = (await r.json())["items"][0]
    assert (out["operation_type"], out["amount"], out["balance"]) == (
        "TRANSFER_OUT",
        "10.25",
        "89.75",
    )
    assert (out["transfer_id"], out["counterparty"]) == (body["id"], destination)
    r = await client.get(f"/api/v1/wallets/{destination}/operations")
    into = (await r.json())["items"][0]
    assert (into["operation_type"], into["amount"], into["balance"]) == (
        "TRANSFER_IN",
        "10.25",
        "10.25",
    )
    assert (into["transfer_id"], into["counterparty"]) == (body["id"], source)
    deposit = (await (await client.get(f"/api/v1/wallets/{source}/operations")).json())["items"][1]
    assert (deposit["transfer_id"], deposit["counterparty"]) == (None, None)
    held, brought = await conservation(pg, [source, destination])
    assert held == brought


async def test_a_transfer_past_the_source_s_balance_moves_nothing(client: Client) -> None:
    source = await new_wallet(client, "5.00")
    destination = await new_wallet(client)
    status, body, headers = await transfer(client, source, destination, "5.01")
    assert status == 409, body
    assert body["type"] == "urn:wallet-service:problem:insufficient-funds"
    rejected = body["transfer"]
    assert (rejected["status"], rejected["reason"], rejected["balance"]) == (
        "rejected",
        "insufficient_funds",
        "5.00",
    )
    assert headers["Location"] == f"/api/v1/transfers/{rejected['id']}"
    assert await balance(client, source) == "5.00"
    assert await balance(client, destination) == "0.00"
    found = await transfer_status(client, rejected["id"])
    assert (found["status"], found["reason"]) == ("rejected", "insufficient_funds")


async def test_a_credit_the_destination_cannot_take_goes_back_to_the_source(
    client: Client, pg: Any
) -> None:
    source = await new_wallet(client, "100.00")
    # A destination one cent short of the largest balance, set before any writer knows it.
    destination = str(
        await pg.fetchval(
            "INSERT INTO wallets (balance) VALUES ($1) RETURNING id", MAX_BALANCE_MINOR - 1
        )
    )
    status, body, _ = await transfer(client, source, destination, "0.02")
    assert status == 409, body
    assert body["type"] == "urn:wallet-service:problem:balance-limit"
    back = body["transfer"]
    assert (back["status"], back["reason"], back["balance"]) == (
        "rejected",
        "balance_limit",
        "100.00",
    )
    assert await balance(client, source) == "100.00"
    rows = await ledger(pg, source)
    assert [(r["kind"], r["status"], r["balance_after"]) for r in rows] == [
        ("DEPOSIT", "applied", 10000),
        ("TRANSFER_OUT", "applied", 9998),
        ("TRANSFER_RETURN", "applied", 10000),
    ]
    [refused] = await ledger(pg, destination)
    assert (refused["kind"], refused["status"], refused["reason"]) == (
        "TRANSFER_IN",
        "rejected",
        "balance_limit",
    )
    found = await transfer_status(client, back["id"])
    assert (found["status"], found["reason"], found["balance"]) == (
        "rejected",
        "balance_limit",
        "100.00",
    )


async def test_bad_transfers_get_clear_problems(client: Client) -> None:
    source = await new_wallet(client, "1.00")
    destination = await new_wallet(client)
    unknown = str(uuid.uuid4())

    status, body, _ = await transfer(client, source, unknown, "1.00")
    assert (status, body["type"]) == (404, "urn:wallet-service:problem:wallet-not-found")
    assert f"{unknown} (to)" in body["detail"]
    status, body, _ = await transfer(client, unknown, destination, "1.00")
    assert (status, body["type"]) == (404, "urn:wallet-service:problem:wallet-not-found")
    assert f"{unknown} (from)" in body["detail"]
    status, body, _ = await transfer(client, source, source, "1.00")
    assert status == 422
    assert body["errors"] == [{"field": "to", "reason": "must be another wallet than from"}]
    for amount in ("0", "-1.00", "1.001", "abc", 1.555, None, True):
        status, body, _ = await transfer(client, source, destination, amount)
        assert status == 422, (amount, body)
        assert body["errors"][0]["field"] == "amount"
    r = await client.post("/api/v1/transfers", json={"from": source, "amount": "1.00"})
    assert r.status == 422
    assert (await r.json())["errors"] == [{"field": "to", "reason": "is required"}]
    r = await client.post(
        "/api/v1/transfers", json={"from": "nope", "to": destination, "amount": "1.00"}
    )
    assert r.status == 422
    assert (await r.json())["errors"][0]["field"] == "from"
    r = await client.get(f"/api/v1/transfers/{uuid.uuid4()}")
    assert (r.status, (await r.json())["type"]) == (
        404,
        "urn:wallet-service:problem:transfer-not-found",
    )
    r = await client.get("/api/v1/transfers/nope")
    assert r.status == 404
    assert await balance(client, source) == "1.00"


async def test_a_retried_transfer_moves_the_amount_once(client: Client) -> None:
    source = await new_wallet(client, "10.00")
    destination = await new_wallet(client)
    first = await transfer(client, source, destination, "3.00", key="order-17")
    again = await transfer(client, source, destination, "3.00", key="order-17")
    assert (first[0], again[0]) == (200, 200)
    assert again[1]["id"] == first[1]["id"]
    assert again[2].get("Idempotent-Replayed") == "true"
    assert first[2].get("Idempotent-Replayed") is None
    assert await balance(client, source) == "7.00"
    assert await balance(client, destination) == "3.00"

    status, body, _ = await transfer(client, source, destination, "4.00", key="order-17")
    assert (status, body["type"]) == (422, "urn:wallet-service:problem:idempotency-key-reused")
    # The key is the source's: another wallet may use it for a transfer of its own.
    other = await new_wallet(client, "1.00")
    status, body, _ = await transfer(client, other, destination, "1.00", key="order-17")
    assert status == 200
    assert body["id"] != first[1]["id"]
    assert await balance(client, destination) == "4.00"


async def test_one_key_sent_20_times_at_once_moves_the_amount_once(client: Client) -> None:
    source = await new_wallet(client, "10.00")
    destination = await new_wallet(client)
    answers = await asyncio.gather(
        *(transfer(client, source, destination, "1.00", key="once") for _ in range(20))
    )
    assert {status for status, _, _ in answers} == {200}
    assert len({body["id"] for _, body, _ in answers}) == 1
    assert await balance(client, source) == "9.00"
    assert await balance(client, destination) == "1.00"


async def test_a_hot_destination_is_credited_in_batches(client: Client, pg: Any) -> None:
    sources = [await new_wallet(client, "10.00") for _ in range(100)]
    destination = await new_wallet(client)
    answers = await asyncio.gather(
        *(transfer(client, s, destination, "1.00") for s in sources for _ in range(2))
    )
    assert {status for status, _, _ in answers} == {200}
    assert await balance(client, destination) == "200.00"
    for s in sources:
        assert await balance(client, s) == "8.00"
    credits = await pg.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM operations"
        " WHERE wallet_id = $1 AND kind = 'TRANSFER_IN'",
        destination,
    )
    assert credits < 100, f"200 credits took {credits} transactions"


async def test_random_transfers_among_wallets_conserve_money(client: Client, pg: Any) -> None:
    """Transfers every way among ten wallets at once, with deposits and withdrawals: every
    wallet ends where its answered operations and transfers put it, and no money is made or
    lost."""
    rng = random.Random(20261202)
    wallets = [await new_wallet(client, "50.00") for _ in range(10)]
    expected = dict.fromkeys(wallets, 5000)

    async def one() -> None:
        a, b = rng.sample(wallets, 2)
        minor = rng.randint(1, 2000)
        amount = f"{minor // 100}.{minor % 100:02d}"
        if rng.random() < 0.2:
            kind = rng.choice(["DEPOSIT", "WITHDRAW"])
            status, body, _ = await operate(client, a, kind, amount)
            if status == 200:
                expected[a] += minor if kind == "DEPOSIT" else -minor
            else:
                assert status == 409, body
            return
        status, body, _ = await transfer(client, a, b, amount)
        if status == 200:
            expected[a] -= minor
            expected[b] += minor
        else:
            assert (status, body["transfer"]["reason"]) == (409, "insufficient_funds"), body

    await asyncio.gather(*(one() for _ in range(300)))
    for w in wallets:
        minor = expected[w]
        assert await balance(client, w) == f"{minor // 100}.{minor % 100:02d}"
    held, brought = await conservation(pg, wallets)
    assert held == brought
    assert not await pg.fetchval(
        "SELECT count(*) FROM transfers"
        " WHERE source_id = any($1::uuid[]) AND status IN ('in_flight', 'returning')",
        wallets,
    )


async def test_a_transfer_waiting_for_a_worker_is_pending_then_completed(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any
) -> None:
    """Without a worker the transfer waits in its source's queue: 202, and its URL says
    pending; once a worker runs, completed."""
    short = dataclasses.replace(settings, reply_timeout=0.5)
    api = await aiohttp_client(create_app(short))
    source = await funded_wallet(pg, 500)
    destination = await funded_wallet(pg, 0)
    status, body, headers = await transfer(api, source, destination, "2.00")
    assert status == 202, body
    assert headers["Location"] == body["href"] == f"/api/v1/transfers/{body['id']}"
    found = await transfer_status(api, body["id"])
    assert (found["status"], found["from"], found["to"], found["amount"]) == (
        "pending",
        source,
        destination,
        "2.00",
    )
    assert found["balance"] is None
    async with running_worker(short):

        async def completed() -> bool:
            return bool((await transfer_status(api, body["id"]))["status"] == "completed")

        await eventually(completed, what="the transfer to complete")
    assert (await transfer_status(api, body["id"]))["balance"] == "3.00"
    assert await balance(api, destination) == "2.00"


async def funded_wallet(pg: Any, minor: int) -> str:
    """A wallet with a balance set in PostgreSQL before any writer has seen it."""
    return str(await pg.fetchval("INSERT INTO wallets (balance) VALUES ($1) RETURNING id", minor))


def transfer_out(source: str, destination: str, minor: int) -> OperationRequest:
    transfer_id = str(uuid.uuid4())
    return OperationRequest(
        transfer_id,
        source,
        TRANSFER_OUT,
        minor,
        "",
        0,
        transfer_id=transfer_id,
        counterparty=destination,
    )


async def debit_by_hand(pg: Any, keys: KeySpace, entry: Entry) -> None:
    """What a source's writer that died right after its COMMIT left: the debit committed,
    the transfer in flight, its credit never sent."""
    shard = keys.shard_of(entry.request.wallet_id)
    async with pg.acquire() as conn:
        epoch = await take_shard(conn, shard, "a worker about to die")
        [outcome], *_ = await apply_batch(
            conn, [entry], {shard: epoch}, resending=Resending(keys.shard_of, 5.0)
        )
    assert outcome.status == "applied"


async def credited(pg: Any, wallet: str, minor: int) -> bool:
    found = await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet)
    return bool(found == minor)


async def test_a_source_writer_killed_between_debit_and_credit_is_finished_by_the_next(
    settings: Settings, pg: Any, redis: Redis
) -> None:
    """The debit is committed, the entry still in the source's stream, the credit never
    sent: the next owner reads the entry again, finds it recorded and sends the credit; the
    resending sends it too. The destination is credited once."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source, destination = await funded_wallet(pg, 1000), await funded_wallet(pg, 0)
    request = transfer_out(source, destination, 300)
    shard = keys.shard_of(source)
    entry_id: Any = await redis.xadd(keys.wallet_stream(source), {"m": encode_request(request)})
    await redis.sadd(keys.dirty_set(shard), source)
    await debit_by_hand(pg, keys, Entry(entry_id.decode(), request))
    assert await transfer_state(pg, request.transfer_id) == "in_flight"

    eager = dataclasses.replace(settings, worker_rescan_interval=0.2, transfer_resend_after=0.1)
    async with running_worker(eager):
        await eventually(lambda: credited(pg, destination, 300), what="the credit")
        await eventually(
            lambda: settled(pg, request.transfer_id), what="the transfer to be settled"
        )
        await asyncio.sleep(0.5)  # resends meanwhile must not credit it again
    assert [(r["kind"], r["amount"]) for r in await ledger(pg, destination)] == [
        ("TRANSFER_IN", 300)
    ]
    assert [r["kind"] for r in await ledger(pg, source)] == ["TRANSFER_OUT"]
    assert await credited(pg, source, 700)


async def test_a_credit_lost_with_redis_is_sent_again(settings: Settings, pg: Any) -> None:
    """The debit is committed and its entry gone (acknowledged, then Redis lost the credit
    on its way): the owner of the source's shard finds the transfer in flight and sends the
    credit again."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source, destination = await funded_wallet(pg, 1000), await funded_wallet(pg, 0)
    request = transfer_out(source, destination, 250)
    await debit_by_hand(pg, keys, Entry("1-1", request))
    eager = dataclasses.replace(settings, worker_rescan_interval=0.2, transfer_resend_after=0.1)
    async with running_worker(eager):
        await eventually(lambda: settled(pg, request.transfer_id), what="the resent credit")
    assert await transfer_state(pg, request.transfer_id) == "completed"
    assert await credited(pg, destination, 250)
    assert await credited(pg, source, 750)


async def transfer_state(pg: Any, transfer_id: str) -> str:
    return str(await pg.fetchval("SELECT status FROM transfers WHERE id = $1", transfer_id))


async def settled(pg: Any, transfer_id: str) -> bool:
    return await transfer_state(pg, transfer_id) in ("completed", "rejected")


async def test_a_destination_owner_paused_past_its_lease_cannot_credit_twice(
    settings: Settings, pg: Any, redis: Redis
) -> None:
    """A holds the destination's shard and has read the credit; A is paused past its lease
    and B takes the shard. A's batch is refused; B credits, once."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source, destination = await funded_wallet(pg, 1000), await funded_wallet(pg, 0)
    request = transfer_out(source, destination, 400)
    await debit_by_hand(pg, keys, Entry("1-1", request))
    step = credit(request.transfer_id, source, destination, 400, 600, "2026-12-02T00:00:00Z")
    shard = keys.shard_of(destination)
    async with idle_workers(settings, 2) as (a, b):
        await a.streams.load_scripts()
        assert await a.streams.send([step]) == 0
        assert await a.ownership.take(shard)
        assert a.has_work_for(destination)
        await redis.delete(keys.lease(shard))  # A's lease ran out while A was paused
        assert await b.ownership.take(shard)
        with pytest.raises(Fenced):
            await a.process_round()
        assert await ledger(pg, destination) == []
        assert await b.process_round() == 1
    assert [r["kind"] for r in await ledger(pg, destination)] == ["TRANSFER_IN"]
    assert await transfer_state(pg, request.transfer_id) == "completed"
    assert await credited(pg, destination, 400)


async def test_transfer_messages_keep_their_fields() -> None:
    request = dataclasses.replace(
        transfer_out(str(uuid.uuid4()), str(uuid.uuid4()), 5), reply_to="r", tag=7
    )
    assert decode_request(encode_request(request)) == request


async def test_a_transfer_in_flight_shows_in_inspect_and_the_metrics_until_settled(
    settings: Settings, pg: Any
) -> None:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source, destination = await funded_wallet(pg, 1000), await funded_wallet(pg, 0)
    request = transfer_out(source, destination, 300)
    await debit_by_hand(pg, keys, Entry("1-1", request))

    report = await inspect_cli(settings, "transfers")
    [mine] = [t for t in report["transfers"] if t["transfer"] == request.transfer_id]
    assert (mine["source"], mine["destination"], mine["amount"], mine["status"]) == (
        source,
        destination,
        "3.00",
        "in_flight",
    )
    assert report["unsettled"] >= 1
    assert report["oldest_age_seconds"] >= mine["age_seconds"] >= 0

    patient = dataclasses.replace(settings, worker_rescan_interval=0.2, transfer_resend_after=5)
    async with running_worker(patient) as worker:
        registry = worker.metrics.registry

        async def owns_source() -> bool:
            return keys.shard_of(source) in worker.ownership.owned

        await eventually(owns_source, what="the worker to own the source's shard")
        await refresh_gauges(worker)
        before = registry.get_sample_value("wallet_transfers_unsettled")
        assert before is not None
        assert before >= 1
        await eventually(lambda: settled(pg, request.transfer_id), what="the resent credit")
        await refresh_gauges(worker)
        after = registry.get_sample_value("wallet_transfers_unsettled")
        assert after is not None
        assert after < before

        async def counted() -> bool:
            # Counted once the batch's answers are out, just after its COMMIT.
            found = registry.get_sample_value(
                "wallet_transfers_settled_total", {"outcome": "completed"}
            )
            return found is not None and found >= 1

        await eventually(counted, what="the settled transfer to be counted")
    report = await inspect_cli(settings, "transfers")
    assert request.transfer_id not in {t["transfer"] for t in report["transfers"]}


async def legs_transactions(pg: Any, transfer_id: str) -> set[str]:
    """The transactions that wrote the transfer's debit and credit."""
    rows = await pg.fetch(
        "SELECT xmin::text FROM operations"
        " WHERE id = $1 AND kind IN ('TRANSFER_OUT', 'TRANSFER_IN')",
        transfer_id,
    )
    assert len(rows) == 2
    return {r["xmin"] for r in rows}


async def test_a_transfer_between_wallets_of_one_writer_is_one_transaction(
    client: Client, pg: Any
) -> None:
    source = await new_wallet(client, "5.00")
    destination = await new_wallet(client)
    status, body, _ = await transfer(client, source, destination, "2.00")
    assert status == 200, body
    assert len(await legs_transactions(pg, body["id"])) == 1
    assert await transfer_state(pg, body["id"]) == "completed"


async def test_a_transfer_between_two_writers_is_credited_by_the_destination_s(
    api: Client, settings: Settings, pg: Any
) -> None:
    """Two workers, each writing half the shards: the debit is one's batch, the credit the
    other's."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    async with running_worker(settings) as first, running_worker(settings) as second:

        async def shared() -> bool:
            mine, theirs = set(first.ownership.owned), set(second.ownership.owned)
            return bool(mine) and bool(theirs) and len(mine | theirs) == settings.shard_count

        await eventually(shared, what="the two workers to share the shards")
        source_shard = next(iter(first.ownership.owned))
        destination_shard = next(iter(second.ownership.owned))
        source = wallet_in(keys, source_shard)
        destination = wallet_in(keys, destination_shard)
        for wallet, minor in ((source, 1000), (destination, 0)):
            await pg.execute("INSERT INTO wallets (id, balance) VALUES ($1, $2)", wallet, minor)
        status, body, _ = await transfer(api, source, destination, "4.00")
        assert status == 200, body
        assert body["balance"] == "6.00"
        assert len(await legs_transactions(pg, body["id"])) == 2
        assert await balance(api, destination) == "4.00"
        status, body, _ = await transfer(api, destination, source, "4.01")
        assert (status, body["transfer"]["reason"]) == (409, "insufficient_funds")


async def test_two_writers_sending_to_each_other_at_once_neither_deadlock_nor_lose(
    api: Client, settings: Settings, pg: Any
) -> None:
    """Wallets on two workers' shards, transfers both ways at once, and within each side:
    every one is answered 200 or 409, and the money adds up with nothing in flight."""
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    rng = random.Random(20261202)
    async with running_worker(settings) as first, running_worker(settings) as second:

        async def shared() -> bool:
            mine, theirs = set(first.ownership.owned), set(second.ownership.owned)
            return bool(mine) and bool(theirs) and len(mine | theirs) == settings.shard_count

        await eventually(shared, what="the two workers to share the shards")
        wallets = [
            wallet_in(keys, rng.choice(sorted(worker.ownership.owned)))
            for worker in (first, second)
            for _ in range(4)
        ]
        for wallet in wallets:
            await pg.execute("INSERT INTO wallets (id, balance) VALUES ($1, 2500)", wallet)

        async def one() -> int:
            a, b = rng.sample(wallets, 2)
            status, body, _ = await transfer(api, a, b, f"{rng.randint(1, 9)}.00")
            assert status in (200, 409), body
            return status

        statuses = await asyncio.gather(*(one() for _ in range(200)))
        assert statuses.count(200) > 50  # some are refused: the point is that none hangs
    held, _ = await conservation(pg, wallets)
    assert held == 8 * 2500  # their balances, and nothing in flight:
    assert not await pg.fetchval(
        "SELECT count(*) FROM transfers"
        " WHERE source_id = any($1::uuid[]) AND status IN ('in_flight', 'returning')",
        wallets,
    )
