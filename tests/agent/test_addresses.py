"""Tests of the address claim files shared by the local runtimes of one machine."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

import pytest

from computeplane.agent.runtime.addresses import AddressClaims
from computeplane.domain.errors import RuntimeFailure

POOL = ipaddress.IPv4Network("127.78.5.0/29")


def address(text: str) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(text)


@pytest.fixture
def claims(tmp_path: Path) -> AddressClaims:
    return AddressClaims(tmp_path / "addresses", POOL)


def test_claim_hands_out_hosts_in_order(claims: AddressClaims) -> None:
    first = claims.claim("inst-a")
    second = claims.claim("inst-b")

    assert first == address("127.78.5.1")
    assert second == address("127.78.5.2")
    assert (claims.address_dir / "127.78.5.1").read_text() == "inst-a"
    assert (claims.address_dir / "127.78.5.2").read_text() == "inst-b"


def test_claim_skips_network_and_broadcast(claims: AddressClaims) -> None:
    handed_out = [claims.claim(f"inst-{index}") for index in range(6)]

    assert address("127.78.5.0") not in handed_out
    assert address("127.78.5.7") not in handed_out
    assert handed_out == list(POOL.hosts())


def test_claim_honours_exclude(claims: AddressClaims) -> None:
    ip = claims.claim("inst-a", exclude=[address("127.78.5.1"), address("127.78.5.2")])

    assert ip == address("127.78.5.3")


def test_claim_skips_addresses_claimed_by_others(claims: AddressClaims, tmp_path: Path) -> None:
    other = AddressClaims(claims.address_dir, POOL)
    other.claim("other-a")

    assert claims.claim("inst-a") == address("127.78.5.2")


def test_exhausted_pool_raises(claims: AddressClaims) -> None:
    for index in range(6):
        claims.claim(f"inst-{index}")

    with pytest.raises(RuntimeFailure, match=r"No free address in the local address pool"):
        claims.claim("inst-late")

    assert sorted(p.name for p in claims.address_dir.iterdir()) == [str(ip) for ip in POOL.hosts()]


def test_concurrent_claims_never_share(tmp_path: Path) -> None:
    pool = ipaddress.IPv4Network("127.78.6.0/24")
    results: dict[str, ipaddress.IPv4Address] = {}
    barrier = threading.Barrier(16)

    def claim(instance_id: str) -> None:
        # Each thread has its own AddressClaims, like separate runtimes on one machine.
        own_claims = AddressClaims(tmp_path / "addresses", pool)
        barrier.wait()
        results[instance_id] = own_claims.claim(instance_id)

    threads = [threading.Thread(target=claim, args=(f"inst-{index}",)) for index in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 16
    assert len(set(results.values())) == 16


def test_release_ignores_other_owner(claims: AddressClaims) -> None:
    ip = claims.claim("inst-a")

    claims.release(ip, "inst-b")

    assert claims.owner(ip) == "inst-a"


def test_release_is_repeatable(claims: AddressClaims) -> None:
    ip = claims.claim("inst-a")

    claims.release(ip, "inst-a")
    claims.release(ip, "inst-a")

    assert claims.owner(ip) is None


def test_release_all_drops_only_own_claims(claims: AddressClaims) -> None:
    claims.claim("inst-a")
    kept_ip = claims.claim("inst-b")
    claims.claim("inst-a")
    (claims.address_dir / "not-an-address").write_text("inst-a")

    claims.release_all("inst-a")

    assert sorted(p.name for p in claims.address_dir.iterdir()) == [str(kept_ip), "not-an-address"]


def test_release_all_without_directory(tmp_path: Path) -> None:
    AddressClaims(tmp_path / "missing", POOL).release_all("inst-a")


def test_reclaim_recreates_missing_claim(claims: AddressClaims) -> None:
    ip = address("127.78.5.4")

    claims.reclaim(ip, "inst-a")
    claims.reclaim(ip, "inst-a")

    assert claims.owner(ip) == "inst-a"


def test_reclaim_rejects_address_of_other_instance(claims: AddressClaims) -> None:
    ip = claims.claim("inst-b")

    with pytest.raises(RuntimeFailure, match="claimed by instance inst-b"):
        claims.reclaim(ip, "inst-a")


def test_released_address_reused_last(claims: AddressClaims) -> None:
    first = claims.claim("inst-a")
    claims.claim("inst-b")
    claims.release(first, "inst-a")

    assert claims.claim("inst-c") == address("127.78.5.3")


def test_rotation_wraps_to_released(claims: AddressClaims) -> None:
    handed_out = [claims.claim(f"inst-{index}") for index in range(6)]
    claims.release(handed_out[1], "inst-1")

    assert claims.claim("inst-new") == handed_out[1]
