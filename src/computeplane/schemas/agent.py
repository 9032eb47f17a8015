"""Bodies of the internal agent API under ``/internal/v1/agent``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from computeplane.domain.agent import ObservedState


class DesiredInstanceBody(BaseModel):
    instance_id: str
    ssh_public_key: str
    ssh_user: str
    gpu_indices: list[int]


class DesiredStateBody(BaseModel):
    """The instances that should run on the node, at a version that only grows."""

    node_name: str
    version: int
    instances: list[DesiredInstanceBody]
    heartbeat_interval_seconds: float
    node_removed: bool = False


class ObservedInstanceBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instance_id: str = Field(max_length=64)
    state: ObservedState
    ip: str | None = Field(default=None, max_length=64)
    ssh_port: int | None = Field(default=None, ge=1, le=65535)
    message: str | None = Field(default=None, max_length=2000)


class ObservedReportBody(BaseModel):
    """Everything the agent runs or is changing, after applying ``applied_version``."""

    model_config = ConfigDict(extra="forbid")

    applied_version: int = Field(ge=0)
    instances: list[ObservedInstanceBody] = Field(max_length=10_000)
