"""Operator views and actions across organizations, and the command line's help text.

``orgs list|update``, ``users list``, ``instances list|delete|events`` and ``keys revoke``
run as real ``computeplane`` processes on the test's database, on SQLite and on PostgreSQL.
The state they read is set up through the services and the HTTP API (the ASGI app on the
same database), and their effects are checked through the API, the agents' API and the
listings. A failed command exits with status 1 and a usage error with status 2.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
from typing import Any

import httpx
import pytest

from computeplane import __version__
from computeplane.domain.catalog import Region
from computeplane.services import accounts, operations
from computeplane.store.database import Database
from conftest import Keys, add_nodes, make_key, node
from support.operator_cli import OperatorCli, parse_table, table
from support.processes import computeplane_environment, run_computeplane

pytestmark = pytest.mark.e2e

INSTANCES = "/v1/compute/instances"
AGENT_DESIRED = "/internal/v1/agent/desired"
AGENT_REPORT = "/internal/v1/agent/report"
ONE_GPU = "gpu_1x_h100_sxm5"
EIGHT_GPUS = "gpu_8x_h100_sxm5"

ISO_TIME_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")
UNKNOWN_INSTANCE = "inst_" + "a" * 20


async def create_instance(
    api: httpx.AsyncClient, key: str, ssh_key: str, instance_type: str = ONE_GPU
) -> httpx.Response:
    body = {"instance_type": instance_type, "ssh_key": ssh_key}
    return await api.post(INSTANCES, json=body, headers=Keys.header(key))


async def created_id(
    api: httpx.AsyncClient, key: str, ssh_key: str, instance_type: str = ONE_GPU
) -> str:
    """Create an instance that must be accepted and return its id."""
    response = await create_instance(api, key, ssh_key, instance_type)
    assert response.status_code == 201, response.text
    instance_id: str = response.json()["id"]
    return instance_id


def error_code(response: httpx.Response) -> Any:
    return response.json()["error"]["code"]


def agent_headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def failed(result: subprocess.CompletedProcess[str], exit_code: int = 1) -> str:
    """Return the stderr of a command that must fail with ``exit_code`` and print nothing."""
    assert result.returncode == exit_code, result.stderr
    assert result.stdout == "", result.stdout
    return result.stderr


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {row["NAME"]: row for row in rows}


async def organizations(database: Database) -> dict[str, operations.OrganizationSummary]:
    return {item.name: item for item in await operations.list_organizations(database)}


# orgs list


async def test_orgs_list_columns(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    await make_key(database, "capped", "cara", gpu_quota=4)
    await add_nodes(database, node("n1", gpus=8), node("n2", gpus=8))
    await created_id(api, keys.a, ed25519_key, EIGHT_GPUS)
    await created_id(api, keys.a, ed25519_key)

    rows = by_name(table(cli, "orgs", "list"))

    assert rows == {
        "capped": {
            "NAME": "capped",
            "COMPUTE": "yes",
            "GPU QUOTA": "4",
            "GPUS HELD": "0",
            "USERS": "1",
        },
        "org-a": {
            "NAME": "org-a",
            "COMPUTE": "yes",
            "GPU QUOTA": "unlimited",
            "GPUS HELD": "9",
            "USERS": "2",
        },
        "org-b": {
            "NAME": "org-b",
            "COMPUTE": "yes",
            "GPU QUOTA": "unlimited",
            "GPUS HELD": "0",
            "USERS": "1",
        },
        "org-nocompute": {
            "NAME": "org-nocompute",
            "COMPUTE": "no",
            "GPU QUOTA": "unlimited",
            "GPUS HELD": "0",
            "USERS": "1",
        },
    }


async def test_orgs_list_held_until_release(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    tokens = await add_nodes(database, node("n1", gpus=8))
    instance_id = await created_id(api, keys.a, ed25519_key)
    deleted = await api.delete(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    assert deleted.status_code == 204, deleted.text

    before_teardown = by_name(table(cli, "orgs", "list"))["org-a"]["GPUS HELD"]
    desired = await api.get(f"{AGENT_DESIRED}?wait=0", headers=agent_headers(tokens["n1"]))
    report = await api.post(
        AGENT_REPORT,
        json={"applied_version": desired.json()["version"], "instances": []},
        headers=agent_headers(tokens["n1"]),
    )
    assert report.status_code == 204, report.text
    after_teardown = by_name(table(cli, "orgs", "list"))["org-a"]["GPUS HELD"]

    # A deleted instance keeps its GPU until its node confirms the teardown.
    assert before_teardown == "1"
    assert after_teardown == "0"


# orgs update


async def test_orgs_update_quota_enforced(
    cli: OperatorCli, api: httpx.AsyncClient, database: Database, ed25519_key: str
) -> None:
    key = await make_key(database, "capped", "cara", gpu_quota=0)
    await add_nodes(database, node("n1", gpus=8))
    rejected = await create_instance(api, key, ed25519_key)

    result = cli.run("orgs", "update", "capped", "--gpu-quota", "1")
    within = await create_instance(api, key, ed25519_key)
    beyond = await create_instance(api, key, ed25519_key)

    assert rejected.status_code == 403, rejected.text
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "GPU quota 1" in result.stderr
    assert "warning" not in result.stderr
    assert within.status_code == 201, within.text
    assert beyond.status_code == 403, beyond.text
    assert error_code(beyond) == "quota_exceeded"


async def test_orgs_update_removes_quota(
    cli: OperatorCli, api: httpx.AsyncClient, database: Database, ed25519_key: str
) -> None:
    key = await make_key(database, "capped", "cara", gpu_quota=1)
    await add_nodes(database, node("n1", gpus=8))
    await created_id(api, key, ed25519_key)
    rejected = await create_instance(api, key, ed25519_key)

    result = cli.run("orgs", "update", "capped", "--no-gpu-quota")
    accepted = await create_instance(api, key, ed25519_key)

    assert rejected.status_code == 403, rejected.text
    assert result.returncode == 0, result.stderr
    assert accepted.status_code == 201, accepted.text
    assert (await organizations(database))["capped"].gpu_quota is None


async def test_orgs_update_compute_permission(
    cli: OperatorCli, api: httpx.AsyncClient, keys: Keys
) -> None:
    denied = cli.run("orgs", "update", "org-a", "--no-compute")
    listed_denied = await api.get(INSTANCES, headers=Keys.header(keys.a))
    granted = cli.run("orgs", "update", "org-nocompute", "--compute")
    listed_granted = await api.get(INSTANCES, headers=Keys.header(keys.no_compute))

    assert denied.returncode == 0, denied.stderr
    assert listed_denied.status_code == 403, listed_denied.text
    assert error_code(listed_denied) == "compute_not_enabled"
    assert granted.returncode == 0, granted.stderr
    assert listed_granted.status_code == 200, listed_granted.text


async def test_orgs_update_below_usage_warns(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    await add_nodes(database, node("n1", gpus=8), node("n2", gpus=8))
    running = await created_id(api, keys.a, ed25519_key, EIGHT_GPUS)

    result = cli.run("orgs", "update", "org-a", "--gpu-quota", "1")
    rejected = await create_instance(api, keys.a, ed25519_key)
    kept = await api.get(f"{INSTANCES}/{running}", headers=Keys.header(keys.a))

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "warning: organization org-a holds 8 GPUs" in result.stderr
    assert "new creates will be rejected until its usage drops" in result.stderr
    assert (await organizations(database))["org-a"].gpu_quota == 1
    assert rejected.status_code == 403, rejected.text
    assert error_code(rejected) == "quota_exceeded"
    # Lowering the quota never stops what runs.
    assert kept.status_code == 200, kept.text
    assert kept.json()["status"] == "pending"


def test_orgs_update_unknown_org(cli: OperatorCli) -> None:
    stderr = failed(cli.run("orgs", "update", "missing", "--compute"))

    assert "No organization named 'missing'" in stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param([], "nothing to change", id="no-change"),
        pytest.param(
            ["--gpu-quota", "2", "--no-gpu-quota"], "exclude each other", id="both-quotas"
        ),
        pytest.param(["--gpu-quota", "-1"], "--gpu-quota", id="negative-quota"),
    ],
)
async def test_orgs_update_usage_error(
    cli: OperatorCli, database: Database, options: list[str], message: str
) -> None:
    await accounts.create_organization(database, "capped", gpu_quota=4)

    stderr = failed(cli.run("orgs", "update", "capped", *options), exit_code=2)

    assert "Usage: computeplane orgs update" in stderr
    assert message in stderr
    assert (await organizations(database))["capped"].gpu_quota == 4


# users list


async def test_users_list_key_counts(cli: OperatorCli, database: Database, keys: Keys) -> None:
    await accounts.create_key(database, "alice", "admin")
    await accounts.revoke_key(database, keys.a.partition(":")[0])

    rows = table(cli, "users", "list")

    created = [row.pop("CREATED") for row in rows]
    assert rows == [
        {"NICKNAME": "alice", "ORGANIZATION": "org-a", "ACTIVE KEYS": "1", "REVOKED KEYS": "1"},
        {
            "NICKNAME": "alice-api",
            "ORGANIZATION": "org-a",
            "ACTIVE KEYS": "1",
            "REVOKED KEYS": "0",
        },
        {"NICKNAME": "bob", "ORGANIZATION": "org-b", "ACTIVE KEYS": "1", "REVOKED KEYS": "0"},
        {
            "NICKNAME": "nora",
            "ORGANIZATION": "org-nocompute",
            "ACTIVE KEYS": "1",
            "REVOKED KEYS": "0",
        },
    ]
    assert all(ISO_TIME_PATTERN.fullmatch(value) for value in created), created


async def test_users_list_org_filter(cli: OperatorCli, keys: Keys) -> None:
    rows = table(cli, "users", "list", "--org", "org-a")

    assert [row["NICKNAME"] for row in rows] == ["alice", "alice-api"]


def test_users_list_unknown_org(cli: OperatorCli) -> None:
    stderr = failed(cli.run("users", "list", "--org", "missing"))

    assert "No organization named 'missing'" in stderr


# keys revoke


async def test_keys_revoke_twice_reports_time(
    cli: OperatorCli, api: httpx.AsyncClient, database: Database, keys: Keys
) -> None:
    key_id = keys.a.partition(":")[0]
    await accounts.revoke_key(database, key_id)
    revoked_at = {key.key_id: key.revoked_at for key in await accounts.list_keys(database)}[key_id]
    assert revoked_at is not None

    result = cli.run("keys", "revoke", key_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    expected = f"key {key_id} was already revoked at {revoked_at.isoformat(timespec='seconds')}"
    assert expected in result.stderr
    listed = await api.get(INSTANCES, headers=Keys.header(keys.a))
    assert listed.status_code == 401, listed.text


# instances list


async def test_instances_list_columns(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    tokens = await add_nodes(database, node("n1", gpus=8, region=Region.US_EAST))
    older = await created_id(api, keys.a, ed25519_key)
    newer = await created_id(api, keys.b, ed25519_key)
    report = await api.post(
        AGENT_REPORT,
        json={
            "applied_version": 0,
            "instances": [
                {"instance_id": older, "state": "running", "ip": "127.91.4.7", "ssh_port": 2201}
            ],
        },
        headers=agent_headers(tokens["n1"]),
    )
    assert report.status_code == 204, report.text

    rows = table(cli, "instances", "list")

    assert [row["ID"] for row in rows] == [newer, older]
    created = [row.pop("CREATED") for row in rows]
    assert all(ISO_TIME_PATTERN.fullmatch(value) for value in created), created
    assert rows[1] == {
        "ID": older,
        "ORGANIZATION": "org-a",
        "CREATOR": "alice",
        "TYPE": ONE_GPU,
        "REGION": "us-east",
        "SECTOR": "-",
        "NODE": "n1",
        "STATUS": "ready",
        "ADDRESS": "127.91.4.7:2201",
    }
    assert rows[0]["ORGANIZATION"] == "org-b"
    assert rows[0]["CREATOR"] == "bob"
    assert rows[0]["TYPE"] == ONE_GPU
    assert rows[0]["STATUS"] == "pending"
    assert rows[0]["ADDRESS"] == "-"


@pytest.mark.parametrize(
    ("options", "expected_owner"),
    [
        pytest.param(["--org", "org-b"], "bob", id="org"),
        pytest.param(["--node", "first"], "alice", id="node"),
    ],
)
async def test_instances_list_filters(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
    options: list[str],
    expected_owner: str,
) -> None:
    # Each node takes one 1-GPU instance, so adding the second node later fixes placement.
    await add_nodes(database, node("first", gpus=1))
    owners = {await created_id(api, keys.a, ed25519_key): "alice"}
    await add_nodes(database, node("second", gpus=1))
    owners[await created_id(api, keys.b, ed25519_key)] = "bob"

    rows = table(cli, "instances", "list", *options)

    assert [owners[row["ID"]] for row in rows] == [expected_owner]


async def test_instances_list_limit_newest(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    await add_nodes(database, node("n1", gpus=8))
    created = [await created_id(api, keys.a, ed25519_key) for _ in range(3)]

    limited = cli.run("instances", "list", "--limit", "2")
    everything = cli.run("instances", "list", "--limit", "3")

    assert limited.returncode == 0, limited.stderr
    assert [row["ID"] for row in parse_table(limited.stdout)] == created[:0:-1]
    assert "only the newest 2 instances are shown" in limited.stderr
    assert [row["ID"] for row in parse_table(everything.stdout)] == created[::-1]
    assert "only the newest" not in everything.stderr


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param(["--org", "missing"], "No organization named 'missing'", id="org"),
        pytest.param(["--node", "missing"], "No node named 'missing'", id="node"),
    ],
)
def test_instances_list_unknown_filter(cli: OperatorCli, options: list[str], message: str) -> None:
    stderr = failed(cli.run("instances", "list", *options))

    assert message in stderr


# instances delete


async def test_instances_delete_hides_from_owner(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    await add_nodes(database, node("n1", gpus=8))
    deleted_id = await created_id(api, keys.a, ed25519_key)
    kept_id = await created_id(api, keys.a, ed25519_key)

    result = cli.run("instances", "delete", deleted_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert deleted_id in result.stderr
    fetched = await api.get(f"{INSTANCES}/{deleted_id}", headers=Keys.header(keys.a))
    assert fetched.status_code == 404, fetched.text
    owner_delete = await api.delete(f"{INSTANCES}/{deleted_id}", headers=Keys.header(keys.a))
    assert owner_delete.status_code == 404, owner_delete.text
    listed = await api.get(INSTANCES, headers=Keys.header(keys.a))
    assert [item["id"] for item in listed.json()["instances"]] == [kept_id]

    visible = table(cli, "instances", "list")
    assert [row["ID"] for row in visible] == [kept_id]
    everything = {row["ID"]: row for row in table(cli, "instances", "list", "--all")}
    assert ISO_TIME_PATTERN.fullmatch(everything[deleted_id]["DELETED"]), everything
    assert everything[deleted_id]["STATUS"] == "stopped"
    assert everything[kept_id]["DELETED"] == "-"


async def test_instances_delete_wakes_agent(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    tokens = await add_nodes(database, node("n1", gpus=8))
    instance_id = await created_id(api, keys.a, ed25519_key)
    before = await api.get(f"{AGENT_DESIRED}?wait=0", headers=agent_headers(tokens["n1"]))
    assert [item["instance_id"] for item in before.json()["instances"]] == [instance_id]
    version = before.json()["version"]

    # The long-poll waits for a version other than the current one, for up to 50 seconds.
    poll = asyncio.create_task(
        api.get(
            f"{AGENT_DESIRED}?after={version}&wait=50",
            headers=agent_headers(tokens["n1"]),
            timeout=120,
        )
    )
    result = await asyncio.to_thread(cli.run, "instances", "delete", instance_id)
    desired = await poll

    assert result.returncode == 0, result.stderr
    assert desired.status_code == 200, desired.text
    assert desired.json()["version"] > version
    assert desired.json()["instances"] == []


@pytest.mark.parametrize(
    ("instance_id", "message"),
    [
        pytest.param(UNKNOWN_INSTANCE, f"Instance '{UNKNOWN_INSTANCE}' not found", id="unknown"),
        pytest.param("not-an-id\x1b", "Instance not found", id="malformed"),
    ],
)
def test_instances_delete_unknown_id(cli: OperatorCli, instance_id: str, message: str) -> None:
    stderr = failed(cli.run("instances", "delete", instance_id))

    assert message in stderr
    assert "\x1b" not in stderr


async def test_instances_delete_already_deleted(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    await add_nodes(database, node("n1", gpus=8))
    instance_id = await created_id(api, keys.a, ed25519_key)
    deleted = await api.delete(f"{INSTANCES}/{instance_id}", headers=Keys.header(keys.a))
    assert deleted.status_code == 204, deleted.text

    stderr = failed(cli.run("instances", "delete", instance_id))

    assert f"Instance '{instance_id}' not found or already deleted" in stderr


# instances events


async def test_instances_events_placed_then_deleted(
    cli: OperatorCli,
    api: httpx.AsyncClient,
    database: Database,
    keys: Keys,
    ed25519_key: str,
) -> None:
    await add_nodes(database, node("n1", gpus=8))
    created = await create_instance(api, keys.a, ed25519_key)
    assert created.status_code == 201, created.text
    instance_id = created.json()["id"]
    cli.output("instances", "delete", instance_id)

    rows = table(cli, "instances", "events", instance_id)

    times = [row.pop("TIME") for row in rows]
    assert all(ISO_TIME_PATTERN.fullmatch(value) for value in times), times
    assert rows == [
        {
            "FROM": "-",
            "TO": "pending",
            "REASON": "placed",
            "MESSAGE": "-",
            "ACTOR": "user:alice",
            "REQUEST ID": created.headers["X-Request-Id"],
        },
        {
            "FROM": "pending",
            "TO": "stopped",
            "REASON": "deleted",
            "MESSAGE": "deleted by the operator",
            "ACTOR": "operator",
            "REQUEST ID": "-",
        },
    ]


def test_instances_events_unknown_id(cli: OperatorCli) -> None:
    stderr = failed(cli.run("instances", "events", UNKNOWN_INSTANCE))

    assert f"Instance '{UNKNOWN_INSTANCE}' not found" in stderr


# help


def help_text(*command: str) -> str:
    """Return the help of a command as printed on an 80-column terminal."""
    result = run_computeplane(
        [*command, "--help"], env=computeplane_environment({"COLUMNS": "80"})
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def flattened(text: str) -> str:
    """Return help text with its line wrapping undone."""
    return " ".join(text.split())


@pytest.mark.parametrize(
    "command",
    [
        pytest.param([], id="root"),
        pytest.param(["serve"], id="serve"),
        pytest.param(["agent"], id="agent"),
        pytest.param(["orgs", "create"], id="orgs-create"),
        pytest.param(["orgs", "update"], id="orgs-update"),
        pytest.param(["instances", "list"], id="instances-list"),
    ],
)
def test_help_plain_within_80_columns(command: list[str]) -> None:
    text = help_text(*command)

    assert " ." not in text
    assert "<bool>" not in text
    assert max(len(line) for line in text.splitlines()) <= 80, text


def test_serve_help_shows_defaults() -> None:
    text = flattened(help_text("serve"))

    assert "[env var: COMPUTEPLANE_HOST; default: 127.0.0.1]" in text
    assert "[env var: COMPUTEPLANE_PORT; default: 8000]" in text
    assert "env var: COMPUTEPLANE_DATABASE_URL" in text
    assert "default: INFO" in text


def test_agent_help_describes_options() -> None:
    text = flattened(help_text("agent"))

    assert "env var: COMPUTEPLANE_NODE_TOKEN" in text
    assert "Directory for the agent's instance state" in text


def test_orgs_create_help_quota() -> None:
    text = flattened(help_text("orgs", "create"))

    assert "Maximum GPUs the organization may hold at once; omit for no limit." in text


def test_users_create_help_uniqueness() -> None:
    text = flattened(help_text("users", "create"))

    assert "Nicknames are unique across all organizations" in text


@pytest.mark.parametrize(
    ("group", "command"),
    [
        ([], "instances"),
        (["orgs"], "update"),
        (["users"], "list"),
        (["keys"], "revoke"),
        (["nodes"], "list"),
        (["instances"], "events"),
    ],
)
def test_help_short_help_whole(group: list[str], command: str) -> None:
    commands = help_text(*group).partition("Commands:")[2].splitlines()

    assert any(line.split()[:1] == [command] for line in commands), commands
    # Click cuts a short help that does not fit beside the command names with "...".
    assert not [line for line in commands if line.endswith("...")], commands


def test_version_flag() -> None:
    result = run_computeplane(["--version"], env=computeplane_environment())

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{__version__}\n"
