"""Capacity and quota through the HTTP API, with concurrent creates racing for the same GPUs.

The ``api`` client and the app share one event loop and a pool of 20 connections, so the
requests of one ``asyncio.gather`` interleave their transactions on PostgreSQL. On SQLite
write transactions run one at a time by design.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Protocol

import httpx
import pytest
from sqlalchemy import func, select

from computeplane.domain.catalog import Region, Sector
from computeplane.domain.status import InstanceStatus
from computeplane.services import agents
from computeplane.services.agents import NodeIdentity, ObservedReport
from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import GpuAllocation, Instance, InstanceEvent, Node, Organization
from conftest import Keys, add_nodes, make_key, node
from support.inventory import counter_mismatches, gpus_free, shared_gpus

INSTANCES = "/v1/compute/instances"
ONE = "gpu_1x_h100_sxm5"
EIGHT = "gpu_8x_h100_sxm5"


class CreateSender(Protocol):
    """Sends one create request with an API key and returns the response."""

    async def __call__(
        self, key: str, instance_type: str, sector: str | None = None
    ) -> httpx.Response: ...


@pytest.fixture
def post(api: httpx.AsyncClient, ed25519_key: str) -> CreateSender:

    async def send(key: str, instance_type: str, sector: str | None = None) -> httpx.Response:
        body = {"instance_type": instance_type, "ssh_key": ed25519_key}
        if sector is not None:
            body["sector"] = sector
        return await api.post(INSTANCES, json=body, headers=Keys.header(key))

    return send


async def organization_keys(database: Database, count: int) -> list[str]:
    """Create ``count`` organizations with one admin key each and return the keys.

    Creates of one organization take turns on its row lock for the quota check, so races
    between placements need requests from different organizations.
    """
    return [await make_key(database, f"org-{number}", f"user-{number}") for number in range(count)]


def error_of(response: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = response.json()["error"]
    return error


def assert_insufficient_capacity(response: httpx.Response, retry_after: int) -> None:
    assert response.status_code == 503, response.text
    assert error_of(response)["code"] == "insufficient_capacity"
    assert error_of(response)["type"] == "server_error"
    assert response.headers.get("Retry-After") == str(retry_after)


def assert_quota_exceeded(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert error_of(response)["code"] == "quota_exceeded"
    assert error_of(response)["type"] == "authorization_error"


async def node_of(database: Database, public_id: str) -> str:
    async with database.read() as session:
        name = await session.scalar(
            select(Node.name)
            .join(Instance, Instance.node_id == Node.id)
            .where(Instance.public_id == public_id)
        )
    assert name is not None, f"instance {public_id} is not stored"
    return name


async def allocations_by_node(database: Database) -> dict[str, list[tuple[int, int]]]:
    """Return each node's allocation rows as sorted (gpu_index, instance row id) pairs."""
    async with database.read() as session:
        rows = await session.execute(
            select(Node.name, GpuAllocation.gpu_index, GpuAllocation.instance_id)
            .join(Node, Node.id == GpuAllocation.node_id)
            .order_by(Node.name, GpuAllocation.gpu_index)
        )
        found: dict[str, list[tuple[int, int]]] = {}
        for name, gpu_index, instance_id in rows.all():
            found.setdefault(name, []).append((gpu_index, instance_id))
        return found


async def instance_count(database: Database) -> int:
    async with database.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Instance)) or 0)


async def confirm_teardown(context: ServiceContext, name: str) -> None:
    """Report, as the node's agent, that it applied the latest version and runs nothing."""
    async with context.database.read() as session:
        found = (await session.execute(select(Node).where(Node.name == name))).scalar_one()
    report = ObservedReport(applied_version=found.desired_version, instances=[])
    await agents.apply_report(context, NodeIdentity(found.id, found.name), report)


async def test_sector_race_single_winner(
    context: ServiceContext, database: Database, post: CreateSender
) -> None:
    retry_after = context.settings.capacity_retry_after_seconds
    await add_nodes(database, node("ib1-busy", sector=Sector.SECTOR_1, region=Region.US_EAST))
    busy_key = await make_key(database, "org-busy", "bea")
    busy = await post(busy_key, ONE)
    assert busy.status_code == 201, busy.text
    await add_nodes(
        database,
        node("ib1", sector=Sector.SECTOR_1, region=Region.US_EAST),
        node("ib2", sector=Sector.SECTOR_2),
        node("plain"),
    )
    keys = await organization_keys(database, 10)

    responses = await asyncio.gather(*(post(key, EIGHT, "sector_1") for key in keys))

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {201: 1, 503: 9}, [response.text for response in responses]
    [winner] = [response.json() for response in responses if response.status_code == 201]
    assert winner["sector"] == "sector_1"
    assert winner["region"] == "us-east"
    assert await node_of(database, winner["id"]) == "ib1"
    for response in responses:
        if response.status_code == 503:
            assert_insufficient_capacity(response, retry_after)

    allocations = await allocations_by_node(database)
    assert await shared_gpus(database) == []
    assert [index for index, _ in allocations["ib1"]] == list(range(8))
    assert len({instance_id for _, instance_id in allocations["ib1"]}) == 1
    assert len({instance_id for _, instance_id in allocations["ib1-busy"]}) == 1
    assert await instance_count(database) == 2
    assert await gpus_free(database) == {"ib1-busy": 7, "ib1": 0, "ib2": 8, "plain": 8}
    assert await counter_mismatches(database) == {}


async def test_last_gpus_race_three_winners(
    context: ServiceContext, database: Database, post: CreateSender
) -> None:
    retry_after = context.settings.capacity_retry_after_seconds
    await add_nodes(database, node("three", gpus=3))
    keys = await organization_keys(database, 10)

    responses = await asyncio.gather(*(post(key, ONE) for key in keys))

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {201: 3, 503: 7}, [response.text for response in responses]
    for response in responses:
        if response.status_code == 503:
            assert_insufficient_capacity(response, retry_after)
    allocations = await allocations_by_node(database)
    assert [index for index, _ in allocations["three"]] == [0, 1, 2]
    assert len({instance_id for _, instance_id in allocations["three"]}) == 3
    assert await shared_gpus(database) == []
    assert await gpus_free(database) == {"three": 0}
    assert await counter_mismatches(database) == {}


async def test_quota_race_caps_instances(database: Database, post: CreateSender) -> None:
    await add_nodes(database, node("a"), node("b"), node("c"))
    key = await make_key(database, "org-quota", "quinn", gpu_quota=8)

    responses = await asyncio.gather(*(post(key, ONE) for _ in range(20)))

    statuses = Counter(response.status_code for response in responses)
    assert statuses == {201: 8, 403: 12}, [response.text for response in responses]
    for response in responses:
        if response.status_code == 403:
            assert_quota_exceeded(response)

    created = {response.json()["id"] for response in responses if response.status_code == 201}
    async with database.read() as session:
        stored = (
            await session.execute(
                select(Instance.public_id, Instance.status)
                .join(Organization, Organization.id == Instance.organization_id)
                .where(Organization.name == "org-quota")
            )
        ).all()
        stopped_events = await session.scalar(
            select(func.count())
            .select_from(InstanceEvent)
            .where(InstanceEvent.to_status == InstanceStatus.STOPPED)
        )
        allocated = await session.scalar(select(func.count()).select_from(GpuAllocation))
    assert {public_id for public_id, _ in stored} == created
    assert {status for _, status in stored} == {InstanceStatus.PENDING}
    assert stopped_events == 0
    assert allocated == 8
    assert await counter_mismatches(database) == {}


async def test_quota_8x_then_1x_rejected(database: Database, post: CreateSender) -> None:
    await add_nodes(database, node("a"), node("b"))
    key = await make_key(database, "org-quota", "quinn", gpu_quota=8)

    whole = await post(key, EIGHT)
    single = await post(key, ONE)

    assert whole.status_code == 201, whole.text
    assert_quota_exceeded(single)
    assert await instance_count(database) == 1
    assert await gpus_free(database) == {"a": 0, "b": 8}


async def test_quota_counts_deleted_gpus_until_released(
    context: ServiceContext, database: Database, api: httpx.AsyncClient, post: CreateSender
) -> None:
    await add_nodes(database, node("a"), node("b"))
    key = await make_key(database, "org-quota", "quinn", gpu_quota=8)
    whole = await post(key, EIGHT)
    assert whole.status_code == 201, whole.text
    whole_id = whole.json()["id"]

    deleted = await api.delete(f"{INSTANCES}/{whole_id}", headers=Keys.header(key))
    before_release = await post(key, ONE)
    await confirm_teardown(context, await node_of(database, whole_id))
    after_release = await post(key, ONE)

    assert deleted.status_code == 204, deleted.text
    assert_quota_exceeded(before_release)
    assert after_release.status_code == 201, after_release.text
    assert await counter_mismatches(database) == {}


async def test_full_sector_names_free_sector(
    context: ServiceContext, database: Database, post: CreateSender
) -> None:
    await add_nodes(
        database,
        node("ib2", sector=Sector.SECTOR_2),
        node("ib1", sector=Sector.SECTOR_1),
        node("plain"),
    )
    first_key, second_key = await organization_keys(database, 2)
    first = await post(first_key, EIGHT, "sector_2")
    assert first.status_code == 201, first.text

    response = await post(second_key, EIGHT, "sector_2")

    assert_insufficient_capacity(response, context.settings.capacity_retry_after_seconds)
    assert "sector_1" in error_of(response)["message"]
    assert await instance_count(database) == 1
    assert await gpus_free(database) == {"ib2": 0, "ib1": 8, "plain": 8}


async def test_sector_with_1x_rejected(database: Database, post: CreateSender) -> None:
    await add_nodes(database, node("ib1", sector=Sector.SECTOR_1), node("plain"))
    [key] = await organization_keys(database, 1)

    response = await post(key, ONE, "sector_1")

    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "validation_error"
    assert "sector" in error_of(response)["message"]
    assert await instance_count(database) == 0


@pytest.mark.parametrize(
    ("instance_type", "filled"),
    [(ONE, True), (EIGHT, True), (ONE, False), (EIGHT, False)],
    ids=["1x-full", "8x-full", "1x-no-nodes", "8x-no-nodes"],
)
async def test_no_capacity_names_nothing(
    context: ServiceContext,
    database: Database,
    post: CreateSender,
    instance_type: str,
    filled: bool,
) -> None:
    [key] = await organization_keys(database, 1)
    if filled:
        await add_nodes(database, node("ib1", sector=Sector.SECTOR_1), node("plain"))
        for _ in range(2):
            assert (await post(key, EIGHT)).status_code == 201

    response = await post(key, instance_type)

    message = error_of(response)["message"]
    assert_insufficient_capacity(response, context.settings.capacity_retry_after_seconds)
    assert "no node has room" in message
    assert "us-west" not in message
    assert "sector_1" not in message
