"""computeplane's configuration: one settings class, read from ``COMPUTEPLANE_*`` variables."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

DEFAULT_FLEET_FILE = Path(__file__).parent / "fleets" / "local.toml"
MAX_TCP_PORT = 65535

_ASYNC_DRIVERS = {
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
    "postgresql": "postgresql+asyncpg",
    "postgres": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
}


class Settings(BaseSettings):
    """Every option of computeplane; command-line flags override the environment.

    Durations are in seconds. Deep code receives this object or values from it and never
    reads the environment itself.
    """

    model_config = SettingsConfigDict(env_prefix="COMPUTEPLANE_", extra="ignore")

    data_dir: Path = Field(
        default_factory=lambda: Path(platformdirs.user_data_dir("computeplane"))
    )
    database_url: str = ""
    fleet_file: Path = DEFAULT_FLEET_FILE

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    log_level: str = "INFO"

    idempotency_ttl_seconds: float = Field(default=600.0, gt=0)
    idempotency_lease_seconds: float = Field(default=10.0, gt=0)

    provisioning_timeout_seconds: float = Field(default=300.0, gt=0)
    heartbeat_interval_seconds: float = Field(default=5.0, gt=0)
    agent_poll_seconds: float = Field(default=25.0, gt=0)
    worker_interval_seconds: float = Field(default=1.0, gt=0)
    worker_lease_seconds: float = Field(default=30.0, gt=0)
    capacity_retry_after_seconds: int = Field(default=30, ge=1)

    local_address_pool: str = "127.77.0.0/16"
    local_ssh_port: int = Field(default=2222, ge=1, le=65535)
    local_start_delay_seconds: float = Field(default=0.0, ge=0)

    max_request_bytes: int = Field(default=65536, ge=1024)
    request_head_timeout_seconds: float = Field(default=10.0, gt=0)
    # Longer than the idle timeout of common HTTP clients (httpx: 5 s), so a client never
    # reuses a connection at the moment the server closes it.
    keep_alive_timeout_seconds: int = Field(default=75, ge=1)
    request_body_timeout_seconds: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=2048, ge=1)
    rate_limit_requests: int = Field(default=600, ge=0)
    rate_limit_window_seconds: int = Field(default=60, ge=1)

    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=20, ge=0)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if value:
            normalize_database_url(value)
        return value

    @field_validator("local_address_pool")
    @classmethod
    def _check_loopback_pool(cls, value: str) -> str:
        network = ipaddress.ip_network(value, strict=True)
        if not isinstance(network, ipaddress.IPv4Network) or not network.is_loopback:
            raise ValueError(f"local_address_pool {value!r} must be an IPv4 loopback network")
        if network.num_addresses < 4:
            raise ValueError(f"local_address_pool {value!r} has fewer than 2 host addresses")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.idempotency_lease_seconds >= self.idempotency_ttl_seconds:
            raise ValueError(
                "idempotency_lease_seconds must be shorter than idempotency_ttl_seconds"
            )
        if self.agent_poll_seconds < 1:
            raise ValueError("agent_poll_seconds must be at least 1")
        return self

    @property
    def resolved_database_url(self) -> str:
        """Return the database URL with an async driver, defaulting to SQLite in data_dir."""
        if not self.database_url:
            return f"sqlite+aiosqlite:///{self.data_dir / 'computeplane.db'}"
        return normalize_database_url(self.database_url)

    @property
    def admin_key_file(self) -> Path:
        return self.data_dir / "admin-api-key"

    @property
    def node_unreachable_after_seconds(self) -> float:
        """How long a node may stay silent before its instances become ``unknown``."""
        return 3 * self.heartbeat_interval_seconds

    def with_overrides(self, **overrides: Any) -> Settings:
        """Return a copy with the given options replaced, skipping ``None`` values."""
        values = {key: value for key, value in overrides.items() if value is not None}
        return self.model_validate({**self.model_dump(), **values})


def normalize_database_url(url: str) -> str:
    """Return ``url`` with the async driver computeplane uses for its database kind.

    Raises ValueError for a database kind computeplane does not support and for a URL
    whose port is not a TCP port.
    """
    scheme, separator, rest = url.partition("://")
    if not separator or scheme not in _ASYNC_DRIVERS:
        raise ValueError(
            "database_url must start with sqlite:// or postgresql:// "
            f"(got a URL with scheme {scheme!r})"
        )
    normalized = f"{_ASYNC_DRIVERS[scheme]}://{rest}"
    try:
        port = make_url(normalized).port
    except ArgumentError as error:
        raise ValueError(f"database_url is not a valid URL: {error}") from None
    if port is not None and not 1 <= port <= MAX_TCP_PORT:
        raise ValueError(f"database_url has port {port}; a TCP port is 1 to {MAX_TCP_PORT}")
    return normalized
