"""The instance types, regions and sectors that fal's Compute API names."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class InstanceType(enum.StrEnum):
    GPU_1X_H100_SXM5 = "gpu_1x_h100_sxm5"
    GPU_8X_H100_SXM5 = "gpu_8x_h100_sxm5"

    @property
    def spec(self) -> InstanceTypeSpec:
        return INSTANCE_TYPES[self]


class Region(enum.StrEnum):
    US_WEST = "us-west"
    US_CENTRAL = "us-central"
    US_EAST = "us-east"
    EU_NORTH = "eu-north"
    EU_WEST = "eu-west"
    OTHER = "other"


class Sector(enum.StrEnum):
    """An InfiniBand fabric joining whole 8-GPU nodes inside a region."""

    SECTOR_1 = "sector_1"
    SECTOR_2 = "sector_2"
    SECTOR_3 = "sector_3"


@dataclass(frozen=True)
class InstanceTypeSpec:
    """What an instance type occupies on a node.

    ``whole_node`` types take every GPU of a node whose GPU count equals ``gpu_count``, so
    nothing else shares the host or its InfiniBand links.
    """

    gpu_count: int
    gpu_model: str
    whole_node: bool
    allows_sector: bool


GPU_MODEL_H100_SXM5 = "h100_sxm5"

#: The largest node the catalog knows: an HGX board with eight SXM GPUs.
MAX_GPUS_PER_NODE = 8

INSTANCE_TYPES: dict[InstanceType, InstanceTypeSpec] = {
    InstanceType.GPU_1X_H100_SXM5: InstanceTypeSpec(
        gpu_count=1, gpu_model=GPU_MODEL_H100_SXM5, whole_node=False, allows_sector=False
    ),
    InstanceType.GPU_8X_H100_SXM5: InstanceTypeSpec(
        gpu_count=8, gpu_model=GPU_MODEL_H100_SXM5, whole_node=True, allows_sector=True
    ),
}
