"""Node heartbeats: a node that stops reporting has its instances marked ``unknown``."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.clock import utcnow
from computeplane.domain.status import InstanceStatus, StatusReason
from computeplane.services import lifecycle
from computeplane.services.context import ServiceContext
from computeplane.store.models import Instance, Node
from computeplane.workers import leases
from computeplane.workers.leases import Lease

logger = logging.getLogger(__name__)

BATCH = 50
_OBSERVED = (InstanceStatus.PENDING, InstanceStatus.PROVISIONING, InstanceStatus.READY)


async def expire_heartbeats(context: ServiceContext, owner: str) -> int:
    """Mark silent nodes unreachable and their instances ``unknown``; return how many nodes.

    The instances return to their observed status when the node reports again.
    """
    silent_for = context.settings.node_unreachable_after_seconds
    async with context.database.write() as session:
        claimed = await leases.claim(
            session,
            Node,
            _silent(silent_for),
            owner=owner,
            lease_seconds=context.settings.worker_lease_seconds,
            limit=BATCH,
        )

    for lease in claimed:
        await _apply(context, lease, silent_for)
    return len(claimed)


def _silent(silent_for: float) -> ColumnElement[bool]:
    cutoff = utcnow() - timedelta(seconds=silent_for)
    return Node.reachable.is_(True) & (Node.state != "removed") & (Node.last_heartbeat_at < cutoff)


async def _apply(context: ServiceContext, lease: Lease, silent_for: float) -> None:
    async with context.database.write() as session:
        node = (
            await session.execute(
                select(Node).where(leases.held(Node, lease), _silent(silent_for)).with_for_update()
            )
        ).scalar_one_or_none()
        if node is not None:
            node.reachable = False
            logger.warning(
                "node %s has not reported for %g seconds; its instances are now unknown",
                node.name,
                silent_for,
            )
            await _mark_unknown(session, node, silent_for)

        await session.execute(
            update(Node).where(leases.held(Node, lease)).values(**leases.cleared())
        )


async def _mark_unknown(session: AsyncSession, node: Node, silent_for: float) -> None:
    instances = (
        (
            await session.execute(
                select(Instance)
                .where(
                    Instance.node_id == node.id,
                    Instance.released_at.is_(None),
                    Instance.status.in_(_OBSERVED),
                )
                .with_for_update(of=Instance)
            )
        )
        .unique()
        .scalars()
        .all()
    )
    for instance in instances:
        await lifecycle.change_status(
            session,
            instance,
            InstanceStatus.UNKNOWN,
            StatusReason.NODE_UNREACHABLE,
            actor="worker:heartbeats",
            message=f"node has not reported for {silent_for:g} seconds",
        )
