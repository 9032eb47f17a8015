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

# soft_wrap keeps each message on one line, also when stderr is a pipe or a log file.
stderr = Console(stderr=True, soft_wrap=True)

#: Help is printed as plain text, the same on every terminal. Rich help would read the
#: "[...]" parts of help text as markup and drop them, and it prints "<bool>" beside flags.
HELP_MARKUP_MODE = None


def setting_default(name: str) -> Any:
    """Return the default of a ``Settings`` field, so help never repeats it by hand."""
    return Settings.model_fields[name].get_default(call_default_factory=True)


#: The per-user data directory, for example ``~/.local/share/computeplane`` on Linux.
DEFAULT_DATA_DIR: Path = setting_default("data_dir")
DEFAULT_LOG_LEVEL: str = setting_default("log_level")

# Options read their COMPUTEPLANE_* variable themselves, so help can show its name. They
# pass the same value that Settings would read, and the option given on the command line
# takes precedence over both.
DataDirOption = Annotated[
    Path,
    typer.Option(
        "--data-dir",
        envvar="COMPUTEPLANE_DATA_DIR",
        show_envvar=True,
        help="Directory for the SQLite database, the admin key file and instance state.",
    ),
]
DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="COMPUTEPLANE_DATABASE_URL",
        show_envvar=True,
        show_default="SQLite in the data directory",
        help="sqlite:///PATH or postgresql://USER:PASSWORD@HOST/DB.",
    ),
]
LogLevelOption = Annotated[
    str,
    typer.Option(
        "--log-level",
        envvar="COMPUTEPLANE_LOG_LEVEL",
        show_envvar=True,
        help="DEBUG, INFO, WARNING or ERROR.",
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


def check_arguments_utf8(arguments: list[str]) -> None:
    """Exit with status 2 if an argument is not valid UTF-8.

    Such bytes reach Python as lone surrogates, which no database driver can encode.
    """
    for argument in arguments:
        try:
            argument.encode("utf-8")
        except UnicodeEncodeError:
            fail("every argument must be valid UTF-8 text.", exit_code=2)


def warn(message: str) -> None:
    """Print a warning line on stderr without stopping the command."""
    stderr.print(Text("warning: ", style="yellow") + Text(message), highlight=False)


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
