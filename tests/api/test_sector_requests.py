"""Requests for a sector: one without nodes is a client error, a full one is retryable."""

from __future__ import annotations

import httpx

from computeplane.domain.catalog import Sector
from computeplane.services.context import ServiceContext
from computeplane.services.nodes import drain_node
from conftest import Keys, add_nodes, node

INSTANCES = "/v1/compute/instances"


def eight_gpus(ssh_key: str, sector: str) -> dict[str, str]:
    return {"instance_type": "gpu_8x_h100_sxm5", "ssh_key": ssh_key, "sector": sector}


async def test_sector_without_nodes_is_400(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("ib-1", sector=Sector.SECTOR_1), node("plain"))

    response = await api.post(
        INSTANCES, json=eight_gpus(ed25519_key, "sector_3"), headers=Keys.header(keys.a)
    )

    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "sector_unavailable"
    assert "sector_1" in response.json()["error"]["message"]
    assert "Retry-After" not in response.headers


async def test_full_sector_is_503(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("ib-1", sector=Sector.SECTOR_1))
    headers = Keys.header(keys.a)
    first = await api.post(INSTANCES, json=eight_gpus(ed25519_key, "sector_1"), headers=headers)
    assert first.status_code == 201, first.text

    second = await api.post(INSTANCES, json=eight_gpus(ed25519_key, "sector_1"), headers=headers)

    assert second.status_code == 503, second.text
    assert second.json()["error"]["code"] == "insufficient_capacity"
    assert "Retry-After" in second.headers


async def test_drained_sector_is_503(
    api: httpx.AsyncClient, keys: Keys, context: ServiceContext, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("ib-1", sector=Sector.SECTOR_1))
    await drain_node(context.database, "ib-1")

    response = await api.post(
        INSTANCES, json=eight_gpus(ed25519_key, "sector_1"), headers=Keys.header(keys.a)
    )

    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "insufficient_capacity"
