"""The tables, as SQLAlchemy metadata for Alembic. The hot path speaks SQL through asyncpg.

Every table is keyed by wallet id first, so it can later be distributed by wallet.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    Uuid,
    func,
    text,
)

metadata = MetaData(
    naming_convention={
        "pk": "%(table_name)s_pkey",
        "uq": "%(table_name)s_%(column_0_name)s_%(column_1_name)s_key",
        "ck": "%(table_name)s_%(constraint_name)s_check",
        "fk": "%(table_name)s_%(column_0_name)s_fkey",
        "ix": "%(table_name)s_%(column_0_name)s_idx",
    }
)

users = Table(
    "users",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("username", Text, nullable=False),
    Column("password_hash", Text, nullable=False),  # argon2id, with its parameters and salt
    Column("is_admin", Boolean, nullable=False, server_default=text("false")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    UniqueConstraint("username", name="users_username_key"),
)

# One row per refresh token issued (its JWT id). A token is used once: refreshing marks it
# used and issues the next of its family; a used or revoked token presented again revokes
# the whole family (someone replayed a stolen token).
refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id"), nullable=False),
    Column("family", Uuid, nullable=False),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("used_at", DateTime(timezone=True)),
    Column("revoked_at", DateTime(timezone=True)),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("refresh_tokens_family_idx", "family"),
)

wallets = Table(
    "wallets",
    metadata,
    Column("id", Uuid, primary_key=True, server_default=func.gen_random_uuid()),
    Column("balance", BigInteger, nullable=False, server_default="0"),
    # What the wallet's holds reserve of the balance: available = balance - held.
    Column("held", BigInteger, nullable=False, server_default="0"),
    # How many ledger rows the wallet has: the seq of its newest operation.
    Column("op_seq", BigInteger, nullable=False, server_default="0"),
    # The stream entry id of the newest operation its writer has applied.
    Column("applied_entry", Text),
    # The user who created it, when authentication is on; NULL for wallets created without.
    Column("owner_id", Uuid, ForeignKey("users.id")),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("balance >= 0", name="balance_not_negative"),
    CheckConstraint("op_seq >= 0", name="op_seq_not_negative"),
    CheckConstraint("held >= 0 AND held <= balance", name="held_within_balance"),
    Index("wallets_created_at_id_idx", "created_at", "id"),
    Index("wallets_owner_id_idx", "owner_id", "created_at", "id"),
)

operations = Table(
    "operations",
    metadata,
    Column("wallet_id", Uuid, ForeignKey("wallets.id"), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("kind", Text, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    Column("balance_after", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # A transfer's leg: the transfer and the other wallet. No foreign key to that wallet: its
    # check would lock the other writer's wallet row.
    Column("transfer_id", Uuid),
    Column("counterparty", Uuid),
    # A hold's rows (placed, captured, voided, expired) name it; held_after is what the
    # wallet's holds reserved after the row, so balance_after - held_after was available.
    Column("hold_id", Uuid),
    Column("held_after", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("wallet_id", "seq"),
    # An operation id is unique per wallet. The id leads, so the writer's lookup by id has
    # an index of its own, apart from the primary key's wallet_id prefix.
    UniqueConstraint("id", "wallet_id"),
    CheckConstraint(
        "kind IN ('DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN', 'TRANSFER_RETURN',"
        " 'HOLD', 'HOLD_CAPTURE', 'HOLD_VOID', 'HOLD_EXPIRE')",
        name="kind_known",
    ),
    # A capture paid to a wallet is a transfer's first leg.
    CheckConstraint(
        "CASE WHEN kind LIKE 'TRANSFER_%' THEN transfer_id IS NOT NULL AND counterparty IS NOT NULL"
        " WHEN kind = 'HOLD_CAPTURE' THEN (transfer_id IS NULL) = (counterparty IS NULL)"
        " ELSE transfer_id IS NULL AND counterparty IS NULL END",
        name="transfer_legs",
    ),
    CheckConstraint("(kind LIKE 'HOLD%') = (hold_id IS NOT NULL)", name="hold_rows"),
    CheckConstraint(
        "held_after >= 0 AND held_after <= balance_after", name="held_after_within_balance"
    ),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("status IN ('applied', 'rejected')", name="status_known"),
    CheckConstraint("balance_after >= 0", name="balance_after_not_negative"),
    CheckConstraint("(status = 'applied') = (reason IS NULL)", name="reason_only_when_rejected"),
)

# One row per transfer, written by the source's writer with the debit (or the refusal), and
# moved on by the destination's writer with the credit (completed) or its refusal
# (returning), then by the source's again when the amount is back (rejected). The owner of
# the source's shard resends what is in flight or returning until it is settled, each
# transfer with a backoff of its own (worker/transfers.py).
# Keyed by the source wallet first, like the other tables; no foreign keys to the wallets:
# a check would lock the other writer's wallet row.
transfers = Table(
    "transfers",
    metadata,
    Column("source_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("destination_id", Uuid, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    Column("reason", Text),
    # The source's balance after the debit, or when it was refused: the answer's `balance`.
    Column("source_balance_after", BigInteger, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The source's shard, whose owner resends what is unsettled (NULL only on rows settled
    # before the column came).
    Column("source_shard", Integer),
    # When the pending step (the credit, or the return) is next sent again if it has not
    # settled by then, and how often it has been sent again (the backoff).
    Column("resend_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("resends", Integer, nullable=False, server_default="0"),
    # When the pending step was last sent: while its wallet's stream still holds entries
    # from before then, it may be among them.
    Column("sent_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The return found no room in the source (the largest balance): it waits, resent.
    Column("return_waiting", Boolean, nullable=False, server_default=text("false")),
    PrimaryKeyConstraint("source_id", "id"),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint(
        "status IN ('in_flight', 'returning', 'completed', 'rejected')", name="status_known"
    ),
    CheckConstraint(
        "(status IN ('in_flight', 'completed')) = (reason IS NULL)", name="reason_when_not_moved"
    ),
    CheckConstraint("source_id <> destination_id", name="two_wallets"),
    CheckConstraint(
        "status NOT IN ('in_flight', 'returning') OR source_shard IS NOT NULL",
        name="unsettled_have_shard",
    ),
    Index("transfers_id_idx", "id"),
    Index(
        "transfers_unsettled_idx",
        "source_shard",
        "resend_at",
        postgresql_where=text("status IN ('in_flight', 'returning')"),
    ),
)

# One row per hold: placed by its wallet's writer, and ended by it (captured, voided or
# expired) once. The owner of the wallet's shard expires what is still held at expires_at
# (worker/expiries.py); a capture paid to a wallet starts the transfer `transfer_id`.
holds = Table(
    "holds",
    metadata,
    Column("wallet_id", Uuid, nullable=False),
    Column("id", Uuid, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("status", Text, nullable=False),
    Column("captured", BigInteger, nullable=False, server_default="0"),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    Column("shard", Integer, nullable=False),
    Column("transfer_id", Uuid),
    Column("destination_id", Uuid),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("wallet_id", "id"),
    CheckConstraint("amount > 0", name="amount_positive"),
    CheckConstraint("status IN ('held', 'captured', 'voided', 'expired')", name="status_known"),
    CheckConstraint(
        "captured >= 0 AND captured <= amount AND (captured > 0) = (status = 'captured')",
        name="captured_within_amount",
    ),
    CheckConstraint("(transfer_id IS NULL) = (destination_id IS NULL)", name="paid_to_a_wallet"),
    Index("holds_id_idx", "id", unique=True),
    Index("holds_wallet_id_idx", "wallet_id", "created_at", "id"),
    Index("holds_expiring_idx", "shard", "expires_at", postgresql_where=text("status = 'held'")),
)

# One row per shard that has ever had an owner. A worker that takes a shard over bumps its
# epoch; every batch it commits checks, in the same transaction, that the epoch is still the
# one it got, so a former owner that still thinks it owns the shard cannot commit.
shards = Table(
    "shards",
    metadata,
    Column("shard", Integer, primary_key=True, autoincrement=False),
    Column("epoch", BigInteger, nullable=False),
    Column("owner", Text, nullable=False),
    Column("acquired_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    CheckConstraint("shard >= 0", name="shard_not_negative"),
)


def sqlalchemy_url(database_url: str) -> str:
    """DATABASE_URL (postgresql://...) as SQLAlchemy's asyncpg dialect wants it."""
    scheme, sep, rest = database_url.partition("://")
    if not sep or scheme not in ("postgres", "postgresql", "postgresql+asyncpg"):
        raise ValueError("DATABASE_URL must be a postgresql:// URL")
    return f"postgresql+asyncpg://{rest}"
