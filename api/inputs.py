"""Reading and validating what clients send. Nothing here touches Redis or PostgreSQL."""

from __future__ import annotations

import json
import os
import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from aiohttp import web

from api.problems import malformed
from shared.codec import CANONICAL_UUID
from shared.errors import InvalidInput, WalletNotFound
from shared.ids import client_operation_id

PAGE_LIMIT_DEFAULT = 50
PAGE_LIMIT_MAX = 100
IDEMPOTENCY_KEY = "Idempotency-Key"
# Printable ASCII, without the spaces at either end that HTTP would strip.
KEY_PATTERN = r"^[\x21-\x7e]([\x20-\x7e]{0,253}[\x21-\x7e])?$"
_KEY = re.compile(KEY_PATTERN)
# Positions in a list: a wallet's creation time in microseconds since 1970 and its id; an
# operation's seq. A client passes back the next_cursor of a page.
WALLETS_CURSOR = re.compile(
    r"^[0-9]{1,16}_[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
)
OPERATIONS_CURSOR = re.compile(r"^[1-9][0-9]{0,17}$")
_random = memoryview(b"")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("an object has a duplicate key")
    return obj


# Made once: json.loads with these options builds a decoder for every body.
_DECODER = json.JSONDecoder(
    parse_float=Decimal,
    parse_int=Decimal,
    parse_constant=_reject_constant,
    object_pairs_hook=_unique_keys,
)


def parse_json(body: bytes) -> Any:
    """Numbers become Decimal (never float), so amounts stay exact; NaN and duplicate keys
    are refused. JSON over HTTP is UTF-8 (RFC 8259)."""
    try:
        return _DECODER.decode(body.decode())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
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
    """Bytes from os.urandom, read 4 KiB at a time rather than a system call for every
    request id and operation id."""
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


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get(IDEMPOTENCY_KEY)
    if key is not None and not _KEY.fullmatch(key):
        raise InvalidInput(IDEMPOTENCY_KEY, "must be 1 to 255 printable ASCII characters")
    return key


def operation_id(request: web.Request) -> str:
    """The id the Idempotency-Key becomes (shared/ids.py: never one of the service's own
    ids); without a key the operation gets a fresh id."""
    key = idempotency_key(request)
    return random_uuid() if key is None else client_operation_id(key)


def page_limit(request: web.Request) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return PAGE_LIMIT_DEFAULT
    if not re.fullmatch(r"[0-9]{1,3}", raw) or not 1 <= int(raw) <= PAGE_LIMIT_MAX:
        raise InvalidInput("limit", f"must be a whole number from 1 to {PAGE_LIMIT_MAX}")
    return int(raw)


def cursor(request: web.Request, pattern: re.Pattern[str]) -> str | None:
    """The `cursor` query parameter: the `next_cursor` of a page, in the form `pattern`
    gives (api/openapi.py documents the same patterns)."""
    raw = request.query.get("cursor")
    if raw is not None and not pattern.fullmatch(raw):
        raise InvalidInput("cursor", "must be the next_cursor of a page")
    return raw


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_cursor(position: str | None) -> tuple[datetime, str] | None:
    """A (created_at, id) cursor as next_time_cursor wrote it."""
    if not position:
        return None
    micros, _, last_id = position.partition("_")
    return (EPOCH + timedelta(microseconds=int(micros)), last_id)


def next_time_cursor(rows: list[Any], limit: int) -> str | None:
    """The cursor of the page after `rows` (newest first by created_at, id), if full."""
    if len(rows) < limit:
        return None
    last = rows[-1]
    # Exact microseconds: a float would round some and skip or repeat rows.
    micros = (last["created_at"] - EPOCH) // timedelta(microseconds=1)
    return f"{micros}_{last['id']}"
