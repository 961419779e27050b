"""The ledger's own check: a wallet's rows replayed serially from a zero balance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared.codec import DEBITS, Kind

TAKES_AVAILABLE = (*DEBITS, Kind.HOLD)  # decided on balance - held
ENDS_HOLD = (Kind.HOLD_CAPTURE, Kind.HOLD_VOID, Kind.HOLD_EXPIRE)


def replay_ledger(rows: Sequence[Mapping[str, Any]]) -> tuple[int, list[str]]:
    """Replays a wallet's ledger rows (in `seq` order: kind, amount, status, reason,
    balance_after, and where there are holds hold_id and held_after) serially from zero,
    checking every decision they recorded and that the available funds never go below 0;
    returns the final balance and what did not follow."""
    balance, held, problems = 0, 0, []
    holds: dict[str, int] = {}  # hold id -> amount, while held
    for row in rows:
        kind, amount, expected = row["kind"], row["amount"], "applied"
        if kind in ENDS_HOLD:
            hold = holds.pop(row["hold_id"], None)
            if hold is None:
                problems.append(f"ledger row {dict(row)} ends a hold that is not held")
                continue
            if kind == Kind.HOLD_CAPTURE and amount > hold:
                problems.append(f"ledger row {dict(row)} captures more than the {hold} held")
            held -= hold
            balance -= amount if kind == Kind.HOLD_CAPTURE else 0
        elif kind not in TAKES_AVAILABLE:  # a credit: deposits and transfers' credits
            balance += amount
        elif balance - held < amount:
            expected = "rejected"
        elif kind == Kind.HOLD:
            held += amount
            holds[row["hold_id"]] = amount
        else:
            balance -= amount
        reason = "insufficient_funds" if expected == "rejected" else None
        if (row["status"], row["reason"], row["balance_after"]) != (expected, reason, balance):
            problems.append(f"ledger row {dict(row)} does not follow (balance {balance})")
        if row.get("held_after", held) != held or not 0 <= held <= balance:
            problems.append(f"ledger row {dict(row)}: held {held} of the balance {balance}")
    return balance, problems
