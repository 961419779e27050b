"""Operations: deposit and withdraw through the wallet's queue, and read the ledger."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from redis.exceptions import TimeoutError as RedisTimeoutError

from api import queries
from api.appkeys import DEADLINES, ENQUEUE, METRICS, PG, QUEUE, REDIS, REPLIES, SETTINGS
from api.bodies import (
    OperationFormRequest,
    OperationPage,
    OperationRequest,
    Pending,
    decode,
    json_response,
)
from api.inputs import (
    OPERATIONS_CURSOR,
    cursor,
    operation_id,
    page_limit,
    read_json_object,
    wallet_id_from_path,
)
from api.problems import error_response
from api.render import operation_body, outcome_from_row
from api.replies import RepliesMissed
from api.wallets import ensure_visible
from shared import errors, logs
from shared.codec import (
    APPLIED,
    BALANCE_LIMIT,
    KEY_REUSED,
    WALLET_NOT_FOUND,
    Kind,
    Outcome,
    Status,
    key_reused,
)
from shared.codec import (
    OperationRequest as QueuedOperation,
)
from shared.connections import connection_from
from shared.money import format_minor

REPLAYED_HEADER = "Idempotent-Replayed"
LEDGER_POLL_SECONDS = 0.02  # between looks at the ledger for a retried transfer in flight
routes = web.RouteTableDef()


def operation_url(wallet_id: str, op_id: str) -> str:
    return f"/api/v1/wallets/{wallet_id}/operations/{op_id}"


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
            f"A deposit of {body.amount} would take the balance of {body.balance} past its limit",
            operation=body,
        )
    else:
        error = errors.InsufficientFunds(
            f"The available funds of {body.available} are less than the {body.amount} to "
            + ("hold" if o.kind == Kind.HOLD else "withdraw"),
            operation=body,
        )
    response = error_response(error, headers=headers)
    response.headers["Location"] = operation_url(o.wallet_id, o.op_id)
    return response


def pending_response(wallet_id: str, op_id: str) -> web.Response:
    url = operation_url(wallet_id, op_id)
    return json_response(
        Pending(op_id, wallet_id, "pending", url), status=202, headers={"Location": url}
    )


async def submit_operation(
    request: web.Request, wallet_id: str, kind: str, amount: int
) -> web.Response:
    """Queues the operation on the wallet's stream and answers with the writer's outcome, or
    202 with the operation's URL when it does not come within the reply timeout."""
    await ensure_visible(request, wallet_id)
    op_id = operation_id(request)
    outcome = await queue_and_await(
        request.app,
        lambda channel, tag: QueuedOperation(op_id, wallet_id, kind, amount, channel, tag),
        recorded_outcome,
    )
    return pending_response(wallet_id, op_id) if outcome is None else outcome_response(outcome)


# What PostgreSQL holds of a queued operation, if it decides it: its outcome.
LookUp = Callable[[Any, QueuedOperation], Awaitable[Outcome | None]]


async def queue_and_await(
    app: web.Application,
    make: Callable[[str, int], QueuedOperation],
    look_up: LookUp,
    before: Sequence[tuple[Any, ...]] = (),
) -> Outcome | None:
    """Queues the operation `make` gives (for this process's reply channel and the tag its
    reply will carry) on its wallet's stream, after the Redis commands `before` in the same
    round trip, and returns the outcome the writer replies; None when none comes within the
    reply timeout (it may be queued, even applied)."""
    settings, replies = app[SETTINGS], app[REPLIES]
    if not replies.subscribed.is_set():
        raise errors.DependencyUnavailable("The reply channel to the workers is down")
    tag, outcome = replies.expect()
    try:
        queued = make(replies.channel, tag)
        logs.OPERATION_ID.set(queued.op_id)  # on every log line about this request from here
        # One bound for the whole request: queueing it and waiting for its outcome.
        async with app[DEADLINES].bound():
            enqueue = app[QUEUE].enqueue(
                queued, settings.wallet_queue_limit, settings.shard_queue_limit
            )
            entry = await app[ENQUEUE](enqueue, before)
            if entry is None:
                raise errors.QueueFull(
                    f"The queue of this wallet (at most {settings.wallet_queue_limit} "
                    f"operations) or of its shard (at most {settings.shard_queue_limit}) is "
                    "full; retry later"
                )
            return await awaited_outcome(app, queued, outcome, look_up)
    except (TimeoutError, RedisTimeoutError):
        app[METRICS].reply_timeouts.inc()
        return None
    finally:
        replies.forget(tag)


async def awaited_outcome(
    app: web.Application,
    queued: QueuedOperation,
    outcome: asyncio.Future[Outcome],
    look_up: LookUp,
) -> Outcome:
    """The writer's reply; or, if the reply channel was lost while it was awaited, what
    PostgreSQL holds, or else the reply still to come."""
    while True:
        try:
            answer = await outcome
            if answer.status == Status.IN_LEDGER:
                return await settled_in_ledger(app, queued, look_up)
            return answer
        except RepliesMissed:
            # Waiting again before looking: a reply arriving meanwhile is not dropped.
            outcome = app[REPLIES].expect_again(queued.tag)
            async with connection_from(app[PG]) as conn:
                found = await look_up(conn, queued)
            if found is not None:
                return found


async def settled_in_ledger(
    app: web.Application, queued: QueuedOperation, look_up: LookUp
) -> Outcome:
    """A retry of what was decided before: its outcome as PostgreSQL holds it, once it does
    (a transfer in flight settles in milliseconds; the request's bound ends the wait)."""
    while True:
        async with connection_from(app[PG]) as conn:
            found = await look_up(conn, queued)
        if found is not None:
            return dataclasses.replace(found, replayed=True)
        await asyncio.sleep(LEDGER_POLL_SECONDS)


async def recorded_outcome(conn: Any, queued: QueuedOperation) -> Outcome | None:
    row = await queries.get_operation(conn, queued.wallet_id, queued.op_id)
    if row is None:
        return None
    return key_reused(queued, row) or outcome_from_row(row)


@routes.post("/api/v1/wallets/{wallet_id}/operation")
async def post_operation(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    body = decode(await read_json_object(request), OperationRequest)
    return await submit_operation(request, wallet_id, body.kind, body.amount)


@routes.post("/api/v1/wallet")
async def post_operation_form(request: web.Request) -> web.Response:
    """The original form of the operation request: the wallet id travels in the body."""
    body = decode(await read_json_object(request), OperationFormRequest)
    return await submit_operation(request, str(body.walletId), body.kind, body.amount)


@routes.get("/api/v1/wallets/{wallet_id}/operations")
async def list_operations(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    limit = page_limit(request)
    before = cursor(request, OPERATIONS_CURSOR)
    await ensure_visible(request, wallet_id)
    async with connection_from(request.app[PG]) as conn:
        rows = await queries.list_operations(
            conn, wallet_id, limit, int(before) if before else None
        )
        if not rows and await queries.get_wallet(conn, wallet_id) is None:
            raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")
    next_cursor = str(rows[-1]["seq"]) if len(rows) == limit else None
    return json_response(
        OperationPage([operation_body(outcome_from_row(r)) for r in rows], next_cursor)
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
    async with connection_from(request.app[PG]) as conn:
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


async def is_queued(app: web.Application, wallet_id: str, op_id: str) -> bool:
    return await app[QUEUE].find_queued(app[REDIS], wallet_id, op_id) is not None
