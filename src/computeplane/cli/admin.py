"""Operator commands: organizations, users, API keys, nodes and instances.

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
from rich.text import Text

from computeplane import roles
from computeplane.cli.common import (
    DEFAULT_DATA_DIR,
    HELP_MARKUP_MODE,
    DatabaseUrlOption,
    DataDirOption,
    load_settings,
    run,
    warn,
)
from computeplane.domain.catalog import Region, Sector
from computeplane.domain.fleet import NodeSpec
from computeplane.services import accounts, nodes, operations
from computeplane.services.context import ServiceContext
from computeplane.services.operations import UNCHANGED, Unchanged
from computeplane.services.pg_notifier import make_notifier

T = TypeVar("T")

orgs_app = typer.Typer(
    help="Manage organizations.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP_MODE
)
users_app = typer.Typer(
    help="Manage users.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP_MODE
)
keys_app = typer.Typer(
    help="Manage API keys.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP_MODE
)
nodes_app = typer.Typer(
    help="Manage GPU nodes.", no_args_is_help=True, rich_markup_mode=HELP_MARKUP_MODE
)
instances_app = typer.Typer(
    help="List, inspect and delete the instances of every organization.",
    no_args_is_help=True,
    rich_markup_mode=HELP_MARKUP_MODE,
)

stdout = Console()

NICKNAMES_UNIQUE = "Nicknames are unique across all organizations."

#: The largest accepted GPU quota: it fits the database column and exceeds any real fleet.
MAX_GPU_QUOTA = 1_000_000

#: The default --limit of ``instances list``.
DEFAULT_INSTANCE_LIMIT = 200

OrganizationArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="Name of the organization.", show_default=False)
]
NodeNameArgument = Annotated[
    str, typer.Argument(metavar="NAME", help="Name of the node.", show_default=False)
]
InstanceIdArgument = Annotated[
    str,
    typer.Argument(
        metavar="ID", help="Instance id, as the API returns it (inst_...).", show_default=False
    ),
]


def _with_context(
    data_dir: Path,
    database_url: str | None,
    action: Callable[[ServiceContext], Awaitable[T]],
) -> T:
    """Run ``action`` against the configured, initialized database, its schema at head."""
    settings = load_settings(data_dir=data_dir, database_url=database_url, log_level="WARNING")

    async def main() -> T:
        async with roles.open_database(settings, create=False) as database:
            # On PostgreSQL a wake-up sent here reaches the agents' long-polls in every API
            # process; the notifier needs no start() to send. On SQLite it reaches no other
            # process, but every long-poll reads its node's version again each second
            # (services.agents.RECHECK_SECONDS), so the agent reads the change within about
            # a second anyway.
            return await action(ServiceContext(settings, database, make_notifier(database)))

    return run(main())


# orgs


@orgs_app.command("create")
def create_organization(
    name: OrganizationArgument,
    no_compute: Annotated[
        bool, typer.Option("--no-compute", help="Create it without compute permission.")
    ] = False,
    gpu_quota: Annotated[
        int | None,
        typer.Option(
            "--gpu-quota",
            min=0,
            max=MAX_GPU_QUOTA,
            help="Maximum GPUs the organization may hold at once; omit for no limit.",
        ),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
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


@orgs_app.command("list", short_help="List organizations with their quotas, GPUs held and users.")
def list_organizations(
    data_dir: DataDirOption = DEFAULT_DATA_DIR, database_url: DatabaseUrlOption = None
) -> None:
    """List organizations with their compute permission, GPU quota, held GPUs and users.

    GPUS HELD counts the GPUs of instances that their nodes have not released yet, deleted
    instances included: the number that the quota limits.
    """
    organizations = _with_context(
        data_dir, database_url, lambda context: operations.list_organizations(context.database)
    )
    _print_table(
        ["NAME", "COMPUTE", "GPU QUOTA", "GPUS HELD", "USERS"],
        [
            [
                organization.name,
                _yes_no(organization.compute_enabled),
                _quota(organization.gpu_quota),
                str(organization.gpus_held),
                str(organization.user_count),
            ]
            for organization in organizations
        ],
    )


@orgs_app.command("update")
def update_organization(
    ctx: typer.Context,
    name: OrganizationArgument,
    gpu_quota: Annotated[
        int | None,
        typer.Option(
            "--gpu-quota",
            min=0,
            max=MAX_GPU_QUOTA,
            help="New maximum of GPUs the organization may hold at once.",
        ),
    ] = None,
    no_gpu_quota: Annotated[
        bool, typer.Option("--no-gpu-quota", help="Remove the GPU quota: no limit.")
    ] = False,
    compute: Annotated[
        bool | None,
        typer.Option(
            "--compute/--no-compute",
            show_default=False,
            help="Grant or withdraw compute permission. Without it, the organization's "
            "keys get 403 from the compute API.",
        ),
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Change an organization's GPU quota or compute permission.

    Running instances are never stopped: a quota below the GPUs held only makes new creates
    fail until usage drops.
    """
    if gpu_quota is not None and no_gpu_quota:
        ctx.fail("--gpu-quota and --no-gpu-quota exclude each other; pass one.")
    if gpu_quota is None and not no_gpu_quota and compute is None:
        ctx.fail(
            "nothing to change: pass --gpu-quota N, --no-gpu-quota, --compute or --no-compute."
        )

    new_quota: int | Unchanged | None = UNCHANGED
    if no_gpu_quota:
        new_quota = None
    elif gpu_quota is not None:
        new_quota = gpu_quota
    updated = _with_context(
        data_dir,
        database_url,
        lambda context: operations.update_organization(
            context.database, name, compute_enabled=compute, gpu_quota=new_quota
        ),
    )

    typer.echo(
        f"organization {name} updated: compute {_yes_no(updated.compute_enabled)}, "
        f"GPU quota {_quota(updated.gpu_quota)}, {_count(updated.gpus_held, 'GPU')} held",
        err=True,
    )
    if isinstance(new_quota, int) and updated.gpus_held > new_quota:
        warn(
            f"organization {name} holds {_count(updated.gpus_held, 'GPU')}, more than its new "
            f"quota of {new_quota}, so new creates will be rejected until its usage drops "
            "below the quota."
        )


# users


@users_app.command("create")
def create_user(
    nickname: Annotated[
        str,
        typer.Argument(
            metavar="NICKNAME",
            help=f"Nickname of the new user. {NICKNAMES_UNIQUE}",
            show_default=False,
        ),
    ],
    org: Annotated[str, typer.Option("--org", help="Organization the user belongs to.")],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create a user in an organization.

    Nicknames are unique across all organizations, so a nickname taken in one organization
    cannot be used in another.
    """
    _with_context(
        data_dir,
        database_url,
        lambda context: accounts.create_user(context.database, nickname, org),
    )
    typer.echo(f"user {nickname} created in {org}", err=True)


@users_app.command("list", short_help="List users with their organization and key counts.")
def list_users(
    org: Annotated[
        str | None, typer.Option("--org", help="List only this organization's users.")
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """List users with their organization and their active and revoked API keys.

    Nicknames are unique across all organizations.
    """
    users = _with_context(
        data_dir,
        database_url,
        lambda context: accounts.list_users(context.database, organization_name=org),
    )
    _print_table(
        ["NICKNAME", "ORGANIZATION", "ACTIVE KEYS", "REVOKED KEYS", "CREATED"],
        [
            [
                user.nickname,
                user.organization_name,
                str(user.active_key_count),
                str(user.revoked_key_count),
                _time(user.created_at),
            ]
            for user in users
        ],
        caption=NICKNAMES_UNIQUE,
    )


# keys


@keys_app.command("create")
def create_key(
    user: Annotated[str, typer.Option("--user", help="Nickname of the key's user.")],
    scope: Annotated[
        str, typer.Option("--scope", help="admin (compute API access) or api.")
    ] = "admin",
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Create an API key and print it once, alone on stdout."""
    issued = _with_context(
        data_dir, database_url, lambda context: accounts.create_key(context.database, user, scope)
    )
    typer.echo(issued.value)


@keys_app.command("revoke")
def revoke_key(
    key_id: Annotated[
        str,
        typer.Argument(
            metavar="KEY_ID", help="The part of the key before ':'.", show_default=False
        ),
    ],
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Revoke an API key. Revoking a revoked key changes nothing and succeeds."""
    revocation = _with_context(
        data_dir, database_url, lambda context: accounts.revoke_key_once(context.database, key_id)
    )
    if revocation.newly_revoked:
        typer.echo(f"key {key_id} revoked", err=True)
    else:
        typer.echo(f"key {key_id} was already revoked at {_time(revocation.revoked_at)}", err=True)


@keys_app.command("list")
def list_keys(
    data_dir: DataDirOption = DEFAULT_DATA_DIR, database_url: DatabaseUrlOption = None
) -> None:
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


# nodes


@nodes_app.command("add", short_help="Register a node and print its agent token once.")
def add_node(
    name: NodeNameArgument,
    region: Annotated[Region, typer.Option("--region", help="fal region of the node.")],
    gpus: Annotated[int, typer.Option("--gpus", min=1, max=8, help="Number of GPUs.")],
    sector: Annotated[
        Sector | None, typer.Option("--sector", help="InfiniBand sector, if any.")
    ] = None,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Register a node and print its agent token once, alone on stdout."""
    spec = NodeSpec(name=name, region=region, sector=sector, gpu_count=gpus)
    token = _with_context(
        data_dir, database_url, lambda context: nodes.add_node(context.database, spec)
    )
    typer.echo(token)


@nodes_app.command("list", short_help="List nodes with their GPUs, state and heartbeat.")
def list_nodes(
    data_dir: DataDirOption = DEFAULT_DATA_DIR, database_url: DatabaseUrlOption = None
) -> None:
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
    name: NodeNameArgument,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Stop placing new instances on a node; its instances keep running."""
    _with_context(data_dir, database_url, lambda context: nodes.drain_node(context.database, name))
    typer.echo(f"node {name} drained", err=True)


@nodes_app.command("undrain")
def undrain_node(
    name: NodeNameArgument,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Place new instances on a drained node again."""
    was_draining = _with_context(
        data_dir, database_url, lambda context: nodes.undrain_node(context.database, name)
    )
    if was_draining:
        typer.echo(f"node {name} undrained", err=True)
    else:
        typer.echo(f"node {name} was not drained; nothing changed", err=True)


@nodes_app.command("remove", short_help="Remove a node; its agent tears down its instances.")
def remove_node(
    name: NodeNameArgument,
    force: Annotated[
        bool, typer.Option("--force", help="Stop the node's instances and free their GPUs.")
    ] = False,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Remove a node; its agent then tears down every instance and exits."""
    _with_context(
        data_dir, database_url, lambda context: nodes.remove_node(context, name, force=force)
    )
    typer.echo(f"node {name} removed", err=True)


# instances


@instances_app.command("list")
def list_instances(
    org: Annotated[
        str | None, typer.Option("--org", help="List only this organization's instances.")
    ] = None,
    node: Annotated[
        str | None, typer.Option("--node", help="List only the instances placed on this node.")
    ] = None,
    include_deleted: Annotated[
        bool, typer.Option("--all", help="Include deleted instances, with their deletion time.")
    ] = False,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Show at most this many, the newest.")
    ] = DEFAULT_INSTANCE_LIMIT,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """List instances of every organization, newest first.

    ADDRESS is the SSH endpoint that the node last reported, or '-'.
    """
    # Fetching one row more than shown reveals whether older instances were left out.
    instances = _with_context(
        data_dir,
        database_url,
        lambda context: operations.list_instances(
            context.database,
            organization_name=org,
            node_name=node,
            include_deleted=include_deleted,
            limit=limit + 1,
        ),
    )
    truncated = len(instances) > limit
    instances = instances[:limit]
    headers = [
        "ID",
        "ORGANIZATION",
        "CREATOR",
        "TYPE",
        "REGION",
        "SECTOR",
        "NODE",
        "STATUS",
        "ADDRESS",
        "CREATED",
    ]
    rows = [
        [
            instance.public_id,
            instance.organization_name,
            instance.creator_nickname,
            instance.instance_type,
            instance.region,
            instance.sector or "-",
            instance.node_name,
            instance.status,
            _address(instance.ip, instance.ssh_port),
            _time(instance.created_at),
        ]
        for instance in instances
    ]
    if include_deleted:
        headers.append("DELETED")
        for row, instance in zip(rows, instances, strict=True):
            row.append(_time(instance.deleted_at))
    _print_table(headers, rows)
    if truncated:
        warn(f"only the newest {limit} instances are shown; pass --limit to see more.")


@instances_app.command("delete", short_help="Delete any organization's instance.")
def delete_instance(
    instance_id: InstanceIdArgument,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """Delete any organization's instance, as its owner's DELETE request would.

    The instance disappears from its owner's API at once and stops with reason 'deleted';
    its node tears it down and then frees its GPUs.
    """
    node_name = _with_context(
        data_dir,
        database_url,
        lambda context: operations.delete_instance(context, instance_id),
    )
    typer.echo(
        f"instance {instance_id} deleted and queued for teardown on node {node_name}", err=True
    )


@instances_app.command("events", short_help="List an instance's status changes.")
def list_instance_events(
    instance_id: InstanceIdArgument,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
) -> None:
    """List an instance's status changes, oldest first, deleted instances included.

    ACTOR is who made the change: user:NICKNAME, operator, an agent or a worker.
    """
    events = _with_context(
        data_dir,
        database_url,
        lambda context: operations.list_instance_events(context.database, instance_id),
    )
    _print_table(
        ["TIME", "FROM", "TO", "REASON", "MESSAGE", "ACTOR", "REQUEST ID"],
        [
            [
                _time(event.created_at),
                event.from_status or "-",
                event.to_status,
                event.reason,
                event.message or "-",
                event.actor,
                event.request_id or "-",
            ]
            for event in events
        ],
    )


def _print_table(headers: list[str], rows: list[list[str]], *, caption: str | None = None) -> None:
    """Print a table for people on a terminal, or tab-separated lines for other programs.

    Neither form ever shortens a value, so an id printed here can be passed to another command.
    The caption appears on a terminal only, so piped output stays one header line and rows.
    """
    if not stdout.is_terminal:
        for row in [headers, *rows]:
            typer.echo("\t".join(_one_line(cell) for cell in row))
        return
    table = Table(caption=caption)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        # Text cells are printed as they are; plain strings would be parsed as rich markup.
        table.add_row(*(Text(cell) for cell in row))
    stdout.print(table)


def _one_line(cell: str) -> str:
    """Replace tabs and line breaks, which would split a piped row, with spaces."""
    return " ".join(cell.replace("\t", " ").splitlines())


def _time(value: datetime | None) -> str:
    return value.isoformat(timespec="seconds") if value else "-"


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _yes_no(value: bool) -> str:
    return "yes" if value else "no"


def _quota(gpu_quota: int | None) -> str:
    return "unlimited" if gpu_quota is None else str(gpu_quota)


def _address(ip: str | None, port: int | None) -> str:
    if ip is None or port is None:
        return "-"
    host = f"[{ip}]" if ":" in ip else ip
    return f"{host}:{port}"
