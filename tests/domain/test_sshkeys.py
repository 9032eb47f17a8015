"""Tests of SSH public key validation, checked against the real ssh-keygen where it matters."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from computeplane.domain.errors import InvalidSSHKey
from computeplane.domain.sshkeys import (
    MAX_COMMENT_LENGTH,
    MAX_SSH_KEY_LENGTH,
    PublicKey,
    parse_public_key,
)

KEYS_DIR = Path(__file__).resolve().parent.parent / "data" / "keys"
SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="needs ssh-keygen from OpenSSH")

ACCEPTED_FILES = [
    "ed25519.pub",
    "ecdsa256.pub",
    "rsa3072.pub",
    "sk_ed25519.pub",
    "sk_ecdsa256.pub",
]


def read_key_line(name: str) -> str:
    return (KEYS_DIR / name).read_text().strip()


def wire_string(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


def wire_mpint(value: int) -> bytes:
    """Encode a non-negative integer as a minimal RFC 4251 mpint."""
    raw = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return wire_string(raw)


def key_line(key_type: str, blob: bytes, comment: str = "test") -> str:
    return f"{key_type} {base64.b64encode(blob).decode('ascii')} {comment}"


def rsa_blob(exponent: bytes, modulus: bytes) -> bytes:
    """Build an ssh-rsa blob from already encoded mpint fields."""
    return wire_string(b"ssh-rsa") + exponent + modulus


def rejection_message(text: str) -> str:
    with pytest.raises(InvalidSSHKey) as excinfo:
        parse_public_key(text)
    return excinfo.value.message


def run_ssh_keygen(*args: str) -> str:
    assert SSH_KEYGEN is not None
    result = subprocess.run([SSH_KEYGEN, *args], check=True, capture_output=True, text=True)
    return result.stdout


def keygen_bits_and_fingerprint(path: Path) -> tuple[int, str]:
    bits, fingerprint = run_ssh_keygen("-l", "-E", "sha256", "-f", str(path)).split()[:2]
    return int(bits), fingerprint


def generate_key(directory: Path, key_type: str, *options: str) -> Path:
    """Write a new private key without passphrase to ``directory`` and return its path."""
    path = directory / f"id_{key_type}"
    run_ssh_keygen("-q", "-t", key_type, "-N", "", "-C", "generated", "-f", str(path), *options)
    return path


def next_base64_char(char: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return alphabet[(alphabet.index(char) + 1) % 64]


ED25519_LINE = read_key_line("ed25519.pub")
ED25519_DATA = ED25519_LINE.split()[1]
ED25519_BLOB = base64.b64decode(ED25519_DATA)
ED25519_KEY = ED25519_BLOB[-32:]

ECDSA_LINE = read_key_line("ecdsa256.pub")
ECDSA_DATA = ECDSA_LINE.split()[1]
ECDSA_POINT = base64.b64decode(ECDSA_DATA)[-65:]

CERT_LINE = read_key_line("ed25519_cert.pub")

# Odd numbers of the named bit length. The size checks need no real RSA modulus.
MODULUS_2047 = (1 << 2046) | 1
MODULUS_2048 = (1 << 2047) | 1
MODULUS_16384 = (1 << 16383) | 1
MODULUS_16385 = (1 << 16384) | 1


def ecdsa_blob(key_type: bytes, curve: bytes, point: bytes) -> bytes:
    return wire_string(key_type) + wire_string(curve) + wire_string(point)


def sk_ecdsa_blob(application: bytes) -> bytes:
    key_type = b"sk-ecdsa-sha2-nistp256@openssh.com"
    return ecdsa_blob(key_type, b"nistp256", ECDSA_POINT) + wire_string(application)


def sk_ed25519_blob(application: bytes) -> bytes:
    key_type = b"sk-ssh-ed25519@openssh.com"
    return wire_string(key_type) + wire_string(ED25519_KEY) + wire_string(application)


REJECTED = [
    # Certificates
    pytest.param(CERT_LINE, "certificate", id="cert-file"),
    pytest.param(f"ssh-ed25519 {CERT_LINE.split()[1]}", "certificate", id="cert-blob-plain-type"),
    # authorized_keys options
    pytest.param(f'command="ls" {ED25519_LINE}', "options", id="option-command"),
    pytest.param(f'from="10.0.0.1" {ED25519_LINE}', "options", id="option-from"),
    pytest.param(f"cert-authority {ED25519_LINE}", "options", id="option-cert-authority"),
    pytest.param(f"restrict {ED25519_LINE}", "options", id="option-restrict"),
    pytest.param(f"NO-PTY {ED25519_LINE}", "options", id="option-upper-case"),
    pytest.param(f"no-pty,no-agent-forwarding {ED25519_LINE}", "options", id="option-list"),
    pytest.param(f'environment="A=B" {ED25519_LINE}', "options", id="option-environment"),
    pytest.param(f"mykey {ED25519_LINE}", "options", id="word-before-type"),
    # Line breaks and control characters
    pytest.param(f"{ED25519_LINE}\n{ECDSA_LINE}", "line break", id="second-key-lf"),
    pytest.param(f'{ED25519_LINE}\rcommand="sh" {ED25519_LINE}', "line break", id="cr-command"),
    pytest.param(f"{ED25519_LINE}\u2028{ECDSA_LINE}", "line break", id="line-separator"),
    pytest.param(f"{ED25519_LINE}\x85{ECDSA_LINE}", "line break", id="next-line"),
    pytest.param(f"{ED25519_LINE}\x0b{ECDSA_LINE}", "line break", id="vertical-tab"),
    pytest.param(f"ssh-ed25519 {ED25519_DATA}\x00 x", "control", id="nul"),
    pytest.param(f"{ED25519_LINE}\x7f", "control", id="del"),
    pytest.param(f"{ED25519_LINE} \x1b[2J", "control", id="escape"),
    pytest.param(f"{ED25519_LINE} \x9b", "control", id="c1-control"),
    pytest.param(f"\ufeff{ED25519_LINE}", "control", id="byte-order-mark"),
    pytest.param(f"{ED25519_LINE} \u202eevil", "control", id="bidi-override"),
    pytest.param(f"ssh-ed25519\u00a0{ED25519_DATA}", "control", id="no-break-space"),
    # Key types
    pytest.param(read_key_line("dsa.pub"), "DSA keys are not accepted", id="dsa"),
    pytest.param(f"ssh-foo {ED25519_DATA}", "accepted key type", id="unknown-type"),
    pytest.param("ssh-ed25519", "no key data", id="type-only"),
    pytest.param(
        read_key_line("rsa1024.pub"),
        "RSA keys must have at least 2048 bits; this one has 1024",
        id="rsa-1024",
    ),
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_mpint(65537), wire_mpint(MODULUS_2047))),
        "this one has 2047",
        id="rsa-2047",
    ),
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_mpint(65537), wire_mpint(MODULUS_16385))),
        "RSA keys must have at most 16384 bits; this one has 16385",
        id="rsa-16385",
    ),
    # Base64
    pytest.param(f"ssh-ed25519 {ED25519_DATA[:20]}*{ED25519_DATA[21:]}", "base64", id="b64-char"),
    pytest.param(
        f"ssh-ed25519 {ED25519_DATA[:20]}-{ED25519_DATA[21:]}", "base64", id="b64-urlsafe"
    ),
    pytest.param(
        f"ssh-ed25519 {ED25519_DATA[:20]}é{ED25519_DATA[21:]}", "base64", id="b64-non-ascii"
    ),
    pytest.param(f"ecdsa-sha2-nistp256 {ECDSA_DATA.rstrip('=')}", "base64", id="b64-no-padding"),
    pytest.param(f"ssh-ed25519 {ED25519_DATA}==", "base64", id="b64-extra-padding"),
    pytest.param(
        f"ecdsa-sha2-nistp256 {ECDSA_DATA[:-2]}{next_base64_char(ECDSA_DATA[-2])}=",
        "base64",
        id="b64-padding-bits",
    ),
    # Wire format
    pytest.param(key_line("ssh-ed25519", ED25519_BLOB[:-1]), "truncated", id="blob-truncated"),
    pytest.param(key_line("ssh-ed25519", ED25519_BLOB[:5]), "truncated", id="blob-type-truncated"),
    pytest.param(
        key_line("ssh-ed25519", wire_string(b"ssh-ed25519")),
        "missing or truncated",
        id="blob-key-missing",
    ),
    pytest.param(
        key_line("ssh-ed25519", ED25519_BLOB + b"\x00"), "unexpected byte", id="blob-trailing"
    ),
    pytest.param(f"ssh-rsa {ED25519_DATA}", "contains another", id="type-mismatch-rsa"),
    pytest.param(
        f"ecdsa-sha2-nistp384 {ECDSA_DATA}", "contains another", id="type-mismatch-curve"
    ),
    pytest.param(
        key_line("ssh-ed25519", wire_string(b"ssh-ed25519") + wire_string(ED25519_KEY[:31])),
        "31 bytes instead of 32",
        id="ed25519-short",
    ),
    # ECDSA points
    pytest.param(
        key_line(
            "ecdsa-sha2-nistp256",
            ecdsa_blob(
                b"ecdsa-sha2-nistp256",
                b"nistp256",
                ECDSA_POINT[:-1] + bytes([ECDSA_POINT[-1] ^ 1]),
            ),
        ),
        "not on the",
        id="ecdsa-off-curve",
    ),
    pytest.param(
        key_line(
            "ecdsa-sha2-nistp256",
            ecdsa_blob(b"ecdsa-sha2-nistp256", b"nistp256", b"\x02" + ECDSA_POINT[1:33]),
        ),
        "uncompressed",
        id="ecdsa-compressed",
    ),
    pytest.param(
        key_line(
            "ecdsa-sha2-nistp384",
            ecdsa_blob(b"ecdsa-sha2-nistp384", b"nistp256", ECDSA_POINT),
        ),
        "curve name does not match",
        id="ecdsa-curve-name",
    ),
    # Security keys
    pytest.param(
        key_line("sk-ssh-ed25519@openssh.com", sk_ed25519_blob(b"")),
        "application",
        id="sk-ed25519-empty-app",
    ),
    pytest.param(
        key_line("sk-ecdsa-sha2-nistp256@openssh.com", sk_ecdsa_blob(b"ssh:\x01")),
        "application",
        id="sk-ecdsa-control-app",
    ),
    pytest.param(
        key_line(
            "sk-ecdsa-sha2-nistp256@openssh.com",
            ecdsa_blob(b"sk-ecdsa-sha2-nistp256@openssh.com", b"nistp256", ECDSA_POINT),
        ),
        "application field is missing",
        id="sk-ecdsa-no-app",
    ),
    # RSA numbers
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_mpint(65536), wire_mpint(MODULUS_2048))),
        "public exponent",
        id="rsa-even-exponent",
    ),
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_mpint(1), wire_mpint(MODULUS_2048))),
        "public exponent",
        id="rsa-exponent-1",
    ),
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_mpint(65537), wire_mpint(MODULUS_2048 + 1))),
        "modulus",
        id="rsa-even-modulus",
    ),
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_mpint(MODULUS_2048 + 2), wire_mpint(MODULUS_2048))),
        "not smaller than the modulus",
        id="rsa-exponent-above-modulus",
    ),
    pytest.param(
        key_line(
            "ssh-rsa", rsa_blob(wire_mpint(65537), wire_string(MODULUS_2048.to_bytes(256, "big")))
        ),
        "negative",
        id="rsa-negative-mpint",
    ),
    pytest.param(
        key_line("ssh-rsa", rsa_blob(wire_string(b"\x00\x01\x00\x01"), wire_mpint(MODULUS_2048))),
        "leading zero",
        id="rsa-padded-mpint",
    ),
    # Comment and size
    pytest.param(f"{ED25519_LINE} with\ttab", "tab", id="comment-tab"),
    pytest.param(
        f"{ED25519_LINE} {'c' * (MAX_COMMENT_LENGTH + 1)}", "comment is longer", id="comment-long"
    ),
    pytest.param(f"{ED25519_LINE} {'x' * MAX_SSH_KEY_LENGTH}", "longer than", id="too-long"),
    pytest.param("", "empty", id="empty"),
    pytest.param(" \t\r\n ", "empty", id="whitespace-only"),
]


@pytest.mark.parametrize(("text", "expected"), REJECTED)
def test_parse_rejects(text: str, expected: str) -> None:
    assert expected in rejection_message(text)


@pytest.mark.parametrize(("text", "expected"), REJECTED)
def test_rejection_hides_key_data(text: str, expected: str) -> None:
    message = rejection_message(text)
    for token in re.findall(r"[A-Za-z0-9+/=]{16,}", text):
        for start in range(len(token) - 15):
            assert token[start : start + 16] not in message


@pytest.mark.parametrize("name", ACCEPTED_FILES)
def test_fixture_parses(name: str) -> None:
    key_type, _, comment = read_key_line(name).split()
    key = parse_public_key(read_key_line(name))
    assert key.key_type == key_type
    assert key.comment == comment
    assert key.line == read_key_line(name)


@needs_ssh_keygen
@pytest.mark.parametrize("name", ACCEPTED_FILES)
def test_fixture_matches_ssh_keygen(name: str, tmp_path: Path) -> None:
    key = parse_public_key((KEYS_DIR / name).read_text())
    line_file = tmp_path / "line.pub"
    line_file.write_text(key.line + "\n")
    bits, fingerprint = keygen_bits_and_fingerprint(KEYS_DIR / name)
    assert key.fingerprint == fingerprint
    assert keygen_bits_and_fingerprint(line_file)[1] == fingerprint
    assert key.bits == bits


@pytest.mark.parametrize(
    ("name", "key_type"),
    [
        ("sk_ed25519.pub", "sk-ssh-ed25519@openssh.com"),
        ("sk_ecdsa256.pub", "sk-ecdsa-sha2-nistp256@openssh.com"),
    ],
)
def test_sk_line_keeps_type(name: str, key_type: str) -> None:
    key = parse_public_key(read_key_line(name))
    assert key.line.split()[0] == key_type
    assert key.bits == 256


@needs_ssh_keygen
@pytest.mark.parametrize(
    ("options", "bits"),
    [
        (("-t", "ed25519"), 256),
        (("-t", "ecdsa", "-b", "256"), 256),
        (("-t", "ecdsa", "-b", "384"), 384),
        (("-t", "ecdsa", "-b", "521"), 521),
        (("-t", "rsa", "-b", "2048"), 2048),
    ],
    ids=["ed25519", "ecdsa-256", "ecdsa-384", "ecdsa-521", "rsa-2048"],
)
def test_generated_key_accepted(options: tuple[str, ...], bits: int, tmp_path: Path) -> None:
    private_path = generate_key(tmp_path, options[1], *options[2:])
    public_path = private_path.with_suffix(".pub")
    key = parse_public_key(public_path.read_text())
    line_file = tmp_path / "line.pub"
    line_file.write_text(key.line + "\n")
    assert key.bits == bits
    assert key.fingerprint == keygen_bits_and_fingerprint(public_path)[1]
    assert key.fingerprint == keygen_bits_and_fingerprint(line_file)[1]
    assert key.line == public_path.read_text().strip()


@pytest.mark.parametrize(
    "text",
    [
        f"{ED25519_LINE}\n",
        f"{ED25519_LINE}\r\n",
        f"  {ED25519_LINE}  ",
        f"\t{ED25519_LINE}\t\r\n",
        f"\n\n{ED25519_LINE}\n\n",
    ],
    ids=["lf", "crlf", "spaces", "tabs-crlf", "blank-lines"],
)
def test_surrounding_whitespace_trimmed(text: str) -> None:
    assert parse_public_key(text).line == ED25519_LINE


def test_tab_separators_become_spaces() -> None:
    key = parse_public_key(f"ssh-ed25519\t{ED25519_DATA} \t case-ed25519")
    assert key.line == ED25519_LINE


def test_comment_inner_spaces_kept() -> None:
    key = parse_public_key(f"ssh-ed25519 {ED25519_DATA}   alice  at  laptop")
    assert key.comment == "alice  at  laptop"


def test_comment_unicode_accepted() -> None:
    assert parse_public_key(f"ssh-ed25519 {ED25519_DATA} josé@café").comment == "josé@café"


def test_comment_max_length_accepted() -> None:
    comment = "c" * MAX_COMMENT_LENGTH
    assert parse_public_key(f"ssh-ed25519 {ED25519_DATA} {comment}").comment == comment


def test_comment_absent() -> None:
    key = parse_public_key(f"ssh-ed25519 {ED25519_DATA}")
    assert key.comment == ""
    assert key.line == f"ssh-ed25519 {ED25519_DATA}"


@pytest.mark.parametrize(
    ("modulus", "bits"), [(MODULUS_2048, 2048), (MODULUS_16384, 16384)], ids=["2048", "16384"]
)
def test_rsa_size_limits_accepted(modulus: int, bits: int) -> None:
    blob = rsa_blob(wire_mpint(65537), wire_mpint(modulus))
    assert parse_public_key(key_line("ssh-rsa", blob)).bits == bits


def test_fingerprint_format() -> None:
    fingerprint = parse_public_key(ED25519_LINE).fingerprint
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint)


def test_line_is_rebuilt_from_blob() -> None:
    key = PublicKey(key_type="ssh-ed25519", blob=ED25519_BLOB, comment="", bits=256)
    assert key.line == f"ssh-ed25519 {ED25519_DATA}"


def test_base64_error_hides_cause() -> None:
    with pytest.raises(InvalidSSHKey) as excinfo:
        parse_public_key(f"ssh-ed25519 {ED25519_DATA[:-1]}")
    assert excinfo.value.__cause__ is None
    assert excinfo.value.__suppress_context__


@needs_ssh_keygen
@pytest.mark.parametrize("key_format", ["RFC4716", "PKCS8", "PEM"])
def test_public_key_block_rejected(key_format: str) -> None:
    block = run_ssh_keygen("-e", "-m", key_format, "-f", str(KEYS_DIR / "rsa3072.pub"))
    assert "PEM or RFC 4716" in rejection_message(block)


@needs_ssh_keygen
@pytest.mark.parametrize(
    "options",
    [
        ("-t", "ed25519"),
        ("-t", "rsa", "-b", "2048"),
        ("-t", "ecdsa"),
        ("-t", "rsa", "-b", "2048", "-m", "PEM"),
        ("-t", "ecdsa", "-m", "PEM"),
        ("-t", "rsa", "-b", "2048", "-m", "PKCS8"),
    ],
    ids=["ed25519", "rsa", "ecdsa", "rsa-pem", "ecdsa-pem", "rsa-pkcs8"],
)
def test_private_key_rejected(options: tuple[str, ...], tmp_path: Path) -> None:
    private_text = generate_key(tmp_path, options[1], *options[2:]).read_text()
    message = rejection_message(private_text)
    assert "private key" in message
    for line in private_text.splitlines():
        assert line not in message


@needs_ssh_keygen
def test_encrypted_private_key_rejected(tmp_path: Path) -> None:
    path = tmp_path / "id_rsa"
    run_ssh_keygen("-q", "-t", "rsa", "-b", "2048", "-m", "PKCS8", "-N", "secret", "-f", str(path))
    private_text = path.read_text()
    assert private_text.startswith("-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert "private key" in rejection_message(private_text)


@needs_ssh_keygen
def test_private_key_body_rejected(tmp_path: Path) -> None:
    private_text = generate_key(tmp_path, "ed25519").read_text()
    body = "".join(line for line in private_text.splitlines() if "-----" not in line)
    assert "private key" in rejection_message(body)


@pytest.mark.parametrize(
    "text",
    [
        "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: test\n",
        "---- BEGIN SSH2 ENCRYPTED PRIVATE KEY ----\nComment: test\n",
    ],
    ids=["putty", "ssh2"],
)
def test_other_private_key_formats_rejected(text: str) -> None:
    assert "private key" in rejection_message(text)
