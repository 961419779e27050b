"""The bank-style chaos run: `python -m load.chaos --help`.

The command line: the options, the servers the run starts for itself (embedded PostgreSQL,
and one Redis or a Redis Cluster), the report, and the exit status (1 if a check failed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import sys
import tempfile
from pathlib import Path

from devtools.processes import stop_on_sigterm
from devtools.servers import embedded_postgres, embedded_redis, redis_cluster, redis_server_7
from load.chaos.run import chaos
from load.chaos.schedule import schedule


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m load.chaos", description=__doc__.splitlines()[0] if __doc__ else None
    )
    p.add_argument("--seed", type=int, default=None, help="replays a run's schedule")
    p.add_argument("--seconds", type=float, default=30, help="length of the load (30)")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients (16)")
    p.add_argument("--wallets", type=int, default=50, help="wallets beside the hot one (50)")
    p.add_argument("--think", type=float, default=0.02, help="a client's pause, s (0.02)")
    p.add_argument("--report", type=Path, help="also writes the report to this file, as JSON")
    p.add_argument("--no-hostile", action="store_true", help="without the hostile client")
    p.add_argument(
        "--logs", type=Path, help="keeps the processes' logs in this directory (default: dropped)"
    )
    p.add_argument(
        "--redis-cluster",
        action="store_true",
        help="on a Redis Cluster of the run's own (Debian's redis-server 7), with its faults",
    )
    p.add_argument(
        "--schedule-only",
        action="store_true",
        help="prints the seed's schedule of faults as JSON and exits, starting nothing",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**32)
    if args.schedule_only:
        shown = schedule(args.seed, args.seconds, args.redis_cluster)
        print(json.dumps([dataclasses.asdict(f) for f in shown]))
        return 0
    stop_on_sigterm()
    executable = redis_server_7()
    if args.redis_cluster and executable is None:
        print("--redis-cluster needs redis-server 7 or newer on PATH", file=sys.stderr)
        return 2
    print(f"chaos seed {args.seed}", flush=True)
    with (
        tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp,
        embedded_postgres(Path(tmp) / "postgres") as postgres,
        (
            redis_cluster(Path(tmp) / "cluster", executable)
            if args.redis_cluster and executable
            else embedded_redis(Path(tmp) / "redis", keep_data=False)
        ) as redis_server,
    ):
        logs = args.logs or Path(tmp) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(chaos(args, postgres, redis_server, logs))
    print(report.summary())
    if args.report:
        args.report.write_text(report.to_json())
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
