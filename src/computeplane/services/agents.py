"""The control plane's side of the node agent protocol: desired state down, observations up.

An agent long-polls for its node's desired state, a versioned list of the instances that
should run there. It reports what it observes, stamped with the desired version it has
applied. That version lets the control plane tell "not started yet" from "gone": an
instance missing from a report counts as torn down (or lost) only once the agent has
applied a version that includes its latest change.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.agent import ObservedState
from computeplane.domain.clock import utcnow
from computeplane.domain.errors import AuthenticationFailed
from computeplane.domain.status import ACTIVE_STATUSES, InstanceStatus, StatusReason
from computeplane.services import lifecycle
from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import GpuAllocation, Instance, Node

logger = logging.getLogger(__name__)

#: The ``status_reason`` of an instance whose node failed to start it.
RUNTIME_FAILED_MESSAGE = (
    "The node failed to start the instance. The operator can see the cause with "
    "'computeplane instances events <id>'."
)

#: Maximum seconds a long-poll waits for a wake-up before it reads the version again.
RECHECK_SECONDS = 1.0


@dataclass(frozen=True)
class NodeIdentity:
    id: int
    name: str
    removed: bool = False


@dataclass(frozen=True)
class DesiredInstance:
    instance_id: str
    ssh_public_key: str
    ssh_user: str
    gpu_indices: tuple[int, ...]


@dataclass(frozen=True)
class DesiredState:
    """The instances that should run on a node. A removed node should run none and stop."""

    version: int
    instances: list[DesiredInstance]
    node_removed: bool = False


@dataclass(frozen=True)
class ObservedInstance:
    instance_id: str
    state: ObservedState
    ip: str | None = None
    ssh_port: int | None = None
    message: str | None = None


@dataclass(frozen=True)
class ObservedReport:
    applied_version: int
    instances: list[ObservedInstance]


def hash_node_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


async def authenticate_node(database: Database, token: str) -> NodeIdentity:
    """Return the node that owns ``token``; raise AuthenticationFailed for any other token.

    Node tokens are random 256-bit secrets, so looking one up by its hash leaks nothing. A
    removed node keeps its token until it is added again, so that its agent can learn of
    the removal and tear its instances down.
    """
    async with database.read() as session:
        node = (
            await session.execute(select(Node).where(Node.token_sha256 == hash_node_token(token)))
        ).scalar_one_or_none()
    if node is None:
        raise AuthenticationFailed("The node token is invalid.", code="invalid_node_token")
    return NodeIdentity(id=node.id, name=node.name, removed=node.state == "removed")


async def wait_for_desired_state(
    context: ServiceContext, node: NodeIdentity, after_version: int, wait_seconds: float
) -> DesiredState:
    """Return the node's desired state once its version differs from ``after_version``.

    Waits at most ``wait_seconds`` (plus one database read) and then returns the unchanged
    state, so an agent's request returns within about the wait it requested.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_seconds
    while True:
        async with context.database.read() as session:
            row = (
                await session.execute(
                    select(Node.desired_version, Node.state).where(Node.id == node.id)
                )
            ).one()
            version, removed = int(row.desired_version), row.state == "removed"
            remaining = deadline - loop.time()
            if removed:
                return DesiredState(version=version, instances=[], node_removed=True)
            if version != after_version or remaining <= 0 or context.notifier.closing:
                return await _desired_state(session, node.id, version)
        await context.notifier.wait(node.id, min(remaining, RECHECK_SECONDS))


async def apply_report(
    context: ServiceContext, node: NodeIdentity, report: ObservedReport
) -> None:
    """Record a heartbeat and reconcile every unreleased instance of the node with the report.

    Raises AuthenticationFailed for a removed node, whose instances are already released.
    """
    if node.removed:
        raise AuthenticationFailed(f"Node {node.name} was removed.", code="node_removed")
    changed_nodes: set[int] = set()
    async with context.database.write() as session:
        await _record_heartbeat(session, node)
        instances = await _unreleased_instances(session, node.id)
        observed = {item.instance_id: item for item in report.instances}
        for instance in instances:
            seen = observed.get(instance.public_id)
            if await _reconcile(session, node, instance, seen, report.applied_version):
                changed_nodes.add(node.id)

    if changed_nodes:
        await context.notifier.notify(changed_nodes)


async def _record_heartbeat(session: AsyncSession, node: NodeIdentity) -> None:
    was_reachable = await session.scalar(
        select(Node.reachable).where(Node.id == node.id).with_for_update()
    )
    await session.execute(
        update(Node).where(Node.id == node.id).values(last_heartbeat_at=utcnow(), reachable=True)
    )
    if not was_reachable:
        logger.info("node %s is reporting", node.name)


async def _unreleased_instances(session: AsyncSession, node_id: int) -> list[Instance]:
    query = (
        select(Instance)
        .where(Instance.node_id == node_id, Instance.released_at.is_(None))
        .order_by(Instance.id)
        .with_for_update(of=Instance)
    )
    return list((await session.execute(query)).unique().scalars().all())


async def _reconcile(
    session: AsyncSession,
    node: NodeIdentity,
    instance: Instance,
    seen: ObservedInstance | None,
    applied_version: int,
) -> bool:
    """Bring one instance in line with the report; return whether its node needs a wake-up."""
    actor = f"node:{node.name}"
    status = InstanceStatus(instance.status)

    if status == InstanceStatus.STOPPED:
        teardown_applied = applied_version >= (instance.teardown_version or 0)
        if seen is None and teardown_applied:
            await lifecycle.release_gpus(session, instance, why="the node confirmed teardown")
        elif seen is not None and seen.state == ObservedState.FAILED:
            await lifecycle.release_gpus(
                session, instance, why="the node reported the start failed"
            )
        return False

    if seen is None:
        return await _reconcile_missing(session, instance, applied_version, actor)

    if seen.state == ObservedState.RUNNING:
        instance.ip, instance.ssh_port = seen.ip, seen.ssh_port
        if status == InstanceStatus.PENDING:
            # A start that finished between two reports still went through provisioning.
            await lifecycle.change_status(
                session,
                instance,
                InstanceStatus.PROVISIONING,
                StatusReason.AGENT_STARTING,
                actor=actor,
            )
        await lifecycle.change_status(
            session, instance, InstanceStatus.READY, StatusReason.AGENT_RUNNING, actor=actor
        )
    elif seen.state == ObservedState.STARTING and status != InstanceStatus.READY:
        # A ready instance reported as starting is being restored after an agent restart;
        # it stays ready unless the restore fails.
        await lifecycle.change_status(
            session,
            instance,
            InstanceStatus.PROVISIONING,
            StatusReason.AGENT_STARTING,
            actor=actor,
        )
    elif seen.state == ObservedState.FAILED:
        # The runtime's message is for operators: it may name paths and settings of the host.
        await lifecycle.change_status(
            session,
            instance,
            InstanceStatus.STOPPED,
            StatusReason.RUNTIME_FAILED,
            actor=actor,
            message=RUNTIME_FAILED_MESSAGE,
            detail=seen.message,
        )
        await lifecycle.request_teardown(session, instance)
        await lifecycle.release_gpus(session, instance, why="the node reported the start failed")
        return True
    return False


async def _reconcile_missing(
    session: AsyncSession, instance: Instance, applied_version: int, actor: str
) -> bool:
    """Handle an active instance that the report does not list."""
    if applied_version < instance.desired_version:
        # The agent has not seen this instance yet.
        if instance.status == InstanceStatus.UNKNOWN:
            await lifecycle.change_status(
                session, instance, InstanceStatus.PENDING, StatusReason.AGENT_PENDING, actor=actor
            )
        return False

    await _stop(
        session,
        instance,
        StatusReason.RUNTIME_LOST,
        actor,
        "the node no longer runs the instance",
    )
    await lifecycle.release_gpus(session, instance, why="the node no longer runs it")
    return True


async def _stop(
    session: AsyncSession,
    instance: Instance,
    reason: StatusReason,
    actor: str,
    message: str | None,
) -> None:
    await lifecycle.change_status(
        session, instance, InstanceStatus.STOPPED, reason, actor=actor, message=message
    )
    await lifecycle.request_teardown(session, instance)


async def _desired_state(session: AsyncSession, node_id: int, version: int) -> DesiredState:
    instances = (
        (
            await session.execute(
                select(Instance)
                .where(
                    Instance.node_id == node_id,
                    Instance.released_at.is_(None),
                    Instance.status.in_(ACTIVE_STATUSES),
                )
                .order_by(Instance.id)
            )
        )
        .unique()
        .scalars()
        .all()
    )
    allocations = await session.execute(
        select(GpuAllocation.instance_id, GpuAllocation.gpu_index)
        .where(GpuAllocation.node_id == node_id)
        .order_by(GpuAllocation.gpu_index)
    )
    indices: dict[int, list[int]] = {}
    for instance_id, gpu_index in allocations.all():
        indices.setdefault(instance_id, []).append(gpu_index)

    return DesiredState(
        version=version,
        instances=[
            DesiredInstance(
                instance_id=instance.public_id,
                ssh_public_key=instance.ssh_public_key,
                ssh_user=instance.ssh_user,
                gpu_indices=tuple(indices.get(instance.id, ())),
            )
            for instance in instances
        ],
    )
