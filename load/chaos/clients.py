"""The honest clients and the record of every request sent (the hostile client's too), with
every answer: deposits and withdrawals with Idempotency-Keys on the hot wallet and the
others, a third of what they send the planned transfers, and holds: placed, then captured
(in part, and paid to a wallet, now and then), voided, raced, or left to expire."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid

import aiohttp

from load.chaos.report import Report
from load.chaos.schedule import planned_transfer
from load.chaos.stage import REPLY_TIMEOUT
from shared.codec import DEPOSIT, TRANSFER, WITHDRAW, Kind
from shared.ids import client_operation_id, hold_id_for, hold_step_id, transfer_id_for
from shared.money import format_minor

FUNDING_MINOR = 50_000  # 500.00 for each wallet, so that withdrawals are refused now and then
PROBE_MINOR = 100  # each recovery probe deposits 1.00
DEFINITE = (200, 201, 409, 422)  # answers that tell what became of a request
HOLD_SHARE = 0.2  # of an honest client's turns, a hold and what ends it
# A hold's expires_in: some expire within the run, the rest outlive it.
EXPIRIES = (1, 2, 3, 3600)
# The hostile client's roles; an honest client's requests have none.
SQUAT, REUSE, TWIN = "squat", "reuse", "twin"


@dataclasses.dataclass
class Sent:
    key: str
    wallet: str  # a transfer's source, a hold's wallet
    kind: str  # DEPOSIT, WITHDRAW, TRANSFER, HOLD, HOLD_CAPTURE or HOLD_VOID
    minor: int
    statuses: list[int]  # every answer, in order; 0 for none (timeout, connection lost)
    to: str = ""  # a transfer's destination
    role: str = ""  # the hostile client's: SQUAT, REUSE or TWIN
    of: Sent | None = None  # the honest request whose key a reuse sends again
    bodies: list[bytes] | None = None  # every answer's body, where kept (twins)
    hold: str = ""  # the hold a capture or void ends
    expires_in: int = 0  # a hold's

    @property
    def final(self) -> int:
        return self.statuses[-1]

    @property
    def transfer_id(self) -> str:
        return transfer_id_for(self.wallet, self.key)

    @property
    def op_id(self) -> str:
        """The id of its ledger row on `wallet`."""
        if self.kind == Kind.HOLD:
            return hold_id_for(self.wallet, self.key)
        if self.hold:
            return hold_step_id(self.hold, self.key)
        return client_operation_id(self.key)


class Clients:
    def __init__(self, http: aiohttp.ClientSession, seed: int, report: Report) -> None:
        self.http, self.seed, self.report = http, seed, report
        self.sent: list[Sent] = []
        self.wallets: list[str] = []
        self.hot = ""  # wallets[0]
        self.load_over = False
        self.transfers_taken = 0  # how many planned transfers the honest clients have sent
        self.planned_sent: dict[int, Sent] = {}  # the honest clients' n-th transfer

    async def operate(self, op: Sent) -> None:
        """Sends the request and records its answer."""
        body: dict[str, object]
        if op.kind == TRANSFER:
            url = "/api/v1/transfers"
            body = {"from": op.wallet, "to": op.to, "amount": format_minor(op.minor)}
        elif op.kind == Kind.HOLD:
            url = f"/api/v1/wallets/{op.wallet}/holds"
            body = {"amount": format_minor(op.minor), "expires_in": op.expires_in}
        elif op.hold:
            action = "capture" if op.kind == Kind.HOLD_CAPTURE else "void"
            url = f"/api/v1/holds/{op.hold}/{action}"
            body = {"amount": format_minor(op.minor)} if action == "capture" else {}
            if op.to:
                body["to"] = op.to
        else:
            url = f"/api/v1/wallets/{op.wallet}/operation"
            body = {"operationType": op.kind, "amount": format_minor(op.minor)}
        try:
            async with self.http.post(url, json=body, headers={"Idempotency-Key": op.key}) as r:
                answer = await r.read()
                op.statuses.append(r.status)
        except (aiohttp.ClientError, TimeoutError):
            answer = b""
            op.statuses.append(0)
        if op.bodies is not None:
            op.bodies.append(answer)
        self.report.answers[op.statuses[-1]] += 1

    async def set_up_wallets(self, count: int) -> None:
        """The hot wallet and `count` others, each funded."""
        for _ in range(count + 1):
            async with self.http.post("/api/v1/wallets") as r:
                self.wallets.append((await r.json())["id"])
        self.hot = self.wallets[0]
        funding = [Sent(str(uuid.uuid4()), w, DEPOSIT, FUNDING_MINOR, []) for w in self.wallets]
        self.sent += funding
        await asyncio.gather(*(self.operate(op) for op in funding))

    async def client(self, rng: random.Random, think: float) -> None:
        """One honest client, until the load is over: half of its requests on the hot
        wallet."""
        while not self.load_over:
            wallet = self.hot if rng.random() < 0.5 else rng.choice(self.wallets[1:])
            minor = rng.randrange(1, 200) * 100
            if rng.random() < HOLD_SHARE:
                await self.hold_and_end(rng, wallet, minor)
                await asyncio.sleep(think)
                continue
            if rng.random() < 1 / 3:
                # A third are transfers, the next of the plan.
                p = planned_transfer(self.seed, self.transfers_taken, self.wallets)
                op = Sent(p.key, p.source, TRANSFER, p.minor, [], to=p.destination)
                self.planned_sent[self.transfers_taken] = op
                self.transfers_taken += 1
            else:
                kind = DEPOSIT if rng.random() < 0.45 else WITHDRAW
                op = Sent(str(uuid.uuid4()), wallet, kind, minor, [])
            self.sent.append(op)
            await self.operate(op)
            await asyncio.sleep(think)

    async def hold_and_end(self, rng: random.Random, wallet: str, minor: int) -> None:
        """A hold placed, then: captured (all or part; paid to another wallet a third of
        the time), voided, a capture and a void sent at once, or left to expire."""
        hold = Sent(str(uuid.uuid4()), wallet, Kind.HOLD, minor, [])
        hold.expires_in = rng.choice(EXPIRIES)
        self.sent.append(hold)
        await self.operate(hold)
        if hold.final != 201:
            return
        hold_id = hold.op_id
        choice = rng.random()
        if choice < 0.2:
            return  # it expires, or outlives the run
        capture = Sent(str(uuid.uuid4()), wallet, Kind.HOLD_CAPTURE, minor, [], hold=hold_id)
        capture.minor = rng.randrange(1, minor // 100 + 1) * 100
        if rng.random() < 1 / 3:
            capture.to = rng.choice([w for w in self.wallets if w != wallet])
        void = Sent(str(uuid.uuid4()), wallet, Kind.HOLD_VOID, minor, [], hold=hold_id)
        ends = [capture] if choice < 0.6 else [void] if choice < 0.8 else [capture, void]
        self.sent += ends
        await asyncio.gather(*(self.operate(op) for op in ends))

    async def served_again(self, since: float, bound: float) -> float:
        """Sends every wallet a deposit, and again while it is not answered 200: the time
        from `since` (a fault) to the last wallet's 200, infinite past the bound and a
        reply's timeout."""

        async def served(wallet: str) -> float:
            while time.monotonic() - since < bound + REPLY_TIMEOUT:
                probe = Sent(str(uuid.uuid4()), wallet, DEPOSIT, PROBE_MINOR, [])
                self.sent.append(probe)
                await self.operate(probe)
                if probe.final == 200:
                    return time.monotonic() - since
                await asyncio.sleep(0.05)
            return float("inf")

        return max(await asyncio.gather(*(served(w) for w in self.wallets)))

    async def resolve(self) -> None:
        """Sends every operation without a definite answer again, with its key, until it
        has one: the retry either finds it applied or refused, or applies it now (or, for
        a reused key, refuses it as reused)."""
        unknown = [op for op in self.sent if op.final not in DEFINITE]
        for attempt in range(20):
            if not unknown:
                break
            await asyncio.gather(*(self.operate(op) for op in unknown))
            unknown = [op for op in unknown if op.final not in DEFINITE]
            if unknown:
                await asyncio.sleep(min(2.0, 0.1 * 2**attempt))
        self.report.resolved = sum(1 for op in self.sent if len(op.statuses) > 1)
        for op in unknown:
            self.report.problem(f"operation {op.key} has no answer after retries: {op.statuses}")
