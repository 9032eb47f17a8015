"""``computeplane worker`` and ``agent`` stop cleanly on SIGTERM, as a service manager sends.

Each runs as a real process. After SIGTERM it must run its cleanup and log that it stopped,
then exit with status 0 instead of dying from the signal.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from support.processes import (
    ComputeplaneProcess,
    LocalNetwork,
    computeplane_environment,
    free_port,
    run_computeplane,
)

pytestmark = pytest.mark.e2e


def stopped_by_sigterm(process: ComputeplaneProcess, started: str) -> str:
    """Start ``process``, wait for ``started`` in its log, send SIGTERM, return its log."""
    process.start()
    try:
        process.wait_for_log(lambda log: started in log)
    finally:
        status = process.stop()
    assert not process.killed, process.describe()
    assert status == 0, process.describe()
    return process.stderr_text()


def test_worker_stops_on_sigterm(tmp_path: Path, database_url: str) -> None:
    options = ["--data-dir", str(tmp_path / "data"), "--database-url", database_url]
    initialized = run_computeplane(["init", *options], env=computeplane_environment())
    assert initialized.returncode == 0, initialized.stderr
    worker = ComputeplaneProcess(
        ["worker", *options], env=computeplane_environment(), log_dir=tmp_path, name="worker"
    )

    log = stopped_by_sigterm(worker, "workers started")

    assert "SIGTERM received; stopping" in log
    assert "worker stopped" in log


def test_agent_stops_on_sigterm(tmp_path: Path) -> None:
    # Nothing listens on the control plane's port, so the agent keeps retrying until stopped.
    agent = ComputeplaneProcess(
        [
            "agent",
            "--control-plane",
            f"http://127.0.0.1:{free_port()}",
            "--data-dir",
            str(tmp_path / "agent"),
        ],
        env=computeplane_environment(
            {"COMPUTEPLANE_NODE_TOKEN": "unused-token", **LocalNetwork.pick().environment()}
        ),
        log_dir=tmp_path,
        name="agent",
    )

    log = stopped_by_sigterm(agent, "fetching desired state failed")

    assert "SIGTERM received; stopping" in log
    assert "agent for node (not yet known) stopped" in log
