"""The node agent: makes the node run exactly the instances the control plane wants.

Two loops share the agent's view of its instances. The watch loop long-polls the desired
state and reconciles against it: it starts what is missing and stops what is no longer
wanted. The report loop sends that view, with the desired version it reflects, after every
change and at least once per heartbeat interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import httpx

from computeplane.agent.client import ControlPlaneClient, ControlPlaneError
from computeplane.agent.runtime.base import Endpoint, InstanceSpec, Runtime
from computeplane.domain.agent import ObservedState
from computeplane.domain.errors import RuntimeFailure
from computeplane.schemas.agent import (
    DesiredStateBody,
    ObservedInstanceBody,
    ObservedReportBody,
)

logger = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0
STOP_RETRY_SECONDS = 5.0


@dataclass
class _Tracked:
    """The agent's view of one instance on its node."""

    spec: InstanceSpec
    state: ObservedState
    endpoint: Endpoint | None = None
    message: str | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class NodeAgent:
    """Runs the desired instances of one node through a ``Runtime``."""

    def __init__(
        self,
        name: str,
        client: ControlPlaneClient,
        runtime: Runtime,
        *,
        poll_seconds: float = 25.0,
        heartbeat_seconds: float = 5.0,
    ) -> None:
        self.name = name
        self._client = client
        self._runtime = runtime
        self._poll_seconds = poll_seconds
        self._heartbeat_seconds = heartbeat_seconds
        self._tracked: dict[str, _Tracked] = {}
        self._applied_version: int | None = None
        self._report_needed = asyncio.Event()
        self._cleaned_orphans = False
        self.node_removed = False

    async def run(self) -> None:
        """Run until cancelled, or until the control plane says the node was removed.

        On cancellation the instances keep their state on disk, so a new agent restores
        them. On removal every instance is stopped and deleted first, and ``node_removed``
        is set.
        """
        logger.info("agent for node %s started", self.name)
        try:
            async with asyncio.TaskGroup() as group:
                watch = group.create_task(self._watch())
                report = group.create_task(self._report_loop())
                await watch
                report.cancel()
        finally:
            await self._cancel_tasks()
            logger.info("agent for node %s stopped", self.name)

    async def _watch(self) -> None:
        version = 0
        backoff = _Backoff()
        while True:
            try:
                desired = await self._client.desired_state(version, self._poll_seconds)
                self._heartbeat_seconds = desired.heartbeat_interval_seconds
                if self.name != desired.node_name:
                    self.name = desired.node_name
                    logger.info("agent serves node %s", self.name)
                if desired.node_removed:
                    await self._tear_down_removed_node(desired)
                    return
                if desired.version != self._applied_version:
                    await self._reconcile(desired)
                version = desired.version
            except (httpx.HTTPError, ControlPlaneError) as error:
                delay = backoff.next()
                logger.warning(
                    "node %s: fetching desired state failed (%s); retrying in %.1f s",
                    self.name,
                    error,
                    delay,
                )
                await asyncio.sleep(delay)
            except Exception:
                delay = backoff.next()
                logger.exception(
                    "node %s: unexpected error in the watch loop; retrying in %.1f s",
                    self.name,
                    delay,
                )
                await asyncio.sleep(delay)
            else:
                backoff.reset()

    async def _reconcile(self, desired: DesiredStateBody) -> None:
        wanted = {
            item.instance_id: InstanceSpec(
                instance_id=item.instance_id,
                ssh_public_key=item.ssh_public_key,
                gpu_indices=tuple(item.gpu_indices),
                ssh_user=item.ssh_user,
            )
            for item in desired.instances
        }
        for instance_id, spec in wanted.items():
            if instance_id not in self._tracked:
                self._begin_start(spec)
        for instance_id, tracked in list(self._tracked.items()):
            if instance_id in wanted:
                continue
            if tracked.state == ObservedState.FAILED:
                del self._tracked[instance_id]
            elif tracked.state != ObservedState.STOPPING:
                self._begin_stop(instance_id, tracked)

        if not self._cleaned_orphans:
            await self._stop_orphans(set(wanted))

        self._applied_version = desired.version
        self._report_needed.set()

    async def _tear_down_removed_node(self, desired: DesiredStateBody) -> None:
        """Stop and delete every instance of a node the control plane no longer has."""
        logger.warning(
            "node %s was removed from the control plane; stopping all of its instances",
            self.name,
        )
        self._cleaned_orphans = False
        await self._reconcile(desired)
        while self._tracked:
            tasks = [tracked.task for tracked in self._tracked.values() if tracked.task]
            if not tasks:
                break
            await asyncio.gather(*tasks, return_exceptions=True)
        self.node_removed = True
        logger.warning("node %s: every instance is stopped; the agent exits", self.name)

    async def _stop_orphans(self, wanted: set[str]) -> None:
        """Stop instances left on disk by an earlier process that nobody wants any more."""
        try:
            on_disk = await self._runtime.list_instances()
        except Exception:
            logger.exception("node %s: listing the runtime's instances failed", self.name)
            return
        for instance_id in on_disk:
            if instance_id not in wanted and instance_id not in self._tracked:
                logger.info("node %s: removing leftover instance %s", self.name, instance_id)
                orphan = _Tracked(
                    spec=InstanceSpec(instance_id, "", ()), state=ObservedState.STOPPING
                )
                self._tracked[instance_id] = orphan
                self._begin_stop(instance_id, orphan)
        self._cleaned_orphans = True

    def _begin_start(self, spec: InstanceSpec) -> None:
        tracked = _Tracked(spec=spec, state=ObservedState.STARTING)
        self._tracked[spec.instance_id] = tracked
        tracked.task = asyncio.create_task(self._start(tracked))

    async def _start(self, tracked: _Tracked) -> None:
        instance_id = tracked.spec.instance_id
        logger.info("node %s: starting instance %s", self.name, instance_id)
        try:
            tracked.endpoint = await self._runtime.start(tracked.spec)
        except RuntimeFailure as error:
            await self._fail(tracked, error.message)
        except Exception as error:
            logger.exception("node %s: starting instance %s crashed", self.name, instance_id)
            await self._fail(tracked, f"the runtime crashed while starting: {error}")
        else:
            tracked.state = ObservedState.RUNNING
            logger.info(
                "node %s: instance %s running at %s:%d",
                self.name,
                instance_id,
                tracked.endpoint.ip,
                tracked.endpoint.port,
            )
        self._report_needed.set()

    async def _fail(self, tracked: _Tracked, message: str) -> None:
        instance_id = tracked.spec.instance_id
        logger.warning("node %s: instance %s failed to start: %s", self.name, instance_id, message)
        # A failure is final only once nothing of the attempt is left on the node.
        with contextlib.suppress(Exception):
            await self._runtime.stop(instance_id)
        tracked.state = ObservedState.FAILED
        tracked.message = message

    def _begin_stop(self, instance_id: str, tracked: _Tracked) -> None:
        starting = tracked.task
        tracked.state = ObservedState.STOPPING
        tracked.task = asyncio.create_task(self._stop(instance_id, starting))

    async def _stop(self, instance_id: str, starting: asyncio.Task[None] | None) -> None:
        if starting is not None and not starting.done():
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)

        while True:
            try:
                await self._runtime.stop(instance_id)
                break
            except Exception:
                logger.exception(
                    "node %s: stopping instance %s failed; retrying in %g s",
                    self.name,
                    instance_id,
                    STOP_RETRY_SECONDS,
                )
                await asyncio.sleep(STOP_RETRY_SECONDS)

        logger.info("node %s: instance %s stopped and removed", self.name, instance_id)
        self._tracked.pop(instance_id, None)
        self._report_needed.set()

    async def _report_loop(self) -> None:
        backoff = _Backoff()
        while True:
            # asyncio.timeout, unlike wait_for on Python 3.11, never swallows a cancellation
            # that arrives together with the event.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat_seconds):
                    await self._report_needed.wait()
            if self._applied_version is None:
                continue
            self._report_needed.clear()
            try:
                await self._client.report(self._snapshot(self._applied_version))
            except (httpx.HTTPError, ControlPlaneError) as error:
                delay = backoff.next()
                logger.warning(
                    "node %s: report failed (%s); retrying in %.1f s", self.name, error, delay
                )
                self._report_needed.set()
                await asyncio.sleep(delay)
                continue
            except Exception:
                logger.exception("node %s: unexpected error in the report loop", self.name)
                self._report_needed.set()
                await asyncio.sleep(backoff.next())
                continue
            backoff.reset()

    def _snapshot(self, applied_version: int) -> ObservedReportBody:
        return ObservedReportBody(
            applied_version=applied_version,
            instances=[
                ObservedInstanceBody(
                    instance_id=instance_id,
                    state=tracked.state,
                    ip=tracked.endpoint.ip if tracked.endpoint else None,
                    ssh_port=tracked.endpoint.port if tracked.endpoint else None,
                    message=tracked.message,
                )
                for instance_id, tracked in self._tracked.items()
            ],
        )

    async def _cancel_tasks(self) -> None:
        tasks = [tracked.task for tracked in self._tracked.values() if tracked.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Backoff:
    """Exponential delays from 0.2 s up to ``MAX_BACKOFF_SECONDS``."""

    def __init__(self) -> None:
        self._delay = 0.1

    def next(self) -> float:
        self._delay = min(self._delay * 2, MAX_BACKOFF_SECONDS)
        return self._delay

    def reset(self) -> None:
        self._delay = 0.1
