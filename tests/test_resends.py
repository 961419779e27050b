"""Resending the steps of unsettled transfers: every one comes round, whatever else is
stuck; none floods a wallet that is only behind; a return with no room waits, visible,
and applies once it fits."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from aiohttp.test_utils import TestClient

from api.app import create_app
from shared.keys import KeySpace
from shared.money import MAX_BALANCE_MINOR
from shared.settings import Settings
from tests.conftest import AiohttpClient, idle_workers, running_worker
from tests.helpers import eventually, ledger, operate, resending, wallet_in
from tests.test_inspect import inspect_cli
from tests.test_transfers import (
    conservation,
    credited,
    funded_wallet,
    settled,
    transfer,
    transfer_out,
    transfer_state,
)
from worker.apply import apply_batch
from worker.decide import Entry
from worker.gauges import refresh_gauges
from worker.ownership import take_shard
from worker.transfers import RESEND_PER_SHARD, credit

STUCK = 3 * RESEND_PER_SHARD  # per shard: more than one resending takes of a shard


async def debit(pg: Any, settings: Settings, entry: Entry) -> None:
    """The debit committed and the credit never sent, as a source's writer that died right
    after its COMMIT (or a Redis that lost the credit) leaves it."""
    shard = KeySpace(settings.redis_key_prefix, settings.shard_count).shard_of(
        entry.request.wallet_id
    )
    async with pg.acquire() as conn:
        epoch = await take_shard(conn, shard, "a worker about to die")
        [outcome], *_ = await apply_batch(
            conn, [entry], {shard: epoch}, resending=resending(settings)
        )
    assert outcome.status == "applied"


async def test_a_lost_credit_is_sent_again_in_time_whatever_else_is_stuck(
    settings: Settings, pg: Any
) -> None:
    """On every other shard, more unsettled transfers than a resending takes, due long
    before it and never settling (their wallets do not exist); the lost credit is sent
    again within TRANSFER_RESEND_AFTER and one rescan."""
    eager = dataclasses.replace(settings, worker_rescan_interval=0.3, transfer_resend_after=0.5)
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source, destination = await funded_wallet(pg, 1000), await funded_wallet(pg, 0)
    victim_shard = keys.shard_of(source)
    others = [s for s in range(settings.shard_count) if s != victim_shard]
    stuck = await pg.fetch(
        "INSERT INTO transfers (source_id, id, destination_id, amount, status,"
        " source_balance_after, source_shard, resend_at)"
        " SELECT gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 1, 'in_flight', 0,"
        "        shard, now() - interval '1 hour'"
        " FROM unnest($1::int[]) AS shard, generate_series(1, $2)"
        " RETURNING id",
        others,
        STUCK,
    )
    try:
        request = transfer_out(source, destination, 250)
        await debit(pg, eager, Entry("1-1", request))
        debited = time.monotonic()
        async with running_worker(eager):
            await eventually(
                lambda: settled(pg, request.transfer_id),
                within=eager.transfer_resend_after + eager.worker_rescan_interval + 3.0,
                what="the lost credit to be sent again",
            )
        assert time.monotonic() - debited < 10
        assert await transfer_state(pg, request.transfer_id) == "completed"
        assert await credited(pg, destination, 250)
        # The stuck ones were sent too, each backing off.
        resent = await pg.fetchval(
            "SELECT count(*) FROM transfers WHERE id = any($1::uuid[]) AND resends > 0",
            [r["id"] for r in stuck],
        )
        assert resent >= len(others) * RESEND_PER_SHARD
    finally:
        await pg.execute(
            "DELETE FROM transfers WHERE id = any($1::uuid[])", [r["id"] for r in stuck]
        )


async def test_a_destination_only_behind_gets_no_duplicate_credit(
    settings: Settings, pg: Any
) -> None:
    """The credit waits in the stream of a destination whose shard nobody writes for now:
    the resending leaves it alone however often the transfer is due; once the destination
    is written, it is credited once."""
    eager = dataclasses.replace(settings, transfer_resend_after=0.1)
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source = wallet_in(keys, 1)
    destination = wallet_in(keys, 2)
    for wallet, minor in ((source, 1000), (destination, 0)):
        await pg.execute("INSERT INTO wallets (id, balance) VALUES ($1, $2)", wallet, minor)
    request = transfer_out(source, destination, 400)
    await debit(pg, eager, Entry("1-1", request))
    step = credit(request.transfer_id, source, destination, 400, 600, "2026-12-07T00:00:00Z")
    async with idle_workers(eager, 1) as (worker,):
        await worker.streams.load_scripts()
        assert (
            await worker.streams.send([step]) == 0
        )  # what the source's writer sent after its COMMIT
        assert await worker.ownership.take(1)
        deferred = 0
        for _ in range(5):
            await eventually(
                lambda: due(pg, request.transfer_id), what="the transfer to be due again"
            )
            sent, queued = await worker.resend_transfers()
            assert sent == 0
            deferred += queued
        assert deferred == 5
        assert await worker.redis.xlen(keys.wallet_stream(destination)) == 1
        assert await worker.ownership.take(2)
        await eventually(
            lambda: settled_by(worker, pg, request.transfer_id), what="the credit to apply"
        )
    assert [(r["kind"], r["amount"]) for r in await ledger(pg, destination)] == [
        ("TRANSFER_IN", 400)
    ]
    assert await credited(pg, destination, 400)


async def due(pg: Any, transfer_id: str) -> bool:
    return bool(
        await pg.fetchval("SELECT resend_at <= now() FROM transfers WHERE id = $1", transfer_id)
    )


async def settled_by(worker: Any, pg: Any, transfer_id: str) -> bool:
    await worker.process_round()
    return await settled(pg, transfer_id)


async def test_a_return_with_no_room_waits_visibly_and_applies_once_it_fits(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any
) -> None:
    """The destination cannot take the credit; by the time the amount comes back, a
    deposit has taken the source near the largest balance: the return waits (the transfer
    returning, its return marked waiting, in the metrics and in inspect) and applies once a
    withdrawal makes room. Money is conserved throughout."""
    eager = dataclasses.replace(
        settings, reply_timeout=0.3, worker_rescan_interval=0.2, transfer_resend_after=0.2
    )
    api: TestClient[Any, Any] = await aiohttp_client(create_app(eager))
    source = await funded_wallet(pg, MAX_BALANCE_MINOR - 100)
    destination = await funded_wallet(pg, MAX_BALANCE_MINOR - 1)
    wallets = [source, destination]
    # Queued before any worker runs, in this order: the debit, then the deposit.
    status, body, _ = await transfer(api, source, destination, "0.50", key="t-1")
    assert status == 202, body
    transfer_id = body["id"]
    status, _, _ = await operate(api, source, "DEPOSIT", "1.20")
    assert status == 202
    async with running_worker(eager) as worker:
        await eventually(lambda: return_waiting(pg, transfer_id), what="the return to wait")
        assert await transfer_state(pg, transfer_id) == "returning"
        await refresh_gauges(worker)
        assert worker.metrics.registry.get_sample_value("wallet_transfer_returns_waiting") == 1
        report = await inspect_cli(eager, "transfers")
        assert report["returns_waiting"] == 1
        [shown] = [t for t in report["transfers"] if t["transfer"] == transfer_id]
        assert (shown["status"], shown["return_waiting"]) == ("returning", True)
        held, brought = await conservation(pg, wallets)
        assert held - brought == MAX_BALANCE_MINOR - 100 + MAX_BALANCE_MINOR - 1
        assert "TRANSFER_RETURN" not in [r["kind"] for r in await ledger(pg, source)]

        status, body, _ = await operate(api, source, "WITHDRAW", "1.00")
        assert status in (200, 202), body
        await eventually(lambda: settled(pg, transfer_id), what="the return to apply")
    assert await transfer_state(pg, transfer_id) == "rejected"
    rows = await ledger(pg, source)
    assert [(r["kind"], r["status"]) for r in rows] == [
        ("TRANSFER_OUT", "applied"),
        ("DEPOSIT", "applied"),
        ("WITHDRAW", "applied"),
        ("TRANSFER_RETURN", "applied"),
    ]
    assert await credited(pg, source, MAX_BALANCE_MINOR - 100 + 120 - 100)
    held, brought = await conservation(pg, wallets)
    assert held - brought == MAX_BALANCE_MINOR - 100 + MAX_BALANCE_MINOR - 1
    assert (
        await pg.fetchval(
            "SELECT count(*) FROM transfers WHERE source_id = any($1::uuid[])"
            " AND status IN ('in_flight', 'returning')",
            wallets,
        )
        == 0
    )


async def return_waiting(pg: Any, transfer_id: str) -> bool:
    return bool(
        await pg.fetchval("SELECT return_waiting FROM transfers WHERE id = $1", transfer_id)
    )


async def test_a_lost_credit_to_a_busy_destination_is_sent_once_older_entries_are_gone(
    settings: Settings, pg: Any
) -> None:
    """While the destination's stream holds an entry from before the credit was sent, the
    credit may be among them: left alone. Once its first entry is newer than that (the
    destination is busy, not behind), the credit was lost: sent again, however often it
    was left alone before."""
    eager = dataclasses.replace(settings, transfer_resend_after=0.1)
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    source, destination = wallet_in(keys, 1), wallet_in(keys, 2)
    for wallet, minor in ((source, 1000), (destination, 0)):
        await pg.execute("INSERT INTO wallets (id, balance) VALUES ($1, $2)", wallet, minor)
    request = transfer_out(source, destination, 400)
    await debit(pg, eager, Entry("1-1", request))  # its credit lost
    sent_at_ms = await pg.fetchval(
        "SELECT (extract(epoch FROM sent_at) * 1000)::bigint FROM transfers WHERE id = $1",
        request.transfer_id,
    )
    stream = keys.wallet_stream(destination)
    async with idle_workers(eager, 1) as (worker,):
        await worker.streams.load_scripts()
        assert await worker.ownership.take(1)
        # An entry from before the credit was sent (another client's): the credit may
        # still be behind it.
        await worker.redis.xadd(stream, {"m": b"older"}, id=f"{sent_at_ms - 5000}-0")
        for _ in range(3):
            await eventually(lambda: due(pg, request.transfer_id), what="the transfer due")
            assert await worker.resend_transfers() == (0, 1)
        # The destination got through it; what is queued now came after the credit.
        await worker.redis.delete(stream)
        await worker.redis.xadd(stream, {"m": b"newer"}, id=f"{sent_at_ms + 5000}-0")
        await eventually(lambda: due(pg, request.transfer_id), what="the transfer due")
        assert await worker.resend_transfers() == (1, 0)
        assert await worker.redis.xlen(stream) == 2  # the credit, behind the newer entry
