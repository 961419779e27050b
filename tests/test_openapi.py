"""The OpenAPI document and the server agree: every route served is described, every
described route is served, and every answer below matches the schema described for its
status and content type."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

import jsonschema
from aiohttp.test_utils import TestClient
from aiohttp.web import Application

from api.app import create_app
from api.openapi import DOCUMENT, PATHS
from api.page import DOCS_ASSETS
from shared.settings import Settings
from tests.conftest import AiohttpClient
from tests.helpers import Client

AUTH_ROUTES = ("/api/auth/users", "/api/auth/token", "/api/auth/token/refresh", "/api/auth/logout")


def served_routes(app: Application) -> set[tuple[str, str]]:
    return {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def test_every_route_served_is_described_and_every_described_route_is_served(
    settings: Settings,
) -> None:
    described = {(path, method) for path, methods in PATHS.items() for method in methods}
    assert served_routes(create_app(settings)) == described


def test_every_operation_has_a_unique_operation_id_and_a_declared_tag() -> None:
    """Client generators name their functions after operationIds and group them by tag."""
    operations = [spec for methods in PATHS.values() for spec in methods.values()]
    ids = [spec["operationId"] for spec in operations]
    assert all(isinstance(i, str) and i.isidentifier() for i in ids)
    assert len(set(ids)) == len(ids)
    declared = {tag["name"] for tag in DOCUMENT["tags"]}
    assert all(len(spec["tags"]) == 1 and spec["tags"][0] in declared for spec in operations)
    assert {tag for spec in operations for tag in spec["tags"]} == declared


def test_every_secured_operation_names_the_declared_bearer_scheme() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert schemes["bearerAuth"] == {**schemes["bearerAuth"], "type": "http", "scheme": "bearer"}
    for path, methods in PATHS.items():
        for spec in methods.values():
            secured = path.startswith("/api/v1/") or path == "/api/live"
            assert (spec.get("security") == [{"bearerAuth": []}, {}]) == secured


def test_request_bodies_are_one_typed_object_each() -> None:
    """No top-level oneOf/anyOf, and every enum typed: generators then model each body."""
    schemas = DOCUMENT["components"]["schemas"]

    def enums(schema: Any) -> list[dict[str, Any]]:
        if isinstance(schema, list):
            return [e for s in schema for e in enums(s)]
        if not isinstance(schema, dict):
            return []
        return [schema] * ("enum" in schema) + enums(list(schema.values()))

    assert all(e.get("type") == "string" for e in enums(schemas))
    for methods in PATHS.values():
        for spec in methods.values():
            if "requestBody" in spec:
                body = spec["requestBody"]["content"]["application/json"]["schema"]
                declared = schemas[body["$ref"].removeprefix("#/components/schemas/")]
                assert declared["type"] == "object"
                assert not {"oneOf", "anyOf", "allOf"} & declared.keys()
    assert schemas["OperationRequest"]["required"] == ["operationType", "amount"]
    assert schemas["OperationRequest"]["properties"]["operationType"] == {
        "$ref": "#/components/schemas/OperationType"
    }


def test_every_schema_of_the_document_is_valid_json_schema() -> None:
    for schema in DOCUMENT["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)


class Checked:
    """Sends requests and holds every answer to the document."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: set[tuple[str, str, str]] = set()

    async def __call__(self, method: str, template: str, url: str, **kwargs: Any) -> Any:
        r = await self.client.request(method, url, **kwargs)
        status = str(r.status)
        responses = PATHS[template][method.lower()]["responses"]
        assert status in responses, f"{method} {url}: {status} is not documented"
        content = responses[status].get("content", {})
        if not content:
            assert await r.read() == b"", f"{method} {url} {status}: a body, none documented"
            self.seen.add((template, method.lower(), status))
            return None
        content_type = r.content_type
        assert content_type in content, f"{method} {url} {status}: {content_type} undocumented"
        schema = content[content_type]["schema"]
        if content_type.endswith("json"):
            body = await r.json(content_type=None)
            validator = jsonschema.Draft202012Validator(
                {**schema, "components": DOCUMENT["components"]},
                format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
            )
            errors = [e.message for e in validator.iter_errors(body)]
            assert not errors, f"{method} {url} {status}: {errors} in {body}"
        elif content_type.startswith("text/"):
            body = await r.text()
        else:
            body = await r.read()
        self.seen.add((template, method.lower(), status))
        return body


async def test_answers_match_the_documented_schemas(
    client: Client, aiohttp_client: AiohttpClient, settings: Settings
) -> None:
    check = Checked(client)
    wallet = (await check("POST", "/api/v1/wallets", "/api/v1/wallets"))["id"]
    await check("POST", "/api/v1/wallets", "/api/v1/wallets", json={"name": "x"})
    await check("GET", "/api/v1/wallets", "/api/v1/wallets?limit=2")
    await check("GET", "/api/v1/wallets", "/api/v1/wallets?limit=0")
    one = "/api/v1/wallets/{wallet_id}"
    await check("GET", one, f"/api/v1/wallets/{wallet}")
    await check("GET", one, f"/api/v1/wallets/{uuid.uuid4()}")

    op = "/api/v1/wallets/{wallet_id}/operation"
    url = f"/api/v1/wallets/{wallet}/operation"
    key = str(uuid.uuid4())
    applied = await check(
        "POST",
        op,
        url,
        json={"operationType": "DEPOSIT", "amount": "10.25"},
        headers={"Idempotency-Key": key},
    )
    await check("POST", op, url, json={"operationType": "WITHDRAW", "amount": 99})
    await check(
        "POST",
        op,
        url,
        json={"operationType": "WITHDRAW", "amount": 1},
        headers={"Idempotency-Key": key},
    )
    await check("POST", op, url, json={"operationType": "STEAL", "amount": 1})
    await check("POST", op, url, data=b"{not json", headers={"Content-Type": "application/json"})
    await check("POST", op, url, data=b"amount=1", headers={"Content-Type": "text/plain"})
    await check(
        "POST",
        op,
        url,
        data=b"{" + b" " * 20_000 + b"}",
        headers={"Content-Type": "application/json"},
    )
    await check(
        "POST",
        op,
        f"/api/v1/wallets/{uuid.uuid4()}/operation",
        json={"operationType": "DEPOSIT", "amount": 1},
    )
    form = "/api/v1/wallet"
    await check(
        "POST", form, form, json={"walletId": wallet, "operation_type": "DEPOSIT", "amount": 1}
    )
    await check("POST", form, form, json={"operationType": "DEPOSIT", "amount": 1})
    await check(
        "POST",
        form,
        form,
        json={"walletId": str(uuid.uuid4()), "operationType": "DEPOSIT", "amount": 1},
    )

    ledger = "/api/v1/wallets/{wallet_id}/operations"
    await check("GET", ledger, f"/api/v1/wallets/{wallet}/operations?limit=1")
    await check("GET", ledger, f"/api/v1/wallets/{uuid.uuid4()}/operations")
    await check("GET", ledger, f"/api/v1/wallets/{wallet}/operations?cursor=nonsense")
    lookup = "/api/v1/wallets/{wallet_id}/operations/{operation_id}"
    await check("GET", lookup, f"/api/v1/wallets/{wallet}/operations/{applied['id']}")
    await check("GET", lookup, f"/api/v1/wallets/{wallet}/operations/{uuid.uuid4()}")

    transfers, one_transfer = "/api/v1/transfers", "/api/v1/transfers/{transfer_id}"
    payee = (await check("POST", "/api/v1/wallets", "/api/v1/wallets"))["id"]
    sent = await check(
        "POST", transfers, transfers, json={"from": wallet, "to": payee, "amount": "1.00"}
    )
    await check("GET", one_transfer, sent["href"])
    await check("GET", one_transfer, f"/api/v1/transfers/{uuid.uuid4()}")
    refused = {"from": wallet, "to": payee, "amount": "1000.00"}
    await check("POST", transfers, transfers, json=refused)
    unknown_payee = {"from": wallet, "to": str(uuid.uuid4()), "amount": "1.00"}
    await check("POST", transfers, transfers, json=unknown_payee)
    await check("POST", transfers, transfers, json={"from": wallet, "to": wallet, "amount": 1})

    place, held_in = "/api/v1/wallets/{wallet_id}/holds", f"/api/v1/wallets/{wallet}/holds"
    one_hold = "/api/v1/holds/{hold_id}"
    capture, void = f"{one_hold}/capture", f"{one_hold}/void"
    hold = await check("POST", place, held_in, json={"amount": "1.00", "expires_in": 60})
    await check("POST", place, held_in, json={"amount": "1000.00"})
    await check("POST", place, held_in, json={"amount": "1.00", "expires_in": 0})
    await check("POST", place, f"/api/v1/wallets/{uuid.uuid4()}/holds", json={"amount": 1})
    await check("GET", place, f"{held_in}?status=held")
    await check("GET", place, f"{held_in}?status=lost")
    await check("GET", place, f"/api/v1/wallets/{uuid.uuid4()}/holds")
    await check("GET", one_hold, hold["href"])
    await check("GET", one_hold, f"/api/v1/holds/{uuid.uuid4()}")
    await check("POST", capture, f"{hold['href']}/capture", json={"amount": "2.00"})
    await check("POST", capture, f"{hold['href']}/capture", json={"amount": "0.50"})
    await check("POST", capture, f"{hold['href']}/capture")
    await check("POST", capture, f"/api/v1/holds/{uuid.uuid4()}/capture")
    second = await check("POST", place, held_in, json={"amount": "1.00"})
    await check("POST", void, f"{second['href']}/void")
    await check("POST", void, f"{second['href']}/void")
    await check("POST", void, f"/api/v1/holds/{uuid.uuid4()}/void")
    too_long = {"Idempotency-Key": "k" * 300}
    await check("POST", void, f"{second['href']}/void", headers=too_long)
    # Holds on wallets of their own, for the queue without a worker below.
    spares = []
    for _ in range(3):
        spare = (await check("POST", "/api/v1/wallets", "/api/v1/wallets"))["id"]
        deposit = {"operationType": "DEPOSIT", "amount": "5.00"}
        await check("POST", op, f"/api/v1/wallets/{spare}/operation", json=deposit)
        spares.append(spare)
    third, fourth = [
        await check("POST", place, f"/api/v1/wallets/{w}/holds", json={"amount": "1.00"})
        for w in spares[:2]
    ]

    for path in ("/health", "/ready", "/api/openapi.json", "/docs", "/", "/api/live"):
        await check("GET", path, path)
    for asset in ("app.js", "style.css", "nothing.js"):
        await check("GET", "/static/{name}", f"/static/{asset}")
    for asset in (*DOCS_ASSETS, "app.js", "index.html", "nothing.js"):
        await check("GET", "/docs/{name}", f"/docs/{asset}")

    # Without a worker: the queued operation is pending, and the queue fills up.
    alone: TestClient[Any, Any] = await aiohttp_client(
        create_app(
            dataclasses.replace(
                settings,
                redis_key_prefix=f"{settings.redis_key_prefix}-alone",  # no worker there
                reply_timeout=0.05,
                wallet_queue_limit=1,
            )
        )
    )
    lonely = Checked(alone)
    pending = await lonely("POST", op, url, json={"operationType": "DEPOSIT", "amount": 1})
    await lonely("GET", lookup, pending["href"])
    await lonely("POST", op, url, json={"operationType": "DEPOSIT", "amount": 1})
    waiting = await lonely(
        "POST", transfers, transfers, json={"from": payee, "to": wallet, "amount": "1.00"}
    )
    await lonely("GET", one_transfer, waiting["href"])
    await lonely("POST", place, f"/api/v1/wallets/{spares[2]}/holds", json={"amount": 1})
    await lonely("POST", capture, f"{third['href']}/capture")
    await lonely("POST", void, f"{fourth['href']}/void")

    # With PostgreSQL and Redis both unreachable, everything that needs them is a 503.
    down: TestClient[Any, Any] = await aiohttp_client(
        create_app(
            dataclasses.replace(
                settings,
                database_url="postgresql://postgres@127.0.0.1:1/none",
                redis_url="redis://127.0.0.1:1/0",
            )
        )
    )
    cut_off = Checked(down)
    body = {"operationType": "DEPOSIT", "amount": 1}
    await cut_off("POST", "/api/v1/wallets", "/api/v1/wallets")
    await cut_off("GET", "/api/v1/wallets", "/api/v1/wallets")
    await cut_off("GET", one, f"/api/v1/wallets/{wallet}")
    await cut_off("POST", op, url, json=body)
    await cut_off("POST", form, form, json={**body, "walletId": wallet})
    await cut_off("GET", ledger, f"/api/v1/wallets/{wallet}/operations")
    await cut_off("GET", lookup, f"/api/v1/wallets/{wallet}/operations/{applied['id']}")
    await cut_off("GET", "/ready", "/ready")
    await cut_off("GET", "/api/live", "/api/live")
    await cut_off("POST", transfers, transfers, json={"from": wallet, "to": payee, "amount": 1})
    await cut_off("GET", one_transfer, sent["href"])
    await cut_off("POST", place, held_in, json={"amount": 1})
    await cut_off("GET", place, held_in)
    await cut_off("GET", one_hold, hold["href"])
    await cut_off("POST", capture, f"{third['href']}/capture")
    await cut_off("POST", void, f"{third['href']}/void")

    # Authentication: its routes are 404 while it is off, and with it on ...
    for path in AUTH_ROUTES:
        await check("POST", path, path, json={})
    auth_on = dataclasses.replace(settings, auth_enabled=True, jwt_secret="k" * 32)
    secured = Checked(await aiohttp_client(create_app(auth_on)))
    name = f"u{uuid.uuid4().hex[:8]}"
    credentials = {"username": name, "password": "a long enough password"}
    await secured("POST", "/api/auth/users", "/api/auth/users", json=credentials)
    await secured("POST", "/api/auth/users", "/api/auth/users", json=credentials)
    await secured("POST", "/api/auth/users", "/api/auth/users", json={"username": "x"})
    tokens = [await secured("POST", "/api/auth/token", "/api/auth/token", json=credentials)]
    wrong = {"username": name, "password": "not the password"}
    await secured("POST", "/api/auth/token", "/api/auth/token", json=wrong)
    await secured("POST", "/api/auth/token", "/api/auth/token", json={})
    refresh, logout = "/api/auth/token/refresh", "/api/auth/logout"
    spent = {"refresh_token": tokens[0]["refresh_token"]}
    tokens.append(await secured("POST", refresh, refresh, json=spent))
    await secured("POST", refresh, refresh, json=spent)
    await secured("POST", refresh, refresh, json={"refresh_token": 7})
    tokens.append(await secured("POST", "/api/auth/token", "/api/auth/token", json=credentials))
    await secured("POST", logout, logout, json={"refresh_token": tokens[-1]["refresh_token"]})
    await secured("POST", logout, logout, json={"refresh_token": "forged"})
    await secured("POST", logout, logout, json={})
    for path, methods in PATHS.items():  # ... every /api/v1 route and the live view want one
        for method in methods:
            if path.startswith("/api/v1/") or path == "/api/live":
                concrete = path
                for name in ("{wallet_id}", "{operation_id}", "{transfer_id}", "{hold_id}"):
                    concrete = concrete.replace(name, wallet)
                await secured(method.upper(), path, concrete, json=body)
    signed_in = {"Authorization": f"Bearer {tokens[1]['access_token']}"}
    await secured("GET", "/api/live", "/api/live", headers=signed_in)
    tight = dataclasses.replace(auth_on, login_user_limit=1, registration_address_limit=1)
    limited = Checked(await aiohttp_client(create_app(tight)))
    for _ in range(2):
        await limited("POST", "/api/auth/token", "/api/auth/token", json=wrong)
        await limited("POST", "/api/auth/users", "/api/auth/users", json=credentials)
    cut_off_secured = Checked(
        await aiohttp_client(
            create_app(
                dataclasses.replace(
                    auth_on,
                    database_url="postgresql://postgres@127.0.0.1:1/none",
                    redis_url="redis://127.0.0.1:1/0",
                )
            )
        )
    )
    live_refresh = {"refresh_token": tokens[1]["refresh_token"]}
    await cut_off_secured("POST", "/api/auth/users", "/api/auth/users", json=credentials)
    await cut_off_secured("POST", "/api/auth/token", "/api/auth/token", json=credentials)
    await cut_off_secured("POST", refresh, refresh, json=live_refresh)
    await cut_off_secured("POST", logout, logout, json=live_refresh)

    documented = {
        (path, method, status)
        for path, methods in PATHS.items()
        for method, spec in methods.items()
        for status in spec["responses"]
    }
    # Body-level errors come from one reader of JSON bodies, shown on the operation route;
    # the form's outcomes are the operation's own, sent through the same code.
    shared_code = {
        (path, "post", status)
        for path in (form, transfers, place, capture, void, *AUTH_ROUTES)
        for status in ("400", "413", "415")
    } | {(form, "post", s) for s in ("202", "409")}
    walks = (check, lonely, cut_off, secured, limited, cut_off_secured)
    exercised = set().union(*(walk.seen for walk in walks))
    assert documented - exercised - shared_code == set()
