"""What a committed transfer leg sets off, and the resending of transfers not yet settled.

A transfer is three steps, each applied by one wallet's writer in its own batch and
recorded under an id that makes a second delivery a replay: the source's debit
(TRANSFER_OUT; the transfer `in_flight`, or `rejected`), the destination's credit
(TRANSFER_IN; `completed`, or `returning` if it cannot take it), and then the return to
the source (TRANSFER_RETURN; `rejected`). When one worker writes both wallets, the debit
and the credit are one batch (`with_local_credits`).

Each step's writer queues the next step after its COMMIT and before it acknowledges its
own entry. Whatever is lost beyond that (Redis wiped) the owner of the source's shard finds
among the unsettled transfers, and sends again (`resend_due`), each transfer with a backoff
of its own, and not while its step may still wait in a slow wallet's stream
(`still_queued`). A return the source has no room for waits, resent until it fits.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from shared.codec import (
    APPLIED,
    COMPLETED,
    IN_FLIGHT,
    REJECTED,
    TRANSFER,
    TRANSFER_IN,
    TRANSFER_OUT,
    TRANSFER_RETURN,
    WALLET_NOT_FOUND,
    OperationRequest,
    Outcome,
    Status,
    format_time,
)
from shared.connections import connection_from
from shared.ids import return_op_id
from worker.apply import RESEND_DELAY_MAX
from worker.decide import LOCAL_CREDIT, SKIPPED, Entry
from worker.sql import DUE, RESCHEDULE, UNSETTLED_COUNTS
from worker.streams import WalletStreams, may_be_queued

log = logging.getLogger("worker")

RESEND_PER_SHARD = 100  # transfers of one shard sent again at most per rescan


class Unsettled(NamedTuple):
    transfers: int
    returns_waiting: int
    oldest_seconds: float


class Due(NamedTuple):
    """A transfer's step to send again: to the destination (its credit) or to the source
    (its return), last sent at `sent_at_ms` (PostgreSQL's clock); or a return that was
    refused for want of room (`waiting`), queued nowhere."""

    source: str
    transfer_id: str
    shard: int  # the source's
    step: OperationRequest
    sent_at_ms: int
    waiting: bool


def transfer_outcome(
    request: OperationRequest, source: str, destination: str, status: str, **fields: Any
) -> Outcome:
    """The answer to the client who asked for the transfer."""
    return Outcome(
        request.tag,
        request.transfer_id,
        source,
        status,
        TRANSFER,
        request.amount,
        transfer_id=request.transfer_id,
        counterparty=destination,
        **fields,
    )


def settlements(entries: list[Entry], outcomes: list[Outcome]) -> list[str]:
    """How the batch's transfers settled, for the metrics: completed, refused or returned
    (a replay settles nothing)."""
    settled = []
    for entry, o in zip(entries, outcomes, strict=True):
        kind = entry.request.kind
        if o.replayed or kind not in (TRANSFER_OUT, TRANSFER_IN, TRANSFER_RETURN):
            continue
        if kind == TRANSFER_IN and o.status == APPLIED:
            settled.append("completed")
        elif kind == TRANSFER_OUT and o.status == REJECTED:
            settled.append("refused")
        elif kind == TRANSFER_RETURN and o.status == APPLIED:
            settled.append("returned")
    return settled


async def unsettled(conn: Any, owned: Collection[int]) -> Unsettled:
    """The transfers from the owned shards' wallets that are unsettled: how many, how many
    of them have a return waiting for room in the source, the oldest one's age."""
    row = await conn.fetchrow(UNSETTLED_COUNTS, list(owned))
    return Unsettled(row["unsettled"], row["returns_waiting"], row["oldest_seconds"])


def with_local_credits(entries: list[Entry], writes: Callable[[str], bool]) -> list[Entry]:
    """The batch's entries, each debit of a transfer to a wallet this worker also writes
    (`writes`) followed by that transfer's credit: both sides in one transaction, applied
    only if the debit is (worker/apply.py), and no step to send."""
    found = []
    for e in entries:
        found.append(e)
        r = e.request
        if r.starts_transfer() and writes(r.counterparty):
            step = credit(r.transfer_id, r.wallet_id, r.counterparty, r.amount, 0, "")
            found.append(Entry(LOCAL_CREDIT, step))
    return found


def credited(entries: list[Entry]) -> list[str]:
    """The wallets that credits in the batch (with_local_credits) write."""
    return [e.request.wallet_id for e in entries if e.entry_id == LOCAL_CREDIT]


def follow_ups(
    entries: list[Entry], outcomes: list[Outcome]
) -> tuple[list[tuple[str, Outcome]], list[tuple[str, OperationRequest]]]:
    """For a committed batch: the answers to publish (reply channel, outcome), and the next
    steps of its transfers, to queue on their wallets' streams, each with the wallet whose
    entry hands it on."""
    replies: list[tuple[str, Outcome]] = []
    steps: list[tuple[str, OperationRequest]] = []
    for i, (entry, outcome) in enumerate(zip(entries, outcomes, strict=True)):
        r = entry.request
        answer: Outcome | None = outcome
        if entry.entry_id == LOCAL_CREDIT:
            continue  # answered with its debit
        if r.starts_transfer():
            local = i + 1 < len(entries) and entries[i + 1].entry_id == LOCAL_CREDIT
            if local and outcomes[i + 1].status != SKIPPED:
                answer, step = _after_both(r, outcome, outcomes[i + 1])
            else:
                answer, step = _after_debit(r, outcome)
        elif r.kind == TRANSFER_IN:
            answer, step = _after_credit(r, outcome)
        elif r.kind == TRANSFER_RETURN:
            answer, step = _after_return(r, outcome)
        else:
            step = None
        if answer is not None and r.reply_to:
            replies.append((r.reply_to, answer))
        if step is not None:
            steps.append((r.wallet_id, step))
    return replies, steps


def _after_debit(r: OperationRequest, o: Outcome) -> tuple[Outcome | None, OperationRequest | None]:
    if o.status != APPLIED and r.kind != TRANSFER_OUT:
        return o, None  # a capture refused: answered as such
    if o.status != APPLIED:  # refused, unknown source, key reused: the client is told
        return (
            transfer_outcome(
                r,
                r.wallet_id,
                r.counterparty,
                o.status,
                balance_after=o.balance_after,
                reason=o.reason,
                created_at=o.created_at,
                seq=o.seq,
                replayed=o.replayed,
            ),
            None,
        )
    if o.replayed:
        # A client's retry of a transfer started before: its credit went then (and is sent
        # again if lost). Queueing it again for every retry would flood the destination.
        return transfer_outcome(r, r.wallet_id, r.counterparty, Status.IN_LEDGER), None
    return None, credit(
        r.transfer_id, r.wallet_id, r.counterparty, r.amount, o.balance_after, o.created_at, r
    )


def _after_both(
    r: OperationRequest, debit: Outcome, credited: Outcome
) -> tuple[Outcome | None, OperationRequest | None]:
    """After a debit and its credit in one transaction: answered now, unless the credit
    could not be taken and the amount goes back."""
    if credited.status == APPLIED:
        answer = transfer_outcome(
            r,
            r.wallet_id,
            r.counterparty,
            COMPLETED,
            balance_after=debit.balance_after,
            created_at=debit.created_at,
        )
        return answer, None
    reason = credited.reason if credited.status == REJECTED else WALLET_NOT_FOUND
    return None, refund(
        r.transfer_id, r.wallet_id, r.counterparty, r.amount, reason, r, debit.created_at
    )


def _after_credit(
    r: OperationRequest, o: Outcome
) -> tuple[Outcome | None, OperationRequest | None]:
    if o.status == APPLIED:
        return (
            transfer_outcome(
                r,
                r.counterparty,
                r.wallet_id,
                COMPLETED,
                balance_after=r.source_balance,
                created_at=r.transfer_time,
                replayed=o.replayed,
            ),
            None,
        )
    reason = o.reason if o.status == REJECTED else WALLET_NOT_FOUND
    return None, refund(r.transfer_id, r.counterparty, r.wallet_id, r.amount, reason, r)


def _after_return(
    r: OperationRequest, o: Outcome
) -> tuple[Outcome | None, OperationRequest | None]:
    if o.status != APPLIED:  # past the largest balance: it stays returning, resent
        return None, None
    answer = transfer_outcome(
        r,
        r.wallet_id,
        r.counterparty,
        REJECTED,
        balance_after=o.balance_after,
        reason=r.reason,
        created_at=r.transfer_time,
        replayed=o.replayed,
    )
    return answer, None


def credit(
    transfer_id: str,
    source: str,
    destination: str,
    amount: int,
    source_balance: int,
    created_at: str,
    route: OperationRequest | None = None,
) -> OperationRequest:
    """Step 2, for the destination's stream; answered on `route`'s channel, if any."""
    return OperationRequest(
        transfer_id,
        destination,
        TRANSFER_IN,
        amount,
        route.reply_to if route else "",
        route.tag if route else 0,
        transfer_id=transfer_id,
        counterparty=source,
        source_balance=source_balance,
        transfer_time=created_at,
    )


def refund(
    transfer_id: str,
    source: str,
    destination: str,
    amount: int,
    reason: str | None,
    route: OperationRequest | None = None,
    created_at: str = "",
) -> OperationRequest:
    """Step 3, for the source's stream; answered on `route`'s channel, if any."""
    return OperationRequest(
        return_op_id(transfer_id),
        source,
        TRANSFER_RETURN,
        amount,
        route.reply_to if route else "",
        route.tag if route else 0,
        transfer_id=transfer_id,
        counterparty=destination,
        transfer_time=created_at or (route.transfer_time if route else ""),
        reason=reason or "",
    )


async def due_steps(conn: Any, owned: Collection[int]) -> list[Due]:
    """The next steps of the owned shards' transfers that have stayed unsettled past their
    time (a transfer settles in milliseconds; one unsettled for TRANSFER_RESEND_AFTER lost
    its step, or its step waits behind a slow wallet): the credit of those in flight, the
    return of those returning. A step sent again that was applied already is a replay,
    answered as it was."""
    due = []
    for row in await conn.fetch(DUE, sorted(owned), RESEND_PER_SHARD):
        created_at = format_time(row["created_at"])
        source, transfer_id = row["source_id"], row["id"]
        if row["status"] == IN_FLIGHT:
            step = credit(
                transfer_id,
                source,
                row["destination_id"],
                row["amount"],
                row["source_balance_after"],
                created_at,
            )
        else:
            step = refund(
                transfer_id,
                source,
                row["destination_id"],
                row["amount"],
                row["reason"],
                created_at=created_at,
            )
        due.append(
            Due(
                source,
                transfer_id,
                row["source_shard"],
                step,
                row["sent_at_ms"],
                row["return_waiting"],
            )
        )
    return due


def still_queued(due: Due, oldest_entry_ms: int | None) -> bool:
    """Whether the step may still wait in its wallet's stream (a return waiting for room is
    queued nowhere)."""
    return not due.waiting and may_be_queued(due.sent_at_ms, oldest_entry_ms)


async def reschedule(conn: Any, sent: list[Due], queued: list[Due], after: float) -> None:
    """Puts every transfer looked at back, with its backoff; notes those `sent` now. One
    statement per shard (RESCHEDULE), all in one round trip."""
    by_shard: dict[int, list[tuple[Due, bool]]] = defaultdict(list)
    for due, was_sent in [*((d, True) for d in sent), *((d, False) for d in queued)]:
        by_shard[due.shard].append((due, was_sent))
    await conn.executemany(
        RESCHEDULE,
        [
            (
                [d.source for d, _ in group],
                [d.transfer_id for d, _ in group],
                [was_sent for _, was_sent in group],
                after,
                RESEND_DELAY_MAX,
            )
            for group in by_shard.values()
        ],
    )


async def resend_due(
    pool: Any, streams: WalletStreams, owned: list[int], after: float
) -> tuple[int, int]:
    """Sends again the steps of the owned shards' transfers that are due, but not those
    that may still wait in a slow wallet's stream; how many were sent, and how many may
    still be queued."""
    if not owned:  # sidelined, or not yet taking: nothing of its own
        return 0, 0
    async with connection_from(pool) as conn:
        due = await due_steps(conn, owned)
    if not due:
        return 0, 0
    oldest = await streams.oldest_entries([d.step.wallet_id for d in due])
    sent = [d for d in due if not still_queued(d, oldest[d.step.wallet_id])]
    queued = [d for d in due if still_queued(d, oldest[d.step.wallet_id])]
    # Back off first: a send that fails or is cut short is tried later, not at once.
    async with connection_from(pool) as conn:
        await reschedule(conn, sent, queued, after)
    if sent:
        log.warning("sending again the next step of %d transfers", len(sent))
        failed = await streams.send([d.step for d in sent])
        if failed:
            log.warning("%d of them could not be queued; tried again later", failed)
    return len(sent), len(queued)
