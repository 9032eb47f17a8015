"""Measure create latency: concurrent 1x creates against a real ``computeplane api`` process.

The script prepares a database (SQLite by default, PostgreSQL with ``--postgres``) with
enough 8-GPU nodes for every create. It starts ``computeplane api`` on a free loopback port
with the rate limit off, warms it up and then sends ``--requests`` creates over
``--concurrency`` keep-alive connections. No agent runs, so the instances stay ``pending``
and the figure covers the API's create path alone. Budget: p99 at most 100 ms with 32
concurrent clients on a 2-core machine.

Run: .venv/bin/python benchmarks/bench_create.py [--postgres] [--requests N] [--concurrency C]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    GPUS_PER_NODE,
    INSTANCES,
    ONE_GPU,
    SSH_PUBLIC_KEY,
    LatencySummary,
    add_postgres_option,
    create_account,
    database_factory,
    insert_rows,
    ms,
    node_row,
    print_header,
    temporary_directory,
    verdict,
)

from computeplane.store.database import Database
from computeplane.store.migrate import upgrade_to_head
from computeplane.store.models import Node
from support.processes import (
    COMPUTEPLANE,
    POLL_INTERVAL_SECONDS,
    READY_TIMEOUT_SECONDS,
    ComputeplaneProcess,
    computeplane_environment,
    free_port,
)

P99_BUDGET_SECONDS = 0.100
# Only keeps a hung server from hanging the run. A slower create counts as a ReadTimeout.
REQUEST_TIMEOUT_SECONDS = 120.0
PROFILE_STOP_TIMEOUT_SECONDS = 60.0


@dataclass(frozen=True)
class Result:
    """One create: the status code, or the transport error's class name, and its latency."""

    status: str
    seconds: float


def parse_options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_postgres_option(parser)
    parser.add_argument("--requests", type=int, default=2000, help="measured creates")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent connections")
    parser.add_argument("--warmup", type=int, default=100, help="unmeasured creates first")
    parser.add_argument(
        "--organizations",
        type=int,
        default=1,
        help="spread the clients over this many organizations, each with its own key "
        "(creates of one organization wait for each other on its row lock)",
    )
    parser.add_argument(
        "--log-dir",
        type=Path,
        metavar="DIR",
        help="keep the server's stdout and stderr in DIR [default: a temporary directory]",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the server under cProfile and write its statistics to FILE",
    )
    return parser.parse_args(argv)


async def prepare_database(url: str, nodes: int, organizations: int) -> list[str]:
    """Create the schema, the nodes and one admin key per organization; return the keys."""
    database = Database(url)
    try:
        await upgrade_to_head(database)
        async with database.write() as session:
            rows = [node_row(f"bench-{index:05d}") for index in range(nodes)]
            await insert_rows(session, Node, rows)
        return [
            await create_account(database, f"bench-org-{index}", f"bench-user-{index}")
            for index in range(organizations)
        ]
    finally:
        await database.dispose()


def start_api(
    data_dir: Path, database_url: str, log_dir: Path, profile: Path | None
) -> tuple[ComputeplaneProcess, str]:
    port = free_port()
    process = ComputeplaneProcess(
        [
            "api",
            "--port",
            str(port),
            "--data-dir",
            str(data_dir),
            "--database-url",
            database_url,
        ],
        env=computeplane_environment({"COMPUTEPLANE_RATE_LIMIT_REQUESTS": "0"}),
        log_dir=log_dir,
        name="api",
    )
    if profile is not None:
        process.args = [
            sys.executable,
            "-m",
            "cProfile",
            "-o",
            str(profile.resolve()),
            str(COMPUTEPLANE),
            *process.args[1:],
        ]
    process.start()
    return process, f"http://127.0.0.1:{port}"


def wait_until_serving(process: ComputeplaneProcess, base_url: str, key: str) -> None:
    """Poll the instance list until it returns 200; exit if the server exits or times out."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    with httpx.Client(base_url=base_url, timeout=10.0) as client:
        while True:
            if not process.running:
                sys.exit(f"the API process exited during startup: {process.describe()}")
            try:
                response = client.get(INSTANCES, headers={"Authorization": f"Key {key}"})
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                sys.exit(f"the API did not answer within {READY_TIMEOUT_SECONDS:.0f} s")
            time.sleep(POLL_INTERVAL_SECONDS)


async def send_creates(
    base_url: str, keys: Sequence[str], total: int, concurrency: int
) -> tuple[list[Result], float]:
    """Send ``total`` creates over ``concurrency`` connections; return results and wall time.

    Client ``i`` uses ``keys[i % len(keys)]``, so clients spread evenly over organizations.
    """
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_SECONDS)
    body = {"instance_type": ONE_GPU, "ssh_key": SSH_PUBLIC_KEY}
    remaining = iter(range(total))
    results: list[Result] = []

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout) as client:

        async def run_client(index: int) -> None:
            headers = {"Authorization": f"Key {keys[index % len(keys)]}"}
            # The shared iterator hands each request number to exactly one client.
            for _ in remaining:
                started = time.perf_counter()
                try:
                    response = await client.post(INSTANCES, json=body, headers=headers)
                    status = str(response.status_code)
                except httpx.HTTPError as error:
                    status = type(error).__name__
                results.append(Result(status, time.perf_counter() - started))

        started = time.perf_counter()
        await asyncio.gather(*(run_client(index) for index in range(concurrency)))
        elapsed = time.perf_counter() - started
    return results, elapsed


def stop_api(process: ComputeplaneProcess, profile: Path | None) -> None:
    if profile is not None and process.running:
        # SIGINT ends the server through asyncio's KeyboardInterrupt, so the program exits
        # normally and cProfile writes its file. After SIGTERM, uvicorn re-raises the signal
        # and the process dies before cProfile writes anything.
        os.kill(process.pid, signal.SIGINT)
        deadline = time.monotonic() + PROFILE_STOP_TIMEOUT_SECONDS
        while process.running and time.monotonic() < deadline:
            time.sleep(POLL_INTERVAL_SECONDS)
    process.stop()


def report(results: list[Result], elapsed: float) -> None:
    summary = LatencySummary.of([result.seconds for result in results])
    statuses = collections.Counter(result.status for result in results)
    print(f"creates:     {summary.count} in {elapsed:.2f} s")
    print(f"throughput:  {summary.count / elapsed:.1f} creates/s")
    print(f"latency:     {summary.format_ms()}")
    print(f"statuses:    {dict(sorted(statuses.items()))}")
    print(
        f"budget:      p99 {ms(summary.p99)} vs {ms(P99_BUDGET_SECONDS)}: "
        f"{verdict(summary.p99, P99_BUDGET_SECONDS)} (informational)"
    )


def main() -> None:
    options = parse_options()
    print_header("create latency through a computeplane api process", options)
    # Every create takes one GPU, so the fleet has room for the warmup and measured creates.
    nodes = math.ceil((options.warmup + options.requests) / GPUS_PER_NODE)

    with (
        temporary_directory("computeplane-bench-create-") as directory,
        database_factory(options.postgres, directory) as new_database,
    ):
        database_url = new_database("bench_create")
        keys = asyncio.run(prepare_database(database_url, nodes, options.organizations))
        print(f"fleet:       {nodes} nodes x {GPUS_PER_NODE} GPUs, {options.organizations} org(s)")
        data_dir = directory / "data"
        log_dir = options.log_dir or directory / "logs"
        process, base_url = start_api(data_dir, database_url, log_dir, options.profile)
        try:
            wait_until_serving(process, base_url, keys[0])
            warmup, _ = asyncio.run(
                send_creates(base_url, keys, options.warmup, options.concurrency)
            )
            warmup_failures = sum(1 for result in warmup if result.status != "201")
            print(f"warmup:      {len(warmup)} creates, {warmup_failures} not 201")
            client_cpu_started = time.process_time()
            results, elapsed = asyncio.run(
                send_creates(base_url, keys, options.requests, options.concurrency)
            )
            client_cpu = time.process_time() - client_cpu_started
        finally:
            stop_api(process, options.profile)
        report(results, elapsed)
        print(f"client CPU:  {client_cpu:.1f} s in this process (the server runs apart)")
        if options.profile is not None:
            print(f"profile:     {options.profile}")


if __name__ == "__main__":
    main()
