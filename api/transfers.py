"""Transfers between wallets: queued on the source's stream like its operations, answered once
both sides are committed (the steps: worker/transfers.py)."""

from __future__ import annotations

import contextlib
from typing import Any

from aiohttp import web

from api import queries
from api.appkeys import PG, QUEUE, REDIS
from api.bodies import Transfer, TransferRequest, decode, json_response
from api.inputs import idempotency_key, read_json_object, wallet_id_from_path
from api.operations import REPLAYED_HEADER, queue_and_await
from api.problems import error_response
from api.render import transfer_body, transfer_from_row
from api.wallets import ensure_exists, ensure_visible
from shared import errors
from shared.codec import (
    COMPLETED,
    INSUFFICIENT_FUNDS,
    KEY_REUSED,
    REJECTED,
    TRANSFER,
    TRANSFER_OUT,
    WALLET_NOT_FOUND,
    OperationRequest,
    Outcome,
    format_time,
)
from shared.connections import connection_from
from shared.ids import transfer_id_for
from shared.money import format_minor

# How long a queued transfer's source is kept for its URL, should its writer never delete it.
PENDING_KEPT_SECONDS = 24 * 3600
routes = web.RouteTableDef()


def transfer_url(transfer_id: str) -> str:
    return f"/api/v1/transfers/{transfer_id}"


@routes.post("/api/v1/transfers")
async def post_transfer(request: web.Request) -> web.Response:
    body = decode(await read_json_object(request), TransferRequest)
    source, destination, amount = str(body.from_), str(body.to), body.amount
    await ensure_visible(request, source, " (from)")
    await ensure_exists(request, destination, " (to)")
    transfer_id = transfer_id_for(source, idempotency_key(request))
    app = request.app
    # Its source, for its URL to find it queued, set in the same round trip as it is queued.
    mark = app[QUEUE].mark_pending_transfer(transfer_id, source, PENDING_KEPT_SECONDS)
    outcome = await queue_and_await(
        app,
        lambda channel, tag: OperationRequest(
            transfer_id,
            source,
            TRANSFER_OUT,
            amount,
            channel,
            tag,
            transfer_id=transfer_id,
            counterparty=destination,
        ),
        settled_outcome,
        before=[mark],
    )
    if outcome is None:
        url = transfer_url(transfer_id)
        pending = transfer_body(transfer_id, source, destination, amount, "pending")
        return json_response(pending, status=202, headers={"Location": url})
    return transfer_response(outcome)


def transfer_response(o: Outcome) -> web.Response:
    """The answer to a transfer once it is settled, or refused before it started."""
    if o.status == WALLET_NOT_FOUND:
        raise errors.WalletNotFound(f"No wallet has the id {o.wallet_id} (from)")
    if o.status == KEY_REUSED:
        raise errors.IdempotencyKeyReused(
            f"This Idempotency-Key was used for a transfer of {format_minor(o.amount)} to "
            f"{o.counterparty} from this wallet; send a new key for a different request",
            transfer_id=o.op_id,
        )
    headers = {REPLAYED_HEADER: "true"} if o.replayed else None
    body = transfer_body(
        o.transfer_id,
        o.wallet_id,
        o.counterparty,
        o.amount,
        "completed" if o.status == COMPLETED else "rejected",
        None if o.status == COMPLETED else o.reason,
        o.balance_after,
        o.created_at,
    )
    if o.status == COMPLETED:
        return json_response(body, headers=headers)
    error: errors.WalletError
    if o.reason == INSUFFICIENT_FUNDS:
        error = errors.InsufficientFunds(
            f"The source's available funds are less than the {body.amount} to transfer "
            f"(its balance is {body.balance})",
            transfer=body,
        )
    elif o.reason == WALLET_NOT_FOUND:
        error = errors.WalletNotFound(
            f"No wallet has the id {o.counterparty} (to); the amount is back in {o.wallet_id}",
            transfer=body,
        )
    else:
        error = errors.BalanceLimitExceeded(
            f"A credit of {body.amount} would take the balance of {o.counterparty} past its "
            f"limit; the amount is back in {o.wallet_id}",
            transfer=body,
        )
    response = error_response(error, headers=headers)
    response.headers["Location"] = transfer_url(o.transfer_id)
    return response


async def settled_outcome(conn: Any, queued: OperationRequest) -> Outcome | None:
    """The transfer's outcome as PostgreSQL holds it, once it is settled (else None: its
    reply is still to come)."""
    row = await queries.get_transfer(conn, queued.transfer_id)
    if row is None:
        return None
    if (row["destination_id"], row["amount"]) != (queued.counterparty, queued.amount):
        return Outcome(
            queued.tag,
            queued.op_id,
            queued.wallet_id,
            KEY_REUSED,
            TRANSFER_OUT,
            row["amount"],
            transfer_id=queued.transfer_id,
            counterparty=row["destination_id"],
        )
    if row["status"] not in (COMPLETED, REJECTED):
        return None
    return Outcome(
        queued.tag,
        queued.op_id,
        queued.wallet_id,
        row["status"],
        TRANSFER,
        row["amount"],
        row["source_balance_after"],
        row["reason"],
        format_time(row["created_at"]),
        transfer_id=queued.transfer_id,
        counterparty=row["destination_id"],
    )


@routes.get("/api/v1/transfers/{transfer_id}")
async def get_transfer(request: web.Request) -> web.Response:
    """Where the transfer stands: pending while it waits in its source's stream, then as
    PostgreSQL holds it."""
    raw = request.match_info["transfer_id"]
    try:
        transfer_id = wallet_id_from_path(raw)
    except errors.WalletNotFound:
        raise errors.TransferNotFound(f"No transfer has the id {raw!r}") from None
    app = request.app
    # The queue first: an entry leaves it only after its COMMIT, so in this order a
    # transfer is always found in one place or the other.
    queue = app[QUEUE]
    source = await queue.pending_transfer_source(app[REDIS], transfer_id)
    queued = await queue.find_queued(app[REDIS], source, transfer_id) if source else None
    async with connection_from(app[PG]) as conn:
        row = await queries.get_transfer(conn, transfer_id)
    if row is not None:
        body = transfer_from_row(row)
    elif queued is not None:
        body = transfer_body(
            transfer_id, queued.wallet_id, queued.counterparty, queued.amount, "pending"
        )
    else:
        raise errors.TransferNotFound(f"No transfer has the id {transfer_id}")
    await ensure_party(request, body)
    return json_response(body)


async def ensure_party(request: web.Request, transfer: Transfer) -> None:
    """With authentication on, a transfer exists only for the owners of its two wallets."""
    for wallet in (transfer.from_, transfer.to):
        with contextlib.suppress(errors.WalletNotFound):
            await ensure_visible(request, wallet)
            return
    raise errors.TransferNotFound(f"No transfer has the id {transfer.id}")
