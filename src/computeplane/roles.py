"""The processes computeplane runs: all-in-one ``serve``, or ``api``, ``worker`` and ``agent``.

Each role opens the database (except the agent, which speaks only HTTP), brings the schema
to head under a lock and runs until interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import logging
import signal
import socket
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import uvicorn
from sqlalchemy import text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError

from computeplane.agent.agent import NodeAgent
from computeplane.agent.client import ControlPlaneClient
from computeplane.agent.runtime.claim_registry import ClaimRegistry
from computeplane.agent.runtime.local import LocalRuntime, LocalRuntimeConfig
from computeplane.api.app import BackgroundTask, create_app
from computeplane.api.http_protocol import head_timeout_protocol
from computeplane.domain.errors import (
    ConflictError,
    DatabaseNotInitialized,
    DatabaseUnavailable,
)
from computeplane.domain.fleet import NodeSpec, load_fleet
from computeplane.pidlock import PidLock
from computeplane.services import accounts
from computeplane.services.context import ServiceContext
from computeplane.services.nodes import sync_fleet
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.migrate import current_revision, upgrade_to_head
from computeplane.workers.runner import run_workers

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def open_database(settings: Settings, *, create: bool = True) -> AsyncIterator[Database]:
    """Open the configured database with its schema at head; dispose it on exit.

    With ``create`` false, a database without the schema (or a SQLite file that does not
    exist) raises DatabaseNotInitialized instead of being set up: operator commands use
    this, so a mistyped --data-dir does not leave a new, empty database behind.
    """
    url = settings.resolved_database_url
    parsed = make_url(url)
    display_url = parsed.render_as_string(hide_password=True)
    if not create and _is_missing_sqlite_file(parsed):
        raise DatabaseNotInitialized(
            _not_initialized_message(f"no database file at {parsed.database}")
        )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logger.info("database %s", display_url)
    database = Database(
        url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    try:
        await _check_connection(database, display_url)
        if not create and await current_revision(database) is None:
            raise DatabaseNotInitialized(
                _not_initialized_message(f"{display_url} has no computeplane schema")
            )
        await upgrade_to_head(database)
        yield database
    finally:
        await database.dispose()


async def _check_connection(database: Database, display_url: str) -> None:
    """Open one connection, or raise DatabaseUnavailable naming the URL and the cause."""
    try:
        async with database.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (OSError, TimeoutError, DBAPIError, asyncpg.PostgresError) as error:
        cause = error.orig if isinstance(error, DBAPIError) else error
        logger.info("cannot connect to the database %s: %s", display_url, cause)
        raise DatabaseUnavailable(
            f"cannot connect to the database {display_url}: {cause or type(cause).__name__}. "
            "Check --database-url (COMPUTEPLANE_DATABASE_URL) and that the server is running."
        ) from error


def _is_missing_sqlite_file(url: URL) -> bool:
    """Return whether ``url`` names a SQLite database file that does not exist."""
    if url.get_backend_name() != "sqlite":
        return False
    return not url.database or not Path(url.database).is_file()


def _not_initialized_message(problem: str) -> str:
    return (
        f"{problem}. Run 'computeplane init' or 'computeplane serve' with the same "
        "--data-dir and --database-url first."
    )


async def initialize(settings: Settings) -> bool:
    """Create the schema and, on an empty database, the default organization and admin key."""
    async with open_database(settings) as database:
        return await _bootstrap(database, settings)


async def serve(settings: Settings) -> None:
    """Run the API, the workers and one local agent per fleet node in this process."""
    fleet = load_fleet(settings.fleet_file)
    with holding(PidLock(settings.data_dir / "serve.lock", f"Data directory {settings.data_dir}")):
        register_local_pool(settings)
        await _serve(settings, fleet)


async def _serve(settings: Settings, fleet: list[NodeSpec]) -> None:
    async with open_database(settings) as database:
        await _bootstrap(database, settings)
        tokens = await sync_fleet(database, fleet)
        context = ServiceContext(settings, database, make_notifier(database))

        base_url = f"http://{_connect_host(settings.host)}:{settings.port}"
        runtimes: list[LocalRuntime] = []
        agents: list[NodeAgent] = []
        for name, token in tokens.items():
            runtime = LocalRuntime(local_runtime_config(settings, name))
            runtimes.append(runtime)
            agents.append(
                NodeAgent(
                    name,
                    ControlPlaneClient(base_url, token),
                    runtime,
                    poll_seconds=settings.agent_poll_seconds,
                    heartbeat_seconds=settings.heartbeat_interval_seconds,
                )
            )

        logger.info(
            "serving %d local nodes from %s; instances get addresses from %s, port %d",
            len(fleet),
            settings.fleet_file,
            settings.local_address_pool,
            settings.local_ssh_port,
        )
        try:
            await _run_http(
                context,
                settings,
                background=[lambda: run_workers(context)],
                after_startup=[agent.run for agent in agents],
            )
        finally:
            await asyncio.gather(*(runtime.close() for runtime in runtimes))


async def api(settings: Settings) -> None:
    """Run the HTTP API only."""
    async with open_database(settings) as database:
        context = ServiceContext(settings, database, make_notifier(database))
        await _run_http(context, settings)


async def worker(settings: Settings) -> None:
    """Run the background loops only, until SIGTERM or Ctrl-C."""
    async with open_database(settings) as database:
        context = ServiceContext(settings, database, make_notifier(database))
        await context.notifier.start()
        try:
            await _until_sigterm(run_workers(context))
        finally:
            await context.notifier.close()
            logger.info("worker stopped")


async def agent(settings: Settings, control_plane_url: str, node_token: str) -> None:
    """Run one node's agent with the local runtime, talking to the control plane over HTTP."""
    # Keyed by the token, so several agents on one machine never share instance state.
    state_name = "agent-" + hashlib.sha256(node_token.encode()).hexdigest()[:16]
    config = local_runtime_config(settings, state_name)
    lock = PidLock(config.state_dir.with_suffix(".lock"), f"Agent state {config.state_dir}")
    with holding(lock):
        register_local_pool(settings)
        await _until_sigterm(_run_agent(settings, config, control_plane_url, node_token))


async def _until_sigterm(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main``; on SIGTERM cancel it and wait for its cleanup, as Ctrl-C does.

    Without this, SIGTERM from a service manager would end the process before any
    ``finally`` block ran, leaving an agent's SSH sessions and their processes behind.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main)
    terminated = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, terminated.set)
    waiter = asyncio.ensure_future(terminated.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if terminated.is_set() and not task.done():
            logger.info("SIGTERM received; stopping")
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        await task
    finally:
        waiter.cancel()
        loop.remove_signal_handler(signal.SIGTERM)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _run_agent(
    settings: Settings, config: LocalRuntimeConfig, control_plane_url: str, node_token: str
) -> None:
    runtime = LocalRuntime(config)
    client = ControlPlaneClient(control_plane_url, node_token)
    node_agent = NodeAgent(
        "(not yet known)",
        client,
        runtime,
        poll_seconds=settings.agent_poll_seconds,
        heartbeat_seconds=settings.heartbeat_interval_seconds,
    )
    try:
        await node_agent.run()
    finally:
        await runtime.close()
        await client.aclose()
    if node_agent.node_removed:
        raise ConflictError(
            f"Node {node_agent.name} was removed from the control plane, so this agent stopped "
            "its instances and exited. Add the node again for a new token.",
            code="node_removed",
        )


@contextlib.contextmanager
def holding(lock: PidLock) -> Iterator[None]:
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


def register_local_pool(settings: Settings) -> None:
    """Make this data directory's address claims visible to runtimes of other data dirs."""
    ClaimRegistry().register(_address_dir(settings))


def _address_dir(settings: Settings) -> Path:
    return settings.data_dir / "addresses"


def local_runtime_config(settings: Settings, node_name: str) -> LocalRuntimeConfig:
    return LocalRuntimeConfig(
        state_dir=settings.data_dir / "nodes" / node_name,
        address_dir=_address_dir(settings),
        claim_registry=ClaimRegistry(),
        address_pool=ipaddress.IPv4Network(settings.local_address_pool),
        ssh_port=settings.local_ssh_port,
        start_delay_seconds=settings.local_start_delay_seconds,
    )


async def _bootstrap(database: Database, settings: Settings) -> bool:
    created = await accounts.bootstrap(database, settings.admin_key_file)
    if not created:
        logger.info(
            "database already initialized; the bootstrap admin key file is %s",
            settings.admin_key_file,
        )
    return created


async def _run_http(
    context: ServiceContext,
    settings: Settings,
    *,
    background: Sequence[BackgroundTask] = (),
    after_startup: Sequence[BackgroundTask] = (),
) -> None:
    """Serve the API until a signal stops it.

    ``background`` tasks run for the app's lifetime. ``after_startup`` tasks start once the
    server accepts connections, because embedded agents connect to it over HTTP.
    """
    _check_port_free(settings.host, settings.port)
    app = create_app(context, background=background)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        http=head_timeout_protocol(settings.request_head_timeout_seconds),
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve())
    started: list[asyncio.Task[None]] = []
    try:
        # uvicorn exposes startup and shutdown only as flags, which its own loop polls too.
        while not server.started and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        if server.started:
            started = [asyncio.create_task(task()) for task in after_startup]
        while not server.should_exit and not serving.done():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    finally:
        # Stop the embedded agents and end pending long-polls first, so the server's
        # graceful shutdown does not wait for them.
        await _cancel(started)
        context.notifier.shutdown()
        server.should_exit = True
        await asyncio.gather(serving, return_exceptions=True)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _check_port_free(host: str, port: int) -> None:
    """Raise ConflictError with a hint when the API's address is taken.

    uvicorn would only log the bare socket error. The check is advisory: another process
    may still take the port before uvicorn binds it.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConflictError(
                f"Cannot listen on {host}:{port}: {error.strerror}. Stop the process that "
                "uses it or choose another port with --port.",
                code="address_in_use",
            ) from None


def _connect_host(host: str) -> str:
    """Return an address that reaches a server bound to ``host`` from this machine."""
    if host in {"0.0.0.0", ""}:
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host
