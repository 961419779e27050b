"""The API's SQL: wallet creation and reads. The API never writes a balance."""

from __future__ import annotations

from datetime import datetime
from typing import Any

WALLET_COLUMNS = "id::text, balance, held, created_at, updated_at, owner_id::text"
OPERATION_COLUMNS = (
    "wallet_id::text, id::text, seq, kind, amount, status, reason, balance_after, created_at,"
    " transfer_id::text, counterparty::text, hold_id::text, held_after"
)
# A hold, its wallet's balance and held amount now, and the transfer of a capture paid to a
# wallet.
HOLD_COLUMNS = (
    "h.id::text, h.wallet_id::text, h.amount, h.status, h.captured, h.expires_at, h.created_at,"
    " h.updated_at, h.transfer_id::text, h.destination_id::text, w.balance, w.held,"
    " t.status AS transfer_status"
)
HOLD_FROM = (
    "holds h JOIN wallets w ON w.id = h.wallet_id"
    " LEFT JOIN transfers t ON t.source_id = h.wallet_id AND t.id = h.transfer_id"
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


async def get_hold(conn: Any, hold_id: str) -> Any:
    return await conn.fetchrow(f"SELECT {HOLD_COLUMNS} FROM {HOLD_FROM} WHERE h.id = $1", hold_id)


async def list_holds(
    conn: Any, wallet_id: str, status: str | None, limit: int, after: tuple[datetime, str] | None
) -> list[Any]:
    """The wallet's holds, newest first, only those in `status` unless it is None; `after`
    is the (created_at, id) of the last hold of the previous page."""
    args: list[Any] = [wallet_id, limit]
    conditions = ["h.wallet_id = $1"]
    if status is not None:
        args.append(status)
        conditions.append(f"h.status = ${len(args)}")
    if after is not None:
        args += after
        conditions.append(
            f"(h.created_at, h.id) < (${len(args) - 1}::timestamptz, ${len(args)}::uuid)"
        )
    return await conn.fetch(  # type: ignore[no-any-return]
        f"SELECT {HOLD_COLUMNS} FROM {HOLD_FROM} WHERE {' AND '.join(conditions)}"
        " ORDER BY h.created_at DESC, h.id DESC LIMIT $2",
        *args,
    )


async def wallet_exists(conn: Any, wallet_id: str) -> bool:
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM wallets WHERE id = $1)", wallet_id))
