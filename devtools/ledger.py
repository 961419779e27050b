"""The ledger's own check: a wallet's rows replayed serially from a zero balance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from shared.codec import DEBITS


def replay_ledger(rows: Sequence[Mapping[str, Any]]) -> tuple[int, list[str]]:
    """Replays a wallet's ledger rows (in `seq` order: kind, amount, status, reason,
    balance_after) serially from zero, checking every decision they recorded; returns the
    final balance and what did not follow."""
    balance, problems = 0, []
    for row in rows:
        if row["kind"] not in DEBITS:  # a credit: deposits and transfers' credits
            expected = "applied"
            balance += row["amount"]
        elif balance >= row["amount"]:
            expected = "applied"
            balance -= row["amount"]
        else:
            expected = "rejected"
        reason = "insufficient_funds" if expected == "rejected" else None
        if (row["status"], row["reason"], row["balance_after"]) != (expected, reason, balance):
            problems.append(f"ledger row {dict(row)} does not follow (balance {balance})")
    return balance, problems
