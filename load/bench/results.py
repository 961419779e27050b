"""What each design's turn at a phase measured, and the run's results together."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from load.bench.phases import Design, Kind, Load, Model, Phase


@dataclasses.dataclass
class Result:
    phase: Phase
    design: Design
    target_rate: int  # requests started per second (open model); 0 in a closed loop
    seconds: float
    sent: int = 0
    latencies: list[float] = dataclasses.field(default_factory=list)
    statuses: dict[int, int] = dataclasses.field(default_factory=dict)
    errors: int = 0
    elapsed: float = 0.0
    generator_cpu: float = 0.0
    server_cpu: dict[str, float] = dataclasses.field(default_factory=dict)
    commits: int | None = None
    operations: int | None = None
    wal_bytes: int | None = None  # WAL PostgreSQL wrote during the phase (all of its databases)
    balance_ok: bool | None = None

    @property
    def completed(self) -> int:
        return sum(self.statuses.values())

    @property
    def bad(self) -> int:
        """Answers other than 200 (201: a hold placed) and 409, and requests that got no
        answer."""
        return self.errors + sum(n for s, n in self.statuses.items() if s not in (200, 201, 409))

    @property
    def rate(self) -> float:
        """Requests answered per second."""
        return self.completed / self.elapsed if self.elapsed else 0.0

    def percentile(self, p: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000

    def sustained(self, p99_limit_ms: float) -> bool:
        return (
            self.completed >= 0.95 * self.target_rate * self.seconds
            and self.bad == 0
            and self.percentile(99) <= p99_limit_ms
        )

    @classmethod
    def merged(cls, results: list[Result]) -> Result:
        """Repeats of one closed-loop phase as one: their requests, time and CPU together."""
        first = results[0]
        merged = cls(first.phase, first.design, 0, sum(r.seconds for r in results))
        for r in results:
            merged.latencies += r.latencies
            for status, n in r.statuses.items():
                merged.statuses[status] = merged.statuses.get(status, 0) + n
            merged.errors += r.errors
            merged.sent += r.sent
            merged.elapsed += r.elapsed
            merged.commits = (merged.commits or 0) + (r.commits or 0)
            merged.operations = (merged.operations or 0) + (r.operations or 0)
            merged.wal_bytes = (merged.wal_bytes or 0) + (r.wal_bytes or 0)
        merged.generator_cpu = sum(r.generator_cpu * r.elapsed for r in results) / merged.elapsed
        merged.server_cpu = {
            name: sum(r.server_cpu.get(name, 0.0) * r.elapsed for r in results) / merged.elapsed
            for name in dict.fromkeys(name for r in results for name in r.server_cpu)
        }
        merged.balance_ok = all(r.balance_ok for r in results)
        return merged


def best_row_lock(results: Iterable[Result], phase: Phase) -> Result | None:
    """The row lock's result of `phase` with the most requests answered per second, of its
    process counts."""
    return max(
        (r for r in results if r.phase == phase and r.design.reference),
        key=lambda r: r.rate,
        default=None,
    )


@dataclasses.dataclass
class Results:
    runs: list[Result] = dataclasses.field(default_factory=list)  # in the order they ran
    # the highest rate each design sustained in each search
    best: dict[tuple[Phase, Design], int] = dataclasses.field(default_factory=dict)

    def select(self, closed: bool, load: Load) -> list[Result]:
        """The results of the closed loop's phases or the open model's, of one load, in the
        order they ran."""
        return [
            r
            for r in self.runs
            if (r.phase.model is Model.CLOSED) == closed and r.phase.load is load
        ]

    def closed_summary(self, load: Load = Load.OPERATIONS) -> list[Result]:
        """The closed-loop results, the repeats of each (--repeat) merged into one; each
        phase's designs in one order, whichever ran first: the service, the others, the row
        lock."""
        by_phase: dict[tuple[Phase, Design], list[Result]] = {}
        for r in self.select(closed=True, load=load):
            by_phase.setdefault((r.phase, r.design), []).append(r)
        phases = list(dict.fromkeys(phase for phase, _ in by_phase))

        def rank(design: Design) -> int:
            return 0 if design.kind is Kind.SERVICE else 2 if design.reference else 1

        order = sorted(by_phase, key=lambda key: (phases.index(key[0]), rank(key[1])))
        return [Result.merged(by_phase[key]) for key in order]

    def found(self, phase: Phase, design: Design) -> Result | None:
        """The design's result of `phase` (the row lock's: the best of its process counts);
        a closed loop's repeats merged."""
        if phase.model is Model.CLOSED:
            pool = self.closed_summary(phase.load)
        else:
            pool = self.select(closed=False, load=phase.load)
        if design.reference:
            return best_row_lock(pool, phase)
        return next((r for r in pool if r.phase == phase and r.design == design), None)

    def highest(self, phase: Phase, design: Design) -> int | None:
        """The highest rate the design sustained in the search `phase` (the row lock's: the
        best of its process counts)."""
        found = [
            rate
            for (p, d), rate in self.best.items()
            if p == phase and (d == design or (design.reference and d.reference))
        ]
        return max(found) if found else None
