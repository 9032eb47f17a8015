"""Organizations, users and API keys: the operator's side of access control.

These run before and beside the HTTP API (``computeplane orgs``, ``users``, ``keys``), so
they take the database directly.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.clock import utcnow
from computeplane.domain.errors import ConflictError, InvalidRequest, NotFound
from computeplane.services.auth import SCOPES, IssuedKey, new_api_key
from computeplane.store.database import Database, lock_transaction
from computeplane.store.models import ApiKey, Organization, User

logger = logging.getLogger(__name__)

DEFAULT_ORGANIZATION = "default"
DEFAULT_ADMIN_NICKNAME = "admin"

#: Advisory lock key that serializes bootstrap across processes ("cpboot" in ASCII).
BOOTSTRAP_LOCK_KEY = 0x6370626F6F74

_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class KeySummary:
    key_id: str
    scope: str
    user_nickname: str
    organization_name: str
    created_at: datetime
    revoked_at: datetime | None


async def create_organization(
    database: Database, name: str, *, compute_enabled: bool = True, gpu_quota: int | None = None
) -> None:
    """Create an organization; raise ConflictError if the name is taken."""
    _check_name("organization name", name)
    if gpu_quota is not None and gpu_quota < 0:
        raise InvalidRequest(f"gpu quota must be 0 or more, got {gpu_quota}.")

    try:
        async with database.write() as session:
            session.add(
                Organization(
                    name=name,
                    compute_enabled=compute_enabled,
                    gpu_quota=gpu_quota,
                    created_at=utcnow(),
                )
            )
    except IntegrityError as error:
        raise ConflictError(f"Organization '{name}' already exists.") from error
    logger.info(
        "organization %s created (compute=%s, gpu_quota=%s)", name, compute_enabled, gpu_quota
    )


async def create_user(database: Database, nickname: str, organization_name: str) -> None:
    """Create a user in an existing organization; raise ConflictError if the nickname is taken."""
    _check_name("nickname", nickname)
    try:
        async with database.write() as session:
            organization = await _organization_by_name(session, organization_name)
            session.add(
                User(organization_id=organization.id, nickname=nickname, created_at=utcnow())
            )
    except IntegrityError as error:
        async with database.read() as session:
            owner = await session.scalar(
                select(Organization.name)
                .join(User, User.organization_id == Organization.id)
                .where(User.nickname == nickname)
            )
        raise ConflictError(
            f"User '{nickname}' already exists in organization '{owner}'; nicknames are unique "
            "across all organizations, so choose another."
        ) from error
    logger.info("user %s created in organization %s", nickname, organization_name)


async def create_key(database: Database, nickname: str, scope: str) -> IssuedKey:
    """Create an API key for a user and return it; only its hash is stored."""
    if scope not in SCOPES:
        raise InvalidRequest(f"scope must be one of {', '.join(SCOPES)}, got '{scope}'.")

    issued, secret_hash = new_api_key()
    async with database.write() as session:
        user = await _user_by_nickname(session, nickname)
        session.add(
            ApiKey(
                key_id=issued.key_id,
                user_id=user.id,
                scope=scope,
                secret_sha256=secret_hash,
                created_at=utcnow(),
            )
        )
    logger.info("api key %s created for user %s with scope %s", issued.key_id, nickname, scope)
    return issued


async def revoke_key(database: Database, key_id: str) -> None:
    """Revoke a key; revoking a revoked key is a no-op, an unknown key raises NotFound."""
    async with database.write() as session:
        api_key = (
            await session.execute(select(ApiKey).where(ApiKey.key_id == key_id))
        ).scalar_one_or_none()
        if api_key is None:
            raise NotFound(f"No API key with id '{key_id}'.", code="api_key_not_found")
        if api_key.revoked_at is None:
            api_key.revoked_at = utcnow()
    logger.info("api key %s revoked", key_id)


async def list_keys(database: Database) -> list[KeySummary]:
    async with database.read() as session:
        keys = (await session.execute(select(ApiKey).order_by(ApiKey.id))).scalars().all()
        return [
            KeySummary(
                key_id=key.key_id,
                scope=key.scope,
                user_nickname=key.user.nickname,
                organization_name=key.user.organization.name,
                created_at=key.created_at,
                revoked_at=key.revoked_at,
            )
            for key in keys
        ]


async def bootstrap(database: Database, admin_key_file: Path) -> bool:
    """Create the default organization, its admin user and key when no organization exists.

    The key is written to ``admin_key_file`` with mode 0600. Returns whether anything was
    created. Concurrent calls, in any process, run one after the other.
    """
    issued, secret_hash = new_api_key()
    try:
        async with database.write() as session:
            await lock_transaction(session, BOOTSTRAP_LOCK_KEY)
            existing = await session.scalar(select(func.count()).select_from(Organization))
            if existing:
                return False
            organization = Organization(
                name=DEFAULT_ORGANIZATION, compute_enabled=True, created_at=utcnow()
            )
            session.add(organization)
            await session.flush()
            user = User(
                organization_id=organization.id,
                nickname=DEFAULT_ADMIN_NICKNAME,
                created_at=utcnow(),
            )
            session.add(user)
            await session.flush()
            session.add(
                ApiKey(
                    key_id=issued.key_id,
                    user_id=user.id,
                    scope="admin",
                    secret_sha256=secret_hash,
                    created_at=utcnow(),
                )
            )
            # Written before the commit: if writing fails, no key exists that nobody holds.
            write_secret_file(admin_key_file, issued.value)
    except IntegrityError:
        return False

    logger.info(
        "created organization %s, user %s and an admin API key; the key is in %s",
        DEFAULT_ORGANIZATION,
        DEFAULT_ADMIN_NICKNAME,
        admin_key_file,
    )
    return True


def write_secret_file(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` readable by the owner only, replacing any older file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(value + "\n")
    os.replace(temporary, path)


def _check_name(what: str, name: str) -> None:
    if not _NAME_PATTERN.match(name):
        raise InvalidRequest(
            f"{what} '{name}' is invalid: use 1 to 64 lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit."
        )


async def _organization_by_name(session: AsyncSession, name: str) -> Organization:
    organization = (
        await session.execute(select(Organization).where(Organization.name == name))
    ).scalar_one_or_none()
    if organization is None:
        raise NotFound(f"No organization named '{name}'.", code="organization_not_found")
    return organization


async def _user_by_nickname(session: AsyncSession, nickname: str) -> User:
    user = (
        await session.execute(select(User).where(User.nickname == nickname))
    ).scalar_one_or_none()
    if user is None:
        raise NotFound(f"No user with nickname '{nickname}'.", code="user_not_found")
    return user


@dataclass(frozen=True)
class KeyRevocation:
    key_id: str
    revoked_at: datetime
    #: False when the key had been revoked before this call, at ``revoked_at``.
    newly_revoked: bool


@dataclass(frozen=True)
class UserSummary:
    nickname: str
    organization_name: str
    active_key_count: int
    revoked_key_count: int
    created_at: datetime


async def revoke_key_once(database: Database, key_id: str) -> KeyRevocation:
    """Revoke a key unless it is revoked already; return when and whether this call did it.

    Raises NotFound for an unknown key.
    """
    async with database.write() as session:
        api_key = (
            await session.execute(select(ApiKey).where(ApiKey.key_id == key_id))
        ).scalar_one_or_none()
        if api_key is None:
            raise NotFound(f"No API key with id '{key_id}'.", code="api_key_not_found")
        previously_revoked_at = api_key.revoked_at
        revoked_at = previously_revoked_at or utcnow()
        api_key.revoked_at = revoked_at
    newly_revoked = previously_revoked_at is None
    if newly_revoked:
        logger.info("api key %s revoked", key_id)
    return KeyRevocation(key_id=key_id, revoked_at=revoked_at, newly_revoked=newly_revoked)


async def list_users(
    database: Database, *, organization_name: str | None = None
) -> list[UserSummary]:
    """Return users by nickname with their key counts, of one organization if named.

    Raises NotFound for an unknown organization name.
    """
    query = select(User).order_by(User.nickname)
    async with database.read() as session:
        if organization_name is not None:
            organization = await _organization_by_name(session, organization_name)
            query = query.where(User.organization_id == organization.id)
        users = (await session.execute(query)).scalars().all()
        counts = await session.execute(
            select(
                ApiKey.user_id,
                func.count().filter(ApiKey.revoked_at.is_(None)),
                func.count().filter(ApiKey.revoked_at.is_not(None)),
            ).group_by(ApiKey.user_id)
        )
        key_counts = {user_id: (int(active), int(revoked)) for user_id, active, revoked in counts}
        return [
            UserSummary(
                nickname=user.nickname,
                organization_name=user.organization.name,
                active_key_count=key_counts.get(user.id, (0, 0))[0],
                revoked_key_count=key_counts.get(user.id, (0, 0))[1],
                created_at=user.created_at,
            )
            for user in users
        ]
