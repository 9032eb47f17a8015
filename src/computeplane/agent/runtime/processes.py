"""Ending the OS processes that an instance's SSH sessions started."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

logger = logging.getLogger(__name__)

INSTANCE_ID_VARIABLE = "COMPUTEPLANE_INSTANCE_ID"
"""The environment variable that marks every session process with its instance id."""


def kill_process_group(process_group_id: int) -> None:
    """Send SIGKILL to a process group, ignoring a group that no longer exists."""
    try:
        os.killpg(process_group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:
        # The group id was reused by a process of another user after the session's group
        # ended, so there is nothing of ours left to kill.
        logger.debug("Process group %d belongs to another user; not killed", process_group_id)


def kill_instance_processes(instance_id: str, home: Path) -> int:
    """Send SIGKILL to every process whose environment marks it as part of the instance.

    Sessions set ``COMPUTEPLANE_INSTANCE_ID`` and ``HOME`` and children inherit them, so
    this also finds processes that left their session's process group, such as background
    jobs of an interactive shell or daemons started with ``setsid``. Both variables must
    match, because the home directory distinguishes runtimes on one machine that reuse an
    instance id (test runs, separate control planes). Processes that changed either
    variable before exec are not found. It reads ``/proc/<pid>/environ``, so it only finds
    processes of the same OS user, and does nothing where ``/proc`` is missing (non-Linux).
    Returns the number of processes signalled.
    """
    markers = {f"{INSTANCE_ID_VARIABLE}={instance_id}".encode(), f"HOME={home}".encode()}
    killed = 0
    for pid in _list_pids():
        if pid != os.getpid() and markers <= _read_environment(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                continue
            killed += 1
    return killed


def _list_pids() -> list[int]:
    try:
        names = os.listdir("/proc")
    except FileNotFoundError:
        return []
    return [int(name) for name in names if name.isdigit()]


def _read_environment(pid: int) -> set[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ_file:
            return set(environ_file.read().split(b"\0"))
    except OSError:
        # The process exited, or belongs to another user.
        return set()
