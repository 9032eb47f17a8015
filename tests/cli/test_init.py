"""``computeplane init`` as a real process, alone, repeated and twice at the same moment.

On an empty database ``init`` creates the schema, the organization ``default`` with compute
permission, the user ``admin`` and an admin API key, which it writes to
``<data-dir>/admin-api-key``. Every test starts from a database without a schema, on SQLite
and on PostgreSQL.
"""

from __future__ import annotations

import hashlib
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from computeplane.api.app import create_app
from computeplane.services.context import ServiceContext
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.migrate import current_revision, head_revision
from computeplane.store.models import ApiKey, Organization, User
from conftest import BASE_URL, Keys
from support.postgres import PostgresServer
from support.processes import computeplane_environment, run_computeplane

pytestmark = pytest.mark.e2e

INSTANCES = "/v1/compute/instances"
KEY_FILE_NAME = "admin-api-key"


@dataclass(frozen=True)
class Accounts:
    """The rows of the account tables, in insertion order."""

    organizations: list[tuple[str, bool]]
    users: list[tuple[str, str]]
    keys: list[tuple[str, str, str]]


@dataclass(frozen=True)
class Init:
    """``computeplane init`` on one database and data directory."""

    data_dir: Path
    database_url: str

    @property
    def key_file(self) -> Path:
        return self.data_dir / KEY_FILE_NAME

    def run(self) -> subprocess.CompletedProcess[str]:
        return run_computeplane(
            ["init", "--data-dir", str(self.data_dir), "--database-url", self.database_url],
            env=computeplane_environment(),
        )


@pytest.fixture
def init(tmp_path: Path, database_url: str) -> Init:
    return Init(tmp_path / "data", database_url)


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """The test's database, opened without creating its schema (unlike the shared fixture)."""
    database = Database(database_url)
    yield database
    await database.dispose()


async def read_accounts(database: Database) -> Accounts:
    async with database.read() as session:
        organizations = await session.execute(
            select(Organization.name, Organization.compute_enabled).order_by(Organization.id)
        )
        users = (await session.execute(select(User).order_by(User.id))).scalars().all()
        keys = await session.execute(
            select(ApiKey.key_id, ApiKey.scope, ApiKey.secret_sha256).order_by(ApiKey.id)
        )
        return Accounts(
            organizations=[(name, compute) for name, compute in organizations.all()],
            users=[(user.nickname, user.organization.name) for user in users],
            keys=[(key_id, scope, digest) for key_id, scope, digest in keys.all()],
        )


async def list_instances(init: Init, key: str) -> httpx.Response:
    """Send ``GET /v1/compute/instances`` with ``key`` to an app served on the database."""
    settings = Settings(
        data_dir=init.data_dir, database_url=init.database_url, rate_limit_requests=0
    )
    database = Database(settings.resolved_database_url)
    context = ServiceContext(settings, database, make_notifier(database))
    await context.notifier.start()
    try:
        transport = httpx.ASGITransport(app=create_app(context))
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            return await client.get(INSTANCES, headers=Keys.header(key))
    finally:
        await context.notifier.close()
        await database.dispose()


def run_at_once(init: Init, count: int) -> list[subprocess.CompletedProcess[str]]:
    """Start ``count`` init processes together, released by one barrier, and wait for all."""
    barrier = threading.Barrier(count)

    def run_after_barrier() -> subprocess.CompletedProcess[str]:
        barrier.wait()
        return init.run()

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(run_after_barrier) for _ in range(count)]
        return [future.result() for future in futures]


def secret_sha256(key: str) -> str:
    return hashlib.sha256(key.partition(":")[2].encode()).hexdigest()


async def test_init_creates_schema(init: Init, database: Database) -> None:
    assert await current_revision(database) is None

    result = init.run()

    assert result.returncode == 0, result.stderr
    assert await current_revision(database) == head_revision()


async def test_init_creates_admin_account(init: Init, database: Database) -> None:
    result = init.run()

    assert result.returncode == 0, result.stderr
    accounts = await read_accounts(database)
    assert accounts.organizations == [("default", True)]
    assert accounts.users == [("admin", "default")]
    assert len(accounts.keys) == 1, accounts.keys
    key_id, scope, digest = accounts.keys[0]
    key = init.key_file.read_text().strip()
    assert key.partition(":")[0] == key_id
    assert scope == "admin"
    assert digest == secret_sha256(key)


def test_init_key_file_mode(init: Init) -> None:
    result = init.run()

    assert result.returncode == 0, result.stderr
    mode = init.key_file.stat().st_mode & 0o777
    assert mode == 0o600, oct(mode)


async def test_init_key_authenticates(init: Init) -> None:
    result = init.run()
    assert result.returncode == 0, result.stderr

    listed = await list_instances(init, init.key_file.read_text().strip())

    assert listed.status_code == 200, listed.text
    assert listed.json()["instances"] == []


def test_init_log_names_file_only(init: Init) -> None:
    result = init.run()

    assert result.returncode == 0, result.stderr
    secret = init.key_file.read_text().strip().partition(":")[2]
    assert len(secret) >= 32, secret
    assert str(init.key_file) in result.stderr
    assert secret not in result.stderr
    assert secret not in result.stdout


async def test_init_twice_changes_nothing(init: Init, database: Database) -> None:
    first = init.run()
    assert first.returncode == 0, first.stderr
    key = init.key_file.read_text()
    accounts = await read_accounts(database)

    second = init.run()

    assert second.returncode == 0, second.stderr
    assert "already initialized" in second.stderr
    assert init.key_file.read_text() == key
    assert await read_accounts(database) == accounts
    assert len(accounts.organizations) == 1, accounts


async def test_init_concurrent_one_admin(init: Init, database: Database) -> None:
    results = run_at_once(init, 2)

    for result in results:
        assert result.returncode == 0, result.stderr
    created = [result for result in results if "already initialized" not in result.stderr]
    assert len(created) == 1, [result.stderr for result in results]
    accounts = await read_accounts(database)
    assert accounts.organizations == [("default", True)]
    assert accounts.users == [("admin", "default")]
    assert len(accounts.keys) == 1, accounts.keys
    key = init.key_file.read_text().strip()
    key_id, _, digest = accounts.keys[0]
    assert key.partition(":")[0] == key_id
    assert secret_sha256(key) == digest


def sqlite_file_exists(database_url: str) -> bool:
    """Return whether ``database_url`` is a SQLite URL whose file exists."""
    scheme, _, path = database_url.partition(":///")
    return scheme.startswith("sqlite") and Path(path).exists()


@pytest.mark.parametrize(
    "command", [["orgs", "list"], ["orgs", "create", "acme"], ["keys", "list"]]
)
async def test_operator_command_before_init_changes_nothing(
    init: Init, database: Database, database_url: str, command: list[str]
) -> None:
    result = run_computeplane(
        [*command, "--data-dir", str(init.data_dir), "--database-url", database_url],
        env=computeplane_environment(),
    )

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Run 'computeplane init'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not sqlite_file_exists(database_url)
    assert await current_revision(database) is None

    initialized = init.run()
    assert initialized.returncode == 0, initialized.stderr
    assert (await read_accounts(database)).organizations == [("default", True)]


def unreachable_postgres_url() -> str:
    """Return a PostgreSQL URL on a loopback port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"postgresql://computeplane:hunter2@127.0.0.1:{port}/computeplane"


def missing_database_url(postgres_server: PostgresServer) -> str:
    """Return a URL on the test server that names a database that does not exist."""
    existing = postgres_server.create_database(f"exists_{uuid.uuid4().hex[:8]}")
    return existing.rpartition("/")[0] + f"/missing_{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("command", [["orgs", "list"], ["init"]])
def test_unreachable_database_one_line(tmp_path: Path, command: list[str]) -> None:
    result = run_computeplane(
        [*command, "--data-dir", str(tmp_path), "--database-url", unreachable_postgres_url()],
        env=computeplane_environment(),
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: cannot connect to the database postgresql+asyncpg://" in result.stderr
    assert "hunter2" not in result.stderr
    assert "Connect call failed" in result.stderr


@pytest.mark.postgres
def test_missing_postgres_database_one_line(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    result = run_computeplane(
        ["orgs", "list", "--data-dir", str(tmp_path)],
        env=computeplane_environment(
            {"COMPUTEPLANE_DATABASE_URL": missing_database_url(postgres_server)}
        ),
    )

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "error: cannot connect to the database" in result.stderr
    assert "does not exist" in result.stderr
