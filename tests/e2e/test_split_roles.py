"""The README walkthrough on computeplane split into its roles, on PostgreSQL.

``init`` and ``nodes add`` prepare the database. Two ``computeplane api`` replicas, one
``computeplane worker`` and one ``computeplane agent`` per node then run as separate
processes. Each agent talks to a different replica, so a create or delete on one replica
must reach an agent long-polling the other one through the database. Each agent has its
own data directory and its own loopback pool and SSH port, as two hosts would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.operator_cli import OperatorCli
from support.postgres import PostgresServer
from support.processes import (
    POLL_INTERVAL_SECONDS,
    READY_TIMEOUT_SECONDS,
    ComputeplaneProcess,
    LocalNetwork,
    computeplane_environment,
    free_port,
)

SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"

INSTANCES = "/v1/compute/instances"
ONE_GPU = "gpu_1x_h100_sxm5"
EIGHT_GPUS = "gpu_8x_h100_sxm5"

NodeRows = dict[str, dict[str, str]]

WEST_NODE = "usw-ib-01"
EAST_NODE = "use-01"

# Generous, because every process shares a possibly busy machine.
INSTANCE_TIMEOUT_SECONDS = 60.0
TEARDOWN_TIMEOUT_SECONDS = 30.0
SSH_TIMEOUT_SECONDS = 30.0

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.postgres,
    pytest.mark.skipif(sys.platform != "linux", reason="needs the Linux 127.0.0.0/8 loopback"),
    pytest.mark.skipif(
        not all(os.access(path, os.X_OK) for path in (SSH, SSH_KEYGEN)),
        reason="needs the OpenSSH client binaries in /usr/bin",
    ),
]


@dataclass
class SplitCluster:
    """The processes of one split deployment and the operator commands on its database."""

    cli: OperatorCli
    admin_key: str
    replica_urls: list[str]
    networks: dict[str, LocalNetwork]
    processes: list[ComputeplaneProcess]

    def describe(self) -> str:
        """Return every process's command, state and log tail, for assertion messages."""
        return "\n\n".join(process.describe() for process in self.processes)

    def client(self, replica: int) -> httpx.Client:
        """Return an HTTP client of replica 1 or 2 that sends the admin key."""
        return httpx.Client(
            base_url=self.replica_urls[replica - 1],
            headers={"Authorization": f"Key {self.admin_key}"},
            timeout=30.0,
        )


def pick_networks(count: int) -> list[LocalNetwork]:
    """Return ``count`` local networks with distinct address pools and SSH ports."""
    networks: list[LocalNetwork] = []
    while len(networks) < count:
        candidate = LocalNetwork.pick()
        if all(
            candidate.address_pool != taken.address_pool and candidate.ssh_port != taken.ssh_port
            for taken in networks
        ):
            networks.append(candidate)
    return networks


def distinct_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout
    return result.stdout.strip()


def wait_for_api(process: ComputeplaneProcess, base_url: str, admin_key: str) -> None:
    """Poll the replica's instance list until it returns 200."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    last_outcome = "no request was sent"
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        while True:
            assert process.running, f"the API replica exited: {process.describe()}"
            try:
                response = client.get(INSTANCES, headers={"Authorization": f"Key {admin_key}"})
            except httpx.HTTPError as error:
                last_outcome = f"request failed: {error!r}"
            else:
                if response.status_code == 200:
                    return
                last_outcome = f"status {response.status_code}: {response.text}"
            assert time.monotonic() < deadline, (
                f"the API replica was not ready within {READY_TIMEOUT_SECONDS:.0f} s "
                f"(last: {last_outcome}): {process.describe()}"
            )
            time.sleep(POLL_INTERVAL_SECONDS)


def wait_for_nodes(
    cluster: SplitCluster, accept: Callable[[NodeRows], bool], what: str, timeout: float
) -> NodeRows:
    """Poll ``nodes list`` until ``accept(rows)`` is true and return the accepted rows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.cli.nodes()
        if accept(rows):
            return rows
        assert time.monotonic() < deadline, (
            f"nodes list did not show {what} within {timeout:.0f} s; last: {rows}\n"
            f"{cluster.describe()}"
        )
        time.sleep(POLL_INTERVAL_SECONDS)


def start(process: ComputeplaneProcess, processes: list[ComputeplaneProcess]) -> None:
    """Start ``process`` after recording it, so the finalizer stops it even if start fails."""
    processes.append(process)
    process.start()


@pytest.fixture
def split_cluster(tmp_path: Path, postgres_server: PostgresServer) -> Iterator[SplitCluster]:
    database_url = postgres_server.create_database(f"split_{uuid.uuid4().hex[:12]}")
    control_dir = tmp_path / "control"
    log_dir = tmp_path / "logs"
    cli = OperatorCli.create(control_dir, database_url)

    initialized = cli.run("init")
    assert initialized.returncode == 0, initialized.stderr
    admin_key = (control_dir / "admin-api-key").read_text().strip()
    west_token = only_line(
        cli.run(
            "nodes", "add", WEST_NODE, "--region", "us-west", "--sector", "sector_1", "--gpus", "8"
        )
    )
    east_token = only_line(
        cli.run("nodes", "add", EAST_NODE, "--region", "us-east", "--gpus", "8")
    )

    ports = distinct_ports(2)
    replica_urls = [f"http://127.0.0.1:{port}" for port in ports]
    west_network, east_network = pick_networks(2)
    networks = {WEST_NODE: west_network, EAST_NODE: east_network}
    processes: list[ComputeplaneProcess] = []
    cluster = SplitCluster(cli, admin_key, replica_urls, networks, processes)
    database_options = ["--data-dir", str(control_dir), "--database-url", database_url]
    try:
        for number, port in enumerate(ports, start=1):
            start(
                ComputeplaneProcess(
                    ["api", "--port", str(port), *database_options],
                    env=computeplane_environment(),
                    log_dir=log_dir,
                    name=f"api-{number}",
                ),
                processes,
            )
        start(
            ComputeplaneProcess(
                ["worker", *database_options],
                env=computeplane_environment(),
                log_dir=log_dir,
                name="worker",
            ),
            processes,
        )
        # The west agent reports to replica 1 and the east agent to replica 2.
        agents = [
            (WEST_NODE, west_token, replica_urls[0]),
            (EAST_NODE, east_token, replica_urls[1]),
        ]
        for node_name, token, replica_url in agents:
            start(
                ComputeplaneProcess(
                    [
                        "agent",
                        "--control-plane",
                        replica_url,
                        "--node-token",
                        token,
                        "--data-dir",
                        str(tmp_path / f"agent-{node_name}"),
                    ],
                    env=computeplane_environment(networks[node_name].environment()),
                    log_dir=log_dir,
                    name=f"agent-{node_name}",
                ),
                processes,
            )

        for process, replica_url in zip(processes[:2], replica_urls, strict=True):
            wait_for_api(process, replica_url, admin_key)
        wait_for_nodes(
            cluster,
            lambda rows: all(row["AGENT"] == "reporting" for row in rows.values()),
            "both agents reporting",
            READY_TIMEOUT_SECONDS,
        )
        yield cluster
    finally:
        # Agents first, so no agent is left polling a stopped replica.
        for process in reversed(processes):
            process.stop()


def run_client(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # A minimal environment keeps a developer's ssh-agent (SSH_AUTH_SOCK) out of the test.
    return subprocess.run(
        list(args),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SSH_TIMEOUT_SECONDS,
        check=False,
    )


def ssh(
    private_key: Path, known_hosts: Path, instance: dict[str, Any], command: str
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` on the instance as ``ubuntu`` with the system ssh in batch mode."""
    return run_client(
        [
            SSH,
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known_hosts}",
            "-o",
            "StrictHostKeyChecking=accept-new",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(private_key),
            "-p",
            str(instance["ssh_port"]),
            f"ubuntu@{instance['ip']}",
            command,
        ]
    )


def wait_until_refused(
    private_key: Path, known_hosts: Path, instance: dict[str, Any]
) -> subprocess.CompletedProcess[str]:
    """Retry ``ssh`` until the connection is refused or the deadline passes, and return the
    last attempt."""
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_SECONDS
    while True:
        result = ssh(private_key, known_hosts, instance, "true")
        refused = result.returncode == 255 and "Connection refused" in result.stderr
        if refused or time.monotonic() > deadline:
            return result
        time.sleep(POLL_INTERVAL_SECONDS)


def wait_until_ready(
    client: httpx.Client, instance_id: str, cluster: SplitCluster
) -> dict[str, Any]:
    """Poll ``GET`` on ``client``'s replica until the instance is ready and return its body."""
    deadline = time.monotonic() + INSTANCE_TIMEOUT_SECONDS
    while True:
        response = client.get(f"{INSTANCES}/{instance_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] == "ready":
            return body
        assert time.monotonic() < deadline, (
            f"instance {instance_id} was not ready within {INSTANCE_TIMEOUT_SECONDS:.0f} s; "
            f"last: {body}\n{cluster.describe()}"
        )
        time.sleep(POLL_INTERVAL_SECONDS)


def generate_key(directory: Path) -> tuple[Path, str]:
    """Generate an ed25519 key pair without a passphrase.

    Returns the private key's path and the public key line.
    """
    private_key = directory / "id_ed25519"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "split-roles", "-f", str(private_key)],
        check=True,
        capture_output=True,
    )
    return private_key, private_key.with_name("id_ed25519.pub").read_text().strip()


def test_split_roles_walkthrough(split_cluster: SplitCluster, tmp_path: Path) -> None:
    cluster = split_cluster
    private_key, public_key = generate_key(tmp_path)
    known_hosts = tmp_path / "known_hosts"

    with cluster.client(1) as replica_1, cluster.client(2) as replica_2:
        # A 1x instance, created on replica 1 and watched on replica 2.
        started = time.monotonic()
        created = replica_1.post(INSTANCES, json={"instance_type": ONE_GPU, "ssh_key": public_key})
        assert created.status_code == 201, created.text
        one_gpu_id = created.json()["id"]
        one_gpu = wait_until_ready(replica_2, one_gpu_id, cluster)
        seconds_to_ready = time.monotonic() - started
        timing = f"ready {seconds_to_ready:.2f} s after the create was sent"
        # Placement prefers nodes outside sectors for 1x, so it lands on the east node.
        assert one_gpu["region"] == "us-east", f"{one_gpu}; {timing}"
        assert one_gpu.get("ip"), f"{one_gpu}; {timing}"
        assert one_gpu.get("ssh_port") == cluster.networks[EAST_NODE].ssh_port, one_gpu

        echo = ssh(private_key, known_hosts, one_gpu, "echo ok")
        assert echo.returncode == 0, echo.stderr
        assert echo.stdout == "ok\n"

        # An 8x instance in sector_1, created on replica 2 and watched on replica 1.
        created = replica_2.post(
            INSTANCES,
            json={"instance_type": EIGHT_GPUS, "ssh_key": public_key, "sector": "sector_1"},
        )
        assert created.status_code == 201, created.text
        eight_gpu_id = created.json()["id"]
        eight_gpu = wait_until_ready(replica_1, eight_gpu_id, cluster)
        assert eight_gpu["region"] == "us-west", eight_gpu
        assert eight_gpu["sector"] == "sector_1", eight_gpu
        assert eight_gpu.get("ssh_port") == cluster.networks[WEST_NODE].ssh_port, eight_gpu

        gpus = ssh(private_key, known_hosts, eight_gpu, "echo $CUDA_VISIBLE_DEVICES")
        assert gpus.returncode == 0, gpus.stderr
        assert gpus.stdout == "0,1,2,3,4,5,6,7\n"

        for instance_id in (one_gpu_id, eight_gpu_id):
            deleted = replica_2.delete(f"{INSTANCES}/{instance_id}")
            assert deleted.status_code == 204, deleted.text
            for replica in (replica_1, replica_2):
                gone = replica.get(f"{INSTANCES}/{instance_id}")
                assert gone.status_code == 404, f"{replica.base_url}: {gone.text}"

    for instance in (one_gpu, eight_gpu):
        refused = wait_until_refused(private_key, known_hosts, instance)
        assert refused.returncode == 255, refused
        assert "Connection refused" in refused.stderr, refused.stderr

    # GPUs return to the pool once each agent confirms its teardown.
    rows = wait_for_nodes(
        cluster,
        lambda rows: all(row["FREE"] == row["GPUS"] for row in rows.values()),
        "every GPU free",
        TEARDOWN_TIMEOUT_SECONDS,
    )
    for name in (WEST_NODE, EAST_NODE):
        assert rows[name]["FREE"] == "8", rows[name]
        assert rows[name]["USED"] == "0", rows[name]
        assert rows[name]["INSTANCES"] == "0", rows[name]
    for process in cluster.processes:
        assert process.running, process.describe()
