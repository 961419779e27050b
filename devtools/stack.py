"""A whole service on one machine with nothing but Python: `python -m devtools.stack`
(`make run`).

Uses DATABASE_URL and REDIS_URL when they are set; otherwise starts an embedded PostgreSQL
and an embedded Redis (6.2) on unix sockets, keeping their data under `.run/`. Migrates,
then runs the API and a worker until interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any

from devtools.processes import ROOT, spawn
from devtools.servers import migrate, servers_from_env

log = logging.getLogger("devtools.stack")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    with servers_from_env(ROOT / ".run") as (database_url, redis_url):
        log.info(
            "PostgreSQL %s, Redis %s",
            "configured" if os.environ.get("DATABASE_URL") else "embedded",
            "configured" if os.environ.get("REDIS_URL") else "embedded",
        )
        migrate(database_url)
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        children = [spawn("worker", env), spawn("api", env)]
        log.info("serving on port %s; Ctrl-C stops", os.environ.get("PORT", "8000"))

        def stop(signum: int, frame: Any) -> None:
            for child in children:
                child.send_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        codes = [child.wait() for child in children]
        if any(code not in (0, -signal.SIGTERM) for code in codes):
            sys.exit(1)


if __name__ == "__main__":
    main()
