"""The benchmark's report, alone: each ratio is to the row lock's better figure, whichever
of its process counts gave it (the bench runs it with one API process and with as many as
the service's); and where `--update-docs` writes it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devtools.processes import ROOT
from load.bench import (
    BENCHMARKS,
    MARK_END,
    MARK_START,
    Phase,
    Results,
    closed_name,
    closed_table,
    targets,
    update_docs,
)

SIXTY_FOUR = closed_name(64, 1)


def closed(design: str, answered: int, seconds: float = 10.0) -> Phase:
    phase = Phase(SIXTY_FOUR, design, 0, seconds, 64)
    phase.statuses = {200: answered}
    phase.elapsed = seconds
    phase.latencies = [0.01] * 10
    phase.balance_ok = True
    return phase


def ratio_in_table(phases: list[Phase]) -> str:
    rows = [line.split(" | ") for line in closed_table(phases).splitlines()[2:]]
    return next(row[3] for row in rows if row[1] == "service")


def test_a_closed_loop_ratio_is_to_the_row_locks_better_process_count() -> None:
    service = closed("service", 40_000)
    one, two = closed("row lock", 10_000), closed("row lock, 2 processes", 8_000)
    assert ratio_in_table([service, one, two]) == "4.00x"
    assert ratio_in_table([service, closed("row lock", 5_000), two]) == "5.00x"

    results = Results(closed=[service, closed("row lock", 5_000), two])
    row = next(r for r in targets(results, "-") if r[0].startswith(SIXTY_FOUR))
    assert row[1:] == ("5.00x (4000 against 800/s)", True)
    results = Results(closed=[service, one, two])
    row = next(r for r in targets(results, "-") if r[0].startswith(SIXTY_FOUR))
    assert row[1:] == ("4.00x (4000 against 1000/s)", True)


def test_the_highest_rate_ratio_is_to_the_row_locks_better_process_count() -> None:
    def measured(best: dict[str, int]) -> tuple[str, bool]:
        rows = targets(Results(best=best), "-")
        row = next(r for r in rows if r[0].startswith("highest rate sustained on 1 wallet"))
        return row[1], row[2]

    assert measured({"service": 4000, "row lock": 1000, "row lock, 2 processes": 750}) == (
        "4.00x (4000/s against 1000/s)",
        True,
    )
    assert measured({"service": 4000, "row lock": 750, "row lock, 2 processes": 1250}) == (
        "3.20x (4000/s against 1250/s)",
        False,
    )


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
