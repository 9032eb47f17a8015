"""Schema migrations, run under a database lock so replicas starting together do not race."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection

from computeplane.store.database import Database

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

#: Key of the PostgreSQL advisory lock that serializes migrations ("cpmigrat" in ASCII).
MIGRATION_LOCK_KEY = 0x63706D6967726174


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


async def upgrade_to_head(database: Database) -> None:
    """Upgrade the schema to the newest revision; a no-op when it is already there.

    The whole upgrade is one transaction that first takes a lock: PostgreSQL's transaction
    advisory lock or SQLite's ``BEGIN IMMEDIATE``. A second process waits for the first and
    then finds the schema at head.
    """
    options = {"sqlite_begin": "BEGIN IMMEDIATE"} if database.is_sqlite else {}
    async with database.engine.connect() as connection:
        connection = await connection.execution_options(**options)
        async with connection.begin():
            if not database.is_sqlite:
                await connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
                )
            await connection.run_sync(_upgrade, "head")


async def downgrade_to(database: Database, revision: str) -> None:
    async with database.engine.begin() as connection:
        await connection.run_sync(_downgrade, revision)


async def current_revision(database: Database) -> str | None:
    async with database.engine.connect() as connection:
        return await connection.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    before = MigrationContext.configure(connection).get_current_revision()
    command.upgrade(config, revision)
    after = MigrationContext.configure(connection).get_current_revision()
    if before != after:
        logger.info("database schema upgraded from %s to %s", before or "empty", after)


def _downgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.downgrade(config, revision)
