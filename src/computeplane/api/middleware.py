"""The outermost ASGI layer: request ids, body limits and the last-resort 500."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from computeplane.api.errors import domain_error_response, error_response, internal_error_response
from computeplane.domain.errors import RequestTooLarge
from computeplane.domain.ids import new_request_id
from computeplane.logconfig import reset_request_id, set_request_id

logger = logging.getLogger(__name__)

#: Name of the scope entry where handlers leave headers for the response, e.g. rate limits.
EXTRA_HEADERS_KEY = "computeplane.response_headers"


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _ClientGone(Exception):
    pass


class RequestContextMiddleware:
    """Stamp each request with an id, bound its body, and turn any crash into a 500.

    The id goes to the ``X-Request-Id`` response header, to every log line of the request
    and to error bodies. A body larger than ``max_body_bytes`` gets 413, and one that takes
    longer than ``body_timeout`` seconds to arrive gets 408, so slow clients cannot hold a
    request open forever. An unexpected exception is logged with its traceback and gets
    with a 500 in the error envelope.
    """

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = new_request_id()
        token = set_request_id(request_id)
        scope[EXTRA_HEADERS_KEY] = {}
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                headers["X-Request-Id"] = request_id
                for name, value in scope[EXTRA_HEADERS_KEY].items():
                    headers.setdefault(name, value)
            await send(message)

        try:
            declared = _declared_length(scope)
            if declared is not None and declared > self.max_body_bytes:
                raise _BodyTooLarge()
            body = await self._read_body(receive)
            await self.app(scope, _replay(body, receive), send_with_headers)
        except _BodyTooLarge:
            await self._reply(started, send_with_headers, scope, self._too_large())
        except _ClientGone:
            logger.info("client disconnected before sending the whole request body")
        except _BodyTimeout:
            response = error_response(
                408, "validation_error", "request_timeout", "The request body arrived too slowly."
            )
            await self._reply(started, send_with_headers, scope, response)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            await self._reply(started, send_with_headers, scope, internal_error_response())
        finally:
            reset_request_id(token)

    async def _read_body(self, receive: Receive) -> bytes:
        """Read the whole body before the app runs, within the size and time limits.

        Reading it here keeps both limits in one place: the framework would turn an error
        raised while it reads the body into a generic 400. The time limit covers the whole
        body, so a client cannot stretch it by trickling bytes.
        """
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self._read_chunks(receive)
        except TimeoutError:
            raise _BodyTimeout() from None

    async def _read_chunks(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        received = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone()
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_body_bytes:
                raise _BodyTooLarge()
            chunks.append(chunk)
            more_body = message.get("more_body", False)
        return b"".join(chunks)

    def _too_large(self) -> Any:
        return domain_error_response(
            RequestTooLarge(f"The request body exceeds the limit of {self.max_body_bytes} bytes.")
        )

    async def _reply(self, started: bool, send: Send, scope: Scope, response: Any) -> None:
        if started:
            # Headers are already on the wire; the client sees a truncated response.
            return
        await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


def _replay(body: bytes, receive: Receive) -> Receive:
    """Return a receive callable that yields ``body`` once, then the client's own events."""
    delivered = False

    async def replay_receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay_receive


def _declared_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
