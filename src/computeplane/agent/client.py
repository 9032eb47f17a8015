"""The agent's HTTP client for the control plane's internal API."""

from __future__ import annotations

import httpx

from computeplane import __version__
from computeplane.schemas.agent import DesiredStateBody, ObservedReportBody

#: Extra seconds a long-poll request may take beyond the wait it asked for.
RESPONSE_GRACE_SECONDS = 10.0


class ControlPlaneError(Exception):
    """Raised when the control plane answers an agent request with an error status."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(f"control plane answered {status_code}: {message}")
        self.status_code = status_code


class ControlPlaneClient:
    """Calls ``/internal/v1/agent`` with the node's token."""

    def __init__(
        self,
        base_url: str,
        node_token: str,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers={
                "Authorization": f"Bearer {node_token}",
                "User-Agent": f"computeplane-agent/{__version__}",
            },
            transport=transport,
            timeout=httpx.Timeout(RESPONSE_GRACE_SECONDS),
        )

    async def desired_state(self, after: int, wait: float) -> DesiredStateBody:
        """Long-poll for the desired state; returns once its version differs from ``after``."""
        response = await self._http.get(
            "/internal/v1/agent/desired",
            params={"after": after, "wait": wait},
            timeout=wait + RESPONSE_GRACE_SECONDS,
        )
        _raise_for_status(response)
        return DesiredStateBody.model_validate_json(response.content)

    async def report(self, report: ObservedReportBody) -> None:
        response = await self._http.post(
            "/internal/v1/agent/report",
            content=report.model_dump_json(),
            headers={"Content-Type": "application/json"},
        )
        _raise_for_status(response)

    async def aclose(self) -> None:
        await self._http.aclose()


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        message = str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = response.text[:200]
    raise ControlPlaneError(response.status_code, message)
