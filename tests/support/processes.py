"""Start and stop real ``computeplane`` processes for end-to-end tests.

``ComputeplaneProcess`` runs any long-lived subcommand (``serve``, ``api``, ``worker``,
``agent``) of the installed console script. Its stdout and stderr go to files, so a chatty
process never blocks on a full pipe and a failed assertion can show its log.
``ServeServer`` adds what ``computeplane serve`` needs: a free HTTP port, a data directory,
a private loopback network for the instances and a readiness check over HTTP.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

COMPUTEPLANE = Path(sys.executable).parent / "computeplane"
"""The console script that the project's installation puts next to the interpreter."""

# Startup imports the application and runs migrations, which took several seconds in test
# runs on a busy shared machine; the deadline leaves a wide margin.
READY_TIMEOUT_SECONDS = 90.0
# The server's uvicorn waits up to 5 seconds (timeout_graceful_shutdown in roles.py) for
# open requests, such as agents' long-polls, before the process exits.
STOP_TIMEOUT_SECONDS = 30.0
KILL_TIMEOUT_SECONDS = 10.0
COMMAND_TIMEOUT_SECONDS = 60.0
POLL_INTERVAL_SECONDS = 0.2
LOG_TAIL_CHARACTERS = 6000

# Instances of tests get addresses in 127.90.0.0 to 127.120.255.255, away from the
# runtime's default pool 127.77.0.0/16 and from other test modules.
_POOL_SECOND_OCTETS = range(90, 121)


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now; another process may take it later."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def random_address_pool() -> ipaddress.IPv4Network:
    """Return a random /24 loopback network inside 127.90.0.0/16 to 127.120.0.0/16."""
    second = random.choice(_POOL_SECOND_OCTETS)
    third = random.randrange(256)
    return ipaddress.IPv4Network(f"127.{second}.{third}.0/24")


@dataclass(frozen=True)
class LocalNetwork:
    """Where the local runtime's instances listen: a loopback address pool and an SSH port."""

    address_pool: ipaddress.IPv4Network
    ssh_port: int

    @classmethod
    def pick(cls) -> LocalNetwork:
        """Return a random pool and a free port, so parallel runs do not share endpoints."""
        return cls(random_address_pool(), free_port())

    def environment(self) -> dict[str, str]:
        return {
            "COMPUTEPLANE_LOCAL_ADDRESS_POOL": str(self.address_pool),
            "COMPUTEPLANE_LOCAL_SSH_PORT": str(self.ssh_port),
        }


def computeplane_environment(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment without ``COMPUTEPLANE_*`` variables, plus overrides.

    Dropping the inherited settings keeps a developer's configuration, such as
    ``COMPUTEPLANE_DATABASE_URL``, away from the processes under test.
    """
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("COMPUTEPLANE_")
    }
    environment.update(overrides or {})
    return environment


def run_computeplane(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float = COMMAND_TIMEOUT_SECONDS,
) -> subprocess.CompletedProcess[str]:
    """Run a short ``computeplane`` command, such as an operator command, to completion."""
    return subprocess.run(
        [str(COMPUTEPLANE), *args],
        env=dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class ComputeplaneProcess:
    """One long-lived ``computeplane`` command with its stdout and stderr in files."""

    def __init__(
        self, args: Sequence[str], *, env: Mapping[str, str], log_dir: Path, name: str
    ) -> None:
        self.args = [str(COMPUTEPLANE), *args]
        self.env = dict(env)
        self.log_dir = log_dir
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        self.killed = False
        self._popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process in its own process group, so signals reach it alone."""
        if self._popen is not None:
            raise RuntimeError(f"process {self.name} was already started")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with self.stdout_path.open("wb") as stdout, self.stderr_path.open("wb") as stderr:
            self._popen = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=self.log_dir,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self._require_started().pid

    @property
    def returncode(self) -> int | None:
        """The exit status, the negated signal number if a signal ended the process, or None
        while it runs."""
        return self._require_started().poll()

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def stderr_text(self) -> str:
        return _read_text(self.stderr_path)

    def stdout_text(self) -> str:
        return _read_text(self.stdout_path)

    def describe(self) -> str:
        """Return the command, its state and the end of its stderr, for assertion messages."""
        if self._popen is None:
            state = "not started"
        elif self._popen.poll() is None:
            state = f"running as pid {self._popen.pid}"
        else:
            state = f"exited with status {self._popen.returncode}"
        log = self.stderr_text()
        if len(log) > LOG_TAIL_CHARACTERS:
            log = "[...]\n" + log[-LOG_TAIL_CHARACTERS:]
        return f"{' '.join(self.args)} ({state}); stderr:\n{log}"

    def wait_for_log(
        self, predicate: Callable[[str], bool], *, timeout: float = READY_TIMEOUT_SECONDS
    ) -> None:
        """Poll stderr until ``predicate`` accepts it; raise AssertionError on timeout or exit."""
        deadline = time.monotonic() + timeout
        while not predicate(self.stderr_text()):
            if not self.running:
                raise AssertionError(
                    f"{self.name} exited while waiting for its log: {self.describe()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} did not log the expected lines within {timeout:.0f} s: "
                    f"{self.describe()}"
                )
            time.sleep(POLL_INTERVAL_SECONDS)

    def stop(self, timeout: float = STOP_TIMEOUT_SECONDS) -> int | None:
        """Send SIGTERM and wait; send SIGKILL if the process still runs after ``timeout``.

        Returns the exit status as ``returncode`` does, or None if it never started. Sets
        ``killed`` when SIGKILL was needed. Safe to call again after the process ended.
        """
        if self._popen is None:
            return None
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._popen.send_signal(signal.SIGTERM)
            try:
                self._popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.killed = True
                # The process leads its own group, so this also ends children it started.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._popen.pid, signal.SIGKILL)
                self._popen.wait(KILL_TIMEOUT_SECONDS)
        return self._popen.returncode

    def _require_started(self) -> subprocess.Popen[bytes]:
        if self._popen is None:
            raise RuntimeError(f"process {self.name} was not started")
        return self._popen


def wait_until_serving(
    process: ComputeplaneProcess, base_url: str, timeout: float = READY_TIMEOUT_SECONDS
) -> None:
    """Poll ``GET /openapi.json``, which needs no key, until it returns 200.

    Raises AssertionError if the process exits or the deadline passes first.
    """
    deadline = time.monotonic() + timeout
    last_outcome = "no request was answered"
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        while True:
            if not process.running:
                raise AssertionError(
                    f"{process.name} exited before it was serving: {process.describe()}"
                )
            try:
                response = client.get("/openapi.json")
            except httpx.HTTPError as error:
                last_outcome = f"request failed: {error!r}"
            else:
                if response.status_code == 200:
                    return
                last_outcome = f"status {response.status_code}: {response.text}"
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{process.name} was not serving within {timeout:.0f} s "
                    f"(last: {last_outcome}): {process.describe()}"
                )
            time.sleep(POLL_INTERVAL_SECONDS)


class ServeServer:
    """``computeplane serve`` on a free port, with its own data directory and instance network.

    Each ``start`` runs a new process with the same options, so a test can stop the server
    and start it again on the same data. ``processes`` keeps every process, in order.
    """

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        *,
        log_dir: Path | None = None,
        network: LocalNetwork | None = None,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.log_dir = log_dir or data_dir.parent / f"{data_dir.name}-logs"
        self.network = network or LocalNetwork.pick()
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = computeplane_environment({**self.network.environment(), **(env or {})})
        self.processes: list[ComputeplaneProcess] = []

    @property
    def process(self) -> ComputeplaneProcess:
        """The process of the latest ``start``."""
        if not self.processes:
            raise RuntimeError("the server was not started")
        return self.processes[-1]

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "admin-api-key"

    def admin_key(self) -> str:
        return self.admin_key_file.read_text().strip()

    def start(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Start a new process and wait until the API lists instances with the admin key."""
        process = ComputeplaneProcess(
            [
                "serve",
                "--data-dir",
                str(self.data_dir),
                "--database-url",
                self.database_url,
                "--port",
                str(self.port),
            ],
            env=self.env,
            log_dir=self.log_dir,
            name=f"serve-{len(self.processes) + 1}",
        )
        self.processes.append(process)
        process.start()
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> None:
        """Wait until the server serves HTTP; raise AssertionError if it exits first.

        ``serve`` writes the admin key file before it starts listening.
        """
        wait_until_serving(self.process, self.base_url, timeout)
        assert self.admin_key_file.exists(), f"no admin key file: {self.process.describe()}"

    def stop(self) -> int | None:
        """Stop every process still running (SIGTERM, then SIGKILL).

        Returns the exit status of the latest process, or None if none was started.
        """
        for process in reversed(self.processes):
            process.stop()
        return self.processes[-1].returncode if self.processes else None

    def run_operator_command(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run an operator command, such as ``keys create``, on this server's data."""
        return run_computeplane(
            [*args, "--data-dir", str(self.data_dir), "--database-url", self.database_url],
            env=self.env,
        )


@contextlib.contextmanager
def running_serve(
    data_dir: Path,
    database_url: str,
    *,
    log_dir: Path | None = None,
    network: LocalNetwork | None = None,
) -> Iterator[ServeServer]:
    """Start ``computeplane serve`` and stop it on exit, even when startup fails."""
    server = ServeServer(data_dir, database_url, log_dir=log_dir, network=network)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
