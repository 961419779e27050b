"""The final checks, once the faults are healed and every unknown answered: what the ledger,
the balances, the leases and the processes' logs must say after what the clients sent and
were answered. Each finding is a problem of the report."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from devtools.ledger import replay_ledger
from devtools.waiting import until
from load.chaos.clients import DEFINITE, REUSE, SQUAT, TWIN, Clients, Sent
from load.chaos.faults import REFUSED
from load.chaos.report import Report
from load.chaos.stage import LEASE_TTL, Stage, owner_pid
from shared.codec import (
    INSUFFICIENT_FUNDS,
    TRANSFER,
    TRANSFER_IN,
    TRANSFER_OUT,
    TRANSFER_RETURN,
    HoldStatus,
    Kind,
)
from shared.ids import capture_transfer_id, expiry_op_id, return_op_id

# How long past its expires_at a hold may still be held once the run is quiet: the
# expiry's sending (0.2 s), a batch, and a take-over's reading.
EXPIRY_SLACK_SECONDS = 10

# A ledger row by (wallet, its id).
Rows = dict[tuple[str, str], Any]


class Checks:
    def __init__(
        self, stage: Stage, clients: Clients, squatted: dict[tuple[str, str], str], report: Report
    ) -> None:
        self.stage, self.pg, self.report = stage, stage.pg, report
        self.sent, self.wallets = clients.sent, clients.wallets
        self.squatted = squatted  # the hostile client's: (source, key) -> when

    async def run(self) -> None:
        self.report.sent = len(self.sent)
        if any(500 <= s < 600 and s != 503 for op in self.sent for s in op.statuses):
            self.problem("a request was answered with a 5xx other than 503")
        await self.transfers_settle()
        rows = await self.pg.fetch(
            "SELECT wallet_id::text, id::text, seq, kind, amount, status, reason, balance_after,"
            " transfer_id::text, counterparty::text, hold_id::text, held_after"
            " FROM operations WHERE wallet_id = any($1::uuid[]) ORDER BY wallet_id, seq",
            self.wallets,
        )
        by_id = {(r["wallet_id"], r["id"]): r for r in rows}
        if len(by_id) != len(rows):
            self.problem("an operation id appears in a wallet's ledger more than once")
        self.nothing_unsent(by_id)
        for op in self.sent:
            self.answered(op, by_id)
        await self.balances(rows)
        await self.holds()
        self.twins()
        await self.ownership()
        self.processes()
        self.fence()

    async def transfers_settle(self) -> None:
        """Once the faults are healed, no transfer stays in flight."""

        async def settled() -> bool:
            return not await self.pg.fetchval(
                "SELECT count(*) FROM transfers WHERE status IN ('in_flight', 'returning')"
            )

        try:
            await until(settled, 30, "every transfer to be completed or rejected")
        except TimeoutError:
            stuck = await self.pg.fetch(
                "SELECT id::text, status FROM transfers WHERE status IN ('in_flight', 'returning')"
            )
            self.problem(f"transfers still in flight: {[tuple(r) for r in stuck]}")

    def nothing_unsent(self, by_id: Rows) -> None:
        """Every row of the ledger is one a client caused."""
        # (wallet, ledger id) -> (kind, amount, counterparty)
        expected: dict[tuple[str, str], tuple[str, int, str | None]] = {}
        for op in self.sent:
            if op.role == REUSE:
                continue  # nothing of a reuse may be applied
            if op.kind == TRANSFER:
                t = op.transfer_id
                expected[(op.wallet, t)] = (TRANSFER_OUT, op.minor, op.to)
                expected[(op.to, t)] = (TRANSFER_IN, op.minor, op.wallet)
                expected[(op.wallet, return_op_id(t))] = (TRANSFER_RETURN, op.minor, op.to)
            elif op.kind == Kind.HOLD:
                expected[(op.wallet, op.op_id)] = (op.kind, op.minor, None)
                expected[(op.wallet, expiry_op_id(op.op_id))] = (Kind.HOLD_EXPIRE, op.minor, None)
            elif op.to:  # a capture paid to a wallet: a transfer's first leg
                t = capture_transfer_id(op.hold)
                expected[(op.wallet, op.op_id)] = (op.kind, op.minor, op.to)
                expected[(op.to, t)] = (TRANSFER_IN, op.minor, op.wallet)
                expected[(op.wallet, return_op_id(t))] = (TRANSFER_RETURN, op.minor, op.to)
            else:
                expected[(op.wallet, op.op_id)] = (op.kind, op.minor, None)
        for key, r in by_id.items():
            if (r["kind"], r["amount"], r["counterparty"]) != expected.get(key):
                self.problem(f"ledger row {dict(r)} was never sent by a client")

    def answered(self, op: Sent, by_id: Rows) -> None:
        """A 200 is applied, a 409 is not; a key is refused as reused only where it was."""
        if op.role == REUSE:
            self.reuse(op, by_id)
            return
        if 422 in op.statuses:
            self.problem(
                f"{op.kind} {op.key} ({op.role or 'honest'}) was refused as a reused key:"
                f" {op.statuses}"
            )
        if op.role == SQUAT:
            self.report.hostile["squats"] += 1
            if op.final != 200:
                self.problem(f"squatting deposit {op.key} on {op.wallet}: {op.statuses}")
        if op.kind == TRANSFER:
            self.transfer(op, by_id)
            return
        row = by_id.get((op.wallet, op.op_id))
        if op.hold:  # a capture or a void: 200 ended the hold, 409 did nothing
            if op.final == 200 and (row is None or row["status"] != "applied"):
                self.problem(f"200 for {op.kind} {op.key} but the ledger has {row and dict(row)}")
            if op.final == 409 and row is not None:
                self.problem(f"409 for {op.kind} {op.key} but the ledger has {dict(row)}")
            return
        if op.final == 201 and (row is None or row["status"] != "applied"):
            self.problem(f"201 for {op.key} but the ledger has {row and dict(row)}")
        if op.final == 200 and (row is None or row["status"] != "applied"):
            self.problem(f"200 for {op.key} but the ledger has {row and dict(row)}")
        if op.final == 409 and row is not None and row["status"] == "applied":
            self.problem(f"409 for {op.key} but the ledger applied it")

    def transfer(self, op: Sent, by_id: Rows) -> None:
        """A 200 has both legs applied; a 409 moved nothing: refused at the source, or
        credited back to it."""
        t = op.transfer_id
        out = by_id.get((op.wallet, t))
        into = by_id.get((op.to, t))
        back = by_id.get((op.wallet, return_op_id(t)))
        legs = tuple(leg and leg["status"] for leg in (out, into, back))
        if op.final == 200 and legs != ("applied", "applied", None):
            self.problem(f"transfer {t} answered 200 but its legs are {legs}")
        if op.final == 409 and legs not in (
            ("rejected", None, None),
            ("applied", "rejected", "applied"),
        ):
            self.problem(f"transfer {t} answered 409 but its legs are {legs}")
        if op.role:
            return
        self.report.transfers[op.final] += 1
        when = self.squatted.get((op.wallet, op.key))
        if when is None:
            return
        # Squatted: completed, or refused only because its source had not the amount.
        hostile = self.report.hostile
        hostile["squatted_transfers"] += 1
        hostile[f"squatted_{when}"] += 1
        hostile[f"squatted_transfers_{op.final}"] += 1
        funds_short = (
            out is not None
            and legs == ("rejected", None, None)
            and out["reason"] == INSUFFICIENT_FUNDS
            and out["balance_after"] - out["held_after"] < op.minor  # what was available
        )
        if op.final != 200 and not (op.final == 409 and funds_short):
            self.problem(
                f"squatted transfer {t} ({op.key}) answered {op.statuses}, its legs {legs},"
                f" its debit {out and dict(out)}"
            )

    def reuse(self, op: Sent, by_id: Rows) -> None:
        """A key sent again with another body: refused as reused, and what the key did
        first stays as it was (nothing of the reuse is in the ledger: `nothing_unsent`)."""
        first = op.of
        assert first is not None
        self.report.hostile["reuses"] += 1
        if op.final != 422 or {200, 409} & set(op.statuses):
            self.problem(
                f"key {op.key} reused ({first.kind} {first.minor} -> {op.kind} {op.minor}"
                f" {op.to}) answered {op.statuses}, not 422"
            )
        else:
            self.report.hostile["reuses_refused"] += 1
        if first.kind == TRANSFER:
            t = first.transfer_id
            row = by_id.get((first.wallet, t))
            was: tuple[Any, ...] = (TRANSFER_OUT, first.minor, first.to)
            if op.to != first.to and by_id.get((op.to, t)) is not None:
                self.problem(f"key {op.key} reused to {op.to}: {dict(by_id[(op.to, t)])}")
        else:
            row = by_id.get((first.wallet, first.op_id))
            was = (first.kind, first.minor, None)
        if row is None or (row["kind"], row["amount"], row["counterparty"]) != was:
            self.problem(f"key {op.key} reused: its first operation is now {row and dict(row)}")

    async def balances(self, rows: list[Any]) -> None:
        """Every balance follows from its ledger, and they add up to the deposits minus the
        withdrawals: transfers only move money between the wallets."""
        balances = dict(
            await self.pg.fetch(
                "SELECT id::text, balance FROM wallets WHERE id = any($1::uuid[])", self.wallets
            )
        )
        for wallet in self.wallets:
            final, problems = replay_ledger([r for r in rows if r["wallet_id"] == wallet])
            self.report.problems += problems
            if balances[wallet] != final:
                self.problem(f"wallet {wallet}: balance {balances[wallet]}, ledger says {final}")
        # What left the wallets: withdrawals, and captures paid to nobody.
        taken = ("WITHDRAW", Kind.HOLD_CAPTURE)
        brought = sum(
            r["amount"] if r["kind"] == "DEPOSIT" else -r["amount"]
            for r in rows
            if r["status"] == "applied"
            and (r["kind"] == "DEPOSIT" or (r["kind"] in taken and r["counterparty"] is None))
        )
        if sum(balances.values()) != brought:
            self.problem(
                f"the balances add up to {sum(balances.values())}, the deposits less the "
                f"withdrawals and captures to {brought}"
            )

    async def holds(self) -> None:
        """Each hold ended at most once, as its ledger says, by the one request answered 200
        if any, never capturing more than it held; none held long past its expiry; each
        wallet's held amount is its held holds'. Each read is one snapshot: holds expire
        while the checks run."""
        holds = await self.pg.fetch(
            "SELECT h.id::text, h.status, h.amount, h.captured,"
            " extract(epoch FROM now() - h.expires_at)::float8 AS overdue,"
            " array_remove(array_agg(o.kind ORDER BY o.seq), NULL) AS ends"
            " FROM holds h LEFT JOIN operations o ON o.wallet_id = h.wallet_id"
            " AND o.hold_id = h.id AND o.kind <> 'HOLD'"
            " WHERE h.wallet_id = any($1::uuid[]) GROUP BY h.wallet_id, h.id",
            self.wallets,
        )
        won: dict[str, list[Sent]] = {}
        for op in self.sent:
            if op.hold and op.final == 200:
                won.setdefault(op.hold, []).append(op)
        ended_as = {
            Kind.HOLD_CAPTURE: HoldStatus.CAPTURED,
            Kind.HOLD_VOID: HoldStatus.VOIDED,
            Kind.HOLD_EXPIRE: HoldStatus.EXPIRED,
        }
        for h in holds:
            self.report.holds[h["status"]] += 1
            winners = won.get(h["id"], [])
            kinds = [ended_as[Kind(kind)] for kind in h["ends"]]
            if kinds != ([] if h["status"] == HoldStatus.HELD else [h["status"]]):
                self.problem(f"hold {h['id']} is {h['status']}, its ledger ends it {kinds}")
            if h["captured"] > h["amount"]:
                self.problem(f"hold {h['id']} captured {h['captured']} of {h['amount']}")
            if len(winners) > 1 or (winners and ended_as[Kind(winners[0].kind)] != h["status"]):
                self.problem(f"hold {h['id']} is {h['status']}, answered 200 to {winners}")
            if h["status"] == HoldStatus.HELD and h["overdue"] > EXPIRY_SLACK_SECONDS:
                self.problem(f"hold {h['id']} is still held {h['overdue']:.1f} s past expiry")
        held = await self.pg.fetch(
            "SELECT w.id::text, w.held, coalesce(sum(h.amount) FILTER"
            " (WHERE h.status = 'held'), 0) AS holds"
            " FROM wallets w LEFT JOIN holds h ON h.wallet_id = w.id"
            " WHERE w.id = any($1::uuid[]) GROUP BY w.id, w.held",
            self.wallets,
        )
        for r in held:
            if r["held"] != r["holds"]:
                self.problem(f"wallet {r['id']} holds {r['held']}, its holds {r['holds']}")

    def twins(self) -> None:
        """The sends of one key at once: all answered alike (the ledger holds it once:
        `nothing_unsent`, `answered`)."""
        groups: dict[str, list[Sent]] = {}
        for op in self.sent:
            if op.role == TWIN:
                groups.setdefault(op.key, []).append(op)
        for key, group in groups.items():
            self.report.hostile["twin_keys"] += 1
            self.report.hostile["twin_sends"] += len(group)
            answers = {
                (status, json.dumps(json.loads(body), sort_keys=True))
                for op in group
                for status, body in zip(op.statuses, op.bodies or [], strict=True)
                if status in DEFINITE
            }
            if len(answers) != 1:
                self.problem(f"key {key} sent {len(group)} times at once: answers {answers}")

    async def ownership(self) -> None:
        """Every shard has one owner among the live workers, evenly, as PostgreSQL records
        it too."""
        processes = self.stage.processes

        async def settled() -> bool:
            live = {str(w.pid) for w in processes.live_workers()}
            owners = await self.stage.lease_owners()
            recorded = dict(await self.pg.fetch("SELECT shard, owner FROM shards"))
            counts = Counter(owner_pid(o) for o in owners if o)
            return (
                all(owners)
                and all(recorded.get(s) == o for s, o in enumerate(owners))
                and set(counts) == live
                and max(counts.values()) - min(counts.values()) <= 1
            )

        try:
            await until(settled, LEASE_TTL * 10, "every shard to have one owner, evenly")
        except TimeoutError as e:
            self.problem(str(e))

    def processes(self) -> None:
        """Every process the run did not kill is still running, and none hit an error it
        did not handle."""
        processes = self.stage.processes
        for process in [*processes.workers, processes.api]:
            if process is None or process.pid in self.stage.killed:
                continue
            log = processes.log_of(process)
            if process.poll() is not None:
                self.problem(f"pid {process.pid} exited ({process.returncode}):\n{log[-3000:]}")
            elif "Traceback" in log:
                at = log.index("Traceback")
                self.problem(f"pid {process.pid} logged a traceback:\n{log[at : at + 3000]}")

    def fence(self) -> None:
        """The worker stopped inside a batch had that batch refused by its fence."""
        paused = self.stage.paused
        if paused is None:
            return
        log = self.stage.processes.log_of(paused)
        self.report.fenced_refusals = log.count(REFUSED)
        if not self.report.fenced_refusals:
            self.problem(
                f"the paused worker (pid {paused.pid}) had no batch refused; its log "
                f"ends:\n{log[-3000:]}"
            )

    def problem(self, text: str) -> None:
        self.report.problem(text)
