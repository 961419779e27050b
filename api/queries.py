"""The API's SQL: wallet creation and reads. The API never writes a balance."""

from __future__ import annotations

from datetime import datetime
from typing import Any

WALLET_COLUMNS = "id::text, balance, created_at, updated_at, owner_id::text"
OPERATION_COLUMNS = (
    "wallet_id::text, id::text, seq, kind, amount, status, reason, balance_after, created_at,"
    " transfer_id::text, counterparty::text"
)
TRANSFER_COLUMNS = (
    "id::text, source_id::text, destination_id::text, amount, status, reason,"
    " source_balance_after, created_at"
)


async def create_wallet(conn: Any, owner_id: str | None) -> Any:
    return await conn.fetchrow(
        f"INSERT INTO wallets (owner_id) VALUES ($1) RETURNING {WALLET_COLUMNS}", owner_id
    )


async def get_wallet(conn: Any, wallet_id: str) -> Any:
    return await conn.fetchrow(f"SELECT {WALLET_COLUMNS} FROM wallets WHERE id = $1", wallet_id)


async def list_wallets(
    conn: Any, limit: int, after: tuple[datetime, str] | None, owner_id: str | None
) -> list[Any]:
    """Newest first; `after` is the (created_at, id) of the last wallet of the previous page;
    only `owner_id`'s wallets, unless it is None."""
    conditions: list[str] = []
    args: list[Any] = [limit]
    if owner_id is not None:
        args.append(owner_id)
        conditions.append(f"owner_id = ${len(args)}::uuid")
    if after is not None:
        args += after
        conditions.append(f"(created_at, id) < (${len(args) - 1}::timestamptz, ${len(args)}::uuid)")
    where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
    return await conn.fetch(  # type: ignore[no-any-return]
        f"SELECT {WALLET_COLUMNS} FROM wallets {where} ORDER BY created_at DESC, id DESC LIMIT $1",
        *args,
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


async def get_transfer(conn: Any, transfer_id: str) -> Any:
    return await conn.fetchrow(
        f"SELECT {TRANSFER_COLUMNS} FROM transfers WHERE id = $1", transfer_id
    )


async def wallet_exists(conn: Any, wallet_id: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM wallets WHERE id = $1)", wallet_id))
