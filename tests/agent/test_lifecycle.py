"""Instance lifecycles through the real API, node agent and LocalRuntime in one process.

Each test serves one app to its HTTP client and to a ``NodeAgent`` task of node ``n1``,
whose LocalRuntime gives every instance a real SSH endpoint on a random free port of a
private loopback pool inside 127.90.0.0 to 127.120.255.255. Logins use the system ssh
client. Workers run by direct calls instead of their loops.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from lifecycle_support import (
    NODE_GPUS,
    SSH,
    SSH_KEYGEN,
    AgentRunner,
    ClientKey,
    Plane,
    accepts_connections,
    address_claims,
    generate_key,
    open_plane,
    random_pool,
    report_loop_is_idle,
    runtime_config,
    ssh,
    wait_until,
    with_settings,
)

from computeplane.agent.runtime.base import InstanceSpec
from computeplane.agent.runtime.local import LocalRuntimeConfig
from computeplane.services.agents import RUNTIME_FAILED_MESSAGE, wait_for_desired_state
from computeplane.services.context import ServiceContext
from computeplane.services.nodes import remove_node
from computeplane.workers.deadlines import expire_provisioning
from computeplane.workers.heartbeats import expire_heartbeats
from conftest import Keys

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="needs the Linux 127.0.0.0/8 loopback"),
    pytest.mark.skipif(
        not all(os.access(path, os.X_OK) for path in (SSH, SSH_KEYGEN)),
        reason="needs the OpenSSH client binaries in /usr/bin",
    ),
]

WORKER = "test-worker"
SHORT_DEADLINE = {"provisioning_timeout_seconds": 1.0}


@pytest.fixture
def plane_settings() -> dict[str, Any]:
    """Settings that a test overrides through ``pytest.mark.parametrize``."""
    return {}


@pytest.fixture
async def plane(
    context: ServiceContext, keys: Keys, plane_settings: dict[str, Any]
) -> AsyncIterator[Plane]:
    # A one-second heartbeat makes the agent report often, so checks that a release
    # happened only once can watch several reports go by.
    overrides = {"heartbeat_interval_seconds": 1.0, **plane_settings}
    async with open_plane(with_settings(context, **overrides), keys) as plane:
        yield plane


@pytest.fixture
async def agents(plane: Plane) -> AsyncIterator[AgentRunner]:
    runner = AgentRunner(plane)
    yield runner
    await runner.close_all()


@pytest.fixture
def config(tmp_path: Path) -> LocalRuntimeConfig:
    return runtime_config(tmp_path)


@pytest.fixture
async def client_key(tmp_path: Path) -> ClientKey:
    return await generate_key(tmp_path, "client_ed25519")


def first_host(config: LocalRuntimeConfig) -> str:
    """Return the pool address a runtime gives its first instance."""
    return str(next(config.address_pool.hosts()))


async def stopped_events(plane: Plane, instance_id: str) -> list[str]:
    """Return the reasons of the instance's transitions to ``stopped``."""
    return [
        event.reason for event in await plane.events(instance_id) if event.to_status == "stopped"
    ]


# Ready


async def test_ready_flow_records_events(
    plane: Plane,
    agents: AgentRunner,
    config: LocalRuntimeConfig,
    client_key: ClientKey,
    tmp_path: Path,
) -> None:
    # The gate blocks the start, so the agent's "starting" report always lands first.
    runtime = agents.gated_runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)

    provisioning = await plane.wait_for_status(instance_id, "provisioning")
    assert "ip" not in provisioning
    assert "ssh_port" not in provisioning

    runtime.gate.set()
    ready = await plane.wait_for_status(instance_id, "ready")
    assert ipaddress.IPv4Address(ready["ip"]) in config.address_pool
    assert ready["ssh_port"] == config.ssh_port

    events = await plane.events(instance_id)
    assert [(event.from_status, event.to_status) for event in events] == [
        (None, "pending"),
        ("pending", "provisioning"),
        ("provisioning", "ready"),
    ]
    assert [event.reason for event in events] == ["placed", "agent_starting", "agent_running"]

    login = await ssh(
        client_key,
        ready["ip"],
        ready["ssh_port"],
        "echo hello",
        known_hosts=tmp_path / "known_hosts",
    )
    assert login.returncode == 0, login.stderr
    assert login.stdout == "hello\n"


async def test_ready_instance_sees_its_gpus(
    plane: Plane,
    agents: AgentRunner,
    config: LocalRuntimeConfig,
    client_key: ClientKey,
    tmp_path: Path,
) -> None:
    agents.start(agents.runtime(config))
    instance_ids = [await plane.create(client_key.public_line) for _ in range(2)]

    endpoints = []
    for instance_id in instance_ids:
        ready = await plane.wait_for_status(instance_id, "ready")
        endpoints.append((ready["ip"], ready["ssh_port"]))
    assert endpoints[0] != endpoints[1]

    for instance_id, (ip, port) in zip(instance_ids, endpoints, strict=True):
        indices = await plane.allocated_indices(instance_id)
        assert len(indices) == 1
        result = await ssh(
            client_key, ip, port, "echo $CUDA_VISIBLE_DEVICES", known_hosts=tmp_path / "hosts"
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(indices[0])


@pytest.mark.parametrize(
    ("key_type", "bits"), [("ed25519", None), ("ecdsa", 256), ("rsa", 3072)], ids=str
)
async def test_login_with_key_type(
    plane: Plane,
    agents: AgentRunner,
    config: LocalRuntimeConfig,
    tmp_path: Path,
    key_type: str,
    bits: int | None,
) -> None:
    key = await generate_key(tmp_path, f"client_{key_type}", key_type, bits)
    other_key = await generate_key(tmp_path, f"other_{key_type}", key_type, bits)
    agents.start(agents.runtime(config))
    instance_id = await plane.create(key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    known_hosts = tmp_path / "known_hosts"

    accepted = await ssh(
        key, ready["ip"], ready["ssh_port"], 'echo "$USER"', known_hosts=known_hosts
    )
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout == "ubuntu\n"

    rejected = await ssh(
        other_key, ready["ip"], ready["ssh_port"], 'echo "$USER"', known_hosts=known_hosts
    )
    assert rejected.returncode == 255
    assert "Permission denied" in rejected.stderr


# Provisioning deadline


@pytest.mark.parametrize("plane_settings", [SHORT_DEADLINE], ids=["short-deadline"])
async def test_deadline_stops_unreported_instance(plane: Plane, client_key: ClientKey) -> None:
    instance_id = await plane.create(client_key.public_line)
    created = await plane.instance_row(instance_id)
    stopped = 0

    async def expired() -> bool:
        nonlocal stopped
        stopped += await expire_provisioning(plane.context, WORKER)
        return stopped > 0

    await wait_until(expired, "the provisioning deadline passes")
    assert stopped == 1

    body = (await plane.get(instance_id)).json()
    assert body["status"] == "stopped"
    assert "provisioning" in body["status_reason"]
    assert "1 seconds" in body["status_reason"]
    assert await plane.gpus_free() == NODE_GPUS
    assert await plane.allocation_count() == 0
    row = await plane.instance_row(instance_id)
    assert row.released_at is not None

    desired = await wait_for_desired_state(
        plane.context, plane.node, after_version=0, wait_seconds=0
    )
    assert instance_id not in [item.instance_id for item in desired.instances]
    assert desired.version > created.desired_version

    assert await expire_provisioning(plane.context, WORKER) == 0
    assert await plane.gpus_free() == NODE_GPUS
    assert (await plane.instance_row(instance_id)).released_at == row.released_at
    assert await stopped_events(plane, instance_id) == ["provisioning_timeout"]


@pytest.mark.parametrize("plane_settings", [SHORT_DEADLINE], ids=["short-deadline"])
async def test_deadline_cancels_slow_start(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    runtime = agents.gated_runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)
    await plane.wait_for_status(instance_id, "provisioning")

    async def expired() -> bool:
        return await expire_provisioning(plane.context, WORKER) > 0

    await wait_until(expired, "the provisioning deadline passes")
    assert await plane.status(instance_id) == "stopped"
    assert await plane.gpus_free() == NODE_GPUS

    async def start_cancelled() -> bool:
        return runtime.cancelled_starts == [instance_id]

    await wait_until(start_cancelled, "the agent cancels the blocked start")
    runtime.gate.set()
    await plane.wait_for_reports()
    assert await runtime.list_instances() == []
    assert not await accepts_connections(first_host(config), config.ssh_port)
    assert await plane.gpus_free() == NODE_GPUS
    assert await stopped_events(plane, instance_id) == ["provisioning_timeout"]


# Delete


async def test_delete_while_provisioning_waits_for_teardown(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    runtime = agents.gated_runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)
    await plane.wait_for_status(instance_id, "provisioning")
    await agents.stop()

    assert (await plane.delete(instance_id)).status_code == 204
    assert (await plane.get(instance_id)).status_code == 404
    assert (await plane.delete(instance_id)).status_code == 404
    assert await plane.gpus_free() == NODE_GPUS - 1
    assert await plane.allocation_count() == 1
    assert (await plane.instance_row(instance_id)).released_at is None

    agents.start(runtime)
    await plane.wait_for_release(instance_id)
    assert await plane.gpus_free() == NODE_GPUS
    assert await plane.allocation_count() == 0
    assert await runtime.list_instances() == []
    assert address_claims(config) == []
    assert not await accepts_connections(first_host(config), config.ssh_port)
    assert await stopped_events(plane, instance_id) == ["deleted"]


async def test_delete_cancels_blocked_start(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    runtime = agents.gated_runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)
    await plane.wait_for_status(instance_id, "provisioning")

    assert (await plane.delete(instance_id)).status_code == 204
    await plane.wait_for_release(instance_id)
    assert runtime.cancelled_starts == [instance_id]
    assert await plane.gpus_free() == NODE_GPUS
    assert await plane.allocation_count() == 0

    runtime.gate.set()
    await plane.wait_for_reports()
    assert await runtime.list_instances() == []
    assert not await accepts_connections(first_host(config), config.ssh_port)


async def test_delete_ready_releases_once(
    plane: Plane,
    agents: AgentRunner,
    config: LocalRuntimeConfig,
    client_key: ClientKey,
    tmp_path: Path,
) -> None:
    runtime = agents.runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    ip, port = ready["ip"], ready["ssh_port"]
    login = await ssh(client_key, ip, port, "true", known_hosts=tmp_path / "known_hosts")
    assert login.returncode == 0, login.stderr

    assert (await plane.delete(instance_id)).status_code == 204
    released = await plane.wait_for_release(instance_id)
    # The agent confirms only after the runtime stopped, so the endpoint is already gone.
    assert not await accepts_connections(ip, port)
    assert (await plane.get(instance_id)).status_code == 404
    assert await plane.gpus_free() == NODE_GPUS
    assert await plane.allocation_count() == 0

    await plane.wait_for_reports()
    assert (await plane.instance_row(instance_id)).released_at == released.released_at
    assert await plane.gpus_free() == NODE_GPUS
    assert await stopped_events(plane, instance_id) == ["deleted"]
    assert await runtime.list_instances() == []
    assert address_claims(config) == []


# Runtime failure


@contextlib.contextmanager
def occupied_ports(config: LocalRuntimeConfig) -> Iterator[None]:
    """Listen on the SSH port of every pool address, so the runtime can bind none."""
    with contextlib.ExitStack() as stack:
        for host in config.address_pool.hosts():
            listener = stack.enter_context(socket.socket())
            listener.bind((str(host), config.ssh_port))
            listener.listen()
        yield


async def test_start_failure_releases_once(
    plane: Plane, agents: AgentRunner, tmp_path: Path, client_key: ClientKey
) -> None:
    config = runtime_config(tmp_path, random_pool(prefix_length=30))
    with occupied_ports(config):
        agents.start(agents.runtime(config))
        instance_id = await plane.create(client_key.public_line)
        body = await plane.wait_for_status(instance_id, "stopped")
        released = await plane.wait_for_release(instance_id)

        # The owner reads a plain reason; the runtime's message, with host details, is in
        # the event that operators read.
        assert body["status_reason"] == RUNTIME_FAILED_MESSAGE
        assert str(config.address_pool) not in body["status_reason"]
        failed = [
            event for event in await plane.events(instance_id) if event.to_status == "stopped"
        ]
        assert failed[0].message is not None
        assert f"port {config.ssh_port} is in use" in failed[0].message
        assert str(config.address_pool) in failed[0].message
        assert await plane.gpus_free() == NODE_GPUS
        assert await plane.allocation_count() == 0

        await plane.wait_for_reports()
        assert (await plane.instance_row(instance_id)).released_at == released.released_at
        assert await plane.gpus_free() == NODE_GPUS
        assert await stopped_events(plane, instance_id) == ["runtime_failed"]
        assert address_claims(config) == []


# Agent and runtime restarts


async def test_restart_restores_endpoint(
    plane: Plane,
    agents: AgentRunner,
    config: LocalRuntimeConfig,
    client_key: ClientKey,
    tmp_path: Path,
) -> None:
    first_runtime = agents.runtime(config)
    agents.start(first_runtime)
    instance_id = await plane.create(client_key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    ip, port = ready["ip"], ready["ssh_port"]
    known_hosts = tmp_path / "known_hosts"
    first_login = await ssh(client_key, ip, port, "true", known_hosts=known_hosts)
    assert first_login.returncode == 0, first_login.stderr
    assert known_hosts.read_text().strip() != ""

    await agents.stop()
    await first_runtime.close()
    assert not await accepts_connections(ip, port)

    agents.start(agents.runtime(config))

    async def serving() -> bool:
        return await accepts_connections(ip, port)

    await wait_until(serving, "the new runtime restores the endpoint")
    restored = await plane.wait_for_status(instance_id, "ready")
    assert restored["ip"] == ip
    assert restored["ssh_port"] == port
    login = await ssh(client_key, ip, port, "true", known_hosts=known_hosts, strict=True)
    assert login.returncode == 0, login.stderr
    assert await stopped_events(plane, instance_id) == []


async def test_agent_stops_despite_pending_report(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    agent = agents.start(agents.runtime(config))
    instance_id = await plane.create(client_key.public_line)
    await plane.wait_for_status(instance_id, "ready")

    async def idle() -> bool:
        return report_loop_is_idle(agent)

    try:
        await wait_until(idle, "the report loop waits for a change")
    except AssertionError as error:
        # A missed precondition must not count as the expected failure.
        pytest.fail(str(error))
    # A change that needs a report arrives in the event-loop iteration of the cancellation,
    # as when a start or stop finishes while the agent is shut down.
    agent._report_needed.set()
    assert await agents.cancel_and_wait()


async def test_silent_node_becomes_unknown(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    runtime = agents.runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)
    await plane.wait_for_status(instance_id, "ready")

    await agents.stop()
    await plane.backdate_heartbeat(3600)
    assert await expire_heartbeats(plane.context, WORKER) == 1
    unknown = (await plane.get(instance_id)).json()
    assert unknown["status"] == "unknown"
    assert "has not reported" in unknown["status_reason"]
    assert (await plane.node_row()).reachable is False

    agents.start(runtime)
    ready = await plane.wait_for_status(instance_id, "ready")
    assert ipaddress.IPv4Address(ready["ip"]) in config.address_pool
    assert (await plane.node_row()).reachable is True
    reasons = [event.reason for event in await plane.events(instance_id)]
    assert "node_unreachable" in reasons


async def test_delete_while_node_silent(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    runtime = agents.runtime(config)
    agents.start(runtime)
    instance_id = await plane.create(client_key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    ip, port = ready["ip"], ready["ssh_port"]

    await agents.stop()
    await plane.backdate_heartbeat(3600)
    assert await expire_heartbeats(plane.context, WORKER) == 1
    assert await plane.status(instance_id) == "unknown"

    assert (await plane.delete(instance_id)).status_code == 204
    assert (await plane.get(instance_id)).status_code == 404
    assert await plane.gpus_free() == NODE_GPUS - 1
    assert await plane.allocation_count() == 1
    assert (await plane.instance_row(instance_id)).released_at is None
    # The node has not seen the teardown yet, so its runtime still serves the instance.
    assert await accepts_connections(ip, port)

    agents.start(runtime)
    await plane.wait_for_release(instance_id)
    assert not await accepts_connections(ip, port)
    assert await plane.gpus_free() == NODE_GPUS
    assert await plane.allocation_count() == 0
    assert await runtime.list_instances() == []
    assert await stopped_events(plane, instance_id) == ["deleted"]


# Leftover instances on disk


async def test_agent_removes_deleted_leftover(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    first_runtime = agents.runtime(config)
    agents.start(first_runtime)
    instance_id = await plane.create(client_key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    ip, port = ready["ip"], ready["ssh_port"]
    await agents.stop()
    await first_runtime.close()

    assert (await plane.delete(instance_id)).status_code == 204
    assert await plane.gpus_free() == NODE_GPUS - 1
    assert (config.state_dir / instance_id).is_dir()

    second_runtime = agents.runtime(config)
    agents.start(second_runtime)
    await plane.wait_for_release(instance_id)
    assert await second_runtime.list_instances() == []
    assert address_claims(config) == []
    assert not await accepts_connections(ip, port)
    assert await plane.gpus_free() == NODE_GPUS
    assert await plane.allocation_count() == 0


async def test_agent_removes_unknown_leftover(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    first_runtime = agents.runtime(config)
    agents.start(first_runtime)
    instance_id = await plane.create(client_key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    await agents.stop()
    # State on disk of an instance that this control plane never placed.
    stray = await first_runtime.start(InstanceSpec("inst_stray", client_key.public_line, (7,)))
    await first_runtime.close()

    second_runtime = agents.runtime(config)
    agents.start(second_runtime)

    async def stray_removed() -> bool:
        return await second_runtime.list_instances() == [instance_id]

    await wait_until(stray_removed, "the agent removes the stray instance")
    assert not await accepts_connections(stray.ip, stray.port)
    assert address_claims(config) == [ready["ip"]]

    async def instance_served() -> bool:
        return await accepts_connections(ready["ip"], ready["ssh_port"])

    await wait_until(instance_served, "the agent restores the wanted instance")
    assert await plane.status(instance_id) == "ready"


# Node removal


async def test_removed_node_tears_down(
    plane: Plane, agents: AgentRunner, config: LocalRuntimeConfig, client_key: ClientKey
) -> None:
    agent = agents.start(agents.runtime(config))
    instance_id = await plane.create(client_key.public_line)
    ready = await plane.wait_for_status(instance_id, "ready")
    ip, port = ready["ip"], ready["ssh_port"]

    await remove_node(plane.context, plane.node.name, force=True)

    async def agent_exited() -> bool:
        return agent.node_removed

    await wait_until(agent_exited, "the agent learns of the removal and exits")
    assert not await accepts_connections(ip, port)
    assert not (config.state_dir / instance_id).exists()
    assert address_claims(config) == []
    assert await stopped_events(plane, instance_id) == ["node_removed"]
