"""Options and error handling shared by every command."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.text import Text

from computeplane.domain.errors import ComputeplaneError
from computeplane.logconfig import configure_logging
from computeplane.settings import Settings

T = TypeVar("T")

stderr = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Directory for the SQLite database, keys and instance state "
        "[env: COMPUTEPLANE_DATA_DIR; default: the per-user data directory].",
        show_default=False,
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB "
        "[env: COMPUTEPLANE_DATABASE_URL; default: SQLite in the data directory].",
        show_default=False,
    ),
]
LogLevelOption = Annotated[
    str | None,
    typer.Option(
        "--log-level",
        help="DEBUG, INFO, WARNING or ERROR [env: COMPUTEPLANE_LOG_LEVEL; default: INFO].",
        show_default=False,
    ),
]


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, apply the given options and configure logging."""
    try:
        settings = Settings().with_overrides(**overrides)
    except (ValidationError, ValueError) as error:
        fail(f"invalid configuration: {_describe(error)}", exit_code=2)
    configure_logging(settings.log_level)
    return settings


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; print a ComputeplaneError's message and exit 1 on failure."""
    try:
        return asyncio.run(coroutine)
    except ComputeplaneError as error:
        fail(error.message)
    except KeyboardInterrupt:
        sys.exit(130)


def fail(message: str, *, exit_code: int = 1) -> NoReturn:
    stderr.print(Text("error: ", style="red") + Text(message), highlight=False)
    raise typer.Exit(exit_code)


def _describe(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'settings'}: {item['msg']}"
            for item in error.errors()
        )
    return str(error)
