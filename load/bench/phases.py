"""What a run measures: the designs, the phases as typed values, and the plan that puts each
design through each phase in turn."""

from __future__ import annotations

import argparse
import dataclasses
import enum
from collections.abc import Collection, Sequence

MANY_WALLETS = 10_000  # the search for the highest rate over many wallets, and a closed loop
# (connections, wallets) of the closed-loop phases
CLOSED_LOOPS = [(1, 1), (8, 1), (64, 1), (256, 1), (64, 1000), (64, MANY_WALLETS)]
SMOKE_CLOSED_LOOPS = [(1, 1), (8, 1)]
TRANSFER_WALLETS, TRANSFER_CONNECTIONS = 1000, 64
SMOKE_TRANSFER_WALLETS, SMOKE_TRANSFER_CONNECTIONS = 20, 8
# (connections, wallets) of the closed-loop hold phases; the constant rate is on one wallet
HOLD_LOOPS = [(64, 1), (64, 1000)]
SMOKE_HOLD_LOOPS = [(8, 1)]
# The steps of the searches for the highest rates: steps of 500 to the service's top, fine
# enough to compare two of its highest rates.
SERVICE_RATES = [*range(500, 8001, 500), 9000, 10000]
ROW_LOCK_RATES = [250, 500, 750, 1000, 1250, 1500, 2000, 2500]
SERVICE_TRANSFER_RATES = [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000, 5000, 6000, 8000]
ROW_LOCK_TRANSFER_RATES = [100, 250, 500, 750, 1000, 1250, 1500, 2000, 2500, 3000]


class Kind(enum.StrEnum):
    SERVICE = "service"
    ONE_PROCESS = "service, 1 API process"  # --one-process-too
    ON_CLUSTER = "service on Redis Cluster"  # --redis-cluster
    BASELINE = "service at"  # --baseline: the service as another git ref has it
    ROW_LOCK = "row lock"  # the reference


@dataclasses.dataclass(frozen=True)
class Design:
    kind: Kind
    processes: int = 1  # the row lock's API processes (the service's are --api-processes)
    ref: str = ""  # the baseline's git ref

    def __str__(self) -> str:
        if self.kind is Kind.BASELINE:
            return f"{self.kind.value} {self.ref}"
        if self.kind is Kind.ROW_LOCK and self.processes > 1:
            return f"{self.kind.value}, {self.processes} processes"
        return self.kind.value

    @property
    def reference(self) -> bool:
        """The row lock, with one API process or several."""
        return self.kind is Kind.ROW_LOCK


SERVICE = Design(Kind.SERVICE)
ROW_LOCK = Design(Kind.ROW_LOCK)


class Model(enum.Enum):
    CLOSED = "closed loop"  # each connection sends its next request once answered
    CONSTANT = "constant rate"  # open model: requests start on schedule
    SEARCH = "highest rate"  # open model, rising in steps until not sustained


class Shape(enum.Enum):
    """Whom transfers go between: `n` wallets and a hot one, or `n` wallets at random."""

    TO_ONE = "{n} wallets -> 1"
    FROM_ONE = "1 -> {n} wallets"
    AMONG = "among {n} wallets"


SHAPES = list(Shape)


class Load(enum.Enum):
    """What a phase sends; each has tables of its own."""

    OPERATIONS = "deposits and withdrawals"
    TRANSFERS = "transfers"
    HOLDS = "holds placed and captured"


@dataclasses.dataclass(frozen=True)
class Phase:
    model: Model
    wallets: int  # the wallets it spreads over (a transfer shape's `n`)
    connections: int = 0  # closed loop
    rate: int = 0  # constant rate, per second
    transfers: Shape | None = None  # transfers of this shape; deposits and withdrawals if None
    interval: float | None = None  # the worker restarted with this BATCH_INTERVAL first
    holds: bool = False  # holds, each placed and then captured: two requests

    @property
    def load(self) -> Load:
        if self.transfers is not None:
            return Load.TRANSFERS
        return Load.HOLDS if self.holds else Load.OPERATIONS

    @property
    def requests_per_slot(self) -> int:
        """The requests one slot of the open model's schedule carries: a hold and its
        capture are two of its rate."""
        return 2 if self.holds else 1

    @property
    def name(self) -> str:
        """The phase's name in the tables."""
        what = wallets_name(self.wallets)
        if self.transfers is not None:
            what = "transfers " + self.transfers.value.format(n=self.wallets)
        if self.holds:
            what = f"holds on {what}"
        if self.model is Model.CLOSED:
            plural = "s" if self.connections > 1 else ""
            return f"{self.connections} connection{plural}, {what}"
        if self.model is Model.SEARCH:
            return f"max {what}" if self.transfers else f"max on {what}"
        if self.interval is not None:
            return f"{self.rate}/s, BATCH_INTERVAL={self.interval}"
        return (
            f"{self.rate}/s on {what}" if self.load is Load.OPERATIONS else f"{self.rate}/s, {what}"
        )


def wallets_name(count: int) -> str:
    return "1 wallet" if count == 1 else f"{count} wallets"


def closed(connections: int, wallets: int) -> Phase:
    return Phase(Model.CLOSED, wallets, connections=connections)


def constant(rate: int, wallets: int) -> Phase:
    return Phase(Model.CONSTANT, wallets, rate=rate)


def search(wallets: int, transfers: Shape | None = None) -> Phase:
    return Phase(Model.SEARCH, wallets, transfers=transfers)


def hold_loop(connections: int, wallets: int) -> Phase:
    return Phase(Model.CLOSED, wallets, connections=connections, holds=True)


def hold_rate(rate: int) -> Phase:
    """Holds at a constant `rate` of requests on one wallet, a hold and its capture two."""
    return Phase(Model.CONSTANT, 1, rate=rate, holds=True)


@dataclasses.dataclass(frozen=True)
class Step:
    """One design's turn at a phase: for `seconds`, or, in a search, for `seconds` at each of
    `rates` in turn until one is not sustained."""

    phase: Phase
    design: Design
    seconds: float
    rates: tuple[int, ...] = ()


def plan(
    args: argparse.Namespace,
    designs: Sequence[Design],
    transferring: Collection[Design],
    holding: Collection[Design],
) -> list[Step]:
    """The run's steps in order: the closed loops, the open model, the transfers (by the
    designs in `transferring`), the holds (by those in `holding`), the BATCH_INTERVAL
    phases; or, with --transfers-only or --holds-only, those alone; with --deposits-only,
    all but the transfers and the holds."""
    if args.deposits_only:
        transferring = holding = ()
    if args.transfers_only or args.holds_only:
        return [
            *(transfer_steps(args, designs, transferring) if args.transfers_only else []),
            *(hold_steps(args, [d for d in designs if d in holding]) if args.holds_only else []),
        ]
    return [
        *closed_steps(args, designs),
        *open_steps(args, designs),
        *transfer_steps(args, designs, transferring),
        *hold_steps(args, [d for d in designs if d in holding]),
        *(
            Step(
                Phase(Model.CONSTANT, 1, rate=args.rate, interval=i), SERVICE, args.interval_seconds
            )
            for i in args.intervals
        ),
    ]


def in_turn(designs: Sequence[Design], index: int, per_round: int) -> list[Design]:
    """The designs in the order of the index-th phase: who goes first changes from phase to
    phase, as the one after another's phase meets its leftovers (autovacuum, a warm or a
    cold cache)."""
    first = (index % per_round + index // per_round) % len(designs)
    return [*designs[first:], *designs[:first]]


def closed_steps(args: argparse.Namespace, designs: Sequence[Design]) -> list[Step]:
    loops = [loop for _ in range(args.repeat) for loop in args.closed_loops]
    return [
        Step(closed(connections, wallets), design, args.closed_seconds)
        for index, (connections, wallets) in enumerate(loops)
        for design in in_turn(designs, index, len(args.closed_loops))
    ]


def open_steps(args: argparse.Namespace, designs: Sequence[Design]) -> list[Step]:
    """The constant rate, then each design's highest rate on one wallet and the service's
    (and with --one-process-too, its one process's) over many."""
    if args.closed_only:
        return []
    rate = constant(args.rate, args.rate_wallets)
    steps = [Step(rate, design, args.seconds) for design in designs]
    if args.smoke or args.constant_only:
        return steps
    for design in designs:
        rates = ROW_LOCK_RATES if design.reference else SERVICE_RATES
        steps.append(Step(search(1), design, args.step_seconds, tuple(rates)))
    many = [d for d in designs if d.kind in (Kind.SERVICE, Kind.ONE_PROCESS)]
    return steps + [
        Step(search(MANY_WALLETS), d, args.step_seconds, tuple(SERVICE_RATES)) for d in many
    ]


def transfer_steps(
    args: argparse.Namespace, designs: Sequence[Design], transferring: Collection[Design]
) -> list[Step]:
    """Transfers to a hot destination, from a hot source and among many wallets: a closed
    loop, a constant rate, and the highest rate each design sustains on the hot destination."""
    count, connections = (
        (SMOKE_TRANSFER_WALLETS, SMOKE_TRANSFER_CONNECTIONS)
        if args.smoke
        else (TRANSFER_WALLETS, TRANSFER_CONNECTIONS)
    )

    def turns(rounds: int, phase_of: list[Phase], seconds: float) -> list[Step]:
        return [
            Step(phase_of[index % 3], design, seconds)
            for index in range(rounds)
            for design in in_turn(designs, index, 3)
            if design in transferring
        ]

    loops = [Phase(Model.CLOSED, count, connections, transfers=s) for s in SHAPES]
    steps = turns(3 * args.repeat, loops, args.closed_seconds)
    if args.closed_only:
        return steps
    rates = [Phase(Model.CONSTANT, count, rate=args.transfer_rate, transfers=s) for s in SHAPES]
    steps += turns(3, rates, args.transfer_seconds)
    if args.smoke or args.constant_only:
        return steps
    hot = search(count, Shape.TO_ONE)
    for design in designs:
        if design.kind in (Kind.SERVICE, Kind.ONE_PROCESS, Kind.ROW_LOCK):
            steps_of = ROW_LOCK_TRANSFER_RATES if design.reference else SERVICE_TRANSFER_RATES
            steps.append(Step(hot, design, args.step_seconds, tuple(steps_of)))
    return steps


def hold_steps(args: argparse.Namespace, designs: Sequence[Design]) -> list[Step]:
    """Holds placed and captured: the closed loops on one wallet and over many, the designs
    taking turns at going first, then the constant rate on one wallet."""
    if not designs:
        return []
    loops = SMOKE_HOLD_LOOPS if args.smoke else HOLD_LOOPS
    rounds = [loop for _ in range(args.repeat) for loop in loops]
    steps = [
        Step(hold_loop(connections, wallets), design, args.closed_seconds)
        for index, (connections, wallets) in enumerate(rounds)
        for design in in_turn(designs, index, len(loops))
    ]
    if args.closed_only:
        return steps
    return steps + [Step(hold_rate(args.hold_rate), d, args.hold_seconds) for d in designs]
