"""Clients that compute every id they can and send it back as an Idempotency-Key: no key
reaches an operation id the service uses for itself, nor another key's."""

from __future__ import annotations

import uuid
from typing import Any

from shared.ids import client_operation_id, return_op_id, transfer_id_for
from shared.keys import KeySpace
from shared.money import MAX_BALANCE_MINOR
from shared.settings import Settings
from tests.helpers import Client, eventually, ledger, operate
from tests.test_transfers import balance, conservation, new_wallet, transfer, transfer_status


def spellings(u: str) -> list[str]:
    """A UUID as clients may write it; each is a different key."""
    plain = uuid.UUID(u)
    return [str(plain), str(plain).upper(), f"{{{plain}}}", plain.urn, plain.hex]


def squatted_keys(source: str, destination: str, key: str) -> list[str]:
    """Every id of the transfer `key` makes that a client can compute with the service's
    own derivations, in every spelling."""
    transfer_id = transfer_id_for(source, key)
    ids = [
        transfer_id,
        return_op_id(transfer_id),
        client_operation_id(key),
        transfer_id_for(destination, key),
    ]
    return [spelled for i in ids for spelled in spellings(i)]


async def squat(client: Client, wallets: list[str], keys: list[str]) -> int:
    """Deposits 0.01 on each wallet under each key; returns the minor units deposited."""
    deposited = 0
    for wallet in wallets:
        for key in keys:
            status, body, _ = await operate(client, wallet, "DEPOSIT", "0.01", key=key)
            assert status == 200, body
            deposited += 1
    return deposited


async def nothing_in_flight(pg: Any, wallets: list[str]) -> bool:
    unsettled = await pg.fetchval(
        "SELECT count(*) FROM transfers WHERE source_id = any($1::uuid[])"
        " AND status IN ('in_flight', 'returning')",
        wallets,
    )
    return bool(unsettled == 0)


async def test_keys_computed_from_a_transfer_s_ids_cannot_wedge_it(client: Client, pg: Any) -> None:
    source = await new_wallet(client, "100.00")
    destination = await new_wallet(client)
    key = "order-1234"
    squatted = squatted_keys(source, destination, key)
    deposited = await squat(client, [source, destination], squatted)

    status, body, _ = await transfer(client, source, destination, "10.00", key=key)
    assert status == 200, body
    assert body["status"] == "completed"
    cents = deposited // 2
    assert await balance(client, source) == f"{90 + cents // 100}.{cents % 100:02d}"
    assert await balance(client, destination) == f"{10 + cents // 100}.{cents % 100:02d}"
    held, brought = await conservation(pg, [source, destination])
    assert held == brought
    assert await nothing_in_flight(pg, [source, destination])


async def test_a_squatted_return_id_cannot_keep_the_amount_from_coming_back(
    client: Client, pg: Any
) -> None:
    source = await new_wallet(client, "100.00")
    # A destination one cent short of the largest balance: the credit is refused, the
    # amount must come back to the source.
    destination = str(
        await pg.fetchval(
            "INSERT INTO wallets (balance) VALUES ($1) RETURNING id", MAX_BALANCE_MINOR - 1
        )
    )
    key = str(uuid.uuid4())
    await squat(client, [source], squatted_keys(source, destination, key))

    status, body, _ = await transfer(client, source, destination, "0.02", key=key)
    assert status == 409, body
    back = body["transfer"]
    assert (back["status"], back["reason"]) == ("rejected", "balance_limit")
    found = await transfer_status(client, back["id"])
    assert found["status"] == "rejected"
    rows = await ledger(pg, source)
    assert rows[-1]["kind"] == "TRANSFER_RETURN"
    assert rows[-1]["status"] == "applied"
    assert await nothing_in_flight(pg, [source])


async def test_spellings_of_one_uuid_are_different_keys(client: Client, wallet: str) -> None:
    keys = spellings(str(uuid.uuid4()))
    answered = []
    for key in keys:
        status, body, headers = await operate(client, wallet, "DEPOSIT", "1.00", key=key)
        assert status == 200, body
        assert "Idempotent-Replayed" not in headers
        answered.append(body["id"])
    assert len(set(answered)) == len(keys)
    assert await balance(client, wallet) == f"{len(keys)}.00"
    # Each key sent again is its own operation, replayed.
    for key, first in zip(keys, answered, strict=True):
        status, body, headers = await operate(client, wallet, "DEPOSIT", "1.00", key=key)
        assert (status, body["id"], headers.get("Idempotent-Replayed")) == (200, first, "true")


async def test_an_operation_s_id_is_not_its_key(client: Client, wallet: str) -> None:
    """The id a key becomes is the service's; sent as a key, it is another operation."""
    status, first, _ = await operate(client, wallet, "DEPOSIT", "1.00", key="k-1")
    assert status == 200
    assert first["id"] == client_operation_id("k-1")
    status, second, headers = await operate(client, wallet, "DEPOSIT", "1.00", key=first["id"])
    assert status == 200, second
    assert second["id"] != first["id"]
    assert "Idempotent-Replayed" not in headers

    async def both_applied() -> bool:
        return await balance(client, wallet) == "2.00"

    await eventually(both_applied)


async def stream_state(redis: Any, stream: str) -> tuple[int, Any]:
    """Whether the stream exists, and the id of the last entry ever added to it."""
    if not await redis.exists(stream):
        return 0, None
    info = await redis.xinfo_stream(stream)
    return 1, info["last-generated-id"]


async def test_retrying_a_settled_transfer_s_key_queues_nothing_on_the_destination(
    client: Client, pg: Any, redis: Any, settings: Settings
) -> None:
    """Each retry is answered from the ledger; none queues the credit again, which would
    let a client fill another wallet's queue past its limit."""
    source = await new_wallet(client, "100.00")
    destination = await new_wallet(client)
    status, first, _ = await transfer(client, source, destination, "1.00", key="pay-1")
    assert (status, first["status"]) == (200, "completed")
    stream = KeySpace(settings.redis_key_prefix, settings.shard_count).wallet_stream(destination)
    before = await stream_state(redis, stream)
    for _ in range(8):
        status, again, headers = await transfer(client, source, destination, "1.00", key="pay-1")
        assert (status, again, headers.get("Idempotent-Replayed")) == (200, first, "true")
    assert await stream_state(redis, stream) == before
    assert [r["kind"] for r in await ledger(pg, destination)] == ["TRANSFER_IN"]
    assert await balance(client, destination) == "1.00"
