"""Listing instances: page size, newest-first order, cursors and the shape of each item.

Pages hold ``limit`` instances (50 by default, at most 100), newest first. ``next_cursor``
is an opaque keyset position, null on the last page, and a cursor this server did not issue
to the caller's organization is a 400, never a 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from computeplane.services.context import ServiceContext
from computeplane.store.models import Organization
from conftest import Keys, add_nodes, node

INSTANCES = "/v1/compute/instances"


def assert_error(response: httpx.Response, status: int, error_type: str, code: str) -> None:
    """Check the status, the error envelope and that its request id matches the header."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type, error
    assert error["code"] == code, error
    assert error["message"], error
    assert error["request_id"] == response.headers["X-Request-Id"], error


async def add_fleet(context: ServiceContext, gpus: int) -> None:
    """Register enough 8-GPU nodes for ``gpus`` one-GPU instances."""
    count = -(-gpus // 8)
    await add_nodes(context.database, *(node(f"n{index}") for index in range(count)))


async def create_instances(
    api: httpx.AsyncClient, key: str, ssh_key: str, count: int
) -> list[str]:
    """Create ``count`` one-GPU instances one after another and return their ids, oldest first."""
    body = {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ssh_key}
    ids: list[str] = []
    for _ in range(count):
        response = await api.post(INSTANCES, json=body, headers=Keys.header(key))
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    return ids


async def list_page(
    api: httpx.AsyncClient, key: str, **params: Any
) -> tuple[list[str], dict[str, Any]]:
    response = await api.get(INSTANCES, params=params, headers=Keys.header(key))
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return [item["id"] for item in body["instances"]], body


async def delete(api: httpx.AsyncClient, key: str, instance_id: str) -> None:
    response = await api.delete(f"{INSTANCES}/{instance_id}", headers=Keys.header(key))
    assert response.status_code == 204, response.text


async def list_remaining(
    api: httpx.AsyncClient, key: str, cursor: str | None, limit: int
) -> list[str]:
    """Follow ``cursor`` to the last page and return every id seen on the way."""
    ids: list[str] = []
    pages = 0
    while cursor is not None:
        page, body = await list_page(api, key, limit=limit, cursor=cursor)
        ids.extend(page)
        cursor = body["next_cursor"]
        pages += 1
        assert pages < 100, "the cursor never reaches a last page"
    return ids


async def test_default_page_newest_first(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 55)
    created = await create_instances(api, keys.a, ed25519_key, 55)

    first, body = await list_page(api, keys.a)
    second, last = await list_page(api, keys.a, cursor=body["next_cursor"])

    newest_first = list(reversed(created))
    assert first == newest_first[:50]
    assert body["has_more"] is True
    assert second == newest_first[50:]
    assert last["has_more"] is False
    assert last["next_cursor"] is None


async def test_limit_pages_through_all(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 25)
    created = await create_instances(api, keys.a, ed25519_key, 25)

    pages: list[list[str]] = []
    bodies: list[dict[str, Any]] = []
    cursor: str | None = None
    for _ in range(3):
        params = {"limit": 10} if cursor is None else {"limit": 10, "cursor": cursor}
        page, body = await list_page(api, keys.a, **params)
        pages.append(page)
        bodies.append(body)
        cursor = body["next_cursor"]

    assert [len(page) for page in pages] == [10, 10, 5]
    assert [item for page in pages for item in page] == list(reversed(created))
    assert [body["has_more"] for body in bodies] == [True, True, False]
    assert isinstance(bodies[0]["next_cursor"], str)
    assert isinstance(bodies[1]["next_cursor"], str)
    assert "next_cursor" in bodies[2]
    assert bodies[2]["next_cursor"] is None


async def test_exact_page_ends_listing(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 10)
    created = await create_instances(api, keys.a, ed25519_key, 10)

    page, body = await list_page(api, keys.a, limit=10)

    assert page == list(reversed(created))
    assert body["has_more"] is False
    assert body["next_cursor"] is None


async def test_limit_above_max_capped(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 104)
    created = await create_instances(api, keys.a, ed25519_key, 101)
    newest_first = list(reversed(created))

    for limit in (100, 101, 1000, 10**20):
        page, body = await list_page(api, keys.a, limit=limit)
        assert len(page) == 100, f"limit={limit}"
        assert page == newest_first[:100], f"limit={limit}"
        assert body["has_more"] is True, f"limit={limit}"
    rest, last = await list_page(api, keys.a, limit=1000, cursor=body["next_cursor"])
    assert rest == newest_first[100:]
    assert last["next_cursor"] is None


async def test_empty_listing_shape(api: httpx.AsyncClient, keys: Keys) -> None:
    page, body = await list_page(api, keys.a)

    assert page == []
    assert body == {"instances": [], "next_cursor": None, "has_more": False}


@pytest.mark.parametrize("limit", ["0", "-1", "abc", "", "1.5"])
async def test_invalid_limit_is_400(limit: str, api: httpx.AsyncClient, keys: Keys) -> None:
    response = await api.get(INSTANCES, params={"limit": limit}, headers=Keys.header(keys.a))

    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "validation_error"
    assert response.json()["error"]["request_id"] == response.headers["X-Request-Id"]


async def test_cursor_stable_under_changes(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 28)
    created = await create_instances(api, keys.a, ed25519_key, 25)
    first, body = await list_page(api, keys.a, limit=10)
    # The last instance of the page is the cursor's anchor; deleting it must not matter.
    deleted = [first[-1], first[0]]

    added = await create_instances(api, keys.a, ed25519_key, 3)
    for instance_id in deleted:
        await delete(api, keys.a, instance_id)
    rest = await list_remaining(api, keys.a, body["next_cursor"], limit=10)

    seen = first + rest
    throughout = [instance_id for instance_id in created if instance_id not in deleted]
    skipped = [instance_id for instance_id in throughout if instance_id not in seen]
    repeated = {instance_id for instance_id in seen if seen.count(instance_id) > 1}
    assert skipped == []
    assert repeated == set()
    assert not set(added) & set(rest), "instances created after page 1 belong before it"


async def test_cursor_skips_deleted_unseen(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 25)
    created = await create_instances(api, keys.a, ed25519_key, 25)
    first, body = await list_page(api, keys.a, limit=10)
    unseen = [instance_id for instance_id in created if instance_id not in first]
    deleted = [unseen[0], unseen[-1]]

    for instance_id in deleted:
        await delete(api, keys.a, instance_id)
    rest = await list_remaining(api, keys.a, body["next_cursor"], limit=10)

    assert rest == [instance_id for instance_id in reversed(unseen) if instance_id not in deleted]


def encode_cursor(payload: bytes) -> str:
    return base64.urlsafe_b64encode(payload).decode().rstrip("=")


def invalid_cursors(valid: str, organization_tag: str) -> dict[str, str]:
    """Cursors that this server never issued to the caller, by case name."""

    def as_json(value: Any) -> str:
        return encode_cursor(json.dumps(value).encode())

    return {
        "not_base64": "!!not*base64!!",
        "non_ascii": "ÿþcursor",
        "padding_inside": "ab=cd",
        "garbage_bytes": encode_cursor(b"\xff\xfe\x00\x13garbage\x80"),
        "json_list": as_json([1, 2]),
        "json_string": as_json("cursor"),
        "json_number": as_json(12),
        "missing_id": as_json({"o": organization_tag}),
        "extra_key": as_json({"o": organization_tag, "i": 1, "x": 1}),
        "string_id": as_json({"o": organization_tag, "i": "1"}),
        "bool_id": as_json({"o": organization_tag, "i": True}),
        "float_id": as_json({"o": organization_tag, "i": 1.5}),
        "zero_id": as_json({"o": organization_tag, "i": 0}),
        "negative_id": as_json({"o": organization_tag, "i": -5}),
        "null_tag": as_json({"o": None, "i": 1}),
        "wrong_tag": as_json({"o": "0" * 12, "i": 1}),
        "truncated": valid[:-3],
        "huge": "A" * 20000,
        "huge_valid_prefix": valid + "A" * 4000,
    }


def organization_tag(organization_id: int) -> str:
    """Return the organization tag a cursor carries, computed as the server computes it."""
    return hashlib.sha256(f"computeplane-org:{organization_id}".encode()).hexdigest()[:12]


async def organization_id(context: ServiceContext, name: str) -> int:
    async with context.database.read() as session:
        query = select(Organization.id).where(Organization.name == name)
        return int((await session.execute(query)).scalar_one())


CURSOR_CASES = list(invalid_cursors("A" * 40, "tag"))


@pytest.mark.parametrize("case", CURSOR_CASES)
async def test_invalid_cursor_is_400(
    case: str, api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 3)
    await create_instances(api, keys.a, ed25519_key, 3)
    _, body = await list_page(api, keys.a, limit=1)
    tag = organization_tag(await organization_id(context, "org-a"))
    cursor = invalid_cursors(body["next_cursor"], tag)[case]

    response = await api.get(INSTANCES, params={"cursor": cursor}, headers=Keys.header(keys.a))

    assert_error(response, 400, "validation_error", "invalid_cursor")


@pytest.mark.parametrize("instance_id", [2**63, 10**30], ids=["int64_max_plus_1", "1e30"])
async def test_out_of_range_cursor_is_400(
    instance_id: int,
    api: httpx.AsyncClient,
    keys: Keys,
    context: ServiceContext,
) -> None:
    # The organization tag is derived from the organization's id alone, so a client can
    # forge a cursor with the right tag and an id outside the BIGINT range.
    tag = organization_tag(await organization_id(context, "org-a"))
    cursor = encode_cursor(json.dumps({"o": tag, "i": instance_id}).encode())

    response = await api.get(INSTANCES, params={"cursor": cursor}, headers=Keys.header(keys.a))

    assert_error(response, 400, "validation_error", "invalid_cursor")


async def test_foreign_cursor_is_400(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 6)
    await create_instances(api, keys.a, ed25519_key, 3)
    await create_instances(api, keys.b, ed25519_key, 3)
    _, body_a = await list_page(api, keys.a, limit=1)

    response = await api.get(
        INSTANCES, params={"cursor": body_a["next_cursor"]}, headers=Keys.header(keys.b)
    )

    assert_error(response, 400, "validation_error", "invalid_cursor")


async def test_deleted_instance_gone_at_once(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 3)
    created = await create_instances(api, keys.a, ed25519_key, 3)
    target = created[1]

    await delete(api, keys.a, target)

    got = await api.get(f"{INSTANCES}/{target}", headers=Keys.header(keys.a))
    assert_error(got, 404, "not_found", "instance_not_found")
    listed, _ = await list_page(api, keys.a)
    assert listed == [created[2], created[0]]


async def test_pending_instance_omits_absent_fields(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_fleet(context, 1)
    body = {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ed25519_key}
    created = await api.post(INSTANCES, json=body, headers=Keys.header(keys.a))
    instance_id = created.json()["id"]
    got = await api.get(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    _, listed = await list_page(api, keys.a)
    shapes = {"create": created.json(), "get": got.json(), "list": listed["instances"][0]}

    for name, item in shapes.items():
        assert item["status"] == "pending", name
        assert "ip" not in item, f"{name}: {item}"
        assert "ssh_port" not in item, f"{name}: {item}"
        assert "sector" not in item, f"{name}: {item}"
        nulls = [field for field, value in item.items() if value is None]
        assert nulls == [], f"{name}: null fields {nulls}"
        assert item["instance_type"] == "gpu_1x_h100_sxm5", name
        assert item["region"] == "us-west", name
    assert shapes["get"] == shapes["list"]
