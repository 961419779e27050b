"""The row-lock reference: the usual design of this API, for the benchmark to compare with.

One asyncpg transaction per operation (SELECT ... FOR UPDATE, UPDATE, INSERT), and per
transfer (both rows locked in id order, both updated, two ledger rows), behind the same
HTTP shape as the service, on the same tables. It is lean on purpose (aiohttp,
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

from api.app import LISTEN_BACKLOG
from api.bodies import OperationRequest, TransferRequest, decode
from api.inputs import read_json_object
from shared.errors import InvalidInput
from shared.money import format_minor

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
