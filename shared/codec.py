"""The messages between API and workers, and their one encoding (orjson, versioned).

Money travels as integers of minor units. A reply holds a list of outcomes: a worker sends
each API process one message per batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import orjson

from shared.money import MAX_AMOUNT_MINOR

VERSION = 1


class Kind(StrEnum):
    """What an operation does: a queued operation's kind, and a ledger row's."""

    DEPOSIT = "DEPOSIT"
    WITHDRAW = "WITHDRAW"
    # A transfer's legs in the ledger: the debit of the source, the credit of the
    # destination, and, when the destination cannot take it, the amount credited back.
    TRANSFER_OUT = "TRANSFER_OUT"
    TRANSFER_IN = "TRANSFER_IN"
    TRANSFER_RETURN = "TRANSFER_RETURN"
    # The kind of a transfer's outcome as its client gets it (never a ledger row's).
    TRANSFER = "TRANSFER"
    # A hold placed, and how it ended: captured (paid out, or to a wallet as a transfer's
    # first leg), voided, or expired.
    HOLD = "HOLD"
    HOLD_CAPTURE = "HOLD_CAPTURE"
    HOLD_VOID = "HOLD_VOID"
    HOLD_EXPIRE = "HOLD_EXPIRE"


class Status(StrEnum):
    """An outcome's status. APPLIED and REJECTED are ledger states; the others never reach
    the ledger, but for a transfer's states (transfers.status, REJECTED one of them too)."""

    APPLIED = "applied"
    REJECTED = "rejected"
    WALLET_NOT_FOUND = "wallet_not_found"
    KEY_REUSED = "key_reused"
    # A return the source has no room for: nothing recorded, it is resent.
    RETURN_WAITING = "return_waiting"
    # Decided before (a client's retry of a transfer): its outcome is in PostgreSQL, once
    # the transfer is settled.
    IN_LEDGER = "in_ledger"
    IN_FLIGHT = "in_flight"
    # The destination could not take it: the amount is on its way back to the source.
    RETURNING = "returning"
    COMPLETED = "completed"
    # A capture, void or expiry of a hold that is no longer held (or, for an expiry, not
    # yet due): nothing recorded; or of a hold the wallet does not have; or a capture above
    # the held amount.
    HOLD_NOT_ACTIVE = "hold_not_active"
    HOLD_NOT_FOUND = "hold_not_found"
    ABOVE_HOLD = "above_hold"


class HoldStatus(StrEnum):
    HELD = "held"
    CAPTURED = "captured"
    VOIDED = "voided"
    EXPIRED = "expired"


class Reason(StrEnum):
    """Why an operation was rejected (or a transfer came back)."""

    INSUFFICIENT_FUNDS = "insufficient_funds"
    BALANCE_LIMIT = "balance_limit"
    WALLET_NOT_FOUND = "wallet_not_found"


DEPOSIT, WITHDRAW = Kind.DEPOSIT, Kind.WITHDRAW
TRANSFER_OUT, TRANSFER_IN, TRANSFER_RETURN = (
    Kind.TRANSFER_OUT,
    Kind.TRANSFER_IN,
    Kind.TRANSFER_RETURN,
)
TRANSFER = Kind.TRANSFER
OPERATION_TYPES = (DEPOSIT, WITHDRAW)
TRANSFER_LEGS = (TRANSFER_OUT, TRANSFER_IN, TRANSFER_RETURN)
HOLD_KINDS = (Kind.HOLD, Kind.HOLD_CAPTURE, Kind.HOLD_VOID, Kind.HOLD_EXPIRE)
# What ends a hold, and the status it ends in.
HOLD_ENDINGS = {
    Kind.HOLD_CAPTURE: HoldStatus.CAPTURED,
    Kind.HOLD_VOID: HoldStatus.VOIDED,
    Kind.HOLD_EXPIRE: HoldStatus.EXPIRED,
}
DEBITS = (WITHDRAW, TRANSFER_OUT)
APPLIED, REJECTED, KEY_REUSED = Status.APPLIED, Status.REJECTED, Status.KEY_REUSED
WALLET_NOT_FOUND, RETURN_WAITING = Status.WALLET_NOT_FOUND, Status.RETURN_WAITING
IN_FLIGHT, RETURNING, COMPLETED = Status.IN_FLIGHT, Status.RETURNING, Status.COMPLETED
INSUFFICIENT_FUNDS, BALANCE_LIMIT = Reason.INSUFFICIENT_FUNDS, Reason.BALANCE_LIMIT


# A UUID as the service writes it: lower-case hex with hyphens.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MessageError(ValueError):
    """A stream entry or reply that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class OperationRequest:
    """One entry of a wallet's stream. A transfer's leg also names the transfer and the
    other wallet; a credit carries what the source's debit left (for the answer), and a
    return why the destination did not take the amount."""

    op_id: str
    wallet_id: str
    kind: str
    amount: int
    reply_to: str
    tag: int
    transfer_id: str = ""
    counterparty: str = ""
    source_balance: int = 0
    transfer_time: str = ""
    reason: str = ""
    # A hold's operations: the hold, and when a new one expires (ms since the epoch).
    hold_id: str = ""
    expires_at: int = 0

    def starts_transfer(self) -> bool:
        """A transfer's debit: a transfer's first leg, or a capture paid to a wallet."""
        return self.kind == TRANSFER_OUT or (
            self.kind == Kind.HOLD_CAPTURE and bool(self.transfer_id)
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    tag: int
    op_id: str
    wallet_id: str
    status: str
    kind: str = ""
    amount: int = 0
    balance_after: int = 0
    reason: str | None = None
    created_at: str = ""
    seq: int = 0
    replayed: bool = False
    transfer_id: str = ""
    counterparty: str = ""
    hold_id: str = ""
    held_after: int = 0


def ledger_outcome(
    row: Mapping[str, Any],
    *,
    op_id: str,
    wallet_id: str,
    created_at: str,
    tag: int = 0,
    replayed: bool = False,
) -> Outcome:
    """The outcome a ledger row records."""
    return Outcome(
        tag,
        op_id,
        wallet_id,
        row["status"],
        row["kind"],
        row["amount"],
        row["balance_after"],
        row["reason"],
        created_at,
        row["seq"],
        replayed,
        str(row.get("transfer_id") or ""),
        str(row.get("counterparty") or ""),
        str(row.get("hold_id") or ""),
        row.get("held_after") or 0,
    )


def key_reused(r: OperationRequest, earlier: Mapping[str, Any]) -> Outcome | None:
    """If the ledger row `earlier`, recorded under the request's operation id (its
    Idempotency-Key), is another operation than `r`, the answer that the key was reused."""
    counterparty = str(earlier.get("counterparty") or "")
    hold_id = str(earlier.get("hold_id") or "")
    if (earlier["kind"], earlier["amount"], counterparty, hold_id) == (
        r.kind,
        r.amount,
        r.counterparty,
        r.hold_id,
    ):
        return None
    return Outcome(
        r.tag,
        r.op_id,
        r.wallet_id,
        KEY_REUSED,
        kind=earlier["kind"],
        amount=earlier["amount"],
        transfer_id=r.transfer_id,
        counterparty=counterparty,
        hold_id=hold_id,
    )


_TRANSFER_FIELDS = (
    ("x", "transfer_id"),
    ("c", "counterparty"),
    ("sb", "source_balance"),
    ("tt", "transfer_time"),
    ("n", "reason"),
)
_HOLD_FIELDS = (("h", "hold_id"), ("e", "expires_at"))


def encode_request(r: OperationRequest) -> bytes:
    m = {
        "v": VERSION,
        "op": r.op_id,
        "w": r.wallet_id,
        "k": r.kind,
        "a": r.amount,
        "r": r.reply_to,
        "t": r.tag,
    }
    if r.transfer_id:
        m.update({key: getattr(r, name) for key, name in _TRANSFER_FIELDS})
    if r.hold_id:
        m.update({key: getattr(r, name) for key, name in _HOLD_FIELDS})
    return orjson.dumps(m)


def decode_request(data: bytes | str) -> OperationRequest:
    try:
        m = orjson.loads(data)
        if m["v"] != VERSION:
            raise MessageError(f"unknown message version {m['v']!r}")
        extra = {name: m[key] for key, name in _TRANSFER_FIELDS + _HOLD_FIELDS if key in m}
        r = OperationRequest(m["op"], m["w"], m["k"], m["a"], m["r"], m["t"], **extra)
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise MessageError(f"undecodable operation message: {e}") from e
    # In full: an entry PostgreSQL would refuse (a malformed id, an amount past BIGINT) would
    # fail its wallet's every batch; refused here, it goes to the dead letters instead.
    if not (
        (
            r.kind in OPERATION_TYPES
            or (r.kind in TRANSFER_LEGS and _transfer_valid(r))
            or (r.kind in HOLD_KINDS and _hold_valid(r))
        )
        and type(r.amount) is int
        and 0 < r.amount <= MAX_AMOUNT_MINOR
        and isinstance(r.op_id, str)
        and CANONICAL_UUID.fullmatch(r.op_id)
        and isinstance(r.wallet_id, str)
        and CANONICAL_UUID.fullmatch(r.wallet_id)
        and isinstance(r.reply_to, str)
        and type(r.tag) is int
    ):
        raise MessageError(f"invalid operation message {m!r}")
    return r


def _hold_valid(r: OperationRequest) -> bool:
    if not (
        isinstance(r.hold_id, str)
        and CANONICAL_UUID.fullmatch(r.hold_id) is not None
        and type(r.expires_at) is int
        and 0 <= r.expires_at < 2**53
    ):
        return False
    if r.kind == Kind.HOLD_CAPTURE and r.transfer_id:
        return _transfer_valid(r)
    return not (r.transfer_id or r.counterparty)


def _transfer_valid(r: OperationRequest) -> bool:
    return (
        isinstance(r.transfer_id, str)
        and CANONICAL_UUID.fullmatch(r.transfer_id) is not None
        and isinstance(r.counterparty, str)
        and CANONICAL_UUID.fullmatch(r.counterparty) is not None
        and r.counterparty != r.wallet_id
        and type(r.source_balance) is int
        and isinstance(r.transfer_time, str)
        and isinstance(r.reason, str)
    )


# A reply: {"v": REPLY_VERSION, "o": [outcome, ...]}, each outcome an object under these
# names. A newer writer may add names, which a reader ignores; a change a reader could
# misread takes a new version, and a reader refuses a version it does not know (its
# requests then answer 202, and the operation's URL tells the outcome). A bare list is the
# reply of a writer from before versions, read as it was written.
REPLY_VERSION = 1
_OUTCOME_NAMES = (
    ("t", "tag"),
    ("op", "op_id"),
    ("w", "wallet_id"),
    ("s", "status"),
    ("k", "kind"),
    ("a", "amount"),
    ("b", "balance_after"),
    ("r", "reason"),
    ("c", "created_at"),
    ("q", "seq"),
    ("p", "replayed"),
)
# Added since: a reply from a writer before them lacks them.
_OUTCOME_NAMES_ADDED = (
    ("x", "transfer_id"),
    ("cp", "counterparty"),
    ("h", "hold_id"),
    ("hd", "held_after"),
)


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    return orjson.dumps(
        {
            "v": REPLY_VERSION,
            "o": [
                {key: getattr(o, name) for key, name in _OUTCOME_NAMES + _OUTCOME_NAMES_ADDED}
                for o in outcomes
            ],
        }
    )


def decode_outcomes(data: bytes | str) -> list[Outcome]:
    try:
        reply = orjson.loads(data)
        if isinstance(reply, list):  # from a writer before versions: positional
            return [Outcome(*fields) for fields in reply]
        if reply["v"] != REPLY_VERSION:
            raise MessageError(f"unknown reply version {reply['v']!r}")
        return [
            Outcome(
                **{name: o[key] for key, name in _OUTCOME_NAMES},
                **{name: o[key] for key, name in _OUTCOME_NAMES_ADDED if key in o},
            )
            for o in reply["o"]
        ]
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise MessageError(f"undecodable reply: {e}") from e


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, the one time format of the API."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_json(value: Any) -> bytes:
    return orjson.dumps(value)
