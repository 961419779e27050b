"""The messages between API and workers, and their one encoding (orjson, versioned).

Money travels as integers of minor units. A reply holds a list of outcomes: a worker sends
each API process one message per batch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from shared.money import MAX_AMOUNT_MINOR

VERSION = 1

DEPOSIT = "DEPOSIT"
WITHDRAW = "WITHDRAW"
OPERATION_TYPES = (DEPOSIT, WITHDRAW)

# Outcome statuses. The first two are ledger states; the others never reach the ledger.
APPLIED = "applied"
REJECTED = "rejected"
WALLET_NOT_FOUND = "wallet_not_found"
KEY_REUSED = "key_reused"

# Reasons for a rejected operation.
INSUFFICIENT_FUNDS = "insufficient_funds"
BALANCE_LIMIT = "balance_limit"


# A UUID as the service writes it: lower-case hex with hyphens.
CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


class MessageError(ValueError):
    """A stream entry or reply that cannot be decoded."""


@dataclass(frozen=True, slots=True)
class OperationRequest:
    op_id: str
    wallet_id: str
    kind: str
    amount: int
    reply_to: str
    tag: int


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
    )


def key_reused(r: OperationRequest, earlier: Mapping[str, Any]) -> Outcome | None:
    """If the ledger row `earlier`, recorded under the request's operation id (its
    Idempotency-Key), is another operation than `r`, the answer that the key was reused."""
    if (earlier["kind"], earlier["amount"]) == (r.kind, r.amount):
        return None
    return Outcome(
        r.tag, r.op_id, r.wallet_id, KEY_REUSED, kind=earlier["kind"], amount=earlier["amount"]
    )


def encode_request(r: OperationRequest) -> bytes:
    return orjson.dumps(
        {
            "v": VERSION,
            "op": r.op_id,
            "w": r.wallet_id,
            "k": r.kind,
            "a": r.amount,
            "r": r.reply_to,
            "t": r.tag,
        }
    )


def decode_request(data: bytes | str) -> OperationRequest:
    try:
        m = orjson.loads(data)
        if m["v"] != VERSION:
            raise MessageError(f"unknown message version {m['v']!r}")
        r = OperationRequest(m["op"], m["w"], m["k"], m["a"], m["r"], m["t"])
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise MessageError(f"undecodable operation message: {e}") from e
    # In full: an entry PostgreSQL would refuse (a malformed id, an amount past BIGINT) would
    # fail its wallet's every batch; refused here, it goes to the dead letters instead.
    if not (
        r.kind in OPERATION_TYPES
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


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    return orjson.dumps(
        {
            "v": REPLY_VERSION,
            "o": [{key: getattr(o, name) for key, name in _OUTCOME_NAMES} for o in outcomes],
        }
    )


def decode_outcomes(data: bytes | str) -> list[Outcome]:
    try:
        reply = orjson.loads(data)
        if isinstance(reply, list):  # from a writer before versions: positional
            return [Outcome(*fields) for fields in reply]
        if reply["v"] != REPLY_VERSION:
            raise MessageError(f"unknown reply version {reply['v']!r}")
        return [Outcome(**{name: o[key] for key, name in _OUTCOME_NAMES}) for o in reply["o"]]
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise MessageError(f"undecodable reply: {e}") from e


def format_time(moment: datetime) -> str:
    """RFC 3339 in UTC with microseconds, the one time format of the API."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_json(value: Any) -> bytes:
    return orjson.dumps(value)
