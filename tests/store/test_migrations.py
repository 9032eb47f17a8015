"""Schema migrations on SQLite and PostgreSQL: they build exactly the models' schema.

Each test starts from an empty database, so it exercises the migrations themselves rather
than the ``database`` fixture's already-upgraded schema.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import (
    CheckConstraint,
    ForeignKeyConstraint,
    Inspector,
    UniqueConstraint,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Connection

from computeplane.domain.clock import utcnow
from computeplane.store.database import Database
from computeplane.store.migrate import (
    current_revision,
    downgrade_to,
    head_revision,
    upgrade_to_head,
)
from computeplane.store.models import Base, Organization

VERSION_TABLE = "alembic_version"
MODEL_TABLES = set(Base.metadata.tables)

T = TypeVar("T")


@pytest.fixture
async def empty_database(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    yield database
    await database.dispose()


async def inspect_schema(database: Database, read: Callable[[Inspector], T]) -> T:
    async with database.engine.connect() as connection:
        return await connection.run_sync(lambda sync: read(inspect(sync)))


async def table_names(database: Database) -> set[str]:
    return set(await inspect_schema(database, lambda inspector: inspector.get_table_names()))


async def schema_differences(database: Database) -> list[Any]:
    """Return alembic's autogenerate diff between the database and the models."""

    def compare(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        return list(compare_metadata(context, Base.metadata))

    async with database.engine.connect() as connection:
        return await connection.run_sync(compare)


async def version_rows(database: Database) -> list[str]:
    async with database.engine.connect() as connection:
        result = await connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
        return [row[0] for row in result]


async def test_upgrade_creates_model_tables(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)

    assert await table_names(empty_database) == MODEL_TABLES | {VERSION_TABLE}


async def test_upgraded_schema_matches_models(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)

    assert await schema_differences(empty_database) == []


async def test_upgrade_reaches_head_revision(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)

    assert head_revision() is not None
    assert await current_revision(empty_database) == head_revision()


async def test_second_upgrade_is_noop(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)
    async with empty_database.write() as session:
        session.add(Organization(name="kept", compute_enabled=True, created_at=utcnow()))

    await upgrade_to_head(empty_database)

    assert await version_rows(empty_database) == [head_revision()]
    assert await schema_differences(empty_database) == []
    async with empty_database.read() as session:
        names = list(await session.scalars(select(Organization.name)))
    assert names == ["kept"]


async def test_downgrade_leaves_version_table_only(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)

    await downgrade_to(empty_database, "base")

    assert await table_names(empty_database) == {VERSION_TABLE}
    assert await current_revision(empty_database) is None


async def test_upgrade_after_downgrade_matches_models(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)
    await downgrade_to(empty_database, "base")

    await upgrade_to_head(empty_database)

    assert await current_revision(empty_database) == head_revision()
    assert await table_names(empty_database) == MODEL_TABLES | {VERSION_TABLE}
    assert await schema_differences(empty_database) == []


async def test_concurrent_upgrades_both_succeed(empty_database: Database) -> None:
    other = Database(empty_database.url)
    try:
        await asyncio.gather(upgrade_to_head(empty_database), upgrade_to_head(other))
    finally:
        await other.dispose()

    assert await version_rows(empty_database) == [head_revision()]
    assert await table_names(empty_database) == MODEL_TABLES | {VERSION_TABLE}
    assert await schema_differences(empty_database) == []


def _model_names(kind: type[Any]) -> dict[str, set[str]]:
    return {
        table.name: {
            str(constraint.name)
            for constraint in table.constraints
            if isinstance(constraint, kind)
        }
        for table in Base.metadata.sorted_tables
    }


def _reflected_indexes(inspector: Inspector, table: str) -> set[str]:
    # PostgreSQL also reports the index behind each unique constraint, which the
    # unique-constraint check already covers.
    return {
        str(index["name"])
        for index in inspector.get_indexes(table)
        if "duplicates_constraint" not in index
    }


NAMED_KINDS: dict[str, tuple[dict[str, set[str]], Callable[[Inspector, str], set[str]]]] = {
    "primary-key": (
        {table.name: {str(table.primary_key.name)} for table in Base.metadata.sorted_tables},
        lambda inspector, table: {str(inspector.get_pk_constraint(table)["name"])},
    ),
    "unique": (
        _model_names(UniqueConstraint),
        lambda inspector, table: {
            str(item["name"]) for item in inspector.get_unique_constraints(table)
        },
    ),
    "check": (
        _model_names(CheckConstraint),
        lambda inspector, table: {
            str(item["name"]) for item in inspector.get_check_constraints(table)
        },
    ),
    "foreign-key": (
        _model_names(ForeignKeyConstraint),
        lambda inspector, table: {str(item["name"]) for item in inspector.get_foreign_keys(table)},
    ),
    "index": (
        {
            table.name: {str(index.name) for index in table.indexes}
            for table in Base.metadata.sorted_tables
        },
        _reflected_indexes,
    ),
}


@pytest.mark.parametrize("kind", NAMED_KINDS.values(), ids=NAMED_KINDS.keys())
async def test_named_constraints_exist(
    empty_database: Database,
    kind: tuple[dict[str, set[str]], Callable[[Inspector, str], set[str]]],
) -> None:
    expected, reflect = kind
    await upgrade_to_head(empty_database)

    reflected = await inspect_schema(
        empty_database,
        lambda inspector: {table: reflect(inspector, table) for table in expected},
    )
    assert reflected == expected


async def test_gpu_allocation_unique_constraint(empty_database: Database) -> None:
    await upgrade_to_head(empty_database)

    constraints = await inspect_schema(
        empty_database, lambda inspector: inspector.get_unique_constraints("gpu_allocations")
    )
    columns = {item["name"]: item["column_names"] for item in constraints}
    assert columns == {"uq_gpu_allocations_node_gpu": ["node_id", "gpu_index"]}
