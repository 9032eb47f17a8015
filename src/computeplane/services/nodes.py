"""Node inventory: registration, the fleet file, draining and removal."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from computeplane.domain.clock import utcnow
from computeplane.domain.errors import ConflictError, NotFound
from computeplane.domain.fleet import NodeSpec, validate_node_spec
from computeplane.domain.ids import new_token
from computeplane.domain.status import InstanceStatus, StatusReason
from computeplane.services import lifecycle
from computeplane.services.agents import hash_node_token
from computeplane.services.context import ServiceContext
from computeplane.store.database import Database
from computeplane.store.models import Instance, Node

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeSummary:
    name: str
    region: str
    sector: str | None
    gpu_count: int
    gpus_free: int
    state: str
    reachable: bool
    last_heartbeat_at: datetime | None
    instance_count: int


async def add_node(database: Database, spec: NodeSpec) -> str:
    """Register a node, or re-register a removed one, and return its new agent token.

    Raises ConflictError if an active or draining node already has the name.
    """
    validate_node_spec(spec)
    token = new_token()
    async with database.write() as session:
        node = await _node_by_name(session, spec.name, lock=True)
        if node is not None and node.state != "removed":
            raise ConflictError(f"Node '{spec.name}' already exists.", code="node_exists")
        if node is None:
            node = _new_node(spec, token)
            session.add(node)
        else:
            _apply_spec(node, spec)
            node.state = "active"
            node.token_sha256 = hash_node_token(token)
    logger.info(
        "node %s registered in %s (sector %s) with %d GPUs",
        spec.name,
        spec.region,
        spec.sector or "none",
        spec.gpu_count,
    )
    return token


async def sync_fleet(database: Database, specs: list[NodeSpec]) -> dict[str, str]:
    """Create or update the fleet file's nodes and return a fresh agent token for each.

    Nodes that are not in the file are left alone. Raises ConflictError for a change to a
    node that still has instances.
    """
    tokens = {spec.name: new_token() for spec in specs}
    async with database.write() as session:
        for spec in specs:
            node = await _node_by_name(session, spec.name, lock=True)
            if node is None:
                session.add(_new_node(spec, tokens[spec.name]))
                continue
            if _differs(node, spec) and await _unreleased_count(session, node.id):
                raise ConflictError(
                    f"Node '{spec.name}' changed in the fleet file but still has "
                    "instances; delete them first or restore its old definition."
                )
            _apply_spec(node, spec)
            node.state = "active" if node.state == "removed" else node.state
            node.token_sha256 = hash_node_token(tokens[spec.name])
    logger.info("fleet of %d nodes loaded", len(specs))
    return tokens


async def list_nodes(database: Database) -> list[NodeSummary]:
    async with database.read() as session:
        rows = await session.execute(
            select(Instance.node_id, func.count())
            .where(Instance.released_at.is_(None))
            .group_by(Instance.node_id)
        )
        counts = {node_id: int(count) for node_id, count in rows.all()}
        nodes = (
            await session.execute(select(Node).where(Node.state != "removed").order_by(Node.name))
        ).scalars()
        return [
            NodeSummary(
                name=node.name,
                region=node.region,
                sector=node.sector,
                gpu_count=node.gpu_count,
                gpus_free=node.gpus_free,
                state=node.state,
                reachable=node.reachable,
                last_heartbeat_at=node.last_heartbeat_at,
                instance_count=counts.get(node.id, 0),
            )
            for node in nodes
        ]


async def drain_node(database: Database, name: str) -> None:
    """Stop placing new instances on the node; running ones stay."""
    async with database.write() as session:
        node = await _existing_node(session, name)
        node.state = "draining"
    logger.info("node %s drained: no new instances will be placed on it", name)


async def undrain_node(database: Database, name: str) -> bool:
    """Place new instances on a drained node again; return whether it was draining."""
    async with database.write() as session:
        node = await _existing_node(session, name)
        was_draining = node.state == "draining"
        node.state = "active"
    if was_draining:
        logger.info("node %s undrained: new instances may be placed on it again", name)
    return was_draining


async def remove_node(context: ServiceContext, name: str, *, force: bool = False) -> None:
    """Remove the node; its agent then tears down every instance and exits.

    Without ``force``, raises ConflictError while the node has instances. With it, the
    node's instances stop with reason ``node_removed`` and their GPUs are released at once,
    because the node takes no part in placement any more. Its token stays valid for the
    desired-state call only, which tells the agent of the removal, until the node is added
    again with a new token.
    """
    async with context.database.write() as session:
        node = await _existing_node(session, name)
        held = await _unreleased_count(session, node.id)
        if held and not force:
            raise ConflictError(
                f"Node '{name}' has {held} instances; delete them, or remove it with "
                "--force to stop them.",
                code="node_busy",
            )
        await _stop_all(session, node)
        node.state = "removed"
        node.reachable = False
    logger.info("node %s removed", name)


async def _stop_all(session: AsyncSession, node: Node) -> None:
    instances = (
        (
            await session.execute(
                select(Instance)
                .where(Instance.node_id == node.id, Instance.released_at.is_(None))
                .with_for_update(of=Instance)
            )
        )
        .unique()
        .scalars()
        .all()
    )
    for instance in instances:
        await lifecycle.change_status(
            session,
            instance,
            InstanceStatus.STOPPED,
            StatusReason.NODE_REMOVED,
            actor="operator",
            message=f"node {node.name} was removed",
        )
        await lifecycle.release_gpus(session, instance, why="its node was removed")


def _new_node(spec: NodeSpec, token: str) -> Node:
    return Node(
        name=spec.name,
        region=spec.region.value,
        sector=spec.sector.value if spec.sector else None,
        gpu_model=spec.gpu_model,
        gpu_count=spec.gpu_count,
        gpus_free=spec.gpu_count,
        state="active",
        token_sha256=hash_node_token(token),
        desired_version=1,
        reachable=False,
        created_at=utcnow(),
    )


def _differs(node: Node, spec: NodeSpec) -> bool:
    sector = spec.sector.value if spec.sector else None
    return (node.region, node.sector, node.gpu_count, node.gpu_model) != (
        spec.region.value,
        sector,
        spec.gpu_count,
        spec.gpu_model,
    )


def _apply_spec(node: Node, spec: NodeSpec) -> None:
    """Copy the spec onto a node that has no allocated GPUs, or whose spec is unchanged."""
    if _differs(node, spec):
        node.region = spec.region.value
        node.sector = spec.sector.value if spec.sector else None
        node.gpu_model = spec.gpu_model
        node.gpu_count = spec.gpu_count
        node.gpus_free = spec.gpu_count


async def _unreleased_count(session: AsyncSession, node_id: int) -> int:
    count = await session.scalar(
        select(func.count())
        .select_from(Instance)
        .where(Instance.node_id == node_id, Instance.released_at.is_(None))
    )
    return int(count or 0)


async def _node_by_name(session: AsyncSession, name: str, *, lock: bool = False) -> Node | None:
    query = select(Node).where(Node.name == name)
    if lock:
        query = query.with_for_update()
    return (await session.execute(query)).scalar_one_or_none()


async def _existing_node(session: AsyncSession, name: str) -> Node:
    node = await _node_by_name(session, name, lock=True)
    if node is None or node.state == "removed":
        raise NotFound(f"No node named '{name}'.", code="node_not_found")
    return node
