"""A second ``serve`` on a busy data directory is rejected; on a shared pool it takes new IPs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.processes import free_port, run_computeplane, running_serve

pytestmark = pytest.mark.e2e


def test_second_serve_rejected(tmp_path: Path, database_url: str) -> None:
    with running_serve(tmp_path / "data", database_url) as server:
        key = server.admin_key()
        second = run_computeplane(
            [
                "serve",
                "--data-dir",
                str(server.data_dir),
                "--database-url",
                database_url,
                "--port",
                str(free_port()),
            ],
            env=server.env,
        )

        message = " ".join(second.stderr.split())
        assert second.returncode == 1, second.stderr
        assert f"pid {server.process.pid}" in message
        assert "in use by another computeplane process" in message
        listed = httpx.get(
            f"{server.base_url}/v1/compute/instances",
            headers={"Authorization": f"Key {key}"},
            timeout=10,
        )
        assert listed.status_code == 200, listed.text
        assert server.process.running


def test_second_data_dir_skips_claimed_address(
    tmp_path: Path, database_url: str, ed25519_key: str
) -> None:
    with running_serve(tmp_path / "first", database_url) as first:
        first_ip = ready_instance(first.base_url, first.admin_key(), ed25519_key)["ip"]
        # The second data directory has its own SQLite database but the same pool and port.
        with running_serve(
            tmp_path / "second", f"sqlite:///{tmp_path / 'second.db'}", network=first.network
        ) as second:
            second_ip = ready_instance(second.base_url, second.admin_key(), ed25519_key)["ip"]

    assert second_ip != first_ip


def ready_instance(base_url: str, key: str, ssh_key: str) -> dict[str, Any]:
    """Create a 1x instance and return its body once it is ready."""
    headers = {"Authorization": f"Key {key}"}
    created = httpx.post(
        f"{base_url}/v1/compute/instances",
        json={"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ssh_key},
        headers=headers,
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return wait_until_ready(base_url, created.json()["id"], headers)


def wait_until_ready(base_url: str, instance_id: str, headers: dict[str, str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = httpx.get(
            f"{base_url}/v1/compute/instances/{instance_id}", headers=headers, timeout=10
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if body["status"] == "ready":
            return body
        time.sleep(0.05)
    raise AssertionError(f"instance {instance_id} is not ready after 60 s: {response.text}")
