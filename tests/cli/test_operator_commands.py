"""Operator commands (``orgs``, ``users``, ``keys``, ``nodes``) run as real processes.

Each command runs as its own ``computeplane`` process on the test's database, on SQLite and
on PostgreSQL. Their effects are checked through the HTTP API (the ASGI app on the same
database) and through ``nodes list`` and ``keys list``. A failed command exits with status 1
and prints one error line on stderr; a command-line usage error exits with status 2.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import Keys
from support.operator_cli import OperatorCli
from support.processes import computeplane_environment, run_computeplane

pytestmark = pytest.mark.e2e

INSTANCES = "/v1/compute/instances"
AGENT_DESIRED = "/internal/v1/agent/desired"
AGENT_REPORT = "/internal/v1/agent/report"
ONE_GPU = "gpu_1x_h100_sxm5"
EIGHT_GPUS = "gpu_8x_h100_sxm5"

KEY_PATTERN = re.compile(r"[0-9a-f-]{36}:[0-9a-f]{64}\n")
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9_-]{20,}\n")
ISO_TIME_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")


def only_line(result: subprocess.CompletedProcess[str]) -> str:
    """Return the single stdout line of a command that must succeed."""
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout
    return result.stdout.strip()


def create_key(cli: OperatorCli, organization: str, nickname: str, *options: str) -> str:
    """Create an organization with ``options``, a user in it and an admin key for that user.

    Returns the key.
    """
    cli.output("orgs", "create", organization, *options)
    cli.output("users", "create", nickname, "--org", organization)
    return only_line(cli.run("keys", "create", "--user", nickname))


def add_node(cli: OperatorCli, name: str, *options: str) -> str:
    """Register a node with ``options`` and return its agent token."""
    return only_line(cli.run("nodes", "add", name, *options))


def agent_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def create_instance(
    api: httpx.AsyncClient, key: str, ssh_key: str, instance_type: str = ONE_GPU
) -> httpx.Response:
    body = {"instance_type": instance_type, "ssh_key": ssh_key}
    return await api.post(INSTANCES, json=body, headers=Keys.header(key))


def error_code(response: httpx.Response) -> Any:
    return response.json()["error"]["code"]


# orgs create


def test_orgs_create_prints_nothing(cli: OperatorCli) -> None:
    result = cli.run("orgs", "create", "research")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "research" in result.stderr


def test_orgs_create_duplicate_name(cli: OperatorCli) -> None:
    cli.output("orgs", "create", "research")

    result = cli.run("orgs", "create", "research")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Organization 'research' already exists" in result.stderr


@pytest.mark.parametrize("name", ["Research", "bad!", "_underscore-first", "x" * 65])
def test_orgs_create_invalid_name(cli: OperatorCli, name: str) -> None:
    result = cli.run("orgs", "create", name)

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "is invalid" in result.stderr


async def test_orgs_create_no_compute(
    cli: OperatorCli, api: httpx.AsyncClient, ed25519_key: str
) -> None:
    key = create_key(cli, "closed", "cleo", "--no-compute")

    listed = await api.get(INSTANCES, headers=Keys.header(key))
    created = await create_instance(api, key, ed25519_key)

    assert listed.status_code == 403, listed.text
    assert error_code(listed) == "compute_not_enabled"
    assert created.status_code == 403, created.text


async def test_orgs_create_gpu_quota(
    cli: OperatorCli, api: httpx.AsyncClient, ed25519_key: str
) -> None:
    key = create_key(cli, "capped", "cara", "--gpu-quota", "8")
    add_node(cli, "big", "--region", "us-west", "--gpus", "8")
    add_node(cli, "small", "--region", "us-east", "--gpus", "1")

    within = await create_instance(api, key, ed25519_key, EIGHT_GPUS)
    beyond = await create_instance(api, key, ed25519_key)

    assert within.status_code == 201, within.text
    assert beyond.status_code == 403, beyond.text
    assert error_code(beyond) == "quota_exceeded"


def test_orgs_create_negative_quota(cli: OperatorCli) -> None:
    result = cli.run("orgs", "create", "capped", "--gpu-quota", "-1")

    assert result.returncode != 0, result.stderr
    assert result.stdout == ""
    assert "--gpu-quota" in result.stderr
    # Nothing was created, so the name is still free.
    assert cli.run("orgs", "create", "capped").returncode == 0


# users create


def test_users_create_unknown_org(cli: OperatorCli) -> None:
    result = cli.run("users", "create", "ada", "--org", "missing")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "No organization named 'missing'" in result.stderr


def test_users_create_taken_names_owner(cli: OperatorCli) -> None:
    cli.output("orgs", "create", "research")
    cli.output("orgs", "create", "finance")
    cli.output("users", "create", "ada", "--org", "research")

    result = cli.run("users", "create", "ada", "--org", "finance")

    assert result.returncode == 1, result.stderr
    assert "User 'ada' already exists in organization 'research'" in result.stderr


# keys


@pytest.mark.parametrize(("scope", "list_status"), [("admin", 200), ("api", 403)])
async def test_keys_create_prints_key_alone(
    cli: OperatorCli, api: httpx.AsyncClient, scope: str, list_status: int
) -> None:
    cli.output("orgs", "create", "research")
    cli.output("users", "create", "ada", "--org", "research")

    result = cli.run("keys", "create", "--user", "ada", "--scope", scope)

    assert result.returncode == 0, result.stderr
    assert KEY_PATTERN.fullmatch(result.stdout), result.stdout
    # The key authenticates; only an admin key may use the compute API.
    listed = await api.get(INSTANCES, headers=Keys.header(result.stdout.strip()))
    assert listed.status_code == list_status, listed.text


def test_keys_create_unknown_user(cli: OperatorCli) -> None:
    result = cli.run("keys", "create", "--user", "nobody")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "No user with nickname 'nobody'" in result.stderr


def test_keys_list_omits_secret(cli: OperatorCli) -> None:
    key = create_key(cli, "research", "ada")
    key_id, _, secret = key.partition(":")

    result = cli.run("keys", "list")

    assert result.returncode == 0, result.stderr
    assert key_id in result.stdout
    assert secret not in result.stdout
    assert secret not in result.stderr
    assert cli.keys()[key_id]["USER"] == "ada"


def test_keys_list_full_id_when_piped(cli: OperatorCli) -> None:
    key_id = create_key(cli, "research", "ada").partition(":")[0]
    environment = computeplane_environment()
    environment.pop("COLUMNS", None)
    environment.pop("FORCE_COLOR", None)

    result = run_computeplane(
        ["keys", "list", "--data-dir", str(cli.data_dir), "--database-url", cli.database_url],
        env=environment,
    )

    assert result.returncode == 0, result.stderr
    assert key_id in result.stdout, result.stdout


async def test_keys_revoke_rejects_key(cli: OperatorCli, api: httpx.AsyncClient) -> None:
    key = create_key(cli, "research", "ada")
    key_id = key.partition(":")[0]

    result = cli.run("keys", "revoke", key_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    listed = await api.get(INSTANCES, headers=Keys.header(key))
    assert listed.status_code == 401, listed.text
    assert ISO_TIME_PATTERN.fullmatch(cli.keys()[key_id]["REVOKED"])


def test_keys_revoke_unknown_id(cli: OperatorCli) -> None:
    result = cli.run("keys", "revoke", "00000000-0000-0000-0000-000000000000")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "No API key with id '00000000-0000-0000-0000-000000000000'" in result.stderr


# nodes add and list


async def test_nodes_add_prints_token_alone(cli: OperatorCli, api: httpx.AsyncClient) -> None:
    result = cli.run(
        "nodes", "add", "n1", "--region", "us-west", "--sector", "sector_1", "--gpus", "8"
    )

    assert result.returncode == 0, result.stderr
    assert TOKEN_PATTERN.fullmatch(result.stdout), result.stdout
    desired = await api.get(
        f"{AGENT_DESIRED}?wait=0", headers=agent_headers(result.stdout.strip())
    )
    assert desired.status_code == 200, desired.text
    assert desired.json()["node_name"] == "n1"


def test_nodes_add_duplicate_name(cli: OperatorCli) -> None:
    add_node(cli, "n1", "--region", "us-west", "--gpus", "8")

    result = cli.run("nodes", "add", "n1", "--region", "us-east", "--gpus", "4")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "Node 'n1' already exists" in result.stderr
    assert cli.nodes()["n1"]["REGION"] == "us-west"


@pytest.mark.parametrize(
    ("options", "named_option"),
    [
        (["--region", "mars", "--gpus", "8"], "--region"),
        (["--region", "us-west", "--gpus", "0"], "--gpus"),
        (["--region", "us-west", "--gpus", "9"], "--gpus"),
        (["--region", "us-west", "--sector", "sector_9", "--gpus", "8"], "--sector"),
    ],
)
def test_nodes_add_invalid_spec(cli: OperatorCli, options: list[str], named_option: str) -> None:
    result = cli.run("nodes", "add", "n1", *options)

    assert result.returncode != 0, result.stdout
    assert result.stdout == ""
    assert named_option in result.stderr
    assert "n1" not in cli.nodes()


async def test_nodes_list_columns(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    west_token = add_node(
        cli, "west", "--region", "us-west", "--sector", "sector_1", "--gpus", "8"
    )
    add_node(cli, "east", "--region", "us-east", "--gpus", "2")
    # A 1x instance goes to a node outside any sector while one has room.
    created = await create_instance(api, keys.a, ed25519_key)
    assert created.status_code == 201, created.text
    report = await api.post(
        AGENT_REPORT,
        json={"applied_version": 0, "instances": []},
        headers=agent_headers(west_token),
    )
    assert report.status_code == 204, report.text

    rows = cli.nodes()

    west = dict(rows["west"])
    heartbeat = west.pop("LAST HEARTBEAT")
    assert west == {
        "NAME": "west",
        "REGION": "us-west",
        "SECTOR": "sector_1",
        "GPUS": "8",
        "FREE": "8",
        "USED": "0",
        "INSTANCES": "0",
        "STATE": "active",
        "AGENT": "reporting",
    }
    assert ISO_TIME_PATTERN.fullmatch(heartbeat), heartbeat
    assert rows["east"] == {
        "NAME": "east",
        "REGION": "us-east",
        "SECTOR": "-",
        "GPUS": "2",
        "FREE": "1",
        "USED": "1",
        "INSTANCES": "1",
        "STATE": "active",
        "AGENT": "silent",
        "LAST HEARTBEAT": "-",
    }


# nodes drain and remove


async def test_nodes_drain_stops_placement(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    add_node(cli, "drained", "--region", "us-west", "--gpus", "1")
    add_node(cli, "open", "--region", "us-west", "--gpus", "1")

    result = cli.run("nodes", "drain", "drained")
    first = await create_instance(api, keys.a, ed25519_key)
    second = await create_instance(api, keys.a, ed25519_key)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    rows = cli.nodes()
    assert rows["drained"]["STATE"] == "draining"
    assert first.status_code == 201, first.text
    assert rows["open"]["USED"] == "1"
    assert rows["drained"]["USED"] == "0"
    assert second.status_code == 503, second.text
    assert error_code(second) == "insufficient_capacity"


async def test_nodes_undrain_restores_placement(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    add_node(cli, "n1", "--region", "us-west", "--gpus", "1")
    cli.output("nodes", "drain", "n1")
    while_drained = await create_instance(api, keys.a, ed25519_key)

    result = cli.run("nodes", "undrain", "n1")
    created = await create_instance(api, keys.a, ed25519_key)

    assert while_drained.status_code == 503, while_drained.text
    assert result.returncode == 0, result.stderr
    assert "node n1 undrained" in result.stderr
    assert cli.nodes()["n1"]["STATE"] == "active"
    assert created.status_code == 201, created.text


def test_nodes_undrain_active_changes_nothing(cli: OperatorCli) -> None:
    add_node(cli, "n1", "--region", "us-west", "--gpus", "1")

    result = cli.run("nodes", "undrain", "n1")

    assert result.returncode == 0, result.stderr
    assert "was not drained" in result.stderr
    assert cli.nodes()["n1"]["STATE"] == "active"


def test_nodes_drain_unknown_node(cli: OperatorCli) -> None:
    result = cli.run("nodes", "drain", "missing")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "No node named 'missing'" in result.stderr


async def test_nodes_remove_refuses_busy_node(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    add_node(cli, "n1", "--region", "us-west", "--gpus", "8")
    created = await create_instance(api, keys.a, ed25519_key)
    assert created.status_code == 201, created.text

    result = cli.run("nodes", "remove", "n1")

    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    assert "delete them" in result.stderr
    assert "--force" in result.stderr
    assert cli.nodes()["n1"]["USED"] == "1"


async def test_nodes_remove_force_stops_instances(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    add_node(cli, "n1", "--region", "us-west", "--gpus", "8")
    created = await create_instance(api, keys.a, ed25519_key)
    assert created.status_code == 201, created.text

    result = cli.run("nodes", "remove", "n1", "--force")

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    instance = await api.get(f"{INSTANCES}/{created.json()['id']}", headers=Keys.header(keys.a))
    assert instance.status_code == 200, instance.text
    assert instance.json()["status"] == "stopped"
    assert "removed" in instance.json()["status_reason"], instance.json()
    assert "n1" not in cli.nodes()


async def test_removed_node_told_to_stop(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    token = add_node(cli, "n1", "--region", "us-west", "--gpus", "8")
    created = await create_instance(api, keys.a, ed25519_key)
    assert created.status_code == 201, created.text
    before = await api.get(f"{AGENT_DESIRED}?wait=0", headers=agent_headers(token))
    assert before.status_code == 200, before.text

    cli.output("nodes", "remove", "n1", "--force")

    desired = await api.get(f"{AGENT_DESIRED}?wait=0", headers=agent_headers(token))
    report = await api.post(
        AGENT_REPORT, json={"applied_version": 0, "instances": []}, headers=agent_headers(token)
    )
    assert desired.status_code == 200, desired.text
    assert desired.json()["node_removed"] is True
    assert desired.json()["instances"] == []
    assert report.status_code == 401, report.text


async def test_nodes_add_after_remove(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys, ed25519_key: str
) -> None:
    old_token = add_node(cli, "n1", "--region", "us-west", "--gpus", "8")
    created = await create_instance(api, keys.a, ed25519_key)
    assert created.status_code == 201, created.text
    cli.output("nodes", "remove", "n1", "--force")

    new_token = add_node(cli, "n1", "--region", "us-west", "--gpus", "8")

    assert new_token != old_token
    desired = await api.get(f"{AGENT_DESIRED}?wait=0", headers=agent_headers(new_token))
    assert desired.status_code == 200, desired.text
    assert desired.json()["instances"] == []
    # The forced removal released the GPUs, so the same node takes a whole-node instance.
    row = cli.nodes()["n1"]
    assert row["FREE"] == "8", row
    assert row["USED"] == "0", row
    whole = await create_instance(api, keys.a, ed25519_key, EIGHT_GPUS)
    assert whole.status_code == 201, whole.text


# settings


@pytest.mark.parametrize(
    ("variables", "options", "setting"),
    [
        pytest.param(
            {"COMPUTEPLANE_DATABASE_URL": "mysql://x"},
            [],
            "database_url",
            id="database-url-env",
        ),
        pytest.param(
            {},
            ["--database-url", "mysql://x"],
            "database_url",
            id="database-url-option",
        ),
        pytest.param(
            {},
            ["--database-url", "postgresql://u:p@127.0.0.1:99999/db"],
            "database_url",
            id="database-port",
        ),
        pytest.param({"COMPUTEPLANE_LOCAL_SSH_PORT": "0"}, [], "local_ssh_port", id="ssh-port"),
        pytest.param(
            {"COMPUTEPLANE_RATE_LIMIT_REQUESTS": "-1"}, [], "rate_limit_requests", id="rate"
        ),
        pytest.param(
            {"COMPUTEPLANE_LOCAL_ADDRESS_POOL": "10.0.0.0/24"},
            [],
            "local_address_pool",
            id="address-pool",
        ),
    ],
)
def test_invalid_setting_exits_2(
    tmp_path: Path, variables: dict[str, str], options: list[str], setting: str
) -> None:
    result = run_computeplane(
        ["nodes", "list", "--data-dir", str(tmp_path / "data"), *options],
        env=computeplane_environment(variables),
    )

    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert setting in result.stderr
    assert "Traceback" not in result.stderr


def test_non_utf8_argument_exits_2(cli: OperatorCli) -> None:
    # A byte that is not UTF-8 reaches the command as a lone surrogate.
    result = run_computeplane(
        ["nodes", "drain", "\udcff", "--data-dir", str(cli.data_dir)],
        env={**cli.env, "COMPUTEPLANE_DATABASE_URL": cli.database_url},
    )

    assert result.returncode == 2, result.stderr
    assert "every argument must be valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr


def test_orgs_create_huge_quota_exits_2(cli: OperatorCli) -> None:
    result = cli.run("orgs", "create", "big", "--gpu-quota", "99999999999999999999")

    assert result.returncode == 2, result.stderr
    assert "less than or equal to 1000000" in result.stderr
