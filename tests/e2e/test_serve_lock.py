"""A second ``computeplane serve`` on a data directory or address pool in use is rejected."""

from __future__ import annotations

import time
from pathlib import Path

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


def test_second_data_dir_on_pool_rejected(
    tmp_path: Path, database_url: str, ed25519_key: str
) -> None:
    with running_serve(tmp_path / "data", database_url) as server:
        headers = {"Authorization": f"Key {server.admin_key()}"}
        created = httpx.post(
            f"{server.base_url}/v1/compute/instances",
            json={"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ed25519_key},
            headers=headers,
            timeout=10,
        )
        assert created.status_code == 201, created.text
        wait_until_ready(server.base_url, created.json()["id"], headers)

        second = run_computeplane(
            ["serve", "--data-dir", str(tmp_path / "other"), "--port", str(free_port())],
            env=server.env,
        )

        message = " ".join(second.stderr.split())
        assert second.returncode == 1, second.stderr
        assert "still use" in message
        assert str(server.data_dir) in message
        assert server.process.running


def wait_until_ready(base_url: str, instance_id: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = httpx.get(
            f"{base_url}/v1/compute/instances/{instance_id}", headers=headers, timeout=10
        )
        assert response.status_code == 200, response.text
        if response.json()["status"] == "ready":
            return
        time.sleep(0.05)
    raise AssertionError(f"instance {instance_id} is not ready after 60 s: {response.text}")
