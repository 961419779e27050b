"""`python -m worker`: one shard worker, configured from the environment. SIGTERM drains it:
the batch in hand is finished and answered, the shards are handed back, and it exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop

from shared.settings import Settings
from worker.worker import Worker, connect, new_worker_id

log = logging.getLogger("worker")


async def main() -> None:
    settings = Settings.from_env()
    worker_id = new_worker_id()
    redis, pool = await connect(settings, worker_id)
    worker = Worker(settings, redis, pool, worker_id=worker_id)
    running = asyncio.current_task()
    assert running is not None
    loop = asyncio.get_running_loop()

    def drain() -> None:
        worker.stop()
        # A batch stuck on a dependency that is down must not keep the process alive.
        loop.call_later(settings.worker_stop_grace, running.cancel)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, drain)
    log.info("worker %s started", worker.worker_id)
    try:
        await worker.run()
    finally:
        await pool.close()
        await redis.aclose()
    log.info("worker %s stopped", worker.worker_id)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    uvloop.run(main())
