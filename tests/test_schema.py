"""The migrations and the schema metadata describe the same database."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine

from shared.schema import metadata, sqlalchemy_url
from shared.settings import Settings


async def test_migrated_database_matches_the_metadata(settings: Settings) -> None:
    engine = create_async_engine(sqlalchemy_url(settings.database_url))

    def diff(connection: Any) -> list[Any]:
        return compare_metadata(MigrationContext.configure(connection), metadata)  # type: ignore[no-any-return]

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    await engine.dispose()
    assert differences == []


async def test_the_database_refuses_a_negative_balance(pg: Any) -> None:
    wallet = await pg.fetchval("INSERT INTO wallets DEFAULT VALUES RETURNING id")
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute("UPDATE wallets SET balance = -1 WHERE id = $1", wallet)
