"""The benchmark: `make bench` (or `python -m load.bench --help`).

The command line: the options, the servers and checkouts the run needs, the report, and the
exit status (1 if a balance is off or the service failed a request).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import uvloop

from devtools.processes import stop_on_sigterm
from devtools.servers import redis_cluster, redis_server_7, servers_from_env
from load.bench.designs import checkout
from load.bench.phases import CLOSED_LOOPS, SMOKE_CLOSED_LOOPS, Design, Kind, constant
from load.bench.report import HOLD_MARKS, IN_THE_FULL_RUN, heading, report, update_docs
from load.bench.run import bench
from load.bench.targets import failed, judged, targets


def intervals(raw: str) -> list[float]:
    values = [float(v) for v in raw.split(",") if v.strip()]
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("intervals are seconds, not negative")
    return values


def closed_loops(raw: str) -> list[tuple[int, int]]:
    try:
        loops = [tuple(int(n) for n in item.split("x")) for item in raw.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("give CONNECTIONSxWALLETS, e.g. 64x1000") from None
    if not all(len(loop) == 2 and min(loop) > 0 for loop in loops):
        raise argparse.ArgumentTypeError("give CONNECTIONSxWALLETS, e.g. 64x1000")
    return [(c, w) for c, w in loops]


def open_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rate", type=int, default=1000, help="constant phase rate (1000)")
    parser.add_argument("--seconds", type=float, default=60, help="constant phase length (60)")
    parser.add_argument(
        "--rate-wallets",
        type=int,
        default=1,
        help="wallets the constant phase spreads its operations over (1)",
    )
    parser.add_argument("--step-seconds", type=float, default=10, help="each max-rate step (10)")
    parser.add_argument("--p99-limit", type=float, default=100, help="ms, for 'sustained' (100)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds, correctness only")
    parser.add_argument(
        "--constant-only", action="store_true", help="skip the search for the maximum rates"
    )
    parser.add_argument(
        "--intervals",
        type=intervals,
        help="BATCH_INTERVAL values (the opt-in linger) to run the constant rate at, "
        "comma-separated (none by default)",
    )
    parser.add_argument(
        "--interval-seconds", type=float, default=20, help="each --intervals phase (20)"
    )


def closed_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-processes",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        choices=range(1, 9),
        metavar="N",
        help="API processes sharing each design's port (REUSE_PORT), the service's and the "
        "row lock's alike, 1 to 8; the row lock also runs with one, and each phase takes "
        "its better figure (one per core: %(default)s)",
    )
    parser.add_argument(
        "--one-process-too",
        action="store_true",
        help=f"also run the service with one API process ('{Design(Kind.ONE_PROCESS)}'), "
        "in the same phases",
    )
    parser.add_argument(
        "--closed-seconds", type=float, default=20, help="each closed-loop phase (20)"
    )
    parser.add_argument(
        "--closed-only", action="store_true", help="the closed-loop phases, no open model"
    )
    parser.add_argument(
        "--clients",
        type=closed_loops,
        help="closed-loop phases as CONNECTIONSxWALLETS, comma-separated (the full run: "
        f"{','.join(f'{c}x{w}' for c, w in CLOSED_LOOPS)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="each closed-loop phase N times, the order of the designs turning each time; "
        "the report merges the repeats (1)",
    )


def other_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also run the service as git REF has it (a commit, a branch), in the same "
        "phases, to compare a change with what it changes",
    )
    parser.add_argument(
        "--redis-cluster",
        action="store_true",
        help=f"also run the service on a Redis Cluster of the run's own "
        f"('{Design(Kind.ON_CLUSTER)}': 3 primaries with a replica each, Debian's "
        "redis-server 7), in the same phases",
    )
    parser.add_argument(
        "--deposits-only",
        action="store_true",
        help="the phases of deposits and withdrawals alone: no transfers, no holds",
    )
    parser.add_argument("--transfers-only", action="store_true", help="the transfer phases alone")
    parser.add_argument(
        "--holds-only",
        action="store_true",
        help="the hold phases alone (with --transfers-only: both, nothing else)",
    )
    parser.add_argument(
        "--transfer-rate", type=int, default=1000, help="transfers' constant rate (1000)"
    )
    parser.add_argument(
        "--transfer-seconds", type=float, default=30, help="each constant transfer phase (30)"
    )
    parser.add_argument(
        "--hold-rate",
        type=int,
        default=1000,
        help="holds' constant rate, a hold and its capture counting as two requests (1000)",
    )
    parser.add_argument(
        "--hold-seconds", type=float, default=30, help="the constant hold phase (30)"
    )
    parser.add_argument(
        "--update-docs",
        action="store_true",
        help="write the tables into docs/benchmarks.md, between its markers (nothing else)",
    )


def options(argv: list[str] | None) -> argparse.Namespace:
    """The options, with --smoke's shortened lengths and rates."""
    parser = argparse.ArgumentParser(
        prog="python -m load.bench", description=__doc__.splitlines()[0] if __doc__ else None
    )
    open_options(parser)
    closed_options(parser)
    other_options(parser)
    args = parser.parse_args(argv)
    if args.intervals is None:
        args.intervals = []
    args.closed_loops = args.clients or (SMOKE_CLOSED_LOOPS if args.smoke else CLOSED_LOOPS)
    if args.smoke:
        args.rate, args.seconds = min(args.rate, 200), min(args.seconds, 3)
        args.closed_seconds = min(args.closed_seconds, 2)
        args.transfer_rate = min(args.transfer_rate, 100)
        args.transfer_seconds = min(args.transfer_seconds, 2)
        args.hold_rate, args.hold_seconds = min(args.hold_rate, 100), min(args.hold_seconds, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = options(argv)
    stop_on_sigterm()
    command = "python -m load.bench " + " ".join(argv if argv is not None else sys.argv[1:])
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        pg_server, redis_url = stack.enter_context(servers_from_env(workdir))
        baseline_root = None
        if args.baseline:
            baseline_root = stack.enter_context(checkout(args.baseline, workdir / "baseline"))
        cluster = None
        if args.redis_cluster:
            executable = redis_server_7()
            if executable is None:
                print("--redis-cluster needs redis-server 7 or newer on PATH", file=sys.stderr)
                return 2
            cluster = stack.enter_context(redis_cluster(workdir / "cluster", executable))
        results = uvloop.run(bench(args, pg_server, redis_url, baseline_root, cluster))
    configured = bool(os.environ.get("DATABASE_URL"))
    head = heading(command.strip(), f"{datetime.now(UTC):%Y-%m-%d}", configured, args.api_processes)
    baseline = Design(Kind.BASELINE, ref=args.baseline) if args.baseline else None
    held_to = targets(args.rate, args.rate_wallets, args.transfer_rate, args.hold_rate, baseline)
    text = report(head, results, judged(results, held_to))
    print("\n" + text)
    if args.update_docs:
        if args.holds_only and not args.transfers_only:
            update_docs(text, marks=HOLD_MARKS)
        else:
            update_docs(text)
            if any(result.phase.holds for result in results.runs):
                update_docs(IN_THE_FULL_RUN, marks=HOLD_MARKS)
    return 1 if failed(results, constant(args.rate, args.rate_wallets)) else 0


if __name__ == "__main__":
    sys.exit(main())
