"""The error envelope: every failure is ``{"error": {type, message, code, request_id}}``.

Each response, successful or not, carries an ``X-Request-Id`` header, and an error body's
``request_id`` equals it. Invalid input is a 4xx, never a 5xx.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from computeplane.domain.catalog import Sector
from computeplane.services.context import ServiceContext
from conftest import Keys, add_nodes, node

INSTANCES = "/v1/compute/instances"
REQUEST_ID = re.compile(r"^req_[a-z2-7]{20}$")


def assert_error(
    response: httpx.Response, status: int, error_type: str, code: str | None = None
) -> None:
    """Check the status, the error envelope and that its request id matches the header.

    ``code`` None accepts any non-empty code.
    """
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"type", "message", "code", "request_id"}, error
    assert error["type"] == error_type, error
    if code is None:
        assert error["code"], error
    else:
        assert error["code"] == code, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert error["request_id"] == response.headers.get("X-Request-Id"), error
    assert REQUEST_ID.match(error["request_id"]), error


@pytest.fixture
def headers(keys: Keys) -> dict[str, str]:
    return Keys.header(keys.a)


@pytest.fixture
def valid_body(ed25519_key: str) -> dict[str, Any]:
    return {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ed25519_key}


@pytest.mark.parametrize("path", ["/", "/v1/compute", "/v1/compute/instance", "/v2/nothing"])
async def test_unknown_route_is_404(
    path: str, api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method in ("GET", "POST", "DELETE"):
        for request_headers in (headers, {}):
            response = await api.request(method, path, headers=request_headers)
            assert response.status_code == 404, f"{method} {path}: {response.text}"
            assert_error(response, 404, "not_found", "not_found")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", INSTANCES),
        ("PATCH", INSTANCES),
        ("DELETE", INSTANCES),
        ("POST", f"{INSTANCES}/inst_abc"),
        ("PUT", f"{INSTANCES}/inst_abc"),
    ],
)
async def test_wrong_method_is_405(
    method: str, path: str, api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await api.request(method, path, headers=headers, json={})

    assert_error(response, 405, "validation_error", "method_not_allowed")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("PUT", INSTANCES, "GET, POST"),
        ("PATCH", f"{INSTANCES}/inst_abc", "DELETE, GET"),
    ],
)
async def test_405_allow_lists_every_method(
    method: str, path: str, allowed: str, api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await api.request(method, path, headers=headers, json={})

    assert response.status_code == 405, response.text
    assert response.headers["Allow"] == allowed


INVALID_BODIES: dict[str, bytes] = {
    "malformed_json": b'{"instance_type": "gpu_1x_h100_sxm5", ',
    "not_json": b"instance_type=gpu_1x_h100_sxm5",
    "json_array": b'["gpu_1x_h100_sxm5"]',
    "json_string": b'"gpu_1x_h100_sxm5"',
    "json_number": b"8",
    "json_null": b"null",
    "empty_object": b"{}",
    "empty_body": b"",
    "invalid_utf8": b'{"instance_type": "\xff\xfe"}',
    "deeply_nested": b"[" * 30000 + b"]" * 30000,
}


@pytest.mark.parametrize("name", list(INVALID_BODIES))
async def test_invalid_json_body_is_400(
    name: str, api: httpx.AsyncClient, headers: dict[str, str], context: ServiceContext
) -> None:
    await add_nodes(context.database, node("n1"))
    content_headers = {**headers, "Content-Type": "application/json"}

    response = await api.post(INSTANCES, content=INVALID_BODIES[name], headers=content_headers)

    assert_error(response, 400, "validation_error")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "The request body is missing; send a JSON object."),
        (b"{}", "Field 'instance_type' is required. Field 'ssh_key' is required."),
    ],
)
async def test_missing_body_message(
    body: bytes, message: str, api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    content_headers = {**headers, "Content-Type": "application/json"}

    response = await api.post(INSTANCES, content=body, headers=content_headers)

    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"] == message


def body_with(valid: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Return a copy of ``valid`` with fields replaced, dropping those whose value is ``...``."""
    body = dict(valid)
    for field, value in changes.items():
        if value is ...:
            body.pop(field, None)
        else:
            body[field] = value
    return body


# (case name, field changes, text the message must contain)
INVALID_FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("unknown_field", {"foo": 1}, "foo"),
    ("missing_ssh_key", {"ssh_key": ...}, "ssh_key"),
    ("missing_instance_type", {"instance_type": ...}, "instance_type"),
    ("ssh_key_number", {"ssh_key": 123}, "ssh_key"),
    ("ssh_key_null", {"ssh_key": None}, "ssh_key"),
    ("ssh_key_empty", {"ssh_key": ""}, "ssh_key"),
    ("ssh_key_list", {"ssh_key": ["ssh-ed25519"]}, "ssh_key"),
    ("instance_type_number", {"instance_type": 5}, "instance_type"),
    ("instance_type_null", {"instance_type": None}, "instance_type"),
    ("instance_type_unknown", {"instance_type": "gpu_2x_h100_sxm5"}, "instance_type"),
    ("instance_type_case", {"instance_type": "GPU_1X_H100_SXM5"}, "instance_type"),
    ("sector_on_1x", {"sector": "sector_1"}, "sector"),
    (
        "sector_unknown_on_8x",
        {"instance_type": "gpu_8x_h100_sxm5", "sector": "sector_9"},
        "sector",
    ),
    ("sector_number", {"instance_type": "gpu_8x_h100_sxm5", "sector": 1}, "sector"),
]


@pytest.mark.parametrize(
    ("changes", "named"),
    [(changes, named) for _, changes, named in INVALID_FIELDS],
    ids=[name for name, _, _ in INVALID_FIELDS],
)
async def test_invalid_field_is_400(
    changes: dict[str, Any],
    named: str,
    api: httpx.AsyncClient,
    headers: dict[str, str],
    context: ServiceContext,
    valid_body: dict[str, Any],
) -> None:
    await add_nodes(context.database, node("n1"), node("ib1", sector=Sector.SECTOR_1))

    response = await api.post(INSTANCES, json=body_with(valid_body, **changes), headers=headers)

    assert_error(response, 400, "validation_error")
    message = response.json()["error"]["message"]
    assert named in message, message


async def test_sector_with_1x_type_is_400(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    context: ServiceContext,
    valid_body: dict[str, Any],
) -> None:
    await add_nodes(context.database, node("ib1", sector=Sector.SECTOR_1))
    body = body_with(valid_body, instance_type="gpu_1x_h100_sxm5", sector="sector_1")

    response = await api.post(INSTANCES, json=body, headers=headers)

    assert_error(response, 400, "validation_error", "invalid_request")
    listed = await api.get(INSTANCES, headers=headers)
    assert listed.json()["instances"] == []


async def test_sector_with_8x_type_is_201(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    context: ServiceContext,
    valid_body: dict[str, Any],
) -> None:
    await add_nodes(context.database, node("ib1", sector=Sector.SECTOR_1))
    body = body_with(valid_body, instance_type="gpu_8x_h100_sxm5", sector="sector_1")

    response = await api.post(INSTANCES, json=body, headers=headers)

    assert response.status_code == 201, response.text
    assert response.json()["sector"] == "sector_1"


async def test_rejected_value_not_echoed(
    api: httpx.AsyncClient, headers: dict[str, str], valid_body: dict[str, Any]
) -> None:
    marker = "PRIVATEMATERIAL7Q"
    private_key = (
        "-----BEGIN OPENSSH PRIVATE KEY-----\n"
        f"b3BlbnNzaC1rZXktdjEA{marker}\n"
        "-----END OPENSSH PRIVATE KEY-----\n"
    )
    cases = {
        "ssh_key": body_with(valid_body, ssh_key=private_key),
        "instance_type": body_with(valid_body, instance_type=marker),
        "sector": body_with(valid_body, sector=marker),
    }

    for field, body in cases.items():
        response = await api.post(INSTANCES, json=body, headers=headers)
        assert response.status_code == 400, f"{field}: {response.text}"
        message = response.json()["error"]["message"]
        assert marker not in message, f"{field}: the message echoes the value: {message}"


async def test_oversized_body_is_413(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    context: ServiceContext,
    valid_body: dict[str, Any],
) -> None:
    await add_nodes(context.database, node("n1"))
    limit = context.settings.max_request_bytes
    body = body_with(valid_body, ssh_key="A" * (limit + 1))

    response = await api.post(INSTANCES, json=body, headers=headers)

    assert_error(response, 413, "validation_error", "request_too_large")
    listed = await api.get(INSTANCES, headers=headers)
    assert listed.json()["instances"] == []


async def test_oversized_chunked_body_is_413(
    api: httpx.AsyncClient, headers: dict[str, str], context: ServiceContext
) -> None:
    limit = context.settings.max_request_bytes
    chunk = b" " * 4096

    async def stream() -> AsyncIterator[bytes]:
        yield b'{"instance_type": "gpu_1x_h100_sxm5",'
        for _ in range(limit // len(chunk) + 2):
            yield chunk
        yield b'"ssh_key": "x"}'

    request_headers = {**headers, "Content-Type": "application/json"}
    response = await api.post(INSTANCES, content=stream(), headers=request_headers)

    assert "content-length" not in response.request.headers
    assert_error(response, 413, "validation_error", "request_too_large")


async def test_body_at_limit_is_accepted(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    context: ServiceContext,
    valid_body: dict[str, Any],
) -> None:
    await add_nodes(context.database, node("n1"))
    limit = context.settings.max_request_bytes
    encoded = json.dumps(valid_body).encode()
    padded = encoded[:-1] + b" " * (limit - len(encoded)) + b"}"
    request_headers = {**headers, "Content-Type": "application/json"}

    response = await api.post(INSTANCES, content=padded, headers=request_headers)

    assert len(padded) == limit
    assert response.status_code == 201, response.text


async def test_no_capacity_is_503(
    api: httpx.AsyncClient, headers: dict[str, str], valid_body: dict[str, Any]
) -> None:
    response = await api.post(INSTANCES, json=valid_body, headers=headers)

    assert_error(response, 503, "server_error", "insufficient_capacity")
    retry_after = response.headers.get("Retry-After", "")
    assert retry_after.isdigit(), f"Retry-After is {retry_after!r}"
    assert int(retry_after) > 0


async def test_success_has_request_id(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    context: ServiceContext,
    valid_body: dict[str, Any],
) -> None:
    await add_nodes(context.database, node("n1"))

    created = await api.post(INSTANCES, json=valid_body, headers=headers)
    instance = f"{INSTANCES}/{created.json()['id']}"
    responses = {
        "create": created,
        "list": await api.get(INSTANCES, headers=headers),
        "get": await api.get(instance, headers=headers),
        "delete": await api.delete(instance, headers=headers),
    }

    for name, response in responses.items():
        assert response.is_success, f"{name}: {response.status_code} {response.text}"
        request_id = response.headers.get("X-Request-Id", "")
        assert REQUEST_ID.match(request_id), f"{name}: X-Request-Id is {request_id!r}"
    request_ids = {response.headers["X-Request-Id"] for response in responses.values()}
    assert len(request_ids) == len(responses), "request ids repeat across requests"


ODD_INSTANCE_IDS = {
    "long": "x" * 10000,
    "non_ascii": "inst_%C3%A9",
    "emoji": "%F0%9F%98%80",
    "space": "inst_abc%20def",
    "invalid_utf8": "%FF",
    "dot_dot": "inst_..",
}


@pytest.mark.parametrize("path", list(ODD_INSTANCE_IDS.values()), ids=list(ODD_INSTANCE_IDS))
async def test_odd_instance_id_is_404(
    path: str, api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method in ("GET", "DELETE"):
        response = await api.request(method, f"{INSTANCES}/{path}", headers=headers)
        assert response.status_code == 404, f"{method}: {response.text}"
        assert_error(response, 404, "not_found", "instance_not_found")


@pytest.mark.parametrize("path", ["inst_%00", "inst_%00abc"], ids=["nul_only", "nul_inside"])
async def test_nul_instance_id_is_404(
    path: str, api: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method in ("GET", "DELETE"):
        response = await api.request(method, f"{INSTANCES}/{path}", headers=headers)
        assert response.status_code == 404, f"{method}: {response.text}"
        assert_error(response, 404, "not_found", "instance_not_found")
