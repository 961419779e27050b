"""RFC 9457 problem documents, and the one middleware that turns errors into them."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import msgspec
import redis.exceptions
from aiohttp import web
from aiohttp.typedefs import Handler
from msgspec import UNSET

from api.appkeys import DEADLINES, PG
from api.bodies import Problem
from shared import errors
from shared.connections import PG_CONNECTION_LOST, out_of_memory

log = logging.getLogger("api")

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "urn:wallet-service:problem:"
RETRY_AFTER_SECONDS = "1"

# error class -> status, problem type, title
DOMAIN_PROBLEMS: dict[type[errors.WalletError], tuple[int, str, str]] = {
    errors.InvalidInput: (422, "validation-error", "The request is not valid"),
    errors.WalletNotFound: (404, "wallet-not-found", "Wallet not found"),
    errors.OperationNotFound: (404, "operation-not-found", "Operation not found"),
    errors.TransferNotFound: (404, "transfer-not-found", "Transfer not found"),
    errors.HoldNotFound: (404, "hold-not-found", "Hold not found"),
    errors.HoldNotActive: (409, "hold-not-active", "The hold has ended"),
    errors.InsufficientFunds: (409, "insufficient-funds", "Insufficient funds"),
    errors.BalanceLimitExceeded: (409, "balance-limit", "The balance would exceed its limit"),
    errors.IdempotencyKeyReused: (
        422,
        "idempotency-key-reused",
        "Idempotency-Key already used for another request",
    ),
    errors.QueueFull: (503, "queue-full", "Too many operations queued for this wallet"),
    errors.DependencyUnavailable: (503, "dependency-unavailable", "Service unavailable"),
    errors.Unauthorized: (401, "unauthorized", "Authentication required"),
    errors.InvalidCredentials: (401, "invalid-credentials", "Wrong username or password"),
    errors.UsernameTaken: (409, "username-taken", "The username is taken"),
    errors.TooManyAttempts: (429, "too-many-attempts", "Too many attempts"),
    errors.Busy: (503, "busy", "Too busy"),
    errors.AuthDisabled: (404, "auth-disabled", "Authentication is turned off"),
    errors.PageNotFound: (404, "not-found", "Not found"),
}

# aiohttp's own errors (routing, size limit) by status -> problem type
HTTP_PROBLEMS = {
    400: "malformed-request",
    404: "not-found",
    405: "method-not-allowed",
    413: "body-too-large",
    415: "unsupported-media-type",
}

DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,  # a replica after a failover
    redis.exceptions.ClusterError,  # a cluster's slot not served yet (a failover under way)
    redis.exceptions.RedisClusterException,  # no node of a cluster reachable
    redis.exceptions.OutOfMemoryError,  # maxmemory reached under noeviction
    *PG_CONNECTION_LOST,
    asyncpg.OperatorInterventionError,  # shutting down, cannot connect now
    asyncpg.TooManyConnectionsError,
    asyncpg.ReadOnlySQLTransactionError,  # a standby
    asyncpg.QueryCanceledError,  # statement timeout
    OSError,
    TimeoutError,
)


def problem(
    status: int,
    kind: str,
    title: str,
    detail: str | None = None,
    *,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    body = Problem(TYPE_BASE + kind, title, status, detail or UNSET, **extra)
    headers = dict(headers or {})
    if status == 503:
        headers.setdefault("Retry-After", RETRY_AFTER_SECONDS)
    return web.Response(
        status=status,
        body=msgspec.json.encode(body),
        content_type=PROBLEM_JSON,
        headers=headers,
    )


def error_response(
    error: errors.WalletError, headers: dict[str, str] | None = None
) -> web.Response:
    status, kind, title = DOMAIN_PROBLEMS[type(error)]
    headers = {**error.headers, **(headers or {})}
    return problem(status, kind, title, error.detail, headers=headers, **error.extra)


class MalformedRequest(web.HTTPBadRequest):
    """A body that is not the JSON it must be."""


def malformed(detail: str) -> web.HTTPException:
    return MalformedRequest(text=detail)


@web.middleware
async def bounded_reads(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A read (GET, HEAD) takes at most REPLY_TIMEOUT, as an operation does: a PostgreSQL
    that does not answer (a network that drops packets) costs a 503, not a request hanging
    on its query or on a new connection for a minute. A read that met a pooled connection
    PostgreSQL had already ended (it restarted, an operator ended the sessions, a failover)
    runs once more, within the same bound; the pool's other idle connections are then
    likely gone too, so they are all replaced first. Writes are not run again: one may
    have been done before the connection was lost."""
    if request.method not in ("GET", "HEAD"):
        return await handler(request)
    async with request.app[DEADLINES].bound():
        try:
            return await handler(request)
        except PG_CONNECTION_LOST:
            await request.app[PG].expire_connections()
            return await handler(request)


@web.middleware
async def problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except errors.WalletError as e:
        return error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        kind = HTTP_PROBLEMS.get(e.status, "http-error")
        headers = {k: v for k, v in e.headers.items() if k in ("Allow",)}
        detail = e.text if isinstance(e, MalformedRequest) else None
        return problem(e.status, kind, e.reason, detail, headers=headers)
    except Exception as e:
        full = out_of_memory(e)  # from a script on Redis 6, a plain ResponseError
        if not full and not isinstance(e, DEPENDENCY_ERRORS):
            log.exception("%s %s failed", request.method, request.path)  # with the operation id
            return problem(500, "internal-error", "Internal server error")
        log.warning(
            "%s %s: dependency unavailable: %s: %s",
            request.method,
            request.path,
            type(e).__name__,
            e,
        )
        return problem(
            503,
            "dependency-unavailable",
            "Service unavailable",
            "The service's queues are full; retry later."
            if full
            else "A database or queue the service needs is not reachable; retry later.",
        )
