"""Accounts and access: registration, tokens, and the middleware that lets only a valid
bearer token through to /api/v1 and the live view when AUTH_ENABLED is on.

Passwords are hashed with argon2id (argon2-cffi's defaults), in a thread so that a login
does not stall the event loop, and at most PASSWORD_HASH_CONCURRENCY at once per process
(api/limits.py). Tokens are HS256 JWTs with issuer, audience, expiry and a type: a
short-lived access token, and a refresh token that is used once: refreshing spends it and
issues the next of its family; a spent or revoked token presented again revokes the whole
family (a stolen token was replayed). Logging out revokes the family. Registrations are
counted per client address and in all; failed logins per username and client address, and
per client address: never per username alone, so that nobody can lock another person out
(api/clients.py says who the client is). Nothing here logs a password or a token.
"""

from __future__ import annotations

import asyncio
import functools
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from aiohttp import web
from aiohttp.typedefs import Handler
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from api.appkeys import HASHING, KEYS, PG, REDIS, SETTINGS
from api.bodies import Credentials, RefreshToken, Tokens, User, decode, json_response
from api.clients import client_of
from api.inputs import read_json_object
from api.limits import count, uncount
from shared import errors
from shared.codec import format_time
from shared.connections import connection_from
from shared.settings import Settings

ALGORITHM = "HS256"
ACCESS, REFRESH = "access", "refresh"

auth_routes = web.RouteTableDef()
passwords = PasswordHasher()


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    admin: bool


USER = web.RequestKey("user", Principal)


@functools.cache
def _decoy_hash() -> str:
    """Verified against when the username is unknown, so both cases cost the same."""
    return passwords.hash(uuid.uuid4().hex)


def _token(settings: Settings, kind: str, subject: str, ttl: float, **claims: Any) -> str:
    now = datetime.now(UTC)
    payload = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": subject,
        "iat": now,
        "exp": now + timedelta(seconds=ttl),
        "typ": kind,
        **claims,
    }
    return jwt.encode(payload, settings.jwt_secret, algorithm=ALGORITHM)


def read_token(settings: Settings, token: str, kind: str) -> dict[str, Any]:
    """The token's claims if it is ours, unexpired and of `kind`; else Unauthorized."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[ALGORITHM],  # never "none", never one the token picks
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": ["iss", "aud", "sub", "iat", "exp", "typ"]},
        )
    except jwt.ExpiredSignatureError:
        raise errors.Unauthorized("The token has expired") from None
    except jwt.InvalidTokenError:
        raise errors.Unauthorized("The token is not valid") from None
    if claims["typ"] != kind:
        raise errors.Unauthorized(f"This is not a token of the {kind} kind")
    return claims


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Installed when AUTH_ENABLED is on (api/app.py)."""
    if request.path.startswith("/api/v1/") or request.path == "/api/live":
        settings = request.app[SETTINGS]
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise errors.Unauthorized("Send Authorization: Bearer <access token>")
        claims = read_token(settings, token.strip(), ACCESS)
        request[USER] = Principal(claims["sub"], bool(claims.get("adm")))
    return await handler(request)


def _require_enabled(request: web.Request) -> Settings:
    settings = request.app[SETTINGS]
    if not settings.auth_enabled:
        raise errors.AuthDisabled("This service runs without authentication (AUTH_ENABLED)")
    return settings


@auth_routes.post("/api/auth/users")
async def register(request: web.Request) -> web.Response:
    settings = _require_enabled(request)
    body = decode(await read_json_object(request), Credentials)
    username = body.username.lower()
    keys, redis = request.app[KEYS], request.app[REDIS]
    limits = (
        (
            keys.attempts("register-address", client_of(request)),
            settings.registration_address_limit,
        ),
        (keys.attempts("register", "all"), settings.registration_total_limit),
    )
    counted = await count(
        redis, limits, settings.registration_window, "Too many registrations; wait"
    )
    try:
        async with request.app[HASHING].slot():
            password_hash = await asyncio.to_thread(passwords.hash, body.password)
    except errors.Busy:
        await uncount(redis, counted)  # not an attempt: nothing was done
        raise
    async with connection_from(request.app[PG]) as conn:
        row = await conn.fetchrow(
            "INSERT INTO users (username, password_hash) VALUES ($1, $2)"
            " ON CONFLICT (username) DO NOTHING RETURNING id::text, username, created_at",
            username,
            password_hash,
        )
    if row is None:
        raise errors.UsernameTaken(f"Someone has the username {username!r}; choose another")
    return json_response(
        User(row["id"], row["username"], format_time(row["created_at"])), status=201
    )


async def _issue(
    conn: Any, settings: Settings, user_id: str, admin: bool, family: str
) -> web.Response:
    """A new access token, and a new refresh token of `family` recorded as unspent."""
    refresh_id = str(uuid.uuid4())
    await conn.execute(
        "INSERT INTO refresh_tokens (id, user_id, family, expires_at)"
        " VALUES ($1, $2, $3, now() + make_interval(secs => $4))",
        refresh_id,
        user_id,
        family,
        settings.refresh_token_ttl,
    )
    return json_response(
        Tokens(
            token_type="Bearer",  # noqa: S106 (the scheme, not a secret)
            access_token=_token(settings, ACCESS, user_id, settings.access_token_ttl, adm=admin),
            expires_in=int(settings.access_token_ttl),
            refresh_token=_token(
                settings, REFRESH, user_id, settings.refresh_token_ttl, jti=refresh_id, fam=family
            ),
            refresh_expires_in=int(settings.refresh_token_ttl),
        )
    )


def _verify(password_hash: str | None, password: str) -> bool:
    try:
        # An unknown user costs a hash all the same, so the two cannot be told apart.
        return passwords.verify(password_hash or _decoy_hash(), password) and bool(password_hash)
    except (VerificationError, InvalidHashError):
        return False


@auth_routes.post("/api/auth/token")
async def login(request: web.Request) -> web.Response:
    """Only failures count against the limits (a success takes its attempt back), and never
    per username alone: a stranger's failures from elsewhere cannot turn away the right
    password from an address that is not itself over its limit."""
    settings = _require_enabled(request)
    body = decode(await read_json_object(request), Credentials)
    username, password = body.username.lower(), body.password
    keys, redis, client = request.app[KEYS], request.app[REDIS], client_of(request)
    limits = (
        (keys.attempts("login", f"{client} {username}"), settings.login_user_limit),
        (keys.attempts("login-address", client), settings.login_address_limit),
    )
    counted = await count(
        redis, limits, settings.login_window, "Too many failed logins; wait before trying again"
    )
    try:
        async with connection_from(request.app[PG]) as conn:
            user = await conn.fetchrow(
                "SELECT id::text, password_hash, is_admin FROM users WHERE username = $1",
                username,
            )
        async with request.app[HASHING].slot():
            verified = await asyncio.to_thread(
                _verify, user["password_hash"] if user else None, password
            )
    except Exception:
        await uncount(redis, counted)  # never judged: a dependency down, or too busy
        raise
    if user is None or not verified:
        raise errors.InvalidCredentials("The username or the password is wrong")
    await uncount(redis, counted)  # a success counts against nobody
    async with connection_from(request.app[PG]) as conn:
        return await _issue(conn, settings, user["id"], user["is_admin"], str(uuid.uuid4()))


async def _refresh_claims(request: web.Request) -> tuple[Settings, dict[str, Any]]:
    settings = _require_enabled(request)
    body = decode(await read_json_object(request), RefreshToken)
    claims = read_token(settings, body.refresh_token, REFRESH)
    if not isinstance(claims.get("jti"), str) or not isinstance(claims.get("fam"), str):
        raise errors.Unauthorized("The token is not valid")
    return settings, claims


@auth_routes.post("/api/auth/token/refresh")
async def refresh(request: web.Request) -> web.Response:
    settings, claims = await _refresh_claims(request)
    async with connection_from(request.app[PG]) as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE refresh_tokens SET used_at = now() WHERE id = $1::uuid"
            " AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now()"
            " RETURNING user_id::text, family::text,"
            " (SELECT is_admin FROM users WHERE users.id = refresh_tokens.user_id)",
            claims["jti"],
        )
        if row is not None:
            return await _issue(conn, settings, row["user_id"], row["is_admin"], row["family"])
    # Spent or revoked already: whoever holds this family's tokens, none of them is trusted.
    await _revoke_family(request, claims["fam"])
    raise errors.Unauthorized("The refresh token was used or revoked; log in again")


async def _revoke_family(request: web.Request, family: str) -> None:
    async with connection_from(request.app[PG]) as conn:
        await conn.execute(
            "UPDATE refresh_tokens SET revoked_at = now()"
            " WHERE family = $1::uuid AND revoked_at IS NULL",
            family,
        )


@auth_routes.post("/api/auth/logout")
async def logout(request: web.Request) -> web.Response:
    """Revokes the refresh token and every token of its family; access tokens already
    issued run out by themselves (ACCESS_TOKEN_TTL)."""
    _, claims = await _refresh_claims(request)
    await _revoke_family(request, claims["fam"])
    return web.Response(status=204)
