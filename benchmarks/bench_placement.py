"""Measure placement cost against fleet size: in-process creates on 100 to 10,000 nodes.

For each fleet size the script builds a fresh database (SQLite by default, PostgreSQL with
``--postgres``) with the schema from the migrations and 8-GPU nodes inserted in bulk. Every
second node already runs 1 to 7 one-GPU instances of another organization, with their GPU
allocations, so best fit has nodes of every fill level to choose from, and every fourth
node sits in a sector. The script then times ``--creates`` sequential calls of
``computeplane.services.instances.create_instance`` for a 1x instance. Budget: the cost stays
flat from 100 to 10,000 nodes.

It also prints the query plan of the candidate query on the largest fleet, to show whether
it reads the ``ix_nodes_placement`` index.

Run: .venv/bin/python benchmarks/bench_placement.py [--postgres] [--creates M]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    FLAT_RATIO_LIMIT,
    GPUS_PER_NODE,
    SSH_PUBLIC_KEY,
    DatabaseFactory,
    LatencySummary,
    StatementRecorder,
    add_postgres_option,
    create_account,
    database_factory,
    insert_rows,
    node_row,
    print_header,
    temporary_directory,
    verdict,
)
from sqlalchemy import event, select, text

from computeplane.domain.catalog import InstanceType, Region, Sector
from computeplane.domain.clock import utcnow
from computeplane.domain.ids import new_instance_id
from computeplane.domain.sshkeys import parse_public_key
from computeplane.domain.status import InstanceStatus
from computeplane.services import instances
from computeplane.services.auth import Principal, authenticate
from computeplane.services.context import ServiceContext
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.migrate import upgrade_to_head
from computeplane.store.models import GpuAllocation, Instance, Node, User

DEFAULT_FLEET_SIZES = (100, 1_000, 10_000)
PLACEMENT_INDEX = "ix_nodes_placement"
SECTORS = tuple(Sector)
REGIONS = (Region.US_WEST, Region.US_EAST)
KEY_LINE = parse_public_key(SSH_PUBLIC_KEY).line


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_postgres_option(parser)
    parser.add_argument("--creates", type=int, default=300, help="measured creates per fleet")
    parser.add_argument("--warmup", type=int, default=20, help="unmeasured creates first")
    parser.add_argument(
        "--fleet-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_FLEET_SIZES),
        help="node counts to measure, smallest first",
    )
    return parser.parse_args(argv)


def used_gpus(position: int) -> int:
    """Return how many GPUs the fill gives the node at ``position``: 0, or 1 to 7."""
    if position % 2:
        return 0
    return 1 + (position // 2) % (GPUS_PER_NODE - 1)


def node_sector(position: int) -> Sector | None:
    return SECTORS[(position // 4) % len(SECTORS)] if position % 4 == 3 else None


async def fill_fleet(database: Database, size: int) -> None:
    """Insert ``size`` nodes and the instances and allocations that partly fill them."""
    await create_account(database, "filler", "filler")
    now = utcnow()
    async with database.write() as session:
        filler = (
            await session.execute(select(User).where(User.nickname == "filler"))
        ).scalar_one()
        node_rows = [
            node_row(
                f"node-{position:05d}",
                gpus_free=GPUS_PER_NODE - used_gpus(position),
                region=REGIONS[position % len(REGIONS)],
                sector=node_sector(position),
            )
            for position in range(size)
        ]
        inserted_nodes = await insert_rows(session, Node, node_rows, [Node.id, Node.name])
        node_ids = {name: node_id for node_id, name in inserted_nodes}

        instance_rows = [
            filler_instance(filler, row, node_ids[row["name"]], now)
            for position, row in enumerate(node_rows)
            for _ in range(used_gpus(position))
        ]
        inserted_instances = await insert_rows(
            session, Instance, instance_rows, [Instance.id, Instance.node_id]
        )
        # The filler instances of a node are alike, so each takes the node's next GPU index.
        next_gpu_index: dict[int, int] = collections.defaultdict(int)
        allocation_rows = []
        for instance_id, node_id in inserted_instances:
            allocation_rows.append(
                {
                    "node_id": node_id,
                    "gpu_index": next_gpu_index[node_id],
                    "instance_id": instance_id,
                }
            )
            next_gpu_index[node_id] += 1
        await insert_rows(session, GpuAllocation, allocation_rows)
        if database.dialect == "postgresql":
            # Autovacuum would analyze tables this new within about a minute. Running ANALYZE
            # now gives the planner the statistics that a running deployment has.
            await session.execute(text("ANALYZE"))


def filler_instance(
    filler: User, node: dict[str, Any], node_id: int, now: datetime
) -> dict[str, Any]:
    return {
        "public_id": new_instance_id(),
        "organization_id": filler.organization_id,
        "creator_user_id": filler.id,
        "instance_type": InstanceType.GPU_1X_H100_SXM5.value,
        "gpu_count": 1,
        "region": node["region"],
        "sector": node["sector"],
        "node_id": node_id,
        "status": InstanceStatus.READY.value,
        "ip": "127.0.0.1",
        "ssh_port": 22,
        "ssh_user": instances.SSH_USER,
        "ssh_public_key": SSH_PUBLIC_KEY,
        "created_at": now,
        "updated_at": now,
        "ready_at": now,
        "provisioning_deadline": now + timedelta(minutes=5),
        "desired_version": 1,
    }


async def benchmark_principal(database: Database) -> Principal:
    key = await create_account(database, "bench", "bench")
    key_id, _, secret = key.partition(":")
    return await authenticate(database, key_id, secret.encode())


def is_candidate_query(statement: str) -> bool:
    return "FROM nodes" in statement and "ORDER BY nodes.gpus_free" in statement


@dataclass
class Fleet:
    """A database with a filled fleet, and the create durations measured on it."""

    size: int
    context: ServiceContext
    principal: Principal
    samples: list[float] = field(default_factory=list)

    async def create(self) -> float:
        """Create one 1x instance and return how long it took, in seconds."""
        started = time.perf_counter()
        await instances.create_instance(
            self.context, self.principal, InstanceType.GPU_1X_H100_SXM5, KEY_LINE, None
        )
        return time.perf_counter() - started


@contextlib.asynccontextmanager
async def open_fleet(url: str, data_dir: Path, size: int) -> AsyncIterator[Fleet]:
    database = Database(url)
    settings = Settings(data_dir=data_dir, database_url=url, rate_limit_requests=0)
    context = ServiceContext(settings, database, make_notifier(database))
    try:
        await upgrade_to_head(database)
        started = time.perf_counter()
        await fill_fleet(database, size)
        print(f"   filled {size} nodes in {time.perf_counter() - started:.1f} s", flush=True)
        principal = await benchmark_principal(database)
        await context.notifier.start()
        yield Fleet(size, context, principal)
    finally:
        await context.notifier.close()
        await database.dispose()


async def measure(
    options: argparse.Namespace, new_database: DatabaseFactory, directory: Path
) -> tuple[list[Fleet], list[str]]:
    """Fill every fleet, then time creates on the fleets in turn; return them and the plan.

    Taking turns spreads changes in the shared machine's load over every fleet size.
    Measuring one fleet after the other would charge them to whichever ran at a busy time.
    """
    async with contextlib.AsyncExitStack() as stack:
        fleets: list[Fleet] = []
        for size in options.fleet_sizes:
            url = new_database(f"bench_placement_{size}")
            opened = open_fleet(url, directory / f"data-{size}", size)
            fleets.append(await stack.enter_async_context(opened))
        for _ in range(options.warmup):
            for fleet in fleets:
                await fleet.create()

        largest = fleets[-1].context.database
        recorder = StatementRecorder(is_candidate_query)
        event.listen(largest.engine.sync_engine, "before_cursor_execute", recorder)
        for _ in range(options.creates):
            for fleet in fleets:
                fleet.samples.append(await fleet.create())
        event.remove(largest.engine.sync_engine, "before_cursor_execute", recorder)
        plan = await recorder.explain(largest)
    return fleets, plan


def check_capacity(options: argparse.Namespace) -> None:
    smallest = min(options.fleet_sizes)
    free_gpus = sum(GPUS_PER_NODE - used_gpus(position) for position in range(smallest))
    needed = options.warmup + options.creates
    if needed > free_gpus:
        raise SystemExit(
            f"a fleet of {smallest} nodes has {free_gpus} free GPUs, fewer than the "
            f"{needed} creates; lower --creates or raise the smallest --fleet-sizes"
        )


def report(fleets: list[Fleet], plan: list[str]) -> None:
    summaries = {fleet.size: LatencySummary.of(fleet.samples) for fleet in fleets}
    print()
    for size, summary in summaries.items():
        print(f"{size:>7} nodes: {summary.format_ms()}")

    smallest, largest = min(summaries), max(summaries)
    mean_ratio = summaries[largest].mean / summaries[smallest].mean
    p99_ratio = summaries[largest].p99 / summaries[smallest].p99
    print(f"ratio {largest}/{smallest} nodes: mean {mean_ratio:.2f}x, p99 {p99_ratio:.2f}x")
    print(
        f"budget: flat, read as a ratio of at most {FLAT_RATIO_LIMIT:.1f}x: "
        f"mean {verdict(mean_ratio, FLAT_RATIO_LIMIT)}, "
        f"p99 {verdict(p99_ratio, FLAT_RATIO_LIMIT)} (informational)"
    )
    print()
    print(f"candidate query plan at {largest} nodes:")
    for line in plan:
        print(f"   {line}")
    uses_index = any(PLACEMENT_INDEX in line for line in plan)
    print(f"uses {PLACEMENT_INDEX}: {'yes' if uses_index else 'no'}")


def main() -> None:
    options = parse_options()
    options.fleet_sizes = sorted(options.fleet_sizes)
    check_capacity(options)
    print_header("placement cost against fleet size, in process", options)
    with (
        temporary_directory("computeplane-bench-placement-") as directory,
        database_factory(options.postgres, directory) as new_database,
    ):
        fleets, plan = asyncio.run(measure(options, new_database, directory))
    report(fleets, plan)


if __name__ == "__main__":
    main()
