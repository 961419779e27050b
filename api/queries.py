"""The API's SQL: wallet creation and reads. The API never writes a balance."""

from __future__ import annotations

from datetime import datetime
from typing import Any

WALLET_COLUMNS = "id::text, balance, created_at, updated_at"
OPERATION_COLUMNS = (
    "wallet_id::text, id::text, seq, kind, amount, status, reason, balance_after, created_at"
)


async def create_wallet(conn: Any) -> Any:
    return await conn.fetchrow(f"INSERT INTO wallets DEFAULT VALUES RETURNING {WALLET_COLUMNS}")


async def get_wallet(conn: Any, wallet_id: str) -> Any:
    return await conn.fetchrow(f"SELECT {WALLET_COLUMNS} FROM wallets WHERE id = $1", wallet_id)


async def list_wallets(conn: Any, limit: int, after: tuple[datetime, str] | None) -> list[Any]:
    """Newest first; `after` is the (created_at, id) of the last wallet of the previous page."""
    if after is None:
        return await conn.fetch(  # type: ignore[no-any-return]
            f"SELECT {WALLET_COLUMNS} FROM wallets ORDER BY created_at DESC, id DESC LIMIT $1",
            limit,
        )
    return await conn.fetch(  # type: ignore[no-any-return]
        f"""SELECT {WALLET_COLUMNS} FROM wallets
            WHERE (created_at, id) < ($2::timestamptz, $3::uuid)
            ORDER BY created_at DESC, id DESC LIMIT $1""",
        limit,
        *after,
    )


async def list_operations(conn: Any, wallet_id: str, limit: int, before_seq: int | None) -> Any:
    """The wallet's ledger, newest first, from just before `before_seq`."""
    return await conn.fetch(
        f"""SELECT {OPERATION_COLUMNS} FROM operations
            WHERE wallet_id = $1 AND seq < $3
            ORDER BY seq DESC LIMIT $2""",
        wallet_id,
        limit,
        before_seq if before_seq is not None else 2**63 - 1,
    )


async def get_operation(conn: Any, wallet_id: str, op_id: str) -> Any:
    return await conn.fetchrow(
        f"SELECT {OPERATION_COLUMNS} FROM operations WHERE wallet_id = $1 AND id = $2",
        wallet_id,
        op_id,
    )
