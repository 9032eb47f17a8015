"""SSH sessions of a local-runtime instance: commands and shells run as local processes.

A session runs ``$SHELL -c <command>`` for an exec request and ``$SHELL -l`` for a shell
request, as OpenSSH's sshd does, where ``$SHELL`` is ``/bin/bash`` when it exists and
``/bin/sh`` otherwise. The process runs as the service's own OS user in the instance's
home, in a new session (``setsid``), with an environment built from scratch so that the
service's variables (which may hold database passwords) never reach the instance. Login
shells may still change ``PATH`` through ``/etc/profile``, as they do under sshd.

When the channel closes, the session's process group is killed. Unlike under sshd, this
also ends ``nohup`` jobs of an exec session. Processes that left the group (background
jobs of an interactive shell, ``setsid`` daemons) live on until the instance stops.

NOTE: this is not an isolation boundary. Session processes share the service's OS user,
so they can read the service's files and ``/proc/<pid>/environ``.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
import struct
import termios
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncssh

from computeplane.agent.runtime.processes import INSTANCE_ID_VARIABLE, kill_process_group

logger = logging.getLogger(__name__)

SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
"""The login shell of every instance user."""

_FALLBACK_PATH = "/usr/local/bin:/usr/bin:/bin"

# After a PTY shell exits, background jobs may keep the terminal open, so its output never
# reaches end of file. Wait this many seconds for the rest of the output, then hang up.
_PTY_DRAIN_SECONDS = 2.0

_T = TypeVar("_T")


@dataclass(frozen=True)
class SessionContext:
    """The instance facts that every session of the instance needs."""

    instance_id: str
    home: Path
    user: str
    gpu_indices: tuple[int, ...]


class SessionTracker:
    """The process groups of an instance's running sessions, so they can be killed."""

    def __init__(self) -> None:
        self._process_group_ids: set[int] = set()

    def add(self, process_group_id: int) -> None:
        """Record a session's process group."""
        self._process_group_ids.add(process_group_id)

    def discard(self, process_group_id: int) -> None:
        """Forget a session's process group after it was killed."""
        self._process_group_ids.discard(process_group_id)

    def kill_all(self) -> None:
        """Send SIGKILL to every recorded process group and forget them."""
        for process_group_id in self._process_group_ids:
            kill_process_group(process_group_id)
        self._process_group_ids.clear()


def build_environment(context: SessionContext, term_type: str | None) -> dict[str, str]:
    """Return the complete environment of a session process.

    Only ``PATH`` comes from the service's environment. ``TERM`` is set when the client
    requested a PTY.
    """
    environment = {
        "HOME": str(context.home),
        "USER": context.user,
        "LOGNAME": context.user,
        "SHELL": SHELL,
        "PATH": os.environ.get("PATH") or _FALLBACK_PATH,
        "CUDA_VISIBLE_DEVICES": ",".join(str(index) for index in context.gpu_indices),
        INSTANCE_ID_VARIABLE: context.instance_id,
    }
    if term_type:
        environment["TERM"] = term_type
    return environment


async def serve_session(
    process: asyncssh.SSHServerProcess[bytes], context: SessionContext, tracker: SessionTracker
) -> None:
    """Run the session's command or shell until it exits or the channel closes.

    The exit status (or the terminating signal) goes back to the client. When the channel
    closes first, or this coroutine is cancelled, the session's process group is killed.
    """
    if process.subsystem is not None:
        # SFTP never gets here: asyncssh serves it from the server's sftp_factory.
        process.stderr.write(f"Subsystem {process.subsystem!r} is not supported.\r\n".encode())
        process.exit(1)
        return
    argv = [SHELL, "-l"] if process.command is None else [SHELL, "-c", process.command]
    environment = build_environment(context, process.term_type)
    if process.term_type is None:
        await _serve_with_pipes(process, argv, environment, context, tracker)
    else:
        await _serve_with_pty(process, argv, environment, context, tracker)
    # Runs the cleanup tasks of asyncssh's redirects, which only wait_closed() awaits.
    await process.wait_closed()


async def _serve_with_pipes(
    process: asyncssh.SSHServerProcess[bytes],
    argv: list[str],
    environment: dict[str, str],
    context: SessionContext,
    tracker: SessionTracker,
) -> None:
    child = await _spawn(process, argv, environment, context, asyncio.subprocess.PIPE)
    if child is None:
        return
    tracker.add(child.pid)
    try:
        # send_eof=False: asyncssh would send EOF as soon as stdout ends, before the rest
        # of stderr. _send_exit sends it once both streams are drained.
        await process.redirect(
            stdin=child.stdin, stdout=child.stdout, stderr=child.stderr, send_eof=False
        )
        returncode = await _unless_channel_closes(process, _wait_and_drain(process, child))
        if returncode is not None:
            _send_exit(process, returncode)
    finally:
        tracker.discard(child.pid)
        kill_process_group(child.pid)


async def _serve_with_pty(
    process: asyncssh.SSHServerProcess[bytes],
    argv: list[str],
    environment: dict[str, str],
    context: SessionContext,
    tracker: SessionTracker,
) -> None:
    master_fd, slave_fd = os.openpty()
    try:
        # Set the size before the child starts, so its first `stty size` is right.
        # NOTE: the terminal modes in the client's PTY request (RFC 4254 section 8) are not
        # applied, so the PTY starts with the kernel's default modes.
        _set_window_size(master_fd, process.term_size)
        child = await _spawn(process, argv, environment, context, slave_fd)
    finally:
        os.close(slave_fd)
    if child is None:
        os.close(master_fd)
        return
    tracker.add(child.pid)
    try:
        await _bridge_pty(process, master_fd)
        returncode = await _unless_channel_closes(process, _wait_and_drain_pty(process, child))
        if returncode is not None:
            _send_exit(process, returncode)
    finally:
        tracker.discard(child.pid)
        kill_process_group(child.pid)
        os.close(master_fd)


async def _bridge_pty(process: asyncssh.SSHServerProcess[bytes], master_fd: int) -> None:
    """Copy channel data to the PTY master and master output to the channel.

    asyncssh applies window-change requests to the master (TIOCSWINSZ), because the
    redirect target is a TTY; the kernel then sends SIGWINCH to the foreground job. Each
    direction gets its own duplicate of the master, which asyncio's pipe transports own
    and close. recv_eof=False keeps the terminal open when the client sends EOF, because
    a terminal has no end of input that the shell would see.
    """
    await process.redirect(
        stdin=master_fd, stdout=os.dup(master_fd), send_eof=False, recv_eof=False
    )


async def _spawn(
    process: asyncssh.SSHServerProcess[bytes],
    argv: list[str],
    environment: dict[str, str],
    context: SessionContext,
    stdio: int,
) -> asyncio.subprocess.Process | None:
    """Start the session process in a new session, or report the failure to the client."""
    uses_pty = stdio != asyncio.subprocess.PIPE
    try:
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=stdio,
            stdout=stdio,
            stderr=stdio,
            cwd=context.home,
            env=environment,
            start_new_session=True,
            preexec_fn=_take_controlling_terminal if uses_pty else None,
        )
    except OSError as exc:
        logger.warning(
            "Cannot start %s for a session of instance %s: %s", argv[0], context.instance_id, exc
        )
        process.stderr.write(f"Cannot start {argv[0]}: {exc.strerror}\r\n".encode())
        process.exit(127)
        return None


def _take_controlling_terminal() -> None:
    # Runs in the child between fork and exec, after setsid(). The new session leader
    # makes the PTY slave on fd 0 its controlling terminal, which job control, Ctrl-C and
    # SIGHUP on hang-up need.
    # NOTE: Python documents preexec_fn as unsafe when other threads run, because the child
    # could deadlock on a lock held at fork time. This function only makes one ioctl call.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_window_size(fd: int, term_size: tuple[int, int, int, int]) -> None:
    width, height, pixel_width, pixel_height = term_size
    fcntl.ioctl(
        fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixel_width, pixel_height)
    )


async def _wait_and_drain(
    process: asyncssh.SSHServerProcess[bytes], child: asyncio.subprocess.Process
) -> int:
    """Wait for the child to exit and for its stdout and stderr to reach end of file."""
    returncode = await child.wait()
    # drain() returns once the redirect of that stream has ended (see asyncssh's
    # SSHServerProcess._should_block_drain), so no output is lost before the exit status.
    await process.stdout.drain()
    await process.stderr.drain()
    return returncode


async def _wait_and_drain_pty(
    process: asyncssh.SSHServerProcess[bytes], child: asyncio.subprocess.Process
) -> int:
    returncode = await child.wait()
    try:
        async with asyncio.timeout(_PTY_DRAIN_SECONDS):
            await process.stdout.drain()
    except TimeoutError:
        logger.debug("PTY output still open after the shell exited; hanging up")
    return returncode


async def _unless_channel_closes(
    process: asyncssh.SSHServerProcess[bytes], work: Awaitable[_T]
) -> _T | None:
    """Return the result of ``work``, or None if the channel closes first."""
    work_task = asyncio.ensure_future(work)
    closed_task = asyncio.ensure_future(process.channel.wait_closed())
    try:
        await asyncio.wait({work_task, closed_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, closed_task):
            task.cancel()
    if not work_task.done() or work_task.cancelled():
        return None
    error = work_task.exception()
    if error is not None:
        # drain() raises when the connection drops while output is pending.
        logger.debug("Session ended without an exit status: %r", error)
        return None
    return work_task.result()


def _send_exit(process: asyncssh.SSHServerProcess[bytes], returncode: int) -> None:
    """Send EOF and the exit status, or the signal that killed the process."""
    if process.is_closing():
        return
    process.channel.write_eof()
    if returncode >= 0:
        process.exit(returncode)
        return
    signal_name = _signal_name(-returncode)
    process.exit_with_signal(signal_name)


def _signal_name(signal_number: int) -> str:
    """Return the RFC 4254 name of a signal ("KILL" for SIGKILL)."""
    try:
        return signal.Signals(signal_number).name.removeprefix("SIG")
    except ValueError:
        return str(signal_number)
