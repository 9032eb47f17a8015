"""Measure time to SSH: POST a 1x instance on ``computeplane serve`` until ``ssh true`` works.

The script starts ``computeplane serve`` with its packaged fleet, a temporary data directory
and a private loopback address pool and SSH port, so the local runtime makes each instance a
real SSH endpoint on this machine. Then, ``--runs`` times in a row, it POSTs a 1x create,
polls GET every 10 ms until the instance is ``ready``, runs the system ``ssh ... true`` until
it exits 0, deletes the instance and waits until its port refuses connections. Each ssh
attempt starts a new ``ssh`` process, as a user would. Budget: POST to SSH-able under a
second.

Run: .venv/bin/python benchmarks/bench_ready.py [--postgres] [--runs R]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from common import (
    INSTANCES,
    ONE_GPU,
    LatencySummary,
    add_postgres_option,
    database_factory,
    ms,
    print_header,
    temporary_directory,
    verdict,
)

from support.processes import LocalNetwork, ServeServer

BUDGET_SECONDS = 1.0
POLL_SECONDS = 0.010
# Generous, because the machine may be busy. Past the ready or SSH deadline the script exits
# with an error, and past the teardown deadline it prints a warning.
READY_TIMEOUT_SECONDS = 60.0
TEARDOWN_TIMEOUT_SECONDS = 30.0
SSH_ATTEMPT_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Run:
    """Durations of one instance from the start of its POST, in seconds."""

    post: float
    ready: float
    ssh_ok: float
    ssh_attempts: int


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_postgres_option(parser)
    parser.add_argument("--runs", type=int, default=20, help="measured instances")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured instances first")
    return parser.parse_args(argv)


def make_client_key(directory: Path) -> tuple[Path, str]:
    """Create an ed25519 key pair without a passphrase; return the private path and public line."""
    private_path = directory / "id_ed25519"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench", "-f", str(private_path)],
        check=True,
        capture_output=True,
    )
    return private_path, private_path.with_name("id_ed25519.pub").read_text().strip()


def ssh_command(private_key: Path, ip: str, port: int) -> list[str]:
    # Addresses are reused across instances with new host keys, so none are remembered.
    return [
        "ssh",
        "-F",
        "none",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "ConnectTimeout=10",
        "-o",
        "LogLevel=ERROR",
        "-i",
        str(private_key),
        "-p",
        str(port),
        f"ubuntu@{ip}",
        "true",
    ]


def ssh_environment() -> dict[str, str]:
    # A minimal environment keeps a developer's ssh-agent (SSH_AUTH_SOCK) out of the run.
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def wait_until_ready(client: httpx.Client, instance_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while True:
        response = client.get(f"{INSTANCES}/{instance_id}")
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        if body["status"] == "ready":
            return body
        if body["status"] == "stopped" or time.monotonic() > deadline:
            raise SystemExit(f"instance {instance_id} did not become ready: {body}")
        time.sleep(POLL_SECONDS)


def wait_until_ssh_works(private_key: Path, ip: str, port: int) -> int:
    """Run ``ssh ... true`` until it exits 0; return the number of attempts."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    attempts = 0
    while True:
        attempts += 1
        result = subprocess.run(
            ssh_command(private_key, ip, port),
            env=ssh_environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=SSH_ATTEMPT_TIMEOUT_SECONDS,
            check=False,
        )
        if result.returncode == 0:
            return attempts
        if time.monotonic() > deadline:
            raise SystemExit(
                f"ssh to {ip}:{port} still failed after {attempts} attempts: {result.stderr}"
            )
        time.sleep(POLL_SECONDS)


def wait_until_refused(ip: str, port: int) -> None:
    """Wait until the deleted instance's port refuses connections, so runs do not overlap."""
    deadline = time.monotonic() + TEARDOWN_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=1.0):
                pass
        except OSError:
            return
        time.sleep(POLL_SECONDS)
    print(
        f"warning: {ip}:{port} still accepted connections {TEARDOWN_TIMEOUT_SECONDS:.0f} s "
        "after the delete",
        file=sys.stderr,
    )


def run_once(client: httpx.Client, private_key: Path, public_line: str) -> Run:
    started = time.perf_counter()
    response = client.post(INSTANCES, json={"instance_type": ONE_GPU, "ssh_key": public_line})
    posted = time.perf_counter()
    if response.status_code != 201:
        raise SystemExit(f"create failed with {response.status_code}: {response.text}")
    instance_id = response.json()["id"]
    try:
        body = wait_until_ready(client, instance_id)
        ready = time.perf_counter()
        attempts = wait_until_ssh_works(private_key, body["ip"], body["ssh_port"])
        ssh_ok = time.perf_counter()
    finally:
        client.delete(f"{INSTANCES}/{instance_id}")
    wait_until_refused(body["ip"], body["ssh_port"])
    return Run(posted - started, ready - started, ssh_ok - started, attempts)


def report(runs: list[Run]) -> None:
    post = LatencySummary.of([run.post for run in runs])
    ready = LatencySummary.of([run.ready for run in runs])
    ssh_ok = LatencySummary.of([run.ssh_ok for run in runs])
    attempts = sorted(run.ssh_attempts for run in runs)
    print(f"POST response:    {post.format_ms()}")
    print(f"POST to ready:    {ready.format_ms()}")
    print(f"POST to ssh ok:   {ssh_ok.format_ms()}")
    print(f"ssh attempts:     min {attempts[0]}, max {attempts[-1]}")
    print(
        f"budget: POST to ssh ok under {ms(BUDGET_SECONDS)}: "
        f"p99 {verdict(ssh_ok.p99, BUDGET_SECONDS)}, "
        f"max {verdict(ssh_ok.maximum, BUDGET_SECONDS)} (informational)"
    )


def main() -> None:
    options = parse_options()
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        sys.exit(
            "the OpenSSH client (ssh, ssh-keygen) is required: apt-get install openssh-client"
        )
    print_header("POST to SSH-able through computeplane serve", options)
    with (
        temporary_directory("computeplane-bench-ready-") as directory,
        database_factory(options.postgres, directory) as new_database,
    ):
        private_key, public_line = make_client_key(directory)
        server = ServeServer(
            directory / "data",
            new_database("bench_ready"),
            log_dir=directory / "logs",
            network=LocalNetwork.pick(),
        )
        try:
            server.start()
            print(
                f"serving on {server.base_url}; instances in {server.network.address_pool} "
                f"port {server.network.ssh_port}",
                flush=True,
            )
            headers = {"Authorization": f"Key {server.admin_key()}"}
            with httpx.Client(base_url=server.base_url, headers=headers, timeout=30.0) as client:
                for _ in range(options.warmup):
                    run_once(client, private_key, public_line)
                runs = [run_once(client, private_key, public_line) for _ in range(options.runs)]
        finally:
            server.stop()
    report(runs)


if __name__ == "__main__":
    main()
