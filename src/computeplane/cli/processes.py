"""Commands that run computeplane's long-lived processes and prepare their database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from computeplane import roles
from computeplane.cli.common import (
    DatabaseUrlOption,
    DataDirOption,
    LogLevelOption,
    load_settings,
    run,
)

HostOption = Annotated[
    str | None,
    typer.Option("--host", help="Address to listen on [default: 127.0.0.1].", show_default=False),
]
PortOption = Annotated[
    int | None,
    typer.Option("--port", help="TCP port to listen on [default: 8000].", show_default=False),
]


def serve(
    host: HostOption = None,
    port: PortOption = None,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
    fleet_file: Annotated[
        Path | None,
        typer.Option(
            "--fleet-file",
            help="TOML file declaring the local fleet [env: COMPUTEPLANE_FLEET_FILE; "
            "default: the packaged two-region fleet].",
            show_default=False,
        ),
    ] = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run the API, the workers and a local agent for every fleet node in one process."""
    settings = load_settings(
        host=host,
        port=port,
        data_dir=data_dir,
        database_url=database_url,
        fleet_file=fleet_file,
        log_level=log_level,
    )
    run(roles.serve(settings))


def init(
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Create the schema and, on an empty database, the default organization and admin key."""
    settings = load_settings(data_dir=data_dir, database_url=database_url, log_level=log_level)
    created = run(roles.initialize(settings))
    if created:
        typer.echo(f"initialized; the admin API key is in {settings.admin_key_file}", err=True)
    else:
        typer.echo("already initialized", err=True)


def api(
    host: HostOption = None,
    port: PortOption = None,
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Serve the HTTP API only; run any number of these against one PostgreSQL database."""
    settings = load_settings(
        host=host, port=port, data_dir=data_dir, database_url=database_url, log_level=log_level
    )
    run(roles.api(settings))


def worker(
    data_dir: DataDirOption = None,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run the background loops only; any number may run at once."""
    settings = load_settings(data_dir=data_dir, database_url=database_url, log_level=log_level)
    run(roles.worker(settings))


def agent(
    control_plane: Annotated[
        str,
        typer.Option("--control-plane", help="Base URL of the control plane's API."),
    ],
    node_token: Annotated[
        str,
        typer.Option(
            "--node-token",
            envvar="COMPUTEPLANE_NODE_TOKEN",
            help="The token printed by 'computeplane nodes add' [env: COMPUTEPLANE_NODE_TOKEN].",
            show_envvar=False,
        ),
    ],
    data_dir: DataDirOption = None,
    log_level: LogLevelOption = None,
) -> None:
    """Run one node's agent with the local runtime."""
    settings = load_settings(data_dir=data_dir, log_level=log_level)
    run(roles.agent(settings, control_plane, node_token))
