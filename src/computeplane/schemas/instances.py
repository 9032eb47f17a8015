"""Request and response bodies of ``/v1/compute/instances``, as fal's Compute API defines them.

Responses omit absent optional fields instead of sending ``null``. Beyond fal's fields they
carry ``ssh_user``, ``ssh_port``, ``created_at`` and ``status_reason``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from computeplane.domain.errors import InvalidSSHKey
from computeplane.domain.sshkeys import MAX_SSH_KEY_LENGTH, parse_public_key

InstanceTypeName = Literal["gpu_1x_h100_sxm5", "gpu_8x_h100_sxm5"]
RegionName = Literal["us-west", "us-central", "us-east", "eu-north", "eu-west", "other"]
SectorName = Literal["sector_1", "sector_2", "sector_3"]
StatusName = Literal["init", "pending", "provisioning", "ready", "stopped", "unknown"]


class InstanceCreate(BaseModel):
    """The body of a create request; unknown fields are rejected.

    ``ssh_key`` keeps the text as sent, so the idempotency fingerprint covers exactly what
    the client sent. The validator only checks it; the service stores the rebuilt line.
    """

    model_config = ConfigDict(extra="forbid")

    instance_type: InstanceTypeName
    # An empty key is rejected by the validator below with code invalid_ssh_key.
    ssh_key: str = Field(max_length=4 * MAX_SSH_KEY_LENGTH, json_schema_extra={"minLength": 1})
    sector: SectorName | None = None

    @field_validator("ssh_key")
    @classmethod
    def _check_ssh_key(cls, value: str) -> str:
        try:
            parse_public_key(value)
        except InvalidSSHKey as error:
            raise PydanticCustomError("invalid_ssh_key", error.message) from None
        return value

    @model_validator(mode="after")
    def _check_sector(self) -> Self:
        if self.sector is not None and self.instance_type != "gpu_8x_h100_sxm5":
            raise PydanticCustomError(
                "sector_not_allowed",
                "sector applies only to gpu_8x_h100_sxm5 instances; omit it for "
                f"{self.instance_type}.",
            )
        return self


class InstanceOut(BaseModel):
    """One compute instance as the API returns it."""

    id: str
    instance_type: InstanceTypeName
    region: RegionName
    status: StatusName
    sector: SectorName | None = None
    ip: str | None = None
    creator_user_nickname: str | None = None
    ssh_user: str | None = None
    ssh_port: int | None = None
    created_at: datetime | None = None
    status_reason: str | None = None


class InstanceList(BaseModel):
    """One page of instances; ``next_cursor`` is null on the last page."""

    instances: list[InstanceOut]
    next_cursor: str | None
    has_more: bool
