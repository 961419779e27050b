"""The report: the tables of the phases and of the targets, the run's heading, and where
`--update-docs` writes them (docs/benchmarks.md, between its markers)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from devtools.processes import ROOT
from load.bench.phases import Load, Model
from load.bench.results import Result, Results, best_row_lock
from load.bench.targets import Row

BENCHMARKS = ROOT / "docs" / "benchmarks.md"  # --update-docs rewrites its marked block
MARK_START, MARK_END = "<!-- bench:start -->", "<!-- bench:end -->"
# A --holds-only run's tables have a block of their own, so that they do not replace the
# full run's; a full run that holds them too empties it.
HOLD_MARKS = ("<!-- bench:holds:start -->", "<!-- bench:holds:end -->")
IN_THE_FULL_RUN = "The hold phases are in the run above."


def table(results: list[Result]) -> str:
    """The open-model phases."""
    head = (
        "| phase | design | target/s | achieved/s | p50 ms | p95 ms | p99 ms | max ms "
        "| non-2xx (409s apart) | 409s | commits/op | mean batch | balances "
        "| server CPU (cores) | generator CPU | CPU µs/op |"
    )
    lines = [head, "|" + "---|" * 16]
    for r in results:
        lines.append(
            f"| {r.phase.name} | {r.design} | {r.target_rate} | {r.completed / r.elapsed:.0f} "
            f"| {r.percentile(50):.1f} | {r.percentile(95):.1f} | {r.percentile(99):.1f} "
            f"| {r.percentile(100):.1f} | {r.bad} | {r.statuses.get(409, 0)} "
            f"| {commits_per_op(r)} | {mean_batch(r)} | {balance_check(r)} "
            f"| {server_cpu(r)} | {r.generator_cpu:.0%} | {cpu_per_request(r)} |"
        )
    return "\n".join(lines)


def closed_table(results: list[Result]) -> str:
    """The closed-loop phases, each row but the row lock's with its ratio to the row lock's
    best."""
    head = (
        "| clients | design | req/s | vs row lock | p50 ms | p99 ms | max ms | non-2xx "
        "| mean batch | WAL B/op | balances | server CPU (cores) | generator CPU | CPU µs/op |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in results:
        reference = best_row_lock(results, r.phase)
        ratio = "-"
        if not r.design.reference and reference is not None and reference.rate:
            ratio = f"{r.rate / reference.rate:.2f}x"
        lines.append(
            f"| {r.phase.name} | {r.design} | {r.rate:.0f} | {ratio} | {r.percentile(50):.2f} "
            f"| {r.percentile(99):.1f} | {r.percentile(100):.1f} | {r.bad} | {mean_batch(r)} "
            f"| {wal_per_op(r)} | {balance_check(r)} | {server_cpu(r)} | {r.generator_cpu:.0%} "
            f"| {cpu_per_request(r)} |"
        )
    return "\n".join(lines)


def line(result: Result) -> str:
    """The result's row of its table, printed as its phase ends."""
    tabled = closed_table if result.phase.model is Model.CLOSED else table
    return tabled([result]).splitlines()[-1]


def balance_check(r: Result) -> str:
    if r.balance_ok is None:
        return "-"
    if not r.balance_ok:
        return "MISMATCH"
    return "exact" if r.bad == 0 else "exact by the ledger (answers missing)"


def commits_per_op(r: Result) -> str:
    return f"{r.commits / r.operations:.3f}" if r.commits and r.operations else "-"


def wal_per_op(r: Result) -> str:
    return f"{r.wal_bytes / r.operations:.0f}" if r.wal_bytes and r.operations else "-"


def mean_batch(r: Result) -> str:
    return f"{r.operations / r.commits:.1f}" if r.commits and r.operations else "-"


def server_cpu(r: Result) -> str:
    return ", ".join(f"{name} {cores:.2f}" for name, cores in r.server_cpu.items()) or "-"


def cpu_per_request(r: Result) -> str:
    """Each process kind's CPU per request answered, in microseconds: what a request costs
    the machine, where the cores show what the phase took of it."""
    if not r.completed:
        return "-"
    cpu = r.server_cpu | {"generator": r.generator_cpu}
    per_request = r.elapsed / r.completed * 1e6
    return ", ".join(f"{name} {cores * per_request:.0f}" for name, cores in cpu.items())


def targets_table(rows: list[Row]) -> str:
    lines = ["| target | measured | met |", "|---|---|---|"]
    lines += [
        f"| {what} | {measured} | {'yes' if met else '**no**'} |" for what, measured, met in rows
    ]
    return "\n".join(lines)


def report(heading: str, results: Results, rows: list[Row]) -> str:
    """The whole report: the heading, each table that has rows, the targets."""
    parts = [heading]
    if closed := results.closed_summary():
        parts += [
            "Closed loop (deposits of 0.01; each connection sends its next request when the "
            "answer to the last is in):",
            closed_table(closed),
        ]
    if opened := results.select(closed=False, load=Load.OPERATIONS):
        parts += ["Open model (deposits and withdrawals at a constant rate):", table(opened)]
    if results.select(closed=True, load=Load.TRANSFERS):
        parts += [
            "Transfers of 1.00 to 10.00, closed loop (a hot destination receiving from many "
            "sources, a hot source paying many destinations, and transfers among many "
            "wallets at random):",
            closed_table(results.closed_summary(Load.TRANSFERS)),
        ]
    if opened := results.select(closed=False, load=Load.TRANSFERS):
        parts += ["Transfers, open model:", table(opened)]
    if results.select(closed=True, load=Load.HOLDS):
        parts += [
            "Holds of 1.00 to 10.00, closed loop (each placed under a key the client chose, "
            "then captured whole on the same connection once placed: two requests, both "
            "counted):",
            closed_table(results.closed_summary(Load.HOLDS)),
        ]
    if opened := results.select(closed=False, load=Load.HOLDS):
        parts += [
            "Holds, open model (a hold and its capture are two requests of the rate: the "
            "capture is sent once the hold is answered, and timed from then):",
            table(opened),
        ]
    parts += ["Targets:", targets_table(rows)]
    return "\n\n".join(parts)


def heading(command: str, date: str, configured: bool, api_processes: int) -> str:
    """What ran, when, where, on which servers and with how many API processes."""
    return (
        f"`{command}` on {date}, {machine()}; "
        f"{'configured' if configured else 'embedded'} PostgreSQL and "
        f"Redis, load generator, service and reference all on this machine; "
        f"{processes_note(api_processes)}."
    )


def processes_note(count: int) -> str:
    if count == 1:
        return "one API process for each design"
    return (
        f"{count} API processes for each design, sharing its port (REUSE_PORT); the row "
        "lock also with one, and each ratio is to its better figure"
    )


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for text in Path("/proc/cpuinfo").read_text().splitlines():
            if text.startswith("model name"):
                cpu = text.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    return f"{os.cpu_count()} cores ({cpu}){mem}, Python {platform.python_version()}"


def update_docs(
    report: str, page: Path = BENCHMARKS, marks: tuple[str, str] = (MARK_START, MARK_END)
) -> None:
    """Puts `report` between the page's `marks`, leaving the rest of it as it is."""
    text = page.read_text()
    first, last = marks
    if text.count(first) != 1 or text.count(last) != 1:
        raise ValueError(f"{page} must hold {first} and {last} once each")
    start, end = text.index(first) + len(first), text.index(last)
    if end < start:
        raise ValueError(f"{page}: {last} comes before {first}")
    page.write_text(text[:start] + "\n" + report + "\n" + text[end:])
