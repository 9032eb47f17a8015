"""Validation of the SSH public keys that API clients send for instance access.

The key ends up in an authorized_keys file on a node, so this module is a security boundary.
``parse_public_key`` accepts exactly one bare OpenSSH public key line and rebuilds the line
from the decoded key, so no option, second line or stray byte of the input reaches that file.
Every rejection raises ``InvalidSSHKey`` with a message that contains no part of the submitted
text, because that text may be a private key.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from computeplane.domain.errors import InvalidSSHKey

MAX_SSH_KEY_LENGTH = 16384
"""Maximum length in characters of the trimmed input. A 16384-bit RSA key line is about 2800."""

MAX_COMMENT_LENGTH = 1024
"""Maximum length in characters of the comment after the base64 key data."""

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 16384

ACCEPTED_KEY_TYPES: tuple[str, ...] = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
)
"""Key types that ``parse_public_key`` accepts, as OpenSSH names them in a key line."""


@dataclass(frozen=True)
class PublicKey:
    """An SSH public key that passed every check of ``parse_public_key``.

    The constructor itself checks nothing, so build instances with ``parse_public_key``.
    """

    key_type: str
    """OpenSSH key type name, such as ``ssh-ed25519`` or ``sk-ssh-ed25519@openssh.com``."""
    blob: bytes
    """Decoded key in SSH wire format, the bytes that the fingerprint covers."""
    comment: str
    """Text after the key data, or ``""`` when the line has none."""
    bits: int
    """Key size: RSA modulus bits, 256 for Ed25519, or the curve size for ECDSA."""

    @property
    def line(self) -> str:
        """Canonical key line ``type base64 [comment]``, the text to install in authorized_keys.

        The line is rebuilt from ``blob`` with single spaces, so it never repeats raw input.
        """
        fields = [self.key_type, base64.b64encode(self.blob).decode("ascii")]
        if self.comment:
            fields.append(self.comment)
        return " ".join(fields)

    @property
    def fingerprint(self) -> str:
        """SHA256 fingerprint in the form that ``ssh-keygen -l`` prints, such as ``SHA256:…``."""
        digest = hashlib.sha256(self.blob).digest()
        return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def parse_public_key(text: str) -> PublicKey:
    """Parse one OpenSSH public key line of the form ``type base64 [comment]``.

    Surrounding spaces, tabs, CRs and LFs are ignored, and tabs may separate the fields.
    Raises ``InvalidSSHKey`` for an empty or over-long input, a private key, more than one
    line, a control character, authorized_keys options or a certificate. It also raises for a
    key type outside ``ACCEPTED_KEY_TYPES``, an RSA modulus outside 2048 to 16384 bits, and key
    data that is not strict base64 of a well-formed key of the stated type. The message never
    contains any part of ``text``.
    """
    line = text.strip(" \t\r\n")
    if not line:
        raise InvalidSSHKey(_EMPTY_MESSAGE)
    # A private key gets its own message even when it is too long, because its owner must
    # replace it. The substring search runs in linear time, so it is safe before the length check.
    _reject_key_files(line)
    if len(line) > MAX_SSH_KEY_LENGTH:
        raise InvalidSSHKey(
            f"ssh_key is longer than {MAX_SSH_KEY_LENGTH} characters. "
            "Send one OpenSSH public key line."
        )
    _reject_unprintable_characters(line)

    key_type, key_data, comment = _split_fields(line)
    blob = _decode_base64(key_data)
    bits = _parse_blob(key_type, blob)
    _check_comment(comment)
    return PublicKey(key_type=key_type, blob=blob, comment=comment, bits=bits)


_EMPTY_MESSAGE = (
    "ssh_key is empty. Send one OpenSSH public key line, "
    "such as the contents of ~/.ssh/id_ed25519.pub."
)

_CERT_SUFFIX = "-cert-v01@openssh.com"

# "PRIVATE KEY" covers the PEM, PKCS#8, OpenSSH and SSH.com ("SSH2 ENCRYPTED PRIVATE KEY")
# armor lines. "b3BlbnNzaC1rZXktdjE" is base64 of "openssh-key-v1", the start of an OpenSSH
# private key body that was pasted without its armor lines.
_PRIVATE_KEY_MARKERS = ("PRIVATE KEY", "PuTTY-User-Key-File-", "b3BlbnNzaC1rZXktdjE")

_PUBLIC_KEY_BLOCK_MARKERS = ("BEGIN SSH2 PUBLIC KEY", "BEGIN PUBLIC KEY", "BEGIN RSA PUBLIC KEY")

# The characters at which str.splitlines() breaks a line. Each one could start a second key
# line for a tool that reads the stored line as Unicode text.
_LINE_BREAKS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")

# Option keywords that may precede the key type in an authorized_keys line. OpenSSH matches
# them case-insensitively (opt_flag in misc.c), so the lookup lowercases the field first.
_AUTHORIZED_KEYS_OPTIONS = frozenset(
    {
        "agent-forwarding",
        "cert-authority",
        "command",
        "environment",
        "expiry-time",
        "from",
        "no-agent-forwarding",
        "no-port-forwarding",
        "no-pty",
        "no-touch-required",
        "no-user-rc",
        "no-x11-forwarding",
        "permitlisten",
        "permitopen",
        "port-forwarding",
        "principals",
        "pty",
        "restrict",
        "touch-required",
        "tunnel",
        "user-rc",
        "verify-required",
        "x11-forwarding",
    }
)

_FIELDS = re.compile(r"(?P<type>[^ \t]+)(?:[ \t]+(?P<data>[^ \t]+)(?:[ \t]+(?P<comment>.*))?)?")


def _reject_key_files(line: str) -> None:
    if any(marker in line for marker in _PRIVATE_KEY_MARKERS):
        raise InvalidSSHKey(
            "ssh_key contains a private key. Send the public key from the .pub file instead, "
            "and treat this private key as exposed and replace it."
        )
    if any(marker in line for marker in _PUBLIC_KEY_BLOCK_MARKERS):
        raise InvalidSSHKey(
            "ssh_key is a public key in PEM or RFC 4716 format, not an OpenSSH key line. "
            "Convert it with `ssh-keygen -i -m FORMAT -f FILE`, where FORMAT is RFC4716, "
            "PKCS8 or PEM."
        )


def _reject_unprintable_characters(line: str) -> None:
    if line.isprintable():
        return
    for char in line:
        if char in _LINE_BREAKS:
            raise InvalidSSHKey(
                "ssh_key contains a line break. Send exactly one public key on a single line."
            )
        if char not in " \t" and not char.isprintable():
            raise InvalidSSHKey(
                "ssh_key contains a control or invisible character. "
                "Send the key line exactly as ssh-keygen wrote it."
            )


def _split_fields(line: str) -> tuple[str, str, str]:
    fields = _FIELDS.fullmatch(line)
    if fields is None:
        # Unreachable: a trimmed line without line breaks always matches.
        raise InvalidSSHKey("ssh_key is not an OpenSSH public key line.")
    key_type = fields["type"]
    key_data = fields["data"]
    _check_key_type(key_type, key_data)
    if key_data is None:
        raise InvalidSSHKey(
            "ssh_key has a key type but no key data. Send the whole line from the .pub file, "
            "with key type, base64 key data and an optional comment."
        )
    return key_type, key_data, fields["comment"] or ""


def _check_key_type(key_type: str, next_field: str | None) -> None:
    if key_type in ACCEPTED_KEY_TYPES:
        return
    if key_type.endswith(_CERT_SUFFIX):
        raise _certificate_error()
    if _looks_like_options(key_type) or next_field in ACCEPTED_KEY_TYPES:
        raise InvalidSSHKey(
            "ssh_key starts with authorized_keys options, which are not accepted. "
            "Send only the bare key line, starting with the key type."
        )
    if key_type == "ssh-dss":
        raise InvalidSSHKey(
            "ssh_key is a DSA (ssh-dss) key, and DSA keys are not accepted because they are "
            "insecure. Generate an Ed25519 key with `ssh-keygen -t ed25519` "
            "and send its .pub file."
        )
    raise InvalidSSHKey(
        "ssh_key does not start with an accepted key type. The accepted types are "
        + ", ".join(ACCEPTED_KEY_TYPES)
        + "."
    )


def _looks_like_options(field: str) -> bool:
    return any(char in field for char in '=",') or field.lower() in _AUTHORIZED_KEYS_OPTIONS


def _certificate_error() -> InvalidSSHKey:
    return InvalidSSHKey(
        "ssh_key is an SSH certificate, and certificates are not accepted. "
        "Send the plain public key from the .pub file, not the -cert.pub file."
    )


def _decode_base64(key_data: str) -> bytes:
    try:
        blob = base64.b64decode(key_data, validate=True)
    except ValueError:
        # binascii.Error and the ValueError for non-ASCII text both land here. "from None"
        # keeps the original exception, and any input it quotes, out of tracebacks.
        raise _invalid_base64() from None
    # Re-encoding rejects non-zero padding bits and excess "=", which b64decode tolerates.
    # BSD b64_pton rejects such padding bits too, because they could carry hidden data.
    if base64.b64encode(blob).decode("ascii") != key_data:
        raise _invalid_base64()
    return blob


def _invalid_base64() -> InvalidSSHKey:
    return InvalidSSHKey(
        "The key data in ssh_key is not valid base64. Send the line from the .pub file unmodified."
    )


def _parse_blob(key_type: str, blob: bytes) -> int:
    reader = _WireReader(blob)
    inner_type = reader.read_string("key type")
    if inner_type != key_type.encode("ascii"):
        if inner_type.endswith(_CERT_SUFFIX.encode("ascii")):
            raise _certificate_error()
        raise InvalidSSHKey(
            "ssh_key names one key type, but its key data contains another. "
            "Send the line from the .pub file unmodified."
        )
    bits = _BLOB_PARSERS[key_type](reader)
    reader.expect_end()
    return bits


def _check_comment(comment: str) -> None:
    if len(comment) > MAX_COMMENT_LENGTH:
        raise InvalidSSHKey(
            f"The ssh_key comment is longer than {MAX_COMMENT_LENGTH} characters. Shorten it."
        )
    if "\t" in comment:
        raise InvalidSSHKey("The ssh_key comment contains a tab. Use spaces instead.")


class _WireReader:
    """Reader of RFC 4251 ``string`` and ``mpint`` fields that rejects any malformed field."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0

    def read_string(self, field: str) -> bytes:
        length_end = self._offset + 4
        if length_end > len(self._data):
            raise _malformed(f"the {field} field is missing or truncated")
        length = int.from_bytes(self._data[self._offset : length_end], "big")
        end = length_end + length
        if end > len(self._data):
            raise _malformed(f"the {field} field is truncated")
        self._offset = end
        return self._data[length_end:end]

    def read_mpint(self, field: str) -> int:
        raw = self.read_string(field)
        if raw and raw[0] & 0x80:
            raise _malformed(f"the {field} value is negative")
        # RFC 4251 encodes zero as an empty string and forbids unneeded leading zero bytes.
        if raw and raw[0] == 0 and (len(raw) == 1 or not raw[1] & 0x80):
            raise _malformed(f"the {field} value has an unneeded leading zero byte")
        return int.from_bytes(raw, "big")

    def expect_end(self) -> None:
        remaining = len(self._data) - self._offset
        if remaining:
            unit = "byte follows" if remaining == 1 else "bytes follow"
            raise _malformed(f"{remaining} unexpected {unit} the last field")


def _malformed(detail: str) -> InvalidSSHKey:
    return InvalidSSHKey(
        f"The key data in ssh_key is malformed because {detail}. "
        "Send the line from the .pub file unmodified."
    )


def _parse_ed25519(reader: _WireReader) -> int:
    key = reader.read_string("Ed25519 public key")
    if len(key) != 32:
        raise _malformed(f"the Ed25519 public key has {len(key)} bytes instead of 32")
    return 256


def _parse_sk_ed25519(reader: _WireReader) -> int:
    bits = _parse_ed25519(reader)
    _check_application(reader.read_string("application"))
    return bits


_CURVES: dict[str, ec.EllipticCurve] = {
    "nistp256": ec.SECP256R1(),
    "nistp384": ec.SECP384R1(),
    "nistp521": ec.SECP521R1(),
}


def _parse_ecdsa(reader: _WireReader, curve_name: str) -> int:
    if reader.read_string("curve name") != curve_name.encode("ascii"):
        raise _malformed("the curve name does not match the key type")
    curve = _CURVES[curve_name]
    _check_ec_point(reader.read_string("EC point"), curve)
    return curve.key_size


def _check_ec_point(point: bytes, curve: ec.EllipticCurve) -> None:
    coordinate_size = (curve.key_size + 7) // 8
    if len(point) != 1 + 2 * coordinate_size or point[0] != 0x04:
        raise _malformed(f"the EC point is not an uncompressed {curve.name} point")
    try:
        ec.EllipticCurvePublicKey.from_encoded_point(curve, point)
    except ValueError:
        raise _malformed(f"the EC point is not on the {curve.name} curve") from None


def _parse_sk_ecdsa(reader: _WireReader) -> int:
    bits = _parse_ecdsa(reader, "nistp256")
    _check_application(reader.read_string("application"))
    return bits


def _check_application(application: bytes) -> None:
    # The FIDO application (relying party id) of an OpenSSH security key, normally "ssh:".
    if not application or any(byte < 0x20 or byte > 0x7E for byte in application):
        raise _malformed("the security key application is empty or not printable ASCII")


def _parse_rsa(reader: _WireReader) -> int:
    exponent = reader.read_mpint("RSA public exponent")
    modulus = reader.read_mpint("RSA modulus")
    if exponent < 3 or exponent % 2 == 0:
        raise _malformed("the RSA public exponent is not an odd number of at least 3")
    # A real modulus is the product of two odd primes, but cryptography 50.0 accepts an even one.
    if modulus % 2 == 0:
        raise _malformed("the RSA modulus is not a positive odd number")
    bits = modulus.bit_length()
    if bits < MIN_RSA_BITS:
        raise InvalidSSHKey(
            f"RSA keys must have at least {MIN_RSA_BITS} bits; this one has {bits}. "
            "Generate a new key with `ssh-keygen -t ed25519` or `ssh-keygen -t rsa -b 3072`."
        )
    if bits > MAX_RSA_BITS:
        raise InvalidSSHKey(
            f"RSA keys must have at most {MAX_RSA_BITS} bits; this one has {bits}. "
            "Generate a new key with `ssh-keygen -t ed25519` or `ssh-keygen -t rsa -b 3072`."
        )
    try:
        rsa.RSAPublicNumbers(exponent, modulus).public_key()
    except ValueError:
        raise _malformed("the RSA public exponent is not smaller than the modulus") from None
    return bits


_BLOB_PARSERS: dict[str, Callable[[_WireReader], int]] = {
    "ssh-ed25519": _parse_ed25519,
    "ecdsa-sha2-nistp256": lambda reader: _parse_ecdsa(reader, "nistp256"),
    "ecdsa-sha2-nistp384": lambda reader: _parse_ecdsa(reader, "nistp384"),
    "ecdsa-sha2-nistp521": lambda reader: _parse_ecdsa(reader, "nistp521"),
    "ssh-rsa": _parse_rsa,
    "sk-ssh-ed25519@openssh.com": _parse_sk_ed25519,
    "sk-ecdsa-sha2-nistp256@openssh.com": _parse_sk_ecdsa,
}
