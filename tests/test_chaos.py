"""Faults on real processes: the bank-style chaos run, and a worker drained under load.

The chaos run is driven as a program, `python -m load.chaos`, through its options, exit
status and JSON report. CHAOS_SEED replays a failing run's schedule; `python -m load.chaos`
on its own runs longer ones.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from devtools.processes import ROOT, Cluster, free_port
from devtools.servers import redis_server_7
from devtools.waiting import wait_ready
from shared.keys import KeySpace
from shared.settings import Settings
from tests.helpers import eventually

# Every fault the chaos run must strike, each once a run.
FAULTS = (
    "kill",
    "pause",
    "start",
    "terminate_postgres_sessions",
    "drop_redis_connections",
    "restart_postgres",
    "restart_redis_empty",
    "cut_worker_from_postgres",
    "poison_entry",
    "kill_api",
    "pause_api",
)
# On a Redis Cluster, the cluster's faults take the place of a single Redis restarted empty.
CLUSTER_FAULTS = (
    *(f for f in FAULTS if f != "restart_redis_empty"),
    "kill_redis_primary",
    "move_slot",
    "redis_primary_back",
)


def chaos(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> tuple[int, str]:
    """`python -m load.chaos <args>`: its exit status and its output (stdout and stderr).
    Past `timeout` it is interrupted (SIGINT), so that it stops the processes it started."""
    with subprocess.Popen(
        [sys.executable, "-m", "load.chaos", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as run:
        try:
            output, _ = run.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            run.send_signal(signal.SIGINT)
            output, _ = run.communicate(timeout=60)
            raise AssertionError(f"load.chaos ran past {timeout}s:\n{output[-5000:]}") from None
    return run.returncode, output


def schedule(seed: int, seconds: float, *more: str) -> list[dict[str, Any]]:
    status, output = chaos("--seed", str(seed), "--seconds", str(seconds), "--schedule-only", *more)
    assert status == 0, output
    faults: list[dict[str, Any]] = json.loads(output)
    return faults


def test_a_seed_replays_the_same_schedule_and_every_fault_is_in_it() -> None:
    faults = schedule(42, 30)
    assert schedule(42, 30) == faults
    assert schedule(43, 30) != faults
    assert sorted(f["kind"] for f in faults) == sorted(FAULTS)
    assert all(0 < f["at"] < 30 * 0.75 for f in faults)
    assert [f["at"] for f in faults] == sorted(f["at"] for f in faults)


def test_a_seed_draws_the_schedule_it_always_drew() -> None:
    """Seeds are quoted in the docs and in failing runs: the faults' registry keeps its
    order, and the draws theirs."""
    faults = schedule(101, 20)
    assert [f["kind"] for f in faults] == [
        "restart_redis_empty",
        "cut_worker_from_postgres",
        "start",
        "pause",
        "drop_redis_connections",
        "kill",
        "pause_api",
        "restart_postgres",
        "poison_entry",
        "terminate_postgres_sessions",
        "kill_api",
    ]
    assert (faults[0]["at"], faults[0]["pick"], faults[-1]["at"]) == (1.02, 497, 14.29)
    on_cluster = [f["kind"] for f in schedule(101, 20, "--redis-cluster")]
    assert on_cluster[:3] == ["kill_redis_primary", "start", "move_slot"]


def test_on_a_cluster_a_killed_primary_comes_back_after_it_was_killed() -> None:
    for seed in range(20):
        kinds = [f["kind"] for f in schedule(seed, 30, "--redis-cluster")]
        assert sorted(kinds) == sorted(CLUSTER_FAULTS)
        assert kinds.index("kill_redis_primary") < kinds.index("redis_primary_back")


def test_bank_chaos_nothing_acknowledged_is_lost_or_applied_twice(tmp_path: Path) -> None:
    """On servers of the run's own (embedded), which it crashes and restarts: every fault
    strikes once, and after each every wallet is served again within the fault's bound;
    transfers go on throughout, and every one ends completed or rejected, whatever ids a
    hostile client squatted and however it reused keys."""
    bank_chaos(tmp_path, FAULTS)


@pytest.mark.skipif(redis_server_7() is None, reason="needs redis-server 7 or newer on PATH")
def test_bank_chaos_on_a_redis_cluster_with_a_primary_killed_and_a_slot_moved(
    tmp_path: Path,
) -> None:
    """The same on a Redis Cluster of the run's own (3 primaries with a replica each): the
    hot wallet's primary is killed and its replica takes over, its slot is moved under
    load, and the killed primary comes back as a replica."""
    bank_chaos(tmp_path, CLUSTER_FAULTS, "--redis-cluster")


def bank_chaos(tmp_path: Path, faults: tuple[str, ...], *more: str) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    report_file = tmp_path / "report.json"
    status, output = chaos(
        *("--seed", str(seed), "--seconds", "20", *more),
        *("--report", str(report_file), "--logs", str(tmp_path / "logs")),
        timeout=270,
    )
    print(output)  # pytest shows it with a failure
    assert report_file.exists(), output[-5000:]
    report = json.loads(report_file.read_text())
    assert report["seed"] == seed
    assert report["problems"] == [], output[-5000:]
    assert status == 0, output[-5000:]
    assert report["answers"].get("200", 0) > 1000, output[-5000:]
    # Transfers among them, settled whatever struck: completed (200) or rejected (409).
    assert report["transfers"].get("200", 0) > 100, output[-5000:]
    assert set(report["transfers"]) <= {"200", "409"}, output[-5000:]
    assert report["fenced_refusals"] >= 1, output[-5000:]
    assert sorted(report["recovery"]) == sorted(faults), output[-5000:]
    # The hostile client squatted transfers' ids, reused keys and sent keys twice at once
    # throughout (what it must find: the run's checks, in report["problems"]).
    hostile = report["hostile"]
    assert hostile.get("squatted_transfers", 0) > 10, output[-5000:]
    assert hostile.get("squatted_before_sent", 0) > 5, output[-5000:]
    assert hostile.get("squatted_in_flight", 0) > 0, output[-5000:]
    assert hostile.get("reuses", 0) > 10, output[-5000:]
    assert hostile.get("reuses_refused") == hostile["reuses"], output[-5000:]
    assert hostile.get("twin_keys", 0) > 10, output[-5000:]


async def test_a_worker_stopped_by_sigterm_under_load_answers_every_request(
    settings: Settings, tmp_path: Path, redis: Redis, pg: Any
) -> None:
    """SIGTERM mid-load: the worker finishes its batch and hands its shards back; the other
    worker answers what it had not read. Every request gets its 200 or 409, none a 202."""
    port = free_port()
    env = {
        **settings.to_env(),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKER_LEASE_TTL": "2.0",
    }
    cluster = Cluster(env, tmp_path)
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    base = f"http://127.0.0.1:{port}"
    try:
        cluster.start("api")
        leaving, staying = cluster.start("worker"), cluster.start("worker")

        async def both_own_shards() -> bool:
            leases: list[Any] = [
                await redis.get(keys.lease(s)) for s in range(settings.shard_count)
            ]
            return len({lease.rsplit(b"-", 2)[-2] for lease in leases if lease}) == 2 and all(
                leases
            )

        await eventually(both_own_shards, within=20, what="the two workers to share the shards")
        wallets = [
            str(await pg.fetchval("INSERT INTO wallets (balance) VALUES (10000) RETURNING id"))
            for _ in range(20)
        ]
        async with aiohttp.ClientSession(base) as http:
            await wait_ready(http, f"{base}/ready")
            statuses: list[int] = []
            applied: dict[str, int] = dict.fromkeys(wallets, 0)
            loop = asyncio.get_running_loop()
            end = loop.time() + 4

            async def client(rng: random.Random) -> None:
                while loop.time() < end:
                    wallet, kind = rng.choice(wallets), rng.choice(["DEPOSIT", "WITHDRAW"])
                    async with http.post(
                        f"/api/v1/wallets/{wallet}/operation",
                        json={"operationType": kind, "amount": 30},
                        headers={"Idempotency-Key": str(uuid.uuid4())},
                    ) as r:
                        statuses.append(r.status)
                        if r.status == 200:
                            applied[wallet] += 3000 if kind == "DEPOSIT" else -3000

            clients = [asyncio.create_task(client(random.Random(i))) for i in range(16)]
            await eventually(lambda: _at_least(statuses, 300), what="the load to be under way")
            leaving.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(leaving.wait, 15) == 0
            await asyncio.gather(*clients)
        assert staying.poll() is None
        assert len(statuses) > 100
        assert set(statuses) <= {200, 409}, sorted(set(statuses))
        log = cluster.log_of(leaving)
        assert "handed back shards" in log
        assert "Traceback" not in log
        for wallet in wallets:
            balance = await pg.fetchval("SELECT balance FROM wallets WHERE id = $1", wallet)
            assert balance == 10000 + applied[wallet]
    finally:
        cluster.stop()


async def _at_least(items: list[int], count: int) -> bool:
    return len(items) >= count
