"""All configuration, read from the environment in one place.

Each variable is converted by its field's type (int, float, bool, str, or one of them
`| None`); a value of the wrong type, a setting out of range or an annotation with no
converter is a SettingsError naming the variable and what it expected, which the
processes print as one line before they exit 1 (`Settings.from_env_or_exit`). An empty
variable counts as unset: the field keeps its default.

The secrets can come from files instead (Docker and Kubernetes secrets): JWT_SECRET_FILE,
DATABASE_URL_FILE and REDIS_URL_FILE name a file whose content, less a trailing newline, is
the value. Setting both X and X_FILE is an error, as is a file that cannot be read.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import types
import typing
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple, Self

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Values copied from an example and never changed: refused as secrets and as the password
# in DATABASE_URL.
PLACEHOLDER = re.compile(
    r"change[-_ ]?me|replace[-_ ]?me|placeholder|example|your[-_ ]?secret", re.I
)


class SettingsError(ValueError):
    """The environment does not make valid settings: a variable missing, of the wrong type
    or out of range, or a field whose annotation no converter reads."""


def _masked(url: str) -> str:
    return re.sub(r"://([^:/@]*):[^@]*@", r"://\1:***@", url)


def ip_networks(text: str) -> tuple[IPNetwork, ...]:
    """FORWARDED_ALLOW_IPS read: addresses or networks (CIDR), comma-separated; `*` is every
    address. Raises ValueError."""
    found: list[IPNetwork] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "*":
            found += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
        elif part:
            found.append(ipaddress.ip_network(part, strict=False))
    return tuple(found)


def _integer(raw: str) -> int:
    return int(raw.strip())


def _number(raw: str) -> float:
    value = float(raw.strip())
    if not math.isfinite(value):  # nan passes every comparison check() makes
        raise ValueError(raw)
    return value


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


class _Converter(NamedTuple):
    convert: Callable[[str], Any]
    expected: str  # for the error message: "expected <this>"


_CONVERTERS: dict[type, _Converter] = {
    int: _Converter(_integer, "an integer"),
    float: _Converter(_number, "a finite number"),
    bool: _Converter(_flag, "true or false (or 1/0, yes/no, on/off)"),
    str: _Converter(str, "text"),
}


def _converters(cls: type) -> dict[str, _Converter]:
    """Each field's converter, from its resolved annotation (`X | None` read as X)."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        raise SettingsError(f"{cls.__name__}: an annotation does not resolve ({e})") from e
    found = {}
    for f in fields(cls):
        annotation = hints[f.name]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(inner) == 1:  # X | None: empty or unset keeps the default
                annotation = inner[0]
        converter = _CONVERTERS.get(annotation)
        if converter is None:
            supported = ", ".join(t.__name__ for t in _CONVERTERS)
            given = hints[f.name]
            shown = given.__qualname__ if isinstance(given, type) else repr(given)
            raise SettingsError(
                f"{f.name.upper()}: no converter for its annotation {shown}"
                f" (supported: {supported}, and each of them | None)"
            )
        found[f.name] = converter
    return found


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# The settings that may come from a file, X_FILE, instead of the variable X.
FROM_FILES = ("DATABASE_URL", "REDIS_URL", "JWT_SECRET")


def _with_secret_files(env: Mapping[str, str]) -> Mapping[str, str]:
    """`env` with each X_FILE of FROM_FILES read into X."""
    read: dict[str, str] = {}
    for name in FROM_FILES:
        path = env.get(f"{name}_FILE")
        if not path:
            continue
        if env.get(name):
            raise SettingsError(f"set {name} or {name}_FILE, not both")
        try:
            with open(path, encoding="utf-8") as f:
                content = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise SettingsError(f"{name}_FILE={path}: cannot read it ({why})") from None
        value = content.removesuffix("\n").removesuffix("\r")
        if not value:
            raise SettingsError(f"{name}_FILE={path}: the file is empty")
        read[name] = value
    return {**env, **read} if read else env


@dataclass(frozen=True)
class Settings:
    database_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    host: str = "0.0.0.0"  # noqa: S104 - a service listens on all interfaces unless told otherwise
    port: int = 8000
    # Let several API processes listen on one host and port (SO_REUSEPORT); the kernel spreads
    # the connections among them.
    reuse_port: bool = False
    # Fixed for a deployment: a wallet's shard is derived from it, so changing it re-homes wallets.
    shard_count: int = 64
    redis_key_prefix: str = "wallet"
    # REDIS_URL names nodes of a Redis Cluster (7.0 or newer), comma-separated, from which the
    # rest is found.
    redis_cluster: bool = False
    # 0: processes start, and answer 503, while PostgreSQL is still down.
    pg_pool_min: int = 0
    pg_pool_max: int = 10
    redis_pool_max: int = 64
    # How long a request waits for the writer before it answers 202 with the operation's URL,
    # and the most a request waits on PostgreSQL (a statement, a new connection) before it
    # answers 503.
    reply_timeout: float = 5.0
    # Operations queued on one wallet beyond which new ones get 503 with Retry-After.
    wallet_queue_limit: int = 10_000
    # Operations queued in one shard (all its wallets together) beyond which new ones get 503.
    shard_queue_limit: int = 100_000
    # At most this many operations go into one transaction.
    batch_max: int = 1000
    # At most this many wallets are read in one batch; the others wait for the next round.
    batch_wallets_max: int = 256
    # Group commit needs no timer: a worker commits what it has as soon as the previous batch
    # is committed, and whatever arrived meanwhile is the next batch. Above 0, a busy worker
    # starts a batch no sooner than this many seconds after the previous one started (after
    # a batch of several operations, not a full one): fewer, fuller commits for up to this
    # much more latency (docs/decisions.md).
    batch_interval: float = 0.0
    # A worker counts as alive, and keeps its shards, this long after it last renewed them; a
    # worker that stops renewing (crashed, paused, cut off) loses its shards after it.
    worker_lease_ttl: float = 5.0
    # After SIGTERM a worker finishes its batch and hands its shards back; past this many
    # seconds (a dependency down mid-batch) it exits anyway.
    worker_stop_grace: float = 10.0
    # How often a worker reads its shards' dirty sets again, in case a wake-up was lost with a
    # worker that died holding it.
    worker_rescan_interval: float = 10.0
    # A transfer still unsettled (in flight, or on its way back) this many seconds after its
    # last step has its next step sent again by the owner of its source's shard, at that
    # owner's next rescan: for a step lost with Redis.
    transfer_resend_after: float = 5.0
    # A hold placed without `expires_in` expires this many seconds later; none may ask for
    # more than HOLD_EXPIRES_MAX.
    hold_expires_default: int = 7 * 24 * 3600
    hold_expires_max: int = 30 * 24 * 3600
    # Where a worker serves GET /metrics (Prometheus); 0 turns it off.
    worker_metrics_port: int = 9100
    # Bearer tokens on every /api/v1 route, and wallets that belong to their creator. Off by
    # default, so that a local run keeps the open API; the shipped compose file turns it on.
    auth_enabled: bool = False
    # The HS256 key of the tokens: at least 32 bytes, required when auth is enabled. Changing
    # it ends every session (tokens signed with the old key are refused).
    jwt_secret: str = field(default="", repr=False)
    jwt_issuer: str = "wallet-service"
    jwt_audience: str = "wallet-api"
    access_token_ttl: float = 900.0
    refresh_token_ttl: float = 14 * 24 * 3600.0
    # Login attempts (POST /api/auth/token) per username and per client address in one
    # window; past them, 429 until the window ends.
    login_user_limit: int = 10
    login_address_limit: int = 50
    login_window: float = 60.0
    # Log lines at this level and above: DEBUG, INFO, WARNING, ERROR or CRITICAL.
    log_level: str = "INFO"
    # The share of requests the API logs an access line for (at INFO: method, route template,
    # status, duration, request id): 0 none, 1 every one, 0.01 one in a hundred.
    access_log_sample: float = 0.0
    # Registrations (POST /api/auth/users) per client address, and in all, in one window;
    # past either, 429 until the window ends.
    registration_address_limit: int = 10
    registration_total_limit: int = 1000
    registration_window: float = 3600.0
    # argon2 hashes (registration, login) at once per API process, each about 64 MiB and a
    # few cores for a tenth of a second; this many more wait for a slot, the rest get 503.
    password_hash_concurrency: int = 2
    password_hash_queue: int = 16
    # Peers (addresses or CIDR networks, comma-separated; `*`: any) whose X-Forwarded-For
    # names the client, as uvicorn's and gunicorn's forwarded-allow-ips. Empty: none, the
    # TCP peer is the client.
    forwarded_allow_ips: str = ""
    # Where the API serves GET /metrics, apart from PORT (not published by compose); taken,
    # the next free port above it. 0 turns it off.
    api_metrics_port: int = 9101

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr)
        return (
            f"Settings(database_url={_masked(self.database_url)!r}, "
            f"redis_url={_masked(self.redis_url)!r}, {shown})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """The settings in `environ` (os.environ by default), each converted by its field's
        type, then `overrides`; raises SettingsError."""
        env = _with_secret_files(os.environ if environ is None else environ)
        converters = _converters(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            name, raw = f.name.upper(), env.get(f.name.upper())
            if raw is None or raw == "":
                continue
            converter = converters[f.name]
            try:
                values[f.name] = converter.convert(raw)
            except ValueError:
                shown = repr(raw) if f.repr else "(hidden)"
                raise SettingsError(f"{name}={shown}: expected {converter.expected}") from None
        values.update(overrides)
        missing = [n for n in ("database_url", "redis_url") if not values.get(n)]
        if missing:
            raise SettingsError(f"set {', '.join(n.upper() for n in missing)} in the environment")
        settings = cls(**values)
        settings.check()
        return settings

    @classmethod
    def from_env_or_exit(cls, program: str) -> Self:
        """from_env() for a process's start: settings that are not valid end the process with
        one line on stderr and exit status 1 (for a health check: unhealthy)."""
        try:
            return cls.from_env()
        except SettingsError as e:
            raise SystemExit(f"{program}: invalid settings: {e}") from None

    def to_env(self) -> dict[str, str]:
        """The environment that from_env() reads back as these settings."""
        return {
            f.name.upper(): "" if getattr(self, f.name) is None else str(getattr(self, f.name))
            for f in fields(self)
        }

    def check(self) -> None:
        positive = (
            "port",
            "shard_count",
            "pg_pool_max",
            "redis_pool_max",
            "reply_timeout",
            "wallet_queue_limit",
            "shard_queue_limit",
            "batch_max",
            "batch_wallets_max",
            "worker_lease_ttl",
            "worker_stop_grace",
            "access_token_ttl",
            "refresh_token_ttl",
            "login_user_limit",
            "login_address_limit",
            "login_window",
            "registration_address_limit",
            "registration_total_limit",
            "registration_window",
            "password_hash_concurrency",
            "worker_rescan_interval",
            "transfer_resend_after",
            "hold_expires_default",
            "hold_expires_max",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name.upper()} must be greater than 0")
        if self.auth_enabled and len(self.jwt_secret.encode()) < 32:
            raise SettingsError("AUTH_ENABLED needs JWT_SECRET of at least 32 bytes")
        if self.auth_enabled and PLACEHOLDER.search(self.jwt_secret):
            raise SettingsError(
                "JWT_SECRET is a placeholder; set a random one (openssl rand -hex 48)"
            )
        password = re.search(r"://[^:/@]*:([^@]*)@", self.database_url)
        if password and PLACEHOLDER.search(urllib.parse.unquote(password[1])):
            raise SettingsError("DATABASE_URL's password is a placeholder; choose a real one")
        for name in ("worker_metrics_port", "api_metrics_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise SettingsError(f"{name.upper()} must be from 0 to 65535")
        if self.api_metrics_port and self.api_metrics_port == self.port:
            raise SettingsError("API_METRICS_PORT must differ from PORT (or be 0: off)")
        if self.hold_expires_default > self.hold_expires_max:
            raise SettingsError("HOLD_EXPIRES_DEFAULT must not exceed HOLD_EXPIRES_MAX")
        if self.password_hash_queue < 0:
            raise SettingsError("PASSWORD_HASH_QUEUE must not be negative")
        try:
            ip_networks(self.forwarded_allow_ips)
        except ValueError as e:
            raise SettingsError(f"FORWARDED_ALLOW_IPS: {e}") from None
        if self.batch_interval < 0:
            raise SettingsError("BATCH_INTERVAL must not be negative")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
        if not 0 <= self.access_log_sample <= 1:
            raise SettingsError("ACCESS_LOG_SAMPLE must be from 0 to 1")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.redis_key_prefix):
            raise SettingsError("REDIS_KEY_PREFIX may hold only letters, digits, '_', '.', '-'")
