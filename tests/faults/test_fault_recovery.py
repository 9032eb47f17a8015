"""Fault recovery with real processes: SIGKILL, SIGSTOP and dead lease holders.

Every test starts its own ``computeplane`` processes on its own database, data directory,
loopback address pool and SSH port. The split-role tests run on PostgreSQL, the role layout
meant for several processes; the all-in-one ``serve`` test runs on SQLite and PostgreSQL.
Waits poll with generous deadlines; no test asserts how fast recovery is.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from fault_support import (
    Cluster,
    InstancesClient,
    allocations_of_released,
    counter_mismatches,
    kill_hard,
    probe,
    read_fleet,
    read_key_records,
    recorded_endpoints,
    send_signal,
    state_dirs,
    stop_event_counts,
    stray_state,
    unreleased_stopped,
    wait_for,
)
from sqlalchemy import select

from computeplane.store.database import Database
from computeplane.store.models import Node
from support.postgres import PostgresServer
from support.processes import ComputeplaneProcess, LocalNetwork, ServeServer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="needs the Linux 127.0.0.0/8 loopback"),
]

START_DELAY = "COMPUTEPLANE_LOCAL_START_DELAY_SECONDS"
HEARTBEAT = "COMPUTEPLANE_HEARTBEAT_INTERVAL_SECONDS"
WORKER_INTERVAL = "COMPUTEPLANE_WORKER_INTERVAL_SECONDS"
WORKER_LEASE = "COMPUTEPLANE_WORKER_LEASE_SECONDS"
PROVISIONING_TIMEOUT = "COMPUTEPLANE_PROVISIONING_TIMEOUT_SECONDS"
IDEMPOTENCY_LEASE = "COMPUTEPLANE_IDEMPOTENCY_LEASE_SECONDS"

# Deadlines for polling. They are wide because the processes run on shared, busy machines;
# a healthy run settles in a fraction of each.
READY_SECONDS = 90.0
RECOVERY_SECONDS = 90.0
STATUS_CHANGE_SECONDS = 60.0

# The kill must land while every instance is still starting. This start delay leaves that
# window even when the 20 creates take a few seconds on a busy machine.
SLOW_START_SECONDS = "6"
# The delay of the agent whose instances must still be waiting when the agents are killed.
STALLED_START_SECONDS = "120"
# How long a deleted instance's address is watched after its node's agent came back.
WATCH_SECONDS = 5.0

MID_START = {"pending", "provisioning"}
SETTLED = {"ready", "stopped"}


@pytest.fixture
def make_cluster(
    tmp_path: Path, postgres_server: PostgresServer
) -> Iterator[Callable[[Mapping[str, str]], Cluster]]:
    """Return a factory of initialized clusters on fresh PostgreSQL databases, and stop
    every process of every cluster at teardown."""
    clusters: list[Cluster] = []

    def make(settings: Mapping[str, str]) -> Cluster:
        database_url = postgres_server.create_database(f"faults_{uuid.uuid4().hex[:12]}")
        cluster = Cluster(
            data_dir=tmp_path / "data",
            database_url=database_url,
            log_dir=tmp_path / "logs",
            network=LocalNetwork.pick(),
            settings=settings,
        )
        clusters.append(cluster)
        cluster.init()
        return cluster

    yield make
    for cluster in clusters:
        cluster.close()


@contextlib.asynccontextmanager
async def open_database(url: str) -> AsyncIterator[Database]:
    """Open the database that the processes under test use, for reading it."""
    database = Database(url, pool_size=2, max_overflow=4)
    try:
        yield database
    finally:
        await database.dispose()


@contextlib.asynccontextmanager
async def instances_client(base_url: str, key: str) -> AsyncIterator[InstancesClient]:
    client = InstancesClient(base_url, key)
    try:
        yield client
    finally:
        await client.aclose()


def ready_endpoints(visible: Mapping[str, Mapping[str, Any]]) -> set[tuple[str, int]]:
    """Return the address and port of every ready instance in an API listing."""
    return {
        (instance["ip"], instance["ssh_port"])
        for instance in visible.values()
        if instance["status"] == "ready"
    }


async def wait_until_all_starting(client: InstancesClient, ids: list[str]) -> dict[str, str]:
    """Wait until every instance is ``provisioning`` (its agent began the start) or one is
    already ready, and return the statuses."""

    async def started_or_ready() -> bool:
        statuses = await client.statuses()
        values = [statuses.get(instance_id) for instance_id in ids]
        return all(value == "provisioning" for value in values) or "ready" in values

    await wait_for(started_or_ready, STATUS_CHANGE_SECONDS)
    return await client.statuses()


@pytest.mark.postgres
async def test_split_roles_survive_kill_mid_start(
    make_cluster: Callable[[Mapping[str, str]], Cluster],
) -> None:
    # Heartbeats are slow, so no instance turns unknown while its agent is unreachable and
    # the statuses before the kill stay pending or provisioning.
    cluster = make_cluster({HEARTBEAT: "20"})
    tokens = {name: cluster.add_node(name) for name in ("n1", "n2", "n3")}
    public_api = cluster.start_api("api-public")
    # The agents use their own API replica. Killing it first keeps their reports from
    # landing, so the started instances still count as provisioning when the agents die.
    agents_api = cluster.start_api("api-agents")
    worker = cluster.start_worker("worker-1")
    delays = {"n1": SLOW_START_SECONDS, "n2": SLOW_START_SECONDS, "n3": STALLED_START_SECONDS}
    agents = [
        cluster.start_agent(
            f"agent-{name}-1", token, agents_api.base_url, {START_DELAY: delays[name]}
        )
        for name, token in tokens.items()
    ]

    async with (
        open_database(cluster.database_url) as database,
        instances_client(public_api.base_url, cluster.admin_key()) as client,
    ):
        ids = await client.create_many(20)
        statuses = await wait_until_all_starting(client, ids)
        assert {statuses[instance_id] for instance_id in ids} == {"provisioning"}, statuses

        kill_hard(agents_api.process)
        fleet = await read_fleet(database)
        started = set(fleet.on_node("n1") + fleet.on_node("n2"))
        stalled = fleet.on_node("n3")
        assert stalled, f"placement left n3 empty: {fleet.instances}"

        async def started_on_disk() -> bool:
            return set(recorded_endpoints(cluster.data_dir)) >= started

        await wait_for(started_on_disk, STATUS_CHANGE_SECONDS)
        before = recorded_endpoints(cluster.data_dir)
        assert set(before) == started, cluster.describe()
        statuses = await client.statuses()
        assert {statuses[instance_id] for instance_id in ids} <= MID_START, statuses

        kill_hard(worker)
        for agent in agents:
            kill_hard(agent)

        # Deleted while no agent runs: two started instances on each started node, whose
        # state stays on disk, and one instance that never started.
        deleted = fleet.on_node("n1")[:2] + fleet.on_node("n2")[:2] + stalled[:1]
        for instance_id in deleted:
            response = await client.delete(instance_id)
            assert response.status_code == 204, response.text

        cluster.start_worker("worker-2")
        for name, token in tokens.items():
            cluster.start_agent(f"agent-{name}-2", token, public_api.base_url, {START_DELAY: "3"})

        async def recovered() -> bool:
            statuses = await client.statuses()
            fleet = await read_fleet(database)
            return (
                set(statuses.values()) <= SETTLED
                and all(fleet.instances[instance_id].released for instance_id in deleted)
                and not stray_state(cluster.data_dir, fleet)
            )

        elapsed = await wait_for(recovered, RECOVERY_SECONDS)
        visible = await client.list_all()
        fleet = await read_fleet(database)

    remaining = [instance_id for instance_id in ids if instance_id not in deleted]
    assert sorted(visible) == sorted(remaining), f"recovery took {elapsed} s"
    for instance in visible.values():
        assert instance["status"] in SETTLED, (instance, cluster.describe())
        if instance["status"] == "stopped":
            assert instance.get("status_reason"), instance
    for instance_id in sorted(started - set(deleted)):
        assert visible[instance_id]["status"] == "ready", visible[instance_id]
        assert visible[instance_id]["ip"] == before[instance_id][0], visible[instance_id]
        assert await probe(*before[instance_id]) == "ssh", visible[instance_id]
    # A freed address may go to an instance started after the deletion. Only one server can
    # bind an address and port, so a ready instance listed there owns the listener.
    serving = ready_endpoints(visible)
    for instance_id in deleted:
        assert fleet.instances[instance_id].released, fleet.instances[instance_id]
        if instance_id in before:
            endpoint = before[instance_id]
            outcome = "reused" if endpoint in serving else await probe(*endpoint)
            assert outcome in ("reused", "refused"), (instance_id, endpoint, outcome)
    assert counter_mismatches(fleet) == []
    assert allocations_of_released(fleet) == []
    assert unreleased_stopped(fleet) == []
    assert stray_state(cluster.data_dir, fleet) == []


@pytest.mark.parametrize(
    "database_kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
async def test_serve_survives_kill_mid_start(
    database_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if database_kind == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'computeplane.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        database_url = postgres.create_database(f"faults_serve_{uuid.uuid4().hex[:12]}")
    server = ServeServer(
        tmp_path / "data",
        database_url,
        log_dir=tmp_path / "logs",
        env={START_DELAY: SLOW_START_SECONDS, "COMPUTEPLANE_RATE_LIMIT_REQUESTS": "0"},
    )
    try:
        server.start()
        async with (
            open_database(database_url) as database,
            instances_client(server.base_url, server.admin_key()) as client,
        ):
            ids = await client.create_many(20)
            statuses = await wait_until_all_starting(client, ids)
            assert {statuses[instance_id] for instance_id in ids} == {"provisioning"}, statuses

            kill_hard(server.process)
            server.start()

            async def recovered() -> bool:
                statuses = await client.statuses()
                fleet = await read_fleet(database)
                return set(statuses.values()) <= SETTLED and not stray_state(
                    server.data_dir, fleet
                )

            elapsed = await wait_for(recovered, RECOVERY_SECONDS)
            visible = await client.list_all()
            fleet = await read_fleet(database)

            assert sorted(visible) == sorted(ids)
            for instance in visible.values():
                assert instance["status"] in SETTLED, (
                    f"not settled {elapsed} s after the restart: {instance}\n"
                    f"{server.process.describe()}"
                )
                if instance["status"] == "stopped":
                    assert instance.get("status_reason"), instance
                    row = fleet.instances[instance["id"]]
                    if row.ip is not None and row.ssh_port is not None:
                        endpoint = (row.ip, row.ssh_port)
                        reused = endpoint in ready_endpoints(visible)
                        outcome = "reused" if reused else await probe(*endpoint)
                        assert outcome in ("reused", "refused"), (instance, outcome)
                else:
                    assert await probe(instance["ip"], instance["ssh_port"]) == "ssh", instance
            assert counter_mismatches(fleet) == []
            assert allocations_of_released(fleet) == []
            assert unreleased_stopped(fleet) == []
            assert stray_state(server.data_dir, fleet) == []
    finally:
        server.stop()


async def start_agent_with_ready_instances(
    cluster: Cluster, client: InstancesClient, token: str, api_url: str, count: int
) -> tuple[ComputeplaneProcess, list[str], dict[str, dict[str, Any]]]:
    """Start an agent, create ``count`` instances, wait until they are ready, and return the
    agent, the instance ids and the API listing."""
    agent = cluster.start_agent("agent-1", token, api_url)
    ids = await client.create_many(count)

    async def all_ready() -> bool:
        statuses = await client.statuses()
        return all(statuses.get(instance_id) == "ready" for instance_id in ids)

    await wait_for(all_ready, READY_SECONDS)
    ready = await client.list_all()
    for instance_id in ids:
        assert ready[instance_id]["status"] == "ready", (ready[instance_id], cluster.describe())
    return agent, ids, ready


@pytest.mark.postgres
async def test_stopped_agent_instances_become_unknown(
    make_cluster: Callable[[Mapping[str, str]], Cluster],
) -> None:
    cluster = make_cluster({HEARTBEAT: "1", WORKER_INTERVAL: "0.2"})
    token = cluster.add_node("n1")
    api = cluster.start_api("api")
    cluster.start_worker("worker")

    async with (
        open_database(cluster.database_url) as database,
        instances_client(api.base_url, cluster.admin_key()) as client,
    ):
        agent, ids, before = await start_agent_with_ready_instances(
            cluster, client, token, api.base_url, 3
        )
        deleted, remaining = ids[0], ids[1:]
        deleted_endpoint = (before[deleted]["ip"], before[deleted]["ssh_port"])

        send_signal(agent, signal.SIGSTOP)

        async def all_unknown() -> bool:
            return set((await client.statuses()).values()) == {"unknown"}

        elapsed = await wait_for(all_unknown, STATUS_CHANGE_SECONDS)
        statuses = await client.statuses()
        # The expected time is three heartbeat intervals (3 s) plus a worker interval.
        assert statuses == dict.fromkeys(ids, "unknown"), (
            f"observed after {elapsed} s (None: not within {STATUS_CHANGE_SECONDS:.0f} s)"
        )

        response = await client.delete(deleted)
        assert response.status_code == 204, response.text
        assert (await client.get(deleted)).status_code == 404
        assert sorted(await client.statuses()) == sorted(remaining)

        # Three heartbeat intervals give the worker many rounds to free the GPUs wrongly.
        await asyncio.sleep(3.0)
        while_stopped = await read_fleet(database)
        assert while_stopped.allocations == dict.fromkeys(ids, 1)
        assert while_stopped.nodes["n1"].gpus_free == 5
        assert not while_stopped.instances[deleted].released

        send_signal(agent, signal.SIGCONT)

        async def recovered() -> bool:
            statuses = await client.statuses()
            fleet = await read_fleet(database)
            return (
                statuses == dict.fromkeys(remaining, "ready")
                and fleet.instances[deleted].released
                and await probe(*deleted_endpoint) == "refused"
            )

        elapsed = await wait_for(recovered, RECOVERY_SECONDS)
        after = await client.list_all()
        fleet = await read_fleet(database)

    for instance_id in remaining:
        assert after[instance_id]["status"] == "ready", (after[instance_id], elapsed)
        assert after[instance_id]["ip"] == before[instance_id]["ip"]
    assert await probe(*deleted_endpoint) == "refused"
    assert fleet.instances[deleted].released
    assert fleet.allocations == dict.fromkeys(remaining, 1)
    assert fleet.nodes["n1"].gpus_free == 6
    assert counter_mismatches(fleet) == []
    assert stray_state(cluster.data_dir, fleet) == []


@pytest.mark.postgres
async def test_restarted_agent_skips_deleted_instance(
    make_cluster: Callable[[Mapping[str, str]], Cluster],
) -> None:
    cluster = make_cluster({HEARTBEAT: "1", WORKER_INTERVAL: "0.2"})
    token = cluster.add_node("n1")
    api = cluster.start_api("api")
    cluster.start_worker("worker")

    async with (
        open_database(cluster.database_url) as database,
        instances_client(api.base_url, cluster.admin_key()) as client,
    ):
        agent, ids, before = await start_agent_with_ready_instances(
            cluster, client, token, api.base_url, 3
        )
        deleted, remaining = ids[0], ids[1:]
        deleted_endpoint = (before[deleted]["ip"], before[deleted]["ssh_port"])

        kill_hard(agent)
        response = await client.delete(deleted)
        assert response.status_code == 204, response.text

        # Waiting for unknown makes the later ready status the new agent's report, not
        # the status stored before the kill.
        async def remaining_unknown() -> bool:
            statuses = await client.statuses()
            return all(statuses.get(instance_id) == "unknown" for instance_id in remaining)

        await wait_for(remaining_unknown, STATUS_CHANGE_SECONDS)
        statuses = await client.statuses()
        assert statuses == dict.fromkeys(remaining, "unknown")

        cluster.start_agent("agent-2", token, api.base_url)

        async def recovered() -> bool:
            statuses = await client.statuses()
            fleet = await read_fleet(database)
            return (
                statuses == dict.fromkeys(remaining, "ready") and fleet.instances[deleted].released
            )

        elapsed = await wait_for(recovered, RECOVERY_SECONDS)
        probes = []
        for _ in range(int(WATCH_SECONDS / 0.5)):
            probes.append(await probe(*deleted_endpoint))
            await asyncio.sleep(0.5)
        after = await client.list_all()
        fleet = await read_fleet(database)

    assert set(probes) == {"refused"}, probes
    for instance_id in remaining:
        assert after[instance_id]["status"] == "ready", (after[instance_id], elapsed)
        assert after[instance_id]["ip"] == before[instance_id]["ip"]
        assert await probe(after[instance_id]["ip"], after[instance_id]["ssh_port"]) == "ssh"
    assert deleted not in state_dirs(cluster.data_dir)
    assert fleet.instances[deleted].released
    assert fleet.allocations == dict.fromkeys(remaining, 1)
    assert counter_mismatches(fleet) == []
    assert stray_state(cluster.data_dir, fleet) == []


@pytest.mark.postgres
async def test_killed_api_frees_idempotency_keys(
    make_cluster: Callable[[Mapping[str, str]], Cluster],
) -> None:
    cluster = make_cluster({IDEMPOTENCY_LEASE: "2"})
    for index in range(1, 6):
        cluster.add_node(f"n{index}")
    replica_a = cluster.start_api("api-a")
    replica_b = cluster.start_api("api-b")
    keys = [f"create-{index:02d}-{uuid.uuid4().hex[:8]}" for index in range(40)]

    async with (
        open_database(cluster.database_url) as database,
        instances_client(replica_a.base_url, cluster.admin_key()) as client_a,
        instances_client(replica_b.base_url, cluster.admin_key()) as client_b,
    ):
        tasks = [asyncio.create_task(client_a.create(idempotency_key=key)) for key in keys]
        # Kill replica A once three creates have returned, while the others are in flight.
        for answered, next_answer in enumerate(asyncio.as_completed(tasks), 1):
            with contextlib.suppress(httpx.HTTPError):
                await next_answer
            if answered == 3:
                break
        kill_hard(replica_a.process)
        first_round = await asyncio.gather(*tasks, return_exceptions=True)

        records = await read_key_records(database)
        in_flight = [record for record in records.values() if record.state == "in_flight"]
        assert in_flight, (
            "replica A finished every reservation before it was killed, so nothing tests "
            f"the lease; first round: {first_round}"
        )
        lease_end = max(record.lease_expires_at for record in in_flight)
        await asyncio.sleep(max(0.0, (lease_end - datetime.now(UTC)).total_seconds()) + 0.5)

        retried = await asyncio.gather(*(client_b.create(idempotency_key=key) for key in keys))
        records = await read_key_records(database)
        fleet = await read_fleet(database)

    statuses = {key: response.status_code for key, response in zip(keys, retried, strict=True)}
    assert {key: status for key, status in statuses.items() if status != 201} == {}
    created = {key: response.json()["id"] for key, response in zip(keys, retried, strict=True)}
    assert sorted(records) == sorted(keys)
    assert {record.state for record in records.values()} == {"completed"}
    assert {key: record.instance_id for key, record in records.items()} == created
    assert sorted(fleet.instances) == sorted(created.values())


@pytest.mark.postgres
async def test_dead_worker_lease_expires(
    make_cluster: Callable[[Mapping[str, str]], Cluster],
) -> None:
    cluster = make_cluster({PROVISIONING_TIMEOUT: "1", WORKER_INTERVAL: "0.2"})
    cluster.add_node("n1")
    api = cluster.start_api("api")

    async with (
        open_database(cluster.database_url) as database,
        instances_client(api.base_url, cluster.admin_key()) as client,
    ):
        ids = await client.create_many(4)
        # No agent runs, so every instance is overdue one second after its creation.
        await asyncio.sleep(1.5)

        # Locking the node row blocks the first worker inside its work on the leased
        # instances, so killing it there leaves the leases behind.
        async with database.write() as session:
            await session.execute(select(Node).where(Node.name == "n1").with_for_update())
            first = cluster.start_worker("worker-1", {WORKER_LEASE: "20"})
            owner_suffix = f":{first.pid}"

            async def leased_by_first() -> bool:
                fleet = await read_fleet(database)
                return all(
                    (fleet.instances[instance_id].lease_owner or "").endswith(owner_suffix)
                    for instance_id in ids
                )

            await wait_for(leased_by_first, STATUS_CHANGE_SECONDS)
            second = cluster.start_worker("worker-2")
            # The second worker runs several rounds while the first one's lease is live.
            await asyncio.sleep(1.0)
            during = await read_fleet(database)
            checked_at = datetime.now(UTC)
            kill_hard(first)

        for instance_id in ids:
            row = during.instances[instance_id]
            assert (row.lease_owner or "").endswith(owner_suffix), (row, cluster.describe())
            assert row.lease_expires_at is not None
            assert row.lease_expires_at > checked_at, "the lease expired before the check"
            assert row.status == "pending", row

        async def finished() -> bool:
            fleet = await read_fleet(database)
            return all(fleet.instances[instance_id].released for instance_id in ids)

        elapsed = await wait_for(finished, 20.0 + RECOVERY_SECONDS)
        fleet = await read_fleet(database)
        stop_events = await stop_event_counts(database)

    for instance_id in ids:
        row = fleet.instances[instance_id]
        assert row.status == "stopped", (row, elapsed, second.describe())
        assert row.status_reason == "provisioning did not finish within 1 seconds", row
        assert row.released, row
        assert row.lease_owner is None, row
    assert stop_events == dict.fromkeys(ids, 1)
    assert fleet.allocations == {}
    assert fleet.nodes["n1"].gpus_free == 8
    assert counter_mismatches(fleet) == []
