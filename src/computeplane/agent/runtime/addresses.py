"""Address claims that keep local runtimes on one machine from sharing an IP address.

Every runtime on one data directory, in this process or another, uses the same claim
directory. ``claim_registry`` makes the claims of other data directories visible too.
A claim is the file ``<address_dir>/<ip>`` containing the owning instance id. The file is
created with ``O_CREAT | O_EXCL``, so the kernel decides which of two racing runtimes gets
an address. Releasing an address unlinks its file.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Collection
from pathlib import Path

from computeplane.agent.runtime.claim_registry import ClaimRegistry
from computeplane.domain.errors import RuntimeFailure


class AddressClaims:
    """The claims on the host addresses of one pool, stored as files in ``address_dir``."""

    def __init__(
        self,
        address_dir: Path,
        pool: ipaddress.IPv4Network,
        registry: ClaimRegistry | None = None,
    ) -> None:
        self.address_dir = address_dir
        self.pool = pool
        self.registry = registry

    def claim(
        self, instance_id: str, exclude: Collection[ipaddress.IPv4Address] = ()
    ) -> ipaddress.IPv4Address:
        """Claim the next free host address of the pool for ``instance_id``.

        Addresses are tried in ascending order from the one after the last address claimed
        in this directory, wrapping around, and skipping the network and broadcast addresses
        and any address in ``exclude``. A released address is therefore reused only after
        the rest of the pool, so a client's known_hosts entry for a deleted instance rarely
        meets a new host key at the same address. With a ``registry``, addresses claimed in
        other data directories are skipped too. Raises ``RuntimeFailure`` when every
        address is claimed.
        """
        self.address_dir.mkdir(parents=True, exist_ok=True)
        # Listing first skips taken addresses without one failed open() per address. The
        # O_EXCL open below still settles races with other runtimes.
        claimed_names = set(os.listdir(self.address_dir))
        if self.registry is not None:
            claimed_names |= self.registry.claimed_elsewhere(self.address_dir)
        for ip in self._rotation():
            if ip in exclude or str(ip) in claimed_names:
                continue
            if self._create_claim_file(ip, instance_id):
                self._remember_last(ip)
                return ip
        raise RuntimeFailure(
            f"No free address in the local address pool {self.pool}: every host address is "
            f"claimed in {self.address_dir}. Stop unused instances or configure a larger pool."
        )

    def reclaim(self, ip: ipaddress.IPv4Address, instance_id: str) -> None:
        """Make sure ``instance_id`` owns the claim on ``ip``, which it owned before.

        A missing claim file is created again. Raises ``RuntimeFailure`` when another
        instance claimed the address in the meantime.
        """
        self.address_dir.mkdir(parents=True, exist_ok=True)
        if self._create_claim_file(ip, instance_id):
            return
        owner = self.owner(ip)
        if owner != instance_id:
            raise RuntimeFailure(
                f"Cannot restore instance {instance_id}: its address {ip} is now claimed by "
                f"instance {owner} in {self.address_dir}."
            )

    def release(self, ip: ipaddress.IPv4Address, instance_id: str) -> None:
        """Delete the claim on ``ip`` if ``instance_id`` owns it, and otherwise do nothing."""
        if self.owner(ip) != instance_id:
            return
        self._claim_path(ip).unlink(missing_ok=True)

    def release_all(self, instance_id: str) -> None:
        """Delete every claim owned by ``instance_id``, for when its address is unknown."""
        try:
            names = os.listdir(self.address_dir)
        except FileNotFoundError:
            return
        for name in names:
            try:
                ip = ipaddress.IPv4Address(name)
            except ValueError:
                continue
            self.release(ip, instance_id)

    def owner(self, ip: ipaddress.IPv4Address) -> str | None:
        """Return the instance id that claims ``ip``, or None when the address is free."""
        try:
            return self._claim_path(ip).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None

    def _rotation(self) -> list[ipaddress.IPv4Address]:
        hosts = list(self.pool.hosts())
        last = self._last_claimed()
        if last is None or last not in self.pool:
            return hosts
        start = hosts.index(last) + 1 if last in hosts else 0
        return hosts[start:] + hosts[:start]

    def _last_claimed(self) -> ipaddress.IPv4Address | None:
        # The file is a hint shared by racing runtimes; a stale or torn value only moves
        # where the scan starts.
        try:
            return ipaddress.IPv4Address(self._last_path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def _remember_last(self, ip: ipaddress.IPv4Address) -> None:
        temporary = self._last_path.with_name(f"{self._last_path.name}.{secrets.token_hex(8)}")
        temporary.write_text(str(ip), encoding="ascii")
        os.replace(temporary, self._last_path)

    @property
    def _last_path(self) -> Path:
        # Beside the claim directory, so that the directory holds claims only.
        return self.address_dir.with_name(f"{self.address_dir.name}.last-claimed")

    def _claim_path(self, ip: ipaddress.IPv4Address) -> Path:
        return self.address_dir / str(ip)

    def _create_claim_file(self, ip: ipaddress.IPv4Address, instance_id: str) -> bool:
        """Create the claim file for ``ip``, or return False if it already exists."""
        try:
            fd = os.open(self._claim_path(ip), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:
            raise RuntimeFailure(
                f"Cannot create the address claim file {self._claim_path(ip)}: {exc.strerror}."
            ) from exc
        with os.fdopen(fd, "w", encoding="utf-8") as claim_file:
            claim_file.write(instance_id)
        return True
