"""Idempotent requests: at most one execution per ``Idempotency-Key`` and organization.

Protocol, all in the database so it holds across replicas:

1. Reserve: insert ``(organization, key)`` as ``in_flight`` with a short lease before any
   work. If the row exists, a completed record within its retention replays (same request)
   or rejects (different request); a live reservation of another holder means 409.
   A reservation whose lease ran out belongs to a holder that died and is taken over.
2. Run the operation. Its own transaction stores the response in the record, guarded by
   the holder's token, so the work and its completion commit together: a crash leaves
   either both or neither, and a holder whose lease was taken over rolls its work back.
3. Only a success is stored; any failure deletes the reservation, so a corrected or later
   retry runs again.

Retention counts from completion (``idempotency_ttl_seconds``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.clock import utcnow
from computeplane.domain.errors import (
    IdempotencyInFlight,
    IdempotencyKeyReused,
    InvalidIdempotencyKey,
)
from computeplane.store.database import Database
from computeplane.store.models import IdempotencyRecord

logger = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255
IN_FLIGHT = "in_flight"
COMPLETED = "completed"


@dataclass(frozen=True)
class StoredResponse:
    """A response as sent to the client, kept byte for byte for replays."""

    status_code: int
    body: bytes
    replayed: bool = False


@dataclass(frozen=True)
class Reservation:
    """A live hold on one organization's idempotency key."""

    organization_id: int
    key: str
    owner_token: str

    async def complete(self, session: AsyncSession, response: StoredResponse) -> None:
        """Store ``response`` in the operation's own transaction.

        Raises IdempotencyInFlight when another request took the key over after this
        holder's lease ran out; the caller's transaction must then roll back.
        """
        result = await session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.organization_id == self.organization_id,
                IdempotencyRecord.key == self.key,
                IdempotencyRecord.owner_token == self.owner_token,
            )
            .values(
                state=COMPLETED,
                response_status=response.status_code,
                response_body=response.body,
                completed_at=utcnow(),
            )
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            logger.warning(
                "idempotency reservation of organization %s was taken over before it "
                "completed; rolling back",
                self.organization_id,
            )
            raise IdempotencyInFlight(retry_after=1)


@dataclass(frozen=True)
class IdempotencyPolicy:
    ttl_seconds: float
    lease_seconds: float


def validate_key(values: list[str]) -> str | None:
    """Return the single Idempotency-Key header value, ``None`` if absent.

    Raises InvalidIdempotencyKey for a repeated header or a value that is not 1 to 255
    visible ASCII characters.
    """
    if not values:
        return None
    if len(values) > 1:
        raise InvalidIdempotencyKey("Send at most one Idempotency-Key header.")
    key = values[0]
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey()
    if not all("\x21" <= character <= "\x7e" for character in key):
        raise InvalidIdempotencyKey()
    return key


def fingerprint(body: Any) -> str:
    """Return the SHA-256 of the canonical JSON form of a parsed request body.

    Key order and whitespace of the original bytes do not change the fingerprint.
    """
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


async def run_once(
    database: Database,
    policy: IdempotencyPolicy,
    organization_id: int,
    key: str,
    request_fingerprint: str,
    operation: Callable[[Reservation], Awaitable[StoredResponse]],
) -> StoredResponse:
    """Run ``operation`` at most once for this key, or replay the response it stored.

    ``operation`` must call ``Reservation.complete`` inside the transaction that does its
    work. Raises IdempotencyKeyReused for a different request under a key that is held or
    completed, and IdempotencyInFlight while another holder's lease is live.
    """
    token = await _reserve(database, policy, organization_id, key, request_fingerprint)
    if isinstance(token, StoredResponse):
        logger.info("idempotency key replayed for organization %s", organization_id)
        return token

    reservation = Reservation(organization_id, key, token)
    try:
        return await operation(reservation)
    except Exception:
        await _release(database, reservation)
        raise


async def delete_expired(database: Database, policy: IdempotencyPolicy) -> int:
    """Delete completed records past retention and reservations long past their lease."""
    cutoff = utcnow() - timedelta(seconds=policy.ttl_seconds)
    async with database.write() as session:
        result = await session.execute(
            delete(IdempotencyRecord).where(
                (
                    (IdempotencyRecord.state == COMPLETED)
                    & (IdempotencyRecord.completed_at < cutoff)
                )
                | (
                    (IdempotencyRecord.state == IN_FLIGHT)
                    & (IdempotencyRecord.lease_expires_at < cutoff)
                )
            )
        )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def _reserve(
    database: Database,
    policy: IdempotencyPolicy,
    organization_id: int,
    key: str,
    request_fingerprint: str,
) -> str | StoredResponse:
    """Return the owner token of a new reservation, or the stored response to replay."""
    token = secrets.token_hex(16)
    now = utcnow()
    lease_expires_at = now + timedelta(seconds=policy.lease_seconds)
    try:
        async with database.write() as session:
            session.add(
                IdempotencyRecord(
                    organization_id=organization_id,
                    key=key,
                    fingerprint=request_fingerprint,
                    state=IN_FLIGHT,
                    owner_token=token,
                    lease_expires_at=lease_expires_at,
                    created_at=now,
                )
            )
        return token
    except IntegrityError:
        pass

    async with database.write() as session:
        record = await _locked_record(session, organization_id, key)
        if record is None:
            # The holder released it between our insert and this read; the retry decides.
            raise IdempotencyInFlight(retry_after=1)
        return _judge_existing(record, policy, request_fingerprint, token, lease_expires_at)


def _judge_existing(
    record: IdempotencyRecord,
    policy: IdempotencyPolicy,
    request_fingerprint: str,
    token: str,
    lease_expires_at: Any,
) -> str | StoredResponse:
    now = utcnow()
    if record.state == COMPLETED:
        assert record.completed_at is not None
        retained = record.completed_at + timedelta(seconds=policy.ttl_seconds) > now
        if retained:
            if record.fingerprint != request_fingerprint:
                raise IdempotencyKeyReused()
            assert record.response_status is not None and record.response_body is not None
            return StoredResponse(record.response_status, record.response_body, replayed=True)
    elif record.lease_expires_at > now:
        if record.fingerprint != request_fingerprint:
            raise IdempotencyKeyReused()
        seconds_left = (record.lease_expires_at - now).total_seconds()
        raise IdempotencyInFlight(retry_after=max(1, min(5, round(seconds_left))))
    else:
        logger.warning(
            "idempotency reservation of organization %s expired without completing; "
            "taking it over",
            record.organization_id,
        )

    _take_over(record, request_fingerprint, token, lease_expires_at)
    return token


def _take_over(
    record: IdempotencyRecord, request_fingerprint: str, token: str, lease_expires_at: Any
) -> None:
    record.state = IN_FLIGHT
    record.fingerprint = request_fingerprint
    record.owner_token = token
    record.lease_expires_at = lease_expires_at
    record.response_status = None
    record.response_body = None
    record.completed_at = None
    record.created_at = utcnow()


async def _locked_record(
    session: AsyncSession, organization_id: int, key: str
) -> IdempotencyRecord | None:
    result = await session.execute(
        select(IdempotencyRecord)
        .where(IdempotencyRecord.organization_id == organization_id, IdempotencyRecord.key == key)
        .with_for_update()
    )
    return result.scalar_one_or_none()


async def _release(database: Database, reservation: Reservation) -> None:
    async with database.write() as session:
        await session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.organization_id == reservation.organization_id,
                IdempotencyRecord.key == reservation.key,
                IdempotencyRecord.owner_token == reservation.owner_token,
            )
        )
