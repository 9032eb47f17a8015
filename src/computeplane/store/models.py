"""ORM models: one table per concept, constraints named, timestamps in aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite has no 64-bit autoincrement type of its own; INTEGER PRIMARY KEY is already 64-bit.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back as an aware UTC datetime.

    SQLite keeps no time zone, so values are normalized on the way in and tagged on the way
    out; PostgreSQL stores ``timestamptz``.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are not stored; use computeplane.domain.clock")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


_ACTIVE_UNSECTORED = text("state = 'active' AND sector IS NULL")
_ACTIVE_SECTORED = text("state = 'active' AND sector IS NOT NULL")
_VISIBLE = text("deleted_at IS NULL")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Organization(Base):
    __tablename__ = "organizations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    compute_enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    gpu_quota: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint("gpu_quota IS NULL OR gpu_quota >= 0", name="gpu_quota_non_negative"),
    )


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), index=True)
    nickname: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    organization: Mapped[Organization] = relationship(lazy="joined")


class ApiKey(Base):
    """An API key; only the SHA-256 hash of its secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    key_id: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    scope: Mapped[str] = mapped_column(String(16))
    secret_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    user: Mapped[User] = relationship(lazy="joined")

    __table_args__ = (CheckConstraint("scope IN ('admin', 'api')", name="scope_known"),)


class Node(Base):
    """A GPU host. ``gpus_free`` is kept equal to ``gpu_count`` minus its allocations.

    The counter exists so placement finds a node with enough free GPUs through an index
    instead of counting allocations across the fleet. It changes only in the transaction
    that inserts or deletes the matching ``gpu_allocations`` rows.
    """

    __tablename__ = "nodes"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    region: Mapped[str] = mapped_column(String(32))
    sector: Mapped[str | None] = mapped_column(String(32), default=None)
    gpu_model: Mapped[str] = mapped_column(String(32))
    gpu_count: Mapped[int] = mapped_column(Integer)
    gpus_free: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="active")
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    desired_version: Mapped[int] = mapped_column(BigInteger, default=1)
    reachable: Mapped[bool] = mapped_column(Boolean, default=False)
    last_heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_token: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (
        CheckConstraint("gpu_count BETWEEN 1 AND 8", name="gpu_count_range"),
        CheckConstraint("gpus_free BETWEEN 0 AND gpu_count", name="gpus_free_range"),
        CheckConstraint("state IN ('active', 'draining', 'removed')", name="state_known"),
        # Placement reads one candidate group at a time in (gpus_free, id) order: nodes of
        # one sector, nodes outside sectors, or nodes in any sector.
        Index("ix_nodes_placement", "state", "sector", "gpus_free", "id"),
        Index(
            "ix_nodes_placement_unsectored",
            "gpus_free",
            "id",
            postgresql_where=_ACTIVE_UNSECTORED,
            sqlite_where=_ACTIVE_UNSECTORED,
        ),
        Index(
            "ix_nodes_placement_sectored",
            "gpus_free",
            "id",
            postgresql_where=_ACTIVE_SECTORED,
            sqlite_where=_ACTIVE_SECTORED,
        ),
        Index("ix_nodes_heartbeat", "reachable", "last_heartbeat_at"),
    )


class Instance(Base):
    """A rented instance; ``public_id`` (``inst_…``) is the only id clients see.

    ``desired_version`` is the node's desired-state version that first included the
    instance; ``teardown_version`` the one that first excluded it. An agent report whose
    applied version reaches ``teardown_version`` and no longer lists the instance confirms
    its teardown.
    """

    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    public_id: Mapped[str] = mapped_column(String(64), unique=True)
    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"))
    creator_user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    instance_type: Mapped[str] = mapped_column(String(32))
    gpu_count: Mapped[int] = mapped_column(Integer)
    region: Mapped[str] = mapped_column(String(32))
    sector: Mapped[str | None] = mapped_column(String(32), default=None)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    status: Mapped[str] = mapped_column(String(16))
    status_reason: Mapped[str | None] = mapped_column(Text, default=None)
    ip: Mapped[str | None] = mapped_column(String(64), default=None)
    ssh_port: Mapped[int | None] = mapped_column(Integer, default=None)
    ssh_user: Mapped[str] = mapped_column(String(32))
    ssh_public_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    provisioning_deadline: Mapped[datetime] = mapped_column(UTCDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)
    desired_version: Mapped[int] = mapped_column(BigInteger)
    teardown_version: Mapped[int | None] = mapped_column(BigInteger, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_token: Mapped[str | None] = mapped_column(String(64), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    creator: Mapped[User] = relationship(lazy="joined")
    node: Mapped[Node] = relationship(lazy="joined", innerjoin=True)

    __table_args__ = (
        Index(
            "ix_instances_visible",
            "organization_id",
            "id",
            postgresql_where=_VISIBLE,
            sqlite_where=_VISIBLE,
        ),
        Index("ix_instances_deadline", "status", "provisioning_deadline"),
        Index("ix_instances_node_unreleased", "node_id", "released_at"),
        Index("ix_instances_quota", "organization_id", "released_at"),
    )


class GpuAllocation(Base):
    """One GPU of a node given to one instance; the unique constraint forbids sharing."""

    __tablename__ = "gpu_allocations"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id"))
    gpu_index: Mapped[int] = mapped_column(Integer)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)

    __table_args__ = (
        UniqueConstraint("node_id", "gpu_index", name="uq_gpu_allocations_node_gpu"),
        CheckConstraint("gpu_index >= 0", name="gpu_index_non_negative"),
    )


class InstanceEvent(Base):
    __tablename__ = "instance_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    from_status: Mapped[str | None] = mapped_column(String(16), default=None)
    to_status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(String(32))
    message: Mapped[str | None] = mapped_column(Text, default=None)
    actor: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str | None] = mapped_column(String(64), default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)


class IdempotencyRecord(Base):
    """A reserved or completed ``Idempotency-Key`` of one organization.

    While ``state`` is ``in_flight`` the holder identified by ``owner_token`` owns the key
    until ``lease_expires_at``; a ``completed`` record stores the response to replay.
    """

    __tablename__ = "idempotency_keys"

    organization_id: Mapped[int] = mapped_column(ForeignKey("organizations.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    owner_token: Mapped[str] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    response_status: Mapped[int | None] = mapped_column(Integer, default=None)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, default=None)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, default=None)

    __table_args__ = (
        CheckConstraint("state IN ('in_flight', 'completed')", name="state_known"),
        Index("ix_idempotency_keys_expiry", "state", "completed_at"),
    )


class RateLimitWindow(Base):
    """Requests counted for one API key in one fixed window, shared by every replica."""

    __tablename__ = "rate_limit_windows"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    window_start: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    request_count: Mapped[int] = mapped_column(Integer)
