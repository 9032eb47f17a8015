"""Placement: choosing a node and GPUs for a new instance inside the create transaction.

Rules:

- A whole-node type (8x) takes a node whose GPUs are all free, in the requested sector if
  one is given. A partial type (1x) takes the free GPUs of the node with the fewest free
  GPUs that still fits (best fit).
- Without a requested sector, nodes outside sectors come first, so that whole InfiniBand
  nodes stay free for the requests that need them.

Safety: the chosen node's ``gpus_free`` counter is taken with one conditional UPDATE, which
locks the node's row, and the GPU indices are then read under that lock.
The ``UNIQUE(node_id, gpu_index)`` constraint on ``gpu_allocations`` is the last word: a
conflicting insert rolls back to a savepoint and placement moves on to the next candidate. A
node whose counter promises more GPUs than it has free is skipped the same way.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.catalog import InstanceType, InstanceTypeSpec, Sector
from computeplane.domain.errors import InsufficientCapacity, InvalidRequest
from computeplane.store.models import GpuAllocation, Instance, Node

logger = logging.getLogger(__name__)

#: Attempts one create makes per candidate group before it gives up on the group. Every
#: attempt either places the instance or waits for another create's commit, so the bound
#: only matters when many creates race for the last free nodes.
MAX_ATTEMPTS_PER_GROUP = 64


@dataclass(frozen=True)
class NodeChoice:
    """The node and GPUs chosen for an instance, handed to the instance factory."""

    node_id: int
    node_name: str
    region: str
    sector: str | None
    gpu_indices: tuple[int, ...]
    desired_version: int


InstanceFactory = Callable[[NodeChoice], Instance]


class _CounterOutOfStep(Exception):
    """Raised inside a placement savepoint to roll back a node whose counter is wrong."""


async def place(
    session: AsyncSession,
    instance_type: InstanceType,
    sector: Sector | None,
    make_instance: InstanceFactory,
    *,
    retry_after: int,
) -> tuple[Instance, NodeChoice]:
    """Insert the instance built by ``make_instance`` on a node with room, with its GPUs.

    Each attempt runs in a savepoint, so a failed one leaves nothing behind and releases its
    node lock. Raises InsufficientCapacity, naming where capacity does exist, when no node
    has room.
    """
    spec = instance_type.spec
    for group in _candidate_groups(sector):
        tried: set[int] = set()
        for _ in range(MAX_ATTEMPTS_PER_GROUP):
            outcome = await _attempt(session, spec, group, tried, make_instance)
            if outcome is _GROUP_FULL:
                break
            if isinstance(outcome, tuple):
                return outcome

    if sector is not None:
        await _check_sector_exists(session, sector)
    message = await _capacity_message(session, instance_type, sector, retry_after)
    raise InsufficientCapacity(message, retry_after=retry_after)


async def _check_sector_exists(session: AsyncSession, sector: Sector) -> None:
    """Raise InvalidRequest for a sector without any node, because waiting cannot help."""
    sectors = set(
        (
            await session.execute(
                select(Node.sector)
                .where(Node.state != "removed", Node.sector.is_not(None))
                .distinct()
            )
        )
        .scalars()
        .all()
    )
    if sector.value not in sectors:
        known = ", ".join(sorted(s for s in sectors if s)) or "none"
        raise InvalidRequest(
            f"This fleet has no nodes in {sector.value}; sectors with nodes: {known}.",
            code="sector_unavailable",
        )


def _candidate_groups(sector: Sector | None) -> list[ColumnElement[bool]]:
    if sector is not None:
        return [Node.sector == sector.value]
    return [Node.sector.is_(None), Node.sector.is_not(None)]


def _fits(spec: InstanceTypeSpec) -> ColumnElement[bool]:
    if spec.whole_node:
        return and_(Node.gpu_count == spec.gpu_count, Node.gpus_free == spec.gpu_count)
    return Node.gpus_free >= spec.gpu_count


class _Outcome(enum.Enum):
    GROUP_FULL = "group_full"
    TRY_AGAIN = "try_again"


_GROUP_FULL = _Outcome.GROUP_FULL
_TRY_AGAIN = _Outcome.TRY_AGAIN

Attempt = tuple[Instance, NodeChoice] | _Outcome


async def _attempt(
    session: AsyncSession,
    spec: InstanceTypeSpec,
    group: ColumnElement[bool],
    tried: set[int],
    make_instance: InstanceFactory,
) -> Attempt:
    """Take one node of the group and place the instance on it, inside a savepoint."""
    taken: _TakenNode | None = None
    try:
        async with session.begin_nested():
            taken_or_outcome = await _take_node(session, spec, group, tried)
            if isinstance(taken_or_outcome, _Outcome):
                return taken_or_outcome
            taken = taken_or_outcome
            tried.add(taken.id)
            return await _insert_instance(session, spec, taken, make_instance)
    except IntegrityError:
        logger.warning(
            "GPU allocation on node %s lost a race to another create; trying the next node",
            taken.name if taken else "?",
        )
    except _CounterOutOfStep:
        logger.error(
            "node %s counts more free GPUs than it has unallocated; skipping it. "
            "Its gpus_free column needs repair.",
            taken.name if taken else "?",
        )
    return _TRY_AGAIN


@dataclass(frozen=True)
class _TakenNode:
    id: int
    name: str
    region: str
    sector: str | None
    gpu_count: int
    desired_version: int


async def _take_node(
    session: AsyncSession, spec: InstanceTypeSpec, group: ColumnElement[bool], tried: set[int]
) -> _TakenNode | _Outcome:
    """Take the GPUs of the best fitting node of the group with one conditional UPDATE.

    The node is picked by a subquery ``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so concurrent
    creates spread over nodes instead of queueing on the best one, and a transaction never
    holds one node while it waits for another. Only when every fitting node is locked does
    it wait, for the best one, and then ``TRY_AGAIN`` follows if that node filled up
    meanwhile. SQLite runs one write transaction at a time and ignores the locking clauses.
    """
    candidates = (
        select(Node.id)
        .where(Node.state == "active", Node.gpu_model == spec.gpu_model, group, _fits(spec))
        .order_by(Node.gpus_free, Node.id)
        .limit(1)
    )
    if tried:
        candidates = candidates.where(Node.id.not_in(tried))

    free_node = candidates.with_for_update(skip_locked=True).scalar_subquery()
    taken = await _take_gpus(session, spec, Node.id == free_node)
    if taken is not None:
        return taken

    busy_node_id = await session.scalar(candidates)
    if busy_node_id is None:
        return _GROUP_FULL
    taken = await _take_gpus(session, spec, Node.id == busy_node_id)
    return taken if taken is not None else _TRY_AGAIN


async def _take_gpus(
    session: AsyncSession, spec: InstanceTypeSpec, which: ColumnElement[bool]
) -> _TakenNode | None:
    """Decrement the counter of the node ``which`` selects if it still fits."""
    result = await session.execute(
        update(Node)
        .where(which, Node.state == "active", _fits(spec))
        .values(
            gpus_free=Node.gpus_free - spec.gpu_count,
            desired_version=Node.desired_version + 1,
        )
        .returning(
            Node.id, Node.name, Node.region, Node.sector, Node.gpu_count, Node.desired_version
        )
    )
    row = result.one_or_none()
    if row is None:
        return None
    return _TakenNode(
        id=row.id,
        name=row.name,
        region=row.region,
        sector=row.sector,
        gpu_count=row.gpu_count,
        desired_version=int(row.desired_version),
    )


async def _insert_instance(
    session: AsyncSession, spec: InstanceTypeSpec, node: _TakenNode, make_instance: InstanceFactory
) -> tuple[Instance, NodeChoice]:
    indices = await _free_gpu_indices(session, node, spec.gpu_count)
    if len(indices) < spec.gpu_count:
        raise _CounterOutOfStep()

    choice = NodeChoice(
        node_id=node.id,
        node_name=node.name,
        region=node.region,
        sector=node.sector,
        gpu_indices=indices,
        desired_version=node.desired_version,
    )
    instance = make_instance(choice)
    session.add(instance)
    await session.flush()
    session.add_all(
        GpuAllocation(node_id=node.id, gpu_index=index, instance_id=instance.id)
        for index in indices
    )
    await session.flush()
    return instance, choice


async def _free_gpu_indices(
    session: AsyncSession, node: _TakenNode, count: int
) -> tuple[int, ...]:
    taken = set(
        (
            await session.execute(
                select(GpuAllocation.gpu_index).where(GpuAllocation.node_id == node.id)
            )
        )
        .scalars()
        .all()
    )
    free = [index for index in range(node.gpu_count) if index not in taken]
    return tuple(free[:count])


async def _capacity_message(
    session: AsyncSession, instance_type: InstanceType, sector: Sector | None, retry_after: int
) -> str:
    spec = instance_type.spec
    wanted = f"{instance_type.value} in {sector.value}" if sector else instance_type.value
    places = await _capacity_by_place(session, spec)
    if not places:
        return f"No capacity for {wanted}: no node has room. Retry after {retry_after} seconds."

    unit = "free node" if spec.whole_node else "free GPU"
    listed = ", ".join(
        f"{region}/{place_sector or 'no sector'} ({count} {unit}{'s' if count > 1 else ''})"
        for region, place_sector, count in places
    )
    hint = "request one of those sectors or omit sector" if sector else "retry shortly"
    return f"No capacity for {wanted}. Capacity exists in: {listed}; {hint}."


async def _capacity_by_place(
    session: AsyncSession, spec: InstanceTypeSpec
) -> list[tuple[str, str | None, int]]:
    amount = func.count() if spec.whole_node else func.sum(Node.gpus_free)
    rows = await session.execute(
        select(Node.region, Node.sector, amount)
        .where(Node.state == "active", Node.gpu_model == spec.gpu_model, _fits(spec))
        .group_by(Node.region, Node.sector)
        .order_by(Node.region, Node.sector)
    )
    return [(region, sector, int(count)) for region, sector, count in rows.all()]
