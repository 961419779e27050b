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
    PrimaryKeyConstraint("wallet_id", "seq"),
    # An operation id is unique per wallet. The id leads, so the writer's lookup by id has
    # an index of its own, apart from the primary key's wallet_id prefix.
    UniqueConstraint("id", "wallet_id"),
    CheckConstraint(
        "kind IN ('DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN', 'TRANSFER_RETURN')",
        name="kind_known",
    ),
    CheckConstraint(
        "(kind LIKE 'TRANSFER_%') = (transfer_id IS NOT NULL AND counterparty IS NOT NULL)",
        name="transfer_legs",
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
