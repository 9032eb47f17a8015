"""``computeplane api`` processes on one initialized database, for tests of the HTTP server.

``ApiServers`` runs ``computeplane init`` once and then any number of ``computeplane api``
processes on free ports, all on the same data directory and database. Readiness is polled
on ``/openapi.json``, which needs no key, so waiting spends no key's rate limit.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from support import processes
from support.processes import (
    READY_TIMEOUT_SECONDS,
    ComputeplaneProcess,
    computeplane_environment,
    free_port,
    run_computeplane,
)


@dataclass(frozen=True)
class ApiProcess:
    """One ``computeplane api`` process and the URL it serves."""

    process: ComputeplaneProcess
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ApiServers:
    """``computeplane api`` processes sharing one data directory and database."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str,
        *,
        env: Mapping[str, str] | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.env = computeplane_environment(env)
        self.log_dir = log_dir or data_dir.parent / f"{data_dir.name}-logs"
        self.servers: list[ApiProcess] = []

    @property
    def admin_key(self) -> str:
        """The admin key that ``computeplane init`` wrote to the data directory."""
        return (self.data_dir / "admin-api-key").read_text().strip()

    def initialize(self) -> None:
        """Run ``computeplane init`` and raise AssertionError with its output if it fails."""
        result = run_computeplane(["init", *self._database_options()], env=self.env)
        assert result.returncode == 0, (
            f"computeplane init exited with {result.returncode}: {result.stderr}"
        )

    def start(self) -> ApiProcess:
        """Start one more ``computeplane api`` process and wait until it serves HTTP."""
        port = free_port()
        process = ComputeplaneProcess(
            ["api", "--port", str(port), *self._database_options()],
            env=self.env,
            log_dir=self.log_dir,
            name=f"api-{len(self.servers) + 1}",
        )
        server = ApiProcess(process, "127.0.0.1", port)
        self.servers.append(server)
        process.start()
        wait_until_serving(server)
        return server

    def stop(self) -> None:
        """Stop every process still running (SIGTERM, then SIGKILL)."""
        for server in reversed(self.servers):
            server.process.stop()

    def describe(self) -> str:
        """Return each process's command, state and log tail, for assertion messages."""
        return "\n\n".join(server.process.describe() for server in self.servers)

    def _database_options(self) -> list[str]:
        return ["--data-dir", str(self.data_dir), "--database-url", self.database_url]


def wait_until_serving(server: ApiProcess, timeout: float = READY_TIMEOUT_SECONDS) -> None:
    """Wait until the API process serves HTTP; raise AssertionError if it exits first."""
    processes.wait_until_serving(server.process, server.base_url, timeout)
