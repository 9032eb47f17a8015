"""The served OpenAPI document: every status each route can return, and the key scheme."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

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
        415: "Request body not sent as JSON",
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

CREATE_RESPONSES = _errors(*_COMMON, 409, 415, 422, 503)
LIST_RESPONSES = _errors(*_COMMON)
ITEM_RESPONSES = _errors(*_COMMON, 404)


def install_openapi(app: FastAPI) -> None:
    """Serve a document without FastAPI's default 422 validation response.

    Request validation errors get a 400 in the error envelope instead, so the
    default entry would document a response that never occurs.
    """

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                summary=app.summary,
                routes=app.routes,
            )
            _drop_default_validation_errors(schema)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _drop_default_validation_errors(schema: dict[str, Any]) -> None:
    default_ref = "#/components/schemas/HTTPValidationError"
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            content = responses.get("422", {}).get("content", {})
            if content.get("application/json", {}).get("schema", {}).get("$ref") == default_ref:
                del responses["422"]
    components = schema.get("components", {}).get("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
