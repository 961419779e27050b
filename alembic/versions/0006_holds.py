"""holds: funds reserved on a wallet, captured, voided or expired later

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KINDS_BEFORE = "kind IN ('DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN', 'TRANSFER_RETURN')"
KINDS = (
    "kind IN ('DEPOSIT', 'WITHDRAW', 'TRANSFER_OUT', 'TRANSFER_IN', 'TRANSFER_RETURN',"
    " 'HOLD', 'HOLD_CAPTURE', 'HOLD_VOID', 'HOLD_EXPIRE')"
)
LEGS_BEFORE = "(kind LIKE 'TRANSFER_%') = (transfer_id IS NOT NULL AND counterparty IS NOT NULL)"
# A transfer's legs name the transfer and the other wallet; so does a capture paid to a
# wallet; nothing else does.
LEGS = (
    "CASE WHEN kind LIKE 'TRANSFER_%' THEN transfer_id IS NOT NULL AND counterparty IS NOT NULL"
    " WHEN kind = 'HOLD_CAPTURE' THEN (transfer_id IS NULL) = (counterparty IS NULL)"
    " ELSE transfer_id IS NULL AND counterparty IS NULL END"
)
HELD = sa.text("status = 'held'")


def upgrade() -> None:
    op.add_column("wallets", sa.Column("held", sa.BigInteger(), server_default="0", nullable=False))
    op.create_check_constraint(
        op.f("wallets_held_within_balance_check"), "wallets", "held >= 0 AND held <= balance"
    )
    op.add_column("operations", sa.Column("hold_id", sa.Uuid(), nullable=True))
    op.add_column(
        "operations", sa.Column("held_after", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.drop_constraint(op.f("operations_kind_known_check"), "operations", type_="check")
    op.create_check_constraint(op.f("operations_kind_known_check"), "operations", KINDS)
    op.drop_constraint(op.f("operations_transfer_legs_check"), "operations", type_="check")
    op.create_check_constraint(op.f("operations_transfer_legs_check"), "operations", LEGS)
    op.create_check_constraint(
        op.f("operations_hold_rows_check"),
        "operations",
        "(kind LIKE 'HOLD%') = (hold_id IS NOT NULL)",
    )
    op.create_check_constraint(
        op.f("operations_held_after_within_balance_check"),
        "operations",
        "held_after >= 0 AND held_after <= balance_after",
    )
    op.create_table(
        "holds",
        sa.Column("wallet_id", sa.Uuid(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("captured", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("shard", sa.Integer(), nullable=False),
        sa.Column("transfer_id", sa.Uuid(), nullable=True),
        sa.Column("destination_id", sa.Uuid(), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.CheckConstraint("amount > 0", name=op.f("holds_amount_positive_check")),
        sa.CheckConstraint(
            "status IN ('held', 'captured', 'voided', 'expired')",
            name=op.f("holds_status_known_check"),
        ),
        sa.CheckConstraint(
            "captured >= 0 AND captured <= amount AND (captured > 0) = (status = 'captured')",
            name=op.f("holds_captured_within_amount_check"),
        ),
        sa.CheckConstraint(
            "(transfer_id IS NULL) = (destination_id IS NULL)",
            name=op.f("holds_paid_to_a_wallet_check"),
        ),
        sa.PrimaryKeyConstraint("wallet_id", "id", name=op.f("holds_pkey")),
    )
    op.create_index("holds_id_idx", "holds", ["id"], unique=True)
    op.create_index("holds_wallet_id_idx", "holds", ["wallet_id", "created_at", "id"], unique=False)
    op.create_index(
        "holds_expiring_idx", "holds", ["shard", "expires_at"], unique=False, postgresql_where=HELD
    )


def downgrade() -> None:
    op.drop_table("holds")
    op.execute("DELETE FROM operations WHERE kind LIKE 'HOLD%'")
    op.drop_constraint(
        op.f("operations_held_after_within_balance_check"), "operations", type_="check"
    )
    op.drop_constraint(op.f("operations_hold_rows_check"), "operations", type_="check")
    op.drop_constraint(op.f("operations_transfer_legs_check"), "operations", type_="check")
    op.create_check_constraint(op.f("operations_transfer_legs_check"), "operations", LEGS_BEFORE)
    op.drop_constraint(op.f("operations_kind_known_check"), "operations", type_="check")
    op.create_check_constraint(op.f("operations_kind_known_check"), "operations", KINDS_BEFORE)
    op.drop_column("operations", "held_after")
    op.drop_column("operations", "hold_id")
    op.drop_constraint(op.f("wallets_held_within_balance_check"), "wallets", type_="check")
    op.drop_column("wallets", "held")
