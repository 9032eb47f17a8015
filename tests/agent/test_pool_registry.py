"""The machine-wide registry that keeps two data directories off one address pool and port."""

from __future__ import annotations

import ipaddress
import json
import shutil
from pathlib import Path

import pytest

from computeplane.agent.runtime.pool_registry import PoolEntry, register_pool
from computeplane.domain.errors import ConflictError

POOL = ipaddress.IPv4Network("127.91.0.0/16")
PORT = 2299


def entry(data_dir: Path, pool: str = str(POOL), port: int = PORT) -> PoolEntry:
    return PoolEntry(data_dir / "addresses", ipaddress.IPv4Network(pool), port)


def with_claim(data_dir: Path, ip: str = "127.91.0.1") -> Path:
    """Create ``data_dir`` with one address claim, as a runtime with one instance has."""
    addresses = data_dir / "addresses"
    addresses.mkdir(parents=True)
    (addresses / ip).write_text("inst_one")
    return data_dir


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    return tmp_path / "registry"


def test_pool_shared_with_claims_rejected(tmp_path: Path, registry: Path) -> None:
    first = with_claim(tmp_path / "first")
    register_pool(entry(first), registry)

    with pytest.raises(ConflictError) as raised:
        register_pool(entry(tmp_path / "second"), registry)

    assert raised.value.code == "address_pool_in_use"
    assert str(first) in raised.value.message
    assert "COMPUTEPLANE_LOCAL_ADDRESS_POOL" in raised.value.message


def test_overlapping_pool_rejected(tmp_path: Path, registry: Path) -> None:
    register_pool(entry(with_claim(tmp_path / "first")), registry)

    with pytest.raises(ConflictError):
        register_pool(entry(tmp_path / "second", pool="127.91.7.0/24"), registry)


@pytest.mark.parametrize(
    ("pool", "port"),
    [("127.92.0.0/16", PORT), (str(POOL), PORT + 1)],
    ids=["other_pool", "other_port"],
)
def test_separate_pool_or_port_accepted(
    tmp_path: Path, registry: Path, pool: str, port: int
) -> None:
    register_pool(entry(with_claim(tmp_path / "first")), registry)

    register_pool(entry(tmp_path / "second", pool=pool, port=port), registry)

    assert len(list(registry.glob("*.json"))) == 2


def test_pool_without_claims_accepted(tmp_path: Path, registry: Path) -> None:
    first = tmp_path / "first"
    (first / "addresses").mkdir(parents=True)
    register_pool(entry(first), registry)

    register_pool(entry(tmp_path / "second"), registry)

    assert len(list(registry.glob("*.json"))) == 2


def test_same_directory_registers_again(tmp_path: Path, registry: Path) -> None:
    data_dir = with_claim(tmp_path / "first")
    register_pool(entry(data_dir), registry)

    register_pool(entry(data_dir), registry)

    assert len(list(registry.glob("*.json"))) == 1


def test_deleted_data_dir_entry_removed(tmp_path: Path, registry: Path) -> None:
    deleted_dir = with_claim(tmp_path / "deleted")
    register_pool(entry(deleted_dir), registry)
    shutil.rmtree(deleted_dir)

    register_pool(entry(tmp_path / "second"), registry)

    recorded = [json.loads(path.read_text()) for path in registry.glob("*.json")]
    assert [record["address_dir"] for record in recorded] == [
        str((tmp_path / "second" / "addresses").resolve())
    ]


def test_unreadable_entry_ignored(tmp_path: Path, registry: Path) -> None:
    registry.mkdir()
    (registry / "broken.json").write_text("{not json")

    register_pool(entry(tmp_path / "first"), registry)

    assert (registry / "broken.json").exists()
