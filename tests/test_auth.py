"""Authentication and wallet ownership, over HTTP, with AUTH_ENABLED on."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import orjson
import pytest
from aiohttp.test_utils import TestClient

from api.app import create_app
from shared.settings import Settings
from tests.conftest import AiohttpClient
from tests.helpers import eventually, run_module

SECRET = "test-secret-" + "x" * 32
PASSWORD = "correct horse battery"


@pytest.fixture
def auth_settings(settings: Settings) -> Settings:
    return dataclasses.replace(settings, auth_enabled=True, jwt_secret=SECRET)


@pytest.fixture
async def http(
    aiohttp_client: AiohttpClient, auth_settings: Settings, worker: Any
) -> TestClient[Any, Any]:
    return await aiohttp_client(create_app(auth_settings))


async def register(http: TestClient[Any, Any], name: str | None = None) -> str:
    name = name or f"user-{uuid.uuid4().hex[:8]}"
    r = await http.post("/api/auth/users", json={"username": name, "password": PASSWORD})
    assert r.status == 201, await r.text()
    return name


async def login(http: TestClient[Any, Any], name: str, password: str = PASSWORD) -> Any:
    r = await http.post("/api/auth/token", json={"username": name, "password": password})
    assert r.status == 200, await r.text()
    return await r.json()


def bearer(tokens: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {tokens['access_token']}"}


async def new_wallet(http: TestClient[Any, Any], tokens: Any) -> str:
    r = await http.post("/api/v1/wallets", headers=bearer(tokens))
    assert r.status == 201
    return str((await r.json())["id"])


async def deposit(http: TestClient[Any, Any], tokens: Any, wallet: str, amount: str) -> None:
    r = await http.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operationType": "DEPOSIT", "amount": amount},
        headers=bearer(tokens),
    )
    assert r.status == 200, await r.text()


async def test_register_login_and_use_the_api_with_a_bearer_token(
    http: TestClient[Any, Any],
) -> None:
    name = await register(http)
    tokens = await login(http, name)
    assert tokens["token_type"] == "Bearer"
    wallet = await new_wallet(http, tokens)
    r = await http.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operationType": "DEPOSIT", "amount": "10.25"},
        headers=bearer(tokens),
    )
    assert r.status == 200
    assert (await r.json())["balance"] == "10.25"


async def test_registration_refuses_a_taken_name_and_weak_input(
    http: TestClient[Any, Any],
) -> None:
    name = await register(http)
    r = await http.post("/api/auth/users", json={"username": name.upper(), "password": PASSWORD})
    assert (r.status, (await r.json())["type"]) == (
        409,
        "urn:wallet-service:problem:username-taken",
    )
    for body in (
        {"username": "ab", "password": PASSWORD},
        {"username": "no spaces", "password": PASSWORD},
        {"username": "fine-name", "password": "short"},
        {"username": "fine-name", "password": PASSWORD, "admin": True},
        {"username": "fine-name"},
    ):
        r = await http.post("/api/auth/users", json=body)
        assert r.status == 422, body


async def test_a_wrong_password_or_unknown_user_is_401(http: TestClient[Any, Any]) -> None:
    name = await register(http)
    for body in (
        {"username": name, "password": PASSWORD + "!"},
        {"username": "nobody-" + uuid.uuid4().hex[:6], "password": PASSWORD},
    ):
        r = await http.post("/api/auth/token", json=body)
        assert r.status == 401
        assert (await r.json())["type"] == "urn:wallet-service:problem:invalid-credentials"


async def test_refresh_rotates_and_a_spent_refresh_token_revokes_its_family(
    http: TestClient[Any, Any],
) -> None:
    tokens = await login(http, await register(http))
    r = await http.post("/api/auth/token/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 200
    second = await r.json()
    assert second["refresh_token"] != tokens["refresh_token"]
    assert (await http.get("/api/v1/wallets", headers=bearer(second))).status == 200

    # The first token again: spent. Someone replays it, so its whole family goes.
    r = await http.post("/api/auth/token/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 401
    r = await http.post("/api/auth/token/refresh", json={"refresh_token": second["refresh_token"]})
    assert r.status == 401


async def test_logout_revokes_the_refresh_token(http: TestClient[Any, Any]) -> None:
    tokens = await login(http, await register(http))
    r = await http.post("/api/auth/logout", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 204
    r = await http.post("/api/auth/token/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert r.status == 401


def forged(claims: dict[str, Any], secret: str = SECRET) -> str:
    now = datetime.now(UTC)
    base = {
        "iss": "wallet-service",
        "aud": "wallet-api",
        "sub": str(uuid.uuid4()),
        "iat": now,
        "exp": now + timedelta(minutes=5),
        "typ": "access",
    }
    return jwt.encode({**base, **claims}, secret, algorithm="HS256")


def unsigned(claims: dict[str, Any]) -> str:
    def part(value: Any) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(value)).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


async def test_bad_tokens_are_401_with_www_authenticate(http: TestClient[Any, Any]) -> None:
    tokens = await login(http, await register(http))
    good = tokens["access_token"]
    head, payload, signature = good.split(".")
    past = datetime.now(UTC) - timedelta(hours=1)
    bad = {
        "none": None,
        "not bearer": f"Basic {good}",
        "garbage": "Bearer not-a-token",
        "tampered": f"Bearer {head}.{payload[:-2]}AA.{signature}",
        "expired": f"Bearer {forged({'iat': past, 'exp': past + timedelta(minutes=1)})}",
        "wrong audience": f"Bearer {forged({'aud': 'someone-else'})}",
        "wrong issuer": f"Bearer {forged({'iss': 'someone-else'})}",
        "other key": f"Bearer {forged({}, secret='another-secret-' + 'y' * 32)}",
        "alg none": f"Bearer {unsigned({'sub': 'x', 'typ': 'access', 'adm': True})}",
        "refresh as access": f"Bearer {tokens['refresh_token']}",
    }
    for what, header in bad.items():
        headers = {"Authorization": header} if header else {}
        r = await http.get("/api/v1/wallets", headers=headers)
        assert r.status == 401, what
        assert r.headers["WWW-Authenticate"].startswith("Bearer "), what
        assert (await r.json())["type"] == "urn:wallet-service:problem:unauthorized", what
    assert (await http.get("/api/v1/wallets", headers={"Authorization": f"Bearer {good}"})).ok


async def test_another_user_s_wallet_does_not_exist_for_you(
    http: TestClient[Any, Any],
) -> None:
    alice = await login(http, await register(http))
    bob = await login(http, await register(http))
    wallet = await new_wallet(http, alice)
    key = str(uuid.uuid4())
    r = await http.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operationType": "DEPOSIT", "amount": 5},
        headers={**bearer(alice), "Idempotency-Key": key},
    )
    assert r.status == 200
    op_id = (await r.json())["id"]

    as_bob = bearer(bob)
    attempts = [
        ("GET", f"/api/v1/wallets/{wallet}", None, {}),
        ("GET", f"/api/v1/wallets/{wallet}/operations", None, {}),
        ("GET", f"/api/v1/wallets/{wallet}/operations/{op_id}", None, {}),
        (
            "POST",
            f"/api/v1/wallets/{wallet}/operation",
            {"operationType": "WITHDRAW", "amount": 5},
            {},
        ),
        (
            "POST",
            "/api/v1/wallet",
            {"walletId": wallet, "operationType": "WITHDRAW", "amount": 5},
            {},
        ),
        # Alice's key replayed by Bob reveals nothing either.
        (
            "POST",
            f"/api/v1/wallets/{wallet}/operation",
            {"operationType": "DEPOSIT", "amount": 5},
            {"Idempotency-Key": key},
        ),
    ]
    for method, url, body, extra in attempts:
        r = await http.request(method, url, json=body, headers={**as_bob, **extra})
        assert r.status == 404, (method, url)
        assert (await r.json())["type"] == "urn:wallet-service:problem:wallet-not-found"
    r = await http.get("/api/v1/wallets", headers=as_bob)
    assert (await r.json())["items"] == []
    r = await http.get("/api/v1/wallets", headers=bearer(alice))
    assert [w["id"] for w in (await r.json())["items"]] == [wallet]
    r = await http.get(f"/api/v1/wallets/{wallet}", headers=bearer(alice))
    assert (await r.json())["balance"] == "5.00"  # Bob's attempts changed nothing


async def test_an_admin_granted_from_the_command_line_sees_every_wallet(
    http: TestClient[Any, Any], auth_settings: Settings
) -> None:
    alice = await login(http, await register(http))
    wallet = await new_wallet(http, alice)
    boss = await register(http)
    run = await run_module(auth_settings, "api.users", "grant-admin", boss)
    assert run.returncode == 0, run.stderr
    as_boss = bearer(await login(http, boss))
    assert (await http.get(f"/api/v1/wallets/{wallet}", headers=as_boss)).status == 200
    r = await http.post(
        f"/api/v1/wallets/{wallet}/operation",
        json={"operationType": "DEPOSIT", "amount": 1},
        headers=as_boss,
    )
    assert r.status == 200


async def test_login_attempts_are_limited_under_concurrency_and_the_limit_lifts(
    aiohttp_client: AiohttpClient, auth_settings: Settings
) -> None:
    tight = dataclasses.replace(auth_settings, login_user_limit=3, login_window=1.5)
    http = await aiohttp_client(create_app(tight))
    name = await register(http)
    wrong = {"username": name, "password": "wrong password!"}
    answers = await asyncio.gather(*(http.post("/api/auth/token", json=wrong) for _ in range(12)))
    statuses = sorted(r.status for r in answers)
    assert statuses == [401] * 3 + [429] * 9  # never more than the limit got through
    limited = next(r for r in answers if r.status == 429)
    assert 1 <= int(limited.headers["Retry-After"]) <= 2
    r = await http.post("/api/auth/token", json={"username": name, "password": PASSWORD})
    assert r.status == 429  # even the right password waits for the window

    async def lifted() -> bool:
        r = await http.post("/api/auth/token", json={"username": name, "password": PASSWORD})
        return r.status == 200

    await eventually(lifted, within=5, what="the window to end")


async def test_without_auth_the_api_is_open_and_the_auth_routes_say_so(
    client: TestClient[Any, Any],
) -> None:
    assert (await client.get("/api/v1/wallets")).status == 200
    r = await client.post("/api/auth/token", json={"username": "x", "password": PASSWORD})
    assert r.status == 404
    assert (await r.json())["type"] == "urn:wallet-service:problem:auth-disabled"


def test_auth_needs_a_long_enough_key(settings: Settings) -> None:
    with pytest.raises(ValueError, match="JWT_SECRET"):
        Settings.from_env({**settings.to_env(), "AUTH_ENABLED": "true", "JWT_SECRET": "short"})
    assert "x" * 32 not in repr(dataclasses.replace(settings, jwt_secret="x" * 32))


async def test_a_user_pays_from_their_own_wallet_to_anyone_s(http: TestClient[Any, Any]) -> None:
    """The source must be the caller's; the destination only has to exist. Each party sees
    the transfer, nobody else."""
    alice = await login(http, await register(http))
    bob = await login(http, await register(http))
    carol = await login(http, await register(http))
    mine, bobs = await new_wallet(http, alice), await new_wallet(http, bob)
    await deposit(http, alice, mine, "10.00")

    r = await http.post(
        "/api/v1/transfers",
        json={"from": mine, "to": bobs, "amount": "4.00"},
        headers=bearer(alice),
    )
    assert r.status == 200, await r.text()
    transfer_id = (await r.json())["id"]
    r = await http.post(
        "/api/v1/transfers",
        json={"from": mine, "to": bobs, "amount": "1.00"},
        headers=bearer(bob),
    )
    assert r.status == 404
    assert f"{mine} (from)" in (await r.json())["detail"]
    r = await http.post(
        "/api/v1/transfers",
        json={"from": bobs, "to": str(uuid.uuid4()), "amount": "1.00"},
        headers=bearer(bob),
    )
    assert r.status == 404
    assert "(to)" in (await r.json())["detail"]

    for who in (alice, bob):
        r = await http.get(f"/api/v1/transfers/{transfer_id}", headers=bearer(who))
        assert r.status == 200
        assert (await r.json())["status"] == "completed"
    r = await http.get(f"/api/v1/transfers/{transfer_id}", headers=bearer(carol))
    assert r.status == 404
    assert (await r.json())["type"] == "urn:wallet-service:problem:transfer-not-found"
    r = await http.get(f"/api/v1/wallets/{bobs}/operations", headers=bearer(bob))
    [credit] = (await r.json())["items"]
    assert (credit["operation_type"], credit["counterparty"]) == ("TRANSFER_IN", mine)
    r = await http.get(f"/api/v1/wallets/{mine}", headers=bearer(alice))
    assert (await r.json())["balance"] == "6.00"


async def test_a_hold_is_its_wallet_owner_s_alone_and_may_pay_anyone(
    http: TestClient[Any, Any],
) -> None:
    """Only the owner places, sees, captures and voids a wallet's holds; to anyone else
    they do not exist. A capture may pay any existing wallet, as a transfer does."""
    alice = await login(http, await register(http))
    bob = await login(http, await register(http))
    mine, bobs = await new_wallet(http, alice), await new_wallet(http, bob)
    await deposit(http, alice, mine, "10.00")
    r = await http.post(
        f"/api/v1/wallets/{mine}/holds", json={"amount": "1.00"}, headers=bearer(bob)
    )
    assert r.status == 404
    holds = []
    for _ in range(2):
        r = await http.post(
            f"/api/v1/wallets/{mine}/holds", json={"amount": "4.00"}, headers=bearer(alice)
        )
        assert r.status == 201, await r.text()
        holds.append((await r.json())["id"])
    for method, path in (
        ("GET", f"/api/v1/holds/{holds[0]}"),
        ("GET", f"/api/v1/wallets/{mine}/holds"),
        ("POST", f"/api/v1/holds/{holds[0]}/capture"),
        ("POST", f"/api/v1/holds/{holds[0]}/void"),
    ):
        r = await http.request(method, path, headers=bearer(bob))
        assert r.status == 404, (method, path)
    r = await http.post(
        f"/api/v1/holds/{holds[0]}/capture", json={"to": bobs}, headers=bearer(alice)
    )
    assert r.status == 200, await r.text()
    assert (await r.json())["transfer_status"] == "completed"
    r = await http.post(f"/api/v1/holds/{holds[1]}/void", headers=bearer(alice))
    assert r.status == 200
    r = await http.get(f"/api/v1/wallets/{bobs}", headers=bearer(bob))
    assert (await r.json())["balance"] == "4.00"
