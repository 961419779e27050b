"""The Grafana dashboard of the write path, deploy/grafana/wallet.json, built with Grafana's
foundation SDK. `python -m devtools.dashboard` writes it; tests/test_operations_kit.py checks
that the file is what this builds, and that every metric it draws is served.

It draws the recorded series of deploy/prometheus/recording.yml where there is one (the
alerts read the same), and the workers' gauges as they are."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as builders
from grafana_foundation_sdk.builders import prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    Threshold,
    ThresholdsMode,
)

from devtools.processes import ROOT

PATH = ROOT / "deploy" / "grafana" / "wallet.json"
UID = "wallet-write-path"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
WRITE_ROUTES = (
    'method="POST", route=~"/api/v1/wallets/.+/operation|/api/v1/wallet|/api/v1/transfers"'
)
LEGEND = (
    common_builders.VizLegendOptions()
    .show_legend(True)
    .display_mode(common.LegendDisplayMode.LIST)
    .placement(common.LegendPlacement.BOTTOM)
)
TOOLTIP = (
    common_builders.VizTooltipOptions()
    .mode(common.TooltipDisplayMode.MULTI)
    .sort(common.SortOrder.DESCENDING)
)


def graph(
    title: str, description: str, unit: str, *queries: tuple[str, str], span: int = 8
) -> timeseries.Panel:
    """A time series panel of (expression, legend) queries."""
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .min(0)
        .legend(LEGEND)
        .tooltip(TOOLTIP)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .height(8)
        .span(span)
    )
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):
        panel.with_target(prometheus.Dataquery().ref_id(ref).expr(expr).legend_format(legend))
    return panel


def number(title: str, description: str, expr: str, *, unit: str = "none") -> stat.Panel:
    """A stat panel of one expression's last value, red from 1 on."""
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .graph_mode(common.BigValueGraphMode.AREA)
        .color_mode(common.BigValueColorMode.VALUE)
        .reduce_options(common_builders.ReduceDataOptions().calcs(["lastNotNull"]))
        .thresholds(
            builders.ThresholdsConfig()
            .mode(ThresholdsMode.ABSOLUTE)
            .steps([Threshold(None, "green"), Threshold(1, "red")])
        )
        .with_target(prometheus.Dataquery().ref_id("A").expr(expr).instant())
        .height(4)
        .span(6)
    )


def build() -> builders.Dashboard:
    dashboard = (
        builders.Dashboard("Wallet service: the write path")
        .uid(UID)
        .description(
            "API -> per-wallet Redis streams -> sharded workers -> PostgreSQL group commit."
            " Alerts and runbook: docs/operations.md."
        )
        .tags(["wallet"])
        .timezone("browser")
        .time("now-1h", "now")
        .refresh("30s")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .readonly()
        .with_variable(
            builders.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
    )
    for section in (_requests, _batches, _queues, _ownership, _transfers, _holds):
        dashboard = section(dashboard)
    return dashboard


def _requests(dashboard: builders.Dashboard) -> builders.Dashboard:
    """The API: the requests coming in, their answers and latency."""
    return (
        dashboard.with_row(builders.Row("API: requests in"))
        .with_panel(
            graph(
                "Requests by status",
                "Requests answered per second, all routes, by status.",
                "reqps",
                (
                    "sum by (status) (job_route_status:wallet_http_requests:rate5m)",
                    "{{status}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Write latency",
                "How long POST of an operation or a transfer takes to answer: 200 after"
                " the worker's COMMIT, 202 at REPLY_TIMEOUT.",
                "s",
                (
                    f"job_route:wallet_http_request_seconds:p50_5m{{{WRITE_ROUTES}}}",
                    "p50 {{route}}",
                ),
                (
                    f"job_route:wallet_http_request_seconds:p99_5m{{{WRITE_ROUTES}}}",
                    "p99 {{route}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Server errors and reply timeouts",
                "5xx answers per second, and operations answered 202 because no worker"
                " replied within REPLY_TIMEOUT.",
                "reqps",
                (
                    'sum by (status) (job_route_status:wallet_http_requests:rate5m{status=~"5.."})',
                    "{{status}}",
                ),
                ("sum(job:wallet_reply_timeouts:rate5m)", "202: no reply in time"),
            )
        )
    )


def _batches(dashboard: builders.Dashboard) -> builders.Dashboard:
    """The workers' batches: sizes, commit time, fencing."""
    return (
        dashboard.with_row(builders.Row("Workers: batches"))
        .with_panel(
            graph(
                "Committed",
                "Operations and batches (transactions) committed per second by all workers.",
                "ops",
                ("sum(job:wallet_operations_committed:rate5m)", "operations"),
                ("sum(job:wallet_batches:rate5m)", "batches"),
            )
        )
        .with_panel(
            graph(
                "Batch size",
                "Operations in one committed batch: group commit at work. One when a"
                " wallet is quiet; it grows with the load.",
                "none",
                (
                    "sum(job:wallet_operations_committed:rate5m) / sum(job:wallet_batches:rate5m)",
                    "mean",
                ),
                ("max(job:wallet_batch_operations:p99_5m)", "p99"),
            )
        )
        .with_panel(
            graph(
                "Commit latency",
                "One batch's write, up to its COMMIT.",
                "s",
                ("max(job:wallet_batch_commit_seconds:p50_5m)", "p50"),
                ("max(job:wallet_batch_commit_seconds:p99_5m)", "p99"),
            )
        )
    )


def _queues(dashboard: builders.Dashboard) -> builders.Dashboard:
    """The queues and who owns the shards."""
    return (
        dashboard.with_row(builders.Row("Workers: queues and ownership"))
        .with_panel(
            graph(
                "Queued operations",
                "Operations waiting in the shards' streams: all shards, and the five"
                " longest. A queue that grows and does not fall back has an owner that"
                " cannot keep up.",
                "none",
                ("sum(job:wallet_queued_operations:sum)", "all shards"),
                ("topk(5, job_shard:wallet_queued_operations:sum)", "shard {{shard}}"),
            )
        )
        .with_panel(
            graph(
                "Shards owned",
                "Shards each worker owns, and SHARD_COUNT: the sum below it for longer"
                " than a lease means shards nobody serves.",
                "none",
                ("sum by (instance) (wallet_shards_owned)", "{{instance}}"),
                ("max(job:wallet_shard_count:max)", "SHARD_COUNT"),
            )
        )
        .with_panel(
            graph(
                "Lease changes",
                "Shards taken, handed back, or lost (the lease ran out before renewal),"
                " per second.",
                "ops",
                (
                    "sum by (change) (rate(wallet_lease_changes_total[$__rate_interval]))",
                    "{{change}}",
                ),
            )
        )
    )


def _ownership(dashboard: builders.Dashboard) -> builders.Dashboard:
    """Who owns the shards, as figures."""
    return (
        dashboard.with_panel(
            number(
                "Workers up",
                "Workers Prometheus reaches.",
                'sum(up{job="wallet-worker"})',
            )
        )
        .with_panel(
            number(
                "Fenced batches (1h)",
                "Batches refused because another worker had taken one of their shards.",
                "sum(increase(wallet_fenced_batches_total[1h]))",
            )
        )
        .with_panel(
            number(
                "Parked wallets",
                "Wallets whose batches keep failing, set aside so the others go on.",
                "sum(wallet_parked_wallets)",
            )
        )
        .with_panel(
            number(
                "Dead letters",
                "Queued entries no worker could apply, kept with their error"
                " (wallet-inspect dead-letters).",
                "sum(wallet_dead_letters)",
            )
        )
    )


def _transfers(dashboard: builders.Dashboard) -> builders.Dashboard:
    """Transfers: settled, unsettled, returned."""
    return (
        dashboard.with_row(builders.Row("Transfers"))
        .with_panel(
            graph(
                "Transfers settled",
                "Per second: completed (credited), refused (insufficient funds), returned"
                " (the destination could not take it).",
                "ops",
                (
                    "sum by (outcome) (job_outcome:wallet_transfers_settled:rate5m)",
                    "{{outcome}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Unsettled transfers",
                "Transfers debited and not yet credited or returned.",
                "none",
                ("sum(wallet_transfers_unsettled)", "unsettled"),
            )
        )
        .with_panel(
            graph(
                "Oldest unsettled transfer",
                "Age of the oldest unsettled transfer; a transfer settles in milliseconds.",
                "s",
                ("max(wallet_transfers_unsettled_oldest_seconds)", "oldest"),
            )
        )
    )


def _holds(dashboard: builders.Dashboard) -> builders.Dashboard:
    """Holds: placed and ended, still held, the expiries' lag."""
    return (
        dashboard.with_row(builders.Row("Holds"))
        .with_panel(
            graph(
                "Holds placed and ended",
                "Per second: placed, captured, voided, expired.",
                "ops",
                ("sum by (event) (rate(wallet_holds_total[5m]))", "{{event}}"),
            )
        )
        .with_panel(
            graph(
                "Holds held",
                "Holds still held, each expiring by itself when due.",
                "none",
                ("sum(wallet_holds_held)", "held"),
            )
        )
        .with_panel(
            graph(
                "Longest overdue hold",
                "How long the hold longest past its expiry has been due; an expiry goes"
                " through within a second.",
                "s",
                ("max(wallet_holds_overdue_seconds)", "overdue"),
            )
        )
    )


def render() -> str:
    """The dashboard as JSON, panels numbered in order."""
    dashboard = build().build()
    for number_, panel in enumerate(dashboard.panels or [], start=1):
        panel.id_val = number_
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.dashboard",
        description="Writes the Grafana dashboard of the write path (deploy/grafana/wallet.json).",
    )
    parser.add_argument("path", nargs="?", type=Path, default=PATH, help="where to write it")
    path = parser.parse_args(argv).path
    path.write_text(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
