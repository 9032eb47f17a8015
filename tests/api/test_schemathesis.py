"""Property-based runs of schemathesis against the ASGI app, with no socket in between.

Two schemas drive the runs: the OpenAPI document the app serves at ``/openapi.json``, and an
OpenAPI 3.1 document built here from fal's published schemas in
``tests/data/fal_compute_schema_facts.json``. Every request carries a valid admin key, and
every response must not be a 5xx and must match the schema the document gives its status.

The app runs in an event loop of its own (an anyio blocking portal), where its database
was opened, because the async database drivers bind their connections to one loop.
schemathesis generates and validates each case, and the request it serializes is sent to
that loop through ``httpx.ASGITransport``.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import requests
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from jsonschema import Draft202012Validator
from schemathesis import Case, CheckContext
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance

from computeplane.api.app import create_app
from computeplane.domain.catalog import Region, Sector
from computeplane.services.context import ServiceContext
from computeplane.services.nodes import add_node
from computeplane.services.pg_notifier import make_notifier
from computeplane.settings import Settings
from computeplane.store.database import Database
from computeplane.store.migrate import upgrade_to_head
from conftest import BASE_URL, KEYS_DIR, Keys, make_key, node

FACTS_PATH = Path(__file__).parents[1] / "data" / "fal_compute_schema_facts.json"
FACTS: dict[str, Any] = json.loads(FACTS_PATH.read_text())

COLLECTION = "/v1/compute/instances"
ITEM = "/v1/compute/instances/{id}"
ED25519_KEY = (KEYS_DIR / "ed25519.pub").read_text().strip()

# Random text is almost never a valid OpenSSH public key, and random ids never name an
# instance, so both documents get two examples for the examples phase. The create operation
# gets a body that the app accepts, and the id parameter gets EXISTING_INSTANCE, which
# ServedApp.send replaces with the id of an instance it creates for that case.
CREATE_EXAMPLE = {"instance_type": "gpu_1x_h100_sxm5", "ssh_key": ED25519_KEY}
EXISTING_INSTANCE = "existing-instance"

# One node in each placement group: no sector, and each of the three sectors.
FLEET_SECTORS: tuple[Sector | None, ...] = (
    None,
    Sector.SECTOR_1,
    Sector.SECTOR_2,
    Sector.SECTOR_3,
)
FLEET_REGION = Region.US_WEST

# The bound on generated cases, and a fixed seed, keep the runs short and reproducible.
RUN_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SCHEMATHESIS_CONFIG: dict[str, Any] = {
    "seed": 0,
    "generation": {"deterministic": True, "database": "none"},
}


@dataclass
class RunningApp:
    """The app's pieces that live in the portal's event loop."""

    database: Database
    context: ServiceContext
    client: httpx.AsyncClient
    admin_key: str


async def _start_app(settings: Settings) -> RunningApp:
    database = Database(settings.resolved_database_url, pool_size=20, max_overflow=40)
    await upgrade_to_head(database)
    for number, sector in enumerate(FLEET_SECTORS):
        await add_node(database, node(f"fleet-{number}", region=FLEET_REGION, sector=sector))
    admin_key = await make_key(database, "org-fuzz", "fuzzer")
    context = ServiceContext(settings, database, make_notifier(database))
    await context.notifier.start()
    transport = httpx.ASGITransport(app=create_app(context))
    client = httpx.AsyncClient(transport=transport, base_url=BASE_URL)
    return RunningApp(database, context, client, admin_key)


async def _stop_app(app: RunningApp) -> None:
    await app.client.aclose()
    await app.context.notifier.close()
    await app.database.dispose()


@dataclass
class ServedApp:
    """The app under test in its own event loop, with a fleet and an admin key.

    Every case meets the same state: the same key, and at least one whole free node in each
    placement group (see ``replace_capacity``). Instances that cases create stay in the
    database.
    """

    portal: BlockingPortal
    app: RunningApp
    replacement_numbers: Iterator[int] = field(default_factory=itertools.count)

    @property
    def headers(self) -> dict[str, str]:
        return Keys.header(self.app.admin_key)

    def get(self, path: str) -> httpx.Response:
        response: httpx.Response = self.portal.call(self.app.client.get, path)
        return response

    def send(self, case: Case) -> httpx.Response:
        """Send the request schemathesis serializes for ``case``, with the admin key.

        The key replaces any generated ``Authorization`` header and is added back where a
        case leaves the header out, so every request is authenticated.
        """
        if case.path_parameters and case.path_parameters.get("id") == EXISTING_INSTANCE:
            case.path_parameters["id"] = self.create_instance()
        arguments = case.as_transport_kwargs(base_url=BASE_URL)
        prepared = requests.Request(**arguments).prepare()
        prepared.headers.update(self.headers)
        body = prepared.body or b""
        assert isinstance(body, bytes | str), f"unexpected request body {body!r}"
        headers = [
            (name, value if isinstance(value, str) else value.decode("latin-1"))
            for name, value in prepared.headers.items()
        ]
        request = httpx.Request(
            str(prepared.method),
            str(prepared.url),
            headers=headers,
            content=body.encode() if isinstance(body, str) else body,
        )
        response: httpx.Response = self.portal.call(self.app.client.send, request)
        self.replace_capacity(response)
        return response

    def create_instance(self) -> str:
        """Create an instance through the API and return its id."""
        response: httpx.Response = self.portal.call(
            partial(self.app.client.post, COLLECTION, json=CREATE_EXAMPLE, headers=self.headers)
        )
        assert response.status_code == 201, response.text
        self.replace_capacity(response)
        instance_id: str = response.json()["id"]
        return instance_id

    def replace_capacity(self, response: httpx.Response) -> None:
        """Register a free 8-GPU node in the placement group where a create took GPUs.

        Each placement group then keeps at least one whole free node, so a valid create
        never meets an exhausted fleet and gets 503.
        """
        if response.status_code != 201:
            return
        instance = response.json()
        sector = instance.get("sector")
        spec = node(
            f"replacement-{next(self.replacement_numbers)}",
            region=Region(instance["region"]),
            sector=Sector(sector) if sector else None,
        )
        self.portal.call(add_node, self.app.database, spec)


@pytest.fixture
def served_app(settings: Settings) -> Iterator[ServedApp]:
    with start_blocking_portal() as portal:
        app = portal.call(_start_app, settings)
        try:
            yield ServedApp(portal, app)
        finally:
            portal.call(_stop_app, app)


# --- the app's own document ---------------------------------------------------------------


async def _fetch_served_document() -> dict[str, Any]:
    """Fetch ``/openapi.json`` from an app whose database is never opened.

    The document depends on the routes alone, so the module can build its schema at import
    time, as schemathesis needs. ``test_served_document_matches`` checks that the app under
    test serves the same document.
    """
    database = Database("sqlite+aiosqlite://")
    context = ServiceContext(
        Settings(database_url=database.url), database, make_notifier(database)
    )
    transport = httpx.ASGITransport(app=create_app(context))
    try:
        async with httpx.AsyncClient(transport=transport, base_url=BASE_URL) as client:
            response = await client.get("/openapi.json")
    finally:
        await database.dispose()
    response.raise_for_status()
    document: dict[str, Any] = response.json()
    return document


SERVED_DOCUMENT = anyio.run(_fetch_served_document)


def _with_examples(document: dict[str, Any]) -> dict[str, Any]:
    """Return a copy with the create body example and the existing-instance id example."""
    document = copy.deepcopy(document)
    create = document["paths"][COLLECTION]["post"]
    create["requestBody"]["content"]["application/json"]["example"] = CREATE_EXAMPLE
    for operation in document["paths"][ITEM].values():
        for parameter in operation["parameters"]:
            if parameter["in"] == "path" and parameter["name"] == "id":
                parameter["example"] = EXISTING_INSTANCE
    return document


served_schema = schemathesis.openapi.from_dict(
    _with_examples(SERVED_DOCUMENT), config=SchemathesisConfig.from_dict(SCHEMATHESIS_CONFIG)
)


def test_served_document_matches(served_app: ServedApp) -> None:
    response = served_app.get("/openapi.json")
    assert response.status_code == 200, response.text
    assert response.json() == SERVED_DOCUMENT


# The app's document lists every status each route returns, so an undocumented status fails
# here too.
SERVED_CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance]


@RUN_SETTINGS
@served_schema.parametrize()
def test_served_schema_holds(case: Case, served_app: ServedApp) -> None:
    response = served_app.send(case)
    case.validate_response(response, checks=SERVED_CHECKS)


# --- fal's published document ---------------------------------------------------------------


def _rewrite_refs(value: Any) -> Any:
    """Return ``value`` with ``#/$defs/`` references pointing into ``components/schemas``."""
    if isinstance(value, dict):
        return {
            key: (
                item.replace("#/$defs/", "#/components/schemas/")
                if key == "$ref" and isinstance(item, str)
                else _rewrite_refs(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_refs(item) for item in value]
    return value


def _fal_operation(facts: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "security": [{name: []} for name in facts["security"]],
        "parameters": copy.deepcopy(facts.get("parameters", [])),
        "responses": {},
    }
    for status, schema in facts["responses"].items():
        response: dict[str, Any] = {"description": f"HTTP {status}"}
        if schema is not None:
            response["content"] = {"application/json": {"schema": schema}}
        operation["responses"][status] = response
    if "requestBody" in facts:
        operation["requestBody"] = {
            "required": facts["requestBody"]["required"],
            "content": {"application/json": {"schema": facts["requestBody"]["schema"]}},
        }
    return operation


def fal_openapi_document() -> dict[str, Any]:
    """Build an OpenAPI 3.1 document from the facts file, with fal's ``/v1`` paths."""
    paths = {
        path: {method: _fal_operation(operation) for method, operation in operations.items()}
        for path, operations in FACTS["paths"].items()
    }
    document = {
        "openapi": "3.1.0",
        "info": {"title": "fal Compute Instances API", "version": "v1"},
        "paths": paths,
        "components": {
            "schemas": FACTS["$defs"],
            "securitySchemes": FACTS["securitySchemes"],
        },
    }
    return _with_examples(_rewrite_refs(document))


FAL_DOCUMENT = fal_openapi_document()
ERROR_VALIDATOR = Draft202012Validator({"$defs": FACTS["$defs"], "$ref": "#/$defs/Error"})

fal_schema = schemathesis.openapi.from_dict(
    FAL_DOCUMENT, config=SchemathesisConfig.from_dict(SCHEMATHESIS_CONFIG)
)


def undocumented_status_is_error_envelope(
    ctx: CheckContext, response: Response, case: Case
) -> None:
    """Fail unless a status that fal does not document carries fal's error envelope.

    fal documents only some statuses per operation, but computeplane also returns 400 on
    reads, 405 for methods a path does not serve, 408 and 413 for slow and large bodies,
    409 and 422 for Idempotency-Key conflicts and 503 when no node has room. A fal client
    handles those as errors as long as the body is fal's error envelope, so they pass here
    when it is. ``response_schema_conformance`` skips undocumented statuses, which is why
    this check exists.

    ``not_a_server_error`` still fails every 5xx, 503 included: ``replace_capacity`` keeps
    a free node in every placement group, so no request here may meet an exhausted fleet.
    """
    documented = FAL_DOCUMENT["paths"][case.operation.path][case.operation.method.lower()][
        "responses"
    ]
    if str(response.status_code) in documented:
        return
    assert 400 <= response.status_code < 600, (
        f"status {response.status_code} is neither documented by fal nor an error"
    )
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type == "application/json", f"error content type is {content_type!r}"
    errors = [error.message for error in ERROR_VALIDATOR.iter_errors(response.json())]
    assert errors == [], f"status {response.status_code} body is not fal's envelope: {errors}"


FAL_CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    undocumented_status_is_error_envelope,
]


@RUN_SETTINGS
@fal_schema.parametrize()
def test_fal_schema_holds(case: Case, served_app: ServedApp) -> None:
    response = served_app.send(case)
    case.validate_response(response, checks=FAL_CHECKS)
