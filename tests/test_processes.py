"""The real entry points, `python -m api` and `python -m worker`, configured by environment."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from devtools.processes import ROOT, free_port, spawn
from shared import logs
from shared.keys import KeySpace
from shared.settings import Settings
from tests.helpers import eventually, ledger, operate


async def until_ready(url: str) -> None:
    async with aiohttp.ClientSession(url) as http:

        async def ready() -> bool:
            try:
                async with http.get("/ready") as r:
                    return r.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(ready, within=20, what="the service to be ready")


@pytest.fixture
def served(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        host="127.0.0.1",
        port=free_port(),
        worker_metrics_port=free_port(),
        api_metrics_port=free_port(),
    )


@pytest.fixture
async def service(served: Settings) -> AsyncIterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    env = served.to_env()
    processes = [spawn("worker", env), spawn("api", env)]
    url = f"http://127.0.0.1:{served.port}"
    try:
        yield url, processes
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


async def test_api_and_worker_processes_serve_and_stop_cleanly(
    service: tuple[str, list[subprocess.Popen[bytes]]], served: Settings
) -> None:
    url, processes = service
    await until_ready(url)
    async with aiohttp.ClientSession(url) as http:
        async with http.post("/api/v1/wallets") as r:
            wallet = (await r.json())["id"]

        async def deposit(n: int) -> Any:
            async with http.post(
                f"/api/v1/wallets/{wallet}/operation",
                json={"operationType": "DEPOSIT", "amount": f"{n}.01"},
            ) as r:
                return r.status

        assert set(await asyncio.gather(*(deposit(n) for n in range(100)))) == {200}
        async with http.get(f"/api/v1/wallets/{wallet}") as r:
            assert (await r.json())["balance"] == f"{sum(range(100)) + 1}.00"
            assert r.headers["X-Request-Id"]
        async with http.get("/metrics") as r:
            assert r.status == 404  # not on the public port
    api_metrics_url = f"http://127.0.0.1:{served.api_metrics_port}"
    async with aiohttp.ClientSession(api_metrics_url) as http, http.get("/metrics") as r:
        api_metrics = await r.text()
    route = 'route="/api/v1/wallets/{wallet_id}/operation"'
    assert f'wallet_http_requests_total{{method="POST",{route},status="200"}} 100.0' in (
        api_metrics
    )
    worker_url = f"http://127.0.0.1:{served.worker_metrics_port}"
    async with aiohttp.ClientSession(worker_url) as http, http.get("/metrics") as r:
        worker_metrics = await r.text()
    assert f"wallet_shards_owned {float(served.shard_count)}" in worker_metrics
    assert "wallet_batch_operations_sum 100.0" in worker_metrics

    for p in processes:
        p.send_signal(signal.SIGTERM)
    codes = await asyncio.gather(*(asyncio.to_thread(p.wait, 15) for p in processes))
    assert codes == [0, 0]


def locust(url: str, users: int = 5) -> subprocess.CompletedProcess[str]:
    """The hot-wallet locust scenario, briefly, as docs/benchmarks.md runs it."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "locust", "-f", "load/locustfile.py", "--headless"),
            *("--host", url, "-u", str(users), "-r", str(users), "-t", "4s"),
            *("--only-summary", "HotWallet"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_the_locust_scenario_runs_and_checks_its_balance(
    service: tuple[str, list[subprocess.Popen[bytes]]],
) -> None:
    """It creates and funds its wallet, and at the end reconciles the requests cut off by
    its stop (sent again with their Idempotency-Keys) before it compares the balance."""
    url, _ = service
    await until_ready(url)
    run = await asyncio.to_thread(locust, url, 200)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "balances exact on 1 wallets" in run.stdout + run.stderr


async def test_the_locust_scenario_fails_on_a_balance_changed_behind_its_back(
    service: tuple[str, list[subprocess.Popen[bytes]]], pg: Any
) -> None:
    url, _ = service
    await until_ready(url)
    since = await pg.fetchval("SELECT now()")
    running = asyncio.create_task(asyncio.to_thread(locust, url))

    async def funded() -> bool:
        return bool(
            await pg.fetchval(
                "SELECT count(*) FROM wallets WHERE created_at >= $1 AND balance > 0", since
            )
        )

    await eventually(funded, within=30, what="locust to fund its wallet")
    await pg.execute("UPDATE wallets SET balance = balance + 1 WHERE created_at >= $1", since)
    run = await running
    assert run.returncode == 1
    assert "BALANCE MISMATCH on 1 wallets" in run.stdout + run.stderr


async def test_the_benchmark_smoke_run_checks_out(servers: tuple[str, str]) -> None:
    """`python -m load.bench --smoke`: a few seconds of both designs in a closed loop and in
    the open model, with operations, with transfers and with holds placed and captured, and
    of the service with its worker restarted at a BATCH_INTERVAL, for correctness only. Two
    API processes each, and the row lock also with one: each ratio is to the row lock's
    better figure."""
    pg_url, redis_url = servers
    run = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            *("-m", "load.bench", "--smoke", "--api-processes", "2"),
            *("--intervals", "0.01", "--interval-seconds", "2"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "DATABASE_URL": pg_url, "REDIS_URL": redis_url},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    phases = [
        line
        for line in run.stdout.splitlines()
        if line.startswith("| ") and line.split(" | ")[1] in ("service", "row lock")
    ]
    rows = [line for line in phases if line.startswith("| 200/s")]
    # three phases, each printed as it ends and again in the table
    assert [row.split(" | ")[:2] for row in rows[:3]] == [
        ["| 200/s on 1 wallet", "service"],
        ["| 200/s on 1 wallet", "row lock"],
        ["| 200/s, BATCH_INTERVAL=0.01", "service"],
    ]
    assert all("| exact |" in row for row in rows)
    assert "| api 0." in rows[0]
    assert ", worker 0." in rows[0]
    assert "| rowlock 0." in rows[1]
    closed = [
        line
        for line in phases
        if " connection" in line[:20] and "transfers" not in line and "holds" not in line
    ]
    # as each phase ended (the designs take turns at going first), then the report's table
    assert len(closed) == 8
    assert [row.split(" | ")[:2] for row in closed[4:]] == [
        ["| 1 connection, 1 wallet", "service"],
        ["| 1 connection, 1 wallet", "row lock"],
        ["| 8 connections, 1 wallet", "service"],
        ["| 8 connections, 1 wallet", "row lock"],
    ]
    assert all("| exact |" in row for row in closed)
    two = [
        line.split(" | ")
        for line in run.stdout.splitlines()
        if line.startswith("| 1 connection, 1 wallet | ")
    ][-3:]  # the report's table: the service, then the row lock with two processes and one
    assert [row[1] for row in two] == ["service", "row lock, 2 processes", "row lock"]
    assert "rowlock 0." in two[1][11] or "rowlock 1." in two[1][11]
    service_rate, *references = (float(row[2]) for row in two)  # rounded to whole req/s
    assert float(two[0][3].rstrip("x")) == pytest.approx(service_rate / max(references), abs=0.02)
    # Transfers of three shapes, closed loop and constant rate, both designs, exact and
    # money conserved.
    transfers = [line for line in phases if "transfers" in line.split(" | ")[0]]
    assert len(transfers) == 2 * 12
    assert all("| exact |" in row for row in transfers)
    assert {row.split(" | ")[1] for row in transfers} == {"service", "row lock"}
    assert "| transfers: 0 errors, every balance and the conservation sum exact |" in run.stdout
    # Holds placed and captured (two requests each), closed loop and constant rate, both
    # designs: balances, held amounts and the ledger's available figures exact.
    holds = [line.split(" | ") for line in phases if ", holds on 1 wallet |" in line]
    assert len(holds) == 2 * 2 * 2  # as each ended, then in the report's tables
    assert {(row[0], row[1]) for row in holds} == {
        (f"| {phase}, holds on 1 wallet", design)
        for phase in ("8 connections", "100/s")
        for design in ("service", "row lock")
    }
    assert all("exact" in row for row in holds)
    assert "| holds: 0 errors, every balance, held and available figure" in run.stdout
    assert "| balances exact in every phase | yes | yes |" in run.stdout


def test_log_lines_are_json_with_the_request_and_operation_ids() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("api.test-json")
    logger.addHandler(handler)
    try:
        request_token = logs.REQUEST_ID.set("req-1")
        operation_token = logs.OPERATION_ID.set("op-1")
        logger.warning("about %s", "it")
        logs.OPERATION_ID.reset(operation_token)
        logs.REQUEST_ID.reset(request_token)
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["message"], first["request_id"], first["operation_id"]) == (
        "about it",
        "req-1",
        "op-1",
    )
    assert first["level"] == "warning"
    assert "request_id" not in second


def listening_sockets(port: int) -> int:
    """How many sockets listen on the port on IPv4 (Linux: /proc/net/tcp, state 0A)."""
    rows = (line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:])
    return sum(1 for row in rows if row[1].endswith(f":{port:04X}") and row[3] == "0A")


async def test_reuse_port_lets_a_second_api_process_serve_the_same_port(served: Settings) -> None:
    """With REUSE_PORT a second `python -m api` listens beside the first on one port, and
    serves alone once the first has stopped. Without it, a process cannot take a port that
    another holds and exits."""
    env = {**served.to_env(), "REUSE_PORT": "true"}
    url = f"http://127.0.0.1:{served.port}"
    quiet: dict[str, Any] = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    first = spawn("api", env, **quiet)
    processes = [first, spawn("worker", env, **quiet)]

    async def both_listen() -> bool:
        return listening_sockets(served.port) == 2

    try:
        await until_ready(url)
        second = spawn("api", env, **quiet)
        processes.append(second)
        await eventually(both_listen, within=20, what="two processes listening on the port")
        first.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait, 15) == 0
        await until_ready(url)
        async with aiohttp.ClientSession(url) as http:
            async with http.post("/api/v1/wallets") as r:
                wallet = (await r.json())["id"]
            operation = {"operationType": "DEPOSIT", "amount": "1.50"}
            async with http.post(f"/api/v1/wallets/{wallet}/operation", json=operation) as r:
                assert (r.status, (await r.json())["balance"]) == (200, "1.50")

        refused = spawn("api", {**env, "REUSE_PORT": "false"}, **quiet)
        processes.append(refused)
        assert await asyncio.to_thread(refused.wait, 20) != 0
        assert second.poll() is None
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


def logged(path: Path, pattern: str) -> re.Match[str] | None:
    """The first of the process's JSON log lines whose message matches `pattern`."""
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            found = re.search(pattern, json.loads(line).get("message", ""))
            if found:
                return found
    return None


async def says(path: Path, pattern: str) -> bool:
    return logged(path, pattern) is not None


async def test_two_workers_with_one_metrics_port_both_run(served: Settings, tmp_path: Path) -> None:
    """Two `python -m worker` on one host with the same WORKER_METRICS_PORT, as with the
    defaults: the second serves its metrics on the next free port and says so, and both
    work (the shards split between them)."""
    env = served.to_env()
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    processes = []
    try:
        with first_log.open("wb") as out:
            processes.append(spawn("worker", env, stderr=out))

        await eventually(
            lambda: says(first_log, r"metrics on port"), within=20, what="the first's metrics"
        )
        with second_log.open("wb") as out:
            processes.append(spawn("worker", env, stderr=out))
        elsewhere = r"metrics on port (\d+) \(WORKER_METRICS_PORT"
        await eventually(lambda: says(second_log, elsewhere), within=20, what="the second's")
        found = logged(second_log, elsewhere)
        assert found is not None
        ports = [served.worker_metrics_port, int(found.group(1))]
        assert ports[1] != ports[0]

        async def shards_split() -> bool:
            owned = []
            async with aiohttp.ClientSession() as http:
                for port in ports:
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
                        text = await r.text()
                    owned.append(float(re.findall(r"^wallet_shards_owned (\S+)$", text, re.M)[0]))
            return sorted(owned) == [served.shard_count // 2] * 2

        await eventually(shards_split, within=30, what="both workers to own half the shards")
        assert all(p.poll() is None for p in processes)
    finally:
        for p in processes:
            p.send_signal(signal.SIGTERM)
        codes = [await asyncio.to_thread(p.wait, 20) for p in processes]
    assert codes == [0, 0]


async def test_a_worker_stuck_past_its_stop_grace_exits_0_and_leaves_its_batch_queued(
    api: Any, served: Settings, pg: Any, redis: Any, tmp_path: Path
) -> None:
    """SIGTERM while the batch in hand waits on PostgreSQL (here a row lock held by the
    test): after WORKER_STOP_GRACE the worker says what it leaves and exits 0; the operation
    stays queued and the next worker applies it, once."""
    settings = dataclasses.replace(served, worker_stop_grace=1.0, worker_metrics_port=0)
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    stream = KeySpace(settings.redis_key_prefix, settings.shard_count).wallet_stream(wallet)
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as out:
        worker = spawn("worker", settings.to_env(), stderr=out)
    lock = await pg.acquire()
    transaction = lock.transaction()
    try:
        await eventually(lambda: says(log_path, r"took shard"), within=20, what="a shard taken")
        await transaction.start()
        await lock.execute("SELECT 1 FROM wallets WHERE id = $1 FOR UPDATE", wallet)
        pending = asyncio.create_task(operate(api, wallet, "DEPOSIT", "2.50"))

        async def batch_waits() -> bool:
            return bool(
                await pg.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND query LIKE '%unchanged%'"
                )
            )

        await eventually(batch_waits, within=20, what="the worker's batch to wait on the lock")
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 20) == 0
        assert logged(log_path, r"leaving the batch in hand unanswered")
        assert await redis.xlen(stream) == 1
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        await transaction.rollback()
        await pg.release(lock)
    with log_path.open("ab") as out:
        successor = spawn("worker", settings.to_env(), stderr=out)
    try:
        status, body, _ = await asyncio.wait_for(pending, 30)
        assert (status, body["balance"]) == (200, "2.50")
        assert len(await ledger(pg, wallet)) == 1
    finally:
        successor.send_signal(signal.SIGTERM)
        await asyncio.to_thread(successor.wait, 20)


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, parent, ...; Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None


def children_of(pid: int) -> list[tuple[int, str]]:
    """The processes whose parent is `pid`, each as (pid, start time): a pid ended and
    reused is another process."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields is not None and int(fields[1]) == pid:
            found.append((int(entry.name), fields[19]))
    return found


def alive(process: tuple[int, str]) -> bool:
    """Still running or stopped, not ended (a zombie has ended), and not another process
    under its pid."""
    fields = stat_fields(process[0])
    return fields is not None and fields[19] == process[1] and fields[0] != "Z"


async def test_a_benchmark_stopped_by_sigterm_stops_what_it_started(
    servers: tuple[str, str], redis: Any
) -> None:
    """`timeout`, a CI runner or kill stop the bench with SIGTERM: it stops the servers it
    started and drops its database and keys, as on Ctrl-C, rather than leave them running."""
    pg_url, redis_url = servers
    admin = await asyncpg.connect(pg_url)
    bench = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "load.bench", "--smoke", "--closed-only", "--deposits-only"),
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": pg_url, "REDIS_URL": redis_url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started: list[tuple[int, str]] = []
    databases: list[str] = []
    try:

        async def serving() -> bool:
            started[:] = children_of(bench.pid)
            databases[:] = [
                r["datname"]
                for r in await admin.fetch(
                    "SELECT datname FROM pg_database WHERE datname LIKE 'wallet_bench_%'"
                )
            ]
            return len(started) >= 2 and bool(databases)

        await eventually(serving, within=60, what="the bench to start its servers")
        bench.send_signal(signal.SIGTERM)
        await asyncio.wait_for(bench.wait(), 60)
        assert [p for p in started if alive(p)] == []
        left = await admin.fetch(
            "SELECT datname FROM pg_database WHERE datname = any($1::text[])", databases
        )
        assert left == []
        for name in databases:
            assert [key async for key in redis.scan_iter(match=f"bench-{name}:*")] == []
    finally:  # what a failed run left behind
        if bench.returncode is None:
            bench.kill()
            await bench.wait()
        for process in started:
            if alive(process):
                os.kill(process[0], signal.SIGKILL)
        for name in databases:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            async for key in redis.scan_iter(match=f"bench-{name}:*"):
                await redis.unlink(key)
        await admin.close()
