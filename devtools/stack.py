"""A whole service on one machine with nothing but Python: `python -m devtools.stack`
(`make run`).

Reads `.env` first, when there is one, for the variables not already set in the
environment. Uses DATABASE_URL and REDIS_URL when they are set; otherwise starts an embedded
PostgreSQL and an embedded Redis (6.2) on unix sockets, keeping their data under `.run/`.
Migrates, then runs the API and a worker until interrupted.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from devtools.processes import ROOT, spawn
from devtools.servers import migrate, servers_from_env

log = logging.getLogger("devtools.stack")


def dotenv(path: Path) -> dict[str, str]:
    """The variables a `.env` file sets, as docker compose reads it: `NAME=value` lines
    (`export ` before the name allowed), blank lines and `#` comments skipped, a value in
    single or double quotes taken as it is inside them, and an unquoted one up to a ` #`."""
    found: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not name.isidentifier():
            raise ValueError(f"{path}:{number}: not NAME=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].rstrip()
        found[name] = value
    return found


def read_dotenv(path: Path, environ: MutableMapping[str, str]) -> list[str]:
    """Sets the variables of `path`, if it exists, that `environ` does not have; their names."""
    if not path.exists():
        return []
    added = {name: value for name, value in dotenv(path).items() if name not in environ}
    environ.update(added)
    return list(added)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    added = read_dotenv(ROOT / ".env", os.environ)
    if added:
        log.info(".env: %s", ", ".join(added))  # the names only: values may be secrets
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
