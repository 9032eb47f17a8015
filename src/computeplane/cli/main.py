"""The ``computeplane`` command: processes and operator commands."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from computeplane import __version__
from computeplane.cli import admin, processes
from computeplane.cli.common import HELP_MARKUP_MODE, check_arguments_utf8

app = typer.Typer(
    name="computeplane",
    help="GPU compute control plane serving fal's Compute Instances API for your own fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=HELP_MARKUP_MODE,
)
# Short help is what the command list shows; it fits beside the names in 80 columns.
app.command(short_help="Run the API, the workers and the fleet's agents in one process.")(
    processes.serve
)
app.command(short_help="Create the schema and, on an empty database, the admin API key.")(
    processes.init
)
app.command(short_help="Serve only the HTTP API; replicas share a PostgreSQL database.")(
    processes.api
)
app.command()(processes.worker)
app.command()(processes.agent)
app.add_typer(admin.orgs_app, name="orgs")
app.add_typer(admin.users_app, name="users")
app.add_typer(admin.keys_app, name="keys")
app.add_typer(admin.nodes_app, name="nodes")
app.add_typer(admin.instances_app, name="instances")


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """computeplane"""
    check_arguments_utf8(sys.argv[1:])


def main() -> None:
    app()
