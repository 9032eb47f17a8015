"""Per-key rate limits: the IETF ``RateLimit`` headers, 429 past the quota, and one counter
that every API replica shares through the database.

The limit is a fixed window aligned to the Unix epoch, so a test that straddled a window
boundary would see its counter reset. Each test therefore starts its requests early enough
in a window (``seconds_before_window``) to finish them inside it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from computeplane.api.app import create_app
from computeplane.services.context import ServiceContext
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from conftest import BASE_URL, Keys
from support.api_server import ApiServers

INSTANCES = "/v1/compute/instances"
LIMIT = 5
WINDOW_SECONDS = 60
POLICY = f'"default";q={LIMIT};w={WINDOW_SECONDS}'
RATE_LIMIT = re.compile(r'^"default";r=(?P<remaining>\d+);t=(?P<reset>\d+)$')

REPLICA_LIMIT = 10


def seconds_before_window(window_seconds: int, needed_seconds: float) -> float:
    """Return how long to sleep so that ``needed_seconds`` are left in the current window.

    Returns 0 if enough of the current window is left, and otherwise the time until the
    next window starts, plus a margin for clock rounding.
    """
    left = window_seconds - time.time() % window_seconds
    return 0.0 if left >= needed_seconds else left + 0.1


def remaining(response: httpx.Response) -> int:
    match = RATE_LIMIT.match(response.headers.get("RateLimit", ""))
    assert match, f"RateLimit header is {response.headers.get('RateLimit')!r}"
    return int(match["remaining"])


def reset_seconds(response: httpx.Response) -> int:
    match = RATE_LIMIT.match(response.headers.get("RateLimit", ""))
    assert match, f"RateLimit header is {response.headers.get('RateLimit')!r}"
    return int(match["reset"])


@pytest.fixture
async def limited_api(settings: Settings, database: Database) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for an app that allows ``LIMIT`` requests per key per minute."""
    limited = Settings.model_validate(
        {
            **settings.model_dump(),
            "rate_limit_requests": LIMIT,
            "rate_limit_window_seconds": WINDOW_SECONDS,
        }
    )
    context = ServiceContext(limited, database, make_notifier(database))
    await context.notifier.start()
    transport = httpx.ASGITransport(app=create_app(context))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client
    await context.notifier.close()


async def list_instances(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.get(INSTANCES, headers=Keys.header(key))


async def exhaust(client: httpx.AsyncClient, key: str) -> None:
    """Spend the key's whole window, checking that each request in it succeeds."""
    for number in range(1, LIMIT + 1):
        response = await list_instances(client, key)
        assert response.status_code == 200, f"request {number}: {response.text}"


async def test_headers_count_down(limited_api: httpx.AsyncClient, keys: Keys) -> None:
    await asyncio.sleep(seconds_before_window(WINDOW_SECONDS, 10))
    for number in range(1, LIMIT + 1):
        response = await list_instances(limited_api, keys.a)

        assert response.status_code == 200, f"request {number}: {response.text}"
        assert response.headers["RateLimit-Policy"] == POLICY
        assert remaining(response) == LIMIT - number
        assert 1 <= reset_seconds(response) <= WINDOW_SECONDS


async def test_request_past_limit_is_429(limited_api: httpx.AsyncClient, keys: Keys) -> None:
    await asyncio.sleep(seconds_before_window(WINDOW_SECONDS, 10))
    await exhaust(limited_api, keys.a)

    response = await list_instances(limited_api, keys.a)

    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limited"
    assert error["code"] == "rate_limited"
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= WINDOW_SECONDS
    assert response.headers["RateLimit-Policy"] == POLICY
    assert remaining(response) == 0
    assert reset_seconds(response) == retry_after


async def test_limit_is_per_key(limited_api: httpx.AsyncClient, keys: Keys) -> None:
    await asyncio.sleep(seconds_before_window(WINDOW_SECONDS, 10))
    await exhaust(limited_api, keys.a)
    assert (await list_instances(limited_api, keys.a)).status_code == 429

    other = await list_instances(limited_api, keys.b)

    assert other.status_code == 200, other.text
    assert remaining(other) == LIMIT - 1


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="missing"),
        pytest.param("Key {key_id}:wrong-secret", id="wrong-secret"),
        pytest.param("Bearer {key_id}", id="wrong-scheme"),
    ],
)
async def test_unauthenticated_requests_not_counted(
    authorization: str | None, limited_api: httpx.AsyncClient, keys: Keys
) -> None:
    await asyncio.sleep(seconds_before_window(WINDOW_SECONDS, 10))
    key_id = keys.a.partition(":")[0]
    headers = (
        {} if authorization is None else {"Authorization": authorization.format(key_id=key_id)}
    )
    for number in range(1, LIMIT + 2):
        rejected = await limited_api.get(INSTANCES, headers=headers)
        assert rejected.status_code == 401, f"request {number}: {rejected.text}"

    response = await list_instances(limited_api, keys.a)

    assert response.status_code == 200, response.text
    assert remaining(response) == LIMIT - 1


async def test_zero_disables_limits(api: httpx.AsyncClient, keys: Keys) -> None:
    # The shared ``settings`` fixture, behind ``api``, sets rate_limit_requests to 0.
    for number in range(1, 3 * LIMIT):
        response = await list_instances(api, keys.a)

        assert response.status_code == 200, f"request {number}: {response.text}"
        assert "RateLimit" not in response.headers
        assert "RateLimit-Policy" not in response.headers


# --- two API processes on one database --------------------------------------------------------


@pytest.fixture
def replicas(tmp_path: Path, database_url: str) -> Iterator[ApiServers]:
    """Two ``computeplane api`` processes on one database, limited to ``REPLICA_LIMIT``."""
    servers = ApiServers(
        tmp_path / "data",
        database_url,
        env={"COMPUTEPLANE_RATE_LIMIT_REQUESTS": str(REPLICA_LIMIT)},
    )
    try:
        servers.initialize()
        servers.start()
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.mark.e2e
def test_replicas_share_one_limit(replicas: ApiServers) -> None:
    headers = Keys.header(replicas.admin_key)
    clients = [httpx.Client(base_url=server.base_url, timeout=30.0) for server in replicas.servers]
    try:
        # Requests to processes take longer than in-process ones, so leave a wider margin.
        time.sleep(seconds_before_window(WINDOW_SECONDS, 20))
        for number in range(1, REPLICA_LIMIT + 1):
            replica = number % 2
            response = clients[replica].get(INSTANCES, headers=headers)
            context = f"request {number} to replica {replica + 1}: {response.text}"
            assert response.status_code == 200, f"{context}\n{replicas.describe()}"
            assert remaining(response) == REPLICA_LIMIT - number

        # The next request is over the shared limit whichever replica receives it.
        for replica, client in enumerate(clients):
            response = client.get(INSTANCES, headers=headers)
            context = f"replica {replica + 1}: {response.text}"
            assert response.status_code == 429, f"{context}\n{replicas.describe()}"
            assert response.json()["error"]["code"] == "rate_limited"
    finally:
        for client in clients:
            client.close()
