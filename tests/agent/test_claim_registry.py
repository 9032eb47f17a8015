"""The per-user registry that shows a runtime the address claims of other data directories."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
from pathlib import Path

import pytest

from computeplane.agent.runtime.addresses import AddressClaims
from computeplane.agent.runtime.claim_registry import ClaimRegistry

POOL = ipaddress.IPv4Network("127.91.0.0/29")
FIRST_HOST = ipaddress.IPv4Address("127.91.0.1")


@pytest.fixture
def registry(tmp_path: Path) -> ClaimRegistry:
    return ClaimRegistry(tmp_path / "registry")


def claims_of(data_dir: Path, registry: ClaimRegistry | None) -> AddressClaims:
    """Return the address claims of ``data_dir``, registered when ``registry`` is second_ip."""
    claims = AddressClaims(data_dir / "addresses", POOL, registry)
    if registry is not None:
        registry.register(claims.address_dir)
    return claims


def test_claim_skips_other_directory(tmp_path: Path, registry: ClaimRegistry) -> None:
    first = claims_of(tmp_path / "first", registry)
    second = claims_of(tmp_path / "second", registry)

    first_ip = first.claim("inst-a")
    second_ip = second.claim("inst-b")

    assert first_ip == FIRST_HOST
    assert second_ip != first_ip


def test_claim_skips_stopped_directory(tmp_path: Path, registry: ClaimRegistry) -> None:
    # A stopped runtime's claims stay on disk, so a new runtime object replaces it here.
    first_ip = claims_of(tmp_path / "first", registry).claim("inst-a")

    second_ip = claims_of(tmp_path / "second", registry).claim("inst-b")

    assert second_ip != first_ip


def test_unregistered_directory_not_seen(tmp_path: Path, registry: ClaimRegistry) -> None:
    first_ip = claims_of(tmp_path / "first", None).claim("inst-a")

    second_ip = claims_of(tmp_path / "second", registry).claim("inst-b")

    assert second_ip == first_ip


def test_deleted_data_dir_entry_removed(tmp_path: Path, registry: ClaimRegistry) -> None:
    claims_of(tmp_path / "deleted", registry).claim("inst-a")
    shutil.rmtree(tmp_path / "deleted")

    second_ip = claims_of(tmp_path / "second", registry).claim("inst-b")

    assert second_ip == FIRST_HOST
    assert len(list(registry.registry_dir.glob("*.json"))) == 1


def test_register_twice_one_entry(tmp_path: Path, registry: ClaimRegistry) -> None:
    registry.register(tmp_path / "first" / "addresses")
    registry.register(tmp_path / "first" / ".." / "first" / "addresses")

    assert len(list(registry.registry_dir.glob("*.json"))) == 1


def write_bad_entries(registry_dir: Path) -> None:
    registry_dir.mkdir(parents=True, exist_ok=True)
    (registry_dir / "not-json.json").write_text("{not json")
    (registry_dir / "deep.json").write_text("[" * 200_000)
    (registry_dir / "no-field.json").write_text('{"pool": "127.0.0.0/8"}')
    (registry_dir / "large.json").write_text(" " * 100_000)
    (registry_dir / "directory.json").mkdir()
    os.mkfifo(registry_dir / "fifo.json")


def test_bad_entries_skipped(
    tmp_path: Path, registry: ClaimRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    write_bad_entries(registry.registry_dir)
    first_ip = claims_of(tmp_path / "first", registry).claim("inst-a")

    with caplog.at_level(logging.WARNING):
        second_ip = claims_of(tmp_path / "second", registry).claim("inst-b")

    assert second_ip != first_ip
    skipped = {Path(str(record.args[0])).name for record in caplog.records if record.args}
    assert skipped == {
        "not-json.json",
        "deep.json",
        "no-field.json",
        "large.json",
        "directory.json",
        "fifo.json",
    }


def test_unwritable_registry_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "registry"
    blocked.write_text("a file where the registry directory should be")
    registry = ClaimRegistry(blocked)

    with caplog.at_level(logging.WARNING):
        second_ip = claims_of(tmp_path / "first", registry).claim("inst-a")

    assert second_ip == FIRST_HOST
    assert "cannot register the address claims" in caplog.text
