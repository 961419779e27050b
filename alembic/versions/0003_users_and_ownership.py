"""users, their refresh tokens, and wallet ownership

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("username", sa.Text(), nullable=False),
        sa.Column("password_hash", sa.Text(), nullable=False),
        sa.Column("is_admin", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("users_pkey")),
        sa.UniqueConstraint("username", name=op.f("users_username_key")),
    )
    op.create_table(
        "refresh_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("family", sa.Uuid(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name=op.f("refresh_tokens_user_id_fkey")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("refresh_tokens_pkey")),
    )
    op.create_index("refresh_tokens_family_idx", "refresh_tokens", ["family"], unique=False)
    op.add_column("wallets", sa.Column("owner_id", sa.Uuid(), nullable=True))
    op.create_foreign_key(op.f("wallets_owner_id_fkey"), "wallets", "users", ["owner_id"], ["id"])
    op.create_index(
        "wallets_owner_id_idx", "wallets", ["owner_id", "created_at", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("wallets_owner_id_idx", table_name="wallets")
    op.drop_constraint(op.f("wallets_owner_id_fkey"), "wallets", type_="foreignkey")
    op.drop_column("wallets", "owner_id")
    op.drop_index("refresh_tokens_family_idx", table_name="refresh_tokens")
    op.drop_table("refresh_tokens")
    op.drop_table("users")
