"""Wire compatibility with fal's Compute Instances API, checked against its schema facts.

``tests/data/fal_compute_schema_facts.json`` contains the schemas of fal's published OpenAPI
document for ``/v1/compute/instances`` (statuses, bodies, parameters and the error envelope)
without its prose. Every response here is validated against it with a JSON Schema draft
2020-12 validator. fal's schemas allow additional properties, and computeplane adds
``EXTRA_INSTANCE_FIELDS`` to instances and ``code`` to errors, nothing else.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from sqlalchemy import select

from computeplane.api.app import create_app
from computeplane.domain.catalog import Region, Sector
from computeplane.domain.clock import utcnow
from computeplane.services import idempotency
from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import IdempotencyRecord, Organization
from conftest import BASE_URL, Keys, add_nodes, make_key, node

FACTS: dict[str, Any] = json.loads(
    (Path(__file__).parents[1] / "data" / "fal_compute_schema_facts.json").read_text()
)
DEFS: dict[str, Any] = FACTS["$defs"]

COLLECTION = "/v1/compute/instances"
ITEM = "/v1/compute/instances/{id}"
OPERATIONS = [("post", COLLECTION), ("get", COLLECTION), ("get", ITEM), ("delete", ITEM)]

INSTANCE_SCHEMA = {"$ref": "#/$defs/Instance"}
ERROR_SCHEMA = {"$ref": "#/$defs/Error"}
REQUEST_SCHEMA = FACTS["paths"][COLLECTION]["post"]["requestBody"]["schema"]

FAL_INSTANCE_FIELDS = set(DEFS["Instance"]["properties"])
EXTRA_INSTANCE_FIELDS = {"ssh_user", "ssh_port", "created_at", "status_reason"}
FAL_ERROR_FIELDS = set(DEFS["Error"]["properties"]["error"]["properties"])
EXTRA_ERROR_FIELDS = {"code"}

ONE_GPU = "gpu_1x_h100_sxm5"
EIGHT_GPUS = "gpu_8x_h100_sxm5"
UNKNOWN_ID = "inst_aaaaaaaaaaaaaaaaaaaa"


def schema_errors(instance: Any, schema: dict[str, Any]) -> list[str]:
    """Validate ``instance`` against a facts schema and return one line per violation."""
    validator = Draft202012Validator({"$defs": DEFS, **schema})
    return [f"{error.json_path}: {error.message}" for error in validator.iter_errors(instance)]


def documented_schema(method: str, path: str, status: int) -> dict[str, Any] | None:
    """Return the body schema fal documents for the status, or Error for other error statuses."""
    responses = FACTS["paths"][path][method]["responses"]
    if str(status) in responses:
        schema: dict[str, Any] | None = responses[str(status)]
        return schema
    assert status >= 400, f"fal documents no {status} for {method.upper()} {path}"
    return ERROR_SCHEMA


def null_fields(instance: dict[str, Any]) -> list[str]:
    return [name for name, value in instance.items() if value is None]


def assert_instance(instance: dict[str, Any]) -> None:
    """Assert one instance object is fal's shape, with nulls omitted and only known extras."""
    assert schema_errors(instance, INSTANCE_SCHEMA) == []
    assert null_fields(instance) == []
    assert set(instance) - FAL_INSTANCE_FIELDS <= EXTRA_INSTANCE_FIELDS
    assert instance["id"].startswith("inst_")
    assert instance["region"] in DEFS["Region"]["enum"]


def assert_success(response: httpx.Response, method: str, path: str) -> Any:
    """Assert the operation's success status and body schema, and return the parsed body."""
    operation = FACTS["paths"][path][method]
    assert response.status_code == operation["success"], response.text
    schema = documented_schema(method, path, response.status_code)
    if schema is None:
        assert response.content == b""
        return None

    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert schema_errors(body, schema) == []
    is_listing = (method, path) == ("get", COLLECTION)
    instances = body["instances"] if is_listing else [body]
    for instance in instances:
        assert_instance(instance)
    return body


def assert_error(
    response: httpx.Response, method: str, path: str, status: int, error_type: str
) -> None:
    """Assert an error status with a body in fal's error envelope."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    schema = documented_schema(method, path, status)
    assert schema is not None
    assert schema_errors(body, schema) == []
    assert body["error"]["type"] == error_type
    assert set(body["error"]) - FAL_ERROR_FIELDS <= EXTRA_ERROR_FIELDS
    assert null_fields(body["error"]) == []


@dataclass(frozen=True)
class Scenario:
    """A fleet of two 8-GPU nodes in us-west, ``plain`` outside sectors and ``fabric`` in
    sector_1, and the standard keys."""

    api: httpx.AsyncClient
    keys: Keys
    database: Database
    ssh_key: str
    node_tokens: dict[str, str]

    def body(self, instance_type: str = ONE_GPU, **extra: str) -> dict[str, str]:
        return {"instance_type": instance_type, "ssh_key": self.ssh_key, **extra}

    async def create(
        self,
        body: dict[str, str] | None = None,
        *,
        key: str | None = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        headers = Keys.header(key or self.keys.a)
        if idempotency_key is not None:
            headers["Idempotency-Key"] = idempotency_key
        return await self.api.post(COLLECTION, json=body or self.body(), headers=headers)

    async def create_id(self, body: dict[str, str] | None = None) -> str:
        response = await self.create(body)
        assert response.status_code == 201, response.text
        instance_id: str = response.json()["id"]
        return instance_id

    async def get(self, instance_id: str, *, key: str | None = None) -> httpx.Response:
        return await self.api.get(
            f"{COLLECTION}/{instance_id}", headers=Keys.header(key or self.keys.a)
        )

    async def list_page(self, **params: str | int) -> httpx.Response:
        return await self.api.get(COLLECTION, params=params, headers=Keys.header(self.keys.a))

    async def report(self, node_name: str, *observed: dict[str, Any]) -> None:
        """Send an agent report for the node at its current desired version."""
        headers = {"Authorization": f"Bearer {self.node_tokens[node_name]}"}
        desired = await self.api.get("/internal/v1/agent/desired", headers=headers)
        assert desired.status_code == 200, desired.text
        body = {"applied_version": desired.json()["version"], "instances": list(observed)}
        reported = await self.api.post("/internal/v1/agent/report", json=body, headers=headers)
        assert reported.status_code == 204, reported.text


@pytest.fixture
async def scenario(
    api: httpx.AsyncClient, keys: Keys, database: Database, ed25519_key: str
) -> Scenario:
    tokens = await add_nodes(
        database,
        node("plain", region=Region.US_WEST),
        node("fabric", region=Region.US_WEST, sector=Sector.SECTOR_1),
    )
    return Scenario(api, keys, database, ed25519_key, tokens)


# Schema facts


def facts_schemas() -> dict[str, dict[str, Any]]:
    schemas = {f"$defs/{name}": schema for name, schema in DEFS.items()}
    for path, item in FACTS["paths"].items():
        for method, operation in item.items():
            for status, schema in operation["responses"].items():
                if schema is not None:
                    schemas[f"{method} {path} {status}"] = schema
    return schemas


@pytest.mark.parametrize("schema", facts_schemas().values(), ids=facts_schemas().keys())
def test_facts_schema_is_valid(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema({"$defs": DEFS, **schema})


def test_facts_cover_every_operation() -> None:
    documented = {(method, path) for path, item in FACTS["paths"].items() for method in item}
    assert documented == set(OPERATIONS)


# Create


CREATE_BODIES = {
    "1x": {"instance_type": ONE_GPU},
    "8x": {"instance_type": EIGHT_GPUS},
    "8x-sector_1": {"instance_type": EIGHT_GPUS, "sector": "sector_1"},
}


@pytest.mark.parametrize("fields", CREATE_BODIES.values(), ids=CREATE_BODIES.keys())
def test_request_schema_accepts_create_body(fields: dict[str, str], ed25519_key: str) -> None:
    assert schema_errors({**fields, "ssh_key": ed25519_key}, REQUEST_SCHEMA) == []


@pytest.mark.parametrize("fields", CREATE_BODIES.values(), ids=CREATE_BODIES.keys())
async def test_create_matches_schema(scenario: Scenario, fields: dict[str, str]) -> None:
    response = await scenario.create({**fields, "ssh_key": scenario.ssh_key})

    body = assert_success(response, "post", COLLECTION)
    assert body["instance_type"] == fields["instance_type"]
    assert body["status"] == "pending"
    assert body.get("sector") == fields.get("sector")


async def test_create_without_sector_omits_it(scenario: Scenario) -> None:
    body = assert_success(await scenario.create(), "post", COLLECTION)

    assert "sector" not in body
    assert "ip" not in body
    assert "ssh_port" not in body
    assert "status_reason" not in body


async def test_create_in_sector_places_there(scenario: Scenario) -> None:
    response = await scenario.create(scenario.body(EIGHT_GPUS, sector="sector_1"))

    body = assert_success(response, "post", COLLECTION)
    assert body["sector"] == "sector_1"
    assert body["region"] == "us-west"


INVALID_BODIES = {
    "missing-ssh_key": {"instance_type": ONE_GPU},
    "missing-instance_type": {"ssh_key": "from-fixture"},
    "unknown-instance_type": {"instance_type": "gpu_2x_h100_sxm5", "ssh_key": "from-fixture"},
    "empty-ssh_key": {"instance_type": ONE_GPU, "ssh_key": ""},
    "unknown-sector": {"instance_type": EIGHT_GPUS, "ssh_key": "from-fixture", "sector": "x"},
}


@pytest.mark.parametrize("body", INVALID_BODIES.values(), ids=INVALID_BODIES.keys())
async def test_invalid_body_rejected_by_both(scenario: Scenario, body: dict[str, str]) -> None:
    if body.get("ssh_key") == "from-fixture":
        body = {**body, "ssh_key": scenario.ssh_key}

    assert schema_errors(body, REQUEST_SCHEMA) != []
    response = await scenario.create(body)
    assert_error(response, "post", COLLECTION, 400, "validation_error")


# List


async def test_list_empty_matches_schema(scenario: Scenario) -> None:
    body = assert_success(await scenario.list_page(), "get", COLLECTION)

    assert body == {"instances": [], "next_cursor": None, "has_more": False}


async def test_list_one_page_matches_schema(scenario: Scenario) -> None:
    created = [await scenario.create_id(), await scenario.create_id()]

    body = assert_success(await scenario.list_page(), "get", COLLECTION)
    assert [item["id"] for item in body["instances"]] == created[::-1]
    assert body["has_more"] is False
    assert body["next_cursor"] is None


async def test_list_pages_match_schema(scenario: Scenario) -> None:
    created = [await scenario.create_id() for _ in range(3)]

    first = assert_success(await scenario.list_page(limit=2), "get", COLLECTION)
    assert first["has_more"] is True
    assert isinstance(first["next_cursor"], str)
    assert len(first["instances"]) == 2

    second = assert_success(
        await scenario.list_page(limit=2, cursor=first["next_cursor"]), "get", COLLECTION
    )
    assert second["has_more"] is False
    assert second["next_cursor"] is None
    listed = [item["id"] for item in first["instances"] + second["instances"]]
    assert listed == created[::-1]


# Get and delete


async def test_get_pending_matches_schema(scenario: Scenario) -> None:
    instance_id = await scenario.create_id()

    body = assert_success(await scenario.get(instance_id), "get", ITEM)
    assert body["id"] == instance_id
    assert body["status"] == "pending"
    assert "ip" not in body


async def test_get_ready_matches_schema(scenario: Scenario) -> None:
    instance_id = await scenario.create_id()
    running = {"instance_id": instance_id, "state": "running", "ip": "127.0.0.1", "ssh_port": 22}
    await scenario.report("plain", running)

    body = assert_success(await scenario.get(instance_id), "get", ITEM)
    assert body["status"] == "ready"
    assert body["ip"] == "127.0.0.1"
    assert body["ssh_port"] == 22


async def test_get_stopped_matches_schema(scenario: Scenario) -> None:
    instance_id = await scenario.create_id()
    failed = {"instance_id": instance_id, "state": "failed", "message": "image missing"}
    await scenario.report("plain", failed)

    body = assert_success(await scenario.get(instance_id), "get", ITEM)
    assert body["status"] == "stopped"
    assert isinstance(body["status_reason"], str)
    assert "ip" not in body


async def test_list_mixed_statuses_omit_nulls(scenario: Scenario) -> None:
    ready_id = await scenario.create_id()
    stopped_id = await scenario.create_id()
    await scenario.create_id(scenario.body(EIGHT_GPUS, sector="sector_1"))
    await scenario.report(
        "plain",
        {"instance_id": ready_id, "state": "running", "ip": "127.0.0.1", "ssh_port": 22},
        {"instance_id": stopped_id, "state": "failed"},
    )

    body = assert_success(await scenario.list_page(), "get", COLLECTION)
    statuses = sorted(item["status"] for item in body["instances"])
    assert statuses == ["pending", "ready", "stopped"]


async def test_delete_returns_empty_204(scenario: Scenario) -> None:
    instance_id = await scenario.create_id()

    response = await scenario.api.delete(
        f"{COLLECTION}/{instance_id}", headers=Keys.header(scenario.keys.a)
    )
    assert_success(response, "delete", ITEM)


# Errors


async def _hold_idempotency_key(scenario: Scenario, key: str, body: dict[str, str]) -> None:
    """Store a live reservation of ``key`` for org-a, as a replica still running it would."""
    now = utcnow()
    async with scenario.database.write() as session:
        organization_id = await session.scalar(
            select(Organization.id).where(Organization.name == "org-a")
        )
        session.add(
            IdempotencyRecord(
                organization_id=organization_id,
                key=key,
                fingerprint=idempotency.fingerprint(body),
                state=idempotency.IN_FLIGHT,
                owner_token="held-by-another-replica",
                lease_expires_at=now + timedelta(minutes=5),
                created_at=now,
            )
        )


async def _in_flight(scenario: Scenario) -> httpx.Response:
    body = scenario.body()
    await _hold_idempotency_key(scenario, "held-key", body)
    return await scenario.create(body, idempotency_key="held-key")


async def _reused_key(scenario: Scenario) -> httpx.Response:
    first = await scenario.create(scenario.body(), idempotency_key="reused-key")
    assert first.status_code == 201, first.text
    changed = scenario.body(EIGHT_GPUS)
    return await scenario.create(changed, idempotency_key="reused-key")


async def _sector_full(scenario: Scenario) -> httpx.Response:
    first = await scenario.create(scenario.body(EIGHT_GPUS, sector="sector_1"))
    assert first.status_code == 201, first.text
    return await scenario.create(scenario.body(EIGHT_GPUS, sector="sector_1"))


async def _over_quota(scenario: Scenario) -> httpx.Response:
    key = await make_key(scenario.database, "org-quota", "quinn", gpu_quota=0)
    return await scenario.create(key=key)


async def _foreign_instance(scenario: Scenario) -> httpx.Response:
    response = await scenario.create(key=scenario.keys.b)
    assert response.status_code == 201, response.text
    return await scenario.get(response.json()["id"], key=scenario.keys.a)


async def _delete_unknown(scenario: Scenario) -> httpx.Response:
    return await scenario.api.delete(
        f"{COLLECTION}/{UNKNOWN_ID}", headers=Keys.header(scenario.keys.a)
    )


@dataclass(frozen=True)
class ErrorCase:
    method: str
    path: str
    status: int
    error_type: str
    send: Callable[[Scenario], Awaitable[httpx.Response]]


ERROR_CASES = {
    "create-invalid-ssh_key": ErrorCase(
        "post",
        COLLECTION,
        400,
        "validation_error",
        lambda s: s.create({"instance_type": ONE_GPU, "ssh_key": "ssh-ed25519 not-base64"}),
    ),
    "create-sector-on-1x": ErrorCase(
        "post",
        COLLECTION,
        400,
        "validation_error",
        lambda s: s.create(s.body(ONE_GPU, sector="sector_1")),
    ),
    "create-invalid-idempotency-key": ErrorCase(
        "post",
        COLLECTION,
        400,
        "validation_error",
        lambda s: s.create(idempotency_key="has space"),
    ),
    "list-limit-zero": ErrorCase(
        "get", COLLECTION, 400, "validation_error", lambda s: s.list_page(limit=0)
    ),
    "list-invalid-cursor": ErrorCase(
        "get", COLLECTION, 400, "validation_error", lambda s: s.list_page(cursor="Mg==")
    ),
    "create-over-quota": ErrorCase("post", COLLECTION, 403, "authorization_error", _over_quota),
    "get-unknown": ErrorCase("get", ITEM, 404, "not_found", lambda s: s.get(UNKNOWN_ID)),
    "get-other-organization": ErrorCase("get", ITEM, 404, "not_found", _foreign_instance),
    "delete-unknown": ErrorCase("delete", ITEM, 404, "not_found", _delete_unknown),
    "create-key-in-flight": ErrorCase("post", COLLECTION, 409, "validation_error", _in_flight),
    "create-key-reused": ErrorCase("post", COLLECTION, 422, "validation_error", _reused_key),
    "create-no-capacity": ErrorCase("post", COLLECTION, 503, "server_error", _sector_full),
    "create-sector-unavailable": ErrorCase(
        "post",
        COLLECTION,
        400,
        "validation_error",
        lambda s: s.create(s.body(EIGHT_GPUS, sector="sector_2")),
    ),
}


@pytest.mark.parametrize("case", ERROR_CASES.values(), ids=ERROR_CASES.keys())
async def test_error_matches_envelope(scenario: Scenario, case: ErrorCase) -> None:
    response = await case.send(scenario)

    assert_error(response, case.method, case.path, case.status, case.error_type)


CREDENTIALS: dict[str, tuple[Callable[[Keys], dict[str, str]], int]] = {
    "missing": (lambda keys: {}, 401),
    "unknown-key": (lambda keys: Keys.header("unknown:secret"), 401),
    "bearer-scheme": (lambda keys: {"Authorization": f"Bearer {keys.a}"}, 401),
    "api-scope-key": (lambda keys: Keys.header(keys.api_scope), 403),
    "no-compute-org": (lambda keys: Keys.header(keys.no_compute), 403),
}


@pytest.mark.parametrize("credentials", CREDENTIALS.values(), ids=CREDENTIALS.keys())
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[" ".join(op) for op in OPERATIONS])
async def test_auth_error_matches_envelope(
    scenario: Scenario,
    method: str,
    path: str,
    credentials: tuple[Callable[[Keys], dict[str, str]], int],
) -> None:
    make_headers, status = credentials
    url = path.replace("{id}", UNKNOWN_ID)
    body = scenario.body() if method == "post" else None

    response = await scenario.api.request(
        method.upper(), url, json=body, headers=make_headers(scenario.keys)
    )
    assert_error(response, method, path, status, "authorization_error")


async def test_rate_limited_matches_envelope(context: ServiceContext, keys: Keys) -> None:
    limited = ServiceContext(
        context.settings.model_copy(update={"rate_limit_requests": 1}),
        context.database,
        context.notifier,
    )
    transport = httpx.ASGITransport(app=create_app(limited))
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
        first = await client.get(COLLECTION, headers=Keys.header(keys.a))
        second = await client.get(COLLECTION, headers=Keys.header(keys.a))

    assert_success(first, "get", COLLECTION)
    assert_error(second, "get", COLLECTION, 429, "rate_limited")


# The served OpenAPI document


@pytest.fixture
async def served_openapi(api: httpx.AsyncClient) -> dict[str, Any]:
    response = await api.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def path_shape(path: str) -> str:
    """Return the path with parameter names erased: OpenAPI treats such paths as equal."""
    return re.sub(r"\{[^}]*\}", "{}", path)


def served_operation(document: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    matches = [
        item[method]
        for served_path, item in document["paths"].items()
        if path_shape(served_path) == path_shape(path) and method in item
    ]
    assert len(matches) == 1, f"{method.upper()} {path} is served {len(matches)} times"
    operation: dict[str, Any] = matches[0]
    return operation


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` and drop the null branch FastAPI adds to optional values."""
    if "$ref" in schema:
        target: Any = document
        for part in schema["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        return resolve(document, target)
    branches = [branch for branch in schema.get("anyOf", []) if branch.get("type") != "null"]
    if len(branches) == 1:
        return resolve(document, branches[0])
    return schema


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[" ".join(op) for op in OPERATIONS])
def test_openapi_serves_operation(served_openapi: dict[str, Any], method: str, path: str) -> None:
    operation = served_operation(served_openapi, method, path)

    success = str(FACTS["paths"][path][method]["success"])
    assert success in operation["responses"]


PARAMETERS = [
    pytest.param(method, path, parameter, id=f"{method} {path} {parameter['name']}")
    for method, path in OPERATIONS
    for parameter in FACTS["paths"][path][method]["parameters"]
    if parameter["in"] != "path"
] + [
    pytest.param(
        method,
        ITEM,
        FACTS["paths"][ITEM][method]["parameters"][0],
        id=f"{method} {ITEM} id",
    )
    for method in ("get", "delete")
]


@pytest.mark.parametrize(("method", "path", "expected"), PARAMETERS)
def test_openapi_parameter_matches(
    served_openapi: dict[str, Any], method: str, path: str, expected: dict[str, Any]
) -> None:
    operation = served_operation(served_openapi, method, path)
    served = {
        (parameter["name"], parameter["in"]): parameter
        for parameter in operation.get("parameters", [])
    }
    parameter = served.get((expected["name"], expected["in"]))

    assert parameter is not None, f"served parameters: {sorted(served)}"
    assert parameter.get("required", False) is expected["required"]
    schema = resolve(served_openapi, parameter["schema"])
    for keyword, value in expected["schema"].items():
        assert schema.get(keyword) == value, f"{keyword} of {expected['name']}"


def test_openapi_create_body_matches(served_openapi: dict[str, Any]) -> None:
    request_body = served_operation(served_openapi, "post", COLLECTION)["requestBody"]
    served = resolve(served_openapi, request_body["content"]["application/json"]["schema"])
    expected = DEFS["InstanceCreate"]

    assert request_body["required"] is True
    assert set(served["required"]) == set(expected["required"])
    assert set(served["properties"]) == set(expected["properties"])
    for name in expected["properties"]:
        field = resolve(served_openapi, served["properties"][name])
        fal_field = resolve({"$defs": DEFS}, expected["properties"][name])
        assert field.get("type") == fal_field["type"], name
        assert set(field.get("enum", [])) == set(fal_field.get("enum", [])), name


def served_error_schema_problems(document: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """List how a served error body schema departs from fal's error envelope."""
    envelope = resolve(document, schema)
    if "error" not in envelope.get("properties", {}):
        return [f"no 'error' object in {schema}"]
    detail = resolve(document, envelope["properties"]["error"])
    fal_detail = DEFS["Error"]["properties"]["error"]
    problems = []
    if "error" not in envelope.get("required", []):
        problems.append("'error' is optional")
    if not set(fal_detail["required"]) <= set(detail.get("required", [])):
        problems.append(f"error requires only {detail.get('required')}")
    served_types = resolve(document, detail["properties"]["type"]).get("enum", [])
    if not set(served_types) <= set(fal_detail["properties"]["type"]["enum"]):
        problems.append(f"error.type enum {served_types}")
    return problems


ENVELOPE_OPERATIONS = [
    pytest.param(
        method,
        path,
        id=f"{method} {path}",
    )
    for method, path in OPERATIONS
]


@pytest.mark.parametrize(("method", "path"), ENVELOPE_OPERATIONS)
def test_openapi_errors_use_envelope(
    served_openapi: dict[str, Any], method: str, path: str
) -> None:
    responses = served_operation(served_openapi, method, path)["responses"]
    problems = {
        status: served_error_schema_problems(
            served_openapi, response["content"]["application/json"]["schema"]
        )
        for status, response in responses.items()
        if int(status) >= 400
    }

    assert {status: found for status, found in problems.items() if found} == {}
