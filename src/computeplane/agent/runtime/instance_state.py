"""The on-disk state of one local-runtime instance: its record, host key and home.

Layout of ``<state_dir>/<instance_id>/``:

    instance.json           the ``InstanceRecord`` (address, port, GPU indices, key line)
    ssh_host_ed25519_key    the SSH host key in OpenSSH format, mode 0600
    home/                   the instance's home directory and SFTP root

``instance.json`` is written last, so its presence marks state that a later process may
restore. A directory without it is what an interrupted start left behind.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh

from computeplane.domain.errors import RuntimeFailure

_RECORD_FILE = "instance.json"
_HOST_KEY_FILE = "ssh_host_ed25519_key"
_HOME_DIR = "home"


@dataclass(frozen=True)
class InstanceRecord:
    """The saved facts from which a later process restores an instance on its address."""

    instance_id: str
    ip: ipaddress.IPv4Address
    port: int
    gpu_indices: tuple[int, ...]
    ssh_public_key: str

    def to_json(self) -> dict[str, Any]:
        """Return the record as a JSON-compatible dict."""
        return {
            "instance_id": self.instance_id,
            "ip": str(self.ip),
            "port": self.port,
            "gpu_indices": list(self.gpu_indices),
            "ssh_public_key": self.ssh_public_key,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        """Build a record from ``to_json`` output, raising KeyError or ValueError if invalid."""
        return cls(
            instance_id=str(data["instance_id"]),
            ip=ipaddress.IPv4Address(data["ip"]),
            port=int(data["port"]),
            gpu_indices=tuple(int(index) for index in data["gpu_indices"]),
            ssh_public_key=str(data["ssh_public_key"]),
        )


class InstanceStateDir:
    """The state directory of one instance. Creating this object does not touch the disk."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def home(self) -> Path:
        """The instance's home directory, which is also the SFTP root."""
        return self.path / _HOME_DIR

    @property
    def host_key_path(self) -> Path:
        """The host key file."""
        return self.path / _HOST_KEY_FILE

    def has_record(self) -> bool:
        """Return whether a restorable record exists."""
        return (self.path / _RECORD_FILE).is_file()

    def create(self) -> asyncssh.SSHKey:
        """Create the directory, a new ed25519 host key and ``home/``, and return the key.

        Raises ``RuntimeFailure`` if the directory exists or cannot be created.
        """
        try:
            self.path.mkdir(mode=0o700, parents=True)
            host_key = asyncssh.generate_private_key("ssh-ed25519")
            _write_private_file(self.host_key_path, host_key.export_private_key())
            self.home.mkdir(mode=0o755)
        except OSError as exc:
            raise RuntimeFailure(
                f"Cannot create the instance state directory {self.path}: {exc.strerror}."
            ) from exc
        return host_key

    def write_record(self, record: InstanceRecord) -> None:
        """Write ``instance.json`` atomically, so readers never see a partial file."""
        final_path = self.path / _RECORD_FILE
        temporary_path = final_path.with_suffix(".json.tmp")
        try:
            temporary_path.write_text(json.dumps(record.to_json(), indent=2), encoding="utf-8")
            os.replace(temporary_path, final_path)
        except OSError as exc:
            raise RuntimeFailure(f"Cannot write {final_path}: {exc.strerror}.") from exc

    def read_record(self) -> InstanceRecord:
        """Read ``instance.json``, raising ``RuntimeFailure`` if it is unreadable or invalid."""
        record_path = self.path / _RECORD_FILE
        try:
            data = json.loads(record_path.read_text(encoding="utf-8"))
            return InstanceRecord.from_json(data)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RuntimeFailure(
                f"The saved state in {record_path} is unreadable ({exc}); "
                "stop the instance to delete it."
            ) from exc

    def load_host_key(self) -> asyncssh.SSHKey:
        """Read the host key, raising ``RuntimeFailure`` if it is missing or invalid."""
        try:
            return asyncssh.read_private_key(self.host_key_path)
        except (OSError, asyncssh.KeyImportError) as exc:
            raise RuntimeFailure(
                f"The saved host key {self.host_key_path} is unreadable; "
                "stop the instance to delete its state."
            ) from exc

    def delete(self) -> None:
        """Delete the directory and everything in it, if the directory exists.

        Raises ``RuntimeFailure`` if something in it cannot be deleted.
        """
        try:
            shutil.rmtree(self.path)
        except FileNotFoundError:
            return
        except PermissionError:
            # Instance users may leave read-only directories in their home (build caches
            # often do), and unlinking an entry needs write permission on its directory.
            self._retry_delete_writable()

    def _retry_delete_writable(self) -> None:
        try:
            _make_tree_writable(self.path)
            shutil.rmtree(self.path)
        except OSError as exc:
            raise RuntimeFailure(
                f"Cannot delete the instance state directory {self.path}: {exc}."
            ) from exc


def _make_tree_writable(root: Path) -> None:
    os.chmod(root, 0o700)
    for directory, subdirectories, _ in os.walk(root):
        for name in subdirectories:
            subdirectory = os.path.join(directory, name)
            # os.walk descends only after this loop, so it can list the fixed directories.
            if not os.path.islink(subdirectory):
                os.chmod(subdirectory, 0o700)


def _write_private_file(path: Path, data: bytes) -> None:
    # Create with mode 0600 directly, because a chmod after writing would leave the key
    # readable by others for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as key_file:
        key_file.write(data)
