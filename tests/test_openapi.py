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
from shared.settings import Settings
from tests.conftest import AiohttpClient
from tests.helpers import Client


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
        content_type = r.content_type
        content = responses[status].get("content", {})
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
        else:
            body = await r.text()
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

    for path in ("/health", "/ready", "/metrics", "/api/openapi.json", "/docs"):
        await check("GET", path, path)

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

    documented = {
        (path, method, status)
        for path, methods in PATHS.items()
        for method, spec in methods.items()
        for status in spec["responses"]
    }
    # The body-level errors of the form are the operation's own, sent through the same code.
    same_as_the_operation = {(form, "post", s) for s in ("202", "400", "409", "413", "415")}
    unexercised = documented - check.seen - lonely.seen - cut_off.seen - same_as_the_operation
    assert unexercised == set()
