"""What a node agent observes about an instance, as it reports it to the control plane."""

from __future__ import annotations

import enum


class ObservedState(enum.StrEnum):
    """The agent's view of one instance on its node.

    ``failed`` means the start failed and the runtime already released everything it took;
    the control plane may free the GPUs at once.
    """

    STARTING = "starting"
    RUNNING = "running"
    FAILED = "failed"
    STOPPING = "stopping"
