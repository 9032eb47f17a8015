"""Row leases: how a worker claims a row so that no other worker works on it at once.

A claim sets ``lease_owner``, ``lease_token`` and ``lease_expires_at`` on rows that have no
live lease. On PostgreSQL the candidate rows are read with ``FOR UPDATE SKIP LOCKED``, so
concurrent claimers split the rows instead of queueing on them. SQLite runs one write
transaction at a time, which gives the same exclusion. A worker that dies simply lets its
leases expire; the next claim after expiry takes the rows over.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.clock import utcnow
from computeplane.store.models import Instance, Node

LeasedModel = type[Instance] | type[Node]


@dataclass(frozen=True)
class Lease:
    row_id: int
    token: str


async def claim(
    session: AsyncSession,
    model: LeasedModel,
    condition: ColumnElement[bool],
    *,
    owner: str,
    lease_seconds: float,
    limit: int,
) -> list[Lease]:
    """Lease up to ``limit`` rows of ``model`` that match ``condition`` and have no live lease."""
    now = utcnow()
    candidates = (
        select(model.id)
        .where(condition, or_(model.lease_expires_at.is_(None), model.lease_expires_at < now))
        .order_by(model.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    row_ids = list((await session.execute(candidates)).scalars().all())

    leases = [Lease(row_id=row_id, token=secrets.token_hex(16)) for row_id in row_ids]
    expires_at = now + timedelta(seconds=lease_seconds)
    for lease in leases:
        await session.execute(
            update(model)
            .where(model.id == lease.row_id)
            .values(lease_owner=owner, lease_token=lease.token, lease_expires_at=expires_at)
        )
    return leases


def held(model: LeasedModel, lease: Lease) -> ColumnElement[bool]:
    """Return the condition that the row is still under ``lease``."""
    return (model.id == lease.row_id) & (model.lease_token == lease.token)


def cleared() -> dict[str, None]:
    """Return the column values that end a lease."""
    return {"lease_owner": None, "lease_token": None, "lease_expires_at": None}
