"""The ``ssh_key`` field of POST /v1/compute/instances: what is accepted, stored and rejected.

The parser has its own unit tests. These check the API around it: the status and error
code, the key line that reaches the database, and that no rejection echoes the key data.
Fingerprints are compared with the real ``ssh-keygen``.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import Base, Instance
from conftest import KEYS_DIR, Keys, add_nodes, node

ENDPOINT = "/v1/compute/instances"
ONE_GPU = "gpu_1x_h100_sxm5"
SSH_KEYGEN = shutil.which("ssh-keygen")
needs_ssh_keygen = pytest.mark.skipif(SSH_KEYGEN is None, reason="needs ssh-keygen from OpenSSH")

ACCEPTED_FILES = [
    "ed25519.pub",
    "ecdsa256.pub",
    "rsa3072.pub",
    "sk_ed25519.pub",
    "sk_ecdsa256.pub",
]

# Windows of this many characters of the submitted base64 must not appear in a response.
ECHO_WINDOW = 12


def key_line(name: str) -> str:
    return (KEYS_DIR / name).read_text().strip()


def key_data(line: str) -> str:
    """Return the base64 key data of a line, the longest field, which must never be echoed."""
    return max(line.split(), key=len)


async def post_key(
    api: httpx.AsyncClient, api_key: str, ssh_key: str, **extra_headers: str
) -> httpx.Response:
    body: dict[str, Any] = {"instance_type": ONE_GPU, "ssh_key": ssh_key}
    return await api.post(ENDPOINT, json=body, headers={**Keys.header(api_key), **extra_headers})


async def stored_keys(database: Database) -> list[str]:
    async with database.read() as session:
        return list((await session.execute(select(Instance.ssh_public_key))).scalars().all())


def keygen_fingerprint(path: Path) -> str:
    """Return ``ssh-keygen -l`` output: bits, SHA256 fingerprint, comment and key type."""
    assert SSH_KEYGEN is not None
    result = subprocess.run(
        [SSH_KEYGEN, "-l", "-E", "sha256", "-f", str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return result.stdout.strip()


def echoed_fragments(response: httpx.Response, *secrets: str) -> list[str]:
    """Return the windows of ``secrets`` that occur in the response body or headers."""
    text = response.text + "\n" + "\n".join(response.headers.values())
    fragments: list[str] = []
    for secret in secrets:
        for start in range(0, max(1, len(secret) - ECHO_WINDOW + 1)):
            window = secret[start : start + ECHO_WINDOW]
            if window in text:
                fragments.append(window)
    return fragments


def error_of(response: httpx.Response) -> dict[str, str]:
    error: dict[str, str] = response.json()["error"]
    return error


@needs_ssh_keygen
@pytest.mark.parametrize("name", ACCEPTED_FILES)
async def test_accepted_key_stored_canonical(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, tmp_path: Path, name: str
) -> None:
    await add_nodes(context.database, node("n1"))
    line = key_line(name)

    response = await post_key(api, keys.a, line)

    assert response.status_code == 201, response.text
    (stored,) = await stored_keys(context.database)
    assert stored.splitlines() == [stored]
    assert stored == " ".join(line.split())
    assert stored.split(" ")[0] == line.split()[0]
    stored_file = tmp_path / "stored.pub"
    stored_file.write_text(stored + "\n")
    assert keygen_fingerprint(stored_file) == keygen_fingerprint(KEYS_DIR / name)


@pytest.mark.parametrize("name", ["sk_ed25519.pub", "sk_ecdsa256.pub"])
async def test_fido_key_keeps_sk_type(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, name: str
) -> None:
    await add_nodes(context.database, node("n1"))

    response = await post_key(api, keys.a, key_line(name))

    assert response.status_code == 201, response.text
    (stored,) = await stored_keys(context.database)
    key_type = stored.split(" ")[0]
    assert re.fullmatch(r"sk-[a-z0-9-]+@openssh\.com", key_type), key_type


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [("", "\n"), ("", "\r\n"), ("  ", "  "), ("\t", "\t\n"), (" \r\n", "\r\n ")],
    ids=["lf", "crlf", "spaces", "tabs", "mixed"],
)
async def test_padded_key_stored_trimmed(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    ed25519_key: str,
    prefix: str,
    suffix: str,
) -> None:
    await add_nodes(context.database, node("n1"))

    response = await post_key(api, keys.a, prefix + ed25519_key + suffix)

    assert response.status_code == 201, response.text
    assert await stored_keys(context.database) == [ed25519_key]


async def test_tab_separated_key_rebuilt(
    api: httpx.AsyncClient, context: ServiceContext, keys: Keys, ed25519_key: str
) -> None:
    await add_nodes(context.database, node("n1"))
    key_type, data, comment = ed25519_key.split(" ")

    response = await post_key(api, keys.a, f"{key_type}\t{data}  \t{comment}")

    assert response.status_code == 201, response.text
    assert await stored_keys(context.database) == [ed25519_key]


def options_line(option: str) -> str:
    return f"{option} {key_line('ed25519.pub')}"


REJECTED_WITH_MESSAGE: dict[str, tuple[str, str]] = {
    "certificate": (key_line("ed25519_cert.pub"), "certificates are not accepted"),
    "command-option": (options_line('command="ls"'), "options, which are not accepted"),
    "from-option": (options_line('from="10.0.0.1"'), "options, which are not accepted"),
    "cert-authority": (options_line("cert-authority"), "options, which are not accepted"),
    "restrict-option": (options_line("restrict"), "options, which are not accepted"),
    "dsa": (key_line("dsa.pub"), "DSA (ssh-dss) key, and DSA keys are not accepted"),
    "rsa1024": (key_line("rsa1024.pub"), "RSA keys must have at least 2048 bits"),
}


@pytest.mark.parametrize(
    ("ssh_key", "expected_message"),
    REJECTED_WITH_MESSAGE.values(),
    ids=REJECTED_WITH_MESSAGE.keys(),
)
async def test_unacceptable_key_rejected(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    ssh_key: str,
    expected_message: str,
) -> None:
    await add_nodes(context.database, node("n1"))

    response = await post_key(api, keys.a, ssh_key)

    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "validation_error"
    assert error_of(response)["code"] == "invalid_ssh_key"
    assert expected_message in error_of(response)["message"]
    assert echoed_fragments(response, key_data(ssh_key)) == []
    assert await stored_keys(context.database) == []


SECOND_LINES: dict[str, str] = {
    "second-key": key_line("ecdsa256.pub"),
    "command-line": 'command="curl http://127.0.0.1/x | sh" ' + key_line("ecdsa256.pub"),
}


@pytest.mark.parametrize(
    "separator", ["\n", "\r", "\r\n", "\x00"], ids=["lf", "cr", "crlf", "nul"]
)
@pytest.mark.parametrize("second", SECOND_LINES.values(), ids=SECOND_LINES.keys())
async def test_second_line_rejected(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    ed25519_key: str,
    separator: str,
    second: str,
) -> None:
    await add_nodes(context.database, node("n1"))

    response = await post_key(
        api, keys.a, ed25519_key + separator + second, **{"Idempotency-Key": "second-line"}
    )

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_ssh_key"
    leaked = echoed_fragments(response, key_data(ed25519_key), key_data(second))
    assert leaked == []
    assert await stored_keys(context.database) == []


def generate_private_key(directory: Path) -> str:
    assert SSH_KEYGEN is not None
    path = directory / "k"
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "private-key-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path.read_text()


def private_body_lines(private_key: str) -> list[str]:
    """Return the base64 lines between the armor lines of an OpenSSH private key."""
    lines = [line.strip() for line in private_key.splitlines()]
    body = [line for line in lines if line and not line.startswith("-----")]
    assert body, "ssh-keygen wrote a private key without a body"
    return body


async def database_text(database: Database) -> str:
    """Return every value of every table as text, to search for leaked input."""
    parts: list[str] = []
    async with database.read() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).all():
                for value in row:
                    if isinstance(value, bytes):
                        parts.append(value.decode("latin-1"))
                    else:
                        parts.append(str(value))
    return "\n".join(parts)


@needs_ssh_keygen
async def test_private_key_rejected_unlogged(
    api: httpx.AsyncClient,
    context: ServiceContext,
    keys: Keys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await add_nodes(context.database, node("n1"))
    private_key = generate_private_key(tmp_path)
    body_lines = private_body_lines(private_key)
    caplog.set_level(logging.DEBUG)

    response = await post_key(api, keys.a, private_key, **{"Idempotency-Key": "private"})

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_ssh_key"
    assert "contains a private key" in error_of(response)["message"]
    assert [line for line in body_lines if line in response.text] == []
    logged = caplog.text + "\n".join(record.getMessage() for record in caplog.records)
    assert [line for line in body_lines if line in logged] == []
    stored = await database_text(context.database)
    assert [line for line in body_lines if line in stored] == []
    assert await stored_keys(context.database) == []


@pytest.mark.parametrize("ssh_key", ["", "   ", "\n"], ids=["empty", "spaces", "newline"])
async def test_empty_key_rejected(api: httpx.AsyncClient, keys: Keys, ssh_key: str) -> None:
    response = await post_key(api, keys.a, ssh_key)

    assert response.status_code == 400, response.text
    assert error_of(response)["code"] == "invalid_ssh_key"
    assert "empty" in error_of(response)["message"]
