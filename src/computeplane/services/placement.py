"""Placement: choosing a node and GPUs for a new instance inside the create transaction.

Rules:

- A whole-node type (8x) takes a node whose GPUs are all free, in the requested sector if
  one is given. A partial type (1x) takes the free GPUs of the node with the fewest free
  GPUs that still fits (best fit).
- Without a requested sector, nodes outside sectors come first, so that whole InfiniBand
  nodes stay free for the requests that need them.

Safety: the chosen node's row is locked, its ``gpus_free`` counter is taken with a
conditional UPDATE, and the GPU indices are then read under that lock.
The ``UNIQUE(node_id, gpu_index)`` constraint on ``gpu_allocations`` is the last word: a
conflicting insert rolls back to a savepoint and placement moves on to the next candidate. A
node whose counter promises more GPUs than it has free is skipped the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.catalog import InstanceType, InstanceTypeSpec, Sector
from computeplane.domain.errors import InsufficientCapacity
from computeplane.store.models import GpuAllocation, Instance, Node

logger = logging.getLogger(__name__)

#: Nodes one create tries per candidate group before it gives up on the group.
MAX_ATTEMPTS_PER_GROUP = 16


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

    Each attempt runs in a savepoint, so a lost race leaves nothing behind. Raises
    InsufficientCapacity, naming where capacity does exist, when no node has room.
    """
    spec = instance_type.spec
    for group in _candidate_groups(sector):
        tried: set[int] = set()
        for _ in range(MAX_ATTEMPTS_PER_GROUP):
            node = await _lock_candidate(session, spec, group, tried)
            if node is None:
                break
            tried.add(node.id)
            placed = await _try_node(session, node, spec, make_instance)
            if placed is not None:
                return placed

    message = await _capacity_message(session, instance_type, sector, retry_after)
    raise InsufficientCapacity(message, retry_after=retry_after)


def _candidate_groups(sector: Sector | None) -> list[ColumnElement[bool]]:
    if sector is not None:
        return [Node.sector == sector.value]
    return [Node.sector.is_(None), Node.sector.is_not(None)]


def _fits(spec: InstanceTypeSpec) -> ColumnElement[bool]:
    if spec.whole_node:
        return and_(Node.gpu_count == spec.gpu_count, Node.gpus_free == spec.gpu_count)
    return Node.gpus_free >= spec.gpu_count


async def _lock_candidate(
    session: AsyncSession, spec: InstanceTypeSpec, group: ColumnElement[bool], tried: set[int]
) -> Node | None:
    """Return the best node of the group that fits and is not in ``tried``, row-locked.

    On PostgreSQL the first query skips nodes that other creates have locked, so concurrent
    creates spread over nodes instead of queueing on the best one. Only when every fitting
    node is locked does the second query wait; PostgreSQL re-checks a row once its lock is
    released and moves on to the next fitting one if it no longer fits. SQLite runs one write
    transaction at a time, so there one plain query suffices.
    """
    query = (
        select(Node)
        .where(Node.state == "active", Node.gpu_model == spec.gpu_model, group, _fits(spec))
        .order_by(Node.gpus_free, Node.id)
        .limit(1)
    )
    if tried:
        query = query.where(Node.id.not_in(tried))

    if session.get_bind().dialect.name == "sqlite":
        return (await session.execute(query)).scalar_one_or_none()

    for skip_locked in (True, False):
        result = await session.execute(query.with_for_update(skip_locked=skip_locked))
        node = result.scalar_one_or_none()
        if node is not None:
            return node
    return None


async def _try_node(
    session: AsyncSession, node: Node, spec: InstanceTypeSpec, make_instance: InstanceFactory
) -> tuple[Instance, NodeChoice] | None:
    # A rolled-back savepoint expires the node, so its name is read beforehand.
    node_name = node.name
    try:
        async with session.begin_nested():
            version = await _take_gpus(session, node.id, spec)
            if version is None:
                return None
            indices = await _free_gpu_indices(session, node, spec.gpu_count)
            if len(indices) < spec.gpu_count:
                raise _CounterOutOfStep()
            choice = NodeChoice(
                node_id=node.id,
                node_name=node.name,
                region=node.region,
                sector=node.sector,
                gpu_indices=indices,
                desired_version=version,
            )
            instance = make_instance(choice)
            instance.node = node
            session.add(instance)
            await session.flush()
            session.add_all(
                GpuAllocation(node_id=node.id, gpu_index=index, instance_id=instance.id)
                for index in indices
            )
            await session.flush()
    except IntegrityError:
        logger.warning(
            "GPU allocation on node %s lost a race to another create; trying the next node",
            node_name,
        )
        return None
    except _CounterOutOfStep:
        logger.error(
            "node %s counts more free GPUs than it has unallocated; skipping it. "
            "Its gpus_free column needs repair.",
            node_name,
        )
        return None
    return instance, choice


async def _take_gpus(session: AsyncSession, node_id: int, spec: InstanceTypeSpec) -> int | None:
    """Decrement the node's free counter if it still fits; return the new desired version."""
    result = await session.execute(
        update(Node)
        .where(Node.id == node_id, Node.state == "active", _fits(spec))
        .values(
            gpus_free=Node.gpus_free - spec.gpu_count,
            desired_version=Node.desired_version + 1,
        )
        .returning(Node.desired_version)
    )
    version = result.scalar_one_or_none()
    return int(version) if version is not None else None


async def _free_gpu_indices(session: AsyncSession, node: Node, count: int) -> tuple[int, ...]:
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
