"""The SSH server of one local-runtime instance, built on asyncssh.

Only the instance's user may log in, only by public key and only with the instance's key.
Sessions run commands, shells (with or without a PTY) and SFTP chrooted to the instance's
home. asyncssh's SCP server serves ``scp -O`` with the same chroot. Password,
keyboard-interactive, host-based and GSS authentication are off, and so are port, agent
and X11 forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import asyncssh

from computeplane.agent.runtime.sessions import SessionContext, SessionTracker, serve_session
from computeplane.domain.errors import RuntimeFailure

# How long close() waits for connections to finish closing before it gives up on them.
_CLOSE_TIMEOUT_SECONDS = 5.0


def parse_authorized_key(line: str) -> asyncssh.SSHAuthorizedKeys:
    """Parse the instance's public key, one OpenSSH ``authorized_keys`` line.

    Every key type asyncssh verifies is accepted, including the FIDO security-key types
    ``sk-ssh-ed25519@openssh.com`` and ``sk-ecdsa-sha2-nistp256@openssh.com``. Raises
    ``RuntimeFailure`` for an empty, multi-line or unparsable value. The message never
    contains the value, in case a private key was sent by mistake.
    """
    stripped = line.strip()
    if not stripped or "\n" in stripped or "\r" in stripped:
        raise RuntimeFailure(
            "The instance's SSH public key must be exactly one line in OpenSSH "
            "authorized_keys format."
        )
    try:
        return asyncssh.import_authorized_keys(stripped)
    except ValueError as exc:
        # asyncssh raises ValueError("No valid entries found") when the line does not parse.
        raise RuntimeFailure(
            "The instance's SSH public key is not a valid OpenSSH public key."
        ) from exc


class InstanceSSHServer:
    """The SSH endpoint of one instance: its listener, connections and sessions."""

    def __init__(
        self,
        context: SessionContext,
        authorized_keys: asyncssh.SSHAuthorizedKeys,
        host_key: asyncssh.SSHKey,
    ) -> None:
        self.context = context
        self._authorized_keys = authorized_keys
        self._host_key = host_key
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._sessions = SessionTracker()

    async def listen(self, ip: str, port: int) -> None:
        """Start accepting connections on ``ip:port``.

        Raises the ``OSError`` of a failed bind unchanged, so the caller can tell
        ``EADDRINUSE`` from other failures.
        """
        self._acceptor = await asyncssh.create_server(
            self._create_auth_server,
            host=ip,
            port=port,
            server_host_keys=[self._host_key],
            process_factory=self._serve_process,
            sftp_factory=self._create_sftp_server,
            allow_scp=True,
            # Bytes in and out, without asyncssh's line editor, because sessions relay raw
            # terminal traffic to real processes and PTYs.
            encoding=None,
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            gss_host=None,
        )

    async def close(self) -> None:
        """Stop listening, close every connection and kill every session process group."""
        if self._acceptor is not None:
            self._acceptor.close()
        connections = list(self._connections)
        for connection in connections:
            connection.close()
        # Session coroutines also kill their groups when their channels close, but they run
        # later. Killing here means that no session process outlives close().
        self._sessions.kill_all()
        waits = [connection.wait_closed() for connection in connections]
        if self._acceptor is not None:
            waits.append(self._acceptor.wait_closed())
            self._acceptor = None
        if waits:
            async with asyncio.timeout(_CLOSE_TIMEOUT_SECONDS):
                await asyncio.gather(*waits)

    def _create_auth_server(self) -> _InstanceAuthServer:
        return _InstanceAuthServer(self.context.user, self._authorized_keys, self._connections)

    async def _serve_process(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        await serve_session(process, self.context, self._sessions)

    def _create_sftp_server(
        self, channel: asyncssh.SSHServerChannel[bytes]
    ) -> asyncssh.SFTPServer:
        return _InstanceSFTPServer(channel, chroot=os.fsencode(self.context.home))


class _InstanceSFTPServer(asyncssh.SFTPServer):
    """An SFTP server that reports exit status 0 when the session ends.

    OpenSSH's scp (9.0 and later) transfers over SFTP and exits 1, even after a complete
    transfer, when the subsystem channel closes without an exit status. OpenSSH's sshd
    sends one, but asyncssh 2.24 closes the channel without it.
    """

    def exit(self) -> None:
        # asyncssh documents OSError from channel.exit() when the channel is not open.
        with contextlib.suppress(OSError):
            self.channel.exit(0)


class _InstanceAuthServer(asyncssh.SSHServer):
    """Authenticates one connection: only ``user``, only by one of ``authorized_keys``."""

    def __init__(
        self,
        user: str,
        authorized_keys: asyncssh.SSHAuthorizedKeys,
        connections: set[asyncssh.SSHServerConnection],
    ) -> None:
        self._user = user
        self._authorized_keys = authorized_keys
        self._connections = connections
        self._connection: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._connection = conn
        self._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connection is not None:
            self._connections.discard(self._connection)

    def begin_auth(self, username: str) -> bool:
        assert self._connection is not None
        # A client may change the user name between attempts. asyncssh 2.24 resets the keys
        # before each begin_auth call, but setting None here keeps other names keyless
        # without relying on that.
        keys = self._authorized_keys if username == self._user else None
        self._connection.set_authorized_keys(keys)
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False
