"""End-to-end tests of ``computeplane serve`` with the system OpenSSH client.

Every server is a real process with its own data directory, HTTP port, SSH port and /24
loopback pool, picked per server (see ``support.processes``), so parallel runs do not share
endpoints in practice. Checks
that leave no lasting state share one server per database; tests that stop the server or
need the whole fleet free start their own.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.postgres import PostgresServer
from support.processes import ServeServer, running_serve

SSH = "/usr/bin/ssh"
SCP = "/usr/bin/scp"
SSH_KEYGEN = "/usr/bin/ssh-keygen"

INSTANCES = "/v1/compute/instances"
ONE_GPU = "gpu_1x_h100_sxm5"
EIGHT_GPUS = "gpu_8x_h100_sxm5"

# Generous, because provisioning and restarts run on a shared, possibly busy machine.
READY_TIMEOUT_SECONDS = 60.0
# After a delete, the node's agent is woken at once and closes the endpoint.
TEARDOWN_TIMEOUT_SECONDS = 15.0
SSH_TIMEOUT_SECONDS = 30.0
POLL_SECONDS = 0.25

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(sys.platform != "linux", reason="needs the Linux 127.0.0.0/8 loopback"),
    pytest.mark.skipif(
        not all(os.access(path, os.X_OK) for path in (SSH, SCP, SSH_KEYGEN)),
        reason="needs the OpenSSH client binaries in /usr/bin",
    ),
]


@dataclass(frozen=True)
class ClientKey:
    private_path: Path
    public_line: str


@dataclass(frozen=True)
class Endpoint:
    ip: str
    port: int


class SSHClient:
    """The system ssh and scp in batch mode, with one key and one known_hosts file."""

    def __init__(self, key: ClientKey, known_hosts: Path) -> None:
        self.key = key
        self.known_hosts = known_hosts

    def options(self, host_key_checking: str = "accept-new") -> list[str]:
        return [
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            f"StrictHostKeyChecking={host_key_checking}",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(self.key.private_path),
        ]

    def ssh(
        self,
        endpoint: Endpoint,
        command: str,
        *,
        extra: Sequence[str] = (),
        host_key_checking: str = "accept-new",
    ) -> subprocess.CompletedProcess[str]:
        return run_client(
            [
                SSH,
                *self.options(host_key_checking),
                "-p",
                str(endpoint.port),
                *extra,
                f"ubuntu@{endpoint.ip}",
                command,
            ]
        )

    def scp(
        self, endpoint: Endpoint, source: str, target: str
    ) -> subprocess.CompletedProcess[str]:
        """Copy with scp; ``remote:`` in a path stands for the instance's user and address."""
        remote = f"ubuntu@{endpoint.ip}:"
        return run_client(
            [
                SCP,
                *self.options(),
                "-P",
                str(endpoint.port),
                source.replace("remote:", remote),
                target.replace("remote:", remote),
            ]
        )

    def wait_until_refused(self, endpoint: Endpoint) -> subprocess.CompletedProcess[str]:
        """Retry ``ssh`` until the connection is refused; return the last attempt."""
        deadline = time.monotonic() + TEARDOWN_TIMEOUT_SECONDS
        while True:
            result = self.ssh(endpoint, "true")
            if result.returncode == 255 and "Connection refused" in result.stderr:
                return result
            if time.monotonic() > deadline:
                return result
            time.sleep(POLL_SECONDS)

    def wait_until_connects(
        self, endpoint: Endpoint, command: str, host_key_checking: str
    ) -> subprocess.CompletedProcess[str]:
        """Retry ``ssh`` while the connection is refused; return the first other outcome."""
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            result = self.ssh(endpoint, command, host_key_checking=host_key_checking)
            refused = result.returncode == 255 and "Connection refused" in result.stderr
            if not refused or time.monotonic() > deadline:
                return result
            time.sleep(POLL_SECONDS)


def run_client(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # A minimal environment keeps a developer's ssh-agent (SSH_AUTH_SOCK) out of the test.
    return subprocess.run(
        list(args),
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color"},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SSH_TIMEOUT_SECONDS,
        check=False,
    )


class Api:
    """A client of one server's instance API that deletes the instances it created."""

    def __init__(self, server: ServeServer, key: str) -> None:
        self.server = server
        self.client = httpx.Client(
            base_url=server.base_url, headers={"Authorization": f"Key {key}"}, timeout=30.0
        )
        self.created: list[str] = []

    def create(self, body: dict[str, Any]) -> httpx.Response:
        response = self.client.post(INSTANCES, json=body)
        if response.status_code == 201:
            self.created.append(response.json()["id"])
        return response

    def get(self, instance_id: str) -> httpx.Response:
        return self.client.get(f"{INSTANCES}/{instance_id}")

    def delete(self, instance_id: str) -> httpx.Response:
        return self.client.delete(f"{INSTANCES}/{instance_id}")

    def wait_for_status(
        self, instance_id: str, status: str = "ready", timeout: float = READY_TIMEOUT_SECONDS
    ) -> dict[str, Any]:
        """Poll the instance until it has ``status``; fail with its last body on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            response = self.get(instance_id)
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] == status:
                return body
            if time.monotonic() > deadline:
                pytest.fail(
                    f"instance {instance_id} did not become {status} within {timeout:.0f} s; "
                    f"last: {body}\n{self.server.process.describe()}"
                )
            time.sleep(POLL_SECONDS)

    def delete_created(self) -> None:
        """Delete every instance this client created that still exists."""
        for instance_id in self.created:
            response = self.delete(instance_id)
            assert response.status_code in (204, 404), response.text

    def close(self) -> None:
        self.client.close()


def endpoint_of(instance: dict[str, Any]) -> Endpoint:
    return Endpoint(instance["ip"], instance["ssh_port"])


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]
)
def shared_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """A database for the module's shared server, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        directory = tmp_path_factory.mktemp("shared-sqlite")
        return f"sqlite+aiosqlite:///{directory / 'computeplane.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres_server")
    return postgres.create_database(f"e2e_serve_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="module")
def shared_server(
    shared_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeServer]:
    """One server for the checks that delete what they create."""
    base = tmp_path_factory.mktemp("shared-serve")
    with running_serve(base / "data", shared_database_url, log_dir=base / "logs") as server:
        yield server


@pytest.fixture
def shared_api(shared_server: ServeServer) -> Iterator[Api]:
    api = Api(shared_server, shared_server.admin_key())
    try:
        yield api
        # Later tests on the shared server expect the whole fleet free.
        api.delete_created()
    finally:
        api.close()


@pytest.fixture
def own_server(tmp_path: Path, database_url: str) -> Iterator[ServeServer]:
    """A server for one test, on an empty database; it may be stopped and started again."""
    server = ServeServer(tmp_path / "data", database_url, log_dir=tmp_path / "logs")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client_key(tmp_path: Path) -> ClientKey:
    private_path = tmp_path / "id"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "e2e", "-f", str(private_path)],
        check=True,
        capture_output=True,
    )
    public_line = private_path.with_name("id.pub").read_text().strip()
    return ClientKey(private_path, public_line)


@pytest.fixture
def ssh_client(tmp_path: Path, client_key: ClientKey) -> SSHClient:
    return SSHClient(client_key, tmp_path / "known_hosts")


def test_walkthrough_1x_instance(
    shared_server: ServeServer,
    shared_api: Api,
    client_key: ClientKey,
    ssh_client: SSHClient,
    tmp_path: Path,
) -> None:
    created = shared_api.create({"instance_type": ONE_GPU, "ssh_key": client_key.public_line})
    assert created.status_code == 201, created.text
    assert created.json()["status"] in ("pending", "provisioning"), created.json()
    instance_id = created.json()["id"]

    ready = shared_api.wait_for_status(instance_id)
    endpoint = endpoint_of(ready)
    assert ipaddress.IPv4Address(endpoint.ip) in shared_server.network.address_pool, ready
    assert endpoint.port == shared_server.network.ssh_port, ready

    gpu = ssh_client.ssh(endpoint, "echo $CUDA_VISIBLE_DEVICES")
    assert gpu.returncode == 0, gpu.stderr
    assert re.fullmatch(r"[0-7]\n", gpu.stdout), gpu.stdout

    echo = ssh_client.ssh(endpoint, "echo ok")
    assert echo.returncode == 0, echo.stderr
    assert echo.stdout == "ok\n"

    payload = os.urandom(200_000)
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    upload = ssh_client.scp(endpoint, str(local), "remote:payload.bin")
    assert upload.returncode == 0, upload.stderr
    returned = tmp_path / "returned.bin"
    download = ssh_client.scp(endpoint, "remote:payload.bin", str(returned))
    assert download.returncode == 0, download.stderr
    assert returned.read_bytes() == payload

    terminal = ssh_client.ssh(endpoint, "tty", extra=["-tt"])
    assert terminal.returncode == 0, terminal.stderr
    assert re.fullmatch(r"/dev/pts/\d+\r?\n", terminal.stdout), terminal.stdout

    deleted = shared_api.delete(instance_id)
    assert deleted.status_code == 204, deleted.text
    gone = shared_api.get(instance_id)
    assert gone.status_code == 404, gone.text

    refused = ssh_client.wait_until_refused(endpoint)
    assert refused.returncode == 255, refused
    assert "Connection refused" in refused.stderr


def test_8x_instance_in_sector_1(
    shared_api: Api, client_key: ClientKey, ssh_client: SSHClient
) -> None:
    created = shared_api.create(
        {"instance_type": EIGHT_GPUS, "ssh_key": client_key.public_line, "sector": "sector_1"}
    )
    assert created.status_code == 201, created.text

    ready = shared_api.wait_for_status(created.json()["id"])
    assert ready["sector"] == "sector_1"
    assert ready["region"] == "us-west"

    gpus = ssh_client.ssh(endpoint_of(ready), "echo $CUDA_VISIBLE_DEVICES")
    assert gpus.returncode == 0, gpus.stderr
    assert gpus.stdout == "0,1,2,3,4,5,6,7\n"


def test_cli_key_works_on_server(shared_server: ServeServer) -> None:
    result = shared_server.run_operator_command("keys", "create", "--user", "admin")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    key = lines[0]
    assert re.fullmatch(r"[^:\s]+:[^:\s]+", key), key
    assert key != shared_server.admin_key()

    with httpx.Client(base_url=shared_server.base_url, timeout=30.0) as client:
        listed = client.get(INSTANCES, headers={"Authorization": f"Key {key}"})
    assert listed.status_code == 200, listed.text


def test_admin_key_file_mode(shared_server: ServeServer) -> None:
    mode = shared_server.admin_key_file.stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


def test_log_omits_key_secret(shared_server: ServeServer) -> None:
    secret = shared_server.admin_key().split(":", 1)[1]
    assert secret
    assert secret not in shared_server.process.stderr_text()
    assert secret not in shared_server.process.stdout_text()


def test_log_names_key_file(shared_server: ServeServer) -> None:
    assert str(shared_server.admin_key_file) in shared_server.process.stderr_text()


def test_restart_keeps_instance(
    own_server: ServeServer, client_key: ClientKey, ssh_client: SSHClient
) -> None:
    own_server.start()
    key_before = own_server.admin_key_file.read_text()
    api = Api(own_server, own_server.admin_key())
    try:
        created = api.create({"instance_type": ONE_GPU, "ssh_key": client_key.public_line})
        assert created.status_code == 201, created.text
        instance_id = created.json()["id"]
        before = api.wait_for_status(instance_id)
        first = ssh_client.ssh(endpoint_of(before), "echo ok")
        assert first.returncode == 0, first.stderr
        assert ssh_client.known_hosts.read_text().strip(), "no host key was recorded"

        status = own_server.stop()
        assert not own_server.process.killed, own_server.process.describe()
        assert status in (0, -signal.SIGTERM), own_server.process.describe()

        own_server.start()
        # The API may return the stored ready status before the agent reports, so the strict
        # ssh login (same address, port and host key) is what shows the instance came back.
        again = ssh_client.wait_until_connects(endpoint_of(before), "echo ok", "yes")
        assert again.returncode == 0, again.stderr
        assert again.stdout == "ok\n"
        after = api.wait_for_status(instance_id)
        assert after["ip"] == before["ip"]
        assert after["ssh_port"] == before["ssh_port"]
        assert own_server.admin_key_file.read_text() == key_before
    finally:
        api.close()


async def test_concurrent_8x_creates_one_wins(
    own_server: ServeServer, client_key: ClientKey
) -> None:
    own_server.start()
    body = {"instance_type": EIGHT_GPUS, "ssh_key": client_key.public_line, "sector": "sector_2"}
    headers = {"Authorization": f"Key {own_server.admin_key()}"}
    async with httpx.AsyncClient(
        base_url=own_server.base_url, headers=headers, timeout=60.0
    ) as client:
        responses = await asyncio.gather(*(client.post(INSTANCES, json=body) for _ in range(10)))

    statuses = sorted(response.status_code for response in responses)
    assert statuses == [201] + [503] * 9, [response.text for response in responses]
    winner = next(response for response in responses if response.status_code == 201)
    assert winner.json()["sector"] == "sector_2"
    for response in responses:
        if response.status_code != 503:
            continue
        assert re.fullmatch(r"\d+", response.headers.get("Retry-After", "")), response.headers
        assert response.json()["error"]["code"] == "insufficient_capacity", response.text


def test_sigterm_stop_logs_no_errors(own_server: ServeServer) -> None:
    own_server.start()
    # Each agent long-polls again right after its first report, so the polls are open now.
    own_server.process.wait_for_log(lambda log: log.count(" is reporting") >= 5)
    own_server.stop()

    error_lines = [
        line for line in own_server.process.stderr_text().splitlines() if " ERROR " in line
    ]
    assert error_lines == []
