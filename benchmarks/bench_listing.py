"""Measure list latency against page depth: ``GET /v1/compute/instances`` on 10,000 instances.

The script inserts ``--instances`` instances of one organization in bulk into a fresh
database (SQLite by default, PostgreSQL with ``--postgres``). ``--other-instances`` adds
newer instances of another organization after them. The script walks the pages of 100 once
to collect each page's cursor. It then times pages 1, 10, 50 and 100, taking turns, through
the ASGI app in this process (``httpx.ASGITransport``, no socket), so the time includes
authentication and the JSON body. It also prints the listing query's plan for pages 1 and
100. Budget: the cost of a page does not depend on its number.

Run: .venv/bin/python benchmarks/bench_listing.py [--postgres] [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from common import (
    FLAT_RATIO_LIMIT,
    INSTANCES,
    SSH_PUBLIC_KEY,
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

from computeplane.api.app import create_app
from computeplane.domain.catalog import InstanceType
from computeplane.domain.clock import utcnow
from computeplane.domain.ids import new_instance_id
from computeplane.domain.status import InstanceStatus
from computeplane.services.context import ServiceContext
from computeplane.services.instances import SSH_USER
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.migrate import upgrade_to_head
from computeplane.store.models import Instance, Node, User

PAGE_SIZE = 100
PAGES = (1, 10, 50, 100)
BASE_URL = "http://benchmark"
STATUSES = (InstanceStatus.READY, InstanceStatus.PENDING, InstanceStatus.STOPPED)


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_postgres_option(parser)
    parser.add_argument("--instances", type=int, default=10_000, help="instances to list")
    parser.add_argument("--repeats", type=int, default=50, help="measured requests per page")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured rounds first")
    parser.add_argument(
        "--other-instances",
        type=int,
        default=0,
        help="instances of a second organization, inserted last so that they are the newest",
    )
    options = parser.parse_args(argv)
    if options.instances < max(PAGES) * PAGE_SIZE:
        parser.error(f"--instances must be at least {max(PAGES) * PAGE_SIZE} to reach page 100")
    return options


async def insert_instances(database: Database, count: int, other_count: int) -> str:
    """Insert the listed organization's instances, then the other's; return the first's key.

    All instances are on one node, because the listing joins the node but does not filter
    by it.
    """
    key = await create_account(database, "bench", "bench")
    await create_account(database, "other", "other")
    now = utcnow()
    async with database.write() as session:
        users = (await session.execute(select(User).order_by(User.id))).scalars().all()
        listed = next(user for user in users if user.nickname == "bench")
        other = next(user for user in users if user.nickname == "other")
        ((node_id,),) = await insert_rows(session, Node, [node_row("node-00000")], [Node.id])
        rows = [instance_row(listed, node_id, position, now) for position in range(count)]
        rows += [instance_row(other, node_id, position, now) for position in range(other_count)]
        await insert_rows(session, Instance, rows)
        if database.dialect == "postgresql":
            # Autovacuum would analyze tables this new within about a minute. Running ANALYZE
            # now gives the planner the statistics that a running deployment has.
            await session.execute(text("ANALYZE"))
    return key


def instance_row(user: User, node_id: int, position: int, now: datetime) -> dict[str, Any]:
    status = STATUSES[position % len(STATUSES)]
    ready = status == InstanceStatus.READY
    return {
        "public_id": new_instance_id(),
        "organization_id": user.organization_id,
        "creator_user_id": user.id,
        "instance_type": InstanceType.GPU_1X_H100_SXM5.value,
        "gpu_count": 1,
        "region": "us-west",
        "node_id": node_id,
        "status": status.value,
        "ip": f"127.77.{position // 250 % 256}.{position % 250 + 1}" if ready else None,
        "ssh_port": 2222 if ready else None,
        "ssh_user": SSH_USER,
        "ssh_public_key": SSH_PUBLIC_KEY,
        "created_at": now - timedelta(seconds=position),
        "updated_at": now,
        "ready_at": now if ready else None,
        "provisioning_deadline": now + timedelta(minutes=5),
        "desired_version": 1,
    }


async def page_cursors(client: httpx.AsyncClient) -> dict[int, str | None]:
    """Walk the pages from the first and return the cursor that fetches each measured page."""
    cursors: dict[int, str | None] = {}
    cursor: str | None = None
    for page in range(1, max(PAGES) + 1):
        if page in PAGES:
            cursors[page] = cursor
        body = (await get_page(client, cursor)).json()
        cursor = body["next_cursor"]
    return cursors


async def get_page(client: httpx.AsyncClient, cursor: str | None) -> httpx.Response:
    params: dict[str, str | int] = {"limit": PAGE_SIZE}
    if cursor is not None:
        params["cursor"] = cursor
    response = await client.get(INSTANCES, params=params)
    if response.status_code != 200:
        raise SystemExit(f"listing failed with {response.status_code}: {response.text}")
    returned = len(response.json()["instances"])
    if returned != PAGE_SIZE:
        raise SystemExit(f"a page returned {returned} instances, expected {PAGE_SIZE}")
    return response


def is_listing_query(statement: str) -> bool:
    return "FROM instances" in statement and "ORDER BY instances.id DESC" in statement


async def listing_plan(
    client: httpx.AsyncClient, database: Database, cursor: str | None
) -> list[str]:
    """Fetch one page and return the query plan of the listing query it sent."""
    recorder = StatementRecorder(is_listing_query)
    event.listen(database.engine.sync_engine, "before_cursor_execute", recorder)
    try:
        await get_page(client, cursor)
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", recorder)
    return await recorder.explain(database)


async def measure(
    url: str, data_dir: Path, options: argparse.Namespace
) -> tuple[dict[int, LatencySummary], dict[int, list[str]]]:
    database = Database(url)
    settings = Settings(data_dir=data_dir, database_url=url, rate_limit_requests=0)
    context = ServiceContext(settings, database, make_notifier(database))
    try:
        await upgrade_to_head(database)
        started = time.perf_counter()
        key = await insert_instances(database, options.instances, options.other_instances)
        inserted = options.instances + options.other_instances
        print(f"inserted {inserted} instances in {time.perf_counter() - started:.1f} s")
        await context.notifier.start()
        transport = httpx.ASGITransport(app=create_app(context))
        headers = {"Authorization": f"Key {key}"}
        async with httpx.AsyncClient(
            transport=transport, base_url=BASE_URL, headers=headers
        ) as client:
            cursors = await page_cursors(client)
            samples: dict[int, list[float]] = {page: [] for page in PAGES}
            for round_number in range(options.warmup + options.repeats):
                # Pages take turns, so load spikes on the shared machine spread over all.
                for page in PAGES:
                    started = time.perf_counter()
                    await get_page(client, cursors[page])
                    if round_number >= options.warmup:
                        samples[page].append(time.perf_counter() - started)
            plans = {
                page: await listing_plan(client, database, cursors[page])
                for page in (min(PAGES), max(PAGES))
            }
        return {page: LatencySummary.of(values) for page, values in samples.items()}, plans
    finally:
        await context.notifier.close()
        await database.dispose()


def main() -> None:
    options = parse_options()
    print_header("list latency against page depth, in process", options)
    with (
        temporary_directory("computeplane-bench-listing-") as directory,
        database_factory(options.postgres, directory) as new_database,
    ):
        url = new_database("bench_listing")
        summaries, plans = asyncio.run(measure(url, directory / "data", options))

    for page, summary in summaries.items():
        print(f"page {page:>3} (limit={PAGE_SIZE}): {summary.format_ms()}")
    first, last = summaries[min(PAGES)], summaries[max(PAGES)]
    mean_ratio = last.mean / first.mean
    p99_ratio = last.p99 / first.p99
    print(
        f"ratio page {max(PAGES)}/page {min(PAGES)}: mean {mean_ratio:.2f}x, p99 {p99_ratio:.2f}x"
    )
    print(
        f"budget: independent of page number, read as a ratio of at most "
        f"{FLAT_RATIO_LIMIT:.1f}x: mean {verdict(mean_ratio, FLAT_RATIO_LIMIT)}, "
        f"p99 {verdict(p99_ratio, FLAT_RATIO_LIMIT)} (informational)"
    )
    for page, plan in plans.items():
        print()
        print(f"listing query plan of page {page}:")
        for line in plan:
            print(f"   {line}")


if __name__ == "__main__":
    main()
