"""The application factory: middleware, routes, and the resources a process holds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from api import health, holds, operations, transfers, wallets
from api.appkeys import (
    DEADLINES,
    ENQUEUE,
    HASHING,
    HOLD_WALLETS,
    KEYS,
    KNOWN_WALLETS,
    LIVE,
    METRICS,
    OWNERS,
    PG,
    QUEUE,
    REDIS,
    REPLIES,
    SETTINGS,
)
from api.auth import auth_middleware, auth_routes
from api.deadlines import Deadlines
from api.enqueue import Enqueuer
from api.limits import Slots
from api.live import LiveStats
from api.observe import access_log_middleware, live_view, observe_middleware
from api.openapi import openapi_json
from api.page import docs, docs_asset, page, page_asset
from api.problems import bounded_reads, problem_middleware
from api.replies import LISTEN_WAIT, ReplyListener
from shared.connections import REDIS_SOCKET_TIMEOUT, open_pg_pool, open_redis
from shared.keys import KeySpace
from shared.metrics import ApiMetrics, metrics_response, start_metrics_listener
from shared.queue import queue_for
from shared.settings import Settings

log = logging.getLogger("api")

# Every request body of this API is a small JSON object.
MAX_BODY_BYTES = 16 * 1024
# Connections waiting to be accepted. Past aiohttp's 128, a burst of new connections (a
# client pool growing at a busy moment) has SYNs dropped, and each waits a second to retry.
LISTEN_BACKLOG = 1024


async def postgres(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # A client waits no longer on PostgreSQL than on an operation's outcome: past that, 503.
    app[PG] = await open_pg_pool(
        settings,
        server_settings={"application_name": f"{settings.redis_key_prefix}-api"},
        wait_at_most=settings.reply_timeout,
    )
    yield
    await app[PG].close()


async def request_deadlines(app: web.Application) -> AsyncIterator[None]:
    deadlines = app[DEADLINES] = Deadlines(app[SETTINGS].reply_timeout)
    keeping = asyncio.create_task(deadlines.run(), name="request-deadlines")
    yield
    deadlines.close()
    await keeping


async def redis_and_replies(app: web.Application) -> AsyncIterator[None]:
    settings, api_id = app[SETTINGS], uuid.uuid4().hex
    redis = open_redis(settings, name=f"{settings.redis_key_prefix}:api:{api_id}")
    app[REDIS] = redis
    app[QUEUE] = queue_for(app[KEYS], redis)
    enqueue = app[ENQUEUE] = Enqueuer(redis)
    enqueuing = asyncio.create_task(enqueue.run(), name="enqueuer")
    replies = ReplyListener(redis, app[KEYS].reply_channel(api_id))
    app[REPLIES] = replies
    listening = asyncio.create_task(replies.run(), name="reply-listener")
    # Serve once replies can arrive; if Redis is down, operations get 503 until it is up.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(replies.first_attempt_done.wait(), timeout=5)
    yield
    enqueue.close()
    await enqueuing
    replies.close()
    # Cancelling it inside a Redis read can hang; it sees close() within one read's wait.
    try:
        await asyncio.wait_for(listening, LISTEN_WAIT + REDIS_SOCKET_TIMEOUT)
    except TimeoutError:
        log.warning("the reply listener did not stop in time")
    await redis.aclose()


async def metrics_listener(app: web.Application) -> AsyncIterator[None]:
    """GET /metrics on API_METRICS_PORT, apart from the public port: this process's
    metrics, for a scraper on the internal network. Processes sharing PORT (REUSE_PORT) each
    take a port of their own, the next free one, so that every scrape reads one process."""
    settings = app[SETTINGS]

    async def expose(request: web.Request) -> web.Response:
        return metrics_response(app[METRICS].registry)

    runner = await start_metrics_listener(
        expose, settings.host, settings.api_metrics_port, "API_METRICS_PORT", log
    )
    yield
    if runner is not None:
        await runner.cleanup()


def create_app(settings: Settings) -> web.Application:
    middlewares: list[Middleware] = [observe_middleware, problem_middleware, bounded_reads]
    if settings.access_log_sample > 0:  # inside observe's request id, outside the problems
        middlewares.insert(1, access_log_middleware(settings.access_log_sample))
    if settings.auth_enabled:  # else it would pass every request through unchanged
        middlewares.append(auth_middleware)
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[SETTINGS] = settings
    app[KEYS] = KeySpace(settings.redis_key_prefix, settings.shard_count)
    app[METRICS] = ApiMetrics()
    app[OWNERS] = {}
    app[KNOWN_WALLETS] = {}
    app[HOLD_WALLETS] = {}
    app[LIVE] = LiveStats()
    app[HASHING] = Slots(settings.password_hash_concurrency, settings.password_hash_queue)
    app.cleanup_ctx.extend([request_deadlines, postgres, redis_and_replies, metrics_listener])
    for resource in (wallets, operations, transfers, holds, health):
        app.add_routes(resource.routes)
    app.add_routes(auth_routes)
    app.router.add_get("/api/openapi.json", openapi_json)
    app.router.add_get("/docs", docs)
    app.router.add_get("/docs/{name}", docs_asset)
    app.router.add_get("/api/live", live_view)
    app.router.add_get("/", page)
    app.router.add_get("/static/{name}", page_asset)
    return app
