"""Compute instances as the API exposes them: create, read, list and delete."""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.catalog import InstanceType, Sector
from computeplane.domain.clock import utcnow
from computeplane.domain.errors import InvalidCursor, InvalidRequest, NotFound, QuotaExceeded
from computeplane.domain.ids import is_instance_id, new_instance_id
from computeplane.domain.status import InstanceStatus
from computeplane.services import lifecycle, placement
from computeplane.services.auth import Principal
from computeplane.services.context import ServiceContext
from computeplane.services.placement import NodeChoice
from computeplane.store.models import Instance, Organization

logger = logging.getLogger(__name__)

SSH_USER = "ubuntu"
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 100
_MAX_CURSOR_LENGTH = 256


@dataclass(frozen=True)
class InstanceView:
    """An instance as its owner may see it."""

    public_id: str
    instance_type: str
    region: str
    sector: str | None
    status: str
    status_reason: str | None
    ip: str | None
    ssh_port: int | None
    ssh_user: str
    creator_user_nickname: str
    created_at: datetime


@dataclass(frozen=True)
class InstancePage:
    instances: list[InstanceView]
    next_cursor: str | None


#: Called inside the create transaction with the new instance, before commit.
BeforeCommit = Callable[[AsyncSession, InstanceView], Awaitable[None]]


async def create_instance(
    context: ServiceContext,
    principal: Principal,
    instance_type: InstanceType,
    ssh_public_key: str,
    sector: Sector | None,
    *,
    before_commit: BeforeCommit | None = None,
) -> InstanceView:
    """Place and store a new instance, then wake its node's agent.

    ``ssh_public_key`` must already be a validated, rebuilt key line. Raises QuotaExceeded
    or InsufficientCapacity, leaving nothing behind.
    """
    if sector is not None and not instance_type.spec.allows_sector:
        raise InvalidRequest(f"sector applies only to gpu_8x_h100_sxm5, not {instance_type}.")

    settings = context.settings
    now = utcnow()
    deadline = now + timedelta(seconds=settings.provisioning_timeout_seconds)

    def make_instance(choice: NodeChoice) -> Instance:
        return Instance(
            public_id=new_instance_id(),
            organization_id=principal.organization_id,
            creator_user_id=principal.user_id,
            instance_type=instance_type.value,
            gpu_count=instance_type.spec.gpu_count,
            region=choice.region,
            sector=choice.sector,
            node_id=choice.node_id,
            status=InstanceStatus.PENDING,
            ssh_user=SSH_USER,
            ssh_public_key=ssh_public_key,
            created_at=now,
            updated_at=now,
            provisioning_deadline=deadline,
            desired_version=choice.desired_version,
        )

    async with context.database.write() as session:
        await _check_quota(session, principal, instance_type.spec.gpu_count)
        instance, choice = await placement.place(
            session,
            instance_type,
            sector,
            make_instance,
            retry_after=settings.capacity_retry_after_seconds,
        )
        await lifecycle.record_creation(
            session, instance, node_name=choice.node_name, actor=f"user:{principal.user_nickname}"
        )
        view = _view(instance, principal.user_nickname)
        if before_commit is not None:
            await before_commit(session, view)

    await context.notifier.notify([choice.node_id])
    return view


async def get_instance(
    context: ServiceContext, principal: Principal, public_id: str
) -> InstanceView:
    """Return the caller's instance; raise NotFound for a deleted or foreign one."""
    async with context.database.read() as session:
        instance = await _visible_instance(session, principal, public_id)
        return _view(instance, instance.creator.nickname)


async def list_instances(
    context: ServiceContext, principal: Principal, limit: int, cursor: str | None
) -> InstancePage:
    """Return one page of the caller's instances, newest first.

    The cursor names the last instance of the previous page, and the next page starts after
    that instance's row, deleted or not. So inserts and deletes between pages neither skip
    nor repeat an instance that exists throughout.
    """
    query = (
        select(Instance)
        .where(
            Instance.organization_id == principal.organization_id, Instance.deleted_at.is_(None)
        )
        .order_by(Instance.id.desc())
        .limit(limit + 1)
    )

    async with context.database.read() as session:
        if cursor:
            after_id = await _cursor_position(session, cursor, principal.organization_id)
            query = query.where(Instance.id < after_id)
        rows = list((await session.execute(query)).scalars().all())
        page = rows[:limit]
        views = [_view(instance, instance.creator.nickname) for instance in page]

    has_more = len(rows) > limit
    next_cursor = _encode_cursor(page[-1].public_id) if has_more else None
    return InstancePage(instances=views, next_cursor=next_cursor)


async def delete_instance(context: ServiceContext, principal: Principal, public_id: str) -> None:
    """Hide the instance at once and have its node tear it down.

    The GPUs return to the pool when the agent confirms the teardown, or at once if the
    instance had already stopped and released them.
    """
    async with context.database.write() as session:
        found = await _visible_instance(session, principal, public_id)
        version = await lifecycle.bump_desired_version(session, found.node_id)
        instance = await _visible_instance(session, principal, public_id, lock=True)
        await lifecycle.mark_deleted(
            session,
            instance,
            version=version,
            actor=f"user:{principal.user_nickname}",
            message="deleted by its owner",
        )
        node_id = instance.node_id

    await context.notifier.notify([node_id])


async def _check_quota(session: AsyncSession, principal: Principal, gpu_count: int) -> None:
    """Raise QuotaExceeded if the organization's held GPUs plus ``gpu_count`` pass its quota.

    GPUs count until their node releases them, deleted instances included. An organization
    with a quota has its row locked, so its concurrent creates are judged one at a time;
    one without a quota takes no lock, so its creates run in parallel.
    """
    organization_id = principal.organization_id
    if await session.scalar(_quota_of(organization_id)) is None:
        return

    quota = await session.scalar(_quota_of(organization_id).with_for_update())
    if quota is None:
        return
    held = int(
        await session.scalar(
            select(func.coalesce(func.sum(Instance.gpu_count), 0)).where(
                Instance.organization_id == organization_id, Instance.released_at.is_(None)
            )
        )
        or 0
    )
    if held + gpu_count > quota:
        raise QuotaExceeded(
            f"Organization '{principal.organization_name}' uses {held} of its {quota} GPU "
            f"quota; this instance needs {gpu_count} more. Delete instances or ask the "
            "operator for a larger quota."
        )


def _quota_of(organization_id: int) -> Select[int | None]:
    return select(Organization.gpu_quota).where(Organization.id == organization_id)


async def _visible_instance(
    session: AsyncSession, principal: Principal, public_id: str, *, lock: bool = False
) -> Instance:
    instance = None
    well_formed = is_instance_id(public_id)
    if well_formed:
        query = select(Instance).where(
            Instance.public_id == public_id,
            Instance.organization_id == principal.organization_id,
            Instance.deleted_at.is_(None),
        )
        if lock:
            query = query.with_for_update(of=Instance)
        instance = (await session.execute(query)).unique().scalar_one_or_none()
    if instance is None:
        # Only an id of the issued form is echoed, so the message never carries odd bytes.
        shown = f" '{public_id}'" if well_formed else ""
        raise NotFound(f"Instance{shown} not found.", code="instance_not_found")
    return instance


def _view(instance: Instance, creator_nickname: str) -> InstanceView:
    ready = instance.status == InstanceStatus.READY
    return InstanceView(
        public_id=instance.public_id,
        instance_type=instance.instance_type,
        region=instance.region,
        sector=instance.sector,
        status=instance.status,
        status_reason=instance.status_reason,
        ip=instance.ip if ready else None,
        ssh_port=instance.ssh_port if ready else None,
        ssh_user=instance.ssh_user,
        creator_user_nickname=creator_nickname,
        created_at=instance.created_at,
    )


_CURSOR_VERSION = "1"


def _encode_cursor(last_public_id: str) -> str:
    text = f"{_CURSOR_VERSION}:{last_public_id}"
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def _cursor_position(session: AsyncSession, cursor: str, organization_id: int) -> int:
    """Return the row id a cursor points after.

    Raises InvalidCursor for anything this server did not issue to this organization.
    """
    if len(cursor) > _MAX_CURSOR_LENGTH:
        raise InvalidCursor()
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        text = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True).decode()
    except (binascii.Error, ValueError):
        raise InvalidCursor() from None

    version, _, public_id = text.partition(":")
    if version != _CURSOR_VERSION or not is_instance_id(public_id):
        raise InvalidCursor()
    row_id = await session.scalar(
        select(Instance.id).where(
            Instance.public_id == public_id, Instance.organization_id == organization_id
        )
    )
    if row_id is None:
        raise InvalidCursor()
    return int(row_id)
