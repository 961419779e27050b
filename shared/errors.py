"""The domain errors: what a client can cause or run into, independent of HTTP."""

from __future__ import annotations

from typing import Any


class WalletError(Exception):
    """Base of every error a client sees; `extra` is added to the problem document, and
    `headers` to the response."""

    headers: dict[str, str] = {}  # noqa: RUF012 - never mutated

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class InvalidInput(WalletError):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}", errors=[{"field": field, "reason": reason}])
        self.field = field
        self.reason = reason


class WalletNotFound(WalletError):
    pass


class OperationNotFound(WalletError):
    pass


class TransferNotFound(WalletError):
    pass


class HoldNotFound(WalletError):
    pass


class HoldNotActive(WalletError):
    """Captured, voided or expired already: the problem's `hold` shows how it ended."""


class InsufficientFunds(WalletError):
    pass


class BalanceLimitExceeded(WalletError):
    pass


class IdempotencyKeyReused(WalletError):
    pass


class QueueFull(WalletError):
    pass


class DependencyUnavailable(WalletError):
    pass


class Unauthorized(WalletError):
    """No token, or one that is not valid (RFC 6750: error="invalid_token")."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.headers = {
            "WWW-Authenticate": f'Bearer realm="wallet-api", error="invalid_token", '
            f'error_description="{detail}"'
        }


class InvalidCredentials(WalletError):
    pass


class UsernameTaken(WalletError):
    pass


class TooManyAttempts(WalletError):
    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(retry_after)}


class Busy(WalletError):
    """More of an expensive step (a password hash) at once than the process takes."""

    headers = {"Retry-After": "1"}  # noqa: RUF012 - never mutated


class AuthDisabled(WalletError):
    pass


class PageNotFound(WalletError):
    pass
