"""`python -m worker.inspect`: what an operator sees of the queues and of shard ownership."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
from redis.asyncio import Redis

from api.app import create_app
from shared.settings import Settings
from tests.conftest import AiohttpClient, running_worker
from tests.helpers import eventually, operate, run_module
from worker.inspect import shards_report, stuck_report, wallet_report


async def inspect_cli(settings: Settings, *args: str) -> Any:
    run = await run_module(settings, "worker.inspect", "--json", *args)
    assert run.returncode == 0, run.stderr[-2000:]
    return orjson.loads(run.stdout)


async def test_queued_operations_show_in_the_wallet_the_shards_and_the_stuck_lists(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any, redis: Redis
) -> None:
    impatient = dataclasses.replace(settings, reply_timeout=0.05)
    api = await aiohttp_client(create_app(impatient))
    wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
    ops = [await operate(api, wallet, kind, "2.50") for kind in ("DEPOSIT", "WITHDRAW")]
    assert [status for status, _, _ in ops] == [202, 202]  # no worker runs yet

    report = await wallet_report(settings, redis, pg, wallet)
    assert report["exists"] is True
    assert report["balance"] == "0.00"
    assert [(q["type"], q["amount"], q["operation"]) for q in report["queued"]] == [
        ("DEPOSIT", "2.50", ops[0][1]["id"]),
        ("WITHDRAW", "2.50", ops[1][1]["id"]),
    ]
    shards = {s["shard"]: s for s in await shards_report(settings, redis, pg)}
    assert len(shards) == settings.shard_count
    mine = shards[report["shard"]]
    assert (mine["owner"], mine["queued"]) == (None, 2)
    assert mine["lag_seconds"] >= 0
    assert [s["wallet"] for s in await stuck_report(settings, redis, older_than=0)] == [wallet]
    assert await stuck_report(settings, redis, older_than=3600) == []

    async with running_worker(settings) as worker:

        async def drained() -> bool:
            return not (await wallet_report(settings, redis, pg, wallet))["queued"]

        await eventually(drained, what="the queue to drain")
        by_cli = {s["shard"]: s for s in await inspect_cli(settings, "shards")}
        assert by_cli[report["shard"]]["owner"] == worker.worker_id
        assert by_cli[report["shard"]]["epoch"] == worker.ownership.owned[report["shard"]]
        assert all(s["queued"] == 0 for s in by_cli.values())
        after = await inspect_cli(settings, "wallet", wallet)
        assert (after["balance"], after["ledger_rows"], after["queued"]) == ("0.00", 2, [])
        assert after["applied_entry"] == report["queued"][-1]["entry"]


async def test_an_unknown_wallet_is_reported_as_such(settings: Settings) -> None:
    report = await inspect_cli(settings, "wallet", "00000000-0000-0000-0000-000000000000")
    assert (report["exists"], report["queued"]) == (False, [])


async def worker_check(settings: Settings) -> int:
    return (await run_module(settings, "worker", "--check")).returncode


async def test_the_worker_health_check_reports_a_live_heartbeat(settings: Settings) -> None:
    assert await worker_check(settings) == 1
    async with running_worker(settings):
        assert await worker_check(settings) == 0
    assert await worker_check(settings) == 1  # a drained worker leaves the live set
