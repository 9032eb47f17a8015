"""Unit tests of the Idempotency-Key header rules and the request body fingerprint."""

from __future__ import annotations

import json
import string

import pytest

from computeplane.domain.errors import InvalidIdempotencyKey
from computeplane.services.idempotency import MAX_KEY_LENGTH, fingerprint, validate_key

VISIBLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))


def test_validate_key_absent_header() -> None:
    assert validate_key([]) is None


@pytest.mark.parametrize(
    "key",
    [
        "a",
        "0b6f8e1c-2f35-4b8e-9d0a-6c1f4e7a9b21",
        "x" * MAX_KEY_LENGTH,
        VISIBLE_ASCII,
        string.punctuation,
    ],
    ids=["one-char", "uuid", "max-length", "all-visible-ascii", "punctuation"],
)
def test_validate_key_accepts_visible_ascii(key: str) -> None:
    assert validate_key([key]) == key


def test_max_key_length_is_255() -> None:
    assert MAX_KEY_LENGTH == 255


@pytest.mark.parametrize(
    "values",
    [
        [""],
        ["x" * (MAX_KEY_LENGTH + 1)],
        [" "],
        ["   "],
        [" key"],
        ["key "],
        ["two words"],
        ["tab\tinside"],
        ["\t"],
        ["caf\u00e9"],
        ["caf\u00c3\u00a9"],
        ["line\nbreak"],
        ["nul\x00byte"],
        ["del\x7f"],
        ["key", "key"],
        ["key-1", "key-2"],
    ],
    ids=[
        "empty",
        "too-long",
        "one-space",
        "only-spaces",
        "leading-space",
        "trailing-space",
        "inner-space",
        "inner-tab",
        "only-tab",
        "non-ascii",
        "utf8-read-as-latin1",
        "newline",
        "nul",
        "del",
        "repeated-same",
        "repeated-different",
    ],
)
def test_validate_key_rejects(values: list[str]) -> None:
    with pytest.raises(InvalidIdempotencyKey):
        validate_key(values)


def test_invalid_key_error_code() -> None:
    with pytest.raises(InvalidIdempotencyKey) as excinfo:
        validate_key([""])
    assert excinfo.value.code == "invalid_idempotency_key"


BODY = {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": "ssh-ed25519 AAAA test"}


@pytest.mark.parametrize(
    "raw",
    [
        '{"instance_type":"gpu_1x_h100_sxm5","ssh_key":"ssh-ed25519 AAAA test"}',
        '{"ssh_key": "ssh-ed25519 AAAA test", "instance_type": "gpu_1x_h100_sxm5"}',
        '\n{\n  "ssh_key" :\t"ssh-ed25519 AAAA test" ,\r\n'
        '  "instance_type":"gpu_1x_h100_sxm5"\n}\n',
        '{"instance_type":"gpu_1x_h100_sxm5","ssh_key":"ssh-ed25519 AAAA \\u0074est"}',
    ],
    ids=["compact", "reordered", "respaced", "escaped-char"],
)
def test_fingerprint_same_json_matches(raw: str) -> None:
    assert fingerprint(json.loads(raw)) == fingerprint(BODY)


def test_fingerprint_nested_key_order() -> None:
    first = {"outer": {"a": 1, "b": [1, {"x": 1, "y": 2}]}}
    second = {"outer": {"b": [1, {"y": 2, "x": 1}], "a": 1}}
    assert fingerprint(first) == fingerprint(second)


def test_fingerprint_is_sha256_hex() -> None:
    value = fingerprint(BODY)
    assert len(value) == 64
    assert set(value) <= set(string.hexdigits.lower())


@pytest.mark.parametrize(
    "other",
    [
        {"instance_type": "gpu_8x_h100_sxm5", "ssh_key": "ssh-ed25519 AAAA test"},
        {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": "ssh-ed25519 AAAA Test"},
        {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": "ssh-ed25519 AAAA test "},
        {"instance_type": "gpu_1x_h100_sxm5"},
        {**BODY, "sector": "sector_1"},
        {**BODY, "sector": None},
        [BODY],
    ],
    ids=[
        "other-type",
        "other-comment-case",
        "trailing-space-in-value",
        "field-missing",
        "field-added",
        "explicit-null",
        "wrapped-in-list",
    ],
)
def test_fingerprint_differs_for_other_values(other: object) -> None:
    assert fingerprint(other) != fingerprint(BODY)


def test_fingerprint_distinguishes_types() -> None:
    assert fingerprint({"n": 1}) != fingerprint({"n": "1"})
