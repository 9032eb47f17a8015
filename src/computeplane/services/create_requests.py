"""A create request end to end: validation result in, stored response out, at most once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.catalog import InstanceType, Sector
from computeplane.domain.sshkeys import parse_public_key
from computeplane.services import idempotency, instances
from computeplane.services.auth import Principal
from computeplane.services.context import ServiceContext
from computeplane.services.idempotency import Reservation, StoredResponse
from computeplane.services.instances import InstanceView

CREATED = 201

Render = Callable[[InstanceView], bytes]


async def create_instance_request(
    context: ServiceContext,
    principal: Principal,
    body: dict[str, Any],
    idempotency_key: str | None,
    render: Render,
) -> StoredResponse:
    """Create an instance from a validated request body and return the response to send.

    ``body`` is the parsed JSON as the client sent it. With an ``idempotency_key`` the
    instance and its stored response commit in one transaction, and a repeat replays it.
    """
    instance_type = InstanceType(body["instance_type"])
    sector = Sector(body["sector"]) if body.get("sector") else None
    key_line = parse_public_key(body["ssh_key"]).line

    async def create(reservation: Reservation | None) -> StoredResponse:
        rendered: list[StoredResponse] = []

        async def before_commit(session: AsyncSession, view: InstanceView) -> None:
            response = StoredResponse(CREATED, render(view))
            if reservation is not None:
                await reservation.complete(session, response)
            rendered.append(response)

        await instances.create_instance(
            context, principal, instance_type, key_line, sector, before_commit=before_commit
        )
        return rendered[0]

    if idempotency_key is None:
        return await create(None)

    policy = idempotency.IdempotencyPolicy(
        ttl_seconds=context.settings.idempotency_ttl_seconds,
        lease_seconds=context.settings.idempotency_lease_seconds,
    )
    return await idempotency.run_once(
        context.database,
        policy,
        principal.organization_id,
        idempotency_key,
        idempotency.fingerprint(body),
        create,
    )
