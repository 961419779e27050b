"""The benchmark's plan, judging and report, alone (no servers): the phases it runs and their
names in the tables, the targets judged from a small set of made-up results, each ratio to
the row lock's better figure, whichever of its process counts gave it (the bench runs it
with one API process and with as many as the service's); the hold workload's pairs and
the check of held amounts; each process kind's CPU per request, as read from /proc and
counted between two readings; and where `--update-docs` writes the report."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from devtools.processes import ROOT
from load.bench.__main__ import options
from load.bench.generator import Connection, Effects
from load.bench.phases import (
    ROW_LOCK,
    SERVICE,
    TRANSFER_WALLETS,
    Design,
    Kind,
    Model,
    Phase,
    Shape,
    closed,
    constant,
    hold_loop,
    hold_rate,
    plan,
    search,
)
from load.bench.report import (
    BENCHMARKS,
    HOLD_MARKS,
    MARK_END,
    MARK_START,
    closed_table,
    table,
    update_docs,
)
from load.bench.results import Result, Results
from load.bench.run import Reading, cores, held_exact, process_cpu
from load.bench.targets import Row, failed, judged, targets
from load.bench.workloads import Request, holds
from shared.ids import hold_id_for

SIXTY_FOUR = closed(64, 1)
ROW_LOCK_2 = Design(Kind.ROW_LOCK, 2)


def result(
    phase: Phase,
    design: Design,
    answered: int,
    seconds: float = 10.0,
    latency: float = 0.01,
    errors: int = 0,
) -> Result:
    made = Result(phase, design, phase.rate, seconds)
    made.statuses = {200: answered}
    made.errors = errors
    made.elapsed = seconds
    made.latencies = [latency] * 10
    made.balance_ok = True
    return made


def ratio_in_table(results: list[Result]) -> str:
    rows = [line.split(" | ") for line in closed_table(results).splitlines()[2:]]
    return next(row[3] for row in rows if row[1] == "service")


def row(rows: list[Row], starting: str) -> Row:
    return next(r for r in rows if r.what.startswith(starting))


def test_a_closed_loop_ratio_is_to_the_row_locks_better_process_count() -> None:
    service = result(SIXTY_FOUR, SERVICE, 40_000)
    one, two = result(SIXTY_FOUR, ROW_LOCK, 10_000), result(SIXTY_FOUR, ROW_LOCK_2, 8_000)
    assert ratio_in_table([service, one, two]) == "4.00x"
    slower = result(SIXTY_FOUR, ROW_LOCK, 5_000)
    assert ratio_in_table([service, slower, two]) == "5.00x"

    held_to = targets(1000, 1, 1000, 1000)
    rows = judged(Results(runs=[service, slower, two]), held_to)
    assert row(rows, SIXTY_FOUR.name)[1:] == ("5.00x (4000 against 800/s)", True)
    rows = judged(Results(runs=[service, one, two]), held_to)
    assert row(rows, SIXTY_FOUR.name)[1:] == ("4.00x (4000 against 1000/s)", True)


def test_the_highest_rate_ratio_is_to_the_row_locks_better_process_count() -> None:
    one_wallet = search(1)

    def measured(service: int, one: int, two: int) -> tuple[str, bool]:
        best = {(one_wallet, SERVICE): service, (one_wallet, ROW_LOCK): one}
        best[(one_wallet, ROW_LOCK_2)] = two
        found = row(
            judged(Results(best=best), targets(1000, 1, 1000, 1000)), "highest rate sustained"
        )
        return found.measured, found.met

    assert measured(4000, 1000, 750) == ("4.00x (4000/s against 1000/s)", True)
    assert measured(4000, 750, 1250) == ("3.20x (4000/s against 1250/s)", False)
    assert measured(4000, 0, 0) == ("row lock sustained none of its rates: no ratio", False)


def made_up_run() -> Results:
    """A run's results as the judging sees them: each design's closed loops, the constant
    rate, the searches' highest rates, and the transfers."""
    hot = Phase(Model.CONSTANT, TRANSFER_WALLETS, rate=1000, transfers=Shape.TO_ONE)
    hot_loop = Phase(Model.CLOSED, TRANSFER_WALLETS, 64, transfers=Shape.AMONG)
    runs = [
        result(closed(1, 1), SERVICE, 4000, latency=0.0025),
        result(closed(1, 1), ROW_LOCK, 4500, latency=0.002),
        result(closed(8, 1), SERVICE, 18_000),
        result(closed(8, 1), ROW_LOCK, 9_000),
        result(closed(256, 1), SERVICE, 49_000, errors=1),
        result(closed(256, 1), ROW_LOCK_2, 6_000),
        result(constant(1000, 1), SERVICE, 60_000, latency=0.030),
        result(constant(1000, 1), ROW_LOCK, 30_000, latency=20.0),
        result(hot, SERVICE, 30_000, latency=0.02),
        result(hot_loop, SERVICE, 20_000),
        result(hold_loop(64, 1), SERVICE, 30_000),
        result(hold_loop(64, 1), ROW_LOCK, 8_000),
        result(hold_loop(64, 1), ROW_LOCK_2, 6_000),
        result(hold_rate(1000), SERVICE, 30_000, latency=0.06),
    ]
    best = {
        (search(1), SERVICE): 2500,
        (search(1), ROW_LOCK): 500,
        (search(10_000), SERVICE): 1500,
    }
    return Results(runs=runs, best=best)


def test_the_targets_are_judged_from_the_phases_they_name() -> None:
    rows = judged(made_up_run(), targets(1000, 1, 1000, 1000))
    assert [(r.what, r.measured, r.met) for r in rows] == [
        (
            "1 connection: p50 at most 2x the row lock's + 1 ms",
            "2.50 ms against 2.00 ms (limit 5.00)",
            True,
        ),
        (
            "8 connections, 1 wallet: at least 1.5x the row lock's req/s",
            "2.00x (1800 against 900/s)",
            True,
        ),
        (
            "256 connections, 1 wallet: at least 5x the row lock's req/s with 0 errors",
            "8.17x (4900 against 600/s, 1 errors)",
            False,
        ),
        ("1000/s on 1 wallet: p99 at most 25 ms", "30.0 ms, 0 errors", False),
        (
            "highest rate sustained on 1 wallet: at least 4x the row lock's",
            "5.00x (2500/s against 500/s)",
            True,
        ),
        (
            "highest rate over 10,000 wallets: at least 80% of 1 wallet's",
            "0.60x (1500/s against 2500/s)",
            False,
        ),
        (
            "transfers to a hot destination at 1000/s: p99 at most 50 ms",
            "20.0 ms, 0 errors",
            True,
        ),
        (
            "64 connections, holds on 1 wallet: at least 4x the row lock's req/s",
            "3.75x (3000 against 800/s)",
            False,
        ),
        (
            "1000/s, holds on 1 wallet (a hold and its capture two requests): p99 at most 50 ms",
            "60.0 ms, 0 errors",
            False,
        ),
        (
            "transfers: 0 errors, every balance and the conservation sum exact",
            "0 errors, exact",
            True,
        ),
        (
            "holds: 0 errors, every balance, held and available figure and the conservation "
            "sum exact",
            "0 errors, exact",
            True,
        ),
        (
            "balances exact in every phase",
            "yes (1 answers missing, checked against the ledger)",
            True,
        ),
    ]
    # the phases not measured (64 connections, the transfer search) have no row


def test_a_target_against_the_baseline_and_a_run_that_fails() -> None:
    results = made_up_run()
    before = Design(Kind.BASELINE, ref="main")
    results.runs.append(result(closed(1, 1), before, 4400))
    rows = judged(results, targets(1000, 1, 1000, 1000, before))
    assert rows[0] == Row(
        "1 connection: at most 5% slower than service at main",
        "0.91x (400 against 440/s)",
        False,
    )
    # the service failed a request in a closed loop: the run exits 1
    assert failed(results, constant(1000, 1))
    results.runs = [r for r in results.runs if r.errors == 0]
    assert not failed(results, constant(1000, 1))
    results.runs[-1].balance_ok = False  # a balance off anywhere
    assert failed(results, constant(1000, 1))
    assert row(judged(results, []), "balances exact")[1:] == ("no", False)


def test_the_smoke_plan_runs_the_phases_the_tables_name() -> None:
    args = options(["--smoke", "--api-processes", "2", "--intervals", "0.01"])
    designs = [SERVICE, ROW_LOCK_2, ROW_LOCK]
    steps = plan(args, designs, designs, designs)
    names = list(dict.fromkeys(step.phase.name for step in steps))
    assert names == [
        "1 connection, 1 wallet",
        "8 connections, 1 wallet",
        "200/s on 1 wallet",
        "8 connections, transfers 20 wallets -> 1",
        "8 connections, transfers 1 -> 20 wallets",
        "8 connections, transfers among 20 wallets",
        "100/s, transfers 20 wallets -> 1",
        "100/s, transfers 1 -> 20 wallets",
        "100/s, transfers among 20 wallets",
        "8 connections, holds on 1 wallet",
        "100/s, holds on 1 wallet",
        "200/s, BATCH_INTERVAL=0.01",
    ]
    # the designs take turns at going first
    assert [str(s.design) for s in steps[:6]] == [
        "service",
        "row lock, 2 processes",
        "row lock",
        "row lock, 2 processes",
        "row lock",
        "service",
    ]
    assert not any(step.rates for step in steps)


def test_the_full_plan_searches_for_each_designs_highest_rates() -> None:
    args = options(["--api-processes", "2"])
    designs = [SERVICE, ROW_LOCK_2, ROW_LOCK]
    searches = [
        (s.phase.name, str(s.design)) for s in plan(args, designs, designs, designs) if s.rates
    ]
    assert searches == [
        ("max on 1 wallet", "service"),
        ("max on 1 wallet", "row lock, 2 processes"),
        ("max on 1 wallet", "row lock"),
        ("max on 10000 wallets", "service"),
        ("max transfers 1000 wallets -> 1", "service"),
        ("max transfers 1000 wallets -> 1", "row lock, 2 processes"),
        ("max transfers 1000 wallets -> 1", "row lock"),
    ]


def test_the_hold_phases_are_in_the_full_plan_and_alone_with_holds_only() -> None:
    designs = [SERVICE, ROW_LOCK_2, ROW_LOCK]
    before = Design(Kind.BASELINE, ref="before-holds")  # a baseline without holds
    holding = [SERVICE, ROW_LOCK_2, ROW_LOCK]
    full = plan(
        options(["--api-processes", "2"]), [SERVICE, before, ROW_LOCK_2, ROW_LOCK], designs, holding
    )
    held = [(s.phase.name, str(s.design)) for s in full if s.phase.holds]
    assert held == [
        ("64 connections, holds on 1 wallet", "service"),
        ("64 connections, holds on 1 wallet", "row lock, 2 processes"),
        ("64 connections, holds on 1 wallet", "row lock"),
        ("64 connections, holds on 1000 wallets", "row lock, 2 processes"),
        ("64 connections, holds on 1000 wallets", "row lock"),
        ("64 connections, holds on 1000 wallets", "service"),
        ("1000/s, holds on 1 wallet", "service"),
        ("1000/s, holds on 1 wallet", "row lock, 2 processes"),
        ("1000/s, holds on 1 wallet", "row lock"),
    ]
    alone = plan(options(["--holds-only", "--hold-rate", "800"]), designs, designs, holding)
    assert [(s.phase.name, str(s.design)) for s in alone if s.phase.model is Model.CONSTANT] == [
        ("800/s, holds on 1 wallet", "service"),
        ("800/s, holds on 1 wallet", "row lock, 2 processes"),
        ("800/s, holds on 1 wallet", "row lock"),
    ]
    assert all(s.phase.holds for s in alone)
    assert len(alone) == 9
    # a hold and its capture are two requests of the rate: the schedule's slots carry both
    assert hold_rate(1000).requests_per_slot == 2
    assert constant(1000, 1).requests_per_slot == 1


def test_a_hold_is_placed_under_its_key_and_then_captured_by_the_id_the_key_makes() -> None:
    wallets = ["0b5f5bd6-2f7e-4c1e-9d51-6c1f2d0f7a10", "6d1e0f1a-3b2c-4d5e-8f9a-0b1c2d3e4f50"]
    pick = holds(wallets)("127.0.0.1", random.Random(1))
    first, second = pick(), pick()
    head = first.raw.decode()
    wallet = next(w for w in wallets if f"/api/v1/wallets/{w}/holds " in head)
    key = head.split("Idempotency-Key: ")[1].split("\r\n")[0]
    assert first.then is not None
    assert first.then.then is None
    assert f"POST /api/v1/holds/{hold_id_for(wallet, key)}/capture " in first.then.raw.decode()
    assert first.then.raw.endswith(b"\r\n\r\n{}")
    # placing moves no balance, only what is held; the capture takes it out of both
    ((_, minor),) = first.holding
    assert first.moves == ()
    assert 100 <= minor <= 1000
    assert first.then.moves == first.then.holding == ((wallet, -minor),)
    assert key not in second.raw.decode()  # each hold a key of its own


class Wire:
    """A transport that keeps what the connection writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class Counted(Connection):
    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.ends = 0

    def answered(self) -> None:
        self.ends += 1


def answer(status: int) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: 2\r\n\r\n{}" % status


async def test_a_pairs_second_request_goes_out_once_the_first_succeeded() -> None:
    """On the same connection, before the slot ends; each request timed and counted."""
    capture = Request(b"capture", (("w", -100),), (("w", -100),))
    place = Request(b"place", (), (("w", 100),), capture)
    result = Result(hold_loop(1, 1), SERVICE, 0, 1)
    effects = Effects({"w": 0}, {"w": 0})
    connection = Counted(result, effects, asyncio.get_running_loop().create_future())
    wire = Wire()
    connection.connection_made(wire)  # type: ignore[arg-type]
    connection.send(0.0, place)
    connection.data_received(answer(201))
    assert (wire.written, connection.ends) == ([b"place", b"capture"], 0)
    assert effects == Effects({"w": 0}, {"w": 100})
    connection.data_received(answer(200))
    assert connection.ends == 1
    assert effects == Effects({"w": -100}, {"w": 0})
    assert (result.statuses, len(result.latencies)) == ({201: 1, 200: 1}, 2)
    # refused: nothing held, no capture sent, the slot ends
    connection.send(0.0, place)
    connection.data_received(answer(409))
    assert (wire.written[2:], connection.ends) == ([b"place"], 2)
    assert effects == Effects({"w": -100}, {"w": 0})


def held_row(held: int, holding: int, **ledger: Any) -> dict[str, Any]:
    row = {"id": "w", "balance": 1000, "held": held, "holding": holding}
    return row | {"balance_after": 1000, "held_after": held} | ledger


def test_held_amounts_are_checked_against_the_holds_the_ledger_and_the_answers() -> None:
    def exact(row: dict[str, Any], moved: int = 0, answered: bool = True) -> bool:
        return held_exact([row], {"w": 0}, Effects({"w": 0}, {"w": moved}), answered)

    assert exact(held_row(0, 0))
    assert exact(held_row(300, 300), moved=300)  # a capture failed: its hold still held
    assert not exact(held_row(300, 300))  # the answers said every hold was captured
    assert exact(held_row(300, 300), answered=False)  # answers missing: the ledger decides
    assert not exact(held_row(300, 200), moved=300)  # held is not what its holds add up to
    assert not exact(held_row(1200, 1200), moved=1200)  # above the balance: available < 0
    assert not exact(held_row(0, 0, held_after=100))  # the ledger's newest row says otherwise
    assert not exact(held_row(0, 0, balance_after=900))
    assert exact(held_row(0, 0, balance_after=None, held_after=None))  # no ledger rows yet
    assert not held_exact([], {"w": 0}, Effects({"w": 0}, {"w": 0}), True)  # a wallet missing


def cpu_column(text: str) -> list[str]:
    """The CPU µs/op column of a table: its heading, then each row's cell."""
    header, _, *rows = [
        [cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
    ]
    at = header.index("CPU µs/op")
    return [header[at], *(row[at] for row in rows)]


def test_each_process_kinds_cpu_per_request_is_in_the_tables() -> None:
    """Cores over the phase's length per request answered, in microseconds; the generator's
    too. Repeats merged are their CPU seconds over their requests together."""
    service = result(SIXTY_FOUR, SERVICE, 10_000)  # 1000 req/s over 10 s
    service.server_cpu = {"api": 0.52, "worker": 0.61, "redis": 0.14, "postgres": 0.8}
    service.generator_cpu = 0.06
    row_lock = result(SIXTY_FOUR, ROW_LOCK, 2_000, seconds=4.0)  # 500 req/s
    row_lock.server_cpu = {"rowlock": 0.45, "redis": 0.0, "postgres": 0.5}
    row_lock.generator_cpu = 0.03
    assert cpu_column(closed_table([service, row_lock])) == [
        "CPU µs/op",
        "api 520, worker 610, redis 140, postgres 800, generator 60",
        "rowlock 900, redis 0, postgres 1000, generator 60",
    ]
    assert cpu_column(table([service]))[1] == cpu_column(closed_table([service]))[1]
    assert "redis 0.14, postgres 0.80" in closed_table([service])  # cores, beside the API's

    # a second repeat of 10 s at 500 req/s on twice the cores of api: 2040 µs per request
    again = result(SIXTY_FOUR, SERVICE, 5_000)
    again.server_cpu = {"api": 1.02, "worker": 0.61, "redis": 0.14, "postgres": 0.8}
    merged = Result.merged([service, again])
    assert cpu_column(closed_table([merged]))[1] == (
        "api 1027, worker 813, redis 187, postgres 1067, generator 40"
    )
    nothing = result(SIXTY_FOUR, SERVICE, 0)
    assert cpu_column(closed_table([nothing]))[1] == "-"


def test_cpu_counts_what_each_process_spent_between_the_readings() -> None:
    """By (pid, start time): one present at both counts the difference; one that started in
    between (a new connection's backend, or a pid reused by another process) counts all it
    spent."""
    before = {
        "postgres": {(10, 1): Reading(5.0, 0.0, 1), (12, 1): Reading(1.0, 0.0, 1)},
        "redis": {},
    }
    after = {
        "postgres": {
            (10, 1): Reading(6.5, 0.0, 1),
            (12, 9): Reading(3.0, 0.0, 1),
            (13, 9): Reading(4.5, 0.0, 1),
        },
        "redis": {},
    }
    assert cores(before, after, elapsed=3.0) == {"postgres": 3.0, "redis": 0.0}


def test_cpu_counts_a_process_that_ended_between_the_readings_to_its_end() -> None:
    """A backend whose pool closed it during the phase (the row lock's asyncpg pool replaces
    a connection after 50,000 queries): its parent, the postmaster, reaping it added all it
    spent to its own children's time, so it counts from the first reading to its end. One
    whose parent is not among them has nothing to count to."""
    postmaster, backend, replacement = (10, 1), (11, 2), (12, 8)
    before = {
        "postgres": {postmaster: Reading(1.0, 20.0, 1), backend: Reading(3.0, 0.0, 10)},
        "rowlock": {(20, 2): Reading(4.0, 0.0, 99)},
    }
    # the backend ended having spent 5.5 s, 2.5 of them in the phase; its replacement 1.0
    after = {
        "postgres": {postmaster: Reading(1.5, 25.5, 1), replacement: Reading(1.0, 0.0, 10)},
        "rowlock": {},
    }
    assert cores(before, after, elapsed=2.0) == {"postgres": 2.0, "rowlock": 0.0}


def test_a_reading_has_the_cpu_of_the_children_a_process_waited_for() -> None:
    """What an ended child spent shows in its parent's reading once the parent reaps it."""
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, sys\n"
            "burn = 'import time\\nt = time.process_time()\\n"
            "while time.process_time() - t < 0.2: pass'\n"
            "subprocess.run([sys.executable, '-c', burn], check=True)\n"
            "print('reaped', flush=True)\n"
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert parent.stdout is not None
        assert parent.stdout.readline() == b"reaped\n"
        reading = process_cpu(parent.pid)
    finally:
        parent.communicate(b"")
    assert reading is not None
    (pid, _), (_, reaped, ppid) = reading
    assert (pid, ppid) == (parent.pid, os.getpid())
    assert reaped >= 0.2


def test_update_docs_rewrites_the_marked_block_and_nothing_else(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    before, after = "# Benchmarks\n\nHow to read them.\n\n", "\n\n## Later\n\nMore prose.\n"
    page.write_text(f"{before}{MARK_START}\nold tables\n{MARK_END}{after}")
    report = "`python -m load.bench --update-docs` on a fake run\n\n| a | b |\n|---|---|\n| 1 | 2 |"

    update_docs(report, page)
    assert page.read_text() == f"{before}{MARK_START}\n{report}\n{MARK_END}{after}"
    update_docs(report, page)  # a second run replaces the first, adds nothing
    assert page.read_text() == f"{before}{MARK_START}\n{report}\n{MARK_END}{after}"

    unmarked = tmp_path / "unmarked.md"
    unmarked.write_text("no markers here\n")
    with pytest.raises(ValueError, match="once each"):
        update_docs(report, unmarked)
    assert unmarked.read_text() == "no markers here\n"


def test_a_holds_only_run_writes_its_own_block_and_leaves_the_full_run_s(tmp_path: Path) -> None:
    page = tmp_path / "benchmarks.md"
    first, last = HOLD_MARKS
    page.write_text(f"{MARK_START}\nfull run\n{MARK_END}\n\n{first}\n{last}\n")
    update_docs("holds alone", page, marks=HOLD_MARKS)
    assert page.read_text() == (
        f"{MARK_START}\nfull run\n{MARK_END}\n\n{first}\nholds alone\n{last}\n"
    )
    update_docs("a full run", page)
    assert "holds alone" in page.read_text()
    assert HOLD_MARKS[0] in BENCHMARKS.read_text()


def test_the_tables_live_in_docs_benchmarks_and_nowhere_else() -> None:
    assert BENCHMARKS == ROOT / "docs" / "benchmarks.md"
    text = BENCHMARKS.read_text()
    assert text.count(MARK_START) == 1
    assert text.count(MARK_END) == 1
    assert text.index(MARK_START) < text.index(MARK_END)
    for other in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        if other != BENCHMARKS:
            assert MARK_START not in other.read_text(), other
    usage = subprocess.run(
        [sys.executable, "-m", "load.bench", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "--update-docs" in usage
    assert "--update-readme" not in usage
