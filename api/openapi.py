"""The API described: an OpenAPI 3.1 document at /api/openapi.json, and a page for people at
/docs rendered from it on the server (no script, no CDN: it works offline).

tests/test_openapi.py holds the document to the server: every route served is described,
and the answers the server gives match the schemas described here.
"""

from __future__ import annotations

import html
import re
from typing import Any

import msgspec
from aiohttp import web
from msgspec import Struct

from api.bodies import (
    BODIES,
    Credentials,
    Health,
    Live,
    Operation,
    OperationFormRequest,
    OperationPage,
    OperationRequest,
    Pending,
    Problem,
    Ready,
    RefreshToken,
    Tokens,
    Transfer,
    TransferRequest,
    User,
    Wallet,
    WalletPage,
)
from api.inputs import (
    IDEMPOTENCY_KEY,
    KEY_PATTERN,
    OPERATIONS_CURSOR,
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    WALLETS_CURSOR,
)
from shared.codec import to_json

REF = "#/components/schemas/"
UUID = {"type": "string", "format": "uuid"}


def ref(body: type[Struct]) -> dict[str, str]:
    return {"$ref": REF + body.__name__}


def json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def problem(description: str, *, retry_after: bool = False) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": description,
        "content": {"application/problem+json": {"schema": ref(Problem)}},
    }
    if retry_after:
        response["headers"] = {
            "Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait"}
        }
    return response


UNAVAILABLE = problem("PostgreSQL or Redis is unreachable", retry_after=True)
INVALID = problem("A parameter or field is not valid (each error names it)")
NOT_FOUND = problem("No such wallet (a malformed id is not found either)")
# What the one reader of JSON bodies answers, for every route that takes one.
BODY_ERRORS = {
    "400": problem("The body is not JSON, or not an object, or has a key twice"),
    "413": problem("The body is too large"),
    "415": problem("The body is not application/json"),
    "422": INVALID,
}


def paging(cursor: re.Pattern[str]) -> list[dict[str, Any]]:
    return [
        {
            "name": "limit",
            "in": "query",
            "schema": {
                "type": "integer",
                "minimum": 1,
                "maximum": PAGE_LIMIT_MAX,
                "default": PAGE_LIMIT_DEFAULT,
            },
        },
        {
            "name": "cursor",
            "in": "query",
            "schema": {"type": "string", "pattern": cursor.pattern},
            "description": "The next_cursor of the previous page",
        },
    ]


WALLET_ID = {"name": "wallet_id", "in": "path", "required": True, "schema": UUID}
OPERATION_ID = {"name": "operation_id", "in": "path", "required": True, "schema": UUID}
KEY_HEADER = {
    "name": IDEMPOTENCY_KEY,
    "in": "header",
    "required": False,
    "schema": {"type": "string", "pattern": KEY_PATTERN},
    "description": "Makes the request safe to retry: it becomes the operation's id (a UUID "
    "as it is, any other key mapped to one). The same key with the same request answers the "
    "stored outcome again, with Idempotent-Replayed: true; with another request, 422.",
}


def operation_post(summary: str, body: type[Struct]) -> dict[str, Any]:
    return {
        "summary": summary,
        "parameters": [KEY_HEADER],
        "requestBody": {"required": True, "content": json_content(ref(body))},
        "responses": {
            "200": {
                "description": "Applied and committed; `balance` is the wallet's balance after it",
                "content": json_content(ref(Operation)),
            },
            "202": {
                "description": "Queued, but its outcome did not come in time: the Location "
                "(and `href`) shows it once applied",
                "content": json_content(ref(Pending)),
            },
            **BODY_ERRORS,
            "404": NOT_FOUND,
            "409": problem("Refused: insufficient funds, or the balance limit; recorded"),
            "422": problem(
                "A field is not valid, or the Idempotency-Key was used for another request"
            ),
            "503": problem(
                "The wallet's or shard's queue is full, or a dependency is down", retry_after=True
            ),
        },
    }


def components() -> dict[str, Any]:
    """The schemas of every body, from their declarations in api/bodies.py."""
    _, schemas = msgspec.json.schema_components(BODIES, ref_template=REF + "{name}")
    for body in BODIES:
        schemas[body.__name__].update(getattr(body, "schema_extra", {}))
    return schemas


SCHEMAS = components()

PATHS: dict[str, Any] = {
    "/api/v1/wallets": {
        "post": {
            "summary": "Create a wallet (balance 0.00)",
            "responses": {
                "201": {
                    "description": "Created; Location names it",
                    "content": json_content(ref(Wallet)),
                },
                "422": INVALID,
                "503": UNAVAILABLE,
            },
        },
        "get": {
            "summary": "List wallets, newest first",
            "parameters": paging(WALLETS_CURSOR),
            "responses": {
                "200": {"description": "A page", "content": json_content(ref(WalletPage))},
                "422": INVALID,
                "503": UNAVAILABLE,
            },
        },
    },
    "/api/v1/wallets/{wallet_id}": {
        "get": {
            "summary": "A wallet and its balance",
            "parameters": [WALLET_ID],
            "responses": {
                "200": {"description": "The wallet", "content": json_content(ref(Wallet))},
                "404": NOT_FOUND,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/v1/wallets/{wallet_id}/operation": {
        "post": {
            **operation_post("Deposit to or withdraw from the wallet", OperationRequest),
            "parameters": [WALLET_ID, KEY_HEADER],
        }
    },
    "/api/v1/wallet": {
        "post": operation_post(
            "The same operation, in its original form: the wallet id in the body",
            OperationFormRequest,
        )
    },
    "/api/v1/wallets/{wallet_id}/operations": {
        "get": {
            "summary": "The wallet's ledger, newest first",
            "parameters": [WALLET_ID, *paging(OPERATIONS_CURSOR)],
            "responses": {
                "200": {"description": "A page", "content": json_content(ref(OperationPage))},
                "404": NOT_FOUND,
                "422": INVALID,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/v1/wallets/{wallet_id}/operations/{operation_id}": {
        "get": {
            "summary": "One operation and its outcome: applied, rejected, or pending",
            "parameters": [WALLET_ID, OPERATION_ID],
            "responses": {
                "200": {
                    "description": "Its outcome, or `pending` while it waits in the queue",
                    "content": json_content({"oneOf": [ref(Operation), ref(Pending)]}),
                },
                "404": problem("No such wallet, or no such operation on it"),
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/v1/transfers": {
        "post": {
            "summary": "Move an amount from one wallet to another",
            "parameters": [
                {
                    **KEY_HEADER,
                    "description": "Makes the request safe to retry, scoped to the source "
                    "wallet: the same key from the same wallet is the same transfer. The "
                    "same key with the same request answers its outcome again, with "
                    "Idempotent-Replayed: true; with another request, 422.",
                }
            ],
            "requestBody": {"required": True, "content": json_content(ref(TransferRequest))},
            "responses": {
                "200": {
                    "description": "Completed: both wallets committed; `balance` is the "
                    "source's balance after it",
                    "content": json_content(ref(Transfer)),
                },
                "202": {
                    "description": "Its outcome did not come in time: the Location (and "
                    "`href`) tells where it stands",
                    "content": json_content(ref(Transfer)),
                },
                **BODY_ERRORS,
                "404": problem("No such source (`from`) or destination (`to`) wallet"),
                "409": problem(
                    "Rejected, nothing moved: insufficient funds in the source, or the "
                    "destination's balance limit (the amount went back to the source); the "
                    "problem's `transfer` holds it"
                ),
                "422": problem(
                    "A field is not valid, `to` is `from`, or the Idempotency-Key was used "
                    "for another transfer"
                ),
                "503": problem(
                    "The source's or its shard's queue is full, or a dependency is down",
                    retry_after=True,
                ),
            },
        }
    },
    "/api/v1/transfers/{transfer_id}": {
        "get": {
            "summary": "Where a transfer stands: pending, in_flight, completed or rejected",
            "parameters": [{"name": "transfer_id", "in": "path", "required": True, "schema": UUID}],
            "responses": {
                "200": {"description": "The transfer", "content": json_content(ref(Transfer))},
                "404": problem("No such transfer"),
                "503": UNAVAILABLE,
            },
        }
    },
    "/health": {
        "get": {
            "summary": "The process is alive",
            "responses": {"200": {"description": "Alive", "content": json_content(ref(Health))}},
        }
    },
    "/ready": {
        "get": {
            "summary": "PostgreSQL and Redis answer and at least one worker is alive",
            "responses": {
                "200": {"description": "Ready", "content": json_content(ref(Ready))},
                "503": problem("Not ready: `checks` says what is missing", retry_after=True),
            },
        }
    },
    "/api/openapi.json": {
        "get": {
            "summary": "This document",
            "responses": {
                "200": {
                    "description": "OpenAPI 3.1",
                    "content": json_content({"type": "object"}),
                }
            },
        }
    },
    "/api/live": {
        "get": {
            "summary": "The write path per second over the last minutes, for the web page",
            "responses": {
                "200": {
                    "description": "Answered operations and their p50/p99 latency (this API "
                    "process), committed operations and mean batch size (all workers), and "
                    "queued operations per shard",
                    "content": json_content(ref(Live)),
                },
                "503": UNAVAILABLE,
            },
        }
    },
    "/": {
        "get": {
            "summary": "The web page for people",
            "responses": {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/static/{name}": {
        "get": {
            "summary": "The page's script and style sheet",
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": ["app.js", "style.css"]},
                }
            ],
            "responses": {
                "200": {
                    "description": "The file",
                    "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                    },
                },
                "404": problem("No such file"),
            },
        }
    },
    "/docs": {
        "get": {
            "summary": "This document as a page for people",
            "responses": {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
}

AUTH_OFF = problem("Authentication is turned off on this service (AUTH_ENABLED)")


# Registration and login hash a password: a bounded number at once per process.
HASHING_OR_UNAVAILABLE = problem(
    "PostgreSQL or Redis is unreachable, or too many passwords are being hashed",
    retry_after=True,
)


def auth_post(summary: str, body: type[Struct], answers: dict[str, Any]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {"required": True, "content": json_content(ref(body))},
            "responses": {**BODY_ERRORS, "404": AUTH_OFF, "503": UNAVAILABLE, **answers},
        }
    }


TOKENS = {"description": "A new pair of tokens", "content": json_content(ref(Tokens))}
PATHS |= {
    "/api/auth/users": auth_post(
        "Register a user",
        Credentials,
        {
            "201": {"description": "Registered", "content": json_content(ref(User))},
            "409": problem("The username is taken (usernames are not case-sensitive)"),
            "429": problem("Too many registrations from this address, or in all", retry_after=True),
            "503": HASHING_OR_UNAVAILABLE,
        },
    ),
    "/api/auth/token": auth_post(
        "Log in: an access token and a refresh token",
        Credentials,
        {
            "200": TOKENS,
            "401": problem("Wrong username or password"),
            "429": problem(
                "Too many failed logins from this address, for this username or for any",
                retry_after=True,
            ),
            "503": HASHING_OR_UNAVAILABLE,
        },
    ),
    "/api/auth/token/refresh": auth_post(
        "Spend a refresh token for a new pair; a spent one presented again revokes its family",
        RefreshToken,
        {"200": TOKENS, "401": problem("Not a valid, unspent, unrevoked refresh token")},
    ),
    "/api/auth/logout": auth_post(
        "Revoke a refresh token and its family",
        RefreshToken,
        {
            "204": {"description": "Revoked"},
            "401": problem("Not a valid refresh token"),
        },
    ),
}
# With AUTH_ENABLED every /api/v1 route and the live view need a bearer access token;
# without, none does.
for path, methods in PATHS.items():
    if path.startswith("/api/v1/") or path == "/api/live":
        for spec in methods.values():
            spec["security"] = [{"bearer": []}, {}]
            spec["responses"]["401"] = problem(
                "Authentication is on and the access token is missing or not valid "
                "(see WWW-Authenticate)"
            )

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Wallet service",
        "version": "1",
        "description": "Wallets with exact balances and a ledger. Money is exact: amounts "
        "travel as decimal strings with two fraction digits (a JSON number is accepted in "
        "requests). Errors are RFC 9457 problem documents. An operation is answered 200 "
        "only after it is committed.",
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
    },
}
DOCUMENT_JSON = to_json(DOCUMENT)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=DOCUMENT_JSON, content_type="application/json")


def _schema_name(schema: dict[str, Any]) -> str:
    if "$ref" in schema:
        return str(schema["$ref"]).removeprefix(REF)
    if "oneOf" in schema:
        return " or ".join(_schema_name(s) for s in schema["oneOf"])
    return str(schema.get("type", "value"))


def render_page() -> str:
    """The document as HTML: each path and method with its parameters and answers, then
    each schema."""
    e = html.escape
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(DOCUMENT['info']['title'])} API</title>",
        "<style>body{font:16px/1.5 system-ui,sans-serif;max-width:60rem;margin:auto;"
        "padding:1rem;color:#111}code,pre{background:#f3f3f3;padding:0 .2rem}"
        "h3{border-top:1px solid #ccc;padding-top:1rem}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}</style></head><body>",
        f"<h1>{e(DOCUMENT['info']['title'])} API</h1>",
        f"<p>{e(DOCUMENT['info']['description'])}</p>",
        "<p>Machine-readable: <a href='/api/openapi.json'>/api/openapi.json</a> "
        "(OpenAPI 3.1).</p><h2>Endpoints</h2>",
    ]
    for path, methods in PATHS.items():
        for method, spec in methods.items():
            parts.append(f"<h3><code>{e(method.upper())} {e(path)}</code></h3>")
            parts.append(f"<p>{e(spec['summary'])}</p>")
            if spec.get("security"):
                parts.append(
                    "<p>With authentication on: <code>Authorization: Bearer</code> and an "
                    "access token from <code>POST /api/auth/token</code>.</p>"
                )
            if spec.get("parameters"):
                parts.append("<table><tr><th>parameter</th><th>in</th><th>about</th></tr>")
                for p in spec["parameters"]:
                    about = p.get("description", _schema_name(p["schema"]))
                    parts.append(
                        f"<tr><td><code>{e(p['name'])}</code></td><td>{e(p['in'])}</td>"
                        f"<td>{e(about)}</td></tr>"
                    )
                parts.append("</table>")
            if "requestBody" in spec:
                body = spec["requestBody"]["content"]["application/json"]["schema"]
                parts.append(f"<p>Body: <code>{e(_schema_name(body))}</code></p>")
            parts.append("<table><tr><th>status</th><th>meaning</th><th>body</th></tr>")
            for status, response in spec["responses"].items():
                content = response.get("content", {})
                body_names = ", ".join(
                    f"{_schema_name(c['schema'])} ({kind})" for kind, c in content.items()
                )
                parts.append(
                    f"<tr><td>{e(status)}</td><td>{e(response['description'])}</td>"
                    f"<td>{e(body_names)}</td></tr>"
                )
            parts.append("</table>")
    parts.append("<h2>Schemas</h2>")
    for name, schema in SCHEMAS.items():
        parts.append(f"<h3 id='{e(name)}'>{e(name)}</h3>")
        parts.append(f"<pre>{e(to_json(schema).decode())}</pre>")
    parts.append("</body></html>")
    return "".join(parts)


PAGE = render_page()


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")
