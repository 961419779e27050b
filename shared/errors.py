"""The domain errors: what a client can cause or run into, independent of HTTP."""

from __future__ import annotations

from typing import Any


class WalletError(Exception):
    """Base of every error a client sees; `extra` is added to the problem document."""

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
