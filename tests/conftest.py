"""Fixtures shared by the suite: databases on SQLite and PostgreSQL, the app, keys, nodes.

Every test that takes ``database_url`` (directly or through ``context``, ``api`` and
friends) runs twice, on SQLite and on PostgreSQL. Without PostgreSQL binaries the
PostgreSQL runs are skipped with a message saying how to enable them; with ``CI=true`` they
fail instead, so CI never passes without them.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from computeplane.api.app import create_app
from computeplane.domain.catalog import Region, Sector
from computeplane.domain.fleet import NodeSpec
from computeplane.services import accounts
from computeplane.services.context import ServiceContext
from computeplane.services.nodes import add_node
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.migrate import upgrade_to_head
from support.operator_cli import OperatorCli
from support.postgres import PostgresServer, PostgresUnavailable, running_postgres

KEYS_DIR = Path(__file__).parent / "data" / "keys"
BASE_URL = "http://testserver"
_database_names = itertools.count()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    try:
        with running_postgres() as server:
            yield server
    except PostgresUnavailable as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL tests must run under CI: {error}")
        pytest.skip(str(error))


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'computeplane.db'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database(f"test_{next(_database_names)}_{uuid.uuid4().hex[:8]}")


@pytest.fixture
def cli(tmp_path: Path, database_url: str, database: Database) -> OperatorCli:
    """Operator commands on the test's database, which ``database`` migrated to head."""
    return OperatorCli.create(tmp_path / "cli-data", database_url)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=database_url,
        rate_limit_requests=0,
        provisioning_timeout_seconds=300,
        heartbeat_interval_seconds=5,
        agent_poll_seconds=5,
    )


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    database = Database(settings.resolved_database_url, pool_size=20, max_overflow=40)
    await upgrade_to_head(database)
    yield database
    await database.dispose()


@pytest.fixture
async def context(settings: Settings, database: Database) -> AsyncIterator[ServiceContext]:
    context = ServiceContext(settings, database, make_notifier(database))
    await context.notifier.start()
    yield context
    await context.notifier.close()


@pytest.fixture
async def api(context: ServiceContext) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app, through the ASGI interface with no socket in between."""
    transport = httpx.ASGITransport(app=create_app(context))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        yield client


@dataclass(frozen=True)
class Keys:
    """API keys of the acceptance cases: two compute orgs, an ``api`` key, a non-compute org."""

    a: str
    b: str
    api_scope: str
    no_compute: str

    @staticmethod
    def header(key: str) -> dict[str, str]:
        return {"Authorization": f"Key {key}"}


@pytest.fixture
async def keys(database: Database) -> Keys:
    return Keys(
        a=await make_key(database, "org-a", "alice"),
        b=await make_key(database, "org-b", "bob"),
        api_scope=await make_key(database, "org-a", "alice-api", scope="api", new_org=False),
        no_compute=await make_key(database, "org-nocompute", "nora", compute=False),
    )


async def make_key(
    database: Database,
    organization: str,
    nickname: str,
    *,
    scope: str = "admin",
    compute: bool = True,
    gpu_quota: int | None = None,
    new_org: bool = True,
) -> str:
    """Create an organization (unless it exists), a user in it and a key; return the key."""
    if new_org:
        await accounts.create_organization(
            database, organization, compute_enabled=compute, gpu_quota=gpu_quota
        )
    await accounts.create_user(database, nickname, organization)
    return (await accounts.create_key(database, nickname, scope)).value


async def add_nodes(database: Database, *specs: NodeSpec) -> dict[str, str]:
    """Register nodes and return their agent tokens by name."""
    return {spec.name: await add_node(database, spec) for spec in specs}


def node(
    name: str, *, gpus: int = 8, region: Region = Region.US_WEST, sector: Sector | None = None
) -> NodeSpec:
    return NodeSpec(name=name, region=region, sector=sector, gpu_count=gpus)


@pytest.fixture
def ed25519_key() -> str:
    return (KEYS_DIR / "ed25519.pub").read_text().strip()
