"""The instance status machine: statuses, the reasons for a change, and the allowed moves.

Statuses are fal's enum; their meanings here:

- ``init``: accepted, not yet placed. computeplane places an instance inside the create
  request, so a created instance starts at ``pending`` and ``init`` is never stored.
- ``pending``: placed on a node, waiting for the node agent to start it.
- ``provisioning``: the agent is starting it.
- ``ready``: reachable over SSH; ``ip`` is set.
- ``stopped``: ended. Visible instances are stopped by the runtime exiting, a failed or
  timed-out start, or the node's removal; ``status_reason`` says which. A user delete also
  ends an instance in ``stopped``, but a deleted instance is no longer visible.
- ``unknown``: the node stopped reporting; the status returns to what the node observes
  when it reports again.
"""

from __future__ import annotations

import enum

from computeplane.domain.errors import ComputeplaneError


class InstanceStatus(enum.StrEnum):
    INIT = "init"
    PENDING = "pending"
    PROVISIONING = "provisioning"
    READY = "ready"
    STOPPED = "stopped"
    UNKNOWN = "unknown"


class StatusReason(enum.StrEnum):
    """Why an instance changed status; stored with every instance event."""

    PLACED = "placed"
    AGENT_STARTING = "agent_starting"
    AGENT_RUNNING = "agent_running"
    AGENT_PENDING = "agent_pending"
    RUNTIME_FAILED = "runtime_failed"
    RUNTIME_LOST = "runtime_lost"
    PROVISIONING_TIMEOUT = "provisioning_timeout"
    NODE_UNREACHABLE = "node_unreachable"
    NODE_REMOVED = "node_removed"
    DELETED = "deleted"


_ALLOWED: dict[InstanceStatus | None, frozenset[InstanceStatus]] = {
    None: frozenset({InstanceStatus.PENDING}),
    InstanceStatus.INIT: frozenset({InstanceStatus.PENDING, InstanceStatus.STOPPED}),
    InstanceStatus.PENDING: frozenset(
        {
            InstanceStatus.PROVISIONING,
            InstanceStatus.READY,
            InstanceStatus.STOPPED,
            InstanceStatus.UNKNOWN,
        }
    ),
    InstanceStatus.PROVISIONING: frozenset(
        {InstanceStatus.READY, InstanceStatus.STOPPED, InstanceStatus.UNKNOWN}
    ),
    InstanceStatus.READY: frozenset({InstanceStatus.STOPPED, InstanceStatus.UNKNOWN}),
    InstanceStatus.UNKNOWN: frozenset(
        {
            InstanceStatus.PENDING,
            InstanceStatus.PROVISIONING,
            InstanceStatus.READY,
            InstanceStatus.STOPPED,
        }
    ),
    InstanceStatus.STOPPED: frozenset(),
}

#: Statuses in which an instance is expected to run on its node.
ACTIVE_STATUSES = frozenset(
    {
        InstanceStatus.PENDING,
        InstanceStatus.PROVISIONING,
        InstanceStatus.READY,
        InstanceStatus.UNKNOWN,
    }
)


class InvalidTransition(ComputeplaneError):
    """Raised for a status change that the status machine does not allow; a bug if seen."""

    code = "invalid_transition"


def can_transition(current: InstanceStatus | None, target: InstanceStatus) -> bool:
    return target in _ALLOWED[current]


def check_transition(current: InstanceStatus | None, target: InstanceStatus) -> None:
    """Raise InvalidTransition unless ``current`` may move to ``target``."""
    if not can_transition(current, target):
        raise InvalidTransition(f"Instance status cannot change from {current} to {target}.")
