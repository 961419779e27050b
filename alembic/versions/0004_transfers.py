"""transfers between wallets: the transfers table and the ledger's transfer legs

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS_BEFORE = "kind IN ('DEPOSIT', 'WITHDRAW')"
KINDS = "kind IN ('DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN', 'TRANSFER_RETURN')"


def upgrade() -> None:
    op.create_table(
        "transfers",
        sa.Column("source_id", sa.Uuid(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("destination_id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("source_balance_after", sa.BigInteger(), nullable=False),
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
        sa.CheckConstraint("amount > 0", name=op.f("transfers_amount_positive_check")),
        sa.CheckConstraint(
            "status IN ('in_flight', 'returning', 'completed', 'rejected')",
            name=op.f("transfers_status_known_check"),
        ),
        sa.CheckConstraint(
            "(status IN ('in_flight', 'completed')) = (reason IS NULL)",
            name=op.f("transfers_reason_when_not_moved_check"),
        ),
        sa.CheckConstraint("source_id <> destination_id", name=op.f("transfers_two_wallets_check")),
        sa.PrimaryKeyConstraint("source_id", "id", name=op.f("transfers_pkey")),
    )
    op.create_index("transfers_id_idx", "transfers", ["id"], unique=False)
    op.create_index(
        "transfers_unsettled_idx",
        "transfers",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("status IN ('in_flight', 'returning')"),
    )
    op.add_column("operations", sa.Column("transfer_id", sa.Uuid(), nullable=True))
    op.add_column("operations", sa.Column("counterparty", sa.Uuid(), nullable=True))
    op.drop_constraint(op.f("operations_kind_known_check"), "operations", type_="check")
    op.create_check_constraint(op.f("operations_kind_known_check"), "operations", KINDS)
    op.create_check_constraint(
        op.f("operations_transfer_legs_check"),
        "operations",
        "(kind LIKE 'TRANSFER_%') = (transfer_id IS NOT NULL AND counterparty IS NOT NULL)",
    )


def downgrade() -> None:
    op.execute("DELETE FROM operations WHERE kind LIKE 'TRANSFER_%'")
    op.drop_constraint(op.f("operations_transfer_legs_check"), "operations", type_="check")
    op.drop_constraint(op.f("operations_kind_known_check"), "operations", type_="check")
    op.create_check_constraint(op.f("operations_kind_known_check"), "operations", KINDS_BEFORE)
    op.drop_column("operations", "counterparty")
    op.drop_column("operations", "transfer_id")
    op.drop_index("transfers_unsettled_idx", table_name="transfers")
    op.drop_index("transfers_id_idx", table_name="transfers")
    op.drop_table("transfers")
