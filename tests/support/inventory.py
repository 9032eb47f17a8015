"""Database checks of the GPU inventory invariants, shared by the placement and scale tests."""

from __future__ import annotations

from sqlalchemy import func, select

from computeplane.store.database import Database
from computeplane.store.models import GpuAllocation, Node


async def gpus_free(database: Database) -> dict[str, int]:
    """Return each node's ``gpus_free`` counter by node name."""
    async with database.read() as session:
        rows = await session.execute(select(Node.name, Node.gpus_free))
        return {name: free for name, free in rows.all()}


async def counter_mismatches(database: Database) -> dict[str, tuple[int, int]]:
    """Return ``{node: (gpus_free, gpu_count - allocation rows)}`` for every node that differs."""
    async with database.read() as session:
        counted = await session.execute(
            select(GpuAllocation.node_id, func.count()).group_by(GpuAllocation.node_id)
        )
        used = {node_id: count for node_id, count in counted.all()}
        nodes = (await session.execute(select(Node))).scalars().all()
    mismatches = {}
    for item in nodes:
        expected = item.gpu_count - used.get(item.id, 0)
        if item.gpus_free != expected:
            mismatches[item.name] = (item.gpus_free, expected)
    return mismatches


async def shared_gpus(database: Database) -> list[tuple[int, int, int]]:
    """Return every (node id, GPU index, row count) held by more than one allocation row."""
    async with database.read() as session:
        rows = await session.execute(
            select(GpuAllocation.node_id, GpuAllocation.gpu_index, func.count())
            .group_by(GpuAllocation.node_id, GpuAllocation.gpu_index)
            .having(func.count() > 1)
        )
        return [(node_id, index, count) for node_id, index, count in rows.all()]
