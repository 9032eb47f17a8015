"""The fleet file: a TOML list of the GPU nodes the embedded agents serve.

Each ``[[nodes]]`` table has a ``name``, a ``region`` (one of fal's regions), an optional
``sector`` (an InfiniBand fabric inside the region) and ``gpus``, the GPU count.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

from computeplane.domain.catalog import GPU_MODEL_H100_SXM5, MAX_GPUS_PER_NODE, Region, Sector
from computeplane.domain.errors import InvalidRequest

NODE_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    region: Region
    sector: Sector | None
    gpu_count: int
    gpu_model: str = GPU_MODEL_H100_SXM5


def load_fleet(path: Path) -> list[NodeSpec]:
    """Read and validate a fleet file; raise InvalidRequest naming the file and the entry."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise InvalidRequest(f"Cannot read fleet file {path}: {error}") from error

    entries = document.get("nodes")
    if not isinstance(entries, list) or not entries:
        raise InvalidRequest(f"Fleet file {path} declares no [[nodes]].")

    nodes = [_node_spec(path, position, entry) for position, entry in enumerate(entries, 1)]
    names = [node.name for node in nodes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise InvalidRequest(f"Fleet file {path} names these nodes twice: {', '.join(duplicates)}")
    return nodes


def validate_node_spec(node: NodeSpec) -> None:
    """Raise InvalidRequest if the node's name or GPU count is out of range."""
    if not NODE_NAME_PATTERN.match(node.name):
        raise InvalidRequest(
            f"node name '{node.name}' is invalid: use lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, at most 128 characters."
        )
    if not 1 <= node.gpu_count <= MAX_GPUS_PER_NODE:
        raise InvalidRequest(
            f"node '{node.name}' has {node.gpu_count} GPUs; a node has 1 to {MAX_GPUS_PER_NODE}."
        )


def _node_spec(path: Path, position: int, entry: object) -> NodeSpec:
    where = f"fleet file {path}, node #{position}"
    if not isinstance(entry, dict):
        raise InvalidRequest(f"{where}: expected a table.")
    unknown = sorted(set(entry) - {"name", "region", "sector", "gpus", "gpu_model"})
    if unknown:
        raise InvalidRequest(f"{where}: unknown keys {', '.join(unknown)}.")

    name, region, sector, gpus = (entry.get(k) for k in ("name", "region", "sector", "gpus"))
    if not isinstance(name, str):
        raise InvalidRequest(f"{where}: 'name' must be a string.")
    if region not in set(Region):
        raise InvalidRequest(
            f"{where}: region must be one of {', '.join(Region)}, got {region!r}."
        )
    if sector is not None and sector not in set(Sector):
        raise InvalidRequest(
            f"{where}: sector must be one of {', '.join(Sector)}, got {sector!r}."
        )
    if not isinstance(gpus, int) or isinstance(gpus, bool):
        raise InvalidRequest(f"{where}: 'gpus' must be an integer.")

    node = NodeSpec(
        name=name,
        region=Region(region),
        sector=Sector(sector) if sector is not None else None,
        gpu_count=gpus,
        gpu_model=str(entry.get("gpu_model", GPU_MODEL_H100_SXM5)),
    )
    validate_node_spec(node)
    return node
