"""The operator's views and actions across organizations, for ``computeplane orgs|instances``.

Unlike ``services.instances``, which serves one organization's API key, these functions see
every organization's rows, deleted instances included.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.errors import InvalidRequest, NotFound
from computeplane.domain.ids import is_instance_id
from computeplane.services import lifecycle
from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import Instance, InstanceEvent, Node, Organization, User

logger = logging.getLogger(__name__)

#: The actor stored with the events of an operator's action.
OPERATOR_ACTOR = "operator"


class Unchanged(enum.Enum):
    """The type of ``UNCHANGED``: an argument that leaves its value as it is."""

    UNCHANGED = enum.auto()


UNCHANGED = Unchanged.UNCHANGED


@dataclass(frozen=True)
class OrganizationSummary:
    name: str
    compute_enabled: bool
    gpu_quota: int | None
    #: GPUs of the organization's instances that their nodes have not released yet, deleted
    #: instances included: the count that the GPU quota limits.
    gpus_held: int
    user_count: int


@dataclass(frozen=True)
class InstanceSummary:
    """An instance as the operator sees it, with its organization and node."""

    public_id: str
    organization_name: str
    creator_nickname: str
    instance_type: str
    region: str
    sector: str | None
    node_name: str
    status: str
    ip: str | None
    ssh_port: int | None
    created_at: datetime
    deleted_at: datetime | None


@dataclass(frozen=True)
class InstanceEventView:
    created_at: datetime
    from_status: str | None
    to_status: str
    reason: str
    message: str | None
    actor: str
    request_id: str | None


async def list_organizations(database: Database) -> list[OrganizationSummary]:
    """Return every organization by name, with its held GPUs and user count."""
    async with database.read() as session:
        held = await _gpus_held_by_organization(session)
        user_rows = await session.execute(
            select(User.organization_id, func.count()).group_by(User.organization_id)
        )
        users = {organization_id: int(count) for organization_id, count in user_rows}
        organizations = (
            await session.execute(select(Organization).order_by(Organization.name))
        ).scalars()
        return [
            OrganizationSummary(
                name=organization.name,
                compute_enabled=organization.compute_enabled,
                gpu_quota=organization.gpu_quota,
                gpus_held=held.get(organization.id, 0),
                user_count=users.get(organization.id, 0),
            )
            for organization in organizations
        ]


async def update_organization(
    database: Database,
    name: str,
    *,
    compute_enabled: bool | None = None,
    gpu_quota: int | Unchanged | None = UNCHANGED,
) -> OrganizationSummary:
    """Change an organization's compute permission or GPU quota and return its new state.

    ``compute_enabled=None`` keeps the permission, ``gpu_quota=UNCHANGED`` keeps the quota
    and ``gpu_quota=None`` removes it. A quota below the GPUs the organization holds is
    stored: running instances keep their GPUs, and creates fail until usage drops. Raises
    NotFound for an unknown organization.
    """
    if isinstance(gpu_quota, int) and gpu_quota < 0:
        raise InvalidRequest(f"gpu quota must be 0 or more, got {gpu_quota}.")

    async with database.write() as session:
        # Creates of an organization with a quota lock this row to check it, so the update
        # waits for those in flight. NOTE: a create that found no quota takes no lock and
        # may still commit past a quota set here at the same moment.
        organization = (
            await session.execute(
                select(Organization).where(Organization.name == name).with_for_update()
            )
        ).scalar_one_or_none()
        if organization is None:
            raise NotFound(f"No organization named '{name}'.", code="organization_not_found")
        if compute_enabled is not None:
            organization.compute_enabled = compute_enabled
        if not isinstance(gpu_quota, Unchanged):
            organization.gpu_quota = gpu_quota
        gpus_held = (await _gpus_held_by_organization(session, organization.id)).get(
            organization.id, 0
        )
        user_count = await session.scalar(
            select(func.count()).select_from(User).where(User.organization_id == organization.id)
        )
        summary = OrganizationSummary(
            name=organization.name,
            compute_enabled=organization.compute_enabled,
            gpu_quota=organization.gpu_quota,
            gpus_held=gpus_held,
            user_count=int(user_count or 0),
        )

    logger.info(
        "organization %s updated (compute=%s, gpu_quota=%s, gpus_held=%d)",
        name,
        summary.compute_enabled,
        summary.gpu_quota,
        summary.gpus_held,
    )
    return summary


async def list_instances(
    database: Database,
    *,
    organization_name: str | None = None,
    node_name: str | None = None,
    include_deleted: bool = False,
    limit: int | None = None,
) -> list[InstanceSummary]:
    """Return up to ``limit`` instances of every organization, newest first.

    ``organization_name`` and ``node_name`` narrow the list; a name that matches nothing
    raises NotFound. A removed node's name still matches its instances. Deleted instances
    are included only with ``include_deleted``.
    """
    query = (
        select(Instance, Organization.name)
        .join(Organization, Organization.id == Instance.organization_id)
        .order_by(Instance.id.desc())
        .limit(limit)
    )
    if not include_deleted:
        query = query.where(Instance.deleted_at.is_(None))

    async with database.read() as session:
        if organization_name is not None:
            organization_id = await session.scalar(
                select(Organization.id).where(Organization.name == organization_name)
            )
            if organization_id is None:
                raise NotFound(
                    f"No organization named '{organization_name}'.",
                    code="organization_not_found",
                )
            query = query.where(Instance.organization_id == organization_id)
        if node_name is not None:
            node_id = await session.scalar(select(Node.id).where(Node.name == node_name))
            if node_id is None:
                raise NotFound(f"No node named '{node_name}'.", code="node_not_found")
            query = query.where(Instance.node_id == node_id)

        rows = (await session.execute(query)).unique().all()
        return [_summary(instance, organization) for instance, organization in rows]


async def delete_instance(context: ServiceContext, public_id: str) -> str:
    """Delete any organization's instance as its owner's DELETE would; return its node's name.

    The instance disappears from its owner's API at once, stops with reason ``deleted`` and
    leaves its node's desired state. Its GPUs return when the agent confirms the teardown.
    Raises NotFound for an unknown or already deleted instance.
    """
    async with context.database.write() as session:
        node_id = await _undeleted_instance_node(session, public_id)
        # Node row first, instance row second: the lock order of every other writer. The
        # instance is loaded only under its lock, so no value read before the lock is used.
        version = await lifecycle.bump_desired_version(session, node_id)
        instance = await _locked_undeleted_instance(session, public_id)
        await lifecycle.mark_deleted(
            session,
            instance,
            version=version,
            actor=OPERATOR_ACTOR,
            message="deleted by the operator",
        )
        node_name = instance.node.name

    await context.notifier.notify([node_id])
    return node_name


async def list_instance_events(database: Database, public_id: str) -> list[InstanceEventView]:
    """Return an instance's status changes in the order they happened, deleted or not."""
    async with database.read() as session:
        instance_id = (
            await session.scalar(select(Instance.id).where(Instance.public_id == public_id))
            if is_instance_id(public_id)
            else None
        )
        if instance_id is None:
            raise _instance_not_found(public_id)
        events = (
            await session.execute(
                select(InstanceEvent)
                .where(InstanceEvent.instance_id == instance_id)
                .order_by(InstanceEvent.id)
            )
        ).scalars()
        return [
            InstanceEventView(
                created_at=event.created_at,
                from_status=event.from_status,
                to_status=event.to_status,
                reason=event.reason,
                message=event.message,
                actor=event.actor,
                request_id=event.request_id,
            )
            for event in events
        ]


async def _gpus_held_by_organization(
    session: AsyncSession, organization_id: int | None = None
) -> dict[int, int]:
    """Return the unreleased GPUs of each organization, or of one, by organization id."""
    query = (
        select(Instance.organization_id, func.sum(Instance.gpu_count))
        .where(Instance.released_at.is_(None))
        .group_by(Instance.organization_id)
    )
    if organization_id is not None:
        query = query.where(Instance.organization_id == organization_id)
    rows = (await session.execute(query)).all()
    return {organization: int(gpus or 0) for organization, gpus in rows}


async def _undeleted_instance_node(session: AsyncSession, public_id: str) -> int:
    """Return the node id of an instance that is not deleted; raise NotFound otherwise."""
    node_id = None
    if is_instance_id(public_id):
        node_id = await session.scalar(
            select(Instance.node_id).where(
                Instance.public_id == public_id, Instance.deleted_at.is_(None)
            )
        )
    if node_id is None:
        raise _instance_not_found(public_id, deleted_counts=True)
    return int(node_id)


async def _locked_undeleted_instance(session: AsyncSession, public_id: str) -> Instance:
    """Lock and return an instance that is not deleted; raise NotFound if a delete won."""
    query = (
        select(Instance)
        .where(Instance.public_id == public_id, Instance.deleted_at.is_(None))
        .with_for_update(of=Instance)
    )
    instance = (await session.execute(query)).unique().scalar_one_or_none()
    if instance is None:
        raise _instance_not_found(public_id, deleted_counts=True)
    return instance


def _instance_not_found(public_id: str, *, deleted_counts: bool = False) -> NotFound:
    # Only an id of the issued form is echoed, so the message never carries odd bytes.
    if not is_instance_id(public_id):
        return NotFound(
            "Instance not found: instance ids are 'inst_' followed by 20 lowercase letters "
            "and digits.",
            code="instance_not_found",
        )
    state = " or already deleted" if deleted_counts else ""
    return NotFound(f"Instance '{public_id}' not found{state}.", code="instance_not_found")


def _summary(instance: Instance, organization_name: str) -> InstanceSummary:
    return InstanceSummary(
        public_id=instance.public_id,
        organization_name=organization_name,
        creator_nickname=instance.creator.nickname,
        instance_type=instance.instance_type,
        region=instance.region,
        sector=instance.sector,
        node_name=instance.node.name,
        status=instance.status,
        ip=instance.ip,
        ssh_port=instance.ssh_port,
        created_at=instance.created_at,
        deleted_at=instance.deleted_at,
    )
