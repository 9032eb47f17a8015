"""FastAPI dependencies; each route's signature states its access rule through them.

``Authorization`` is parsed by HTTP's rules for credentials (RFC 9110, section 11.4):
``auth-scheme 1*SP credentials``, with a case-insensitive scheme. Clients use the scheme
``Key`` and the credentials ``<key_id>:<secret>``; node agents use ``Bearer <token>``.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Header, Request, Security
from fastapi.security import APIKeyHeader

from computeplane.api.middleware import EXTRA_HEADERS_KEY
from computeplane.domain.errors import AuthenticationFailed
from computeplane.services import auth, idempotency, ratelimit
from computeplane.services.agents import NodeIdentity, authenticate_node
from computeplane.services.context import ServiceContext

_TOKEN = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Visible ASCII without spaces: token68 plus ':' and the other characters keys may contain.
_CREDENTIALS = re.compile(r"^[\x21-\x7e]+$")

#: Longest Authorization value worth parsing; real keys are about 100 characters.
MAX_AUTHORIZATION_LENGTH = 1024


def get_context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


Context = Annotated[ServiceContext, Depends(get_context)]


def parse_credentials(request: Request, expected_scheme: str) -> str:
    """Return the credentials of the single ``Authorization`` header if its scheme matches.

    Raises AuthenticationFailed for a missing, repeated or malformed header and for any
    other scheme.
    """
    values = request.headers.getlist("authorization")
    if not values:
        raise AuthenticationFailed(
            f"Missing Authorization header; send 'Authorization: {expected_scheme} ...'."
        )
    if len(values) > 1:
        raise AuthenticationFailed("Send exactly one Authorization header.")

    value = values[0]
    if len(value) > MAX_AUTHORIZATION_LENGTH:
        raise AuthenticationFailed("The Authorization header is too long to hold a valid key.")
    scheme, _, credentials = value.partition(" ")
    credentials = credentials.lstrip(" ")
    if not _TOKEN.match(scheme) or scheme.lower() != expected_scheme.lower():
        raise AuthenticationFailed(
            f"Unsupported authorization scheme; send 'Authorization: {expected_scheme} ...'."
        )
    if not credentials or not _CREDENTIALS.match(credentials):
        raise AuthenticationFailed(
            f"The Authorization header has no valid credentials after '{expected_scheme}'."
        )
    return credentials


# Declares the scheme in the OpenAPI document; the header itself is parsed below, because
# the parser must also reject a repeated header.
_api_key_scheme = APIKeyHeader(
    name="Authorization",
    scheme_name="adminApiKey",
    description="'Key <key_id>:<secret>': an admin API key of an organization with compute.",
    auto_error=False,
)


async def authenticated_principal(
    request: Request,
    context: Context,
    _documented: Annotated[str | None, Security(_api_key_scheme)] = None,
) -> auth.Principal:
    """Authenticate the API key and count the request against its rate limit."""
    credentials = parse_credentials(request, "Key")
    key_id, separator, secret = credentials.partition(":")
    if not separator or not key_id or not secret:
        raise AuthenticationFailed("API keys have the form '<key_id>:<secret>'.")

    principal = await auth.authenticate(context.database, key_id, secret.encode("ascii"))
    state = await ratelimit.hit(context.database, context.settings, principal.key_id)
    if state is not None:
        request.scope[EXTRA_HEADERS_KEY].update(state.headers())
    return principal


async def compute_admin(
    principal: Annotated[auth.Principal, Depends(authenticated_principal)],
) -> auth.Principal:
    auth.require_compute_admin(principal)
    return principal


ComputeAdmin = Annotated[auth.Principal, Depends(compute_admin)]


async def check_compute_admin(request: Request) -> None:
    """Authenticate the request as ``ComputeAdmin`` does, outside dependency injection."""
    principal = await authenticated_principal(request, get_context(request))
    auth.require_compute_admin(principal)


def idempotency_key(
    request: Request,
    _documented: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            description=(
                "Makes the create safe to retry: the same key and body within the "
                "retention window replay the first response. 1 to 255 visible ASCII "
                "characters."
            ),
        ),
    ] = None,
) -> str | None:
    return idempotency.validate_key(request.headers.getlist("idempotency-key"))


IdempotencyKey = Annotated[str | None, Depends(idempotency_key)]


async def agent_node(request: Request, context: Context) -> NodeIdentity:
    token = parse_credentials(request, "Bearer")
    return await authenticate_node(context.database, token)


AgentNode = Annotated[NodeIdentity, Depends(agent_node)]


async def check_agent_node(request: Request) -> None:
    """Authenticate the request as ``AgentNode`` does, outside dependency injection."""
    await agent_node(request, get_context(request))
