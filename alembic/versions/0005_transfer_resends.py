"""transfers: the source's shard, a resend schedule per transfer, returns that wait

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from shared.keys import KeySpace
from shared.settings import Settings

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNSETTLED = sa.text("status IN ('in_flight', 'returning')")


def upgrade() -> None:
    op.add_column("transfers", sa.Column("source_shard", sa.Integer(), nullable=True))
    op.add_column(
        "transfers",
        sa.Column(
            "resend_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    op.add_column(
        "transfers", sa.Column("resends", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "transfers",
        sa.Column("return_waiting", sa.Boolean(), server_default=sa.false(), nullable=False),
    )
    op.add_column(
        "transfers",
        sa.Column(
            "sent_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
    )
    # The unsettled rows' shards, as the deployment's SHARD_COUNT places their sources: run
    # the migration with the deployment's settings.
    keys = KeySpace("", int(os.environ.get("SHARD_COUNT", Settings.shard_count)))
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(f"SELECT DISTINCT source_id::text FROM transfers WHERE {UNSETTLED}")
    )
    sources = [r[0] for r in rows]
    if sources:
        conn.execute(
            sa.text(
                "UPDATE transfers SET source_shard = s.shard"
                " FROM unnest(CAST(:sources AS uuid[]), CAST(:shards AS int[])) AS s(id, shard)"
                f" WHERE transfers.source_id = s.id AND {UNSETTLED}"
            ),
            {"sources": sources, "shards": [keys.shard_of(s) for s in sources]},
        )
    op.create_check_constraint(
        op.f("transfers_unsettled_have_shard_check"),
        "transfers",
        "status NOT IN ('in_flight', 'returning') OR source_shard IS NOT NULL",
    )
    op.drop_index("transfers_unsettled_idx", table_name="transfers")
    op.create_index(
        "transfers_unsettled_idx",
        "transfers",
        ["source_shard", "resend_at"],
        unique=False,
        postgresql_where=UNSETTLED,
    )


def downgrade() -> None:
    op.drop_index("transfers_unsettled_idx", table_name="transfers")
    op.create_index(
        "transfers_unsettled_idx",
        "transfers",
        ["updated_at"],
        unique=False,
        postgresql_where=UNSETTLED,
    )
    op.drop_constraint(op.f("transfers_unsettled_have_shard_check"), "transfers", type_="check")
    op.drop_column("transfers", "sent_at")
    op.drop_column("transfers", "return_waiting")
    op.drop_column("transfers", "resends")
    op.drop_column("transfers", "resend_at")
    op.drop_column("transfers", "source_shard")
