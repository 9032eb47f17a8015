"""The worker loop: runs every background step on an interval and never dies of an error."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from computeplane.services import idempotency, ratelimit
from computeplane.services.context import ServiceContext
from computeplane.workers.deadlines import expire_provisioning
from computeplane.workers.heartbeats import expire_heartbeats

logger = logging.getLogger(__name__)

Step = Callable[[ServiceContext, str], Awaitable[int]]


async def _expire_idempotency(context: ServiceContext, owner: str) -> int:
    return await idempotency.delete_expired(context.database, idempotency_policy(context))


async def _expire_rate_limits(context: ServiceContext, owner: str) -> int:
    return await ratelimit.delete_expired(context.database, context.settings)


_HEARTBEATS = frozenset({"node_heartbeats"})

STEPS: dict[str, Step] = {
    "provisioning_deadlines": expire_provisioning,
    "node_heartbeats": expire_heartbeats,
    "idempotency_expiry": _expire_idempotency,
    "rate_limit_expiry": _expire_rate_limits,
}


def idempotency_policy(context: ServiceContext) -> idempotency.IdempotencyPolicy:
    settings = context.settings
    return idempotency.IdempotencyPolicy(
        ttl_seconds=settings.idempotency_ttl_seconds,
        lease_seconds=settings.idempotency_lease_seconds,
    )


def worker_identity() -> str:
    """Return a lease owner name that identifies the process for operators."""
    return f"{socket.gethostname()}:{os.getpid()}"


async def run_steps_once(
    context: ServiceContext, owner: str, *, skip: frozenset[str] = frozenset()
) -> None:
    """Run every step once; a failing step is logged and does not stop the others."""
    for name, step in STEPS.items():
        if name in skip:
            continue
        try:
            await step(context, owner)
        except Exception:
            logger.exception("worker step %s failed; it runs again next round", name)


async def run_workers(context: ServiceContext, stop: asyncio.Event | None = None) -> None:
    """Run the steps every ``worker_interval_seconds`` until ``stop`` is set or cancelled."""
    owner = worker_identity()
    interval = context.settings.worker_interval_seconds
    logger.info("workers started as %s, every %g seconds", owner, interval)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    # Agents could not report while no worker ran, for instance during a restart of an
    # all-in-one server, so silence is judged only after one full grace period.
    heartbeats_from = loop.time() + context.settings.node_unreachable_after_seconds
    while not stop.is_set():
        warming_up = loop.time() < heartbeats_from
        await run_steps_once(context, owner, skip=_HEARTBEATS if warming_up else frozenset())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
    logger.info("workers stopped")
