"""A per-user list of the address claim directories on this machine.

Address claims live in one data directory, so local runtimes on two data directories with
overlapping pools would not see each other's claims. Each runtime registers its claim
directory here, and before it claims an address it skips the addresses that another
registered directory claims. The list is advisory: an entry or a registry that cannot be
read or written is logged and skipped, never fatal.

Each entry is ``<registry_dir>/<hash of the claim directory>.json``. Entries whose data
directory no longer exists are removed when they are read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

#: Entries are a few hundred bytes; a larger file is not one and is not read.
MAX_ENTRY_BYTES = 4096


def default_registry_dir() -> Path:
    """Return the registry of this operating-system user, in the temporary directory."""
    return Path(tempfile.gettempdir()) / f"computeplane-{os.getuid()}" / "address-claims"


class ClaimRegistry:
    """The claim directories that local runtimes of this user have registered."""

    def __init__(self, registry_dir: Path | None = None) -> None:
        self.registry_dir = registry_dir or default_registry_dir()

    def register(self, address_dir: Path) -> None:
        """Add ``address_dir`` to the registry; a failure is logged and ignored."""
        address_dir = address_dir.resolve()
        name = hashlib.sha256(str(address_dir).encode()).hexdigest()[:16]
        temporary = self.registry_dir / f".{name}.{os.getpid()}.tmp"
        try:
            self.registry_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            temporary.write_text(json.dumps({"address_dir": str(address_dir)}))
            temporary.replace(self.registry_dir / f"{name}.json")
        except OSError as error:
            logger.warning(
                "cannot register the address claims %s in %s (%s); other data directories "
                "on this machine will not see them",
                address_dir,
                self.registry_dir,
                error,
            )
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    def claimed_elsewhere(self, address_dir: Path) -> set[str]:
        """Return the addresses claimed in registered directories other than ``address_dir``."""
        claimed: set[str] = set()
        for other in self._other_dirs(address_dir.resolve()):
            with contextlib.suppress(OSError):
                claimed.update(name for name in os.listdir(other) if not name.startswith("."))
        return claimed

    def _other_dirs(self, own: Path) -> list[Path]:
        try:
            paths = sorted(self.registry_dir.glob("*.json"))
        except OSError:
            return []
        others = []
        for path in paths:
            address_dir = _read_entry(path)
            if address_dir is None or address_dir == own:
                continue
            if not address_dir.parent.exists():
                # The data directory was deleted, and its claims with it.
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            others.append(address_dir)
        return others


def _read_entry(path: Path) -> Path | None:
    """Return the claim directory an entry names, or None with a warning if it is unusable."""
    try:
        # Only a small regular file is opened, so a FIFO or device cannot block the read.
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_ENTRY_BYTES:
            raise ValueError("not a small regular file")
        record = json.loads(path.read_text(encoding="utf-8"))
        return Path(record["address_dir"])
    except (OSError, ValueError, RecursionError, KeyError, TypeError) as error:
        logger.warning("skipping unusable address claim entry %s: %s", path, error)
        return None
