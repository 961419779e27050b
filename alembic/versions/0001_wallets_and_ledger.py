"""wallets and their ledger

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "wallets",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("balance", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("op_seq", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("applied_entry", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("balance >= 0", name=op.f("wallets_balance_not_negative_check")),
        sa.CheckConstraint("op_seq >= 0", name=op.f("wallets_op_seq_not_negative_check")),
        sa.PrimaryKeyConstraint("id", name=op.f("wallets_pkey")),
    )
    op.create_index("wallets_created_at_id_idx", "wallets", ["created_at", "id"], unique=False)
    op.create_table(
        "operations",
        sa.Column("wallet_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "(status = 'applied') = (reason IS NULL)",
            name=op.f("operations_reason_only_when_rejected_check"),
        ),
        sa.CheckConstraint(
            "kind IN ('DEPOSIT', 'WITHDRAW')", name=op.f("operations_kind_known_check")
        ),
        sa.CheckConstraint(
            "status IN ('applied', 'rejected')", name=op.f("operations_status_known_check")
        ),
        sa.CheckConstraint("amount > 0", name=op.f("operations_amount_positive_check")),
        sa.CheckConstraint(
            "balance_after >= 0", name=op.f("operations_balance_after_not_negative_check")
        ),
        sa.ForeignKeyConstraint(
            ["wallet_id"], ["wallets.id"], name=op.f("operations_wallet_id_fkey")
        ),
        sa.PrimaryKeyConstraint("wallet_id", "seq", name=op.f("operations_pkey")),
        sa.UniqueConstraint("id", "wallet_id", name=op.f("operations_id_wallet_id_key")),
    )


def downgrade() -> None:
    op.drop_table("operations")
    op.drop_index("wallets_created_at_id_idx", table_name="wallets")
    op.drop_table("wallets")
