"""Operator commands: organizations, users, API keys and nodes.

They act on the database directly, so they work before any server runs; everything a user
does goes through the HTTP API instead.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from computeplane import roles
from computeplane.cli.common import DatabaseUrlOption, DataDirOption, load_settings, run
from computeplane.domain.catalog import Region, Sector
from computeplane.domain.fleet import NodeSpec
from computeplane.services import accounts, nodes
from computeplane.services.context import ServiceContext
from computeplane.services.notifier import DesiredStateNotifier

T = TypeVar("T")

orgs_app = typer.Typer(help="Manage organizations.", no_args_is_help=True)
users_app = typer.Typer(help="Manage users.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
nodes_app = typer.Typer(help="Manage GPU nodes.", no_args_is_help=True)

stdout = Console()


def _with_context(
    data_dir: Path | None,
    database_url: str | None,
    action: Callable[[ServiceContext], Awaitable[T]],
) -> T:
    """Run ``action`` against the configured database, its schema brought to head first."""
    settings = load_settings(data_dir=data_dir, database_url=database_url, log_level="WARNING")

    async def main() -> T:
        async with roles.open_database(settings) as database:
            return await action(ServiceContext(settings, database, DesiredStateNotifier()))

    return run(main())


@orgs_app.command("create")
def create_organization(
    name: str,
    no_compute: Annotated[
        bool, typer.Option("--no-compute", help="Create it without compute permission.")
    ] = False,
    gpu_quota: Annotated[
        int | None,
        typer.Option(
            "--gpu-quota", min=0, help="Most GPUs it may hold at once [default: no limit]."
        ),
    ] = None,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create an organization."""
    _with_context(
        data_dir,
        database_url,
        lambda context: accounts.create_organization(
            context.database, name, compute_enabled=not no_compute, gpu_quota=gpu_quota
        ),
    )
    typer.echo(f"organization {name} created", err=True)


@users_app.command("create")
def create_user(
    nickname: str,
    org: Annotated[str, typer.Option("--org", help="Organization the user belongs to.")],
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a user in an organization."""
    _with_context(
        data_dir,
        database_url,
        lambda context: accounts.create_user(context.database, nickname, org),
    )
    typer.echo(f"user {nickname} created in {org}", err=True)


@keys_app.command("create")
def create_key(
    user: Annotated[str, typer.Option("--user", help="Nickname of the key's user.")],
    scope: Annotated[
        str, typer.Option("--scope", help="admin (compute API access) or api.")
    ] = "admin",
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create an API key and print it once, alone on stdout."""
    issued = _with_context(
        data_dir, database_url, lambda context: accounts.create_key(context.database, user, scope)
    )
    typer.echo(issued.value)


@keys_app.command("revoke")
def revoke_key(
    key_id: str,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke an API key by its key id (the part before ':')."""
    _with_context(
        data_dir, database_url, lambda context: accounts.revoke_key(context.database, key_id)
    )
    typer.echo(f"key {key_id} revoked", err=True)


@keys_app.command("list")
def list_keys(data_dir: DataDirOption = None, database_url: DatabaseUrlOption = None) -> None:
    """List API keys (ids only; secrets are never stored)."""
    keys = _with_context(
        data_dir, database_url, lambda context: accounts.list_keys(context.database)
    )
    _print_table(
        ["KEY ID", "SCOPE", "USER", "ORGANIZATION", "CREATED", "REVOKED"],
        [
            [
                key.key_id,
                key.scope,
                key.user_nickname,
                key.organization_name,
                _time(key.created_at),
                _time(key.revoked_at),
            ]
            for key in keys
        ],
    )


@nodes_app.command("add")
def add_node(
    name: str,
    region: Annotated[Region, typer.Option("--region", help="fal region of the node.")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, max=8, help="Number of GPUs.")],
    sector: Annotated[
        Sector | None, typer.Option("--sector", help="InfiniBand sector, if any.")
    ] = None,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Register a node and print its agent token once, alone on stdout."""
    spec = NodeSpec(name=name, region=region, sector=sector, gpu_count=gpus)
    token = _with_context(
        data_dir, database_url, lambda context: nodes.add_node(context.database, spec)
    )
    typer.echo(token)


@nodes_app.command("list")
def list_nodes(data_dir: DataDirOption = None, database_url: DatabaseUrlOption = None) -> None:
    """List nodes with their free and used GPUs, state and last heartbeat."""
    summaries = _with_context(
        data_dir, database_url, lambda context: nodes.list_nodes(context.database)
    )
    _print_table(
        [
            "NAME",
            "REGION",
            "SECTOR",
            "GPUS",
            "FREE",
            "USED",
            "INSTANCES",
            "STATE",
            "AGENT",
            "LAST HEARTBEAT",
        ],
        [
            [
                node.name,
                node.region,
                node.sector or "-",
                str(node.gpu_count),
                str(node.gpus_free),
                str(node.gpu_count - node.gpus_free),
                str(node.instance_count),
                node.state,
                "reporting" if node.reachable else "silent",
                _time(node.last_heartbeat_at),
            ]
            for node in summaries
        ],
    )


@nodes_app.command("drain")
def drain_node(
    name: str, data_dir: DataDirOption = None, database_url: DatabaseUrlOption = None
) -> None:
    """Stop placing new instances on a node; its instances keep running."""
    _with_context(data_dir, database_url, lambda context: nodes.drain_node(context.database, name))
    typer.echo(f"node {name} drained", err=True)


@nodes_app.command("remove")
def remove_node(
    name: str,
    force: Annotated[
        bool, typer.Option("--force", help="Stop the node's instances and free their GPUs.")
    ] = False,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Remove a node and invalidate its agent token."""
    _with_context(
        data_dir, database_url, lambda context: nodes.remove_node(context, name, force=force)
    )
    typer.echo(f"node {name} removed", err=True)


def _print_table(headers: list[str], rows: list[list[str]]) -> None:
    """Print a table for people on a terminal, or tab-separated lines for other programs.

    Neither form ever shortens a value, so an id printed here can be passed to another command.
    """
    if not stdout.is_terminal:
        for row in [headers, *rows]:
            typer.echo("\t".join(row))
        return
    table = Table()
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*row)
    stdout.print(table)


def _time(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"
