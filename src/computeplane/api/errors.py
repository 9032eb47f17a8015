"""The one place where errors become HTTP responses in fal's error envelope.

Every error body is ``{"error": {"type", "message", "code", "request_id"}}``. ``type`` is one
of fal's values and ``code`` is computeplane's stable machine-readable code.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from computeplane.domain import errors
from computeplane.logconfig import current_request_id
from computeplane.schemas.errors import ErrorDetail, ErrorResponse, ErrorType

logger = logging.getLogger(__name__)

# An error maps through the first class of its MRO that is listed here.
_STATUS: dict[type[errors.ComputeplaneError], tuple[int, ErrorType]] = {
    errors.InvalidRequest: (400, "validation_error"),
    errors.AuthenticationFailed: (401, "authorization_error"),
    errors.PermissionDenied: (403, "authorization_error"),
    errors.NotFound: (404, "not_found"),
    errors.IdempotencyInFlight: (409, "validation_error"),
    errors.ConflictError: (409, "validation_error"),
    errors.RequestTooLarge: (413, "validation_error"),
    errors.IdempotencyKeyReused: (422, "validation_error"),
    errors.RateLimited: (429, "rate_limited"),
    errors.InsufficientCapacity: (503, "server_error"),
}

_METHODS = ("DELETE", "GET", "PATCH", "POST", "PUT")

_ROUTING_ERRORS: dict[int, tuple[ErrorType, str, str]] = {
    400: ("validation_error", "invalid_request", "The request body is not valid JSON."),
    404: ("not_found", "not_found", "No such endpoint."),
    405: ("validation_error", "method_not_allowed", "Method not allowed for this endpoint."),
}


def error_response(
    status: int,
    error_type: ErrorType,
    code: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """Build an error response in the envelope, stamped with the current request id."""
    body = ErrorResponse(
        error=ErrorDetail(
            type=error_type,
            message=message,
            code=code,
            request_id=current_request_id() or "-",
        )
    )
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def domain_error_response(error: errors.ComputeplaneError) -> JSONResponse:
    status, error_type = _status_of(error)
    headers: dict[str, str] = {}
    if isinstance(error, errors.AuthenticationFailed):
        headers["WWW-Authenticate"] = 'Key realm="computeplane"'
    if isinstance(error, errors.IdempotencyInFlight | errors.InsufficientCapacity):
        headers["Retry-After"] = str(error.retry_after)
    if isinstance(error, errors.RateLimited):
        headers["Retry-After"] = str(error.retry_after)
        headers.update(error.rate_limit_headers)

    log = logger.warning if status >= 500 else logger.info
    log("request failed with %d %s: %s", status, error.code, error.message)
    return error_response(status, error_type, error.code, error.message, headers)


def internal_error_response() -> JSONResponse:
    return error_response(
        500,
        "server_error",
        "internal_error",
        "The server failed to handle the request; report the request_id to the operator.",
    )


#: Raises a ComputeplaneError if the request may not use the route at all.
AccessCheck = Callable[[Request], Awaitable[None]]


def install_error_handlers(
    app: FastAPI, *, access_checks: Mapping[str, AccessCheck] | None = None
) -> None:
    """Map every error to the envelope.

    FastAPI parses a JSON body before it runs the route's dependencies, so a malformed body
    would be reported before a missing key. For paths under a prefix of ``access_checks``,
    that prefix's check runs first and its error wins over the body's.
    """
    checks = dict(access_checks or {})

    async def access_denied(request: Request) -> JSONResponse | None:
        for prefix, check in checks.items():
            if not request.url.path.startswith(prefix):
                continue
            try:
                await check(request)
            except errors.ComputeplaneError as denied:
                return domain_error_response(denied)
        return None

    async def handle_validation_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        if _is_unparsed_body(error) and (denied := await access_denied(request)):
            return denied
        return await _handle_validation_error(request, error)

    async def handle_http_exception(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        # FastAPI raises a plain 400 for a body that is not UTF-8.
        if error.status_code == 400 and (denied := await access_denied(request)):
            return denied
        return await _handle_http_exception(request, error)

    app.add_exception_handler(errors.ComputeplaneError, _handle_domain_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)


def _is_unparsed_body(error: RequestValidationError) -> bool:
    """Return whether the body failed to parse, so that no dependency has run yet."""
    return any(detail.get("type") == "json_invalid" for detail in error.errors())


async def _handle_domain_error(_request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, errors.ComputeplaneError)
    return domain_error_response(error)


async def _handle_validation_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestValidationError)
    if _has_body(request) and not _is_json(request.headers.get("content-type")):
        message = "Send the request body as JSON with 'Content-Type: application/json'."
        logger.info("request rejected with 415 unsupported_media_type")
        return error_response(415, "validation_error", "unsupported_media_type", message)

    code, message = describe_validation_errors(error.errors())
    logger.info("request rejected with 400 %s: %s", code, message)
    return error_response(400, "validation_error", code, message)


async def _handle_http_exception(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    fallback: tuple[ErrorType, str, str] = (
        "server_error" if error.status_code >= 500 else "validation_error",
        "invalid_request",
        str(error.detail),
    )
    error_type, code, message = _ROUTING_ERRORS.get(error.status_code, fallback)
    headers = dict(error.headers or {})
    if error.status_code == 405:
        # Starlette names only the methods of the first route whose path matched.
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(error.status_code, error_type, code, message, headers)


def _allowed_methods(request: Request) -> list[str]:
    """Return every method that some route serves on the request's path, sorted."""
    routes = request.app.router.routes
    return [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]


def _has_body(request: Request) -> bool:
    return request.method in {"POST", "PUT", "PATCH"}


def _is_json(content_type: str | None) -> bool:
    """Return whether the header names JSON.

    A body without the header is not read as JSON (FastAPI's strict content type), so that
    a browser cannot send a create without a CORS preflight.
    """
    if content_type is None:
        return False
    media_type = content_type.partition(";")[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def describe_validation_errors(details: Any) -> tuple[str, str]:
    """Return a code and one message naming each invalid field, never echoing input values.

    The submitted value may be a private key, so only locations and pydantic's messages,
    which describe the expected form, are used.
    """
    code = "invalid_request"
    parts: list[str] = []
    for detail in details:
        kind = detail.get("type", "")
        if kind == "invalid_ssh_key":
            code = "invalid_ssh_key"
        location = ".".join(str(part) for part in detail.get("loc", ()) if part != "body")
        parts.append(_validation_message(kind, location, detail.get("msg", "invalid value")))
    return code, " ".join(_sentence(part) for part in parts) or "The request is invalid."


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else f"{text}."


def _validation_message(kind: str, location: str, message: str) -> str:
    if kind == "json_invalid":
        return "The request body is not valid JSON."
    if kind == "extra_forbidden":
        return f"Unknown field '{location}'."
    if kind == "missing" and not location:
        return "The request body is missing; send a JSON object."
    if kind == "missing":
        return f"Field '{location}' is required."
    if kind in {"model_attributes_type", "dict_type"} and not location:
        return "The request body must be a JSON object."
    if kind in {"invalid_ssh_key", "sector_not_allowed"} or not location:
        return message
    return f"{location}: {message}"


def _status_of(error: errors.ComputeplaneError) -> tuple[int, ErrorType]:
    for cls in type(error).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 500, "server_error"
