"""uvicorn's HTTP protocol with a deadline for receiving a request's headers.

uvicorn closes idle keep-alive connections but sets no deadline on a request head that is
still arriving, so a client that sends headers one byte at a time keeps its connection
forever. This protocol closes any connection whose request line and headers take longer
than ``head_timeout`` seconds, counted from the request's first byte. Before the first
request and between requests, the keep-alive timeout applies instead.
The body has its own deadline in ``RequestContextMiddleware``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger(__name__)

#: Seconds a client has to send a request line and headers.
DEFAULT_HEAD_TIMEOUT = 10.0


class HeadTimeoutProtocol(HttpToolsProtocol):
    head_timeout = DEFAULT_HEAD_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A new connection that sends nothing is treated like an idle keep-alive one. A
        # busy client may connect well before it writes its first request.
        self._arm(self.timeout_keep_alive, "no request")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm(self.head_timeout, "no complete request headers")

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _arm(self, seconds: float, what: str) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._timed_out, seconds, what)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _timed_out(self, seconds: float, what: str) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            logger.info(
                "closing connection from %s: %s within %g seconds",
                self.client[0] if self.client else "unknown",
                what,
                seconds,
            )
            self.transport.close()


def head_timeout_protocol(seconds: float) -> type[HeadTimeoutProtocol]:
    """Return the protocol class with ``seconds`` as its header deadline."""
    return type("HeadTimeoutProtocol", (HeadTimeoutProtocol,), {"head_timeout": seconds})
