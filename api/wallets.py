"""Wallets: create, list, read; and who may see which wallet."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from api import queries
from api.appkeys import KNOWN_WALLETS, OWNERS, PG, SETTINGS
from api.auth import USER
from api.bodies import WalletPage, json_response
from api.inputs import (
    WALLETS_CURSOR,
    cursor,
    next_time_cursor,
    page_limit,
    read_json_object,
    time_cursor,
    wallet_id_from_path,
)
from api.render import wallet_body
from shared import errors
from shared.connections import connection_from

REMEMBERED = 100_000  # wallets per cache of an API process
routes = web.RouteTableDef()


@routes.post("/api/v1/wallets")
async def create_wallet(request: web.Request) -> web.Response:
    if request.can_read_body:
        body = await read_json_object(request)
        if body:
            raise errors.InvalidInput(sorted(body)[0], "is not a known field")
    user = request.get(USER)
    async with connection_from(request.app[PG]) as conn:
        row = await queries.create_wallet(conn, user.user_id if user else None)
    return json_response(
        wallet_body(row), status=201, headers={"Location": f"/api/v1/wallets/{row['id']}"}
    )


@routes.get("/api/v1/wallets")
async def list_wallets(request: web.Request) -> web.Response:
    limit = page_limit(request)
    after = time_cursor(cursor(request, WALLETS_CURSOR))
    async with connection_from(request.app[PG]) as conn:
        rows = await queries.list_wallets(conn, limit, after, owner_filter(request))
    next_cursor = next_time_cursor(rows, limit)
    return json_response(WalletPage([wallet_body(r) for r in rows], next_cursor))


@routes.get("/api/v1/wallets/{wallet_id}")
async def get_wallet(request: web.Request) -> web.Response:
    wallet_id = wallet_id_from_path(request.match_info["wallet_id"])
    async with connection_from(request.app[PG]) as conn:
        row = await queries.get_wallet(conn, wallet_id)
    if row is None or not may_see(request, row["owner_id"]):
        raise errors.WalletNotFound(f"No wallet has the id {wallet_id}")
    return json_response(wallet_body(row))


def owner_filter(request: web.Request) -> str | None:
    """Whose wallets the request may list: the user's, or everyone's (None)."""
    if not request.app[SETTINGS].auth_enabled:  # request.get() costs a KeyError
        return None
    user = request.get(USER)
    return None if user is None or user.admin else user.user_id


def may_see(request: web.Request, owner_id: str | None) -> bool:
    scope = owner_filter(request)
    return scope is None or scope == owner_id


async def ensure_visible(request: web.Request, wallet_id: str, named: str = "") -> None:
    """With authentication on, another user's wallet does not exist for this request: 404,
    the same answer as for no wallet at all. A wallet's owner never changes, so each API
    process remembers the owners it has looked up. `named`: which wallet of the request it
    is, for the problem's detail."""
    scope = owner_filter(request)
    if scope is None:
        return
    owners = request.app[OWNERS]
    owner = owners.get(wallet_id)
    if owner is None:
        async with connection_from(request.app[PG]) as conn:
            row = await queries.get_wallet(conn, wallet_id)
        owner = row["owner_id"] if row else None
        if owner is not None:
            remember(owners, wallet_id, owner)
    if owner != scope:
        raise errors.WalletNotFound(f"No wallet has the id {wallet_id}{named}")


async def ensure_exists(request: web.Request, wallet_id: str, named: str = "") -> None:
    """404 unless the wallet exists, whoever owns it. Wallets are never deleted, so each API
    process remembers those it has found."""
    known = request.app[KNOWN_WALLETS]
    if wallet_id in known:
        return
    async with connection_from(request.app[PG]) as conn:
        if not await queries.wallet_exists(conn, wallet_id):
            raise errors.WalletNotFound(f"No wallet has the id {wallet_id}{named}")
    remember(known, wallet_id, None)


def remember(cache: dict[str, Any], key: str, value: Any) -> None:
    """Into a cache of at most REMEMBERED entries, the oldest going first."""
    if len(cache) >= REMEMBERED:
        del cache[next(iter(cache))]
    cache[key] = value
