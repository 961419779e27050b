"""The parts the OpenAPI document (api/openapi.py) is made of: references to the bodies'
schemas (api/bodies.py), the problem answers, the parameters, the shapes of an operation,
and the accounts' routes, made of those alone."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from msgspec import Struct

from api.bodies import (
    BODIES,
    CaptureRequest,
    Credentials,
    Hold,
    HoldPage,
    HoldRequest,
    Operation,
    Pending,
    Problem,
    RefreshToken,
    Tokens,
    User,
)
from api.inputs import (
    IDEMPOTENCY_KEY,
    KEY_PATTERN,
    PAGE_LIMIT_DEFAULT,
    PAGE_LIMIT_MAX,
    WALLETS_CURSOR,
)

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

# The accounts' routes (api/auth.py), all of one shape.
AUTH_PATHS: dict[str, Any] = {
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


HOLD_ID = {"name": "hold_id", "in": "path", "required": True, "schema": UUID}
HOLD_NOT_FOUND = problem("No such hold (a malformed id is not found either)")
QUEUE_FULL = problem(
    "The wallet's or shard's queue is full, or a dependency is down", retry_after=True
)
PENDING = {
    "description": "Queued, but its outcome did not come in time: the Location (the hold) "
    "shows it once decided",
    "content": json_content(ref(Pending)),
}


def hold_end(operation_id: str, summary: str, body: type[Struct] | None) -> dict[str, Any]:
    """A capture or a void: both end a held hold, once."""
    described: dict[str, Any] = {
        "operationId": operation_id,
        "tags": ["holds"],
        "summary": summary,
        "parameters": [
            HOLD_ID,
            {
                **KEY_HEADER,
                "description": "Makes the request safe to retry, scoped to the hold: the same "
                "key with the same request answers the first outcome again, with "
                "Idempotent-Replayed: true; with another request, 422.",
            },
        ],
        "responses": {
            "200": {"description": "The hold as it ended", "content": json_content(ref(Hold))},
            "202": PENDING,
            **BODY_ERRORS,
            "404": HOLD_NOT_FOUND,
            "409": problem(
                "The hold has ended already (captured, voided or expired): the problem's "
                "`hold` shows how"
            ),
            "422": problem(
                "A field is not valid (an amount above the held one, `to` the hold's own "
                "wallet), or the Idempotency-Key was used for another request"
            ),
            "503": QUEUE_FULL,
        },
    }
    if body is not None:
        described["requestBody"] = {"required": False, "content": json_content(ref(body))}
    return described


# The holds' routes (api/holds.py).
HOLD_PATHS: dict[str, Any] = {
    "/api/v1/wallets/{wallet_id}/holds": {
        "post": {
            "operationId": "placeHold",
            "tags": ["holds"],
            "summary": "Reserve an amount of the wallet's available funds",
            "parameters": [
                WALLET_ID,
                {
                    **KEY_HEADER,
                    "description": "Makes the request safe to retry, scoped to the wallet: "
                    "the same key places the same hold, answered again with "
                    "Idempotent-Replayed: true.",
                },
            ],
            "requestBody": {"required": True, "content": json_content(ref(HoldRequest))},
            "responses": {
                "201": {
                    "description": "Held; `available` is the wallet's after it",
                    "content": json_content(ref(Hold)),
                },
                "202": PENDING,
                **BODY_ERRORS,
                "404": NOT_FOUND,
                "409": problem("Refused: the wallet's available funds are short; recorded"),
                "422": problem(
                    "A field is not valid (`expires_in` above HOLD_EXPIRES_MAX), or the "
                    "Idempotency-Key was used for another request"
                ),
                "503": QUEUE_FULL,
            },
        },
        "get": {
            "operationId": "listHolds",
            "tags": ["holds"],
            "summary": "The wallet's holds, newest first",
            "parameters": [
                WALLET_ID,
                {
                    "name": "status",
                    "in": "query",
                    "schema": {
                        "type": "string",
                        "enum": ["held", "captured", "voided", "expired"],
                    },
                    "description": "Only the holds in this status",
                },
                *paging(WALLETS_CURSOR),
            ],
            "responses": {
                "200": {"description": "A page of holds", "content": json_content(ref(HoldPage))},
                "404": NOT_FOUND,
                "422": INVALID,
                "503": UNAVAILABLE,
            },
        },
    },
    "/api/v1/holds/{hold_id}": {
        "get": {
            "operationId": "getHold",
            "tags": ["holds"],
            "summary": "A hold and how it stands: held, captured, voided or expired",
            "parameters": [HOLD_ID],
            "responses": {
                "200": {"description": "The hold", "content": json_content(ref(Hold))},
                "404": HOLD_NOT_FOUND,
                "503": UNAVAILABLE,
            },
        }
    },
    "/api/v1/holds/{hold_id}/capture": {
        "post": hold_end(
            "captureHold",
            "Capture a hold: all or part of it leaves the wallet (paid to `to` if given), "
            "the rest is released",
            CaptureRequest,
        )
    },
    "/api/v1/holds/{hold_id}/void": {
        "post": hold_end("voidHold", "Void a hold: its whole amount is available again", None)
    },
}
