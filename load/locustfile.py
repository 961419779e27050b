"""Locust scenarios for a running service (`make run`, or the compose stack).

    # every user on one wallet: deposits and withdrawals with Idempotency-Keys, balance reads
    locust -f load/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 100 -r 100 -t 60s HotWallet
    # the same mix spread over 10,000 wallets (WALLETS=... to change the count)
    locust -f load/locustfile.py --headless --host http://127.0.0.1:8000 \
        -u 100 -r 100 -t 60s ManyWallets

Each user sends RATE_PER_USER (10) requests a second, so -u 100 is a constant 1,000/s as
long as the service keeps up. The test creates and funds its own wallets, and at the end
checks that every wallet's balance equals its starting balance plus what the applied
operations imply; a mismatch makes locust exit non-zero. Requests without a final answer
(cut off when locust stopped, or answered 202) are sent again with their Idempotency-Key
until they have one: the service answers what it did with each, applying it once.
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections import defaultdict
from typing import Any

import requests
from locust import FastHttpUser, constant_throughput, events, task
from locust.env import Environment

FUNDING = "1000000.00"
RATE_PER_USER = float(os.environ.get("RATE_PER_USER", "10"))
MANY_WALLETS = int(os.environ.get("WALLETS", "10000"))

log = logging.getLogger("wallet-load")
wallets: list[str] = []
start_balance: dict[str, int] = {}
applied_effect: dict[str, int] = defaultdict(int)
# Idempotency-Key -> (wallet, body, effect if applied) of requests without a final answer
unanswered: dict[str, tuple[str, dict[str, str], int]] = {}
RECONCILE_SECONDS = 60  # how long the end of the run waits for pending operations
# With authentication on, the run registers a user of its own and sends its access token
# (which lasts ACCESS_TOKEN_TTL: longer runs need a longer one).
auth_headers: dict[str, str] = {}


def minor(text: str) -> int:
    whole, _, cents = text.partition(".")
    return int(whole) * 100 + int(cents or 0)


def log_in_if_needed(host: str) -> None:
    with requests.Session() as http:
        if http.get(f"{host}/api/v1/wallets", timeout=10).status_code != 401:
            return
        user = {"username": f"locust-{uuid.uuid4().hex[:12]}", "password": uuid.uuid4().hex}
        http.post(f"{host}/api/auth/users", json=user, timeout=10).raise_for_status()
        r = http.post(f"{host}/api/auth/token", json=user, timeout=10)
        r.raise_for_status()
        auth_headers["Authorization"] = f"Bearer {r.json()['access_token']}"


def create_wallets(host: str, count: int) -> None:
    """Creates and funds `count` wallets through the API, before the users start."""
    with requests.Session() as http:
        http.headers.update(auth_headers)
        for _ in range(count):
            r = http.post(f"{host}/api/v1/wallets", timeout=10)
            r.raise_for_status()
            wallet = r.json()["id"]
            r = http.post(
                f"{host}/api/v1/wallets/{wallet}/operation",
                json={"operationType": "DEPOSIT", "amount": FUNDING},
                timeout=10,
            )
            r.raise_for_status()
            start_balance[wallet] = minor(r.json()["balance"])
            wallets.append(wallet)


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def on_test_start(environment: Environment, **kwargs: Any) -> None:
    names = {cls.__name__ for cls in environment.user_classes}
    assert environment.host, "give the service's URL with --host"
    log_in_if_needed(environment.host)
    create_wallets(environment.host, MANY_WALLETS if names == {"ManyWallets"} else 1)


def reconcile(http: requests.Session, host: str) -> list[str]:
    """Sends every operation without a final answer again, with its Idempotency-Key, until
    each has one (or RECONCILE_SECONDS pass); adds the applied ones' effects. Returns the
    keys still without one."""
    started = time.monotonic()
    while unanswered and time.monotonic() < started + RECONCILE_SECONDS:
        for key, (wallet, body, effect) in list(unanswered.items()):
            r = http.post(
                f"{host}/api/v1/wallets/{wallet}/operation",
                json=body,
                headers={"Idempotency-Key": key},
                timeout=10,
            )
            if r.status_code in (200, 409):
                if r.status_code == 200:
                    applied_effect[wallet] += effect
                del unanswered[key]
        if unanswered:
            time.sleep(0.2)
    return list(unanswered)


@events.test_stop.add_listener  # type: ignore[untyped-decorator]
def on_test_stop(environment: Environment, **kwargs: Any) -> None:
    wrong = []
    with requests.Session() as http:
        http.headers.update(auth_headers)
        assert environment.host
        unknown = reconcile(http, environment.host)
        if unknown:
            log.error("%d operations still pending after %ds", len(unknown), RECONCILE_SECONDS)
            environment.process_exit_code = 1
        for wallet in wallets:
            r = http.get(f"{environment.host}/api/v1/wallets/{wallet}", timeout=10)
            actual = minor(r.json()["balance"])
            expected = start_balance[wallet] + applied_effect[wallet]
            if actual != expected:
                wrong.append((wallet, expected, actual))
    if not wallets or not any(applied_effect.values()):
        log.error("no wallet was set up or no operation applied: nothing was tested")
        environment.process_exit_code = 1
    elif wrong:
        log.error("BALANCE MISMATCH on %d wallets, e.g. %s", len(wrong), wrong[:3])
        environment.process_exit_code = 1
    else:
        log.info("balances exact on %d wallets", len(wallets))


class Operations(FastHttpUser):
    abstract = True
    wait_time = constant_throughput(RATE_PER_USER)

    def operate(self, wallet: str, kind: str) -> None:
        amount = f"{random.randint(1, 50)}.{random.randint(0, 99):02d}"
        key = str(uuid.uuid4())
        body = {"operationType": kind, "amount": amount}
        effect = minor(amount) if kind == "DEPOSIT" else -minor(amount)
        unanswered[key] = (wallet, body, effect)  # until an answer says what became of it
        with self.client.post(
            f"/api/v1/wallets/{wallet}/operation",
            json=body,
            headers={**auth_headers, "Idempotency-Key": key},
            name=f"{kind} (one wallet)" if len(wallets) == 1 else kind,
            catch_response=True,
        ) as r:
            if r.status_code == 200:
                del unanswered[key]
                applied_effect[wallet] += effect
                r.success()
            elif r.status_code == 409:
                del unanswered[key]
                r.success()  # refused and recorded: the wallet did not have the funds
            elif r.status_code == 202:
                r.success()  # queued: its outcome is looked up at the end
            else:
                if 400 <= r.status_code < 500:  # refused, never queued
                    del unanswered[key]
                r.failure(f"{r.status_code}: {r.text[:200]}")

    def pick(self) -> str:
        return random.choice(wallets)

    @task(5)
    def deposit(self) -> None:
        self.operate(self.pick(), "DEPOSIT")

    @task(4)
    def withdraw(self) -> None:
        self.operate(self.pick(), "WITHDRAW")

    @task(1)
    def balance(self) -> None:
        self.client.get(f"/api/v1/wallets/{self.pick()}", name="balance", headers=auth_headers)


class HotWallet(Operations):
    """Every user on the same wallet."""


class ManyWallets(Operations):
    """Users spread over MANY_WALLETS wallets."""
