"""Helpers for lifecycle tests that run the real node agent and LocalRuntime in one process.

A ``Plane`` is one ASGI app shared by the test's HTTP client and every agent's
``ControlPlaneClient``, plus one registered node. ``AgentRunner`` starts and stops
``NodeAgent`` tasks on that node and closes every runtime it was given at teardown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import func, select, update

from computeplane.agent.agent import NodeAgent
from computeplane.agent.client import ControlPlaneClient
from computeplane.agent.runtime.base import Endpoint, InstanceSpec
from computeplane.agent.runtime.local import LocalRuntime, LocalRuntimeConfig
from computeplane.api.app import create_app
from computeplane.domain.clock import utcnow
from computeplane.services.agents import NodeIdentity
from computeplane.services.context import ServiceContext
from computeplane.store.models import GpuAllocation, Instance, InstanceEvent, Node
from conftest import BASE_URL, Keys, add_nodes, node

SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SSH_USER = "ubuntu"
NODE_NAME = "n1"
NODE_GPUS = 8
ONE_GPU = "gpu_1x_h100_sxm5"

#: Generous upper bound for any wait on the agent, so shared, slow machines do not flake.
WAIT_SECONDS = 30.0
CLIENT_TIMEOUT_SECONDS = 30.0
AGENT_STOP_SECONDS = 10.0


# Addresses and ports


def random_pool(prefix_length: int = 24) -> ipaddress.IPv4Network:
    """Return a random loopback network inside 127.90.0.0 to 127.120.255.255.

    ``prefix_length`` must be 24 or more, so the network fits in one /24.
    """
    second = random.randint(90, 120)
    third = random.randrange(256)
    block = 2 ** (32 - prefix_length)
    fourth = random.randrange(0, 256, block) if prefix_length > 24 else 0
    return ipaddress.IPv4Network(f"127.{second}.{third}.{fourth}/{prefix_length}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def runtime_config(
    directory: Path, pool: ipaddress.IPv4Network | None = None
) -> LocalRuntimeConfig:
    """Return a LocalRuntime config with its own directories, address pool and SSH port."""
    return LocalRuntimeConfig(
        state_dir=directory / "state",
        address_dir=directory / "addresses",
        address_pool=pool or random_pool(),
        ssh_port=free_port(),
        ssh_user=SSH_USER,
    )


def address_claims(config: LocalRuntimeConfig) -> list[str]:
    """Return the addresses claimed in the runtime's claim directory."""
    if not config.address_dir.exists():
        return []
    return sorted(path.name for path in config.address_dir.iterdir())


async def accepts_connections(ip: str, port: int) -> bool:
    """Return whether a TCP connection to ``ip:port`` succeeds, so False for a refusal."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(ip, port), 10)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_until(
    condition: Callable[[], Awaitable[bool]], what: str, seconds: float = WAIT_SECONDS
) -> None:
    """Poll ``condition`` every 50 ms and fail the test if it is false after ``seconds``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting until {what}")
        await asyncio.sleep(0.05)


# The control plane


@dataclass(frozen=True)
class InstanceRow:
    """The stored columns of one instance that lifecycle tests check."""

    id: int
    public_id: str
    status: str
    status_reason: str | None
    ip: str | None
    ssh_port: int | None
    deleted_at: datetime | None
    released_at: datetime | None
    desired_version: int
    teardown_version: int | None


@dataclass(frozen=True)
class Event:
    from_status: str | None
    to_status: str
    reason: str
    message: str | None


@dataclass
class Plane:
    """One app serving the test's API client and the agents of node ``n1``."""

    context: ServiceContext
    app: FastAPI
    api: httpx.AsyncClient
    headers: dict[str, str]
    node: NodeIdentity
    node_token: str

    async def create(self, ssh_key: str, instance_type: str = ONE_GPU) -> str:
        """Create an instance through the API and return its id."""
        body = {"instance_type": instance_type, "ssh_key": ssh_key}
        response = await self.api.post("/v1/compute/instances", json=body, headers=self.headers)
        assert response.status_code == 201, response.text
        instance_id: str = response.json()["id"]
        return instance_id

    async def get(self, instance_id: str) -> httpx.Response:
        return await self.api.get(f"/v1/compute/instances/{instance_id}", headers=self.headers)

    async def delete(self, instance_id: str) -> httpx.Response:
        return await self.api.delete(f"/v1/compute/instances/{instance_id}", headers=self.headers)

    async def status(self, instance_id: str) -> str | None:
        """Return the status the API shows, or None when the API returns 404."""
        response = await self.get(instance_id)
        if response.status_code == 404:
            return None
        assert response.status_code == 200, response.text
        status: str = response.json()["status"]
        return status

    async def wait_for_status(
        self, instance_id: str, status: str, seconds: float = WAIT_SECONDS
    ) -> dict[str, Any]:
        """Poll the API until the instance has ``status`` and return its body."""

        async def reached() -> bool:
            return await self.status(instance_id) == status

        await wait_until(reached, f"instance {instance_id} is {status}", seconds)
        body: dict[str, Any] = (await self.get(instance_id)).json()
        return body

    async def instance_row(self, instance_id: str) -> InstanceRow:
        """Return the stored instance, deleted or not."""
        async with self.context.database.read() as session:
            instance = (
                (await session.execute(select(Instance).where(Instance.public_id == instance_id)))
                .unique()
                .scalar_one()
            )
            return InstanceRow(
                id=instance.id,
                public_id=instance.public_id,
                status=instance.status,
                status_reason=instance.status_reason,
                ip=instance.ip,
                ssh_port=instance.ssh_port,
                deleted_at=instance.deleted_at,
                released_at=instance.released_at,
                desired_version=instance.desired_version,
                teardown_version=instance.teardown_version,
            )

    async def node_row(self) -> Node:
        async with self.context.database.read() as session:
            return (
                await session.execute(select(Node).where(Node.id == self.node.id))
            ).scalar_one()

    async def gpus_free(self) -> int:
        return (await self.node_row()).gpus_free

    async def allocated_indices(self, instance_id: str) -> list[int]:
        """Return the GPU indices allocated to the instance, ascending."""
        async with self.context.database.read() as session:
            rows = await session.execute(
                select(GpuAllocation.gpu_index)
                .join(Instance, Instance.id == GpuAllocation.instance_id)
                .where(Instance.public_id == instance_id)
                .order_by(GpuAllocation.gpu_index)
            )
            return list(rows.scalars().all())

    async def allocation_count(self) -> int:
        """Return the number of allocation rows on the node."""
        async with self.context.database.read() as session:
            count = await session.scalar(
                select(func.count())
                .select_from(GpuAllocation)
                .where(GpuAllocation.node_id == self.node.id)
            )
            return int(count or 0)

    async def events(self, instance_id: str) -> list[Event]:
        """Return the instance's status changes in the order they were stored."""
        async with self.context.database.read() as session:
            rows = await session.execute(
                select(
                    InstanceEvent.from_status,
                    InstanceEvent.to_status,
                    InstanceEvent.reason,
                    InstanceEvent.message,
                )
                .join(Instance, Instance.id == InstanceEvent.instance_id)
                .where(Instance.public_id == instance_id)
                .order_by(InstanceEvent.id)
            )
            return [Event(*row) for row in rows]

    async def wait_for_release(self, instance_id: str) -> InstanceRow:
        """Poll until the instance's GPUs are released and return the stored instance."""

        async def released() -> bool:
            return (await self.instance_row(instance_id)).released_at is not None

        await wait_until(released, f"instance {instance_id} releases its GPUs")
        return await self.instance_row(instance_id)

    async def backdate_heartbeat(self, seconds: float) -> None:
        """Move the node's last heartbeat ``seconds`` into the past."""
        async with self.context.database.write() as session:
            await session.execute(
                update(Node)
                .where(Node.id == self.node.id)
                .values(last_heartbeat_at=utcnow() - timedelta(seconds=seconds))
            )

    async def wait_for_reports(self, count: int = 2) -> None:
        """Wait until the node's agent has sent ``count`` more reports."""
        for _ in range(count):
            before = (await self.node_row()).last_heartbeat_at

            async def reported(before: datetime | None = before) -> bool:
                return (await self.node_row()).last_heartbeat_at != before

            await wait_until(reported, "the agent reports again")


@contextlib.asynccontextmanager
async def open_plane(context: ServiceContext, keys: Keys) -> AsyncIterator[Plane]:
    """Register node ``n1`` and serve one app to the test and to the node's agents."""
    tokens = await add_nodes(context.database, node(NODE_NAME, gpus=NODE_GPUS))
    async with context.database.read() as session:
        node_id = await session.scalar(select(Node.id).where(Node.name == NODE_NAME))
    assert node_id is not None
    app = create_app(context)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as api:
        yield Plane(
            context=context,
            app=app,
            api=api,
            headers=Keys.header(keys.a),
            node=NodeIdentity(id=node_id, name=NODE_NAME),
            node_token=tokens[NODE_NAME],
        )


def with_settings(context: ServiceContext, **overrides: Any) -> ServiceContext:
    """Return a context on the same database and notifier with some settings replaced."""
    settings = type(context.settings)(**{**context.settings.model_dump(), **overrides})
    return ServiceContext(settings, context.database, context.notifier)


# The node agent and runtimes


class GatedRuntime(LocalRuntime):
    """A LocalRuntime whose ``start`` waits for ``gate`` before it starts anything.

    It keeps an instance in ``provisioning`` for as long as a test needs. ``cancelled_starts``
    lists the instance ids whose start was cancelled while waiting.
    """

    def __init__(self, config: LocalRuntimeConfig) -> None:
        super().__init__(config)
        self.gate = asyncio.Event()
        self.cancelled_starts: list[str] = []

    async def start(self, spec: InstanceSpec) -> Endpoint:
        try:
            await self.gate.wait()
        except asyncio.CancelledError:
            self.cancelled_starts.append(spec.instance_id)
            raise
        return await super().start(spec)


@dataclass
class _RunningAgent:
    agent: NodeAgent
    client: ControlPlaneClient
    task: asyncio.Task[None]


@dataclass
class AgentRunner:
    """Runs ``NodeAgent`` tasks for a plane's node, at most one at a time."""

    plane: Plane
    runtimes: list[LocalRuntime] = field(default_factory=list)
    _current: _RunningAgent | None = None

    def runtime(self, config: LocalRuntimeConfig) -> LocalRuntime:
        """Build a LocalRuntime that ``close_all`` closes."""
        runtime = LocalRuntime(config)
        self.runtimes.append(runtime)
        return runtime

    def gated_runtime(self, config: LocalRuntimeConfig) -> GatedRuntime:
        runtime = GatedRuntime(config)
        self.runtimes.append(runtime)
        return runtime

    def start(self, runtime: LocalRuntime) -> NodeAgent:
        """Start an agent on ``runtime``. The previous agent must be stopped first."""
        assert self._current is None, "stop the running agent first"
        client = ControlPlaneClient(
            BASE_URL, self.plane.node_token, transport=httpx.ASGITransport(app=self.plane.app)
        )
        agent = NodeAgent(NODE_NAME, client, runtime, poll_seconds=2, heartbeat_seconds=0.5)
        task = asyncio.create_task(agent.run(), name=f"agent-{NODE_NAME}")
        self._current = _RunningAgent(agent, client, task)
        return agent

    async def stop(self) -> None:
        """Cancel the running agent. Its runtime keeps serving until closed."""
        ended = await self.cancel_and_wait()
        assert ended, (
            f"NodeAgent.run() did not end within {AGENT_STOP_SECONDS:g} s of its cancellation"
        )

    async def cancel_and_wait(self) -> bool:
        """Cancel the running agent and return whether it ended in time.

        The cancellation happens before the first await, so a caller can pair it with a
        change made in the same event-loop iteration. An agent that does not end has its
        loop tasks cancelled directly, so that the test can still clean up.
        """
        current, self._current = self._current, None
        if current is None:
            return True
        current.task.cancel()
        done, _ = await asyncio.wait({current.task}, timeout=AGENT_STOP_SECONDS)
        if not done:
            for task in _tasks_of(current.agent):
                task.cancel()
            await asyncio.wait({current.task}, timeout=AGENT_STOP_SECONDS)
        await current.client.aclose()
        return bool(done)

    async def close_all(self) -> None:
        try:
            await self.stop()
        finally:
            for runtime in self.runtimes:
                if isinstance(runtime, GatedRuntime):
                    runtime.gate.set()
                await runtime.close()


def _tasks_of(agent: NodeAgent) -> list[asyncio.Task[Any]]:
    """Return the running tasks whose coroutine is a method of ``agent``."""
    tasks = []
    for task in asyncio.all_tasks():
        frame = getattr(task.get_coro(), "cr_frame", None)
        if frame is not None and frame.f_locals.get("self") is agent:
            tasks.append(task)
    return tasks


def report_loop_is_idle(agent: NodeAgent) -> bool:
    """Return whether the agent's report loop waits for a change, outside any report.

    It inspects the await chain of the loop's task, so it depends on no product internals
    beyond the name of ``NodeAgent._report_loop`` and ``ControlPlaneClient.report``.
    """
    for task in _tasks_of(agent):
        coroutine = task.get_coro()
        if getattr(coroutine, "__qualname__", "") != "NodeAgent._report_loop":
            continue
        awaited_names = []
        awaited = getattr(coroutine, "cr_await", None)
        while awaited is not None:
            awaited_names.append(getattr(awaited, "__qualname__", type(awaited).__name__))
            awaited = getattr(awaited, "cr_await", None)
        return not {"ControlPlaneClient.report", "sleep"} & set(awaited_names)
    return False


# The SSH client


@dataclass(frozen=True)
class ClientKey:
    private_path: Path
    public_line: str


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: str
    stderr: str


async def run_process(args: Sequence[str]) -> Completed:
    """Run a client program without blocking the event loop, which serves the endpoints."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CLIENT_TIMEOUT_SECONDS)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, stdout.decode(), stderr.decode())


async def generate_key(
    directory: Path, name: str, key_type: str = "ed25519", bits: int | None = None
) -> ClientKey:
    """Generate an unencrypted client key pair with ssh-keygen."""
    private_path = directory / name
    args = [SSH_KEYGEN, "-q", "-t", key_type, "-N", "", "-C", name, "-f", str(private_path)]
    if bits is not None:
        args += ["-b", str(bits)]
    result = await run_process(args)
    assert result.returncode == 0, result.stderr
    public_line = private_path.with_name(f"{name}.pub").read_text().strip()
    return ClientKey(private_path, public_line)


async def ssh(
    key: ClientKey,
    ip: str,
    port: int,
    command: str,
    *,
    known_hosts: Path,
    strict: bool = False,
) -> Completed:
    """Run ``command`` on the instance with the system ssh client in batch mode."""
    args = [
        SSH,
        "-F",
        "none",
        "-o",
        "BatchMode=yes",
        "-o",
        f"StrictHostKeyChecking={'yes' if strict else 'no'}",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
        "-i",
        str(key.private_path),
        "-p",
        str(port),
        f"{SSH_USER}@{ip}",
        command,
    ]
    return await run_process(args)
