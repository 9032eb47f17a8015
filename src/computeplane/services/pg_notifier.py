"""Agent wake-ups across replicas through PostgreSQL's LISTEN and NOTIFY."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.engine import make_url

from computeplane.services.notifier import DesiredStateNotifier
from computeplane.store.database import Database

logger = logging.getLogger(__name__)

CHANNEL = "computeplane_desired_state"
RECONNECT_SECONDS = 2.0


class PostgresNotifier(DesiredStateNotifier):
    """Wakes long-polls in every replica: a notification carries the node id.

    One dedicated connection per process listens; if it drops, it reconnects, and the
    long-polls' periodic recheck covers the gap.
    """

    def __init__(self, database: Database) -> None:
        super().__init__()
        self._database = database
        url = make_url(database.url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._listener: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen_forever())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener

    async def notify(self, node_ids: Iterable[int]) -> None:
        node_ids = list(node_ids)
        self.wake_local(node_ids)
        try:
            async with self._database.engine.begin() as connection:
                for node_id in node_ids:
                    await connection.execute(
                        text("SELECT pg_notify(:channel, :payload)"),
                        {"channel": CHANNEL, "payload": str(node_id)},
                    )
        except Exception:
            logger.warning(
                "sending a wake-up for nodes %s failed; their agents wake at the next recheck",
                node_ids,
                exc_info=True,
            )

    async def _listen_forever(self) -> None:
        while True:
            try:
                await self._listen_once()
                logger.warning("wake-up listener connection closed; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                logger.warning("wake-up listener failed (%s); reconnecting", error)
            await asyncio.sleep(RECONNECT_SECONDS)

    async def _listen_once(self) -> None:
        """Listen on one connection until it closes."""
        closed = asyncio.Event()
        connection = await asyncpg.connect(self._dsn)
        try:
            connection.add_termination_listener(lambda _connection: closed.set())
            await connection.add_listener(CHANNEL, self._on_notification)
            logger.info("listening for desired-state wake-ups on %s", CHANNEL)
            await closed.wait()
        finally:
            if not connection.is_closed():
                with contextlib.suppress(Exception):
                    await asyncio.shield(connection.close())

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        with contextlib.suppress(ValueError):
            self.wake_local([int(payload)])


def make_notifier(database: Database) -> DesiredStateNotifier:
    """Return the notifier that fits the database: cross-replica on PostgreSQL."""
    if database.is_sqlite:
        return DesiredStateNotifier()
    return PostgresNotifier(database)
