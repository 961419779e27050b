"""Reading and validating what clients send. Nothing here touches Redis or PostgreSQL."""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import uuid
from decimal import Decimal
from typing import Any

from aiohttp import web

from api.problems import malformed
from shared.codec import CANONICAL_UUID, OPERATION_TYPES
from shared.errors import InvalidInput, WalletNotFound
from shared.money import parse_amount

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 100
IDEMPOTENCY_KEY = "Idempotency-Key"
# A client key that is not a UUID becomes the operation id through this namespace.
IDEMPOTENCY_NAMESPACE = uuid.UUID("5b0c4a52-8f0e-4f3e-9a51-3b2d8c1f7e60")
_KEY_CHARS = re.compile(r"[\x20-\x7e]{1,255}")
_random = memoryview(b"")

OPERATION_FIELDS = frozenset({"operationType", "operation_type", "amount"})
FORM_FIELDS = OPERATION_FIELDS | {"walletId"}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return obj


def parse_json(body: bytes) -> Any:
    """Numbers become Decimal (never float), so amounts stay exact; NaN and duplicate keys
    are refused."""
    try:
        return json.loads(
            body,
            parse_float=Decimal,
            parse_int=Decimal,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except (ValueError, RecursionError) as e:
        raise malformed(f"The body is not valid JSON: {e}") from e


async def read_json_object(request: web.Request) -> dict[str, Any]:
    if request.content_type != "application/json":
        raise web.HTTPUnsupportedMediaType(
            text="Send the body as application/json",
        )
    data = parse_json(await request.read())
    if not isinstance(data, dict):
        raise malformed("The body must be a JSON object")
    return data


def random_bytes(count: int) -> bytes:
    """Bytes from os.urandom, read 4 KiB at a time: one getrandom call per request id and
    operation id showed as 8% of the API's CPU under load."""
    global _random
    if len(_random) < count:
        _random = memoryview(os.urandom(4096))
    chunk, _random = _random[:count], _random[count:]
    return bytes(chunk)


def random_uuid() -> str:
    """A random (version 4) UUID in canonical form."""
    b = bytearray(random_bytes(16))
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def wallet_id_from_path(raw: str) -> str:
    """A malformed id names no wallet: 404, like an unknown one."""
    if CANONICAL_UUID.fullmatch(raw):
        return raw
    try:
        return str(uuid.UUID(raw))
    except ValueError:
        raise WalletNotFound(f"No wallet has the id {raw!r}") from None


def uuid_field(body: dict[str, Any], field: str) -> str:
    value = body.get(field)
    if value is None:
        raise InvalidInput(field, "is required")
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a string holding a UUID")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidInput(field, "must be a UUID") from None


def operation_fields(body: dict[str, Any], allowed: frozenset[str]) -> tuple[str, int]:
    """(operation type, amount in minor units) from an operation request's body."""
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(unknown[0], "is not a known field")
    if "operationType" in body and "operation_type" in body:
        raise InvalidInput("operationType", "give operationType or operation_type, not both")
    field = "operationType" if "operationType" in body else "operation_type"
    kind = body.get(field)
    if kind is None:
        raise InvalidInput("operationType", "is required")
    if kind not in OPERATION_TYPES:
        raise InvalidInput(field, f"must be one of {', '.join(OPERATION_TYPES)}")
    if "amount" not in body:
        raise InvalidInput("amount", "is required")
    return kind, parse_amount(body["amount"])


def operation_id(request: web.Request) -> str:
    """The Idempotency-Key is the operation id (a UUID key as it is, any other key mapped to
    a UUID); without one the operation gets a fresh id."""
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is None:
        return random_uuid()
    if not _KEY_CHARS.fullmatch(key):
        raise InvalidInput(IDEMPOTENCY_KEY, "must be 1 to 255 printable ASCII characters")
    try:
        return str(uuid.UUID(key))
    except ValueError:
        return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, key))


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return PAGE_LIMIT_DEFAULT
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= PAGE_LIMIT_MAX:
        raise InvalidInput("limit", f"must be a whole number from 1 to {PAGE_LIMIT_MAX}")
    return int(raw)


def encode_cursor(*position: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


def decode_cursor(request: web.Request, *types: type) -> list[Any] | None:
    """The position a `next_cursor` stood for, checked to hold values of `types` (integers
    within a BIGINT, positive)."""
    raw = request.query.get("cursor")
    if raw is None:
        return None
    try:
        position = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, binascii.Error):
        position = None
    if not (
        isinstance(position, list)
        and len(position) == len(types)
        and all(type(v) is t for v, t in zip(position, types, strict=True))
        and all(0 < v < 2**63 for v in position if type(v) is int)
    ):
        raise InvalidInput("cursor", "is not a cursor this API returned")
    return position
