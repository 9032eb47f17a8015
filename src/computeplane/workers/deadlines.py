"""Provisioning deadlines: an instance that never became ready stops and frees its GPUs."""

from __future__ import annotations

import logging

from sqlalchemy import ColumnElement, select, update

from computeplane.domain.clock import utcnow
from computeplane.domain.status import InstanceStatus, StatusReason
from computeplane.services import lifecycle
from computeplane.services.context import ServiceContext
from computeplane.store.models import Instance
from computeplane.workers import leases
from computeplane.workers.leases import Lease

logger = logging.getLogger(__name__)

BATCH = 50
_WAITING = (InstanceStatus.PENDING, InstanceStatus.PROVISIONING, InstanceStatus.UNKNOWN)


async def expire_provisioning(context: ServiceContext, owner: str) -> int:
    """Stop every instance whose provisioning deadline passed; return how many stopped.

    The GPUs are freed at once: the agent never reported the instance running, and the
    node is told to remove whatever it started.
    """
    async with context.database.write() as session:
        claimed = await leases.claim(
            session,
            Instance,
            _overdue(),
            owner=owner,
            lease_seconds=context.settings.worker_lease_seconds,
            limit=BATCH,
        )

    stopped_nodes: set[int] = set()
    for lease in claimed:
        node_id = await _apply(context, lease)
        if node_id is not None:
            stopped_nodes.add(node_id)

    if stopped_nodes:
        await context.notifier.notify(stopped_nodes)
    return len(claimed)


def _overdue() -> ColumnElement[bool]:
    return (
        Instance.status.in_(_WAITING)
        & Instance.ready_at.is_(None)
        & Instance.released_at.is_(None)
        & (Instance.provisioning_deadline < utcnow())
    )


async def _apply(context: ServiceContext, lease: Lease) -> int | None:
    """Stop the leased instance if it is still overdue; return its node id if it stopped."""
    timeout = context.settings.provisioning_timeout_seconds
    async with context.database.write() as session:
        node_id = await session.scalar(
            select(Instance.node_id).where(leases.held(Instance, lease))
        )
        if node_id is None:
            logger.warning("lease on instance row %s was lost; skipping it", lease.row_id)
            return None
        version = await lifecycle.bump_desired_version(session, node_id)

        query = (
            select(Instance)
            .where(leases.held(Instance, lease), _overdue())
            .with_for_update(of=Instance)
        )
        instance = (await session.execute(query)).unique().scalar_one_or_none()
        if instance is not None:
            await lifecycle.change_status(
                session,
                instance,
                InstanceStatus.STOPPED,
                StatusReason.PROVISIONING_TIMEOUT,
                actor="worker:deadlines",
                message=f"provisioning did not finish within {timeout:g} seconds",
            )
            await lifecycle.request_teardown(session, instance, version=version)
            await lifecycle.release_gpus(session, instance, why="its provisioning timed out")

        await session.execute(
            update(Instance).where(leases.held(Instance, lease)).values(**leases.cleared())
        )
    return node_id if instance is not None else None
