"""The targets the service is held to, as data: which phase, which measure, the bound, and
against which design's figure; and the judging of a run's results against them."""

from __future__ import annotations

import dataclasses
import enum
from typing import NamedTuple

from load.bench.phases import (
    MANY_WALLETS,
    ROW_LOCK,
    SERVICE,
    TRANSFER_WALLETS,
    Design,
    Load,
    Model,
    Phase,
    Shape,
    closed,
    constant,
    hold_loop,
    hold_rate,
    search,
)
from load.bench.results import Results


class Measure(enum.Enum):
    """A figure of the service's result; rates are held to a lower bound, latencies to an
    upper one."""

    RATE = "requests answered per second"  # a closed loop's (its repeats merged)
    P50 = "p50 latency, ms"
    P99 = "p99 latency, ms"
    HIGHEST = "highest rate sustained"  # a search's


LATENCIES = (Measure.P50, Measure.P99)


@dataclasses.dataclass(frozen=True)
class Target:
    """The service's `measure` in `phase`: for a rate, at least `bound` times that of
    `against` (the row lock: the better of its process counts); for a latency, at most
    `bound` times that of `against` plus `plus` ms, or at most `bound` ms if `against` is
    None. `against_phase` is the reference's phase where it is not `phase`."""

    what: str
    phase: Phase
    measure: Measure
    bound: float
    against: Design | None = None
    against_phase: Phase | None = None
    plus: float = 0.0
    no_errors: bool = False  # and not one request failed or went unanswered


class Row(NamedTuple):
    what: str
    measured: str
    met: bool


class Figure(NamedTuple):
    value: float
    errors: int


def targets(
    rate: int,
    rate_wallets: int,
    transfer_rate: int,
    holds_rate: int,
    baseline: Design | None = None,
) -> list[Target]:
    """The targets, in the order the report gives them; `rate`, `rate_wallets`,
    `transfer_rate` and `holds_rate` are the run's constant rates'."""
    against_baseline = [] if baseline is None else baseline_targets(baseline)
    return [
        *against_baseline,
        *closed_targets(),
        *open_targets(rate, rate_wallets, transfer_rate),
        *hold_targets(holds_rate),
    ]


def baseline_targets(baseline: Design) -> list[Target]:
    """Within noise of the code before a change (--baseline)."""
    return [
        Target(
            f"1 connection: at most 5% slower than {baseline}",
            closed(1, 1),
            Measure.RATE,
            0.95,
            baseline,
        ),
        Target(
            f"highest rate sustained on 1 wallet: at most 5% below {baseline}'s "
            "(in steps of the search)",
            search(1),
            Measure.HIGHEST,
            0.95,
            baseline,
        ),
    ]


def closed_targets() -> list[Target]:
    held_to = [
        Target(
            "1 connection: p50 at most 2x the row lock's + 1 ms",
            closed(1, 1),
            Measure.P50,
            2,
            ROW_LOCK,
            plus=1,
        )
    ]
    for connections, wallets, factor in ((8, 1, 1.5), (64, 1, 4), (256, 1, 5), (64, 1000, 2)):
        phase, no_errors = closed(connections, wallets), connections == 256
        what = f"{phase.name}: at least {factor}x the row lock's req/s"
        what += " with 0 errors" if no_errors else ""
        held_to.append(Target(what, phase, Measure.RATE, factor, ROW_LOCK, no_errors=no_errors))
    return held_to


def open_targets(rate: int, rate_wallets: int, transfer_rate: int) -> list[Target]:
    at_rate = constant(rate, rate_wallets)
    hot = Phase(Model.CONSTANT, TRANSFER_WALLETS, rate=transfer_rate, transfers=Shape.TO_ONE)
    return [
        Target(f"{at_rate.name}: p99 at most 25 ms", at_rate, Measure.P99, 25, no_errors=True),
        Target(
            "highest rate sustained on 1 wallet: at least 4x the row lock's",
            search(1),
            Measure.HIGHEST,
            4,
            ROW_LOCK,
        ),
        Target(
            "highest rate over 10,000 wallets: at least 80% of 1 wallet's",
            search(MANY_WALLETS),
            Measure.HIGHEST,
            0.8,
            SERVICE,
            against_phase=search(1),
        ),
        Target(
            f"transfers to a hot destination at {transfer_rate}/s: p99 at most 50 ms",
            hot,
            Measure.P99,
            50,
            no_errors=True,
        ),
        Target(
            "highest transfer rate sustained on a hot destination: at least 4x the row lock's",
            search(TRANSFER_WALLETS, Shape.TO_ONE),
            Measure.HIGHEST,
            4,
            ROW_LOCK,
        ),
    ]


def hold_targets(rate: int) -> list[Target]:
    at_rate = hold_rate(rate)
    return [
        Target(
            f"{hold_loop(64, 1).name}: at least 4x the row lock's req/s",
            hold_loop(64, 1),
            Measure.RATE,
            4,
            ROW_LOCK,
        ),
        Target(
            f"{at_rate.name} (a hold and its capture two requests): p99 at most 50 ms",
            at_rate,
            Measure.P99,
            50,
            no_errors=True,
        ),
    ]


def figure(results: Results, phase: Phase, design: Design, measure: Measure) -> Figure | None:
    """The design's `measure` in `phase`, with its failed requests; None if not measured."""
    if measure is Measure.HIGHEST:
        highest = results.highest(phase, design)
        return None if highest is None else Figure(highest, 0)
    found = results.found(phase, design)
    if found is None:
        return None
    if measure is Measure.RATE:
        return Figure(found.rate, found.bad)
    return Figure(found.percentile(50 if measure is Measure.P50 else 99), found.bad)


def judge(target: Target, results: Results) -> Row | None:
    """The target's row, or None where the run did not measure what it needs."""
    ours = figure(results, target.phase, SERVICE, target.measure)
    if ours is None:
        return None
    errors_ok = not target.no_errors or ours.errors == 0
    if target.against is None:
        measured = f"{ours.value:.1f} ms" + (f", {ours.errors} errors" if target.no_errors else "")
        return Row(target.what, measured, ours.value <= target.bound and errors_ok)
    reference = target.against_phase or target.phase
    theirs = figure(results, reference, target.against, target.measure)
    if theirs is None:
        return None
    if target.measure in LATENCIES:
        limit = target.bound * theirs.value + target.plus
        measured = f"{ours.value:.2f} ms against {theirs.value:.2f} ms (limit {limit:.2f})"
        return Row(target.what, measured, ours.value <= limit and errors_ok)
    if not theirs.value:
        none = (
            "sustained none of its rates" if target.measure is Measure.HIGHEST else "answered none"
        )
        return Row(target.what, f"{target.against} {none}: no ratio", False)
    ratio = ours.value / theirs.value
    unit = "/s" if target.measure is Measure.HIGHEST else ""
    errors = f", {ours.errors} errors" if target.no_errors else ""
    measured = f"{ratio:.2f}x ({ours.value:.0f}{unit} against {theirs.value:.0f}/s{errors})"
    return Row(target.what, measured, ratio >= target.bound and errors_ok)


def judged(results: Results, held_to: list[Target]) -> list[Row]:
    """The rows of the targets this run can judge, then the checks of the whole run: the
    service's transfers and holds, and the balances of every phase."""
    rows = [row for target in held_to if (row := judge(target, results)) is not None]
    checks = [
        (Load.TRANSFERS, "transfers: 0 errors, every balance and the conservation sum exact"),
        (
            Load.HOLDS,
            "holds: 0 errors, every balance, held and available figure and the conservation "
            "sum exact",
        ),
    ]
    for load, what in checks:
        runs = [
            r
            for r in results.runs
            if r.design == SERVICE and r.phase.load is load and r.phase.model is not Model.SEARCH
        ]
        if runs:
            failed = sum(r.bad for r in runs)
            exact = all(r.balance_ok for r in runs)
            measured = f"{failed} errors, " + ("exact" if exact else "NOT exact")
            rows.append(Row(what, measured, failed == 0 and exact))
    exact = all(r.balance_ok for r in results.runs)
    missing = sum(r.bad for r in results.runs)
    answers = f" ({missing} answers missing, checked against the ledger)" if missing else ""
    rows.append(Row("balances exact in every phase", ("yes" if exact else "no") + answers, exact))
    return rows


def failed(results: Results, rate_phase: Phase) -> bool:
    """A balance off anywhere, or a request of the service's failed in a closed loop or at
    the constant rate `rate_phase`: the run exits 1."""
    mismatched = any(r.balance_ok is False for r in results.runs)
    return mismatched or any(
        r.design == SERVICE and (r.bad > 0 or r.balance_ok is not True)
        for r in results.runs
        if r.phase.model is Model.CLOSED or r.phase == rate_phase
    )
