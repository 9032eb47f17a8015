"""Idempotent creates through the HTTP API: ``Idempotency-Key`` on POST /v1/compute/instances.

Every test runs on SQLite and PostgreSQL and checks the stored rows as well as the
responses, because an idempotency bug shows as a second instance or a leaked GPU.
"""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from computeplane.domain.clock import utcnow
from computeplane.services.context import ServiceContext
from computeplane.services.idempotency import fingerprint
from computeplane.store.database import Database
from computeplane.store.models import IdempotencyRecord, Instance, Node, Organization
from conftest import KEYS_DIR, Keys, add_nodes, node

ENDPOINT = "/v1/compute/instances"
KEY = "create-7f3c2a9e"
ONE_GPU = "gpu_1x_h100_sxm5"
EIGHT_GPUS = "gpu_8x_h100_sxm5"
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture
def base_body(ed25519_key: str) -> dict[str, Any]:
    return {"instance_type": ONE_GPU, "ssh_key": ed25519_key}


def headers(api_key: str, idempotency_key: str | None = None) -> dict[str, str]:
    result = Keys.header(api_key)
    if idempotency_key is not None:
        result["Idempotency-Key"] = idempotency_key
    return result


async def create(
    api: httpx.AsyncClient, api_key: str, body: dict[str, Any], idempotency_key: str | None
) -> httpx.Response:
    return await api.post(ENDPOINT, json=body, headers=headers(api_key, idempotency_key))


async def instance_rows(database: Database) -> list[Instance]:
    async with database.read() as session:
        return list((await session.execute(select(Instance))).unique().scalars().all())


async def idempotency_rows(database: Database) -> list[IdempotencyRecord]:
    async with database.read() as session:
        return list((await session.execute(select(IdempotencyRecord))).scalars().all())


async def used_gpus(database: Database) -> int:
    """Return the GPUs held across all nodes, from the nodes' free counters."""
    async with database.read() as session:
        used = await session.scalar(select(func.sum(Node.gpu_count - Node.gpus_free)))
    return int(used or 0)


async def organization_id(database: Database, name: str) -> int:
    async with database.read() as session:
        found = await session.scalar(select(Organization.id).where(Organization.name == name))
    assert found is not None
    return int(found)


async def listed_ids(api: httpx.AsyncClient, api_key: str) -> list[str]:
    response = await api.get(ENDPOINT, headers=Keys.header(api_key))
    assert response.status_code == 200, response.text
    return [item["id"] for item in response.json()["instances"]]


async def insert_reservation(
    database: Database,
    organization: str,
    key: str,
    body: dict[str, Any],
    lease_expires_at: datetime,
) -> None:
    """Store an ``in_flight`` reservation as a holder that never completed would leave it."""
    async with database.write() as session:
        session.add(
            IdempotencyRecord(
                organization_id=await organization_id(database, organization),
                key=key,
                fingerprint=fingerprint(body),
                state="in_flight",
                owner_token="token-of-another-holder",
                lease_expires_at=lease_expires_at,
                created_at=utcnow() - timedelta(seconds=30),
            )
        )


def error_code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


async def test_creates_without_key_not_deduplicated(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))

    first = await create(api, keys.a, base_body, None)
    second = await create(api, keys.a, base_body, None)

    assert first.status_code == 201, first.text
    assert second.status_code == 201, second.text
    assert first.json()["id"] != second.json()["id"]
    assert len(await instance_rows(context.database)) == 2
    assert await idempotency_rows(context.database) == []


async def test_concurrent_creates_one_instance(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"), node("n2"))
    gpus_before = await used_gpus(context.database)

    responses = await asyncio.gather(*(create(api, keys.a, base_body, KEY) for _ in range(20)))

    created = [response for response in responses if response.status_code == 201]
    in_flight = [response for response in responses if response.status_code == 409]
    statuses = sorted(response.status_code for response in responses)
    assert len(created) + len(in_flight) == 20, statuses
    assert created, statuses
    assert len({response.content for response in created}) == 1
    instance_id = created[0].json()["id"]
    assert all(response.json()["id"] == instance_id for response in created)
    not_replayed = [item for item in created if "Idempotent-Replayed" not in item.headers]
    assert len(not_replayed) == 1
    for response in in_flight:
        assert error_code(response) == "idempotency_request_in_flight"
        assert int(response.headers["Retry-After"]) >= 1

    rows = await instance_rows(context.database)
    assert [row.public_id for row in rows] == [instance_id]
    assert await listed_ids(api, keys.a) == [instance_id]
    assert await used_gpus(context.database) == gpus_before + 1


async def test_reused_key_other_body_rejected(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    # Two free nodes, so the 8x create would be placed if the key allowed it.
    await add_nodes(context.database, node("n1"), node("n2"), node("n3"))
    first = await create(api, keys.a, base_body, KEY)
    assert first.status_code == 201, first.text
    gpus_after_first = await used_gpus(context.database)

    reused = await create(api, keys.a, {**base_body, "instance_type": EIGHT_GPUS}, KEY)

    assert reused.status_code == 422, reused.text
    assert reused.json()["error"]["type"] == "validation_error"
    assert error_code(reused) == "idempotency_key_reused"
    assert "Idempotent-Replayed" not in reused.headers
    rows = await instance_rows(context.database)
    assert [row.public_id for row in rows] == [first.json()["id"]]
    assert rows[0].instance_type == ONE_GPU
    assert await used_gpus(context.database) == gpus_after_first
    again = await api.get(f"{ENDPOINT}/{first.json()['id']}", headers=Keys.header(keys.a))
    assert again.json() == first.json()


async def test_replay_ignores_key_order_and_spacing(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("n1"))
    compact = json.dumps({"instance_type": ONE_GPU, "ssh_key": ed25519_key}).encode()
    reordered = (
        '\n{\n  "ssh_key" :  ' + json.dumps(ed25519_key) + ",\r\n\t"
        '"instance_type":"' + ONE_GPU + '"   }\n'
    ).encode()
    assert json.loads(compact) == json.loads(reordered)
    first_headers = {**headers(keys.a, KEY), **JSON_HEADERS}

    first = await api.post(ENDPOINT, content=compact, headers=first_headers)
    replay = await api.post(ENDPOINT, content=reordered, headers=first_headers)

    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert len(await instance_rows(context.database)) == 1


async def test_keys_scoped_per_organization(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"), node("n2"), node("n3"))
    of_a = await create(api, keys.a, base_body, KEY)
    assert of_a.status_code == 201, of_a.text
    id_of_a = of_a.json()["id"]

    of_b = await create(api, keys.b, base_body, KEY)
    reused_by_b = await create(api, keys.b, {**base_body, "instance_type": EIGHT_GPUS}, KEY)

    assert of_b.status_code == 201, of_b.text
    assert "Idempotent-Replayed" not in of_b.headers
    assert of_b.json()["id"] != id_of_a
    assert of_b.json()["creator_user_nickname"] == "bob"
    assert id_of_a not in of_b.text
    assert reused_by_b.status_code == 422, reused_by_b.text
    assert error_code(reused_by_b) == "idempotency_key_reused"
    assert id_of_a not in reused_by_b.text
    assert await listed_ids(api, keys.b) == [of_b.json()["id"]]
    assert await listed_ids(api, keys.a) == [id_of_a]
    assert len(await idempotency_rows(context.database)) == 2


async def test_other_org_body_not_compared(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"), node("n2"))
    of_a = await create(api, keys.a, base_body, KEY)
    assert of_a.status_code == 201, of_a.text

    of_b = await create(api, keys.b, {**base_body, "instance_type": EIGHT_GPUS}, KEY)

    assert of_b.status_code == 201, of_b.text
    assert of_b.json()["instance_type"] == EIGHT_GPUS
    assert of_a.json()["id"] not in of_b.text


async def fill_only_node(api: httpx.AsyncClient, context: ServiceContext, keys: Keys) -> None:
    """Register one node and occupy all its GPUs with an 8x instance of org B."""
    await add_nodes(context.database, node("n1"))
    body = {"instance_type": EIGHT_GPUS, "ssh_key": (KEYS_DIR / "ecdsa256.pub").read_text()}
    filler = await create(api, keys.b, body, None)
    assert filler.status_code == 201, filler.text


@pytest.mark.parametrize("fleet", ["no-nodes", "nodes-full"])
async def test_capacity_failure_leaves_key_unbound(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    base_body: dict[str, Any],
    fleet: str,
) -> None:
    if fleet == "nodes-full":
        await fill_only_node(api, context, keys)
    instances_before = len(await instance_rows(context.database))

    failed = await create(api, keys.a, base_body, KEY)

    assert failed.status_code == 503, failed.text
    assert error_code(failed) == "insufficient_capacity"
    assert "Retry-After" in failed.headers
    assert await idempotency_rows(context.database) == []
    assert len(await instance_rows(context.database)) == instances_before

    await add_nodes(context.database, node("n9"))
    retried = await create(api, keys.a, base_body, KEY)
    replayed = await create(api, keys.a, base_body, KEY)

    assert retried.status_code == 201, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    assert replayed.content == retried.content
    assert len(await instance_rows(context.database)) == instances_before + 1
    assert await listed_ids(api, keys.a) == [retried.json()["id"]]


async def test_invalid_body_leaves_key_unbound(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))

    failed = await create(api, keys.a, {**base_body, "ssh_key": "ssh-ed25519 not-base64"}, KEY)

    assert failed.status_code == 400, failed.text
    assert error_code(failed) == "invalid_ssh_key"
    assert await idempotency_rows(context.database) == []

    corrected = await create(api, keys.a, base_body, KEY)

    assert corrected.status_code == 201, corrected.text
    assert "Idempotent-Replayed" not in corrected.headers
    assert len(await instance_rows(context.database)) == 1


@pytest.mark.parametrize("same_body", [True, False], ids=["same-body", "other-body"])
async def test_expired_reservation_taken_over(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    base_body: dict[str, Any],
    same_body: bool,
) -> None:
    await add_nodes(context.database, node("n1"))
    held_body = base_body if same_body else {**base_body, "instance_type": EIGHT_GPUS}
    expired = utcnow() - timedelta(seconds=5)
    await insert_reservation(context.database, "org-a", KEY, held_body, expired)

    retried = await create(api, keys.a, base_body, KEY)

    assert retried.status_code == 201, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    rows = await instance_rows(context.database)
    assert [row.public_id for row in rows] == [retried.json()["id"]]
    (record,) = await idempotency_rows(context.database)
    assert record.state == "completed"
    assert record.fingerprint == fingerprint(base_body)
    assert record.response_body == retried.content


async def test_live_reservation_returns_409(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))
    live = utcnow() + timedelta(seconds=60)
    await insert_reservation(context.database, "org-a", KEY, base_body, live)

    retried = await create(api, keys.a, base_body, KEY)

    assert retried.status_code == 409, retried.text
    assert retried.json()["error"]["type"] == "validation_error"
    assert error_code(retried) == "idempotency_request_in_flight"
    assert int(retried.headers["Retry-After"]) >= 1
    assert await instance_rows(context.database) == []
    (record,) = await idempotency_rows(context.database)
    assert record.state == "in_flight"
    assert record.owner_token == "token-of-another-holder"


async def test_in_flight_other_body_rejected(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))
    live = utcnow() + timedelta(seconds=60)
    await insert_reservation(context.database, "org-a", KEY, base_body, live)

    other = await create(api, keys.a, {**base_body, "instance_type": EIGHT_GPUS}, KEY)

    assert other.status_code == 422, other.text
    assert error_code(other) == "idempotency_key_reused"
    assert await instance_rows(context.database) == []
    (record,) = await idempotency_rows(context.database)
    assert record.fingerprint == fingerprint(base_body)


async def test_max_length_key_accepted(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))
    key = "k" * 255

    first = await create(api, keys.a, base_body, key)
    replay = await create(api, keys.a, base_body, key)

    assert first.status_code == 201, first.text
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert replay.content == first.content


INVALID_KEY_HEADERS: dict[str, list[bytes]] = {
    "empty": [b""],
    "only-spaces": [b"   "],
    "too-long": [b"k" * 256],
    "tab-inside": [b"abc\tdef"],
    "space-inside": [b"abc def"],
    "non-ascii-utf8": ["caf\u00e9".encode()],
    "non-ascii-latin1": [b"caf\xe9"],
    "two-headers": [b"key-1", b"key-2"],
    "two-equal-headers": [b"key-1", b"key-1"],
}


@pytest.mark.parametrize("values", INVALID_KEY_HEADERS.values(), ids=INVALID_KEY_HEADERS.keys())
async def test_invalid_key_header_rejected(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    base_body: dict[str, Any],
    values: list[bytes],
) -> None:
    await add_nodes(context.database, node("n1"))
    raw_headers = [
        (b"Authorization", f"Key {keys.a}".encode()),
        (b"Content-Type", b"application/json"),
    ]
    raw_headers += [(b"Idempotency-Key", value) for value in values]

    response = await api.post(ENDPOINT, content=json.dumps(base_body), headers=raw_headers)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "validation_error"
    assert error_code(response) == "invalid_idempotency_key"
    assert await idempotency_rows(context.database) == []
    assert await instance_rows(context.database) == []


async def test_replay_after_delete(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))
    first = await create(api, keys.a, base_body, KEY)
    assert first.status_code == 201, first.text
    instance_id = first.json()["id"]
    deleted = await api.delete(f"{ENDPOINT}/{instance_id}", headers=Keys.header(keys.a))
    assert deleted.status_code == 204
    gpus_after_delete = await used_gpus(context.database)

    replay = await create(api, keys.a, base_body, KEY)

    assert replay.status_code == 201, replay.text
    assert replay.content == first.content
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert len(await instance_rows(context.database)) == 1
    assert await used_gpus(context.database) == gpus_after_delete
    assert await listed_ids(api, keys.a) == []
    gone = await api.get(f"{ENDPOINT}/{instance_id}", headers=Keys.header(keys.a))
    assert gone.status_code == 404


async def test_retention_expired_creates_new(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))
    first = await create(api, keys.a, base_body, KEY)
    assert first.status_code == 201, first.text
    retention = timedelta(seconds=context.settings.idempotency_ttl_seconds)
    async with context.database.write() as session:
        await session.execute(
            update(IdempotencyRecord).values(
                completed_at=utcnow() - retention - timedelta(seconds=1)
            )
        )

    repeat = await create(api, keys.a, base_body, KEY)
    replay = await create(api, keys.a, base_body, KEY)

    assert repeat.status_code == 201, repeat.text
    assert "Idempotent-Replayed" not in repeat.headers
    assert repeat.json()["id"] != first.json()["id"]
    assert len(await instance_rows(context.database)) == 2
    assert replay.content == repeat.content
    assert replay.headers.get("Idempotent-Replayed") == "true"


async def test_within_retention_replays(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, base_body: dict[str, Any]
) -> None:
    await add_nodes(context.database, node("n1"))
    first = await create(api, keys.a, base_body, KEY)
    assert first.status_code == 201, first.text
    retention = timedelta(seconds=context.settings.idempotency_ttl_seconds)
    async with context.database.write() as session:
        await session.execute(
            update(IdempotencyRecord).values(
                completed_at=utcnow() - retention + timedelta(seconds=60)
            )
        )

    replay = await create(api, keys.a, base_body, KEY)

    assert replay.content == first.content
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert len(await instance_rows(context.database)) == 1
