"""Commands that run computeplane's long-lived processes and prepare their database."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from computeplane import roles
from computeplane.cli.common import (
    DEFAULT_DATA_DIR,
    DEFAULT_LOG_LEVEL,
    DatabaseUrlOption,
    DataDirOption,
    LogLevelOption,
    load_settings,
    run,
    setting_default,
)

DEFAULT_HOST: str = setting_default("host")
DEFAULT_PORT: int = setting_default("port")

HostOption = Annotated[
    str,
    typer.Option(
        "--host", envvar="COMPUTEPLANE_HOST", show_envvar=True, help="Address to listen on."
    ),
]
PortOption = Annotated[
    int,
    typer.Option(
        "--port", envvar="COMPUTEPLANE_PORT", show_envvar=True, help="TCP port to listen on."
    ),
]
AgentDataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="COMPUTEPLANE_DATA_DIR",
        show_envvar=True,
        help="Directory for the agent's instance state, kept in "
        "nodes/agent-<token hash>/ inside it.",
    ),
]


def serve(
    host: HostOption = DEFAULT_HOST,
    port: PortOption = DEFAULT_PORT,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
    fleet_file: Annotated[
        Path | None,
        typer.Option(
            "--fleet-file",
            envvar="COMPUTEPLANE_FLEET_FILE",
            show_envvar=True,
            show_default="the packaged two-region fleet",
            help="TOML file declaring the nodes that this process runs agents for.",
        ),
    ] = None,
    log_level: LogLevelOption = DEFAULT_LOG_LEVEL,
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
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = DEFAULT_LOG_LEVEL,
) -> None:
    """Create the schema and, on an empty database, the default organization and admin key."""
    settings = load_settings(data_dir=data_dir, database_url=database_url, log_level=log_level)
    created = run(roles.initialize(settings))
    if created:
        typer.echo(f"initialized; the admin API key is in {settings.admin_key_file}", err=True)
    else:
        typer.echo("already initialized", err=True)


def api(
    host: HostOption = DEFAULT_HOST,
    port: PortOption = DEFAULT_PORT,
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = DEFAULT_LOG_LEVEL,
) -> None:
    """Serve the HTTP API only; run any number of these against one PostgreSQL database."""
    settings = load_settings(
        host=host, port=port, data_dir=data_dir, database_url=database_url, log_level=log_level
    )
    run(roles.api(settings))


def worker(
    data_dir: DataDirOption = DEFAULT_DATA_DIR,
    database_url: DatabaseUrlOption = None,
    log_level: LogLevelOption = DEFAULT_LOG_LEVEL,
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
            show_envvar=True,
            help="Agent token that 'computeplane nodes add' printed; prefer the environment "
            "variable, because other users can read a process's arguments.",
        ),
    ],
    data_dir: AgentDataDirOption = DEFAULT_DATA_DIR,
    log_level: LogLevelOption = DEFAULT_LOG_LEVEL,
) -> None:
    """Run one node's agent with the local runtime."""
    settings = load_settings(data_dir=data_dir, log_level=log_level)
    run(roles.agent(settings, control_plane, node_token))
