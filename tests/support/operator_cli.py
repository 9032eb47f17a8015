"""Run operator commands (``computeplane orgs|users|keys|nodes``) and read their listings.

Without a terminal on stdout, the listings are tab-separated lines with a header line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from support.processes import computeplane_environment, run_computeplane


@dataclass(frozen=True)
class OperatorCli:
    """Operator commands against one database and data directory."""

    data_dir: Path
    database_url: str
    env: Mapping[str, str]

    @classmethod
    def create(
        cls,
        data_dir: Path,
        database_url: str,
        overrides: Mapping[str, str] | None = None,
    ) -> OperatorCli:
        environment = computeplane_environment(overrides)
        return cls(data_dir, database_url, environment)

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``computeplane ARGS`` with this database and data directory."""
        return run_computeplane(
            [*args, "--data-dir", str(self.data_dir), "--database-url", self.database_url],
            env=self.env,
        )

    def output(self, *args: str) -> str:
        """Run a command that must succeed and return its stdout."""
        result = self.run(*args)
        assert result.returncode == 0, (
            f"computeplane {' '.join(args)} exited with {result.returncode}: {result.stderr}"
        )
        return result.stdout

    def nodes(self) -> dict[str, dict[str, str]]:
        """Return the rows of ``nodes list`` by node name."""
        return {row["NAME"]: row for row in parse_table(self.output("nodes", "list"))}

    def keys(self) -> dict[str, dict[str, str]]:
        """Return the rows of ``keys list`` by key id."""
        return {row["KEY ID"]: row for row in parse_table(self.output("keys", "list"))}


def parse_table(text: str) -> list[dict[str, str]]:
    """Return the rows of a listing printed to a pipe: a header line, then tab-separated rows."""
    lines = [line for line in text.splitlines() if line]
    if not lines:
        return []
    headers = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        cells = line.split("\t")
        assert len(cells) == len(headers), f"row {cells} does not match headers {headers}"
        rows.append(dict(zip(headers, cells, strict=True)))
    return rows


def table(cli: OperatorCli, *args: str) -> list[dict[str, str]]:
    """Run a listing command that must succeed and return its rows."""
    return parse_table(cli.output(*args))
