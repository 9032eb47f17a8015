"""Authentication, authorization, organization isolation and secrecy of API keys.

Every endpoint of ``/v1/compute/instances`` takes an ``Authorization: Key <key_id>:<secret>``
header from an admin key of an organization with compute permission. Anything else is a 401
or a 403 in the error envelope, and another organization's instances look like missing ones.
"""

from __future__ import annotations

import hashlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from computeplane.services import accounts
from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import ApiKey, Base, Instance
from conftest import Keys, add_nodes, make_key, node

INSTANCES = "/v1/compute/instances"
CREATE_BODY_TYPE = "gpu_1x_h100_sxm5"

HeaderList = Sequence[tuple[bytes, bytes]]


def key_id_of(key: str) -> str:
    return key.partition(":")[0]


def secret_of(key: str) -> str:
    return key.partition(":")[2]


def raw_headers(*values: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", value) for value in values]


def assert_error(response: httpx.Response, status: int, error_type: str, code: str) -> None:
    """Check the status, the error envelope and that its request id matches the header."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == error_type, error
    assert error["code"] == code, error
    assert error["message"], error
    assert error["request_id"] == response.headers["X-Request-Id"], error


async def create_instance(api: httpx.AsyncClient, key: str, ssh_key: str) -> str:
    body = {"instance_type": CREATE_BODY_TYPE, "ssh_key": ssh_key}
    response = await api.post(INSTANCES, json=body, headers=Keys.header(key))
    assert response.status_code == 201, response.text
    instance_id: str = response.json()["id"]
    return instance_id


async def count_instances(database: Database) -> int:
    async with database.read() as session:
        return int(await session.scalar(select(func.count()).select_from(Instance)) or 0)


async def call_every_endpoint(
    api: httpx.AsyncClient, headers: HeaderList, instance_id: str, ssh_key: str
) -> dict[str, httpx.Response]:
    """Send one request to each public endpoint with the given raw headers."""
    body = {"instance_type": CREATE_BODY_TYPE, "ssh_key": ssh_key}
    return {
        "create": await api.post(INSTANCES, json=body, headers=list(headers)),
        "list": await api.get(INSTANCES, headers=list(headers)),
        "get": await api.get(f"{INSTANCES}/{instance_id}", headers=list(headers)),
        "delete": await api.delete(f"{INSTANCES}/{instance_id}", headers=list(headers)),
    }


def bad_authorization_cases(valid_key: str) -> dict[str, HeaderList]:
    """Authorization headers that must all fail with 401, by case name."""
    key_id = key_id_of(valid_key)
    unknown = f"{uuid.uuid4()}:{'ab' * 32}"
    return {
        "missing": [],
        "scheme_only": raw_headers(b"Key"),
        "scheme_and_spaces": raw_headers(b"Key    "),
        "bearer_scheme": raw_headers(f"Bearer {valid_key}".encode()),
        "basic_scheme": raw_headers(b"Basic YWxpY2U6c2VjcmV0"),
        "unknown_key": raw_headers(f"Key {unknown}".encode()),
        "wrong_secret": raw_headers(f"Key {key_id}:{'0' * 64}".encode()),
        "no_separator": raw_headers(f"Key {key_id}{secret_of(valid_key)}".encode()),
        "empty_secret": raw_headers(f"Key {key_id}:".encode()),
        "empty_key_id": raw_headers(f"Key :{secret_of(valid_key)}".encode()),
        "two_headers": raw_headers(f"Key {valid_key}".encode(), f"Key {valid_key}".encode()),
        "non_ascii_bytes": raw_headers(b"Key abc:\xff\xfe"),
        "non_ascii_secret": raw_headers(f"Key {key_id}:".encode() + b"\xff\xfe"),
        "utf8_secret": raw_headers(f"Key {key_id}:{secret_of(valid_key)}é".encode()),
        "long_key_id": raw_headers(f"Key {'a' * 200}:{secret_of(valid_key)}".encode()),
        "ten_kilobyte_key": raw_headers(f"Key {key_id}:{'a' * 10240}".encode()),
        "space_inside_credentials": raw_headers(f"Key {key_id}: {secret_of(valid_key)}".encode()),
    }


BAD_AUTHORIZATION_CASES = list(bad_authorization_cases(f"{uuid.uuid4()}:{'0' * 64}"))


@pytest.mark.parametrize("case", BAD_AUTHORIZATION_CASES)
async def test_bad_authorization_gets_401(
    case: str, api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("n1"))
    instance_id = await create_instance(api, keys.a, ed25519_key)
    headers = bad_authorization_cases(keys.a)[case]

    responses = await call_every_endpoint(api, headers, instance_id, ed25519_key)

    for endpoint, response in responses.items():
        assert response.status_code == 401, f"{endpoint}: {response.status_code} {response.text}"
        assert_error(response, 401, "authorization_error", "invalid_api_key")
        challenge = response.headers.get("WWW-Authenticate", "")
        assert challenge.startswith("Key"), f"{endpoint}: WWW-Authenticate is {challenge!r}"
    assert await count_instances(context.database) == 1
    still_there = await api.get(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    assert still_there.status_code == 200, still_there.text


async def test_revoked_key_gets_401(
    api: httpx.AsyncClient, keys: Keys, database: Database
) -> None:
    before = await api.get(INSTANCES, headers=Keys.header(keys.a))
    assert before.status_code == 200, before.text

    await accounts.revoke_key(database, key_id_of(keys.a))
    after = await api.get(INSTANCES, headers=Keys.header(keys.a))

    assert_error(after, 401, "authorization_error", "invalid_api_key")
    assert after.headers.get("WWW-Authenticate", "").startswith("Key")


async def test_revoked_key_matches_unknown_key(
    api: httpx.AsyncClient, keys: Keys, database: Database
) -> None:
    await accounts.revoke_key(database, key_id_of(keys.a))
    revoked = await api.get(INSTANCES, headers=Keys.header(keys.a))
    unknown = await api.get(INSTANCES, headers=Keys.header(f"{uuid.uuid4()}:{'ab' * 32}"))

    assert revoked.status_code == unknown.status_code
    assert revoked.json()["error"]["message"] == unknown.json()["error"]["message"]


@pytest.mark.parametrize(
    "template",
    ["key {}", "KEY {}", "kEy {}", "Key   {}"],
    ids=["lowercase", "uppercase", "mixed_case", "extra_spaces"],
)
async def test_scheme_variants_authenticate(
    template: str, api: httpx.AsyncClient, keys: Keys
) -> None:
    headers = raw_headers(template.format(keys.a).encode())

    response = await api.get(INSTANCES, headers=headers)

    assert response.status_code == 200, response.text


async def test_revoke_leaves_other_keys(
    api: httpx.AsyncClient, keys: Keys, database: Database
) -> None:
    second = (await accounts.create_key(database, "alice", "admin")).value
    await accounts.revoke_key(database, key_id_of(second))

    revoked = await api.get(INSTANCES, headers=Keys.header(second))
    active = await api.get(INSTANCES, headers=Keys.header(keys.a))

    assert revoked.status_code == 401, revoked.text
    assert active.status_code == 200, active.text


@pytest.mark.parametrize(
    ("key_name", "code"),
    [("api_scope", "admin_key_required"), ("no_compute", "compute_not_enabled")],
)
async def test_forbidden_key_gets_403(
    key_name: str,
    code: str,
    api: httpx.AsyncClient,
    keys: Keys,
    context: ServiceContext,
    ed25519_key: str,
) -> None:
    await add_nodes(context.database, node("n1"))
    instance_id = await create_instance(api, keys.a, ed25519_key)
    headers = raw_headers(f"Key {getattr(keys, key_name)}".encode())

    responses = await call_every_endpoint(api, headers, instance_id, ed25519_key)

    for endpoint, response in responses.items():
        assert response.status_code == 403, f"{endpoint}: {response.status_code} {response.text}"
        assert_error(response, 403, "authorization_error", code)
    assert await count_instances(context.database) == 1
    still_there = await api.get(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    assert still_there.status_code == 200, still_there.text


async def test_other_org_get_is_404(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("n1"))
    instance_id = await create_instance(api, keys.a, ed25519_key)

    foreign = await api.get(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.b))
    missing = await api.get(f"{INSTANCES}/inst_doesnotexist", headers=Keys.header(keys.b))

    assert_error(foreign, 404, "not_found", "instance_not_found")
    assert foreign.json()["error"]["code"] == missing.json()["error"]["code"]


async def test_other_org_delete_is_404(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("n1"))
    instance_id = await create_instance(api, keys.a, ed25519_key)
    before = await api.get(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))

    deleted = await api.delete(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.b))

    assert_error(deleted, 404, "not_found", "instance_not_found")
    after = await api.get(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    assert after.status_code == 200, after.text
    assert after.json()["status"] == before.json()["status"]
    listed = await api.get(INSTANCES, headers=Keys.header(keys.a))
    assert instance_id in [item["id"] for item in listed.json()["instances"]]


async def test_other_org_list_excludes_instance(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("n1"))
    instance_a = await create_instance(api, keys.a, ed25519_key)
    instance_b = await create_instance(api, keys.b, ed25519_key)

    listed_b = await api.get(INSTANCES, headers=Keys.header(keys.b))
    listed_a = await api.get(INSTANCES, headers=Keys.header(keys.a))

    ids_b = [item["id"] for item in listed_b.json()["instances"]]
    ids_a = [item["id"] for item in listed_a.json()["instances"]]
    assert ids_b == [instance_b]
    assert ids_a == [instance_a]


SECRET_LOGGERS = ("computeplane", "uvicorn", "sqlalchemy")


async def dump_database(database: Database) -> str:
    """Return every value of every row of every table as text, bytes decoded leniently."""
    parts: list[str] = []
    async with database.read() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).all():
                for value in row:
                    parts.append(_text_of(value))
    return "\n".join(parts)


def _text_of(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


async def test_secrets_absent_from_logs_and_database(
    api: httpx.AsyncClient,
    keys: Keys,
    context: ServiceContext,
    ed25519_key: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in SECRET_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    extra_key = await make_key(context.database, "org-c", "carol")
    wrong_secret = "f" * 64
    await add_nodes(context.database, node("n1"))

    body = {"instance_type": CREATE_BODY_TYPE, "ssh_key": ed25519_key}
    created = await api.post(
        INSTANCES, json=body, headers={**Keys.header(keys.a), "Idempotency-Key": "req-1"}
    )
    assert created.status_code == 201, created.text
    instance_id = created.json()["id"]
    other = await create_instance(api, extra_key, ed25519_key)
    assert (await api.get(INSTANCES, headers=Keys.header(keys.a))).status_code == 200
    assert (await api.get(f"{INSTANCES}/{other}", headers=Keys.header(extra_key))).is_success
    assert (await api.get(INSTANCES, headers=Keys.header(keys.api_scope))).status_code == 403
    assert (await api.get(INSTANCES, headers=Keys.header(keys.no_compute))).status_code == 403
    failed = await api.get(INSTANCES, headers=Keys.header(f"{key_id_of(keys.b)}:{wrong_secret}"))
    assert failed.status_code == 401
    deleted = await api.delete(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    assert deleted.status_code == 204

    every_key = [keys.a, keys.b, keys.api_scope, keys.no_compute, extra_key]
    secrets = [secret_of(key) for key in every_key] + [wrong_secret]
    messages = [record.getMessage() for record in caplog.records]
    sql_records = [r for r in caplog.records if r.name.startswith("sqlalchemy.engine")]
    assert sql_records, "SQL statements were not logged, so the check below proves nothing"
    assert any(key_id_of(extra_key) in message for message in messages)
    for secret in secrets:
        leaks = [message for message in messages if secret in message]
        assert not leaks, f"secret {secret[:6]}... logged in {leaks[:3]}"
        assert secret not in caplog.text

    dump = await dump_database(context.database)
    assert key_id_of(keys.a) in dump, "the dump misses the api_keys table"
    for secret in secrets:
        assert secret not in dump, f"secret {secret[:6]}... stored in the database"


async def test_api_keys_store_secret_hash(keys: Keys, database: Database) -> None:
    every_key = [keys.a, keys.b, keys.api_scope, keys.no_compute]

    async with database.read() as session:
        stored = dict((await session.execute(select(ApiKey.key_id, ApiKey.secret_sha256))).all())

    for key in every_key:
        expected = hashlib.sha256(secret_of(key).encode()).hexdigest()
        assert stored[key_id_of(key)] == expected, key_id_of(key)


UNPARSABLE_BODIES = {
    "truncated": b'{"instance_type":',
    "not_json": b"{bad",
    "invalid_utf8": b'{"a": "\xff"}',
}


@pytest.mark.parametrize("body", list(UNPARSABLE_BODIES))
@pytest.mark.parametrize(
    ("caller", "status", "error_type", "code"),
    [
        ("no_key", 401, "authorization_error", "invalid_api_key"),
        ("unknown_key", 401, "authorization_error", "invalid_api_key"),
        ("api_scope", 403, "authorization_error", "admin_key_required"),
        ("no_compute", 403, "authorization_error", "compute_not_enabled"),
        ("admin", 400, "validation_error", "invalid_request"),
    ],
)
async def test_unparsable_body_checks_key_first(
    body: str,
    caller: str,
    status: int,
    error_type: str,
    code: str,
    api: httpx.AsyncClient,
    keys: Keys,
) -> None:
    key = {
        "no_key": None,
        "unknown_key": f"{uuid.uuid4()}:{'ab' * 32}",
        "api_scope": keys.api_scope,
        "no_compute": keys.no_compute,
        "admin": keys.a,
    }[caller]
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers.update(Keys.header(key))

    response = await api.post(INSTANCES, content=UNPARSABLE_BODIES[body], headers=headers)

    assert_error(response, status, error_type, code)


@pytest.mark.parametrize("body", list(UNPARSABLE_BODIES))
@pytest.mark.parametrize("authorization", [None, "Bearer not-a-node-token", "Key x:y"])
async def test_agent_report_checks_token_first(
    body: str, authorization: str | None, api: httpx.AsyncClient
) -> None:
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization

    response = await api.post(
        "/internal/v1/agent/report", content=UNPARSABLE_BODIES[body], headers=headers
    )

    assert response.status_code == 401, response.text
    assert response.json()["error"]["type"] == "authorization_error"
