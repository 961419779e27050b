"""What the API tells about itself: request ids on responses and log lines, the Prometheus
metrics at GET /metrics, and the live view of the write path for the web page at
GET /api/live: per second over the last minutes, the operations this API process answered
and their p50/p99 latency, the batches and operations all workers committed (counted in
Redis by the workers), and the operations queued per shard (sampled from the shards'
counters when the view is asked for)."""

from __future__ import annotations

import logging
import random
import re
import time

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from api.appkeys import KEYS, LIVE, METRICS, REDIS, SETTINGS
from api.bodies import Live, LiveSecond, json_response
from api.inputs import random_bytes
from api.live import WINDOW_SECONDS, percentile_ms
from shared.logs import REQUEST_ID

REQUEST_ID_HEADER = "X-Request-Id"
OPERATION_ROUTES = frozenset({"/api/v1/wallets/{wallet_id}/operation", "/api/v1/wallet"})
# A caller's request id is kept if it is short and plain; otherwise the API makes one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside the problem middleware, so it sees every answer's final status."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if given and _REQUEST_ID.fullmatch(given) else random_bytes(16).hex()
    token = REQUEST_ID.set(request_id)
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        response.headers[REQUEST_ID_HEADER] = request_id
        return response
    except web.HTTPException as e:  # redirects and the like; errors are problems by now
        status = e.status
        raise
    finally:
        REQUEST_ID.reset(token)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        taken = time.perf_counter() - started
        request.app[METRICS].observe_request(route, request.method, status, taken)
        if route in OPERATION_ROUTES and request.method == "POST":
            request.app[LIVE].record(taken)


def access_log_middleware(sample: float) -> Middleware:
    """One log line (logger api.access, at INFO) for each request, or for the share `sample`
    of them: method, route template, status, duration in ms; the request id comes from the
    observe middleware around it. The route template, never the path as sent: no query
    string, header or body goes into it. Installed only when ACCESS_LOG_SAMPLE is above 0,
    so that it costs nothing when off."""
    log = logging.getLogger("api.access")

    @web.middleware
    async def access_log(request: web.Request, handler: Handler) -> web.StreamResponse:
        if sample < 1 and random.random() >= sample:
            return await handler(request)
        started = time.perf_counter()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        finally:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else "unmatched"
            ms = round((time.perf_counter() - started) * 1000, 3)
            fields = {"method": request.method, "route": route, "status": status}
            log.info(
                "%s %s %d %.1fms",
                request.method,
                route,
                status,
                ms,
                extra={"request_id": REQUEST_ID.get(), "fields": {**fields, "duration_ms": ms}},
            )

    return access_log


async def live_view(request: web.Request) -> web.Response:
    app = request.app
    return json_response(await app[LIVE].view.get(lambda: _compute_live(app)))


async def _compute_live(app: web.Application) -> Live:
    settings, keys, stats, redis = app[SETTINGS], app[KEYS], app[LIVE], app[REDIS]
    computed_at = time.time()
    now = int(computed_at)
    seconds = range(now - WINDOW_SECONDS + 1, now + 1)
    async with redis.pipeline(transaction=False) as pipe:
        for at in seconds:
            pipe.hgetall(keys.committed(at))
        if not stats.queued or stats.queued[-1][0] != now:
            for shard in range(settings.shard_count):
                pipe.get(keys.queued(shard))
        replies = await pipe.execute()
    committed, counts = replies[: len(seconds)], replies[len(seconds) :]
    if counts:
        stats.queued.append(
            (now, {str(s): int(n) for s, n in enumerate(counts) if n and int(n) > 0})
        )
    queued_at = dict(stats.queued)
    answered_at = {second.at: second for second in stats.seconds}
    series: list[LiveSecond] = []
    for at, done in zip(seconds, committed, strict=True):
        answered = answered_at.get(at)
        batches, operations = int(done.get(b"batches", 0)), int(done.get(b"operations", 0))
        shards = queued_at.get(at)
        series.append(
            LiveSecond(
                t=at,
                answered=answered.count if answered else 0,
                p50_ms=percentile_ms(answered.latencies, 50) if answered else None,
                p99_ms=percentile_ms(answered.latencies, 99) if answered else None,
                committed=operations,
                mean_batch=round(operations / batches, 2) if batches else None,
                queued=None if shards is None else sum(shards.values()),
                queued_by_shard=shards,
            )
        )
    return Live(WINDOW_SECONDS, settings.shard_count, series, round(computed_at, 3))
