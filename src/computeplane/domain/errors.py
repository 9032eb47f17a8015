"""The exceptions computeplane raises, each with a stable machine-readable ``code``.

    ComputeplaneError
    ├── ClientError                   the request cannot be served as sent
    │   ├── InvalidRequest            malformed or semantically invalid input (400)
    │   │   ├── InvalidSSHKey         the ``ssh_key`` is not one acceptable public key
    │   │   ├── InvalidCursor         a listing cursor that this server did not issue
    │   │   └── InvalidIdempotencyKey an ``Idempotency-Key`` header of the wrong form
    │   ├── AuthenticationFailed      no usable API key (401)
    │   ├── PermissionDenied          the key may not do this (403)
    │   │   └── QuotaExceeded         the organization's GPU quota would be exceeded
    │   ├── NotFound                  no such resource for this caller (404)
    │   ├── IdempotencyInFlight       a request with the same key is still running (409)
    │   ├── IdempotencyKeyReused      the key was used for a different request (422)
    │   ├── RequestTooLarge           the body exceeds the configured size limit (413)
    │   ├── RateLimited               too many requests for this key (429)
    │   └── InsufficientCapacity      no node can take the instance now (503)
    ├── ConflictError                 an operator action contradicts the stored state
    ├── DatabaseNotInitialized        an operator command found no computeplane schema
    ├── DatabaseUnavailable           the configured database cannot be reached or opened
    └── RuntimeFailure                a node runtime could not start or stop an instance

Errors carry no HTTP knowledge: ``computeplane.api.errors`` maps each class to a status
code and fal's error ``type`` in one table.
"""

from __future__ import annotations


class ComputeplaneError(Exception):
    """Root of every error computeplane raises on purpose."""

    code: str = "error"
    default_message: str = "The operation failed."

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        self.message = message or self.default_message
        if code is not None:
            self.code = code
        super().__init__(self.message)


class ClientError(ComputeplaneError):
    """The request cannot be served as sent; retrying it unchanged fails the same way."""


class InvalidRequest(ClientError):
    """Raised for malformed or semantically invalid input."""

    code = "invalid_request"
    default_message = "The request is invalid."


class InvalidSSHKey(InvalidRequest):
    """Raised when ``ssh_key`` is not exactly one acceptable OpenSSH public key.

    The message never contains the submitted text, because it may be a private key.
    """

    code = "invalid_ssh_key"
    default_message = "ssh_key is not a valid OpenSSH public key."


class InvalidCursor(InvalidRequest):
    """Raised for a listing cursor that this server did not issue to this organization."""

    code = "invalid_cursor"
    default_message = (
        "cursor is invalid; pass the next_cursor value of a previous listing unchanged."
    )


class InvalidIdempotencyKey(InvalidRequest):
    """Raised when the ``Idempotency-Key`` header is empty, repeated or not visible ASCII."""

    code = "invalid_idempotency_key"
    default_message = "Idempotency-Key must be one header of 1 to 255 visible ASCII characters."


class AuthenticationFailed(ClientError):
    """Raised when the request carries no API key that authenticates."""

    code = "invalid_api_key"
    default_message = "Authentication required: send 'Authorization: Key <key_id>:<secret>'."


class PermissionDenied(ClientError):
    """Raised when the authenticated key may not perform the operation."""

    code = "permission_denied"
    default_message = "This API key may not perform this operation."


class QuotaExceeded(PermissionDenied):
    """Raised when an organization's GPU quota cannot fit the requested instance."""

    code = "quota_exceeded"
    default_message = "The organization's GPU quota is exhausted."


class NotFound(ClientError):
    """Raised for a resource that does not exist or belongs to another organization."""

    code = "not_found"
    default_message = "Not found."


class IdempotencyInFlight(ClientError):
    """Raised while another request with the same ``Idempotency-Key`` is still running."""

    code = "idempotency_request_in_flight"
    default_message = (
        "A request with this Idempotency-Key is still in progress; retry after it completes."
    )

    def __init__(self, message: str | None = None, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyKeyReused(ClientError):
    """Raised when an ``Idempotency-Key`` arrives again with a different request body."""

    code = "idempotency_key_reused"
    default_message = (
        "This Idempotency-Key was already used with a different request body; "
        "use a new key for a new request."
    )


class RequestTooLarge(ClientError):
    """Raised when a request body exceeds the configured maximum size."""

    code = "request_too_large"
    default_message = "The request body is too large."


class RateLimited(ClientError):
    """Raised when an API key exceeds its request rate limit.

    ``rate_limit_headers`` are the ``RateLimit`` and ``RateLimit-Policy`` response headers.
    """

    code = "rate_limited"
    default_message = "Rate limit exceeded."

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int = 1,
        rate_limit_headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.rate_limit_headers = rate_limit_headers or {}


class InsufficientCapacity(ClientError):
    """Raised when no node has room for the requested instance.

    ``retry_after`` is the suggested wait in seconds before trying again.
    """

    code = "insufficient_capacity"
    default_message = "No capacity is available for this instance type."

    def __init__(self, message: str | None = None, *, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConflictError(ComputeplaneError):
    """Raised when an operator action contradicts the stored state (duplicate name, busy node)."""

    code = "conflict"
    default_message = "The operation conflicts with the current state."


class DatabaseNotInitialized(ComputeplaneError):
    """Raised when a command that only reads or edits records finds no computeplane schema."""

    code = "database_not_initialized"
    default_message = "The database has no computeplane schema; run 'computeplane init' first."


class DatabaseUnavailable(ComputeplaneError):
    """Raised when the first connection to the configured database fails."""

    code = "database_unavailable"
    default_message = "The database cannot be reached."


class RuntimeFailure(ComputeplaneError):
    """Raised by a node runtime that could not start or stop an instance."""

    code = "runtime_failure"
    default_message = "The node runtime failed."
