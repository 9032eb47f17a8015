"""Helpers shared by the benchmark scripts: databases, fixtures, statistics and reports.

The scripts reuse the test suite's process and PostgreSQL helpers (``tests/support``), so
importing this module puts ``tests`` on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from computeplane.domain.catalog import GPU_MODEL_H100_SXM5, Region, Sector
from computeplane.domain.clock import utcnow
from computeplane.services import accounts
from computeplane.store.database import Database
from computeplane.store.models import Base

REPO = Path(__file__).resolve().parent.parent
TESTS_DIR = REPO / "tests"
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from support.postgres import PostgresUnavailable, running_postgres  # noqa: E402

#: A valid ed25519 public key line from the test data, sent as every create's ``ssh_key``.
SSH_PUBLIC_KEY = (TESTS_DIR / "data" / "keys" / "ed25519.pub").read_text().strip()

INSTANCES = "/v1/compute/instances"
ONE_GPU = "gpu_1x_h100_sxm5"

#: Largest ratio of the biggest case's cost to the smallest case's that still counts as flat.
#: The budget gives no number for "flat". Twice the smallest case leaves room for the noise
#: of a shared machine and still catches linear growth over a 100-fold range.
FLAT_RATIO_LIMIT = 2.0

GPUS_PER_NODE = 8
#: Rows per INSERT statement in bulk loads.
INSERT_BATCH = 2000

DatabaseFactory = Callable[[str], str]


@dataclass(frozen=True)
class LatencySummary:
    """Statistics of a list of durations, all in seconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    maximum: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencySummary:
        if not samples:
            raise ValueError("no samples to summarize")
        ordered = sorted(samples)
        return cls(
            count=len(ordered),
            mean=sum(ordered) / len(ordered),
            p50=percentile(ordered, 0.50),
            p90=percentile(ordered, 0.90),
            p99=percentile(ordered, 0.99),
            maximum=ordered[-1],
        )

    def format_ms(self) -> str:
        return (
            f"n={self.count} mean={ms(self.mean)} p50={ms(self.p50)} p90={ms(self.p90)} "
            f"p99={ms(self.p99)} max={ms(self.maximum)}"
        )


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Return the nearest-rank percentile of an ascending, non-empty sequence."""
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def verdict(value: float, limit: float) -> str:
    """Return PASS or OVER for a figure against its budget; informational only."""
    return "PASS" if value <= limit else "OVER"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def describe_machine() -> list[str]:
    """Return the lines that identify the machine and the moment of a run."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"date: {datetime.now(UTC).isoformat(timespec='seconds')}",
        f"nproc: {cpus}; CPU: {cpu_model()}",
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"load average (1, 5, 15 min) at start: {load}",
    ]


def print_header(title: str, options: argparse.Namespace) -> None:
    print(f"== {title}")
    for line in describe_machine():
        print(f"   {line}")
    settings = ", ".join(f"{name}={value}" for name, value in vars(options).items())
    print(f"   options: {settings}")
    print(flush=True)


def add_postgres_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres",
        action="store_true",
        help="use a throwaway PostgreSQL server started from the machine's binaries "
        "instead of SQLite",
    )


@contextlib.contextmanager
def temporary_directory(prefix: str) -> Iterator[Path]:
    """Yield a new directory under the system temp dir and delete it with its contents."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def database_factory(use_postgres: bool, directory: Path) -> Iterator[DatabaseFactory]:
    """Yield a function that creates an empty database by name and returns its URL.

    SQLite databases are files in ``directory``. PostgreSQL databases live in a server that
    starts here and is stopped and deleted on exit. Exits when PostgreSQL is
    requested but cannot start, with the reason.
    """
    if not use_postgres:
        yield lambda name: f"sqlite+aiosqlite:///{directory / f'{name}.db'}"
        return
    try:
        with running_postgres() as server:
            yield server.create_database
    except PostgresUnavailable as error:
        sys.exit(f"cannot start PostgreSQL: {error}")


async def create_account(database: Database, organization: str, nickname: str) -> str:
    """Create an organization without a GPU quota, an admin user and key; return the key."""
    await accounts.create_organization(database, organization)
    await accounts.create_user(database, nickname, organization)
    return (await accounts.create_key(database, nickname, "admin")).value


def node_row(
    name: str,
    *,
    gpus_free: int = GPUS_PER_NODE,
    region: Region = Region.US_WEST,
    sector: Sector | None = None,
) -> dict[str, Any]:
    """Return the column values of an active 8-GPU node, for a bulk insert."""
    return {
        "name": name,
        "region": region.value,
        "sector": sector.value if sector is not None else None,
        "gpu_model": GPU_MODEL_H100_SXM5,
        "gpu_count": GPUS_PER_NODE,
        "gpus_free": gpus_free,
        "state": "active",
        # No agent runs for these nodes, so a hash of the name replaces a token's hash.
        "token_sha256": hashlib.sha256(f"benchmark-node:{name}".encode()).hexdigest(),
        "desired_version": 1,
        "reachable": False,
        "created_at": utcnow(),
    }


async def insert_rows(
    session: AsyncSession,
    model: type[Base],
    rows: Sequence[dict[str, Any]],
    returning: Sequence[InstrumentedAttribute[Any]] = (),
) -> list[tuple[Any, ...]]:
    """Insert rows in batches and return the ``returning`` columns of the new rows, if any.

    The returned rows come in no particular order, because requesting insertion order
    makes SQLAlchemy insert one row per statement on SQLite, several times slower.
    """
    inserted: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), INSERT_BATCH):
        batch = rows[start : start + INSERT_BATCH]
        if returning:
            result = await session.execute(insert(model).returning(*returning), batch)
            inserted.extend(tuple(row) for row in result.all())
        else:
            await session.execute(insert(model), batch)
    return inserted


class StatementRecorder:
    """A ``before_cursor_execute`` listener that keeps the first statement ``accepts`` passes.

    Register it with ``sqlalchemy.event.listen(engine.sync_engine, "before_cursor_execute",
    recorder)``. The statement keeps the driver's placeholders and parameters, so its plan
    can be read with the values the product sent.
    """

    def __init__(self, accepts: Callable[[str], bool]) -> None:
        self.accepts = accepts
        self.statement: str | None = None
        self.parameters: Any = None

    def __call__(
        self,
        _connection: Connection,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        _executemany: bool,
    ) -> None:
        if self.statement is None and self.accepts(statement):
            self.statement = statement
            self.parameters = parameters

    async def explain(self, database: Database) -> list[str]:
        """Return the query plan of the recorded statement, one line per row."""
        if self.statement is None:
            return ["(no matching statement was sent)"]
        prefix = "EXPLAIN QUERY PLAN " if database.is_sqlite else "EXPLAIN "
        async with database.read() as session:
            connection = await session.connection()
            result = await connection.exec_driver_sql(prefix + self.statement, self.parameters)
            rows = result.all()
        if database.is_sqlite:
            # SQLite's rows are (id, parent, notused, detail).
            return [str(row[-1]) for row in rows]
        return [str(row[0]) for row in rows]
