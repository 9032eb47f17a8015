"""Wake-ups for agents long-polling their node's desired state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

logger = logging.getLogger(__name__)


class DesiredStateNotifier:
    """Wakes the long-polls of nodes whose desired state changed.

    Call ``notify`` after the change has committed. This base class wakes waiters in the
    same process only; ``PostgresNotifier`` also reaches other replicas. Long-polls still
    recheck the database now and then, so a lost wake-up delays an agent but never strands it.
    """

    def __init__(self) -> None:
        self._events: dict[int, asyncio.Event] = {}
        self._closing = asyncio.Event()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    def shutdown(self) -> None:
        """Release all current and future waiters, so long-polls return before shutdown."""
        self._closing.set()
        self.wake_local(list(self._events))

    async def start(self) -> None:
        """Begin receiving wake-ups from other processes, where the subclass can."""

    async def close(self) -> None:
        """Stop receiving wake-ups from other processes."""

    async def notify(self, node_ids: Iterable[int]) -> None:
        """Wake every waiter of the given nodes, in this process and, if supported, others."""
        self.wake_local(node_ids)

    def wake_local(self, node_ids: Iterable[int]) -> None:
        for node_id in node_ids:
            event = self._events.pop(node_id, None)
            if event is not None:
                event.set()

    async def wait(self, node_id: int, seconds: float) -> bool:
        """Wait up to ``seconds`` for a wake-up of ``node_id``; return whether one came."""
        if self._closing.is_set():
            return True
        event = self._events.get(node_id)
        if event is None:
            event = self._events[node_id] = asyncio.Event()
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            return False
        return True
