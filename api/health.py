"""Whether this process and what it depends on are up: /health and /ready."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api.appkeys import KEYS, PG, REDIS, REPLIES
from api.bodies import Health, Ready, json_response
from api.problems import DEPENDENCY_ERRORS, problem
from shared.connections import REDIS_ERRORS, connection_from
from shared.scripts import live_workers, sidelined_workers

routes = web.RouteTableDef()


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    return json_response(Health("ok"))


@routes.get("/ready")
async def ready(request: web.Request) -> web.Response:
    """Ready when PostgreSQL and Redis answer and at least one worker is alive; `checks`
    says what is missing, and which workers gave their shards up and why."""
    app = request.app
    checks: dict[str, str] = {}
    live = 0
    try:
        async with asyncio.timeout(2):
            async with connection_from(app[PG]) as conn:
                await conn.fetchval("SELECT 1")
        checks["postgres"] = "ok"
    except DEPENDENCY_ERRORS as e:
        checks["postgres"] = f"unavailable: {type(e).__name__}"
    try:
        async with asyncio.timeout(2):
            live = len(await live_workers(app[REDIS], app[KEYS]))
            sidelined = await sidelined_workers(app[REDIS], app[KEYS])
        checks["redis"] = "ok"
        checks["workers"] = f"{live} live" if live else "none alive"
        for worker_id, why in sidelined.items():
            checks[f"worker {worker_id}"] = f"gave its shards up: {why}"
    except (*REDIS_ERRORS, TimeoutError) as e:
        checks["redis"] = f"unavailable: {type(e).__name__}"
        checks["workers"] = "unknown"
    if not app[REPLIES].subscribed.is_set():
        checks["replies"] = "reply channel not subscribed"
    ready = live and checks["postgres"] == checks["redis"] == "ok" and "replies" not in checks
    if ready:
        return json_response(Ready("ready", checks))
    return problem(503, "not-ready", "Not ready", "A dependency is missing", checks=checks)
