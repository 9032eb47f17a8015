"""Split-role clusters, signals and fleet checks for the fault-recovery tests.

``Cluster`` runs ``init``, ``nodes add``, ``api``, ``worker`` and ``agent`` processes on one
data directory and database, so every agent shares the address claims and the SSH port of
one private ``LocalNetwork``. The check functions read the database and the agents' state
directories and return a list of violations, so an assertion names each broken rule.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from computeplane.store.database import Database
from computeplane.store.models import (
    GpuAllocation,
    IdempotencyRecord,
    Instance,
    InstanceEvent,
    Node,
)
from support.processes import (
    READY_TIMEOUT_SECONDS,
    ComputeplaneProcess,
    LocalNetwork,
    computeplane_environment,
    free_port,
    run_computeplane,
)

INSTANCES = "/v1/compute/instances"
ONE_GPU = "gpu_1x_h100_sxm5"
ED25519_KEY = (Path(__file__).parent.parent / "data" / "keys" / "ed25519.pub").read_text().strip()

POLL_SECONDS = 0.25
KILL_WAIT_SECONDS = 10.0
PROBE_TIMEOUT_SECONDS = 5.0
CLIENT_TIMEOUT_SECONDS = 30.0


# Signals


def send_signal(process: ComputeplaneProcess, signum: signal.Signals) -> None:
    """Send ``signum`` to the process group that ``ComputeplaneProcess.start`` created."""
    os.killpg(process.pid, signum)


def kill_hard(process: ComputeplaneProcess) -> None:
    """SIGKILL the process group and wait until the process is reaped."""
    send_signal(process, signal.SIGKILL)
    deadline = time.monotonic() + KILL_WAIT_SECONDS
    while process.returncode is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.name} survived SIGKILL: {process.describe()}")
        time.sleep(0.05)


def stop_all(processes: Iterable[ComputeplaneProcess]) -> None:
    """Stop every process that runs. Each gets SIGCONT first, because a process stopped by
    SIGSTOP would leave SIGTERM pending until the stop timeout."""
    for process in processes:
        if process.running:
            with contextlib.suppress(ProcessLookupError):
                send_signal(process, signal.SIGCONT)
            process.stop()


# Processes


@dataclass
class ApiServer:
    """One ``computeplane api`` process and the base URL it listens on."""

    process: ComputeplaneProcess
    base_url: str


@dataclass
class Cluster:
    """computeplane's roles as separate processes on one data directory and database."""

    data_dir: Path
    database_url: str
    log_dir: Path
    network: LocalNetwork
    settings: Mapping[str, str] = field(default_factory=dict)
    processes: list[ComputeplaneProcess] = field(default_factory=list)

    def environment(self, overrides: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return the environment of a process: the network, ``settings``, then overrides."""
        return computeplane_environment(
            {
                **self.network.environment(),
                "COMPUTEPLANE_RATE_LIMIT_REQUESTS": "0",
                **self.settings,
                **(overrides or {}),
            }
        )

    def run_command(self, *args: str) -> str:
        """Run an operator command on this cluster's data and return its stdout."""
        result = run_computeplane(
            [*args, "--data-dir", str(self.data_dir), "--database-url", self.database_url],
            env=self.environment(),
        )
        assert result.returncode == 0, f"computeplane {' '.join(args)} failed: {result.stderr}"
        return result.stdout

    def init(self) -> None:
        self.run_command("init")

    def add_node(self, name: str, *, gpus: int = 8, region: str = "us-west") -> str:
        """Register a node and return its agent token."""
        return self.run_command(
            "nodes", "add", name, "--region", region, "--gpus", str(gpus)
        ).strip()

    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    def start(
        self, args: list[str], name: str, env: Mapping[str, str] | None = None
    ) -> ComputeplaneProcess:
        process = ComputeplaneProcess(
            [*args, "--data-dir", str(self.data_dir)],
            env=self.environment(env),
            log_dir=self.log_dir,
            name=name,
        )
        self.processes.append(process)
        process.start()
        return process

    def start_api(self, name: str, env: Mapping[str, str] | None = None) -> ApiServer:
        """Start an ``api`` process on a free port and wait until it lists instances."""
        port = free_port()
        process = self.start(
            ["api", "--database-url", self.database_url, "--port", str(port)], name, env
        )
        server = ApiServer(process, f"http://127.0.0.1:{port}")
        wait_until_serving(server, self.admin_key())
        return server

    def start_worker(self, name: str, env: Mapping[str, str] | None = None) -> ComputeplaneProcess:
        """Start a ``worker`` process and wait until its loop runs."""
        process = self.start(["worker", "--database-url", self.database_url], name, env)
        process.wait_for_log(lambda log: "workers started" in log)
        return process

    def start_agent(
        self,
        name: str,
        token: str,
        control_plane: str,
        env: Mapping[str, str] | None = None,
    ) -> ComputeplaneProcess:
        """Start an ``agent`` process. It learns its node's name from the first desired state."""
        return self.start(
            ["agent", "--control-plane", control_plane, "--node-token", token], name, env
        )

    def close(self) -> None:
        stop_all(reversed(self.processes))

    def describe(self) -> str:
        """Return every process's command, state and log tail, for assertion messages."""
        return "\n\n".join(process.describe() for process in self.processes)


def wait_until_serving(
    server: ApiServer, admin_key: str, timeout: float = READY_TIMEOUT_SECONDS
) -> None:
    """Poll ``GET /v1/compute/instances`` until it returns 200; fail if the process exits."""
    deadline = time.monotonic() + timeout
    last = "no request was answered"
    with httpx.Client(base_url=server.base_url, timeout=10.0) as client:
        while True:
            if not server.process.running:
                raise AssertionError(f"api exited before serving: {server.process.describe()}")
            try:
                response = client.get(INSTANCES, headers={"Authorization": f"Key {admin_key}"})
            except httpx.HTTPError as error:
                last = repr(error)
            else:
                if response.status_code == 200:
                    return
                last = f"status {response.status_code}: {response.text}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"api did not serve within {timeout:.0f} s (last: {last}): "
                    f"{server.process.describe()}"
                )
            time.sleep(POLL_SECONDS)


# HTTP


class InstancesClient:
    """An async client of ``/v1/compute/instances`` with one API key."""

    def __init__(self, base_url: str, key: str) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url,
            headers={"Authorization": f"Key {key}"},
            timeout=CLIENT_TIMEOUT_SECONDS,
        )

    async def create(
        self, instance_type: str = ONE_GPU, *, idempotency_key: str | None = None
    ) -> httpx.Response:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return await self.http.post(
            INSTANCES,
            json={"instance_type": instance_type, "ssh_key": ED25519_KEY},
            headers=headers,
        )

    async def create_many(self, count: int) -> list[str]:
        """Create ``count`` one-GPU instances at once and return their ids in request order."""
        responses = await asyncio.gather(*(self.create() for _ in range(count)))
        for response in responses:
            assert response.status_code == 201, response.text
        return [response.json()["id"] for response in responses]

    async def get(self, instance_id: str) -> httpx.Response:
        return await self.http.get(f"{INSTANCES}/{instance_id}")

    async def delete(self, instance_id: str) -> httpx.Response:
        return await self.http.delete(f"{INSTANCES}/{instance_id}")

    async def list_all(self) -> dict[str, dict[str, Any]]:
        """Return every visible instance by id, following ``next_cursor``."""
        found: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": 100}
            if cursor:
                params["cursor"] = cursor
            response = await self.http.get(INSTANCES, params=params)
            assert response.status_code == 200, response.text
            body = response.json()
            found.update({item["id"]: item for item in body["instances"]})
            cursor = body["next_cursor"]
            if not cursor:
                return found

    async def statuses(self) -> dict[str, str]:
        return {key: value["status"] for key, value in (await self.list_all()).items()}

    async def aclose(self) -> None:
        await self.http.aclose()


# Waiting


async def wait_for(
    condition: Callable[[], Awaitable[bool]], limit_seconds: float, interval: float = POLL_SECONDS
) -> float | None:
    """Poll ``condition`` until it holds and return the seconds it took, or None on timeout.

    The caller asserts on the final state afterwards, so a timeout fails with the details.
    """
    started = time.monotonic()
    while True:
        if await condition():
            return time.monotonic() - started
        if time.monotonic() - started > limit_seconds:
            return None
        await asyncio.sleep(interval)


# Database


@dataclass(frozen=True)
class NodeRow:
    name: str
    gpu_count: int
    gpus_free: int


@dataclass(frozen=True)
class InstanceRow:
    public_id: str
    node: str
    status: str
    status_reason: str | None
    ip: str | None
    ssh_port: int | None
    """The last address and port that the node reported, kept after the instance stops."""
    deleted: bool
    released: bool
    lease_owner: str | None
    lease_expires_at: datetime | None


@dataclass(frozen=True)
class Fleet:
    """Nodes, instances and GPU allocations as the database stores them at one moment."""

    nodes: dict[str, NodeRow]
    instances: dict[str, InstanceRow]
    allocations: dict[str, int]
    """GPU allocation rows per instance id; instances with none are absent."""
    allocations_per_node: dict[str, int]

    def on_node(self, node: str) -> list[str]:
        return sorted(key for key, row in self.instances.items() if row.node == node)


async def read_fleet(database: Database) -> Fleet:
    async with database.read() as session:
        nodes = (await session.execute(select(Node))).scalars().all()
        instances = (await session.execute(select(Instance))).unique().scalars().all()
        rows = (
            await session.execute(
                select(Instance.public_id, Node.name)
                .join(GpuAllocation, GpuAllocation.instance_id == Instance.id)
                .join(Node, Node.id == GpuAllocation.node_id)
            )
        ).all()
    allocations: dict[str, int] = {}
    per_node: dict[str, int] = {node.name: 0 for node in nodes}
    for public_id, node_name in rows:
        allocations[public_id] = allocations.get(public_id, 0) + 1
        per_node[node_name] += 1
    return Fleet(
        nodes={node.name: NodeRow(node.name, node.gpu_count, node.gpus_free) for node in nodes},
        instances={
            instance.public_id: InstanceRow(
                public_id=instance.public_id,
                node=instance.node.name,
                status=instance.status,
                status_reason=instance.status_reason,
                ip=instance.ip,
                ssh_port=instance.ssh_port,
                deleted=instance.deleted_at is not None,
                released=instance.released_at is not None,
                lease_owner=instance.lease_owner,
                lease_expires_at=instance.lease_expires_at,
            )
            for instance in instances
        },
        allocations=allocations,
        allocations_per_node=per_node,
    )


async def stop_event_counts(database: Database) -> dict[str, int]:
    """Return how many events moved each instance to ``stopped``, by instance id."""
    async with database.read() as session:
        rows = (
            await session.execute(
                select(Instance.public_id, func.count(InstanceEvent.id))
                .join(InstanceEvent, InstanceEvent.instance_id == Instance.id)
                .where(InstanceEvent.to_status == "stopped")
                .group_by(Instance.public_id)
            )
        ).all()
    return {public_id: int(count) for public_id, count in rows}


def counter_mismatches(fleet: Fleet) -> list[str]:
    """Return the nodes whose ``gpus_free`` differs from ``gpu_count`` minus allocations."""
    return [
        f"{node.name}: gpus_free={node.gpus_free}, gpu_count={node.gpu_count}, "
        f"allocations={fleet.allocations_per_node[node.name]}"
        for node in fleet.nodes.values()
        if node.gpus_free != node.gpu_count - fleet.allocations_per_node[node.name]
    ]


def allocations_of_released(fleet: Fleet) -> list[str]:
    """Return instances that hold GPUs although they are released or stopped."""
    return [
        f"{instance_id} ({row.status}, released={row.released}) holds {count} GPUs"
        for instance_id, count in fleet.allocations.items()
        if (row := fleet.instances[instance_id]).released or row.status == "stopped"
    ]


def unreleased_stopped(fleet: Fleet) -> list[str]:
    """Return stopped instances whose GPUs have not been released yet."""
    return sorted(
        key for key, row in fleet.instances.items() if row.status == "stopped" and not row.released
    )


def live_instance_ids(fleet: Fleet) -> set[str]:
    """Return the instances that may have state on a node: neither stopped nor released."""
    return {
        key for key, row in fleet.instances.items() if row.status != "stopped" and not row.released
    }


# Agent state on disk


def state_dirs(data_dir: Path) -> dict[str, Path]:
    """Return every instance state directory of every local agent under ``data_dir``."""
    nodes = data_dir / "nodes"
    if not nodes.is_dir():
        return {}
    # Beside each agent's directory lies its lock file, agent-<token hash>.lock.
    agents = [agent for agent in nodes.iterdir() if agent.is_dir()]
    return {path.name: path for agent in agents for path in agent.iterdir() if path.is_dir()}


def recorded_endpoints(data_dir: Path) -> dict[str, tuple[str, int]]:
    """Return the address and port saved in each instance's ``instance.json``."""
    endpoints: dict[str, tuple[str, int]] = {}
    for instance_id, path in state_dirs(data_dir).items():
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            record = json.loads((path / "instance.json").read_text())
            endpoints[instance_id] = (record["ip"], int(record["port"]))
    return endpoints


def address_claims(data_dir: Path) -> dict[str, str]:
    """Return the owner instance id of every claimed address file, by address."""
    claims_dir = data_dir / "addresses"
    if not claims_dir.is_dir():
        return {}
    claims: dict[str, str] = {}
    for path in claims_dir.iterdir():
        with contextlib.suppress(FileNotFoundError):
            claims[path.name] = path.read_text().strip()
    return claims


def stray_state(data_dir: Path, fleet: Fleet) -> list[str]:
    """Return state directories and address claims that no live instance owns."""
    live = live_instance_ids(fleet)
    strays = [
        f"state directory {path}" for key, path in state_dirs(data_dir).items() if key not in live
    ]
    strays += [
        f"address claim {ip} of {owner}"
        for ip, owner in address_claims(data_dir).items()
        if owner not in live
    ]
    return sorted(strays)


# Endpoints


def probe_endpoint(ip: str, port: int) -> str:
    """Connect to ``ip:port`` and return ``refused``, ``ssh`` (an SSH banner came back) or
    what else happened."""
    try:
        with socket.create_connection((ip, port), timeout=PROBE_TIMEOUT_SECONDS) as connection:
            banner = connection.recv(4)
    except ConnectionRefusedError:
        return "refused"
    except OSError as error:
        return f"error: {error!r}"
    return "ssh" if banner == b"SSH-" else f"unexpected banner {banner!r}"


async def probe(ip: str, port: int) -> str:
    return await asyncio.to_thread(probe_endpoint, ip, port)


@dataclass(frozen=True)
class KeyRecord:
    """One stored ``Idempotency-Key`` and the instance id of its stored response, if any."""

    key: str
    state: str
    lease_expires_at: datetime
    instance_id: str | None


async def read_key_records(database: Database) -> dict[str, KeyRecord]:
    async with database.read() as session:
        records = (await session.execute(select(IdempotencyRecord))).scalars().all()
    return {
        record.key: KeyRecord(
            key=record.key,
            state=record.state,
            lease_expires_at=record.lease_expires_at,
            instance_id=json.loads(record.response_body)["id"] if record.response_body else None,
        )
        for record in records
    }
