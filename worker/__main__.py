"""One shard worker (`wallet-worker`, or `python -m worker`), configured from the environment
like the API. SIGTERM or SIGINT drains it: the batch in hand is finished and answered, the
shards are handed back, and it exits 0; past WORKER_STOP_GRACE (a dependency down
mid-batch) it leaves that batch to the next owner and exits 0 all the same.

--check, a container's health check, starts no worker: it exits 0 if a worker of this host
has a live heartbeat, else 1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys

import uvloop
from aiohttp import web

from shared import cli, logs
from shared.connections import PG_ERRORS, REDIS_ERRORS, open_redis
from shared.keys import KeySpace
from shared.metrics import metrics_response, start_metrics_listener
from shared.scripts import live_workers, sidelined_workers
from shared.settings import Settings
from worker.gauges import refresh_gauges
from worker.worker import Worker, connect, new_worker_id

log = logging.getLogger("worker")

EXIT_CODES = {
    0: "stopped by SIGTERM or SIGINT (drained); with --check: healthy",
    1: "the settings are not valid, or the worker failed; with --check: unhealthy",
}


async def serve(settings: Settings) -> None:
    worker_id = new_worker_id()
    redis, pool = await connect(settings, worker_id)
    worker = Worker(settings, redis, pool, worker_id=worker_id)
    running = asyncio.current_task()
    assert running is not None
    loop = asyncio.get_running_loop()
    gave_up = False

    def give_up() -> None:
        nonlocal gave_up
        gave_up = True
        log.warning(
            "still draining %.0fs after the stop (WORKER_STOP_GRACE): leaving the batch in "
            "hand unanswered; its operations stay queued for the shards' next owner",
            settings.worker_stop_grace,
        )
        running.cancel()

    def drain() -> None:
        worker.stop()
        # A batch stuck on a dependency that is down must not keep the process alive.
        loop.call_later(settings.worker_stop_grace, give_up)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain)
    log.info("worker %s started", worker.worker_id)
    metrics = await serve_metrics(worker, settings.worker_metrics_port)
    try:
        await worker.run()
    except asyncio.CancelledError:
        if not gave_up:
            raise
    finally:
        if metrics is not None:
            await metrics.cleanup()
        if gave_up:  # its connections may be stuck in a query or a dead socket
            pool.terminate()
        else:
            await pool.close()
        await redis.aclose()
    log.info("worker %s stopped", worker.worker_id)


async def serve_metrics(worker: Worker, port: int) -> web.AppRunner | None:
    """GET /metrics on `port` of all interfaces, for a scraper in the same network (or the
    next free port above it: shared.metrics.start_metrics_listener)."""

    async def expose(request: web.Request) -> web.Response:
        # The rest is still worth reading.
        with contextlib.suppress(*REDIS_ERRORS, TimeoutError, *PG_ERRORS):
            await refresh_gauges(worker)
        return metrics_response(worker.metrics.registry)

    all_interfaces = "0.0.0.0"  # noqa: S104 - a container's port
    return await start_metrics_listener(expose, all_interfaces, port, "WORKER_METRICS_PORT", log)


async def check(settings: Settings) -> int:
    redis = open_redis(settings)
    try:
        keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
        live = await live_workers(redis, keys)
        sidelined = await sidelined_workers(redis, keys)
    except REDIS_ERRORS as e:
        print(f"unhealthy: Redis unreachable ({e})")
        return 1
    finally:
        await redis.aclose()
    host = f"{socket.gethostname()}-"
    ours = [w for w in live if w.startswith(host)]
    for worker_id, why in sidelined.items():
        if worker_id.startswith(host):
            print(f"unhealthy: {worker_id} gave its shards up: {why}")
            return 1
    print(f"healthy: {', '.join(ours)}" if ours else "unhealthy: no live worker on this host")
    return 0 if ours else 1


def main(argv: list[str] | None = None) -> int:
    parser = cli.parser("wallet-worker", __doc__, EXIT_CODES)
    parser.add_argument(
        "--check",
        action="store_true",
        help="health check: whether a worker of this host has a live heartbeat; starts none",
    )
    args = parser.parse_args(argv)
    # Settings that are not valid end it here with one line, for the health check too.
    settings = Settings.from_env_or_exit("worker")
    if args.check:
        return asyncio.run(check(settings))
    logs.configure(settings.log_level)
    uvloop.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
