"""``/v1/compute/instances``: fal's Compute Instances API."""

from __future__ import annotations

import json
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response

from computeplane.api.dependencies import ComputeAdmin, Context, IdempotencyKey
from computeplane.api.openapi import CREATE_RESPONSES, ITEM_RESPONSES, LIST_RESPONSES
from computeplane.schemas.instances import InstanceCreate, InstanceList, InstanceOut
from computeplane.services import instances
from computeplane.services.create_requests import create_instance_request
from computeplane.services.instances import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, InstanceView

router = APIRouter(prefix="/v1/compute/instances", tags=["Compute"])

JSON = "application/json"

InstanceId = Annotated[str, Path(alias="id", min_length=1, description="The instance's id.")]


@router.post("", status_code=201, response_model=InstanceOut, responses=CREATE_RESPONSES)
async def create_instance(
    body: InstanceCreate,
    principal: ComputeAdmin,
    context: Context,
    idempotency_key: IdempotencyKey,
) -> Response:
    """Create a GPU instance; it starts ``pending`` and becomes ``ready`` with an ``ip``."""
    stored = await create_instance_request(
        context,
        principal,
        body.model_dump(mode="json", exclude_unset=True),
        idempotency_key,
        render_instance,
    )
    headers = {"Idempotent-Replayed": "true"} if stored.replayed else None
    return Response(stored.body, status_code=stored.status_code, media_type=JSON, headers=headers)


@router.get("", response_model=InstanceList, responses=LIST_RESPONSES)
async def list_instances(
    principal: ComputeAdmin,
    context: Context,
    limit: Annotated[
        int,
        Query(ge=1, description=f"Page size; values above {MAX_PAGE_SIZE} are capped."),
    ] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page.")] = None,
) -> Response:
    """List the organization's instances, newest first."""
    page = await instances.list_instances(context, principal, min(limit, MAX_PAGE_SIZE), cursor)
    body = InstanceList(
        instances=[_instance_out(view) for view in page.instances],
        next_cursor=page.next_cursor,
        has_more=page.next_cursor is not None,
    )
    return Response(_dump_list(body), media_type=JSON)


@router.get("/{id}", response_model=InstanceOut, responses=ITEM_RESPONSES)
async def get_instance(
    instance_id: InstanceId, principal: ComputeAdmin, context: Context
) -> Response:
    view = await instances.get_instance(context, principal, instance_id)
    return Response(render_instance(view), media_type=JSON)


@router.delete("/{id}", status_code=204, responses=ITEM_RESPONSES)
async def delete_instance(
    instance_id: InstanceId, principal: ComputeAdmin, context: Context
) -> Response:
    """Delete the instance: it disappears at once and its node tears it down."""
    await instances.delete_instance(context, principal, instance_id)
    return Response(status_code=204)


def render_instance(view: InstanceView) -> bytes:
    return _instance_out(view).model_dump_json(exclude_none=True).encode()


def _instance_out(view: InstanceView) -> InstanceOut:
    return InstanceOut.model_validate(
        {
            "id": view.public_id,
            "instance_type": view.instance_type,
            "region": view.region,
            "status": view.status,
            "sector": view.sector,
            "ip": view.ip,
            "creator_user_nickname": view.creator_user_nickname,
            "ssh_user": view.ssh_user,
            "ssh_port": view.ssh_port,
            "created_at": view.created_at,
            "status_reason": view.status_reason,
        }
    )


def _dump_list(body: InstanceList) -> bytes:
    # next_cursor stays in the body when null, because the schema requires it.
    payload = {
        "instances": [item.model_dump(mode="json", exclude_none=True) for item in body.instances],
        "next_cursor": body.next_cursor,
        "has_more": body.has_more,
    }
    return json.dumps(payload, separators=(",", ":")).encode()
