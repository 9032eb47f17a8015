"""The ``computeplane`` command: processes and operator commands."""

from __future__ import annotations

import typer

from computeplane import __version__
from computeplane.cli import admin, processes

app = typer.Typer(
    name="computeplane",
    help="GPU compute control plane serving fal's Compute Instances API for your own fleet.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command()(processes.serve)
app.command()(processes.init)
app.command()(processes.api)
app.command()(processes.worker)
app.command()(processes.agent)
app.add_typer(admin.orgs_app, name="orgs")
app.add_typer(admin.users_app, name="users")
app.add_typer(admin.keys_app, name="keys")
app.add_typer(admin.nodes_app, name="nodes")


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version."
    ),
) -> None:
    """computeplane"""


def main() -> None:
    app()
