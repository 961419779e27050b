"""The operations kit: deploy/prometheus (alert and recording rules, their unit tests, a scrape
configuration) and deploy/grafana/wallet.json, held to the service they watch and to a real
Prometheus (Debian's `prometheus`; the tests that need it skip, saying why, without it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from grafana_foundation_sdk.cog import plugins, runtime
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import prometheus as prometheus_query
from grafana_foundation_sdk.models.dashboard import Dashboard, Panel
from prometheus_client.parser import text_string_to_metric_families

from devtools import dashboard
from devtools.processes import ROOT, free_port, spawn
from shared.codec import HoldStatus, OperationRequest, encode_request
from shared.connections import PG_ERRORS, open_pg_pool
from shared.keys import KeySpace
from shared.scripts import ENQUEUE
from shared.settings import Settings
from tests.helpers import Client, eventually, operate
from worker.gauges import refresh_gauges
from worker.holds import HoldRow
from worker.worker import Worker

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULE_FILES = ("recording.yml", "alerts.yml")
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
JOBS = {"api": "wallet-api", "worker": "wallet-worker"}

promtool = shutil.which("promtool")
prometheus = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="no promtool on PATH (Debian's prometheus package brings it)"
)
needs_prometheus = pytest.mark.skipif(
    prometheus is None, reason="no prometheus on PATH (Debian's prometheus package)"
)


def api_metrics_target(served: Settings) -> str:
    """Where Prometheus scrapes the API: the port it serves /metrics on."""
    return f"127.0.0.1:{served.api_metrics_port}"


def worker_metrics_target(served: Settings) -> str:
    return f"127.0.0.1:{served.worker_metrics_port}"


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for name in RULE_FILES
        for group in yaml.safe_load((PROMETHEUS_DIR / name).read_text())["groups"]
        for rule in group["rules"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def dashboard_queries() -> list[str]:
    board = json.loads(dashboard.PATH.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: the service's (wallet_...), the recorded ones
    (level:wallet_...:operation) and Prometheus's `up`. Quoted strings are left out, so
    that a route's {wallet_id} is not taken for one."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", bare))
    return {t for t in tokens if "wallet_" in t or t == "up"}


def served_names(exposition: str) -> set[str]:
    """Every series name a /metrics page declares, whether or not it has a sample yet."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "gauge": ("",),
    }
    return {
        family.name + suffix
        for family in text_string_to_metric_families(exposition)
        for suffix in suffixes[family.type]
    }


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a document's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# The rules


@needs_promtool
def test_the_rules_and_the_scrape_configuration_pass_promtool() -> None:
    assert promtool is not None
    checked = subprocess.run(
        [promtool, "check", "rules", *RULE_FILES],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert config.returncode == 0, config.stdout + config.stderr


@needs_promtool
def test_the_rules_unit_tests_pass() -> None:
    assert promtool is not None
    run = subprocess.run(
        [promtool, "test", "rules", "tests.yml"],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load((PROMETHEUS_DIR / "tests.yml").read_text())["tests"]
    checks = [check for test in tests for check in test["alert_rule_test"]]
    for alert in alerts():
        name = alert["alert"]
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name} is never tested firing"
        assert any(not c["exp_alerts"] for c in mine), f"{name} is never tested not firing"
    assert {c["alertname"] for c in checks} <= {a["alert"] for a in alerts()}


def test_every_alert_says_what_it_is_and_links_its_runbook() -> None:
    anchors = github_anchors(OPERATIONS_DOC.read_text())
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for alert in alerts():
        annotations = alert["annotations"]
        assert annotations["summary"], alert["alert"]
        assert annotations["description"], alert["alert"]
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}
        page, _, anchor = annotations["runbook_url"].partition("#")
        assert page == "docs/operations.md", alert["alert"]
        assert anchor == alert["alert"].lower(), alert["alert"]
        assert anchor in anchors, f"docs/operations.md has no section {alert['alert']}"


def test_the_rules_and_the_dashboard_read_only_recorded_or_served_names_of_their_jobs() -> None:
    """Recorded names are recorded by recording.yml; `up` is asked of the two jobs that
    prometheus.yml scrapes. (That the service serves the rest is the next test's.)"""
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    expressions = [rule["expr"] for rule in rules()] + dashboard_queries()
    read = set().union(*map(metric_names, expressions))
    assert read & recorded == {n for n in read if ":" in n}
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    jobs = {c["job_name"] for c in config["scrape_configs"]}
    assert jobs == set(JOBS.values())
    assert set(config["rule_files"]) == set(RULE_FILES)
    for expr in expressions:
        for job in re.findall(r'up\{job="([^"]+)"\}', expr):
            assert job in jobs, expr


# The dashboard


def test_the_dashboard_file_is_what_devtools_dashboard_builds() -> None:
    """`python -m devtools.dashboard` rewrites it."""
    assert dashboard.PATH.read_text() == dashboard.render()


def test_the_dashboard_loads_as_grafanas_dashboard_model() -> None:
    """Read back through the foundation SDK's model, it comes out unchanged: every key is
    one the model knows, every panel a known panel plugin with typed options, every query
    a Prometheus query."""
    plugins.register_default_plugins()
    data = json.loads(dashboard.PATH.read_text())
    model = Dashboard.from_json(data)
    assert json.loads(json.dumps(model, cls=JSONEncoder)) == data
    assert model.uid == dashboard.UID
    panels = model.panels or []
    assert [p.id_val for p in panels] == list(range(1, len(panels) + 1))
    graphs = [p for p in panels if isinstance(p, Panel)]
    assert graphs
    for panel in graphs:
        assert runtime.panelcfg_config(panel.type_val) is not None, panel.type_val
        assert panel.datasource is not None
        assert panel.datasource.type_val == "prometheus"
        targets = panel.targets or []
        assert targets, panel.title
        assert all(isinstance(t, prometheus_query.Dataquery) for t in targets)
        refs = [t.ref_id for t in targets if isinstance(t, prometheus_query.Dataquery)]
        assert len(set(refs)) == len(refs)
        assert all(refs)


# The service serves what they read


@pytest.fixture
def served(settings: Settings) -> Settings:
    return dataclasses.replace(
        settings,
        host="127.0.0.1",
        port=free_port(),
        api_metrics_port=free_port(),
        worker_metrics_port=free_port(),
    )


def start(module: str, served: Settings, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return spawn(module, served.to_env(), stdout=out, stderr=subprocess.STDOUT)


@contextlib.contextmanager
def ended(processes: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture
async def service(served: Settings, tmp_path: Path) -> AsyncIterator[list[subprocess.Popen[bytes]]]:
    """`python -m worker` and `python -m api` on loopback, ready; the worker first."""
    processes = [start("worker", served, tmp_path / "worker.log")]
    processes.append(start("api", served, tmp_path / "api.log"))
    with ended(processes):
        async with aiohttp.ClientSession() as http:

            async def ready() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{served.port}/ready") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(ready, within=30, what="the service to be ready")
        yield processes


async def text_of(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(url) as r:
        assert r.status == 200, url
        return await r.text()


async def test_every_metric_the_rules_and_the_dashboard_read_is_served(
    service: list[subprocess.Popen[bytes]], served: Settings
) -> None:
    expressions = [rule["expr"] for rule in rules()] + dashboard_queries()
    read = set().union(*map(metric_names, expressions))
    raw = {n for n in read if ":" not in n} - {"up"}
    base = f"http://127.0.0.1:{served.port}"
    async with aiohttp.ClientSession() as http:
        wallets = []
        for _ in range(2):
            async with http.post(f"{base}/api/v1/wallets") as r:
                wallets.append((await r.json())["id"])
        deposit = {"operationType": "DEPOSIT", "amount": "5.00"}
        async with http.post(f"{base}/api/v1/wallets/{wallets[0]}/operation", json=deposit) as r:
            assert r.status == 200
        transfer = {"from": wallets[0], "to": wallets[1], "amount": "2.00"}
        async with http.post(f"{base}/api/v1/transfers", json=transfer) as r:
            assert r.status == 200
        api = await text_of(http, f"http://{api_metrics_target(served)}/metrics")
        worker = await text_of(http, f"http://{worker_metrics_target(served)}/metrics")
    exposed = served_names(api) | served_names(worker)
    assert raw <= exposed, f"read but not served: {sorted(raw - exposed)}"
    assert "wallet_dead_letters" in served_names(worker)
    assert f"wallet_shard_count {float(served.shard_count)}" in worker


# The new gauges


async def test_the_worker_counts_its_shards_dead_letters_and_oldest_unsettled_transfer(
    client: Client, worker: Worker, wallet: str, settings: Settings, redis: Any, pg: Any
) -> None:
    keys = KeySpace(settings.redis_key_prefix, settings.shard_count)
    poison = encode_request(OperationRequest("not-a-uuid", wallet, "DEPOSIT", 100, "", 0))
    await redis.register_script(ENQUEUE)(
        keys=keys.enqueue_keys(wallet), args=[wallet, poison, 10, 10]
    )
    status, _, _ = await operate(client, wallet, "DEPOSIT", "1.00")  # behind the poison
    assert status == 200
    transfer = str(uuid.uuid4())
    value = worker.metrics.registry.get_sample_value
    week = 7 * 86400  # older than anything this run leaves unsettled
    await pg.execute(
        "INSERT INTO transfers (source_id, id, destination_id, amount, status,"
        " source_balance_after, created_at, updated_at, source_shard, resend_at)"
        " VALUES ($1, $2, $3, 100, 'in_flight', 0, now() - make_interval(secs => $4), now(),"
        "         $5, now() + interval '1 hour')",
        wallet,
        transfer,
        str(uuid.uuid4()),
        float(week),
        KeySpace(settings.redis_key_prefix, settings.shard_count).shard_of(wallet),
    )
    try:
        await refresh_gauges(worker)
        assert value("wallet_shard_count") == settings.shard_count
        assert value("wallet_dead_letters") == 1
        assert value("wallet_transfers_unsettled_oldest_seconds") == pytest.approx(week, abs=60)
    finally:
        await pg.execute("DELETE FROM transfers WHERE id = $1", transfer)
    await refresh_gauges(worker)
    oldest = value("wallet_transfers_unsettled_oldest_seconds")
    assert oldest is not None
    assert oldest < 86400


async def test_the_holds_overdue_are_told_even_when_postgresql_cannot_be_read(
    settings: Settings, redis: Any
) -> None:
    """A hold overdue is what an outage makes: the figures the worker holds itself are set
    before those it reads, so that a scrape still tells them while PostgreSQL (here: its
    pool, closed) cannot be read."""
    pool = await open_pg_pool(settings)
    await pool.close()
    worker = Worker(settings, redis, pool)
    due = int(time.time() * 1000) - 120_000
    hold = HoldRow(
        str(uuid.uuid4()), str(uuid.uuid4()), 1, HoldStatus.HELD, 0, due, None, None, False
    )
    worker.expiries.update([hold], counted=False)
    with pytest.raises(PG_ERRORS):
        await refresh_gauges(worker)
    overdue = worker.metrics.registry.get_sample_value("wallet_holds_overdue_seconds")
    assert overdue is not None
    assert overdue >= 120
    assert worker.metrics.registry.get_sample_value("wallet_holds_held") == 1


# A real Prometheus


def prometheus_files(served: Settings, directory: Path) -> Path:
    """deploy/prometheus as it is, but for its targets (this test's processes), its
    intervals (a second) and its alerts' waits (a second): the configuration's path."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    targets = {
        "wallet-api": api_metrics_target(served),
        "wallet-worker": worker_metrics_target(served),
    }
    for job in config["scrape_configs"]:
        for key in [k for k in job if k.endswith("_sd_configs")]:
            del job[key]
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    for name in RULE_FILES:
        groups = yaml.safe_load((PROMETHEUS_DIR / name).read_text())
        for group in groups["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = "1s"
        (directory / name).write_text(yaml.safe_dump(groups))
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(config: Path, port: int, directory: Path) -> subprocess.Popen[bytes]:
    assert prometheus is not None
    with (directory / "prometheus.log").open("wb") as log:
        return subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )


@needs_prometheus
async def test_a_real_prometheus_sees_the_workers_go_missing_and_come_back(
    service: list[subprocess.Popen[bytes]], served: Settings, tmp_path: Path
) -> None:
    config = prometheus_files(served, tmp_path)
    port = free_port()
    server = start_prometheus(config, port, tmp_path)
    worker = service[0]
    with ended([server]):
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:

            async def get(path: str, **params: str) -> Any:
                async with http.get(path, params=params) as r:
                    body = await r.json()
                    assert body["status"] == "success", body
                    return body["data"]

            async def answers() -> bool:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
                try:
                    async with http.get("/-/ready") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            async def both_up() -> bool:
                up = await get("/api/v1/query", query="up == 1")
                return {s["metric"]["job"] for s in up["result"]} == set(JOBS.values())

            async def alerts_in(*states: str) -> set[str]:
                found = await get("/api/v1/alerts")
                return {a["labels"]["alertname"] for a in found["alerts"] if a["state"] in states}

            async def every_rule_evaluated() -> bool:
                groups = (await get("/api/v1/rules"))["groups"]
                evaluated = [r for g in groups for r in g["rules"]]
                assert len(evaluated) == len(rules())
                for rule in evaluated:
                    assert rule["health"] != "err", rule
                return all(r["health"] == "ok" for r in evaluated)

            await eventually(answers, within=30, what="prometheus to be ready")
            await eventually(both_up, within=30, what="the API and the worker to be scraped")
            await eventually(every_rule_evaluated, within=30, what="every rule evaluated")
            for expr in dashboard_queries():  # Prometheus parses and runs each panel's query
                await get("/api/v1/query", query=expr.replace("$__rate_interval", "1m"))

            # Active, maybe, from an evaluation before the worker's first scrape.
            async def quiet() -> bool:
                return "WalletWorkersMissing" not in await alerts_in("pending", "firing")

            await eventually(quiet, within=10, what="no WalletWorkersMissing while one runs")

            worker.send_signal(signal.SIGKILL)
            await asyncio.to_thread(worker.wait, 10)

            async def missing() -> bool:
                return "WalletWorkersMissing" in await alerts_in("firing")

            await eventually(missing, within=30, what="WalletWorkersMissing to fire")

            successor = start("worker", served, tmp_path / "worker.log")
            with ended([successor]):
                await eventually(quiet, within=30, what="WalletWorkersMissing to resolve")
                successor.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(successor.wait, 20) == 0
