"""A runtime that makes each instance a real SSH endpoint on this machine.

Every instance gets its own loopback address from a pool and an asyncssh server on
``<address>:<ssh_port>``, whose sessions run as local processes (see ``sessions``).
It serves development and tests of the control plane without GPU hosts; it does not
isolate instances from each other or from the service.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from computeplane.agent.runtime.addresses import AddressClaims
from computeplane.agent.runtime.base import Endpoint, InstanceSpec, Runtime
from computeplane.agent.runtime.claim_registry import ClaimRegistry
from computeplane.agent.runtime.instance_state import InstanceRecord, InstanceStateDir
from computeplane.agent.runtime.processes import kill_instance_processes
from computeplane.agent.runtime.sessions import SessionContext
from computeplane.agent.runtime.sshserver import InstanceSSHServer, parse_authorized_key
from computeplane.domain.errors import RuntimeFailure

logger = logging.getLogger(__name__)

DEFAULT_ADDRESS_POOL = ipaddress.IPv4Network("127.77.0.0/16")

# A new instance tries at most this many addresses whose SSH port is taken. The limit
# ends the search when something listens on 0.0.0.0:<ssh_port>, which blocks every address.
_MAX_BIND_ATTEMPTS = 16

# Instance ids name directories, so they must be one safe path component.
_INSTANCE_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class LocalRuntimeConfig:
    """Settings of a ``LocalRuntime``.

    ``state_dir`` contains this node's instances, one directory per instance id.
    ``address_dir`` contains the address claims and must be shared by every local runtime on
    the data directory. ``claim_registry``, when given, shows the claims of other data
    directories on the machine. ``address_pool`` is the network whose host addresses
    instances get; on Linux every 127.0.0.0/8 address is usable without setup.
    ``ssh_port`` is the TCP port each instance listens on, and ``ssh_user`` the only user
    name that may log in.
    ``start_delay_seconds`` makes every new instance wait that long before it starts, to
    stand in for the provisioning time of a real host.
    """

    state_dir: Path
    address_dir: Path
    address_pool: ipaddress.IPv4Network = DEFAULT_ADDRESS_POOL
    ssh_port: int = 2222
    ssh_user: str = "ubuntu"
    start_delay_seconds: float = 0.0
    claim_registry: ClaimRegistry | None = None


@dataclass(frozen=True)
class _RunningInstance:
    endpoint: Endpoint
    server: InstanceSSHServer


class LocalRuntime(Runtime):
    """Runs each instance as an SSH server on its own local address.

    State lives in ``<state_dir>/<instance_id>/`` (see ``instance_state``), so a new
    ``LocalRuntime`` restores an instance with the same address, host key and files.
    """

    def __init__(self, config: LocalRuntimeConfig) -> None:
        self.config = config
        self._claims = AddressClaims(
            config.address_dir, config.address_pool, config.claim_registry
        )
        self._running: dict[str, _RunningInstance] = {}

    async def start(self, spec: InstanceSpec) -> Endpoint:
        """Start the instance, restore it from saved state, or return its running endpoint.

        A new instance claims the first free pool address whose port it can bind. Raises
        ``RuntimeFailure`` after releasing what this call took: for a new instance its
        server, address claim and state directory, for a restored instance its server.
        """
        running = self._running.get(spec.instance_id)
        if running is not None:
            return running.endpoint
        self._validate_spec(spec)
        authorized_keys = parse_authorized_key(spec.ssh_public_key)
        state = self._state_dir(spec.instance_id)
        if state.has_record():
            instance = await self._restore(spec, state, authorized_keys)
        else:
            await asyncio.sleep(self.config.start_delay_seconds)
            instance = await self._create(spec, state, authorized_keys)
        self._running[spec.instance_id] = instance
        return instance.endpoint

    async def stop(self, instance_id: str) -> None:
        """Stop the instance, kill its processes, delete its state and release its address.

        Works for instances that this process never started. Safe to repeat, and unknown
        ids are no-ops. Raises ``RuntimeFailure`` if the state directory cannot be deleted.
        """
        running = self._running.pop(instance_id, None)
        if running is not None:
            await self._close_server(instance_id, running.server)
        if not _INSTANCE_ID_PATTERN.fullmatch(instance_id):
            return
        # Deleting a large home directory can take seconds, so the blocking steps run in a
        # worker thread and the event loop keeps serving other instances.
        state = self._state_dir(instance_id)
        await asyncio.to_thread(kill_instance_processes, instance_id, state.home)
        record = self._read_record_if_any(state)
        await asyncio.to_thread(state.delete)
        if record is not None:
            self._claims.release(record.ip, instance_id)
        else:
            self._claims.release_all(instance_id)
        if running is not None:
            ip = running.endpoint.ip
        elif record is not None:
            ip = str(record.ip)
        else:
            return
        logger.info("stopped instance %s on %s:%d", instance_id, ip, self.config.ssh_port)

    async def list_instances(self) -> list[str]:
        """Return the ids of instances with a state directory, running or not, sorted."""
        try:
            names = os.listdir(self.config.state_dir)
        except FileNotFoundError:
            return []
        return sorted(
            name
            for name in names
            if _INSTANCE_ID_PATTERN.fullmatch(name) and (self.config.state_dir / name).is_dir()
        )

    async def close(self) -> None:
        """Close every server and kill every session, keeping all state for a restore.

        Processes that left their session, such as daemons started with ``setsid``, are
        killed too, as on a host that shuts down.
        """
        running = list(self._running.items())
        self._running.clear()
        for instance_id, instance in running:
            await self._close_server(instance_id, instance.server)
            home = self._state_dir(instance_id).home
            await asyncio.to_thread(kill_instance_processes, instance_id, home)
        if running:
            logger.info(
                "closed %d instance endpoints; their state stays in %s",
                len(running),
                self.config.state_dir,
            )

    def _validate_spec(self, spec: InstanceSpec) -> None:
        if not _INSTANCE_ID_PATTERN.fullmatch(spec.instance_id):
            raise RuntimeFailure(
                f"Instance id {spec.instance_id!r} is invalid for the local runtime: it must "
                "start with a letter or digit and contain only letters, digits, '.', '_' and '-'."
            )
        if spec.ssh_user != self.config.ssh_user:
            raise RuntimeFailure(
                f"The instance requests SSH user {spec.ssh_user!r}, but this node's local "
                f"runtime serves only {self.config.ssh_user!r}. Set the runtime's ssh_user to "
                "match the control plane's."
            )

    def _state_dir(self, instance_id: str) -> InstanceStateDir:
        return InstanceStateDir(self.config.state_dir / instance_id)

    async def _restore(
        self,
        spec: InstanceSpec,
        state: InstanceStateDir,
        authorized_keys: asyncssh.SSHAuthorizedKeys,
    ) -> _RunningInstance:
        """Serve an instance from saved state on its saved address.

        The state and the address claim stay on failure, so a later start can retry and
        stop can delete them.
        """
        record = state.read_record()
        host_key = state.load_host_key()
        self._claims.reclaim(record.ip, spec.instance_id)
        state.write_record(self._record(spec, record.ip))
        server = self._new_server(spec, state, authorized_keys, host_key)
        if not await self._listen(server, spec.instance_id, record.ip):
            raise RuntimeFailure(
                f"Cannot restore instance {spec.instance_id}: its address "
                f"{record.ip}:{self.config.ssh_port} is in use by another process, such as a "
                "second computeplane on the same address pool. Stop that process."
            )
        logger.info(
            "restored instance %s on %s:%d", spec.instance_id, record.ip, self.config.ssh_port
        )
        return _RunningInstance(Endpoint(str(record.ip), self.config.ssh_port), server)

    async def _create(
        self,
        spec: InstanceSpec,
        state: InstanceStateDir,
        authorized_keys: asyncssh.SSHAuthorizedKeys,
    ) -> _RunningInstance:
        """Create state for a new instance and serve it on a newly claimed address."""
        if state.path.exists():
            # A directory without a record is what an interrupted start left behind,
            # possibly with an address claim.
            state.delete()
            self._claims.release_all(spec.instance_id)
        host_key = state.create()
        try:
            instance = await self._serve_on_free_address(spec, state, authorized_keys, host_key)
        except BaseException:
            state.delete()
            raise
        logger.info(
            "started instance %s on %s:%d",
            spec.instance_id,
            instance.endpoint.ip,
            instance.endpoint.port,
        )
        return instance

    async def _serve_on_free_address(
        self,
        spec: InstanceSpec,
        state: InstanceStateDir,
        authorized_keys: asyncssh.SSHAuthorizedKeys,
        host_key: asyncssh.SSHKey,
    ) -> _RunningInstance:
        """Claim addresses until one has a free SSH port, releasing those that do not."""
        in_use: list[ipaddress.IPv4Address] = []
        for _ in range(_MAX_BIND_ATTEMPTS):
            try:
                ip = self._claims.claim(spec.instance_id, exclude=in_use)
            except RuntimeFailure:
                if not in_use:
                    raise
                # The pool ran out because of busy ports, not claims: say so.
                break
            server = self._new_server(spec, state, authorized_keys, host_key)
            try:
                state.write_record(self._record(spec, ip))
                bound = await self._listen(server, spec.instance_id, ip)
            except BaseException:
                self._claims.release(ip, spec.instance_id)
                raise
            if bound:
                return _RunningInstance(Endpoint(str(ip), self.config.ssh_port), server)
            self._claims.release(ip, spec.instance_id)
            in_use.append(ip)
            logger.info(
                "port %d is in use on %s, so instance %s tries the next address",
                self.config.ssh_port,
                ip,
                spec.instance_id,
            )
        raise RuntimeFailure(
            f"Cannot start instance {spec.instance_id}: port {self.config.ssh_port} is in use "
            f"on {len(in_use)} addresses of the pool {self.config.address_pool} ({in_use[0]} to "
            f"{in_use[-1]}). Another service may listen on 0.0.0.0:{self.config.ssh_port}. Free "
            "that port or configure another ssh_port."
        )

    async def _listen(
        self, server: InstanceSSHServer, instance_id: str, ip: ipaddress.IPv4Address
    ) -> bool:
        """Start listening, or return False if the port is in use on ``ip``.

        Raises ``RuntimeFailure`` for other bind failures, such as an address that no
        interface has.
        """
        try:
            await server.listen(str(ip), self.config.ssh_port)
        except OSError as exc:
            await server.close()
            if exc.errno == errno.EADDRINUSE:
                return False
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise RuntimeFailure(
                f"Cannot listen for SSH on {ip}:{self.config.ssh_port} for instance "
                f"{instance_id}: {reason}."
            ) from exc
        return True

    def _new_server(
        self,
        spec: InstanceSpec,
        state: InstanceStateDir,
        authorized_keys: asyncssh.SSHAuthorizedKeys,
        host_key: asyncssh.SSHKey,
    ) -> InstanceSSHServer:
        context = SessionContext(
            instance_id=spec.instance_id,
            home=state.home,
            user=self.config.ssh_user,
            gpu_indices=spec.gpu_indices,
        )
        return InstanceSSHServer(context, authorized_keys, host_key)

    def _record(self, spec: InstanceSpec, ip: ipaddress.IPv4Address) -> InstanceRecord:
        return InstanceRecord(
            instance_id=spec.instance_id,
            ip=ip,
            port=self.config.ssh_port,
            gpu_indices=spec.gpu_indices,
            ssh_public_key=spec.ssh_public_key.strip(),
        )

    @staticmethod
    def _read_record_if_any(state: InstanceStateDir) -> InstanceRecord | None:
        if not state.has_record():
            return None
        try:
            return state.read_record()
        except RuntimeFailure as exc:
            logger.warning("ignoring unreadable state while stopping: %s", exc)
            return None

    @staticmethod
    async def _close_server(instance_id: str, server: InstanceSSHServer) -> None:
        try:
            await server.close()
        except TimeoutError:
            logger.warning(
                "connections of instance %s did not close within the timeout; continuing",
                instance_id,
            )
