"""What the API tells about itself: request ids on responses and log lines, and the
Prometheus metrics at GET /metrics."""

from __future__ import annotations

import re
import time
import uuid

from aiohttp import web
from aiohttp.typedefs import Handler

from api.appkeys import METRICS
from shared.logs import REQUEST_ID
from shared.metrics import CONTENT_TYPE, exposition

REQUEST_ID_HEADER = "X-Request-Id"
# A caller's request id is kept if it is short and plain; otherwise the API makes one.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside the problem middleware, so it sees every answer's final status."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
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
        metrics = request.app[METRICS]
        metrics.requests.labels(route, request.method, str(status)).inc()
        metrics.latency.labels(route, request.method, str(status)).observe(
            time.perf_counter() - started
        )


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=exposition(request.app[METRICS].registry))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response
