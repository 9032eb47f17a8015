"""Create bodies must be sent as JSON: other or missing media types get 415."""

from __future__ import annotations

import json

import httpx
import pytest

from computeplane.services.context import ServiceContext
from conftest import Keys, add_nodes, node

INSTANCES = "/v1/compute/instances"


@pytest.mark.parametrize(
    "content_type",
    ["application/x-www-form-urlencoded", "text/plain", "multipart/form-data; boundary=x", None],
)
async def test_non_json_body_is_415(
    content_type: str | None, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    body = json.dumps({"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ed25519_key})

    headers = Keys.header(keys.a)
    if content_type is not None:
        headers["Content-Type"] = content_type

    response = await api.post(INSTANCES, content=body, headers=headers)

    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_media_type"
    assert "application/json" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/ld+json"]
)
async def test_json_body_is_accepted(
    content_type: str,
    api: httpx.AsyncClient,
    keys: Keys,
    context: ServiceContext,
    ed25519_key: str,
) -> None:
    await add_nodes(context.database, node("n1"))
    body = json.dumps({"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ed25519_key})
    headers = {**Keys.header(keys.a), "Content-Type": content_type}

    response = await api.post(INSTANCES, content=body, headers=headers)

    assert response.status_code == 201, response.text
