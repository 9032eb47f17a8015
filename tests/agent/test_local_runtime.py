"""Tests of LocalRuntime against the system OpenSSH client binaries.

Each test gets its own state and claim directories, a random /24 pool inside 127.78.0.0/16
and a random free port, so tests running in parallel do not share addresses.
"""

from __future__ import annotations

import asyncio
import base64
import fcntl
import ipaddress
import os
import random
import shutil
import signal
import socket
import struct
import sys
import termios
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from computeplane.agent.runtime.base import Endpoint, InstanceSpec
from computeplane.agent.runtime.local import LocalRuntime, LocalRuntimeConfig
from computeplane.agent.runtime.sshserver import parse_authorized_key
from computeplane.domain.errors import RuntimeFailure

SSH = "/usr/bin/ssh"
SCP = "/usr/bin/scp"
SFTP = "/usr/bin/sftp"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
SSH_KEYSCAN = "/usr/bin/ssh-keyscan"
CLIENT_TIMEOUT_SECONDS = 30

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="needs the Linux 127.0.0.0/8 loopback"),
    pytest.mark.skipif(
        not all(os.access(path, os.X_OK) for path in (SSH, SCP, SFTP, SSH_KEYGEN, SSH_KEYSCAN)),
        reason="needs the OpenSSH client binaries in /usr/bin",
    ),
]


@dataclass(frozen=True)
class ClientKey:
    private_path: Path
    public_line: str


@dataclass(frozen=True)
class Completed:
    returncode: int
    stdout: bytes
    stderr: bytes


class SSHClient:
    """Runs the system ssh, scp and sftp in batch mode with one key and known_hosts file."""

    def __init__(self, work_dir: Path, key: ClientKey, port: int) -> None:
        self.work_dir = work_dir
        self.key = key
        self.port = port
        self.known_hosts = work_dir / "known_hosts"

    def options(self, key: ClientKey | None = None, strict: bool = False) -> list[str]:
        identity = key or self.key
        return [
            "-F",
            "none",
            "-o",
            "BatchMode=yes",
            "-o",
            f"StrictHostKeyChecking={'yes' if strict else 'no'}",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=10",
            "-o",
            "LogLevel=ERROR",
            "-i",
            str(identity.private_path),
        ]

    async def ssh(
        self,
        endpoint: Endpoint,
        command: str | None,
        *,
        user: str = "ubuntu",
        input: bytes | None = None,
        key: ClientKey | None = None,
        extra: Sequence[str] = (),
        strict: bool = False,
    ) -> Completed:
        args = [SSH, *self.options(key, strict), "-p", str(endpoint.port), *extra]
        args.append(f"{user}@{endpoint.ip}")
        if command is not None:
            args.append(command)
        return await run_client(args, input=input)

    async def scp_upload(
        self, endpoint: Endpoint, local: Path, remote: str, *legacy: str
    ) -> Completed:
        args = [SCP, *legacy, *self.options(), "-P", str(endpoint.port)]
        args += [str(local), f"ubuntu@{endpoint.ip}:{remote}"]
        return await run_client(args)

    async def sftp_batch(self, endpoint: Endpoint, commands: str) -> Completed:
        batch = self.work_dir / "sftp-batch"
        batch.write_text(commands)
        args = [SFTP, *self.options(), "-P", str(endpoint.port), "-b", str(batch)]
        args.append(f"ubuntu@{endpoint.ip}")
        return await run_client(args)


async def run_client(
    args: Sequence[str], *, input: bytes | None = None, stdin: int | None = None
) -> Completed:
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=stdin if stdin is not None else asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=client_environment(),
    )
    try:
        stdout, stderr = await asyncio.wait_for(
            process.communicate(input if stdin is None else None), CLIENT_TIMEOUT_SECONDS
        )
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return Completed(process.returncode, stdout, stderr)


def client_environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "xterm-256color"}


def generate_client_key(directory: Path, name: str) -> ClientKey:
    private_path = directory / name
    os.spawnv(
        os.P_WAIT,
        SSH_KEYGEN,
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(private_path)],
    )
    public_line = private_path.with_suffix(".pub").read_text().strip()
    return ClientKey(private_path, public_line)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def random_pool(prefix_length: int = 24) -> ipaddress.IPv4Network:
    base = ipaddress.IPv4Address("127.78.0.0") + random.randrange(256) * 256
    return ipaddress.IPv4Network(f"{base}/{prefix_length}")


def process_alive(pid: int) -> bool:
    """Return whether ``pid`` runs; zombies count as gone, since nothing may reap them."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        # Reading the file of a process that exits meanwhile raises ESRCH.
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


async def wait_until_gone(pid: int) -> bool:
    """Return whether ``pid`` ends within 10 seconds."""
    for _ in range(200):
        if not process_alive(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def host_key_line(endpoint: Endpoint) -> str:
    result = await run_client(
        [SSH_KEYSCAN, "-T", "10", "-t", "ed25519", "-p", str(endpoint.port), endpoint.ip]
    )
    lines = [line for line in result.stdout.decode().splitlines() if not line.startswith("#")]
    assert len(lines) == 1, result
    return lines[0]


def sk_ed25519_line() -> str:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    blob = ssh_string(b"sk-ssh-ed25519@openssh.com") + ssh_string(raw) + ssh_string(b"ssh:")
    return f"sk-ssh-ed25519@openssh.com {base64.b64encode(blob).decode()} fido@example"


def sk_ecdsa_line() -> str:
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key_type = b"sk-ecdsa-sha2-nistp256@openssh.com"
    blob = ssh_string(key_type) + ssh_string(b"nistp256") + ssh_string(point)
    blob += ssh_string(b"ssh:")
    return f"{key_type.decode()} {base64.b64encode(blob).decode()} fido@example"


def ssh_string(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


@pytest.fixture
def client_key(tmp_path: Path) -> ClientKey:
    return generate_client_key(tmp_path, "client_key")


@pytest.fixture
def config(tmp_path: Path) -> LocalRuntimeConfig:
    return LocalRuntimeConfig(
        state_dir=tmp_path / "state",
        address_dir=tmp_path / "addresses",
        address_pool=random_pool(),
        ssh_port=free_port(),
    )


@pytest.fixture
async def runtime(config: LocalRuntimeConfig) -> AsyncIterator[LocalRuntime]:
    runtime = LocalRuntime(config)
    yield runtime
    await runtime.close()


@pytest.fixture
def client(tmp_path: Path, client_key: ClientKey, config: LocalRuntimeConfig) -> SSHClient:
    return SSHClient(tmp_path, client_key, config.ssh_port)


def make_spec(
    key: ClientKey, instance_id: str = "inst-a", gpus: tuple[int, ...] = (0,)
) -> InstanceSpec:
    return InstanceSpec(instance_id=instance_id, ssh_public_key=key.public_line, gpu_indices=gpus)


def host_addresses(config: LocalRuntimeConfig) -> list[str]:
    return [str(ip) for ip in config.address_pool.hosts()]


# Exec sessions


async def test_exec_sees_gpu_indices(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key, gpus=(0, 1, 2, 3, 4, 5, 6, 7)))

    result = await client.ssh(endpoint, "echo $CUDA_VISIBLE_DEVICES")

    assert result.returncode == 0, result
    assert result.stdout == b"0,1,2,3,4,5,6,7\n"


async def test_exec_environment_is_clean(
    runtime: LocalRuntime,
    client: SSHClient,
    client_key: ClientKey,
    config: LocalRuntimeConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COMPUTEPLANE_TEST_SECRET", "postgresql://user:password@db/computeplane")
    endpoint = await runtime.start(make_spec(client_key, gpus=(3,)))

    result = await client.ssh(endpoint, "env; echo cwd=$(pwd)")

    assert result.returncode == 0, result
    lines = result.stdout.decode().splitlines()
    environment = dict(line.split("=", 1) for line in lines if "=" in line)
    home = str(config.state_dir / "inst-a" / "home")
    assert "COMPUTEPLANE_TEST_SECRET" not in environment
    assert "postgresql://" not in result.stdout.decode()
    assert environment["COMPUTEPLANE_INSTANCE_ID"] == "inst-a"
    assert environment["CUDA_VISIBLE_DEVICES"] == "3"
    assert environment["HOME"] == home
    assert environment["USER"] == "ubuntu"
    assert environment["LOGNAME"] == "ubuntu"
    assert environment["SHELL"] in {"/bin/bash", "/bin/sh"}
    assert environment["PATH"] == os.environ["PATH"]
    assert "TERM" not in environment
    assert environment["cwd"] == home


async def test_exec_exit_status_propagates(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(endpoint, "exit 3")

    assert result.returncode == 3


async def test_exec_killed_by_signal_reports_signal(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(endpoint, "kill -9 $$")

    # OpenSSH's client exits with 255 when the server reports an exit signal.
    assert result.returncode == 255


async def test_exec_streams_stdin_stdout_stderr(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(endpoint, "cat; echo done >&2", input=b"hi\n")

    assert result.returncode == 0, result
    assert result.stdout == b"hi\n"
    assert result.stderr == b"done\n"


async def test_exec_streams_large_input(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    payload = os.urandom(4 * 1024 * 1024)

    result = await client.ssh(endpoint, "cat", input=payload)

    assert result.returncode == 0, result.stderr
    assert len(result.stdout) == len(payload)
    assert result.stdout == payload


async def test_shell_without_pty_reads_stdin(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(endpoint, None, extra=["-T"], input=b"echo via-stdin\nexit 6\n")

    assert result.returncode == 6, result
    assert result.stdout == b"via-stdin\n"


# PTY sessions


async def test_pty_exec_reports_tty_and_size(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    # ssh sends the window size of its stdin terminal, so give it a terminal of known size.
    master_fd, slave_fd = os.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 132, 0, 0))
    args = [SSH, *client.options(), "-p", str(endpoint.port), "-tt"]
    args += [f"ubuntu@{endpoint.ip}", "tty; stty size; echo term=$TERM"]
    try:
        result = await run_client(args, stdin=slave_fd)
    finally:
        os.close(slave_fd)
        os.close(master_fd)

    assert result.returncode == 0, result
    lines = result.stdout.decode().splitlines()
    assert lines[0].startswith("/dev/pts/")
    assert lines[1] == "40 132"
    assert lines[2] == "term=xterm-256color"


async def test_pty_exec_with_background_job_returns(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    loop = asyncio.get_running_loop()
    started = loop.time()

    # The background sleep keeps the terminal open after the shell exits.
    result = await client.ssh(endpoint, "sleep 300 & echo started", extra=["-tt"])

    assert result.returncode == 0, result
    assert b"started" in result.stdout
    assert loop.time() - started < 15


async def test_pty_shell_runs_typed_commands(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(
        endpoint, None, extra=["-tt"], input=b"echo marker-$((6 * 7))\nexit 5\n"
    )

    assert result.returncode == 5, result
    assert b"marker-42" in result.stdout


async def test_pty_shell_follows_window_changes(
    runtime: LocalRuntime, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    async with asyncssh.connect(
        endpoint.ip,
        endpoint.port,
        username="ubuntu",
        client_keys=[str(client_key.private_path)],
        known_hosts=None,
        agent_path=None,
        config=None,
    ) as connection:
        process = await connection.create_process(
            term_type="xterm", term_size=(100, 30), encoding=None
        )
        process.stdin.write(b"stty size; tty\n")
        first = await asyncio.wait_for(process.stdout.readuntil(b"/dev/pts/"), 10)
        process.change_terminal_size(120, 40)
        process.stdin.write(b"stty size\n")
        second = await asyncio.wait_for(process.stdout.readuntil(b"40 120"), 10)
        process.stdin.write(b"exit 4\n")
        completed = await asyncio.wait_for(process.wait(), 10)

    assert b"30 100" in first
    assert b"40 120" in second
    assert completed.exit_status == 4


# File transfer


async def test_scp_upload_and_sftp_download(
    runtime: LocalRuntime,
    client: SSHClient,
    client_key: ClientKey,
    config: LocalRuntimeConfig,
    tmp_path: Path,
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    home = config.state_dir / "inst-a" / "home"
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(300_000))

    uploaded = await client.scp_upload(endpoint, upload, "uploaded.bin")
    downloaded = await client.sftp_batch(
        endpoint, f"get uploaded.bin {tmp_path / 'downloaded.bin'}\n"
    )

    assert uploaded.returncode == 0, uploaded
    assert (home / "uploaded.bin").read_bytes() == upload.read_bytes()
    assert downloaded.returncode == 0, downloaded
    assert (tmp_path / "downloaded.bin").read_bytes() == upload.read_bytes()


async def test_legacy_scp_upload_lands_in_home(
    runtime: LocalRuntime,
    client: SSHClient,
    client_key: ClientKey,
    config: LocalRuntimeConfig,
    tmp_path: Path,
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    upload = tmp_path / "legacy.txt"
    upload.write_text("legacy protocol\n")

    result = await client.scp_upload(endpoint, upload, "legacy.txt", "-O")

    assert result.returncode == 0, result
    assert (config.state_dir / "inst-a" / "home" / "legacy.txt").read_text() == "legacy protocol\n"


async def test_sftp_is_chrooted_to_home(
    runtime: LocalRuntime,
    client: SSHClient,
    client_key: ClientKey,
    config: LocalRuntimeConfig,
    tmp_path: Path,
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    (config.state_dir / "inst-a" / "home" / "marker.txt").write_text("inside\n")

    inside = await client.sftp_batch(endpoint, f"get /marker.txt {tmp_path / 'marker.txt'}\n")
    outside = await client.sftp_batch(endpoint, f"get ../instance.json {tmp_path / 'escape'}\n")

    assert inside.returncode == 0, inside
    assert (tmp_path / "marker.txt").read_text() == "inside\n"
    assert outside.returncode != 0
    assert not (tmp_path / "escape").exists()


# Authentication


async def test_wrong_key_is_rejected(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey, tmp_path: Path
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    other_key = generate_client_key(tmp_path, "other_key")

    result = await client.ssh(endpoint, "true", key=other_key)

    assert result.returncode == 255
    assert b"Permission denied" in result.stderr


async def test_other_user_is_rejected(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(endpoint, "true", user="root")

    assert result.returncode == 255
    assert b"Permission denied" in result.stderr


async def test_password_auth_is_not_offered(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))

    result = await client.ssh(endpoint, "true", user="root")

    assert b"(publickey)" in result.stderr


def test_sk_key_lines_parse() -> None:
    for line in (sk_ed25519_line(), sk_ecdsa_line()):
        parse_authorized_key(line)


async def test_start_accepts_sk_key(runtime: LocalRuntime, config: LocalRuntimeConfig) -> None:
    spec = InstanceSpec(instance_id="inst-sk", ssh_public_key=sk_ed25519_line(), gpu_indices=())

    endpoint = await runtime.start(spec)

    assert endpoint.ip == host_addresses(config)[0]


@pytest.mark.parametrize(
    "key_line",
    ["", "not a key", "ssh-ed25519 AAAA", "ssh-ed25519 AAAAC3Nz\nssh-rsa AAAAB3"],
)
async def test_start_rejects_invalid_key(
    runtime: LocalRuntime, config: LocalRuntimeConfig, key_line: str
) -> None:
    spec = InstanceSpec(instance_id="inst-bad", ssh_public_key=key_line, gpu_indices=(0,))

    with pytest.raises(RuntimeFailure, match="SSH public key"):
        await runtime.start(spec)

    assert not (config.state_dir / "inst-bad").exists()
    assert not config.address_dir.exists() or not os.listdir(config.address_dir)


async def test_start_rejects_other_ssh_user(runtime: LocalRuntime, client_key: ClientKey) -> None:
    spec = InstanceSpec("inst-a", client_key.public_line, (0,), ssh_user="root")

    with pytest.raises(RuntimeFailure, match="serves only 'ubuntu'"):
        await runtime.start(spec)


@pytest.mark.parametrize("instance_id", ["../escape", "a/b", ".hidden", ""])
async def test_start_rejects_unsafe_instance_id(
    runtime: LocalRuntime, client_key: ClientKey, instance_id: str
) -> None:
    with pytest.raises(RuntimeFailure, match="is invalid"):
        await runtime.start(make_spec(client_key, instance_id=instance_id))


# Addresses and state


async def test_start_writes_private_state(
    runtime: LocalRuntime, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    endpoint = await runtime.start(make_spec(client_key, gpus=(1, 2)))

    instance_dir = config.state_dir / "inst-a"
    record = (instance_dir / "instance.json").read_text()
    assert (instance_dir / "ssh_host_ed25519_key").stat().st_mode & 0o777 == 0o600
    assert (instance_dir / "home").is_dir()
    assert f'"ip": "{endpoint.ip}"' in record
    assert f'"port": {config.ssh_port}' in record
    assert client_key.public_line in record
    assert (config.address_dir / endpoint.ip).read_text() == "inst-a"


async def test_start_twice_returns_same_endpoint(
    runtime: LocalRuntime, client_key: ClientKey
) -> None:
    first = await runtime.start(make_spec(client_key))
    second = await runtime.start(make_spec(client_key))

    assert first == second


async def test_instances_get_distinct_addresses(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    first = await runtime.start(make_spec(client_key, "inst-a", (0,)))
    second = await runtime.start(make_spec(client_key, "inst-b", (1,)))

    first_gpus = await client.ssh(first, "echo $CUDA_VISIBLE_DEVICES $COMPUTEPLANE_INSTANCE_ID")
    second_gpus = await client.ssh(second, "echo $CUDA_VISIBLE_DEVICES $COMPUTEPLANE_INSTANCE_ID")

    assert first.ip == host_addresses(config)[0]
    assert second.ip == host_addresses(config)[1]
    assert first_gpus.stdout == b"0 inst-a\n"
    assert second_gpus.stdout == b"1 inst-b\n"
    assert await runtime.list_instances() == ["inst-a", "inst-b"]


async def test_second_runtime_skips_claimed_addresses(
    client_key: ClientKey, config: LocalRuntimeConfig, tmp_path: Path
) -> None:
    hosts = host_addresses(config)
    other_config = LocalRuntimeConfig(
        state_dir=tmp_path / "other-state",
        address_dir=config.address_dir,
        address_pool=config.address_pool,
        ssh_port=config.ssh_port,
    )
    first_runtime = LocalRuntime(config)
    second_runtime = LocalRuntime(other_config)
    try:
        first = await first_runtime.start(make_spec(client_key, "inst-a"))
        second = await second_runtime.start(make_spec(client_key, "inst-b"))
        (config.address_dir / hosts[2]).write_text("claimed-elsewhere")
        third = await second_runtime.start(make_spec(client_key, "inst-c"))
    finally:
        await first_runtime.close()
        await second_runtime.close()

    assert first.ip == hosts[0]
    assert second.ip == hosts[1]
    assert third.ip == hosts[3]


async def test_pool_exhaustion_leaves_nothing_behind(
    client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    small_config = LocalRuntimeConfig(
        state_dir=config.state_dir,
        address_dir=config.address_dir,
        address_pool=random_pool(prefix_length=30),
        ssh_port=config.ssh_port,
    )
    runtime = LocalRuntime(small_config)
    try:
        await runtime.start(make_spec(client_key, "inst-a"))
        await runtime.start(make_spec(client_key, "inst-b"))
        with pytest.raises(RuntimeFailure) as failure:
            await runtime.start(make_spec(client_key, "inst-c"))
        instances = await runtime.list_instances()
    finally:
        await runtime.close()

    expected = f"No free address in the local address pool {small_config.address_pool}"
    assert failure.value.message.startswith(expected)
    assert not (config.state_dir / "inst-c").exists()
    assert sorted(os.listdir(config.address_dir)) == host_addresses(small_config)
    assert instances == ["inst-a", "inst-b"]


async def test_address_in_use_moves_to_next_address(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    hosts = host_addresses(config)
    with socket.socket() as squatter:
        squatter.bind((hosts[0], config.ssh_port))
        squatter.listen()

        endpoint = await runtime.start(make_spec(client_key))
        result = await client.ssh(endpoint, "echo ok")

    assert endpoint.ip == hosts[1]
    assert not (config.address_dir / hosts[0]).exists()
    assert (config.address_dir / hosts[1]).read_text() == "inst-a"
    assert result.stdout == b"ok\n"


async def test_port_in_use_everywhere_gives_up(
    runtime: LocalRuntime, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    hosts = host_addresses(config)
    squatters = [socket.socket() for _ in range(16)]
    try:
        for squatter, host in zip(squatters, hosts, strict=False):
            squatter.bind((host, config.ssh_port))
            squatter.listen()
        with pytest.raises(RuntimeFailure) as failure:
            await runtime.start(make_spec(client_key))
    finally:
        for squatter in squatters:
            squatter.close()

    expected = f"port {config.ssh_port} is in use on 16 addresses"
    assert expected in failure.value.message
    assert f"({hosts[0]} to {hosts[15]})" in failure.value.message
    assert not (config.state_dir / "inst-a").exists()
    assert os.listdir(config.address_dir) == []


# Stop, close and restore


async def test_stop_refuses_connections_and_deletes_state(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    assert (await client.ssh(endpoint, "true")).returncode == 0

    await runtime.stop("inst-a")
    result = await client.ssh(endpoint, "true")

    assert result.returncode == 255
    assert b"Connection refused" in result.stderr
    assert not (config.state_dir / "inst-a").exists()
    assert not (config.address_dir / endpoint.ip).exists()
    assert await runtime.list_instances() == []


async def test_stop_is_repeatable(runtime: LocalRuntime, client_key: ClientKey) -> None:
    await runtime.start(make_spec(client_key))

    await runtime.stop("inst-a")
    await runtime.stop("inst-a")
    await runtime.stop("never-started")
    await runtime.stop("../not-an-id")

    assert await runtime.list_instances() == []


async def test_stop_deletes_read_only_directories(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    result = await client.ssh(
        endpoint, "mkdir -p cache/sub && touch cache/sub/f && chmod 555 cache/sub cache"
    )
    assert result.returncode == 0, result

    await runtime.stop("inst-a")

    assert not (config.state_dir / "inst-a").exists()


async def test_stop_deletes_when_rmtree_needs_permissions(
    runtime: LocalRuntime,
    client_key: ClientKey,
    config: LocalRuntimeConfig,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Root ignores directory permissions, so simulate the PermissionError a non-root
    # service gets from a read-only directory in the instance's home.
    endpoint = await runtime.start(make_spec(client_key))
    locked = config.state_dir / "inst-a" / "home" / "locked"
    (locked / "inner").mkdir(parents=True)
    locked.chmod(0o500)
    real_rmtree = shutil.rmtree
    calls: list[str] = []

    def rmtree_failing_once(path: Path) -> None:
        calls.append(str(path))
        if len(calls) == 1:
            raise PermissionError(13, "Permission denied", str(locked / "inner"))
        real_rmtree(path)

    # instance_state calls shutil.rmtree through the module, so patching it there works.
    monkeypatch.setattr(shutil, "rmtree", rmtree_failing_once)

    await runtime.stop("inst-a")

    assert len(calls) == 2
    assert not (config.state_dir / "inst-a").exists()
    assert not (config.address_dir / endpoint.ip).exists()


@pytest.mark.parametrize("tty_flags", [[], ["-tt"]], ids=["pipes", "pty"])
async def test_stop_kills_session_processes(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey, tty_flags: list[str]
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    args = [SSH, *client.options(), "-p", str(endpoint.port), *tty_flags]
    args += [f"ubuntu@{endpoint.ip}", "echo $$; exec sleep 300"]
    session = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=client_environment(),
    )
    assert session.stdout is not None
    pid = int(await asyncio.wait_for(session.stdout.readline(), CLIENT_TIMEOUT_SECONDS))
    assert process_alive(pid)

    await runtime.stop("inst-a")
    await asyncio.wait_for(session.wait(), CLIENT_TIMEOUT_SECONDS)

    assert await wait_until_gone(pid)


async def start_detached_sleep(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> int:
    """Start instance ``inst-a``, run ``setsid sleep`` in it over SSH and return its pid."""
    endpoint = await runtime.start(make_spec(client_key))
    # Wait until setsid(1) has exec'd sleep, because the session's process group is
    # killed when the shell exits and would catch a child that has not left it yet.
    command = (
        "setsid sleep 300 </dev/null >/dev/null 2>&1 & "
        'while [ "$(cat /proc/$!/comm)" != sleep ]; do sleep 0.05; done; echo $!'
    )
    result = await client.ssh(endpoint, command)
    return int(result.stdout)


async def test_stop_kills_detached_processes(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    pid = await start_detached_sleep(runtime, client, client_key)
    # The detached sleep left the session's process group, so closing the channel spared it.
    assert process_alive(pid)

    await runtime.stop("inst-a")

    assert await wait_until_gone(pid)


async def test_close_kills_detached_processes(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    pid = await start_detached_sleep(runtime, client, client_key)
    assert process_alive(pid)

    await runtime.close()

    assert await wait_until_gone(pid)
    assert await runtime.list_instances() == ["inst-a"]


async def test_closed_channel_kills_session_processes(
    runtime: LocalRuntime, client: SSHClient, client_key: ClientKey
) -> None:
    endpoint = await runtime.start(make_spec(client_key))
    args = [SSH, *client.options(), "-p", str(endpoint.port), f"ubuntu@{endpoint.ip}"]
    args.append("echo $$; exec sleep 300")
    session = await asyncio.create_subprocess_exec(
        *args,
        stdout=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        env=client_environment(),
    )
    assert session.stdout is not None
    pid = int(await asyncio.wait_for(session.stdout.readline(), CLIENT_TIMEOUT_SECONDS))

    session.send_signal(signal.SIGKILL)
    await session.wait()

    assert await wait_until_gone(pid)


async def test_close_then_restore_keeps_address_and_host_key(
    client: SSHClient, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    first_runtime = LocalRuntime(config)
    try:
        endpoint = await first_runtime.start(make_spec(client_key))
        first_host_key = await host_key_line(endpoint)
        written = await client.ssh(endpoint, "echo kept > kept.txt")
        assert written.returncode == 0, written
    finally:
        await first_runtime.close()

    closed = await client.ssh(endpoint, "true")
    second_runtime = LocalRuntime(config)
    try:
        listed = await second_runtime.list_instances()
        restored = await second_runtime.start(make_spec(client_key))
        second_host_key = await host_key_line(restored)
        # StrictHostKeyChecking=yes fails unless the host key in known_hosts still matches.
        read_back = await client.ssh(restored, "cat kept.txt", strict=True)
    finally:
        await second_runtime.close()

    assert closed.returncode == 255
    assert listed == ["inst-a"]
    assert restored == endpoint
    assert second_host_key == first_host_key
    assert read_back.returncode == 0, read_back
    assert read_back.stdout == b"kept\n"
    assert (config.address_dir / endpoint.ip).read_text() == "inst-a"


async def test_restore_fails_when_address_in_use(
    client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    first_runtime = LocalRuntime(config)
    endpoint = await first_runtime.start(make_spec(client_key))
    await first_runtime.close()
    second_runtime = LocalRuntime(config)
    try:
        with socket.socket() as squatter:
            squatter.bind((endpoint.ip, endpoint.port))
            squatter.listen()
            with pytest.raises(RuntimeFailure) as failure:
                await second_runtime.start(make_spec(client_key))
    finally:
        await second_runtime.close()

    assert f"{endpoint.ip}:{endpoint.port} is in use" in failure.value.message
    assert (config.state_dir / "inst-a" / "instance.json").exists()
    assert (config.address_dir / endpoint.ip).read_text() == "inst-a"


async def test_stop_without_start_deletes_saved_state(
    client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    first_runtime = LocalRuntime(config)
    endpoint = await first_runtime.start(make_spec(client_key))
    await first_runtime.close()

    second_runtime = LocalRuntime(config)
    await second_runtime.stop("inst-a")

    assert not (config.state_dir / "inst-a").exists()
    assert not (config.address_dir / endpoint.ip).exists()
    assert await second_runtime.list_instances() == []


async def test_start_replaces_interrupted_state(
    runtime: LocalRuntime, client_key: ClientKey, config: LocalRuntimeConfig
) -> None:
    # A start that was interrupted before writing instance.json leaves a directory and
    # possibly a claim behind.
    leftover = config.state_dir / "inst-a"
    (leftover / "home").mkdir(parents=True)
    (leftover / "home" / "stale.txt").write_text("stale")
    config.address_dir.mkdir(parents=True)
    stale_ip = host_addresses(config)[5]
    (config.address_dir / stale_ip).write_text("inst-a")

    endpoint = await runtime.start(make_spec(client_key))

    assert endpoint.ip == host_addresses(config)[0]
    assert not (leftover / "home" / "stale.txt").exists()
    assert not (config.address_dir / stale_ip).exists()
