"""Generation of public identifiers and secrets."""

from __future__ import annotations

import re
import secrets

INSTANCE_ID_PREFIX = "inst_"
REQUEST_ID_PREFIX = "req_"

_INSTANCE_ID_PATTERN = re.compile(r"inst_[a-z2-7]{20}")


def new_instance_id() -> str:
    """Return a new public instance id: ``inst_`` and 20 random lowercase base32 characters."""
    return INSTANCE_ID_PREFIX + _random_base32(20)


def is_instance_id(value: str) -> bool:
    """Return whether ``value`` has the form of an id that ``new_instance_id`` issues."""
    return _INSTANCE_ID_PATTERN.fullmatch(value) is not None


def new_request_id() -> str:
    return REQUEST_ID_PREFIX + _random_base32(20)


def new_token(nbytes: int = 32) -> str:
    """Return a URL-safe random secret carrying ``nbytes`` bytes of entropy."""
    return secrets.token_urlsafe(nbytes)


_BASE32 = "abcdefghijklmnopqrstuvwxyz234567"


def _random_base32(length: int) -> str:
    return "".join(secrets.choice(_BASE32) for _ in range(length))
