"""Concurrent creates against real ``computeplane api`` processes, checked in the database.

On PostgreSQL two API processes share one database and clients spread their requests over
both, so transactions of different processes race for the same rows. On SQLite one process
serves the file. No agent runs, so every instance stays ``pending`` and keeps its GPUs.

Each test sends its burst and then checks the invariants in the database itself. No GPU is
given twice, node counters equal their allocation rows, an idempotency key runs one create,
and a GPU quota is never exceeded, not even for a moment.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from replica_support import (
    Outcome,
    PlannedRequest,
    ReplicaSet,
    running_replicas,
    send_concurrently,
)
from sqlalchemy import func, select

from computeplane.domain.catalog import InstanceType, Region, Sector
from computeplane.domain.fleet import NodeSpec
from computeplane.domain.status import InstanceStatus
from computeplane.store.database import Database
from computeplane.store.models import (
    GpuAllocation,
    Instance,
    InstanceEvent,
    Node,
    Organization,
)
from conftest import add_nodes, make_key, node
from support.inventory import counter_mismatches, shared_gpus
from support.postgres import PostgresServer

pytestmark = pytest.mark.e2e

ONE = InstanceType.GPU_1X_H100_SXM5
EIGHT = InstanceType.GPU_8X_H100_SXM5

# 10 nodes of 8 GPUs: four outside any sector and two in each InfiniBand sector.
FLEET: tuple[NodeSpec, ...] = (
    node("plain-west-1", region=Region.US_WEST),
    node("plain-west-2", region=Region.US_WEST),
    node("plain-east-1", region=Region.US_EAST),
    node("plain-east-2", region=Region.US_EAST),
    node("ib1-west-1", region=Region.US_WEST, sector=Sector.SECTOR_1),
    node("ib1-west-2", region=Region.US_WEST, sector=Sector.SECTOR_1),
    node("ib2-east-1", region=Region.US_EAST, sector=Sector.SECTOR_2),
    node("ib2-east-2", region=Region.US_EAST, sector=Sector.SECTOR_2),
    node("ib3-north-1", region=Region.EU_NORTH, sector=Sector.SECTOR_3),
    node("ib3-north-2", region=Region.EU_NORTH, sector=Sector.SECTOR_3),
)
FLEET_GPUS = 80

# The capacity race: request i uses mix entry i % 8 and organization i % 13. Every whole-node
# request names a sector, so only 1x requests can use the nodes outside sectors. Every run
# therefore packs single GPUs onto shared nodes, whichever requests win the sector nodes.
CAPACITY_REQUESTS = 1000
CAPACITY_MIX: tuple[tuple[InstanceType, Sector | None], ...] = (
    (ONE, None),
    (EIGHT, Sector.SECTOR_1),
    (ONE, None),
    (EIGHT, Sector.SECTOR_2),
    (ONE, None),
    (EIGHT, Sector.SECTOR_3),
    (ONE, None),
    (ONE, None),
)
NON_SECTOR_GPUS = 32
CAPACITY_ORGANIZATIONS = 13
# One of the racing organizations has a small quota, so quota rejections happen mid-race.
LIMITED_ORGANIZATION_QUOTA = 2

IDEMPOTENT_REQUESTS = 100

QUOTA = 8
QUOTA_REQUESTS = 50
SAMPLE_INTERVAL_SECONDS = 0.005

SETUPS = [
    pytest.param("postgresql", marks=pytest.mark.postgres, id="postgresql-2-replicas"),
    pytest.param("sqlite", id="sqlite-1-replica"),
]


@pytest.fixture(params=SETUPS)
def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReplicaSet]:
    """Two API processes on a new PostgreSQL database, or one on a new SQLite file."""
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        url = server.create_database(f"replicas_{uuid.uuid4().hex[:12]}")
        count = 2
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'computeplane.db'}"
        count = 1
    with running_replicas(tmp_path / "data", url, count) as replica_set:
        yield replica_set


@pytest.fixture
async def replica_database(replicas: ReplicaSet) -> AsyncIterator[Database]:
    """The replicas' database, opened by the test process on connections of its own."""
    database = Database(replicas.database_url)
    await add_nodes(database, *FLEET)
    yield database
    await database.dispose()


def create_body(
    ssh_key: str, instance_type: InstanceType, sector: Sector | None
) -> dict[str, str]:
    body = {"instance_type": instance_type.value, "ssh_key": ssh_key}
    if sector is not None:
        body["sector"] = sector.value
    return body


def status_summary(outcomes: list[Outcome]) -> str:
    """Return how many outcomes had each (status, error code), for assertion messages."""
    counted = Counter(
        (outcome.status, outcome.error_code() or outcome.transport_error) for outcome in outcomes
    )
    return ", ".join(f"{status} {code}: {count}" for (status, code), count in counted.items())


def rejection_problems(outcome: Outcome, status: int, code: str, *, retry_after: bool) -> str:
    """Return what keeps ``outcome`` from being a clean rejection, or "" if nothing does.

    A clean rejection has ``status``, fal's error envelope with ``code`` and, if
    ``retry_after`` is set, a ``Retry-After`` header of whole positive seconds.
    """
    if outcome.status != status:
        return f"status is not {status}"
    try:
        error = outcome.json()["error"]
    except (ValueError, KeyError, TypeError):
        return "body is not an error envelope"
    if not isinstance(error, dict) or set(error) != {"type", "message", "code", "request_id"}:
        return "error envelope lacks type, message, code or request_id"
    if error["code"] != code:
        return f"error code is not {code}"
    header = outcome.headers.get("Retry-After", "")
    if retry_after and not (header.isdigit() and int(header) > 0):
        return f"Retry-After is not positive whole seconds: {header!r}"
    return ""


async def organization_id(database: Database, name: str) -> int:
    async with database.read() as session:
        found = await session.scalar(select(Organization.id).where(Organization.name == name))
    assert found is not None, f"organization {name} is not stored"
    return int(found)


@dataclass(frozen=True)
class Inventory:
    """The fleet's GPUs as the database counts them."""

    gpus: int
    free: int
    allocated: int


async def inventory(database: Database) -> Inventory:
    async with database.read() as session:
        gpus = await session.scalar(select(func.coalesce(func.sum(Node.gpu_count), 0)))
        free = await session.scalar(select(func.coalesce(func.sum(Node.gpus_free), 0)))
        allocated = await session.scalar(select(func.count()).select_from(GpuAllocation))
    return Inventory(int(gpus or 0), int(free or 0), int(allocated or 0))


@dataclass(frozen=True)
class StoredInstance:
    """An instance row with what the created-instance check compares."""

    public_id: str
    organization: str
    instance_type: str
    sector: str | None
    node_id: int
    allocated_gpus: int
    allocation_nodes: frozenset[int]


async def stored_instances(database: Database) -> dict[str, StoredInstance]:
    async with database.read() as session:
        rows = await session.execute(
            select(
                Instance.id,
                Instance.public_id,
                Organization.name,
                Instance.instance_type,
                Instance.sector,
                Instance.node_id,
            ).join(Organization, Organization.id == Instance.organization_id)
        )
        instances = rows.all()
        allocation_rows = await session.execute(
            select(GpuAllocation.instance_id, GpuAllocation.node_id)
        )
        allocations: dict[int, list[int]] = {}
        for instance_id, node_id in allocation_rows.all():
            allocations.setdefault(instance_id, []).append(node_id)
    return {
        public_id: StoredInstance(
            public_id=public_id,
            organization=organization,
            instance_type=instance_type,
            sector=sector,
            node_id=node_id,
            allocated_gpus=len(allocations.get(row_id, [])),
            allocation_nodes=frozenset(allocations.get(row_id, [])),
        )
        for row_id, public_id, organization, instance_type, sector, node_id in instances
    }


async def held_by_organization(database: Database, organization: int) -> tuple[int, int]:
    """Return the organization's (allocated GPUs, instance rows) in one read transaction."""
    async with database.read() as session:
        gpus = await session.scalar(
            select(func.count())
            .select_from(GpuAllocation)
            .join(Instance, Instance.id == GpuAllocation.instance_id)
            .where(Instance.organization_id == organization)
        )
        instances = await session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.organization_id == organization)
        )
    return int(gpus or 0), int(instances or 0)


@dataclass
class HoldingSampler:
    """The maximum GPUs and instances of one organization seen by polling until stopped."""

    database: Database
    organization: int
    max_gpus: int = 0
    max_instances: int = 0
    samples: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample()
            await asyncio.sleep(SAMPLE_INTERVAL_SECONDS)

    async def sample(self) -> None:
        gpus, instances = await held_by_organization(self.database, self.organization)
        self.max_gpus = max(self.max_gpus, gpus)
        self.max_instances = max(self.max_instances, instances)
        self.samples += 1


async def test_capacity_race_allocates_once(
    replicas: ReplicaSet, replica_database: Database, ed25519_key: str
) -> None:
    limited = "org-limited"
    keys = {
        limited: await make_key(
            replica_database, limited, "lim", gpu_quota=LIMITED_ORGANIZATION_QUOTA
        )
    }
    for number in range(1, CAPACITY_ORGANIZATIONS):
        keys[f"org-{number}"] = await make_key(replica_database, f"org-{number}", f"user-{number}")
    organizations = list(keys)
    plan = [
        (organizations[index % CAPACITY_ORGANIZATIONS], *CAPACITY_MIX[index % len(CAPACITY_MIX)])
        for index in range(CAPACITY_REQUESTS)
    ]
    requests = [
        PlannedRequest(keys[organization], create_body(ed25519_key, instance_type, sector))
        for organization, instance_type, sector in plan
    ]

    outcomes = await send_concurrently(replicas.base_urls, requests)

    created = [outcome for outcome in outcomes if outcome.status == 201]
    unexpected = []
    for outcome in outcomes:
        if outcome.status == 201:
            continue
        capacity = rejection_problems(outcome, 503, "insufficient_capacity", retry_after=True)
        quota = rejection_problems(outcome, 403, "quota_exceeded", retry_after=False)
        if capacity and quota:
            unexpected.append(f"{outcome.describe()} ({capacity}; {quota})")
    assert unexpected == [], f"{status_summary(outcomes)}; first ones:\n" + "\n".join(
        unexpected[:20]
    )

    quota_rejected = {plan[o.index][0] for o in outcomes if o.status == 403}
    assert quota_rejected == {limited}
    assert Counter(outcome.status for outcome in outcomes)[503] > 0

    assert await shared_gpus(replica_database) == []
    assert await counter_mismatches(replica_database) == {}
    counted = await inventory(replica_database)
    assert counted.gpus == FLEET_GPUS
    assert counted.allocated + counted.free == FLEET_GPUS
    assert counted.free == 0, "a 1x create gets 503 only with every GPU taken, and no GPU is freed"

    created_ids = [outcome.json()["id"] for outcome in created]
    assert len(set(created_ids)) == len(created_ids)
    single_gpu = [o for o in created if o.json()["instance_type"] == ONE.value]
    assert len(single_gpu) >= NON_SECTOR_GPUS, "only 1x requests can use nodes outside sectors"

    stored = await stored_instances(replica_database)
    assert sorted(stored) == sorted(created_ids), "instance rows differ from the 201 responses"
    wrong = []
    for outcome in created:
        organization, instance_type, sector = plan[outcome.index]
        instance = stored[outcome.json()["id"]]
        expected = StoredInstance(
            public_id=instance.public_id,
            organization=organization,
            instance_type=instance_type.value,
            sector=sector.value if sector is not None else instance.sector,
            node_id=instance.node_id,
            allocated_gpus=instance_type.spec.gpu_count,
            allocation_nodes=frozenset({instance.node_id}),
        )
        if instance != expected:
            wrong.append(f"{outcome.describe()}: stored {instance}")
    assert wrong == [], "\n".join(wrong[:20])
    assert sum(instance.allocated_gpus for instance in stored.values()) == counted.allocated


async def test_idempotent_burst_creates_once(
    replicas: ReplicaSet, replica_database: Database, ed25519_key: str
) -> None:
    key = await make_key(replica_database, "org-retry", "rita")
    body = create_body(ed25519_key, ONE, None)
    idempotency_key = f"burst-{uuid.uuid4()}"
    requests = [PlannedRequest(key, body, idempotency_key)] * IDEMPOTENT_REQUESTS

    outcomes = await send_concurrently(replicas.base_urls, requests)

    stored = await stored_instances(replica_database)
    assert len(stored) == 1, status_summary(outcomes)
    assert await inventory(replica_database) == Inventory(
        gpus=FLEET_GPUS, free=FLEET_GPUS - 1, allocated=1
    )

    created = [outcome for outcome in outcomes if outcome.status == 201]
    fresh = [o for o in created if o.headers.get("Idempotent-Replayed") != "true"]
    assert len(fresh) == 1, status_summary(outcomes)
    assert {outcome.body for outcome in created} == {fresh[0].body}
    assert list(stored) == [fresh[0].json()["id"]]

    unexpected = []
    for outcome in outcomes:
        if outcome.status == 201:
            continue
        problem = rejection_problems(
            outcome, 409, "idempotency_request_in_flight", retry_after=True
        )
        if problem:
            unexpected.append(f"{outcome.describe()} ({problem})")
    assert unexpected == [], f"{status_summary(outcomes)}; first ones:\n" + "\n".join(
        unexpected[:20]
    )


async def test_quota_never_exceeded_midway(
    replicas: ReplicaSet, replica_database: Database, ed25519_key: str
) -> None:
    key = await make_key(replica_database, "org-quota", "quinn", gpu_quota=QUOTA)
    organization = await organization_id(replica_database, "org-quota")
    requests = [PlannedRequest(key, create_body(ed25519_key, ONE, None))] * QUOTA_REQUESTS
    sampler = HoldingSampler(replica_database, organization)
    stop = asyncio.Event()

    sampling = asyncio.create_task(sampler.run(stop))
    try:
        outcomes = await send_concurrently(replicas.base_urls, requests)
    finally:
        stop.set()
        await sampling
    samples_during_burst = sampler.samples
    await sampler.sample()

    statuses = Counter(outcome.status for outcome in outcomes)
    assert statuses == {201: QUOTA, 403: QUOTA_REQUESTS - QUOTA}, status_summary(outcomes)
    problems = [
        f"{outcome.describe()} ({problem})"
        for outcome in outcomes
        if outcome.status != 201
        and (problem := rejection_problems(outcome, 403, "quota_exceeded", retry_after=False))
    ]
    assert problems == []

    assert samples_during_burst >= 2, "the sampler must poll while the creates run"
    assert sampler.max_gpus == QUOTA, f"{sampler.samples} samples"
    assert sampler.max_instances == QUOTA, f"{sampler.samples} samples"
    assert await held_by_organization(replica_database, organization) == (QUOTA, QUOTA)

    async with replica_database.read() as session:
        stopped = await session.scalar(
            select(func.count())
            .select_from(InstanceEvent)
            .join(Instance, Instance.id == InstanceEvent.instance_id)
            .where(
                Instance.organization_id == organization,
                InstanceEvent.to_status == InstanceStatus.STOPPED,
            )
        )
    assert stopped == 0
