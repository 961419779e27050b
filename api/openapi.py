"""The API described: an OpenAPI 3.1 document at /api/openapi.json, generated from the
declarations of api/bodies.py, with an operationId and a tag on every operation so that
client generators name what they make after them. /docs explores it (api/page.py).

tests/test_openapi.py holds the document to the server: every route served is described,
and the answers the server gives match the schemas described here.
"""

from __future__ import annotations

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
from api.page import DOCS_ASSETS, PAGE_ASSETS
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
    "description": "Makes the request safe to retry: the key, byte for byte (two spellings of "
    "one UUID are two keys), names the operation on its wallet; the operation's id is derived "
    "from it and never equals it. The same key with the same request answers the stored "
    "outcome again, with Idempotent-Replayed: true; with another request, 422.",
}


def operation_post(operation_id: str, summary: str, body: type[Struct]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "tags": ["operations"],
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


def typed_enums(schema: Any) -> Any:
    """`schema` with a type on each enum of strings: msgspec leaves a Literal's enum
    untyped, and client generators then make it an untyped value instead of an enum."""
    if isinstance(schema, list):
        return [typed_enums(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    typed = {key: typed_enums(value) for key, value in schema.items()}
    if "enum" in typed and "type" not in typed and all(isinstance(v, str) for v in typed["enum"]):
        typed["type"] = "string"
    return typed


def components() -> dict[str, Any]:
    """The schemas of every body, from their declarations in api/bodies.py."""
    _, schemas = msgspec.json.schema_components(BODIES, ref_template=REF + "{name}")
    return {name: typed_enums(schema) for name, schema in schemas.items()}


SCHEMAS = components()

PATHS: dict[str, Any] = {
    "/api/v1/wallets": {
        "post": {
            "operationId": "createWallet",
            "tags": ["wallets"],
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
            "operationId": "listWallets",
            "tags": ["wallets"],
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
            "operationId": "getWallet",
            "tags": ["wallets"],
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
            **operation_post(
                "postOperation", "Deposit to or withdraw from the wallet", OperationRequest
            ),
            "parameters": [WALLET_ID, KEY_HEADER],
        }
    },
    "/api/v1/wallet": {
        "post": operation_post(
            "postOperationForm",
            "The same operation, in its original form: the wallet id in the body",
            OperationFormRequest,
        )
    },
    "/api/v1/wallets/{wallet_id}/operations": {
        "get": {
            "operationId": "listOperations",
            "tags": ["operations"],
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
            "operationId": "getOperation",
            "tags": ["operations"],
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
            "operationId": "createTransfer",
            "tags": ["transfers"],
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
            "operationId": "getTransfer",
            "tags": ["transfers"],
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
            "operationId": "health",
            "tags": ["health"],
            "summary": "The process is alive",
            "responses": {"200": {"description": "Alive", "content": json_content(ref(Health))}},
        }
    },
    "/ready": {
        "get": {
            "operationId": "ready",
            "tags": ["health"],
            "summary": "PostgreSQL and Redis answer and at least one worker is alive",
            "responses": {
                "200": {"description": "Ready", "content": json_content(ref(Ready))},
                "503": problem("Not ready: `checks` says what is missing", retry_after=True),
            },
        }
    },
    "/api/openapi.json": {
        "get": {
            "operationId": "openapiDocument",
            "tags": ["web"],
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
            "operationId": "live",
            "tags": ["web"],
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
            "operationId": "page",
            "tags": ["web"],
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
            "operationId": "pageAsset",
            "tags": ["web"],
            "summary": "The page's script and style sheet",
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": list(PAGE_ASSETS)},
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
            "operationId": "docs",
            "tags": ["web"],
            "summary": "This document to explore and try, in Swagger UI (served here, no CDN)",
            "responses": {
                "200": {
                    "description": "HTML",
                    "content": {"text/html": {"schema": {"type": "string"}}},
                }
            },
        }
    },
    "/docs/{name}": {
        "get": {
            "operationId": "docsAsset",
            "tags": ["web"],
            "summary": "The explorer's script, style sheet and icon",
            "parameters": [
                {
                    "name": "name",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": list(DOCS_ASSETS)},
                }
            ],
            "responses": {
                "200": {
                    "description": "The file",
                    "content": {
                        "text/javascript": {"schema": {"type": "string"}},
                        "text/css": {"schema": {"type": "string"}},
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "404": problem("No such file"),
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


def auth_post(
    operation_id: str, summary: str, body: type[Struct], answers: dict[str, Any]
) -> dict[str, Any]:
    return {
        "post": {
            "operationId": operation_id,
            "tags": ["auth"],
            "summary": summary,
            "requestBody": {"required": True, "content": json_content(ref(body))},
            "responses": {**BODY_ERRORS, "404": AUTH_OFF, "503": UNAVAILABLE, **answers},
        }
    }


TOKENS = {"description": "A new pair of tokens", "content": json_content(ref(Tokens))}
PATHS |= {
    "/api/auth/users": auth_post(
        "registerUser",
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
        "createToken",
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
        "refreshToken",
        "Spend a refresh token for a new pair; a spent one presented again revokes its family",
        RefreshToken,
        {"200": TOKENS, "401": problem("Not a valid, unspent, unrevoked refresh token")},
    ),
    "/api/auth/logout": auth_post(
        "logout",
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
            spec["security"] = [{"bearerAuth": []}, {}]
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
    "tags": [
        {"name": "wallets", "description": "Wallets and their balances"},
        {"name": "operations", "description": "Deposits, withdrawals, and the ledger"},
        {"name": "transfers", "description": "Moving an amount from one wallet to another"},
        {"name": "auth", "description": "Accounts and tokens, where AUTH_ENABLED is on"},
        {"name": "health", "description": "Liveness, readiness and metrics"},
        {"name": "web", "description": "The web page, this document, and /docs to try it"},
    ],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearerAuth": {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "An access token from POST /api/auth/token (createToken); "
                "needed only where AUTH_ENABLED is on",
            }
        },
    },
}
DOCUMENT_JSON = to_json(DOCUMENT)


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=DOCUMENT_JSON, content_type="application/json")
