"""The error envelope that every failed request returns."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

ErrorType = Literal[
    "authorization_error",
    "validation_error",
    "not_found",
    "rate_limited",
    "server_error",
    "not_implemented",
]


class ErrorDetail(BaseModel):
    type: ErrorType
    message: str
    code: str
    request_id: str


class ErrorResponse(BaseModel):
    error: ErrorDetail
