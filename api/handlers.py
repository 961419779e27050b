"""The HTTP handlers and their route table."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api import queries
from api.appkeys import ENQUEUE, KEYS, METRICS, OWNERS, PG, REDIS, REPLIES, SETTINGS
from api.auth import USER
from api.inputs import (
    FORM_FIELDS,
    OPERATION_FIELDS,
    decode_cursor,
    encode_cursor,
    operation_fields,
    operation_id,
    page_limit,
    read_json_object,
    uuid_field,
    wallet_id_from_path,
)
from api.problems import DEPENDENCY_ERRORS, error_response, problem
from shared import errors, logs
from shared.codec import (
    APPLIED,
    BALANCE_LIMIT,
    KEY_REUSED,
    WALLET_NOT_FOUND,
    MessageError,
    OperationRequest,
    Outcome,
    decode_request,
    encode_request,
    format_time,
    ledger_outcome,
    to_json,
)
from shared.money import format_minor

REPLAYED_HEADER = "Idempotent-Replayed"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
QUEUE_SCAN_CHUNK = 500
routes = web.RouteTableDef()
OWNERS_REMEMBERED = 100_000  # wallet id -> owner id, per API process


def json_response(
    body: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=to_json(body), status=status, content_type="application/json", headers=headers
    )


def wallet_body(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "balance": format_minor(row["balance"]),
        "created_at": format_time(row["created_at"]),
        "updated_at": format_time(row["updated_at"]),
    }


def operation_url(wallet_id: str, op_id: str) -> str:
    return f"/api/v1/wallets/{wallet_id}/operations/{op_id}"


def operation_body(o: Outcome) -> dict[str, Any]:
    return {
        "id": o.op_id,
        "wallet_id": o.wallet_id,
        "operation_type": o.kind,
        "amount": format_minor(o.amount),
        "status": o.status,
        "reason": o.reason,
        "balance": format_minor(o.balance_after),
        "seq": o.seq,
        "created_at": o.created_at,
    }


def outcome_from_row(row: Any) -> Outcome:
    return ledger_outcome(
        row, op_id=row["id"], wallet_id=row["wallet_id"], created_at=format_time(row["created_at"])
    )


def outcome_response(o: Outcome) -> web.Response:
    """The answer to an operation, the same however often its outcome is asked for."""
    headers = {REPLAYED_HEADER: "true"} if o.replayed else None
    if o.status == APPLIED:
        return json_response(operation_body(o), headers=headers)
    if o.status == WALLET_NOT_FOUND:
        return error_response(errors.WalletNotFound(f"No wallet has the id {o.wallet_id}"))
    if o.status == KEY_REUSED:
        return error_response(
            errors.IdempotencyKeyReused(
                f"This Idempotency-Key was used for a {o.kind} of {format_minor(o.amount)} on "
                "this wallet; send a new key for a different request",
                operation_id=o.op_id,
            )
        )
    body = operation_body(o)
    if o.reason == BALANCE_LIMIT:
        error: errors.WalletError = errors.BalanceLimitExceeded(
            f"A deposit of {body['amount']} would take the balance of {body['balance']} past "
            "its limit",
            operation=body,
        )
    else:
        error = errors.InsufficientFunds(
            f"The balance of {body['balance']} is less than the {body['amount']} to withdraw",
            operation=body,
        )
    response = error_response(error, headers=headers)
    response.headers["Location"] = operation_url(o.wallet_id, o.op_id)
    return response


def pending_response(wallet_id: str, op_id: str) -> web.Response:
    url = operation_url(wallet_id, op_id)
    return json_response(
        {"id": op_id, "wallet_id": wallet_id, "status": "pending", "href": url},
        status=202,
        headers={"Location": url},
    )


async def submit_operation(
    request: web.Request, wallet_id: str, kind: str, amount: int
) -> web.Response:
    """Queues the operation on the wallet's stream and answers with the writer's outcome, or
    202 with the operation's URL when it does not come within the reply timeout."""
    app = request.app
    settings, keys, replies = app[SETTINGS], app[KEYS], app[REPLIES]
    await ensure_visible(request, wallet_id)
    op_id = operation_id(request)
    logs.OPERATION_ID.set(op_id)  # on every log line about this request from here on
    if not replies.subscribed.is_set():
        raise errors.DependencyUnavailable("The reply channel to the workers is down")
    tag, outcome = replies.expect()
    try:
        message = encode_request(
            OperationRequest(op_id, wallet_id, kind, amount, replies.channel, tag)
        )
        try:
            entry = await app[ENQUEUE](
                keys=keys.enqueue_keys(wallet_id),
                args=[
                    wallet_id,
                    message,
                    settings.wallet_queue_limit,
                    settings.shard_queue_limit,
                ],
            )
        except RedisTimeoutError:
            # Redis may have queued it: the operation's URL will tell.
            return pending_response(wallet_id, op_id)
        if entry is None:
            raise errors.QueueFull(
                f"The queue of this wallet (at most {settings.wallet_queue_limit} operations) "
                f"or of its shard (at most {settings.shard_queue_limit}) is full; retry later"
            )
        try:
            async with asyncio.timeout(settings.reply_timeout):
                return outcome_response(await outcome)
        except TimeoutError:
            app[METRICS].reply_timeouts.inc()
            return pending_response(wallet_id, op_id)
    finally:
        replies.forget(tag)


@routes.post("/api/v1/wallets/{wallet_id}/operation")
async def post_operation(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    kind, amount = operation_fields(await read_json_object(request), OPERATION_FIELDS)
    return await submit_operation(request, wallet_id, kind, amount)


@routes.post("/api/v1/wallet")
async def post_operation_form(request: web.Request) -> web.Response:
    """The original form of the operation request: the wallet id travels in the body."""
    body = await read_json_object(request)
    kind, amount = operation_fields(body, FORM_FIELDS)
    return await submit_operation(request, uuid_field(body, "walletId"), kind, amount)


@routes.post("/api/v1/wallets")
async def create_wallet(request: web.Request) -> web.Response:
    if request.can_read_body:
        body = await read_json_object(request)
        if body:
            raise errors.InvalidInput(sorted(body)[0], "is not a known field")
    user = request.get(USER)
    async with request.app[PG].acquire() as conn:
        row = await queries.create_wallet(conn, user.user_id if user else None)
    return json_response(
        wallet_body(row), status=201, headers={"Location": f"/api/v1/wallets/{row['id']}"}
    )


@routes.get("/api/v1/wallets")
async def list_wallets(request: web.Request) -> web.Response:
    limit = page_limit(request)
    cursor = decode_cursor(request, int, str)
    after = None
    if cursor is not None:
        micros, last_id = cursor
        try:
            after = (EPOCH + timedelta(microseconds=micros), wallet_id_from_path(last_id))
        except (OverflowError, errors.WalletNotFound):
            raise errors.InvalidInput("cursor", "is not a cursor this API returned") from None
    async with request.app[PG].acquire() as conn:
        rows = await queries.list_wallets(conn, limit, after, owner_filter(request))
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]
        # Exact microseconds: a float would round some and skip or repeat wallets.
        micros = (last["created_at"] - EPOCH) // timedelta(microseconds=1)
        next_cursor = encode_cursor(micros, last["id"])
    return json_response({"items": [wallet_body(r) for r in rows], "next_cursor": next_cursor})


@routes.get("/api/v1/wallets/{wallet_id}")
async def get_wallet(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    async with request.app[PG].acquire() as conn:
        row = await queries.get_wallet(conn, wallet_id)
    if row is None or not may_see(request, row["owner_id"]):
        raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")
    return json_response(wallet_body(row))


@routes.get("/api/v1/wallets/{wallet_id}/operations")
async def list_operations(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    limit = page_limit(request)
    cursor = decode_cursor(request, int)
    await ensure_visible(request, wallet_id)
    async with request.app[PG].acquire() as conn:
        rows = await queries.list_operations(conn, wallet_id, limit, cursor[0] if cursor else None)
        if not rows and await queries.get_wallet(conn, wallet_id) is None:
            raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")
    next_cursor = encode_cursor(rows[-1]["seq"]) if len(rows) == limit else None
    return json_response(
        {
            "items": [operation_body(outcome_from_row(r)) for r in rows],
            "next_cursor": next_cursor,
        }
    )


@routes.get("/api/v1/wallets/{wallet_id}/operations/{operation_id}")
async def get_operation(request: web.Request) -> web.Response:
    """An operation's outcome; `pending` while it waits in the wallet's stream."""
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    raw_id = request.match_info["operation_id"]
    try:
        op_id = wallet_id_from_path(raw_id)
    except errors.WalletNotFound:
        raise errors.OperationNotFound(f"No operation has the id {raw_id!r}") from None
    await ensure_visible(request, wallet_id)
    # The stream first: an entry leaves it only after its COMMIT, so in this order an
    # operation is always found in one place or the other.
    queued = await is_queued(request.app, wallet_id, op_id)
    async with request.app[PG].acquire() as conn:
        row = await queries.get_operation(conn, wallet_id, op_id)
        if row is None and not queued and await queries.get_wallet(conn, wallet_id) is None:
            raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")
    if row is not None:
        return json_response(operation_body(outcome_from_row(row)))
    if queued:
        response = pending_response(wallet_id, op_id)
        response.set_status(200)
        return response
    raise errors.OperationNotFound(f"Wallet {wallet_id} has no operation {op_id}")


def owner_filter(request: web.Request) -> str | None:
    """Whose wallets the request may list: the user's, or everyone's (None)."""
    if not request.app[SETTINGS].auth_enabled:  # request.get() costs a KeyError
        return None
    user = request.get(USER)
    return None if user is None or user.admin else user.user_id


def may_see(request: web.Request, owner_id: str | None) -> bool:
    scope = owner_filter(request)
    return scope is None or scope == owner_id


async def ensure_visible(request: web.Request, wallet_id: str) -> None:
    """With authentication on, another user's wallet does not exist for this request: 404,
    the same answer as for no wallet at all. A wallet's owner never changes, so each API
    process remembers the owners it has looked up."""
    scope = owner_filter(request)
    if scope is None:
        return
    owners = request.app[OWNERS]
    owner = owners.get(wallet_id)
    if owner is None:
        async with request.app[PG].acquire() as conn:
            row = await queries.get_wallet(conn, wallet_id)
        owner = row["owner_id"] if row else None
        if owner is not None:
            if len(owners) >= OWNERS_REMEMBERED:
                del owners[next(iter(owners))]
            owners[wallet_id] = owner
    if owner != scope:
        raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")


async def is_queued(app: web.Application, wallet_id: str, op_id: str) -> bool:
    """Whether the wallet's stream holds the operation. Reads it in chunks and decodes only
    the messages that hold the id's bytes."""
    stream, needle, start = app[KEYS].wallet_stream(wallet_id), op_id.encode(), "-"
    while True:
        chunk: Any = await app[REDIS].xrange(stream, min=start, count=QUEUE_SCAN_CHUNK)
        for _, fields in chunk:
            message = fields.get(b"m", b"")
            if needle in message:
                with contextlib.suppress(MessageError):
                    if decode_request(message).op_id == op_id:
                        return True
        if len(chunk) < QUEUE_SCAN_CHUNK:
            return False
        start = "(" + chunk[-1][0].decode()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Ready when PostgreSQL and Redis answer and at least one worker is alive."""
    app = request.app
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            async with app[PG].acquire() as conn:
                await conn.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except DEPENDENCY_ERRORS as e:
        checks["postgres"] = f"unavailable: {type(e).__name__}"
    try:
        async with asyncio.timeout(2):
            live = await app[REDIS].zcount(app[KEYS].workers(), int(time.time() * 1000), "+inf")
        checks["redis"] = "ok"
        checks["workers"] = f"{live} live" if live else "none alive"
    except (RedisError, OSError, TimeoutError) as e:
        checks["redis"] = f"unavailable: {type(e).__name__}"
        checks["workers"] = "unknown"
    if not app[REPLIES].subscribed.is_set():
        checks["replies"] = "reply channel not subscribed"
    if all(v == "ok" or v.endswith(" live") for v in checks.values()):
        return json_response({"status": "ready", "checks": checks})
    return problem(503, "not-ready", "Not ready", "A dependency is missing", checks=checks)
