"""Documented responses of the public routes, so the served OpenAPI lists every status."""

from __future__ import annotations

from typing import Any

from computeplane.schemas.errors import ErrorResponse


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        400: "Invalid request",
        401: "Missing, malformed, unknown or revoked API key",
        403: "Not an admin key, no compute permission, or GPU quota exceeded",
        404: "No such instance in this organization",
        408: "The request body arrived too slowly",
        409: "A request with the same Idempotency-Key is still in flight",
        413: "Request body too large",
        422: "Idempotency-Key reused with a different request body",
        429: "Rate limit exceeded",
        500: "Internal server error",
        503: "No capacity for this instance type now; see Retry-After",
    }
    return {
        status: {"model": ErrorResponse, "description": descriptions[status]}
        for status in statuses
    }


_COMMON = (400, 401, 403, 408, 413, 429, 500)

CREATE_RESPONSES = _errors(*_COMMON, 409, 422, 503)
READ_RESPONSES = _errors(*_COMMON, 404)
DELETE_RESPONSES = _errors(*_COMMON, 404)
