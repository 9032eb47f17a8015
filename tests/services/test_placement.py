"""Placement through the create service: best fit, sectors, draining, GPU indices, counters.

Every test runs on SQLite and PostgreSQL. The GPU accounting rule checked throughout is
``nodes.gpus_free == gpu_count - count(gpu_allocations of the node)``.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from computeplane.domain.agent import ObservedState
from computeplane.domain.catalog import InstanceType, Region, Sector
from computeplane.domain.errors import InsufficientCapacity
from computeplane.domain.fleet import NodeSpec
from computeplane.domain.sshkeys import parse_public_key
from computeplane.domain.status import ACTIVE_STATUSES, InstanceStatus
from computeplane.services import agents, auth, instances
from computeplane.services.agents import NodeIdentity, ObservedInstance, ObservedReport
from computeplane.services.auth import Principal
from computeplane.services.context import ServiceContext
from computeplane.services.instances import InstanceView
from computeplane.services.nodes import drain_node
from computeplane.store.database import Database
from computeplane.store.models import GpuAllocation, Instance, InstanceEvent, Node
from conftest import add_nodes, make_key, node
from support.inventory import counter_mismatches, gpus_free, shared_gpus

ONE = InstanceType.GPU_1X_H100_SXM5
EIGHT = InstanceType.GPU_8X_H100_SXM5


async def principal_for(
    database: Database, organization: str, *, gpu_quota: int | None = None
) -> Principal:
    """Create an organization with one admin key and return the key's principal."""
    value = await make_key(database, organization, f"{organization}-admin", gpu_quota=gpu_quota)
    key_id, secret = value.split(":", 1)
    return await auth.authenticate(database, key_id, secret.encode())


@pytest.fixture
async def principal(database: Database) -> Principal:
    return await principal_for(database, "org-place")


@pytest.fixture
def key_line(ed25519_key: str) -> str:
    return parse_public_key(ed25519_key).line


async def create(
    context: ServiceContext,
    principal: Principal,
    key_line: str,
    instance_type: InstanceType = ONE,
    sector: Sector | None = None,
) -> InstanceView:
    return await instances.create_instance(context, principal, instance_type, key_line, sector)


async def node_of(database: Database, public_id: str) -> str:
    async with database.read() as session:
        name = await session.scalar(
            select(Node.name)
            .join(Instance, Instance.node_id == Node.id)
            .where(Instance.public_id == public_id)
        )
    assert name is not None, f"instance {public_id} is not stored"
    return name


async def gpu_indices_of(database: Database, public_id: str) -> list[int]:
    async with database.read() as session:
        rows = await session.execute(
            select(GpuAllocation.gpu_index)
            .join(Instance, Instance.id == GpuAllocation.instance_id)
            .where(Instance.public_id == public_id)
            .order_by(GpuAllocation.gpu_index)
        )
        return list(rows.scalars().all())


async def node_row(database: Database, name: str) -> Node:
    async with database.read() as session:
        return (await session.execute(select(Node).where(Node.name == name))).scalar_one()


async def report_node(context: ServiceContext, name: str) -> None:
    """Send the report of an agent that applied the node's latest desired version.

    Active instances are reported as starting, so only stopped (deleted) instances are
    missing from the report. For those instances the report confirms the teardown.
    """
    database = context.database
    async with database.read() as session:
        found = (await session.execute(select(Node).where(Node.name == name))).scalar_one()
        active = (
            await session.execute(
                select(Instance.public_id).where(
                    Instance.node_id == found.id,
                    Instance.released_at.is_(None),
                    Instance.status.in_(ACTIVE_STATUSES),
                )
            )
        ).scalars()
        observed = [ObservedInstance(public_id, ObservedState.STARTING) for public_id in active]
    report = ObservedReport(applied_version=found.desired_version, instances=observed)
    await agents.apply_report(context, NodeIdentity(found.id, found.name), report)


@pytest.mark.parametrize("order", ["small_first", "large_first"])
async def test_1x_best_fit_fullest_node(
    context: ServiceContext, principal: Principal, key_line: str, order: str
) -> None:
    specs = [node("small", gpus=3), node("large", gpus=8)]
    if order == "large_first":
        specs.reverse()
    await add_nodes(context.database, *specs)

    view = await create(context, principal, key_line)

    assert await node_of(context.database, view.public_id) == "small"


async def test_1x_best_fit_after_partial_use(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("first"), node("second"))
    first = await create(context, principal, key_line)
    second = await create(context, principal, key_line)

    assert await node_of(context.database, first.public_id) == "first"
    assert await node_of(context.database, second.public_id) == "first"


async def test_1x_prefers_non_sector_node(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("ib", sector=Sector.SECTOR_1))
    for _ in range(5):
        await create(context, principal, key_line)
    await add_nodes(context.database, node("plain"))

    view = await create(context, principal, key_line)

    assert (await gpus_free(context.database))["ib"] == 3
    assert await node_of(context.database, view.public_id) == "plain"
    assert view.sector is None


async def test_1x_uses_sector_node_last(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("plain", gpus=1), node("ib", sector=Sector.SECTOR_2))
    first = await create(context, principal, key_line)
    second = await create(context, principal, key_line)

    assert await node_of(context.database, first.public_id) == "plain"
    assert await node_of(context.database, second.public_id) == "ib"
    assert second.sector == "sector_2"


async def test_8x_prefers_non_sector_node(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(
        context.database,
        node("ib", sector=Sector.SECTOR_1, region=Region.US_EAST),
        node("plain", region=Region.EU_NORTH),
    )

    first = await create(context, principal, key_line, EIGHT)
    second = await create(context, principal, key_line, EIGHT)

    assert await node_of(context.database, first.public_id) == "plain"
    assert first.sector is None
    assert first.region == "eu-north"
    assert await node_of(context.database, second.public_id) == "ib"
    assert second.sector == "sector_1"
    assert second.region == "us-east"


async def test_8x_sector_stays_in_sector(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(
        context.database,
        node("plain"),
        node("ib1", sector=Sector.SECTOR_1),
        node("ib2", sector=Sector.SECTOR_2),
    )

    view = await create(context, principal, key_line, EIGHT, Sector.SECTOR_2)

    assert await node_of(context.database, view.public_id) == "ib2"
    assert view.sector == "sector_2"


async def test_8x_skips_partly_used_node(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("a"), node("b"))
    small = await create(context, principal, key_line)

    whole = await create(context, principal, key_line, EIGHT)

    assert await node_of(context.database, small.public_id) == "a"
    assert await node_of(context.database, whole.public_id) == "b"
    with pytest.raises(InsufficientCapacity):
        await create(context, principal, key_line, EIGHT)


async def test_8x_skips_smaller_node(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("four", gpus=4))

    with pytest.raises(InsufficientCapacity):
        await create(context, principal, key_line, EIGHT)


@pytest.mark.parametrize(
    ("instance_type", "drained", "other"),
    [
        (ONE, node("drained", gpus=3), node("other")),
        (EIGHT, node("drained"), node("other", sector=Sector.SECTOR_1)),
    ],
    ids=["1x", "8x"],
)
async def test_draining_node_skipped(
    context: ServiceContext,
    principal: Principal,
    key_line: str,
    instance_type: InstanceType,
    drained: NodeSpec,
    other: NodeSpec,
) -> None:
    # Without draining, "drained" is the node placement picks first for this type.
    await add_nodes(context.database, drained, other)
    await drain_node(context.database, "drained")

    view = await create(context, principal, key_line, instance_type)

    assert await node_of(context.database, view.public_id) == "other"


@pytest.mark.parametrize("instance_type", [ONE, EIGHT])
async def test_draining_only_node_no_capacity(
    context: ServiceContext, principal: Principal, key_line: str, instance_type: InstanceType
) -> None:
    await add_nodes(context.database, node("drained"))
    await drain_node(context.database, "drained")

    with pytest.raises(InsufficientCapacity):
        await create(context, principal, key_line, instance_type)


async def test_1x_indices_distinct_in_range(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("five", gpus=5))
    views = [await create(context, principal, key_line) for _ in range(5)]

    indices_per_instance = [
        await gpu_indices_of(context.database, view.public_id) for view in views
    ]
    all_indices = sorted(index for indices in indices_per_instance for index in indices)

    assert all(len(indices) == 1 for indices in indices_per_instance), indices_per_instance
    assert all_indices == list(range(5))
    with pytest.raises(InsufficientCapacity):
        await create(context, principal, key_line)


async def test_8x_takes_indices_0_to_7(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    await add_nodes(context.database, node("whole"))

    view = await create(context, principal, key_line, EIGHT)

    assert await gpu_indices_of(context.database, view.public_id) == list(range(8))
    assert (await gpus_free(context.database))["whole"] == 0


async def test_concurrent_1x_fill_every_gpu(context: ServiceContext, key_line: str) -> None:
    database = context.database
    await add_nodes(database, node("a"), node("b"), node("c"))
    # One organization per request, so that the quota's organization lock does not
    # serialize them and PostgreSQL runs the placements concurrently.
    principals = [await principal_for(database, f"org-{number}") for number in range(24)]

    views = await asyncio.gather(*(create(context, each, key_line) for each in principals))

    async with database.read() as session:
        rows = (
            await session.execute(select(GpuAllocation.node_id, GpuAllocation.gpu_index))
        ).all()
    assert len({view.public_id for view in views}) == 24
    assert len(rows) == 24
    assert await shared_gpus(database) == []
    assert await gpus_free(database) == {"a": 0, "b": 0, "c": 0}
    assert await counter_mismatches(database) == {}
    with pytest.raises(InsufficientCapacity):
        await create(context, principals[0], key_line)


@pytest.mark.parametrize("instance_type", [ONE, EIGHT])
async def test_failed_create_leaves_nothing(
    context: ServiceContext, principal: Principal, key_line: str, instance_type: InstanceType
) -> None:
    database = context.database
    await add_nodes(database, node("busy"))
    await create(context, principal, key_line, EIGHT)
    version_before = (await node_row(database, "busy")).desired_version

    with pytest.raises(InsufficientCapacity):
        await create(context, principal, key_line, instance_type)

    async with database.read() as session:
        instance_count = await session.scalar(select(func.count()).select_from(Instance))
        event_count = await session.scalar(select(func.count()).select_from(InstanceEvent))
    assert instance_count == 1
    assert event_count == 1
    assert (await node_row(database, "busy")).desired_version == version_before
    assert await counter_mismatches(database) == {}


async def test_counters_match_after_mixed_sequence(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    database = context.database
    await add_nodes(database, node("a"), node("b", gpus=3), node("ib", sector=Sector.SECTOR_1))

    ones = [await create(context, principal, key_line) for _ in range(5)]
    whole = await create(context, principal, key_line, EIGHT, Sector.SECTOR_1)
    assert await counter_mismatches(database) == {}

    for view in (ones[0], ones[3], whole):
        await instances.delete_instance(context, principal, view.public_id)
    # Deleted instances keep their GPUs until their node confirms the teardown.
    assert await gpus_free(database) == {"a": 6, "b": 0, "ib": 0}
    assert await counter_mismatches(database) == {}

    for name in ("a", "b", "ib"):
        await report_node(context, name)
    assert await gpus_free(database) == {"a": 7, "b": 1, "ib": 8}
    assert await counter_mismatches(database) == {}

    refill = [await create(context, principal, key_line) for _ in range(2)]
    await instances.delete_instance(context, principal, ones[1].public_id)
    await report_node(context, await node_of(database, ones[1].public_id))
    assert [await node_of(database, view.public_id) for view in refill] == ["b", "a"]
    assert await counter_mismatches(database) == {}
    assert await shared_gpus(database) == []


async def test_teardown_confirmation_frees_once(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    database = context.database
    await add_nodes(database, node("a"))
    running = await create(context, principal, key_line)
    deleted = await create(context, principal, key_line)
    await instances.delete_instance(context, principal, deleted.public_id)

    await report_node(context, "a")
    after_first = await gpus_free(database)
    await report_node(context, "a")
    after_second = await gpus_free(database)

    assert after_first == {"a": 7}
    assert after_second == after_first
    assert await counter_mismatches(database) == {}
    assert await gpu_indices_of(database, running.public_id) == [0]
    async with database.read() as session:
        stored = (
            await session.execute(select(Instance).where(Instance.public_id == running.public_id))
        ).scalar_one()
    assert stored.status == InstanceStatus.PROVISIONING
    assert stored.released_at is None


async def test_gpu_allocation_unique_constraint(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    database = context.database
    await add_nodes(database, node("a"))
    view = await create(context, principal, key_line)
    async with database.read() as session:
        allocation = (
            await session.execute(
                select(GpuAllocation)
                .join(Instance, Instance.id == GpuAllocation.instance_id)
                .where(Instance.public_id == view.public_id)
            )
        ).scalar_one()

    with pytest.raises(IntegrityError) as raised:
        async with database.write() as session:
            session.add(
                GpuAllocation(
                    node_id=allocation.node_id,
                    gpu_index=allocation.gpu_index,
                    instance_id=allocation.instance_id,
                )
            )

    assert "unique" in str(raised.value).lower()
    assert await counter_mismatches(database) == {}


async def test_8x_rejects_node_with_stale_counter(
    context: ServiceContext, principal: Principal, key_line: str
) -> None:
    database = context.database
    await add_nodes(database, node("a"))
    await create(context, principal, key_line)
    # Put the counter out of step with the allocation rows, so that it claims 8 free GPUs.
    async with database.write() as session:
        await session.execute(update(Node).where(Node.name == "a").values(gpus_free=8))

    with pytest.raises(InsufficientCapacity):
        await create(context, principal, key_line, EIGHT)
