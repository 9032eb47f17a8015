"""A machine-wide list of the address pools that local runtimes use, one entry per claim dir.

Address claims live in one data directory, so two data directories on one pool and port
do not see each other's claims. If one of them is stopped, the other can hand its
instances' addresses to new instances, and the first then cannot restore them. A local
runtime therefore registers its claim directory here before it starts. It is rejected
while another registered claim directory on an overlapping pool and the same port still
contains claims.

Each entry is ``<registry_dir>/<hash of the claim directory>.json``. Entries whose data
directory no longer exists are removed as they are found.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from computeplane.domain.errors import ConflictError

logger = logging.getLogger(__name__)


def default_registry_dir() -> Path:
    """Return the registry of this operating-system user, in the temporary directory."""
    return Path(tempfile.gettempdir()) / f"computeplane-{os.getuid()}" / "address-pools"


@dataclass(frozen=True)
class PoolEntry:
    """A claim directory and the address pool and SSH port of the runtimes that use it."""

    address_dir: Path
    pool: ipaddress.IPv4Network
    ssh_port: int

    def conflicts_with(self, other: PoolEntry) -> bool:
        return (
            self.address_dir != other.address_dir
            and self.ssh_port == other.ssh_port
            and self.pool.overlaps(other.pool)
        )


def register_pool(entry: PoolEntry, registry_dir: Path | None = None) -> None:
    """Record ``entry``, or raise ConflictError if another claim directory shares its pool.

    Only a claim directory that contains claims conflicts. One without instances cannot
    hand out an address twice until it claims again, and its own start then checks this one.
    """
    registry = registry_dir or default_registry_dir()
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    entry = PoolEntry(entry.address_dir.resolve(), entry.pool, entry.ssh_port)
    with (registry / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for path, other in _entries(registry):
            if not other.address_dir.parent.exists():
                path.unlink(missing_ok=True)
                continue
            if entry.conflicts_with(other) and _holds_claims(other.address_dir):
                raise ConflictError(_conflict_message(entry, other), code="address_pool_in_use")
        _write_entry(registry, entry)


def _entries(registry: Path) -> list[tuple[Path, PoolEntry]]:
    entries = []
    for path in sorted(registry.glob("*.json")):
        try:
            record = json.loads(path.read_text())
            entries.append(
                (
                    path,
                    PoolEntry(
                        Path(record["address_dir"]),
                        ipaddress.IPv4Network(record["pool"]),
                        int(record["ssh_port"]),
                    ),
                )
            )
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("ignoring unreadable address pool entry %s: %s", path, error)
    return entries


def _holds_claims(address_dir: Path) -> bool:
    with contextlib.suppress(FileNotFoundError):
        return any(not name.startswith(".") for name in os.listdir(address_dir))
    return False


def _write_entry(registry: Path, entry: PoolEntry) -> None:
    name = hashlib.sha256(str(entry.address_dir).encode()).hexdigest()[:16]
    record = {
        "address_dir": str(entry.address_dir),
        "pool": str(entry.pool),
        "ssh_port": entry.ssh_port,
    }
    temporary = registry / f".{name}.tmp"
    temporary.write_text(json.dumps(record))
    temporary.replace(registry / f"{name}.json")


def _conflict_message(entry: PoolEntry, other: PoolEntry) -> str:
    return (
        f"The local address pool {entry.pool} with SSH port {entry.ssh_port} overlaps "
        f"{other.pool} on the same port, which the instances of the data directory "
        f"{other.address_dir.parent} still use. Two data directories on one pool can give one "
        "address to two instances. Delete that directory's instances (or the directory), or "
        "give this one its own pool or port with COMPUTEPLANE_LOCAL_ADDRESS_POOL (for example "
        "127.78.0.0/16) or COMPUTEPLANE_LOCAL_SSH_PORT."
    )
