"""Holds: placed, captured and voided through the wallet's queue like its operations, decided
by the wallet's writer (worker/holds.py); expired by the owner of its shard
(worker/expiries.py)."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from msgspec import UNSET

from api import queries
from api.appkeys import HOLD_WALLETS, PG, SETTINGS
from api.bodies import CaptureRequest, HoldPage, HoldRequest, Pending, decode, json_response
from api.inputs import (
    WALLETS_CURSOR,
    cursor,
    idempotency_key,
    next_time_cursor,
    page_limit,
    read_json_object,
    time_cursor,
    wallet_id_from_path,
)
from api.operations import REPLAYED_HEADER, outcome_response, queue_and_await, recorded_outcome
from api.render import (
    HoldFacts,
    hold_body,
    hold_facts,
    hold_from_outcome,
    hold_url,
    time_of_ms,
)
from api.wallets import ensure_exists, ensure_visible, remember
from shared import errors
from shared.codec import (
    APPLIED,
    HOLD_ENDINGS,
    KEY_REUSED,
    WALLET_NOT_FOUND,
    HoldStatus,
    Kind,
    OperationRequest,
    Outcome,
    Status,
)
from shared.connections import connection_from
from shared.ids import capture_transfer_id, hold_id_for, hold_step_id
from shared.money import format_minor

routes = web.RouteTableDef()
HOLD_STATUSES = tuple(map(str, HoldStatus))
# The outcomes that end a hold paid to nobody (a capture paid to a wallet is answered by
# its transfer's outcome).
ENDED_HERE = (Kind.HOLD_CAPTURE, Kind.HOLD_VOID)


def hold_id_from_path(raw: str) -> str:
    try:
        return wallet_id_from_path(raw)
    except errors.WalletNotFound:
        raise errors.HoldNotFound(f"No hold has the id {raw!r}") from None


@routes.post("/api/v1/wallets/{wallet_id}/holds")
async def place_hold(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    body = decode(await read_json_object(request), HoldRequest)
    settings = request.app[SETTINGS]
    expires_in = settings.hold_expires_default if body.expires_in is UNSET else body.expires_in
    if expires_in > settings.hold_expires_max:
        raise errors.InvalidInput(
            "expires_in", f"must be at most {settings.hold_expires_max} seconds"
        )
    await ensure_visible(request, wallet_id)
    hold_id = hold_id_for(wallet_id, idempotency_key(request))
    expires_at = int(time.time() * 1000) + expires_in * 1000
    outcome = await queue_and_await(
        request.app,
        lambda channel, tag: OperationRequest(
            hold_id,
            wallet_id,
            Kind.HOLD,
            body.amount,
            channel,
            tag,
            hold_id=hold_id,
            expires_at=expires_at,
        ),
        recorded_outcome,
    )
    if outcome is None:
        return _pending(hold_id, wallet_id)
    if outcome.status != APPLIED:
        return outcome_response(outcome)
    headers = {"Location": hold_url(hold_id)}
    if outcome.replayed:  # placed before: as it is now
        headers[REPLAYED_HEADER] = "true"
        return json_response(hold_body(await _hold_row(request, hold_id)), 201, headers)
    facts = HoldFacts(wallet_id, outcome.amount, time_of_ms(expires_at), outcome.created_at)
    remember(request.app[HOLD_WALLETS], hold_id, facts)
    held = hold_from_outcome(hold_id, facts, outcome, HoldStatus.HELD)
    return json_response(held, status=201, headers=headers)


@routes.post("/api/v1/holds/{hold_id}/capture")
async def capture_hold(request: web.Request) -> web.Response:
    hold_id = hold_id_from_path(request.match_info["hold_id"])
    body = decode(await _optional_json(request), CaptureRequest)
    facts = await _hold_of(request, hold_id)
    wallet_id, held = facts.wallet_id, facts.amount
    amount = held if body.amount is UNSET else body.amount
    if amount > held:
        raise errors.InvalidInput("amount", f"must be at most the held {format_minor(held)}")
    to = "" if body.to is UNSET else str(body.to)
    if to == wallet_id:
        raise errors.InvalidInput("to", "must be another wallet than the hold's")
    if to:
        await ensure_exists(request, to, " (to)")
    return await _end_hold(request, hold_id, facts, Kind.HOLD_CAPTURE, amount, to)


@routes.post("/api/v1/holds/{hold_id}/void")
async def void_hold(request: web.Request) -> web.Response:
    hold_id = hold_id_from_path(request.match_info["hold_id"])
    facts = await _hold_of(request, hold_id)
    return await _end_hold(request, hold_id, facts, Kind.HOLD_VOID, facts.amount, "")


@routes.get("/api/v1/holds/{hold_id}")
async def get_hold(request: web.Request) -> web.Response:
    hold_id = hold_id_from_path(request.match_info["hold_id"])
    await _hold_of(request, hold_id)  # 404 unless it is the caller's to see
    return json_response(hold_body(await _hold_row(request, hold_id)))


@routes.get("/api/v1/wallets/{wallet_id}/holds")
async def list_holds(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    status = request.query.get("status")
    if status is not None and status not in HOLD_STATUSES:
        raise errors.InvalidInput("status", f"must be one of {', '.join(HOLD_STATUSES)}")
    limit = page_limit(request)
    after = time_cursor(cursor(request, WALLETS_CURSOR))
    await ensure_visible(request, wallet_id)
    async with connection_from(request.app[PG]) as conn:
        rows = await queries.list_holds(conn, wallet_id, status, limit, after)
        if not rows and await queries.get_wallet(conn, wallet_id) is None:
            raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")
    return json_response(HoldPage([hold_body(r) for r in rows], next_time_cursor(rows, limit)))


async def _end_hold(
    request: web.Request, hold_id: str, facts: HoldFacts, kind: str, amount: int, to: str
) -> web.Response:
    """Queues the capture or void on the hold's wallet and answers with the hold as it
    ended, or why it did not."""
    wallet_id = facts.wallet_id
    op_id = hold_step_id(hold_id, idempotency_key(request))
    transfer_id = capture_transfer_id(hold_id) if to else ""
    outcome = await queue_and_await(
        request.app,
        lambda channel, tag: OperationRequest(
            op_id,
            wallet_id,
            kind,
            amount,
            channel,
            tag,
            transfer_id=transfer_id,
            counterparty=to,
            hold_id=hold_id,
        ),
        recorded_outcome,
    )
    if outcome is None:
        return _pending(hold_id, wallet_id)
    return await _ending_response(request, hold_id, facts, outcome)


async def _ending_response(
    request: web.Request, hold_id: str, facts: HoldFacts, o: Outcome
) -> web.Response:
    if o.status in (WALLET_NOT_FOUND, Status.HOLD_NOT_FOUND):
        raise errors.HoldNotFound(f"No hold has the id {hold_id}")
    if o.status == KEY_REUSED:
        return outcome_response(o)
    if o.status == Status.ABOVE_HOLD:
        raise errors.InvalidInput("amount", "must be at most the held amount")
    if o.status == APPLIED and not o.replayed and o.kind in ENDED_HERE:
        # Just ended here, paid to nobody: the outcome has all the hold's news.
        return json_response(hold_from_outcome(hold_id, facts, o, HOLD_ENDINGS[Kind(o.kind)]))
    row = await _hold_row(request, hold_id)
    if o.status == Status.HOLD_NOT_ACTIVE:
        raise errors.HoldNotActive(
            f"The hold is {row['status']} already; nothing was done", hold=hold_body(row)
        )
    # Applied (a capture paid to a wallet is answered once paid, or returned): as it is now.
    headers = {REPLAYED_HEADER: "true"} if o.replayed else None
    return json_response(hold_body(row), headers=headers)


async def _hold_of(request: web.Request, hold_id: str) -> HoldFacts:
    """What never changes of the hold, if the caller may see it: 404 otherwise, the same as
    for no hold at all."""
    known = request.app[HOLD_WALLETS]
    found = known.get(hold_id)
    if found is None:
        async with connection_from(request.app[PG]) as conn:
            row = await queries.get_hold(conn, hold_id)
        if row is None:
            raise errors.HoldNotFound(f"No hold has the id {hold_id}")
        found = hold_facts(row)
        remember(known, hold_id, found)
    try:
        await ensure_visible(request, found.wallet_id)
    except errors.WalletNotFound:
        raise errors.HoldNotFound(f"No hold has the id {hold_id}") from None
    return found


async def _hold_row(request: web.Request, hold_id: str) -> Any:
    async with connection_from(request.app[PG]) as conn:
        row = await queries.get_hold(conn, hold_id)
    if row is None:
        raise errors.HoldNotFound(f"No hold has the id {hold_id}")
    return row


async def _optional_json(request: web.Request) -> dict[str, Any]:
    """The body's JSON object; none at all is an empty one."""
    if not request.body_exists:
        return {}
    return await read_json_object(request)


def _pending(hold_id: str, wallet_id: str) -> web.Response:
    """Its outcome did not come in time: the hold's URL tells it once decided."""
    url = hold_url(hold_id)
    body = Pending(hold_id, wallet_id, "pending", url)
    return json_response(body, status=202, headers={"Location": url})
