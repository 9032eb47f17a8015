"""The ASGI application."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from computeplane import __version__
from computeplane.api import dependencies
from computeplane.api.errors import install_error_handlers
from computeplane.api.middleware import RequestContextMiddleware
from computeplane.api.openapi import install_openapi
from computeplane.api.routes import agent, instances
from computeplane.services.context import ServiceContext

logger = logging.getLogger(__name__)

BackgroundTask = Callable[[], Coroutine[Any, Any, None]]


def create_app(context: ServiceContext, *, background: Sequence[BackgroundTask] = ()) -> FastAPI:
    """Build the API around ``context``.

    ``background`` coroutines (workers, embedded agents) run for the app's lifetime and are
    cancelled at shutdown.
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await context.notifier.start()
        tasks = [asyncio.create_task(_guarded(task)) for task in background]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await context.notifier.close()

    app = FastAPI(
        title="computeplane",
        version=__version__,
        summary="fal-compatible Compute Instances API for your own GPU fleet",
        lifespan=lifespan,
        # The interactive pages load their scripts from a CDN; /openapi.json is served.
        docs_url=None,
        redoc_url=None,
    )
    app.state.context = context
    app.include_router(instances.router)
    app.include_router(agent.router)
    install_error_handlers(
        app,
        access_checks={
            instances.router.prefix: dependencies.check_compute_admin,
            agent.router.prefix: dependencies.check_agent_node,
        },
    )
    install_openapi(app)
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=context.settings.max_request_bytes,
        body_timeout=context.settings.request_body_timeout_seconds,
    )
    return app


async def _guarded(task: BackgroundTask) -> None:
    try:
        await task()
    except asyncio.CancelledError:
        raise
    except Exception:
        logger.exception("background task %s stopped with an error", task)
