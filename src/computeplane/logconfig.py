"""Logging: configured once by the command line, with the request id on every line."""

from __future__ import annotations

import contextvars
import logging
import sys

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "computeplane_request_id", default=None
)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    _request_id.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds ``request_id`` to every record; ``-`` outside a request."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = _request_id.get() or "-"
        return True


class QuietAgentPolls(logging.Filter):
    """Drops access-log lines of successful agent polls and reports, sent every few seconds."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 5:
            path, status = str(args[2]), args[4]
            if path.startswith("/internal/v1/agent/") and isinstance(status, int):
                return status >= 400
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send computeplane's, uvicorn's and alembic's logs to stderr in one format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").addFilter(QuietAgentPolls())
    # Statement logs would print bound parameters, and with them key hashes and SSH keys.
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    # One line per agent long-poll and per migration check would drown the lifecycle lines.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
