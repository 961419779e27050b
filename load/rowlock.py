"""The row-lock reference: the usual design of this API, for the benchmark to compare with.

One asyncpg transaction per operation (SELECT ... FOR UPDATE, UPDATE, INSERT), per
transfer (both rows locked in id order, both updated, two ledger rows), and per hold placed
or captured (the wallet's row locked, the hold's row written), behind the same HTTP shape
as the service, on the same tables. It is lean on purpose (aiohttp,
asyncpg, uvloop, orjson, no ORM), so the comparison is of designs, not of frameworks.
Run: DATABASE_URL=... PORT=8001 python -m load.rowlock (REUSE_PORT=true: several processes
may share the port, as the service's API processes may).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
import uvloop
from aiohttp import web
from msgspec import UNSET

from api.app import LISTEN_BACKLOG
from api.bodies import CaptureRequest, HoldRequest, OperationRequest, TransferRequest, decode
from api.inputs import idempotency_key, read_json_object
from shared.errors import InvalidInput
from shared.ids import hold_id_for
from shared.money import format_minor
from shared.settings import Settings

POOL = web.AppKey("pool", asyncpg.Pool)
routes = web.RouteTableDef()


def reply(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


@routes.post("/api/v1/wallets")
async def create_wallet(request: web.Request) -> web.Response:
    wallet_id = await request.app[POOL].fetchval(
        "INSERT INTO wallets DEFAULT VALUES RETURNING id::text"
    )
    return reply({"id": wallet_id, "balance": "0.00"}, status=201)


@routes.get("/api/v1/wallets/{wallet_id}")
async def get_wallet(request: web.Request) -> web.Response:
    row = await request.app[POOL].fetchrow(
        "SELECT id::text, balance FROM wallets WHERE id = $1", request.match_info["wallet_id"]
    )
    if row is None:
        return reply({"status": 404}, status=404)
    return reply({"id": row["id"], "balance": format_minor(row["balance"])})


@routes.post("/api/v1/wallets/{wallet_id}/operation")
async def operate(request: web.Request) -> web.Response:
    wallet_id = request.match_info["wallet_id"]
    try:
        request_body = decode(await read_json_object(request), OperationRequest)
        kind, amount = request_body.kind, request_body.amount
    except InvalidInput as e:
        return reply({"status": 422, "detail": e.detail}, status=422)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT balance, op_seq FROM wallets WHERE id = $1 FOR UPDATE", wallet_id
        )
        if row is None:
            return reply({"status": 404}, status=404)
        balance, seq = row["balance"], row["op_seq"] + 1
        if kind == "WITHDRAW" and balance < amount:
            status, reason = "rejected", "insufficient_funds"
        else:
            balance += amount if kind == "DEPOSIT" else -amount
            status, reason = "applied", None
        await conn.execute(
            "UPDATE wallets SET balance = $2, op_seq = $3, updated_at = now() WHERE id = $1",
            wallet_id,
            balance,
            seq,
        )
        op_id = str(uuid.uuid4())
        await conn.execute(
            "INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason,"
            " balance_after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            wallet_id,
            seq,
            op_id,
            kind,
            amount,
            status,
            reason,
            balance,
        )
    body = {
        "id": op_id,
        "operation_type": kind,
        "amount": format_minor(amount),
        "balance": format_minor(balance),
        "status": status,
    }
    return reply(body, status=200 if status == "applied" else 409)


@routes.post("/api/v1/transfers")
async def transfer(request: web.Request) -> web.Response:
    """As a typical implementation moves money: one transaction that locks both rows in id
    order (two transfers between the same wallets in opposite directions cannot deadlock),
    then updates both balances and inserts two ledger rows."""
    try:
        body = decode(await read_json_object(request), TransferRequest)
    except InvalidInput as e:
        return reply({"status": 422, "detail": e.detail}, status=422)
    source, destination, amount = str(body.from_), str(body.to), body.amount
    transfer_id = str(uuid.uuid4())
    async with request.app[POOL].acquire() as conn, conn.transaction():
        rows = await conn.fetch(
            "SELECT id::text, balance, op_seq FROM wallets WHERE id = any($1::uuid[])"
            " ORDER BY id FOR UPDATE",
            [source, destination],
        )
        found = {r["id"]: r for r in rows}
        if len(found) != 2:
            return reply({"status": 404}, status=404)
        balance = found[source]["balance"]
        if balance < amount:
            return reply({"status": 409, "reason": "insufficient_funds"}, status=409)
        legs = [
            (source, "TRANSFER_OUT", -amount, destination),
            (destination, "TRANSFER_IN", amount, source),
        ]
        for wallet, kind, change, counterparty in legs:
            seq = found[wallet]["op_seq"] + 1
            after = found[wallet]["balance"] + change
            await conn.execute(
                "UPDATE wallets SET balance = $2, op_seq = $3, updated_at = now() WHERE id = $1",
                wallet,
                after,
                seq,
            )
            await conn.execute(
                "INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason,"
                " balance_after, transfer_id, counterparty)"
                " VALUES ($1, $2, $3, $4, $5, 'applied', NULL, $6, $3, $7)",
                wallet,
                seq,
                transfer_id,
                kind,
                amount,
                after,
                counterparty,
            )
    body_out = {
        "id": transfer_id,
        "from": source,
        "to": destination,
        "amount": format_minor(amount),
        "status": "completed",
        "balance": format_minor(balance - amount),
    }
    return reply(body_out)


@routes.post("/api/v1/wallets/{wallet_id}/holds")
async def place_hold(request: web.Request) -> web.Response:
    """Locks the wallet's row, reserves the amount if available (balance - held) covers
    it, and records the hold and its ledger row (a refused hold is recorded as refused, as
    the service records it)."""
    wallet_id = request.match_info["wallet_id"]
    try:
        body = decode(await read_json_object(request), HoldRequest)
        hold_id = hold_id_for(wallet_id, idempotency_key(request))
    except InvalidInput as e:
        return reply({"status": 422, "detail": e.detail}, status=422)
    amount = body.amount
    expires_in = Settings.hold_expires_default if body.expires_in is UNSET else body.expires_in
    async with request.app[POOL].acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT balance, held, op_seq FROM wallets WHERE id = $1 FOR UPDATE", wallet_id
        )
        if row is None:
            return reply({"status": 404}, status=404)
        balance, held, seq = row["balance"], row["held"], row["op_seq"] + 1
        if balance - held < amount:
            status, reason = "rejected", "insufficient_funds"
        else:
            held += amount
            status, reason = "applied", None
            # Shard -1: no worker's, so the service beside it on these tables never
            # expires the reference's holds.
            await conn.execute(
                "INSERT INTO holds (wallet_id, id, amount, status, expires_at, shard)"
                " VALUES ($1, $2, $3, 'held', now() + make_interval(secs => $4), -1)",
                wallet_id,
                hold_id,
                amount,
                expires_in,
            )
        await hold_step(conn, wallet_id, seq, hold_id, "HOLD", amount, reason, balance, held)
    body_out = hold_reply(hold_id, wallet_id, amount, status, balance, held)
    return reply(body_out, status=201 if reason is None else 409)


@routes.post("/api/v1/holds/{hold_id}/capture")
async def capture_hold(request: web.Request) -> web.Response:
    """Locks the hold's wallet's row, then captures the hold if it is still held and not
    past its expiry (the reference expires nothing by itself: a hold past it is refused)."""
    hold_id = request.match_info["hold_id"]
    try:
        raw = await read_json_object(request) if request.body_exists else {}
        body = decode(raw, CaptureRequest)
        if body.to is not UNSET:
            raise InvalidInput("to", "the reference pays no wallet")
    except InvalidInput as e:
        return reply({"status": 422, "detail": e.detail}, status=422)
    async with request.app[POOL].acquire() as conn, conn.transaction():
        wallet = await conn.fetchrow(
            "SELECT id::text, balance, held, op_seq FROM wallets"
            " WHERE id = (SELECT wallet_id FROM holds WHERE id = $1) FOR UPDATE",
            hold_id,
        )
        if wallet is None:
            return reply({"status": 404}, status=404)
        # Read once the wallet is locked: a hold ends only under its wallet's lock.
        hold = await conn.fetchrow(
            "SELECT amount, status = 'held' AND expires_at > now() AS active FROM holds"
            " WHERE wallet_id = $1 AND id = $2",
            wallet["id"],
            hold_id,
        )
        if not hold["active"]:
            return reply({"status": 409, "reason": "hold_not_active"}, status=409)
        amount = hold["amount"] if body.amount is UNSET else body.amount
        if amount > hold["amount"]:
            return reply({"status": 422, "detail": "above the held amount"}, status=422)
        balance, held = wallet["balance"] - amount, wallet["held"] - hold["amount"]
        await conn.execute(
            "UPDATE holds SET status = 'captured', captured = $3, updated_at = now()"
            " WHERE wallet_id = $1 AND id = $2",
            wallet["id"],
            hold_id,
            amount,
        )
        seq = wallet["op_seq"] + 1
        await hold_step(
            conn, wallet["id"], seq, hold_id, "HOLD_CAPTURE", amount, None, balance, held
        )
    return reply(hold_reply(hold_id, wallet["id"], amount, "captured", balance, held))


async def hold_step(
    conn: Any,
    wallet_id: str,
    seq: int,
    hold_id: str,
    kind: str,
    amount: int,
    reason: str | None,
    balance: int,
    held: int,
) -> None:
    """The wallet as a hold's step leaves it, and the step's ledger row (a placed hold's
    under the hold's id, as the service records it)."""
    await conn.execute(
        "UPDATE wallets SET balance = $2, held = $3, op_seq = $4, updated_at = now() WHERE id = $1",
        wallet_id,
        balance,
        held,
        seq,
    )
    await conn.execute(
        "INSERT INTO operations (wallet_id, seq, id, kind, amount, status, reason,"
        " balance_after, hold_id, held_after) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        wallet_id,
        seq,
        hold_id if kind == "HOLD" else str(uuid.uuid4()),
        kind,
        amount,
        "applied" if reason is None else "rejected",
        reason,
        balance,
        hold_id,
        held,
    )


def hold_reply(
    hold_id: str, wallet_id: str, amount: int, status: str, balance: int, held: int
) -> dict[str, Any]:
    return {
        "id": hold_id,
        "wallet_id": wallet_id,
        "amount": format_minor(amount),
        "status": status,
        "balance": format_minor(balance),
        "available": format_minor(balance - held),
    }


async def pool(app: web.Application) -> AsyncIterator[None]:
    app[POOL] = await asyncpg.create_pool(
        os.environ["DATABASE_URL"], min_size=1, max_size=int(os.environ.get("PG_POOL_MAX", "10"))
    )
    yield
    await app[POOL].close()


def main() -> None:
    app = web.Application()
    app.add_routes(routes)
    app.cleanup_ctx.append(pool)
    # handler_cancellation: a request whose client gave up stops queuing on the row lock,
    # so an overloaded phase does not go on loading the machine after it ends.
    web.run_app(
        app,
        handler_cancellation=True,
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8001")),
        reuse_port=os.environ.get("REUSE_PORT", "false").lower() == "true",  # as the service
        backlog=LISTEN_BACKLOG,  # as the service's
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
