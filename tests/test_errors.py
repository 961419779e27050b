"""Every error a client can meet comes as problem+json with its status and type; no input
of any kind gets a 5xx."""

from __future__ import annotations

import dataclasses
import io
import time
import uuid
from typing import Any

import pytest
from redis.asyncio import Redis

from api.app import create_app
from devtools.blackhole import BlackHole
from devtools.servers import kill_client, redis_clients
from shared.keys import KeySpace
from shared.money import MAX_BALANCE_MINOR
from shared.settings import Settings
from tests.conftest import AiohttpClient, running_worker
from tests.helpers import Client, eventually, operate

PROBLEM = "application/problem+json"


async def problem_of(response: Any, status: int, kind: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == PROBLEM
    body: dict[str, Any] = await response.json(content_type=PROBLEM)
    assert body["type"] == f"urn:wallet-service:problem:{kind}"
    assert body["status"] == status
    assert body["title"]
    return body


def op_url(wallet: str) -> str:
    return f"/api/v1/wallets/{wallet}/operation"


async def test_operation_on_an_unknown_wallet_is_404(client: Client) -> None:
    unknown = str(uuid.uuid4())
    r = await client.post(op_url(unknown), json={"operationType": "DEPOSIT", "amount": 1})
    await problem_of(r, 404, "wallet-not-found")
    r = await client.post(
        "/api/v1/wallet", json={"walletId": unknown, "operationType": "DEPOSIT", "amount": 1}
    )
    await problem_of(r, 404, "wallet-not-found")


@pytest.mark.parametrize("path", ["/api/v1/wallets/{}", "/api/v1/wallets/{}/operations"])
@pytest.mark.parametrize("wallet", ["not-a-uuid", str(uuid.uuid4()), "1" * 300])
async def test_unknown_or_malformed_wallet_ids_are_404(api: Client, path: str, wallet: str) -> None:
    await problem_of(await api.get(path.format(wallet)), 404, "wallet-not-found")


async def test_a_404_found_in_postgresql_keeps_the_api_connection(
    api: Client, settings: Settings, pg: Any
) -> None:
    """A request that fails for what it asks (here an unknown wallet's history, found out
    on a PostgreSQL connection) gives its connection back: only a query cut short or a
    connection lost closes one."""

    async def api_sessions() -> set[int]:
        rows = await pg.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            f"{settings.redis_key_prefix}-api",
        )
        return {r["pid"] for r in rows}

    async def unknown_history() -> None:
        r = await api.get(f"/api/v1/wallets/{uuid.uuid4()}/operations")
        assert r.status == 404

    await unknown_history()
    first = await api_sessions()
    assert len(first) == 1
    for _ in range(4):
        await unknown_history()
    assert await api_sessions() == first


async def test_unknown_operation_is_404(client: Client, wallet: str) -> None:
    for op in (str(uuid.uuid4()), "nope"):
        r = await client.get(f"/api/v1/wallets/{wallet}/operations/{op}")
        await problem_of(r, 404, "operation-not-found")


async def test_overdraft_is_409_and_recorded_as_rejected(client: Client, wallet: str) -> None:
    await operate(client, wallet, "DEPOSIT", "10.00")
    r = await client.post(op_url(wallet), json={"operationType": "WITHDRAW", "amount": "10.01"})
    body = await problem_of(r, 409, "insufficient-funds")
    assert body["operation"]["status"] == "rejected"
    assert body["operation"]["balance"] == "10.00"
    follow = await client.get(r.headers["Location"])
    assert (await follow.json())["reason"] == "insufficient_funds"


async def test_a_deposit_past_the_balance_limit_is_409(
    client: Client, wallet: str, pg: Any
) -> None:
    await pg.execute(
        "UPDATE wallets SET balance = $2 WHERE id = $1", wallet, MAX_BALANCE_MINOR - 99
    )
    r = await client.post(op_url(wallet), json={"operationType": "DEPOSIT", "amount": "1.00"})
    await problem_of(r, 409, "balance-limit")
    status, body, _ = await operate(client, wallet, "DEPOSIT", "0.99")
    assert status == 200
    assert body["balance"] == "92233720368547758.07"


async def test_wrong_content_type_is_415(api: Client) -> None:
    r = await api.post(
        op_url(str(uuid.uuid4())),
        data=b'{"operationType": "DEPOSIT", "amount": 1}',
        headers={"Content-Type": "text/plain"},
    )
    await problem_of(r, 415, "unsupported-media-type")


async def test_a_large_body_is_413(api: Client) -> None:
    body = b'{"operationType": "DEPOSIT", "amount": 1, "pad": "' + b"x" * 1_000_000 + b'"}'
    r = await api.post(
        op_url(str(uuid.uuid4())), data=body, headers={"Content-Type": "application/json"}
    )
    await problem_of(r, 413, "body-too-large")


async def test_unknown_route_and_method(api: Client) -> None:
    await problem_of(await api.get("/api/v1/nothing"), 404, "not-found")
    r = await api.delete("/api/v1/wallets")
    await problem_of(r, 405, "method-not-allowed")
    assert "POST" in r.headers["Allow"]


VALIDATION_CASES = [
    ({"operationType": "TRANSFER", "amount": 1}, "operationType"),
    ({"operationType": "deposit", "amount": 1}, "operationType"),
    ({"operationType": None, "amount": 1}, "operationType"),
    ({"amount": 1}, "operationType"),
    ({"operationType": "DEPOSIT"}, "amount"),
    ({"operationType": "DEPOSIT", "amount": 0}, "amount"),
    ({"operationType": "DEPOSIT", "amount": -5}, "amount"),
    ({"operationType": "DEPOSIT", "amount": "1.005"}, "amount"),
    ({"operationType": "DEPOSIT", "amount": True}, "amount"),
    ({"operationType": "DEPOSIT", "amount": None}, "amount"),
    ({"operationType": "DEPOSIT", "amount": [1]}, "amount"),
    ({"operationType": "DEPOSIT", "amount": {"value": 1}}, "amount"),
    ({"operationType": "DEPOSIT", "amount": "ten"}, "amount"),
    ({"operationType": "DEPOSIT", "amount": 1, "currency": "EUR"}, "currency"),
    ({"operationType": "DEPOSIT", "operation_type": "DEPOSIT", "amount": 1}, "operationType"),
]


@pytest.mark.parametrize(("body", "field"), VALIDATION_CASES)
async def test_invalid_operations_are_422_naming_the_field(
    api: Client, body: dict[str, Any], field: str
) -> None:
    r = await api.post(op_url(str(uuid.uuid4())), json=body)
    problem = await problem_of(r, 422, "validation-error")
    assert problem["errors"][0]["field"] == field
    assert problem["errors"][0]["reason"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"operationType": "DEPOSIT", "amount": 1}, "walletId"),
        ({"walletId": "nope", "operationType": "DEPOSIT", "amount": 1}, "walletId"),
        ({"walletId": 7, "operationType": "DEPOSIT", "amount": 1}, "walletId"),
    ],
)
async def test_the_original_form_validates_walletid(
    api: Client, body: dict[str, Any], field: str
) -> None:
    problem = await problem_of(await api.post("/api/v1/wallet", json=body), 422, "validation-error")
    assert problem["errors"][0]["field"] == field


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9"])
async def test_bad_idempotency_keys_are_422(api: Client, key: str) -> None:
    r = await api.post(
        op_url(str(uuid.uuid4())),
        json={"operationType": "DEPOSIT", "amount": 1},
        headers={"Idempotency-Key": key},
    )
    problem = await problem_of(r, 422, "validation-error")
    assert problem["errors"][0]["field"] == "Idempotency-Key"


WALLET = "0b6f2c36-6b5f-4c39-9f7e-3c1d2a6b8e41"


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=101",
        "limit=abc",
        "limit=%C2%B2",  # a digit to str.isdigit(), not to int()
        "cursor=",
        "cursor=%%%",
        "cursor=WzFd",
        f"cursor={'9' * 17}_{WALLET}",  # past datetime's range
        f"cursor=-1_{WALLET}",
        "cursor=1_not-a-uuid",
        f"cursor=1_{WALLET.upper()}",
        f"cursor=1_{WALLET}_",
        f"cursor=1.5_{WALLET}",
    ],
)
async def test_bad_paging_of_wallets_is_422(api: Client, query: str) -> None:
    await problem_of(await api.get(f"/api/v1/wallets?{query}"), 422, "validation-error")


@pytest.mark.parametrize("position", ["", "0", "-1", "1.5", "01", "9" * 19, "%201", "1%0A"])
async def test_bad_paging_of_history_is_422(api: Client, position: str) -> None:
    url = f"/api/v1/wallets/{uuid.uuid4()}/operations?cursor={position}"
    await problem_of(await api.get(url), 422, "validation-error")


HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("not json", b"deposit 10", "application/json"),
    ("empty", b"", "application/json"),
    ("array", b'[{"operationType": "DEPOSIT", "amount": 1}]', "application/json"),
    ("string", b'"DEPOSIT"', "application/json"),
    ("null", b"null", "application/json"),
    (
        "huge integer",
        b'{"operationType": "DEPOSIT", "amount": 1' + b"0" * 5000 + b"}",
        "application/json",
    ),
    ("NaN", b'{"operationType": "DEPOSIT", "amount": NaN}', "application/json"),
    ("Infinity", b'{"operationType": "DEPOSIT", "amount": Infinity}', "application/json"),
    ("negative zero", b'{"operationType": "DEPOSIT", "amount": -0}', "application/json"),
    ("negative zero float", b'{"operationType": "DEPOSIT", "amount": -0.0}', "application/json"),
    ("1e400", b'{"operationType": "DEPOSIT", "amount": 1e400}', "application/json"),
    ("1e-400", b'{"operationType": "DEPOSIT", "amount": 1e-400}', "application/json"),
    ("three decimals", b'{"operationType": "DEPOSIT", "amount": "1.005"}', "application/json"),
    ("three decimals number", b'{"operationType": "DEPOSIT", "amount": 0.001}', "application/json"),
    (
        "past float precision",
        b'{"operationType": "DEPOSIT", "amount": 0.10000000000000000001}',
        "application/json",
    ),
    (
        "nested",
        b'{"operationType": {"a": {"b": ["DEPOSIT"]}}, "amount": {"x": 1}}',
        "application/json",
    ),
    ("deep nesting", b"[" * 5000 + b"]" * 5000, "application/json"),
    (
        "duplicate keys",
        b'{"operationType": "DEPOSIT", "amount": 1, "amount": 2}',
        "application/json",
    ),
    ("invalid utf-8", b'{"operationType": "DEP\xff\xfeOSIT", "amount": 1}', "application/json"),
    (
        "utf-16",
        '{"operationType": "DEPOSIT", "amount": 1e999}'.encode("utf-16"),
        "application/json",
    ),
    ("nul bytes", b'{"operationType": "DEPOSIT\x00", "amount": 1}', "application/json"),
    ("1 MB", b'{"amount": "' + b"9" * 1_048_576 + b'"}', "application/json"),
    ("form", b"operationType=DEPOSIT&amount=1", "application/x-www-form-urlencoded"),
    ("xml", b"<op type='DEPOSIT' amount='1'/>", "application/xml"),
    ("no content type", b'{"operationType": "DEPOSIT", "amount": 1}', ""),
    ("multipart", b"--x\r\n\r\n--x--", "multipart/form-data; boundary=x"),
]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [case[1:] for case in HOSTILE_BODIES],
    ids=[case[0] for case in HOSTILE_BODIES],
)
@pytest.mark.parametrize("path", ["/api/v1/wallets/{}/operation", "/api/v1/wallet"])
async def test_hostile_bodies_get_a_4xx_problem(
    api: Client, body: bytes, content_type: str, path: str
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = await api.post(path.format(uuid.uuid4()), data=io.BytesIO(body), headers=headers)
    assert 400 <= r.status < 500, (r.status, await r.text())
    assert r.content_type == PROBLEM
    assert "Traceback" not in await r.text()


async def test_hostile_bodies_on_wallet_creation(api: Client) -> None:
    for _, body, content_type in HOSTILE_BODIES:
        r = await api.post(
            "/api/v1/wallets", data=io.BytesIO(body), headers={"Content-Type": content_type}
        )
        assert 400 <= r.status < 500 or (r.status == 201 and body == b""), (r.status, body[:40])


async def test_queue_over_its_bound_is_503_with_retry_after(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    """No worker runs: the wallet's queue fills up and the next operation is refused."""
    tight = dataclasses.replace(settings, wallet_queue_limit=3, reply_timeout=0.5)
    api = await aiohttp_client(create_app(tight))
    wallet = str(uuid.uuid4())
    for _ in range(3):
        status, body, headers = await operate(api, wallet, "DEPOSIT", 1)
        assert status == 202
        assert headers["Location"] == body["href"]
    r = await api.post(op_url(wallet), json={"operationType": "DEPOSIT", "amount": 1})
    await problem_of(r, 503, "queue-full")
    assert r.headers["Retry-After"] == "1"


async def test_a_full_shard_refuses_operations_until_its_worker_drains_it(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any, redis: Redis
) -> None:
    """The shard's bound counts the operations of all its wallets together."""
    tight = dataclasses.replace(settings, shard_queue_limit=3, reply_timeout=0.05)
    keys = KeySpace(tight.redis_key_prefix, tight.shard_count)
    api = await aiohttp_client(create_app(tight))
    new_wallet = "INSERT INTO wallets DEFAULT VALUES RETURNING id::text"
    first = await pg.fetchval(new_wallet)
    shard = keys.shard_of(first)
    neighbour = first
    while neighbour == first or keys.shard_of(neighbour) != shard:
        neighbour = await pg.fetchval(new_wallet)
    for wallet in (first, first, neighbour):
        assert (await operate(api, wallet, "DEPOSIT", 1))[0] == 202
    r = await api.post(op_url(neighbour), json={"operationType": "DEPOSIT", "amount": 1})
    await problem_of(r, 503, "queue-full")
    assert await redis.get(keys.queued(shard)) == b"3"

    async with running_worker(tight):
        await eventually(lambda: _count_is(redis, keys.queued(shard), b"0"), what="a drain")
        assert (await operate(api, neighbour, "DEPOSIT", 1))[0] in (200, 202)


async def _count_is(redis: Redis, key: str, value: bytes) -> bool:
    return bool(await redis.get(key) == value)


async def test_redis_down_is_503_with_retry_after(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    down = dataclasses.replace(settings, redis_url="redis://127.0.0.1:1/0")
    api = await aiohttp_client(create_app(down))
    r = await api.post(op_url(str(uuid.uuid4())), json={"operationType": "DEPOSIT", "amount": 1})
    await problem_of(r, 503, "dependency-unavailable")
    assert r.headers["Retry-After"]
    r = await api.get("/ready")
    body = await problem_of(r, 503, "not-ready")
    assert body["checks"]["redis"].startswith("unavailable")
    assert body["checks"]["postgres"] == "ok"


async def test_postgres_down_is_503_with_retry_after(
    aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    down = dataclasses.replace(settings, database_url="postgresql://postgres@127.0.0.1:1/none")
    api = await aiohttp_client(create_app(down))
    for request in (api.get(f"/api/v1/wallets/{uuid.uuid4()}"), api.post("/api/v1/wallets")):
        r = await request
        await problem_of(r, 503, "dependency-unavailable")
        assert r.headers["Retry-After"]
    body = await problem_of(await api.get("/ready"), 503, "not-ready")
    assert body["checks"]["postgres"].startswith("unavailable")


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_sessions_ended_by_postgresql_are_read_again_or_503_never_500(
    client: Client, wallet: str, settings: Settings, pg: Any, method: str
) -> None:
    """PostgreSQL ends the API's idle sessions (a restart, an operator, a failover); the
    next requests meet connections that are gone, which asyncpg reports in more than one
    way (one an internal error, when the goodbye races the query). A read runs again on
    fresh connections and answers 200; an operation, whose wallet is read first, may get
    503: a dependency failing, not a bug of the request. Twenty rounds, as the race is lost
    only part of the time."""
    statuses = []
    for _ in range(20):
        await pg.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            f"{settings.redis_key_prefix}-api",
        )
        if method == "GET":
            r = await client.get(f"/api/v1/wallets/{wallet}")
        else:
            r = await client.post(op_url(wallet), json={"operationType": "DEPOSIT", "amount": 1})
        statuses.append(r.status)
        if r.status == 503:
            await problem_of(r, 503, "dependency-unavailable")
    assert set(statuses) <= ({200} if method == "GET" else {200, 503}), statuses


async def test_postgresql_cut_off_from_the_api_is_503_within_the_reply_timeout(
    aiohttp_client: AiohttpClient, settings: Settings, pg: Any
) -> None:
    """A network that drops the API's packets to PostgreSQL (a partition, a firewall): a
    request waits no longer than an operation would (REPLY_TIMEOUT), then gets a 503 with
    Retry-After, instead of hanging for a minute on its query or on a new connection."""
    bounded = dataclasses.replace(settings, reply_timeout=1.0)
    network = await BlackHole(settings.database_url).start()
    try:
        api = await aiohttp_client(
            create_app(dataclasses.replace(bounded, database_url=network.url))
        )
        wallet = str(await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id"))
        assert (await api.get(f"/api/v1/wallets/{wallet}")).status == 200
        network.cut()
        for method, path in (
            ("GET", f"/api/v1/wallets/{wallet}"),
            ("GET", f"/api/v1/wallets/{wallet}/operations"),
            ("POST", "/api/v1/wallets"),
        ):
            started = time.monotonic()
            r = await api.request(method, path)
            await problem_of(r, 503, "dependency-unavailable")
            assert r.headers["Retry-After"]
            assert time.monotonic() - started < bounded.reply_timeout + 1.0, (method, path)
    finally:
        network.restore()
        await network.close()


async def test_operations_go_on_after_redis_drops_the_api_connection_and_forgets_scripts(
    client: Client, wallet: str, redis: Redis, settings: Settings
) -> None:
    """A Redis restart closes the connections and empties the script cache. The API's
    next operation finds its connection closed: it connects again and sends once more, and
    loads the script Redis forgot, so the client sees a 200, not a 503."""

    async def enqueuers() -> list[tuple[Any, dict[str, Any]]]:
        mine = f"{settings.redis_key_prefix}:api:"
        return [
            (node, c)
            for node, c in await redis_clients(redis)
            if c["name"].startswith(mine) and c["cmd"] == "evalsha"
        ]

    assert (await operate(client, wallet, "DEPOSIT", 100))[0] == 200
    [(node, killed)] = await enqueuers()
    await kill_client(redis, node, killed)
    await redis.script_flush()
    status, body, _ = await operate(client, wallet, "DEPOSIT", 250)
    assert (status, body["balance"]) == (200, "350.00")
    assert killed["id"] not in [c["id"] for _, c in await enqueuers()]
