"""Wallets and their ledger: creation, reads, and paging."""

from __future__ import annotations

import asyncio
import re
import uuid
from typing import Any

from tests.helpers import Client, operate


async def test_create_and_read_a_wallet(client: Client) -> None:
    r = await client.post("/api/v1/wallets")
    assert r.status == 201
    created = await r.json()
    assert created["balance"] == "0.00"
    assert r.headers["Location"] == f"/api/v1/wallets/{created['id']}"
    r = await client.get(r.headers["Location"])
    assert r.status == 200
    assert await r.json() == created
    r = await client.post("/api/v1/wallets", json={})
    assert r.status == 201


async def test_wallet_listing_pages_through_every_wallet_once(client: Client, pg: Any) -> None:
    created = {(await (await client.post("/api/v1/wallets")).json())["id"] for _ in range(7)}
    seen: list[str] = []
    url = "/api/v1/wallets?limit=3"
    while True:
        page = await (await client.get(url)).json()
        assert len(page["items"]) <= 3
        seen += [w["id"] for w in page["items"]]
        if page["next_cursor"] is None:
            break
        url = f"/api/v1/wallets?limit=3&cursor={page['next_cursor']}"
    assert len(seen) == len(set(seen))
    assert created <= set(seen)
    assert len(seen) == await pg.fetchval("SELECT count(*) FROM wallets")


async def test_history_is_newest_first_and_pages(client: Client, wallet: str) -> None:
    for amount in range(1, 6):
        await operate(client, wallet, "DEPOSIT", amount)
    await operate(client, wallet, "WITHDRAW", 100)  # refused, and recorded
    r = await client.get(f"/api/v1/wallets/{wallet}/operations?limit=4")
    first = await r.json()
    assert [o["seq"] for o in first["items"]] == [6, 5, 4, 3]
    assert first["items"][0]["status"] == "rejected"
    assert first["items"][0]["reason"] == "insufficient_funds"
    assert first["items"][1]["balance"] == "15.00"
    r = await client.get(f"/api/v1/wallets/{wallet}/operations?cursor={first['next_cursor']}")
    rest = await r.json()
    assert [o["seq"] for o in rest["items"]] == [2, 1]
    assert rest["next_cursor"] is None
    assert rest["items"][-1] == {
        "id": rest["items"][-1]["id"],
        "wallet_id": wallet,
        "operation_type": "DEPOSIT",
        "amount": "1.00",
        "status": "applied",
        "reason": None,
        "balance": "1.00",
        "seq": 1,
        "created_at": rest["items"][-1]["created_at"],
        "transfer_id": None,
        "counterparty": None,
        "hold_id": None,
        "available": "1.00",
    }


async def test_an_operation_reads_back_as_it_was_answered(client: Client, wallet: str) -> None:
    status, answered, headers = await operate(client, wallet, "DEPOSIT", "0.10")
    assert status == 200
    r = await client.get(f"/api/v1/wallets/{wallet}/operations/{answered['id']}")
    assert await r.json() == answered
    # without an Idempotency-Key the operation gets a fresh random UUID, the request an id
    assert str(uuid.UUID(answered["id"])) == answered["id"]
    assert uuid.UUID(answered["id"]).version == 4
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-ID"])
    # the wallet's id in another spelling names the same wallet
    r = await client.get(f"/api/v1/wallets/{wallet.upper()}/operations/{answered['id']}")
    assert await r.json() == answered


async def test_fresh_operation_ids_differ(client: Client, wallet: str) -> None:
    answers = await asyncio.gather(
        *(operate(client, wallet, "DEPOSIT", "0.01") for _ in range(300))
    )
    assert len({body["id"] for _, body, _ in answers}) == 300


async def test_the_original_form_and_the_alias_behave_alike(client: Client, wallet: str) -> None:
    r1 = await client.post(
        "/api/v1/wallet",
        json={"walletId": wallet, "operationType": "DEPOSIT", "amount": 2.5},
    )
    r2 = await client.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operation_type": "WITHDRAW", "amount": "0.50"},
    )
    assert (r1.status, r2.status) == (200, 200)
    assert (await r2.json())["balance"] == "2.00"


async def test_health_and_readiness(client: Client) -> None:
    assert (await client.get("/health")).status == 200
    r = await client.get("/ready")
    assert r.status == 200
    body = await r.json()
    assert body["checks"]["workers"] == "1 live"


async def test_ready_says_when_no_worker_is_alive(api: Client) -> None:
    r = await api.get("/ready")
    assert r.status == 503
    assert (await r.json(content_type=None))["checks"]["workers"] == "none alive"


async def test_balances_are_exact_across_many_small_amounts(client: Client, wallet: str) -> None:
    # 0.1 + 0.2 is not 0.3 in floating point; here it must be.
    results = await asyncio.gather(
        *(operate(client, wallet, "DEPOSIT", a) for a in ["0.10", "0.20"] * 50)
    )
    assert {s for s, _, _ in results} == {200}
    r = await client.get(f"/api/v1/wallets/{wallet}")
    assert (await r.json())["balance"] == "15.00"
