"""The database object: owns the engine and hands out read and write transactions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

logger = logging.getLogger(__name__)

#: How long a SQLite connection waits for another process's write lock, in milliseconds.
SQLITE_BUSY_TIMEOUT_MS = 30_000


class Database:
    """The engine of one SQLite or PostgreSQL database and its transactions.

    ``write()`` transactions are where state changes. On SQLite they are serialized: one at
    a time inside this process (an asyncio lock) and ``BEGIN IMMEDIATE`` against other
    processes, so a transaction never fails halfway to upgrade its lock. On PostgreSQL they
    run concurrently at READ COMMITTED, and the code relies on row locks and constraints.
    """

    def __init__(self, url: str, *, pool_size: int = 10, max_overflow: int = 20) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.engine = _create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._sqlite_write_lock = asyncio.Lock() if self.is_sqlite else None

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncSession]:
        """Open a transaction that may write; it commits on success and rolls back on error."""
        if self._sqlite_write_lock is None:
            async with self._sessions() as session, session.begin():
                yield session
            return

        async with self._sqlite_write_lock, self._sessions() as session, session.begin():
            await session.connection(execution_options={"sqlite_begin": "BEGIN IMMEDIATE"})
            yield session

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncSession]:
        """Open a transaction for reading; objects loaded in it stay usable afterwards."""
        async with self._sessions() as session, session.begin():
            yield session

    async def dispose(self) -> None:
        await self.engine.dispose()


async def lock_transaction(session: AsyncSession, key: int) -> None:
    """Hold an exclusive lock named by ``key`` until the session's transaction ends.

    On PostgreSQL this is a transaction advisory lock. SQLite needs nothing, because its
    write transactions already run one at a time.
    """
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})


def _create_engine(url: str, *, pool_size: int, max_overflow: int) -> AsyncEngine:
    if not url.startswith("sqlite"):
        return create_async_engine(
            url, pool_size=pool_size, max_overflow=max_overflow, pool_pre_ping=True
        )

    engine = create_async_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine.sync_engine, "connect", _configure_sqlite_connection)
    event.listen(engine.sync_engine, "begin", _begin_sqlite_transaction)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    # The driver's own transaction handling defers BEGIN and ignores IMMEDIATE, so it is
    # switched off and _begin_sqlite_transaction emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    statement = connection.get_execution_options().get("sqlite_begin", "BEGIN")
    connection.exec_driver_sql(statement)
