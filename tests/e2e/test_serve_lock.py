"""A second ``computeplane serve`` on a data directory in use is rejected and harms nothing."""

from __future__ import annotations

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
