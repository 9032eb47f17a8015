"""The interface between the node agent and whatever runs instances on a host."""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class InstanceSpec:
    """What a runtime needs to start one instance.

    ``ssh_public_key`` is a single ``type base64 [comment]`` line that the control plane
    rebuilt from a parsed key; runtimes install it as the only key that may log in.
    """

    instance_id: str
    ssh_public_key: str
    gpu_indices: tuple[int, ...]
    ssh_user: str = "ubuntu"


@dataclass(frozen=True)
class Endpoint:
    """Where a started instance accepts SSH connections."""

    ip: str
    port: int


class Runtime(abc.ABC):
    """Starts and stops the instances of one node.

    Calls for different instances may run concurrently; the agent never runs two calls for
    the same instance at once.
    """

    @abc.abstractmethod
    async def start(self, spec: InstanceSpec) -> Endpoint:
        """Start the instance, or restore it from state left by an earlier process.

        Restoring keeps the instance's address, host key and files. Starting an instance
        that already runs returns its endpoint. On failure, raise ``RuntimeFailure`` with a
        message fit for the instance's ``status_reason``, after releasing whatever the
        attempt took, so the agent can report the failure as final.
        """

    @abc.abstractmethod
    async def stop(self, instance_id: str) -> None:
        """Stop the instance and delete its state. Safe to repeat; unknown ids are no-ops."""

    @abc.abstractmethod
    async def list_instances(self) -> list[str]:
        """Return the ids of instances that have state on this node, running or not."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop serving every endpoint but keep the state, so a later start restores it."""
