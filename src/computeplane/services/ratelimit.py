"""Per-key request rate limits, counted in the database so every replica shares them.

The limit is a fixed window: at most ``rate_limit_requests`` requests per key in each
``rate_limit_window_seconds`` window aligned to the Unix epoch. A window's counter is one
row, incremented with an upsert.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from sqlalchemy import delete
from sqlalchemy.dialects import postgresql, sqlite

from computeplane.domain.errors import RateLimited
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.models import RateLimitWindow

POLICY_NAME = "default"


@dataclass(frozen=True)
class RateLimitState:
    """The caller's standing in the current window, for the ``RateLimit`` headers."""

    limit: int
    remaining: int
    reset_seconds: int
    window_seconds: int

    def headers(self) -> dict[str, str]:
        """Return the IETF ``RateLimit`` and ``RateLimit-Policy`` response headers."""
        return {
            "RateLimit-Policy": f'"{POLICY_NAME}";q={self.limit};w={self.window_seconds}',
            "RateLimit": f'"{POLICY_NAME}";r={self.remaining};t={self.reset_seconds}',
        }


async def hit(database: Database, settings: Settings, key_id: str) -> RateLimitState | None:
    """Count one request of ``key_id``; return its standing, or None when limits are off.

    Raises RateLimited, with the seconds until the window resets, once the key has used up
    its window.
    """
    limit = settings.rate_limit_requests
    if limit == 0:
        return None

    window = settings.rate_limit_window_seconds
    now = time.time()
    window_start = int(now // window) * window
    count = await _increment(database, key_id, window_start)

    reset_seconds = max(1, math.ceil(window_start + window - now))
    state = RateLimitState(
        limit=limit,
        remaining=max(0, limit - count),
        reset_seconds=reset_seconds,
        window_seconds=window,
    )
    if count > limit:
        raise RateLimited(
            f"Rate limit of {limit} requests per {window} seconds exceeded for this API key; "
            f"retry after {reset_seconds} seconds.",
            retry_after=reset_seconds,
            rate_limit_headers=state.headers(),
        )
    return state


async def delete_expired(database: Database, settings: Settings) -> int:
    """Delete counters of windows that have ended; return how many."""
    window = settings.rate_limit_window_seconds
    current_start = int(time.time() // window) * window
    async with database.write() as session:
        result = await session.execute(
            delete(RateLimitWindow).where(RateLimitWindow.window_start < current_start)
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def _increment(database: Database, key_id: str, window_start: int) -> int:
    insert = postgresql.insert if not database.is_sqlite else sqlite.insert
    statement = (
        insert(RateLimitWindow)
        .values(key_id=key_id, window_start=window_start, request_count=1)
        .on_conflict_do_update(
            index_elements=[RateLimitWindow.key_id, RateLimitWindow.window_start],
            set_={"request_count": RateLimitWindow.request_count + 1},
        )
        .returning(RateLimitWindow.request_count)
    )
    async with database.write() as session:
        return int((await session.execute(statement)).scalar_one())
