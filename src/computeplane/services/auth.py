"""API key authentication and the compute permission check.

Keys have the form ``<key_id>:<secret>``. The database stores the key id and the SHA-256
hash of the secret; the secret itself exists only in the caller's hands.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.errors import AuthenticationFailed, PermissionDenied
from computeplane.store.database import Database
from computeplane.store.models import ApiKey, User

SCOPE_ADMIN = "admin"
SCOPE_API = "api"
SCOPES = (SCOPE_ADMIN, SCOPE_API)

#: Longest key id that can exist; longer ids fail without a database lookup.
MAX_KEY_ID_LENGTH = 64

# Compared against when the key id is unknown, so that both outcomes cost one comparison.
_MISSING_KEY_HASH = hashlib.sha256(b"computeplane-missing-key").hexdigest()


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: an API key, its user and that user's organization."""

    key_id: str
    scope: str
    user_id: int
    user_nickname: str
    organization_id: int
    organization_name: str
    compute_enabled: bool
    gpu_quota: int | None


@dataclass(frozen=True)
class IssuedKey:
    """A newly created API key; ``value`` is shown once and never stored."""

    key_id: str
    value: str


def hash_secret(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


def new_api_key() -> tuple[IssuedKey, str]:
    """Return a new key and the hash of its secret to store."""
    key_id = str(uuid.uuid4())
    secret = secrets.token_hex(32)
    return IssuedKey(key_id=key_id, value=f"{key_id}:{secret}"), hash_secret(secret.encode())


async def authenticate(database: Database, key_id: str, secret: bytes) -> Principal:
    """Return the principal of an active key, or raise AuthenticationFailed.

    ``secret`` is compared as bytes through its hash in constant time, so any byte sequence
    is a well-defined input. Every failure raises the same error, so a caller cannot tell an
    unknown key from a revoked one or a wrong secret.
    """
    api_key = None
    if 0 < len(key_id) <= MAX_KEY_ID_LENGTH and key_id.isascii():
        async with database.read() as session:
            api_key = await _find_key(session, key_id)

    expected = api_key.secret_sha256 if api_key is not None else _MISSING_KEY_HASH
    matches = hmac.compare_digest(hash_secret(secret).encode(), expected.encode())
    if api_key is None or not matches or api_key.revoked_at is not None:
        raise AuthenticationFailed("The API key is invalid or revoked.")

    return _principal(api_key)


def require_compute_admin(principal: Principal) -> None:
    """Raise PermissionDenied unless the key is an admin key of a compute organization."""
    if principal.scope != SCOPE_ADMIN:
        raise PermissionDenied(
            f"Compute instances require an admin API key; this key has scope '{principal.scope}'.",
            code="admin_key_required",
        )
    if not principal.compute_enabled:
        raise PermissionDenied(
            f"Organization '{principal.organization_name}' does not have compute permission.",
            code="compute_not_enabled",
        )


async def _find_key(session: AsyncSession, key_id: str) -> ApiKey | None:
    result = await session.execute(select(ApiKey).where(ApiKey.key_id == key_id))
    return result.scalar_one_or_none()


def _principal(api_key: ApiKey) -> Principal:
    user: User = api_key.user
    return Principal(
        key_id=api_key.key_id,
        scope=api_key.scope,
        user_id=user.id,
        user_nickname=user.nickname,
        organization_id=user.organization_id,
        organization_name=user.organization.name,
        compute_enabled=user.organization.compute_enabled,
        gpu_quota=user.organization.gpu_quota,
    )
