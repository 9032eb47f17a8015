"""``/internal/v1/agent``: the node agents' API, authenticated by node token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from computeplane.api.dependencies import AgentNode, Context
from computeplane.schemas.agent import DesiredInstanceBody, DesiredStateBody, ObservedReportBody
from computeplane.services import agents
from computeplane.services.agents import ObservedInstance, ObservedReport

router = APIRouter(prefix="/internal/v1/agent", include_in_schema=False)

#: Longest long-poll an agent may ask for, in seconds.
MAX_WAIT_SECONDS = 60.0


@router.get("/desired", response_model=DesiredStateBody)
async def desired_state(
    node: AgentNode,
    context: Context,
    after: Annotated[int, Query(ge=0)] = 0,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
) -> DesiredStateBody:
    """Return the node's desired state once its version differs from ``after``."""
    state = await agents.wait_for_desired_state(context, node, after, wait)
    return DesiredStateBody(
        node_name=node.name,
        version=state.version,
        node_removed=state.node_removed,
        heartbeat_interval_seconds=context.settings.heartbeat_interval_seconds,
        instances=[
            DesiredInstanceBody(
                instance_id=item.instance_id,
                ssh_public_key=item.ssh_public_key,
                ssh_user=item.ssh_user,
                gpu_indices=list(item.gpu_indices),
            )
            for item in state.instances
        ],
    )


@router.post("/report", status_code=204)
async def report(body: ObservedReportBody, node: AgentNode, context: Context) -> None:
    """Record the node's heartbeat and what it observes of its instances."""
    observed = ObservedReport(
        applied_version=body.applied_version,
        instances=[
            ObservedInstance(
                instance_id=item.instance_id,
                state=item.state,
                ip=item.ip,
                ssh_port=item.ssh_port,
                message=item.message,
            )
            for item in body.instances
        ],
    )
    await agents.apply_report(context, node, observed)
