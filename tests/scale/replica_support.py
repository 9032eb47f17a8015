"""``computeplane api`` replicas on one database, and a client that spreads requests over them.

``running_replicas`` runs ``computeplane init`` once and then starts the API processes, each
on its own free port, with the rate limit off, so that only capacity, quota and idempotency
decide the responses. ``send_concurrently`` fires many requests at once, round-robin over the
replicas, and keeps every outcome, transport errors included, for the test to judge.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support.processes import (
    READY_TIMEOUT_SECONDS,
    ComputeplaneProcess,
    computeplane_environment,
    free_port,
    run_computeplane,
    wait_until_serving,
)

INSTANCES = "/v1/compute/instances"
MAX_IN_FLIGHT = 64
# A create waits for its organization's row lock behind the organization's other creates,
# and on SQLite behind every other write. One request may take seconds on a busy machine, so
# the timeout only keeps a hung server from hanging the test.
REQUEST_TIMEOUT_SECONDS = 120.0
BODY_PREVIEW_CHARACTERS = 300
# The API closes a keep-alive connection after 75 idle seconds by default
# (keep_alive_timeout_seconds). A client that reuses a connection at that moment gets a
# reset instead of a response, so the client here drops idle connections long before.
CLIENT_KEEPALIVE_EXPIRY_SECONDS = 1.0


@dataclass(frozen=True)
class ReplicaSet:
    """API processes serving one database, and the data directory ``init`` wrote."""

    database_url: str
    data_dir: Path
    processes: list[ComputeplaneProcess]
    base_urls: list[str]

    def admin_key(self) -> str:
        return (self.data_dir / "admin-api-key").read_text().strip()

    def describe(self) -> str:
        """Return every process's command, state and stderr tail, for assertion messages."""
        return "\n\n".join(process.describe() for process in self.processes)


@dataclass(frozen=True)
class PlannedRequest:
    """One create request to send: the API key, the JSON body and an optional idempotency key."""

    api_key: str
    body: Mapping[str, Any]
    idempotency_key: str | None = None


@dataclass(frozen=True)
class Outcome:
    """The result of one planned request: its response, or the transport error instead."""

    index: int
    base_url: str
    status: int | None
    body: bytes = b""
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    transport_error: str | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def error_code(self) -> str | None:
        """Return ``error.code`` of an error envelope, or None if the body is not one."""
        try:
            payload = self.json()
        except ValueError:
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("error"), dict):
            return None
        code = payload["error"].get("code")
        return code if isinstance(code, str) else None

    def describe(self) -> str:
        if self.transport_error is not None:
            return f"request #{self.index} to {self.base_url} failed: {self.transport_error}"
        preview = self.body[:BODY_PREVIEW_CHARACTERS].decode(errors="replace")
        return f"request #{self.index} to {self.base_url}: {self.status} {preview}"


def initialize_database(data_dir: Path, database_url: str, env: Mapping[str, str]) -> None:
    """Run ``computeplane init`` and raise AssertionError with its output if it fails."""
    result = run_computeplane(
        ["init", "--data-dir", str(data_dir), "--database-url", database_url], env=env
    )
    if result.returncode != 0:
        raise AssertionError(
            f"computeplane init exited with {result.returncode}: "
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )


def wait_until_ready(
    process: ComputeplaneProcess, base_url: str, timeout: float = READY_TIMEOUT_SECONDS
) -> None:
    """Wait until the API process serves HTTP; raise AssertionError if it exits first."""
    wait_until_serving(process, base_url, timeout)


@contextlib.contextmanager
def running_replicas(
    data_dir: Path,
    database_url: str,
    count: int,
    *,
    env: Mapping[str, str] | None = None,
) -> Iterator[ReplicaSet]:
    """Initialize the database, start ``count`` API processes on it and stop them on exit.

    ``env`` adds ``COMPUTEPLANE_*`` settings to the processes' environment. The rate limit
    is off unless ``env`` sets it.
    """
    environment = computeplane_environment(
        {"COMPUTEPLANE_RATE_LIMIT_REQUESTS": "0", **(env or {})}
    )
    log_dir = data_dir.parent / f"{data_dir.name}-logs"
    initialize_database(data_dir, database_url, environment)

    processes: list[ComputeplaneProcess] = []
    base_urls: list[str] = []
    try:
        for number in range(1, count + 1):
            port = free_port()
            process = ComputeplaneProcess(
                [
                    "api",
                    "--data-dir",
                    str(data_dir),
                    "--database-url",
                    database_url,
                    "--port",
                    str(port),
                ],
                env=environment,
                log_dir=log_dir,
                name=f"api-{number}",
            )
            processes.append(process)
            process.start()
            base_urls.append(f"http://127.0.0.1:{port}")

        replicas = ReplicaSet(database_url, data_dir, processes, base_urls)
        for process, base_url in zip(processes, base_urls, strict=True):
            wait_until_ready(process, base_url)
        yield replicas
    finally:
        for process in reversed(processes):
            process.stop()


async def send_concurrently(
    base_urls: Sequence[str],
    requests: Sequence[PlannedRequest],
    *,
    max_in_flight: int = MAX_IN_FLIGHT,
) -> list[Outcome]:
    """POST every request to ``/v1/compute/instances`` with up to ``max_in_flight`` at once.

    Request ``i`` goes to ``base_urls[i % len(base_urls)]``. Returns one outcome per request,
    in order. A transport error becomes an outcome too, so the caller sees all of them.
    """
    semaphore = asyncio.Semaphore(max_in_flight)
    limits = httpx.Limits(
        max_connections=max_in_flight,
        max_keepalive_connections=max_in_flight,
        keepalive_expiry=CLIENT_KEEPALIVE_EXPIRY_SECONDS,
    )
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def send(index: int, planned: PlannedRequest) -> Outcome:
            base_url = base_urls[index % len(base_urls)]
            headers = {"Authorization": f"Key {planned.api_key}"}
            if planned.idempotency_key is not None:
                headers["Idempotency-Key"] = planned.idempotency_key
            async with semaphore:
                try:
                    response = await client.post(
                        base_url + INSTANCES, json=dict(planned.body), headers=headers
                    )
                except httpx.HTTPError as error:
                    return Outcome(index, base_url, None, transport_error=repr(error))
            return Outcome(
                index, base_url, response.status_code, response.content, response.headers
            )

        return list(
            await asyncio.gather(*(send(index, planned) for index, planned in enumerate(requests)))
        )
