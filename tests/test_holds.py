"""Holds through the API and a worker: placed, captured, voided and expired; their races; a
worker down across an expiry, or dead between a capture's two sides."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections import Counter
from typing import Any

from shared.codec import Kind, OperationRequest, decode_request
from shared.connections import RedisClient
from shared.ids import capture_transfer_id
from shared.keys import KeySpace
from shared.metrics import WorkerMetrics
from shared.queue import queue_for
from shared.settings import Settings
from tests.conftest import running_worker
from tests.helpers import Client, eventually, ledger, operate
from tests.test_resends import debit
from worker.decide import Entry
from worker.expiries import RESEND_AFTER_MS, Expiries, Sent
from worker.streams import WalletStreams


async def deposit(client: Client, wallet: str, amount: str) -> None:
    status, body, _ = await operate(client, wallet, "DEPOSIT", amount)
    assert status == 200, body


async def place(
    client: Client, wallet: str, amount: Any, key: str | None = None, **fields: Any
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Idempotency-Key": key} if key else {}
    r = await client.post(
        f"/api/v1/wallets/{wallet}/holds", json={"amount": amount, **fields}, headers=headers
    )
    return r.status, await r.json(), r.headers


async def end(
    client: Client, hold: str, action: str, key: str | None = None, **fields: Any
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Idempotency-Key": key} if key else {}
    r = await client.post(f"/api/v1/holds/{hold}/{action}", json=fields, headers=headers)
    return r.status, await r.json(), r.headers


async def wallet_state(client: Client, wallet: str) -> tuple[str, str, str]:
    body = await (await client.get(f"/api/v1/wallets/{wallet}")).json()
    return body["balance"], body["held"], body["available"]


async def hold_status(client: Client, hold: str) -> str:
    body = await (await client.get(f"/api/v1/holds/{hold}")).json()
    return str(body["status"])


async def test_a_hold_reserves_funds_that_withdrawals_and_holds_cannot_take(
    client: Client, wallet: str
) -> None:
    await deposit(client, wallet, "100.00")
    status, hold, headers = await place(client, wallet, "60.00")
    assert status == 201, hold
    assert headers["Location"] == f"/api/v1/holds/{hold['id']}"
    assert (hold["status"], hold["amount"], hold["balance"], hold["available"]) == (
        "held",
        "60.00",
        "100.00",
        "40.00",
    )
    assert await wallet_state(client, wallet) == ("100.00", "60.00", "40.00")
    status, problem, _ = await place(client, wallet, "40.01")
    assert (status, problem["type"]) == (409, "urn:wallet-service:problem:insufficient-funds")
    status, problem, _ = await operate(client, wallet, "WITHDRAW", "40.01")
    assert status == 409, problem
    status, _, _ = await operate(client, wallet, "WITHDRAW", "40.00")
    assert status == 200
    assert await wallet_state(client, wallet) == ("60.00", "60.00", "0.00")
    page = await (await client.get(f"/api/v1/wallets/{wallet}/holds?status=held")).json()
    assert [h["id"] for h in page["items"]] == [hold["id"]]


async def test_a_wallet_s_holds_page_newest_first_and_filter_by_status(
    client: Client, wallet: str
) -> None:
    await deposit(client, wallet, "10.00")
    placed = [(await place(client, wallet, f"{n}.00"))[1]["id"] for n in (1, 2, 3)]
    await end(client, placed[0], "void")
    r = await client.get(f"/api/v1/wallets/{wallet}/holds?limit=2")
    first = await r.json()
    assert [h["id"] for h in first["items"]] == placed[:0:-1]
    r = await client.get(f"/api/v1/wallets/{wallet}/holds?cursor={first['next_cursor']}")
    rest = await r.json()
    assert ([h["id"] for h in rest["items"]], rest["next_cursor"]) == ([placed[0]], None)
    r = await client.get(f"/api/v1/wallets/{wallet}/holds?status=voided")
    assert [h["status"] for h in (await r.json())["items"]] == ["voided"]


async def test_a_partial_capture_takes_its_amount_and_releases_the_rest(
    client: Client, wallet: str, pg: Any
) -> None:
    await deposit(client, wallet, "100.00")
    _, hold, _ = await place(client, wallet, "60.00")
    status, captured, _ = await end(client, hold["id"], "capture", amount="25.50")
    assert status == 200, captured
    assert (captured["status"], captured["captured"], captured["balance"]) == (
        "captured",
        "25.50",
        "74.50",
    )
    assert await wallet_state(client, wallet) == ("74.50", "0.00", "74.50")
    rows = await ledger(pg, wallet)
    assert [(r["kind"], r["amount"], r["balance_after"]) for r in rows] == [
        ("DEPOSIT", 10000, 10000),
        ("HOLD", 6000, 10000),
        ("HOLD_CAPTURE", 2550, 7450),
    ]
    ops = await (await client.get(f"/api/v1/wallets/{wallet}/operations")).json()
    assert ops["items"][0]["hold_id"] == hold["id"]


async def test_a_capture_defaults_to_all_and_none_may_take_more_than_held(
    client: Client, wallet: str
) -> None:
    await deposit(client, wallet, "10.00")
    _, hold, _ = await place(client, wallet, "4.00")
    status, problem, _ = await end(client, hold["id"], "capture", amount="4.01")
    assert (status, problem["errors"][0]["field"]) == (422, "amount")
    status, captured, _ = await end(client, hold["id"], "capture")
    assert (status, captured["captured"]) == (200, "4.00")
    assert await wallet_state(client, wallet) == ("6.00", "0.00", "6.00")


async def test_a_void_releases_it_and_the_hold_ends_once(client: Client, wallet: str) -> None:
    await deposit(client, wallet, "10.00")
    _, hold, _ = await place(client, wallet, "4.00")
    status, voided, _ = await end(client, hold["id"], "void")
    assert (status, voided["status"]) == (200, "voided")
    assert await wallet_state(client, wallet) == ("10.00", "0.00", "10.00")
    for action in ("void", "capture"):
        status, problem, _ = await end(client, hold["id"], action)
        assert status == 409, problem
        assert problem["type"] == "urn:wallet-service:problem:hold-not-active"
        assert problem["hold"]["status"] == "voided"


async def test_a_key_sent_again_is_answered_as_the_first_time(
    client: Client, wallet: str, pg: Any
) -> None:
    await deposit(client, wallet, "10.00")
    status, first, _ = await place(client, wallet, "4.00", key="order-1")
    status_again, again, headers = await place(client, wallet, "4.00", key="order-1")
    assert (status, status_again, again["id"]) == (201, 201, first["id"])
    assert headers["Idempotent-Replayed"] == "true"
    hold = first["id"]
    status, _, _ = await end(client, hold, "capture", key="cap-1", amount="3.00")
    assert status == 200
    status, again, headers = await end(client, hold, "capture", key="cap-1", amount="3.00")
    assert (status, again["captured"], headers["Idempotent-Replayed"]) == (200, "3.00", "true")
    status, problem, _ = await end(client, hold, "capture", key="cap-1", amount="2.00")
    assert (status, problem["type"]) == (422, "urn:wallet-service:problem:idempotency-key-reused")
    assert len([r for r in await ledger(pg, wallet) if r["kind"] == "HOLD_CAPTURE"]) == 1


async def test_the_same_key_sent_concurrently_places_one_hold(client: Client, wallet: str) -> None:
    await deposit(client, wallet, "10.00")
    answers = await asyncio.gather(*(place(client, wallet, "1.00", key="once") for _ in range(20)))
    assert {status for status, _, _ in answers} == {201}
    assert len({body["id"] for _, body, _ in answers}) == 1
    assert await wallet_state(client, wallet) == ("10.00", "1.00", "9.00")


async def test_one_capture_key_sent_concurrently_captures_once(
    client: Client, wallet: str, pg: Any
) -> None:
    await deposit(client, wallet, "10.00")
    _, hold, _ = await place(client, wallet, "4.00")
    answers = await asyncio.gather(
        *(end(client, hold["id"], "capture", key="ship", amount="3.00") for _ in range(20))
    )
    assert {(status, body["captured"]) for status, body, _ in answers} == {(200, "3.00")}
    replayed = [h.get("Idempotent-Replayed") for _, _, h in answers]
    assert replayed.count("true") == 19
    assert await wallet_state(client, wallet) == ("7.00", "0.00", "7.00")
    assert [r["kind"] for r in await ledger(pg, wallet)].count("HOLD_CAPTURE") == 1


async def test_of_a_capture_a_void_and_a_capture_sent_at_once_exactly_one_wins(
    client: Client, wallet: str
) -> None:
    await deposit(client, wallet, "100.00")
    holds = [(await place(client, wallet, "2.00"))[1]["id"] for _ in range(20)]
    rivals = [
        end(client, hold, action)
        for hold in holds
        for action in ("capture", "void", "capture", "void")
    ]
    answers = await asyncio.gather(*rivals)
    for at, hold in enumerate(holds):
        statuses = Counter(status for status, _, _ in answers[at * 4 : at * 4 + 4])
        assert statuses == {200: 1, 409: 3}, (hold, statuses)
    captured = [await hold_status(client, h) for h in holds].count("captured")
    balance, held, _ = await wallet_state(client, wallet)
    assert held == "0.00"
    assert balance == f"{100 - 2 * captured}.00"


async def test_a_hold_expires_by_itself_and_is_never_captured_after(
    client: Client, wallet: str
) -> None:
    await deposit(client, wallet, "10.00")
    status, hold, _ = await place(client, wallet, "4.00", expires_in=1)
    assert status == 201, hold
    expires_at = hold["expires_at"]
    assert await hold_status(client, hold["id"]) == "held"

    async def expired() -> bool:
        return await hold_status(client, hold["id"]) == "expired"

    await eventually(expired, within=5, what="the hold to expire")
    assert await wallet_state(client, wallet) == ("10.00", "0.00", "10.00")
    status, problem, _ = await end(client, hold["id"], "capture")
    assert (status, problem["hold"]["status"], problem["hold"]["expires_at"]) == (
        409,
        "expired",
        expires_at,
    )


async def test_a_hold_whose_worker_is_down_at_its_expiry_expires_when_one_is_back(
    api: Client, settings: Settings, pg: Any
) -> None:
    wallet = (await (await api.post("/api/v1/wallets")).json())["id"]
    async with running_worker(settings):
        await deposit(api, wallet, "10.00")
        _, hold, _ = await place(api, wallet, "4.00", expires_in=1)
    await asyncio.sleep(0)  # no worker from here
    deadline = time.time() + 1.5
    await eventually(lambda: _after(deadline), within=5, what="the expiry to pass with no worker")
    assert await hold_status(api, hold["id"]) == "held"
    async with running_worker(settings):

        async def expired() -> bool:
            return await hold_status(api, hold["id"]) == "expired"

        await eventually(expired, within=10, what="the hold to expire")
    kinds = [r["kind"] for r in await ledger(pg, wallet)]
    assert kinds == ["DEPOSIT", "HOLD", "HOLD_EXPIRE"]


async def _after(moment: float) -> bool:
    return time.time() > moment


async def test_a_capture_paid_to_a_wallet_is_a_transfer(client: Client, wallet: str) -> None:
    payee = (await (await client.post("/api/v1/wallets")).json())["id"]
    await deposit(client, wallet, "10.00")
    _, hold, _ = await place(client, wallet, "4.00")
    status, captured, _ = await end(client, hold["id"], "capture", amount="3.00", to=payee)
    assert status == 200, captured
    assert (captured["to"], captured["transfer_status"]) == (payee, "completed")
    assert captured["transfer_id"] == capture_transfer_id(hold["id"])
    assert await wallet_state(client, wallet) == ("7.00", "0.00", "7.00")
    assert await wallet_state(client, payee) == ("3.00", "0.00", "3.00")
    status, problem, _ = await end(client, hold["id"], "capture", to=str(uuid.uuid4()))
    assert status == 404, problem


async def test_a_capture_whose_writer_died_before_paying_is_paid_once(
    api: Client, settings: Settings, pg: Any
) -> None:
    """The capture committed and its credit never sent: the resending pays it, once."""
    eager = dataclasses.replace(settings, worker_rescan_interval=0.3, transfer_resend_after=0.5)
    wallet = (await (await api.post("/api/v1/wallets")).json())["id"]
    payee = (await (await api.post("/api/v1/wallets")).json())["id"]
    async with running_worker(settings):
        await deposit(api, wallet, "10.00")
        _, hold, _ = await place(api, wallet, "4.00")
    hold_id = hold["id"]
    capture = OperationRequest(
        str(uuid.uuid4()),
        wallet,
        Kind.HOLD_CAPTURE,
        400,
        "",
        0,
        transfer_id=capture_transfer_id(hold_id),
        counterparty=payee,
        hold_id=hold_id,
    )
    await debit(pg, settings, Entry("1-1", capture))
    assert await wallet_state(api, payee) == ("0.00", "0.00", "0.00")
    async with running_worker(eager):

        async def paid() -> bool:
            return await wallet_state(api, payee) == ("4.00", "0.00", "4.00")

        await eventually(paid, within=10, what="the capture's credit")
    assert await wallet_state(api, wallet) == ("6.00", "0.00", "6.00")
    assert [r["kind"] for r in await ledger(pg, payee)] == ["TRANSFER_IN"]


async def test_bad_hold_requests_get_clear_errors(client: Client, wallet: str) -> None:
    await deposit(client, wallet, "10.00")
    for fields in ({"amount": "0"}, {"amount": "1.00", "expires_in": 0}):
        status, problem, _ = await place(client, wallet, fields.pop("amount"), **fields)
        assert status == 422, problem
    status, problem, _ = await place(client, wallet, "1.00", expires_in=31 * 24 * 3600)
    assert (status, problem["errors"][0]["field"]) == (422, "expires_in")
    for hold in (str(uuid.uuid4()), "not-a-hold"):
        r = await client.get(f"/api/v1/holds/{hold}")
        assert r.status == 404
        status, problem, _ = await end(client, hold, "capture")
        assert (status, problem["type"]) == (404, "urn:wallet-service:problem:hold-not-found")
    r = await client.get(f"/api/v1/wallets/{wallet}/holds?status=lost")
    assert r.status == 422
    status, _, _ = await place(client, str(uuid.uuid4()), "1.00")
    assert status == 404


async def test_an_expiry_that_may_still_be_queued_is_not_sent_again(
    api: Client, settings: Settings, pg: Any, redis: RedisClient
) -> None:
    """An expiry sent while the wallet's writer is away (or slow, or PostgreSQL down) waits
    in its stream: it is not sent again every RESEND_AFTER_MS, copies piling up behind it,
    until the stream no longer holds it (Redis lost it): then it is."""
    wallet = (await (await api.post("/api/v1/wallets")).json())["id"]
    async with running_worker(settings):
        await deposit(api, wallet, "10.00")
        _, hold, _ = await place(api, wallet, "4.00", expires_in=1)
    deadline = time.time() + 1.5
    await eventually(lambda: _after(deadline), within=5, what="the hold to be due")
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    streams = WalletStreams(redis, queue_for(keys, redis), settings.batch_max)
    expiries = Expiries(keys.shard_of, WorkerMetrics())
    owned = range(settings.shard_count)
    expiries.taken(keys.shard_of(wallet))  # its holds read from PostgreSQL, as a new owner's

    async def send_due(now_ms: int) -> Sent:
        return await expiries.send_due(pg, streams, owned, now_ms)

    stream = keys.wallet_stream(wallet)
    first = int(time.time() * 1000)
    assert await send_due(first) == Sent(sent=1, still_queued=0, failed=0)
    assert await redis.xlen(stream) == 1
    for resend in (1, 2, 3):
        assert await send_due(first + resend * RESEND_AFTER_MS) == Sent(0, 1, 0)
    assert await redis.xlen(stream) == 1
    await redis.delete(stream)  # lost with a Redis wiped
    assert await send_due(first + 4 * RESEND_AFTER_MS) == Sent(1, 0, 0)
    queued: Any = await redis.xrange(stream)
    [(_, fields)] = queued
    assert decode_request(fields[b"m"]).hold_id == hold["id"]
    async with running_worker(settings):  # it leaves no hold overdue for the tests after it

        async def expired() -> bool:
            return await hold_status(api, hold["id"]) == "expired"

        await eventually(expired, within=10, what="the hold to expire")
