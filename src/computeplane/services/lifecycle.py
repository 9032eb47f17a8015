"""Status changes, teardown requests and GPU release: the only writers of instance state.

Lock order, to keep PostgreSQL free of deadlocks: a transaction that changes both a node and
its instances locks the node row first (``bump_desired_version`` or a counter update) and
the instance rows after it.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, inspect, update
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.clock import utcnow
from computeplane.domain.status import InstanceStatus, StatusReason, check_transition
from computeplane.logconfig import current_request_id
from computeplane.store.models import GpuAllocation, Instance, InstanceEvent, Node

logger = logging.getLogger(__name__)


async def record_creation(
    session: AsyncSession, instance: Instance, *, node_name: str, actor: str
) -> None:
    """Store the creation event of a newly placed instance."""
    check_transition(None, InstanceStatus(instance.status))
    await _add_event(session, instance, None, StatusReason.PLACED, None, actor)
    logger.info(
        "instance %s placed on node %s with %d GPU(s) (%s)",
        instance.public_id,
        node_name,
        instance.gpu_count,
        instance.instance_type,
    )


async def change_status(
    session: AsyncSession,
    instance: Instance,
    target: InstanceStatus,
    reason: StatusReason,
    *,
    actor: str,
    message: str | None = None,
    detail: str | None = None,
) -> None:
    """Move ``instance`` to ``target`` and store the event; a no-op if it is already there.

    ``message`` becomes the instance's ``status_reason``, which its owner reads. The event
    and the log line carry ``detail`` instead when given, for operators. Raises
    InvalidTransition for a move the status machine does not allow.
    """
    current = InstanceStatus(instance.status)
    if current == target:
        return
    check_transition(current, target)

    now = utcnow()
    instance.status = target
    instance.status_reason = message
    instance.updated_at = now
    if target == InstanceStatus.READY and instance.ready_at is None:
        instance.ready_at = now
    recorded = detail or message
    await _add_event(session, instance, current, reason, recorded, actor)

    logger.info(
        "instance %s: %s -> %s (%s) on node %s%s",
        instance.public_id,
        current,
        target,
        reason,
        node_label(instance),
        f": {recorded}" if recorded else "",
    )


async def bump_desired_version(session: AsyncSession, node_id: int) -> int:
    """Advance the node's desired-state version and return it; locks the node row."""
    result = await session.execute(
        update(Node)
        .where(Node.id == node_id)
        .values(desired_version=Node.desired_version + 1)
        .returning(Node.desired_version)
    )
    return int(result.scalar_one())


async def request_teardown(
    session: AsyncSession, instance: Instance, *, version: int | None = None
) -> None:
    """Drop the instance from its node's desired state so that the agent tears it down.

    ``version`` is the node's desired version if the caller already advanced it in this
    transaction; otherwise this advances it. The caller wakes the node's agent once the
    transaction has committed.
    """
    if instance.teardown_version is None:
        if version is None:
            version = await bump_desired_version(session, instance.node_id)
        instance.teardown_version = version


async def mark_deleted(
    session: AsyncSession, instance: Instance, *, version: int, actor: str, message: str
) -> None:
    """Hide the instance from the API and drop it from its node's desired state.

    ``version`` is the node's desired version, already advanced in this transaction, which
    also holds the node row lock that must come before the instance's.
    """
    instance.deleted_at = utcnow()
    await change_status(
        session,
        instance,
        InstanceStatus.STOPPED,
        StatusReason.DELETED,
        actor=actor,
        message=message,
    )
    await request_teardown(session, instance, version=version)


async def release_gpus(session: AsyncSession, instance: Instance, *, why: str) -> int:
    """Return the instance's GPUs to its node and mark it released; return how many.

    Deleting the allocation rows is what frees the GPUs, so a second call frees nothing:
    the count is zero and the node's counter does not move.
    """
    result = await session.execute(
        delete(GpuAllocation).where(GpuAllocation.instance_id == instance.id)
    )
    released = int(result.rowcount or 0)  # type: ignore[attr-defined]
    if released:
        await session.execute(
            update(Node)
            .where(Node.id == instance.node_id)
            .values(gpus_free=Node.gpus_free + released)
        )
    if instance.released_at is None:
        instance.released_at = utcnow()
        logger.info(
            "instance %s released %d GPUs on node %s: %s",
            instance.public_id,
            released,
            node_label(instance),
            why,
        )
    return released


def node_label(instance: Instance) -> str:
    """Return the instance's node name for logs, or its id when the node is not loaded.

    Reading an unloaded relationship would need I/O, which async sessions do not allow
    implicitly.
    """
    node = inspect(instance).attrs.node.loaded_value
    return node.name if isinstance(node, Node) else f"#{instance.node_id}"


async def _add_event(
    session: AsyncSession,
    instance: Instance,
    current: InstanceStatus | None,
    reason: StatusReason,
    message: str | None,
    actor: str,
) -> None:
    session.add(
        InstanceEvent(
            instance_id=instance.id,
            from_status=current,
            to_status=instance.status,
            reason=reason,
            message=message,
            actor=actor,
            request_id=current_request_id(),
            created_at=utcnow(),
        )
    )
