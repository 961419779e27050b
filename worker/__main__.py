"""`python -m worker`: one shard worker, configured from the environment; SIGTERM drains."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from shared.connections import WORKER_PG_SETTINGS, open_pg_pool, open_redis
from shared.settings import Settings
from worker.worker import Worker


async def main() -> None:
    settings = Settings.from_env()
    # One blocking connection per owned shard waits for work, plus the batch loop's own.
    redis = open_redis(settings, max_connections=settings.shard_count + 8)
    pool = await open_pg_pool(settings, max_size=2, server_settings=WORKER_PG_SETTINGS)
    worker = Worker(settings, redis, pool)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    logging.getLogger("worker").info(
        "worker %s owns %d shards", worker.worker_id, len(worker.shards)
    )
    try:
        await worker.run()
    finally:
        await pool.close()
        await redis.aclose()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvloop.run(main())
