"""The API described: an OpenAPI 3.1 document at /api/openapi.json, generated from the
declarations of api/bodies.py, with an operationId and a tag on every operation so that
client generators name what they make after them. /docs explores it (api/page.py).

tests/test_openapi.py holds the document to the server: every route served is described,
and the answers the server gives match the schemas described here.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api.bodies import (
    Health,
    Live,
    Operation,
    OperationFormRequest,
    OperationPage,
    OperationRequest,
    Pending,
    Ready,
    Transfer,
    TransferRequest,
    Wallet,
    WalletPage,
)
from api.describe import (
    AUTH_PATHS,
    BODY_ERRORS,
    HOLD_PATHS,
    INVALID,
    KEY_HEADER,
    NOT_FOUND,
    OPERATION_ID,
    SCHEMAS,
    UNAVAILABLE,
    UUID,
    WALLET_ID,
    json_content,
    operation_post,
    paging,
    problem,
    ref,
)
from api.inputs import (
    OPERATIONS_CURSOR,
    WALLETS_CURSOR,
)
from api.page import DOCS_ASSETS, PAGE_ASSETS
from shared.codec import to_json

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

PATHS |= HOLD_PATHS | AUTH_PATHS
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
        {
            "name": "holds",
            "description": "Funds reserved now, captured or voided later, or expired",
        },
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
