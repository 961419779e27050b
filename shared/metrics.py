"""Prometheus metrics of the API and of the worker; each process (and each app or worker in
a test) has a registry of its own, exposed at GET /metrics on a port of its own (never the
API's public one)."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
PORTS_TRIED = 100  # the configured port and the next ones, for processes sharing a host


@dataclass
class ApiMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    # (route, method, status) -> its request counter and latency histogram: labels() looks
    # them up under a lock, twice per request
    _by_request: dict[tuple[str, str, int], tuple[Any, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.requests = Counter(
            "wallet_http_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "wallet_http_request_seconds",
            "Time to answer an HTTP request, by route template, method and status",
            ["route", "method", "status"],
            buckets=SECONDS,
            registry=self.registry,
        )
        self.reply_timeouts = Counter(
            "wallet_reply_timeouts",
            "Operations answered 202 because the worker's reply did not come in time",
            registry=self.registry,
        )

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        children = self._by_request.get(key)
        if children is None:
            labels = (route, method, str(status))
            children = (self.requests.labels(*labels), self.latency.labels(*labels))
            self._by_request[key] = children
        children[0].inc()
        children[1].observe(seconds)


@dataclass
class WorkerMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        self._of_batches()
        self._of_shards()
        self._of_transfers()

    def _of_batches(self) -> None:
        self.batch_size = Histogram(
            "wallet_batch_operations",
            "Operations in one committed batch",
            buckets=BATCH_SIZES,
            registry=self.registry,
        )
        self.commit_seconds = Histogram(
            "wallet_batch_commit_seconds",
            "Time one batch takes to write, up to its COMMIT",
            buckets=SECONDS,
            registry=self.registry,
        )
        self.fenced = Counter(
            "wallet_fenced_batches",
            "Batches refused because another worker had taken one of their shards",
            registry=self.registry,
        )
        self.parked_wallets = Gauge(
            "wallet_parked_wallets",
            "Wallets whose batch keeps failing, set aside so the others go on",
            registry=self.registry,
        )
        self.held_back = Counter(
            "wallet_held_back_wallets",
            "Wallets whose committed batch could not hand on a transfer's next step or a "
            "dead letter (Redis full, a slot moving): their entries are kept and tried again",
            registry=self.registry,
        )
        self.dead_letters = Gauge(
            "wallet_dead_letters",
            "Entries in the dead-letter streams of the shards this worker owns",
            registry=self.registry,
        )

    def _of_shards(self) -> None:
        self.lease_changes = Counter(
            "wallet_lease_changes",
            "Shards taken, handed back, or lost (the lease ran out before renewal)",
            ["change"],
            registry=self.registry,
        )
        # Each label's series from the start, at 0: a rate or increase() over a series
        # misses the step from no series to 1.
        for change in ("taken", "handed_back", "lost"):
            self.lease_changes.labels(change)
        self.shards_owned = Gauge(
            "wallet_shards_owned", "Shards this worker owns", registry=self.registry
        )
        # What the sum of wallet_shards_owned over the workers should reach.
        self.shard_count = Gauge(
            "wallet_shard_count", "SHARD_COUNT: the shards there are to own", registry=self.registry
        )
        self.queued = Gauge(
            "wallet_queued_operations",
            "Operations waiting in the shard's streams, for the shards this worker owns",
            ["shard"],
            registry=self.registry,
        )

    def _of_transfers(self) -> None:
        self.transfers = Counter(
            "wallet_transfers_settled",
            "Transfers settled by this worker: completed (credited), refused (insufficient "
            "funds) or returned (credited back to the source)",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("completed", "refused", "returned"):
            self.transfers.labels(outcome)
        self.holds = Counter(
            "wallet_holds",
            "Holds placed by this worker's batches, and ended: captured, voided or expired",
            ["event"],
            registry=self.registry,
        )
        for event in ("placed", "captured", "voided", "expired"):
            self.holds.labels(event)
        self.holds_pending_expiry = Gauge(
            "wallet_holds_held",
            "Holds still held in the shards this worker owns, which it expires when due",
            registry=self.registry,
        )
        self.holds_overdue = Gauge(
            "wallet_holds_overdue_seconds",
            "How long the hold longest past its expiry, of those still held in the shards"
            " this worker owns, has been due (0 when none is)",
            registry=self.registry,
        )
        self.transfers_unsettled = Gauge(
            "wallet_transfers_unsettled",
            "Transfers debited and not yet credited or returned, from the shards this worker owns",
            registry=self.registry,
        )
        self.returns_waiting = Gauge(
            "wallet_transfer_returns_waiting",
            "Transfers whose amount cannot go back to the source yet (it is at the largest "
            "balance): resent until it fits, from the shards this worker owns",
            registry=self.registry,
        )
        self.steps_resent = Counter(
            "wallet_transfer_steps_resent",
            "Transfer steps found unsettled past TRANSFER_RESEND_AFTER: sent again, or left "
            "alone while they may still wait in a slow wallet's stream",
            ["outcome"],
            registry=self.registry,
        )
        self.transfers_unsettled_oldest = Gauge(
            "wallet_transfers_unsettled_oldest_seconds",
            "Age of the oldest of those unsettled transfers (0 when there is none)",
            registry=self.registry,
        )


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)


def metrics_response(registry: CollectorRegistry) -> web.Response:
    response = web.Response(body=exposition(registry))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def start_metrics_listener(
    expose: Handler, host: str, port: int, setting: str, log: logging.Logger
) -> web.AppRunner | None:
    """GET /metrics answered by `expose` on `host`:`port`, or, when another process holds
    that port (a second one of its kind on the host), on the next free port above it; the
    port is logged. None if `port` is 0 or no port is free."""
    if not port:
        return None
    app = web.Application()
    app.router.add_get("/metrics", expose)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    for candidate in range(port, min(port + PORTS_TRIED, 65536)):
        try:
            await web.TCPSite(runner, host, candidate).start()
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        log.log(
            logging.INFO if candidate == port else logging.WARNING,
            "metrics on port %d%s",
            candidate,
            "" if candidate == port else f" ({setting} {port} is taken)",
        )
        return runner
    log.warning("no metrics: ports %d to %d are taken", port, candidate)
    await runner.cleanup()
    return None
