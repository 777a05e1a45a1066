"""``FakePlatform``: Adobe IMS + Flow Service + Segmentation on one local HTTP server.

::

    async with FakePlatform(exports=ExportSettings(records=500)) as fake:
        fake.url                 # http://127.0.0.1:PORT  (one base URL for IMS and Platform)
        fake.ims_token_url       # {url}/ims/token/v3
        fake.flow_service_url    # {url}/data/foundation/flowservice
        fake.segmentation_url    # {url}/data/core/ups
        fake.credentials         # client_id, client_secret, org_id, scopes for the client's config

Adobe serves IMS (``ims-na1.adobelogin.com``) and Platform (``platform.adobe.io``) from two hosts;
the fake serves both from ``url``, so a client configured with two base URLs gets ``url`` twice.
It binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from .app import FLOW_SERVICE_PATH, IMS_TOKEN_PATH, SEGMENTATION_PATH, build_app
from .catalog import DEFAULT_AUDIENCES, DEFAULT_SCOPES, Audience
from .control import PERMISSIONS, Fault, Faults, Latency, RecordedRequest
from .ims import Ims
from .simulator import ExportSettings, ExportSimulator, Simulation
from .state import KINDS, Clock, FlowService, Segmentation

__all__ = ["FakePlatform", "Credentials", "DEFAULT_CLIENT_ID", "DEFAULT_CLIENT_SECRET", "DEFAULT_ORG_ID"]

DEFAULT_CLIENT_ID = "segment-relay-fake-client"
# Not a secret: the documented default of a local fake. Never printed or logged all the same.
DEFAULT_CLIENT_SECRET = "fake-client-secret"
DEFAULT_ORG_ID = "0F1E2D3C4B5A69788796A5B4@AdobeOrg"


@dataclass(frozen=True)
class Credentials:
    client_id: str
    client_secret: str
    org_id: str
    scopes: tuple[str, ...]

    @property
    def scope(self) -> str:
        """The scope form field as Adobe's Developer Console lists it (comma-separated)."""
        return ",".join(self.scopes)

    def __repr__(self) -> str:
        return f"Credentials(client_id={self.client_id!r}, client_secret=<redacted>, org_id={self.org_id!r})"


class FakePlatform:
    """The fake Adobe side; see the module docstring and ``segment_relay.testing.platform``."""

    def __init__(
        self,
        *,
        client_id: str = DEFAULT_CLIENT_ID,
        client_secret: str = DEFAULT_CLIENT_SECRET,
        org_id: str = DEFAULT_ORG_ID,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        token_ttl_s: int = 86399,
        audiences: Iterable[Audience] | None = None,
        sandboxes: Iterable[str] | None = None,
        exports: ExportSettings | None = None,
        kinesis_endpoint: str | None = None,
        patch_status: Literal[200, 202] = 200,
        delete_status: Literal[202, 204] = 202,
        flow_deletion_s: float = 0.2,
        eventhubs_sas_auth: bool = False,
        throttle_rate: float = 0.0,
        seed: int | None = None,
        port: int = 0,
    ) -> None:
        """``delete_status`` 202: a deleted dataflow is only marked for deletion and goes
        ``flow_deletion_s`` later (on the fake's clock), as in Adobe; 204: at once.
        ``eventhubs_sas_auth``: offer the hub-scoped SAS auth spec, whose name Adobe does not
        document (the fake's guess). ``throttle_rate``: that share of platform calls answers 429
        on its own (``seed`` makes the choice repeatable), as a busy Adobe does."""
        self.clock = Clock()
        self.ims = Ims(self.clock, client_id=client_id, client_secret=client_secret, org_id=org_id,
                       scopes=tuple(scopes), ttl_s=token_ttl_s)
        self._client_secret = client_secret
        self.org_id = org_id
        self.sandbox_names: frozenset[str] | None = frozenset(sandboxes) if sandboxes is not None else None
        self.segmentation: Segmentation
        self.flow_service = FlowService(self.clock, org_id, lambda sandbox: self.segmentation.visible(sandbox),
                                        eventhubs_sas_auth=eventhubs_sas_auth)
        self.flow_service.patch_status = patch_status
        self.flow_service.delete_status = delete_status
        self.flow_service.flow_deletion_s = flow_deletion_s
        self.segmentation = Segmentation(org_id, self.flow_service)
        self.segmentation.add(DEFAULT_AUDIENCES if audiences is None else audiences)
        self.simulator = ExportSimulator(self.flow_service, self.segmentation.visible, self.clock, exports,
                                         kinesis_endpoint)
        self.flow_service.on_change = self.simulator.flow_changed
        self.flow_service.window_stats = self.simulator.window_stats
        self.faults = Faults(throttle_rate=throttle_rate, random=random.Random(seed))
        self.denied: set[str] = set()
        self.requests: list[RecordedRequest] = []
        self._port = port
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> FakePlatform:
        self._runner = web.AppRunner(build_app(self), access_log=None)  # no access log: nothing to leak
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self._port)
        await self._site.start()
        self._port = int(self._runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        await self.simulator.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakePlatform:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- addresses ---------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """One base URL for IMS and Platform (Adobe: ims-na1.adobelogin.com and platform.adobe.io)."""
        return f"http://127.0.0.1:{self._port}"

    @property
    def ims_url(self) -> str:
        return self.url

    @property
    def platform_url(self) -> str:
        return self.url

    @property
    def ims_token_url(self) -> str:
        return self.url + IMS_TOKEN_PATH

    @property
    def flow_service_url(self) -> str:
        return self.url + FLOW_SERVICE_PATH

    @property
    def segmentation_url(self) -> str:
        return self.url + SEGMENTATION_PATH

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.ims.client_id, self._client_secret, self.org_id, self.ims.scopes)

    # --- tokens and time ---------------------------------------------------------------------
    def issue_token(self) -> str:
        """A valid token without the IMS round trip (for tests of other endpoints)."""
        return self.ims.issue()[0]

    def headers(self, sandbox: str | None = "prod", token: str | None = None) -> dict[str, str]:
        """Every header a Platform call needs (sandbox None leaves x-sandbox-name out)."""
        headers = {"Authorization": f"Bearer {token or self.issue_token()}", "x-api-key": self.ims.client_id,
                   "x-gw-ims-org-id": self.org_id}
        if sandbox is not None:
            headers["x-sandbox-name"] = sandbox
        return headers

    @property
    def token_ttl_s(self) -> int:
        return self.ims.ttl_s

    @token_ttl_s.setter
    def token_ttl_s(self, seconds: int) -> None:
        self.ims.ttl_s = seconds

    @property
    def tokens_issued(self) -> int:
        return self.ims.issued

    def expire_tokens(self) -> None:
        """Every token issued so far stops working (the next Platform call answers 401013)."""
        self.ims.expire_all()

    def advance_clock(self, seconds: float) -> None:
        """Move the fake's time forward: tokens expire, hourly runs roll over. No sleeping."""
        self.clock.advance(seconds)

    # --- permissions -------------------------------------------------------------------------
    def deny(self, *permissions: str) -> None:
        """Calls needing any of these AEP permissions answer 403 naming it (e.g. "Manage Destinations")."""
        unknown = [p for p in permissions if p not in PERMISSIONS]
        if unknown:
            raise ValueError(f"unknown permission(s) {unknown}; known: {PERMISSIONS}")
        self.denied.update(permissions)

    def allow(self, *permissions: str) -> None:
        """Undo ``deny`` (no arguments: allow everything again)."""
        if permissions:
            self.denied.difference_update(permissions)
        else:
            self.denied.clear()

    # --- faults ------------------------------------------------------------------------------
    def inject(self, status: int, times: int = 1, *, method: str | None = None, path: str | None = None,
               retry_after: float | None = 1) -> Fault:
        """The next ``times`` requests matching ``method`` and ``path`` (a regex searched in the URL
        path; None: every route, IMS included) answer ``status`` in the route's error shape.
        429 and 503 carry ``Retry-After: retry_after`` (whole seconds; None leaves it out)."""
        if not 400 <= status <= 599:
            raise ValueError("inject an HTTP error status (4xx or 5xx)")
        fault = Fault(status, times, method, path, retry_after)
        self.faults.faults.append(fault)
        return fault

    def add_latency(self, seconds: float, *, method: str | None = None, path: str | None = None,
                    times: int | None = None, answer_only: bool = False) -> Latency:
        """Delay the next ``times`` matching requests (None: all) by ``seconds``; with
        ``answer_only``, carry them out first and delay only the answer."""
        latency = Latency(seconds, method, path, times, answer_only)
        self.faults.latencies.append(latency)
        return latency

    def clear_faults(self) -> None:
        self.faults.clear()

    # --- inspection --------------------------------------------------------------------------
    def requests_to(self, method: str | None = None, path: str | None = None) -> list[RecordedRequest]:
        """Recorded requests whose method equals ``method`` and whose path matches regex ``path``."""
        pattern = re.compile(path) if path else None
        return [r for r in self.requests if (method is None or r.method == method.upper())
                and (pattern is None or pattern.search(r.path))]

    def clear_requests(self) -> None:
        self.requests.clear()

    def entities(self, kind: str, sandbox: str = "prod") -> list[dict[str, Any]]:
        """What a GET would show of every entity of ``kind`` (connections, sourceConnections,
        targetConnections, flows) in ``sandbox``, most recently changed first."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}")
        return self.flow_service.list_entities(sandbox, kind, [], None)

    def add_audiences(self, audiences: Iterable[Audience], sandbox: str | None = None) -> None:
        """More audiences: in every sandbox, or only in ``sandbox``."""
        self.segmentation.add(audiences, sandbox)

    # --- exports -----------------------------------------------------------------------------
    @property
    def exports(self) -> ExportSettings | None:
        return self.simulator.settings

    @exports.setter
    def exports(self, settings: ExportSettings | None) -> None:
        """Change the export settings (applies to simulations that start afterwards)."""
        self.simulator.settings = settings

    @property
    def kinesis_endpoint(self) -> str | None:
        return self.simulator.kinesis_endpoint

    @kinesis_endpoint.setter
    def kinesis_endpoint(self, endpoint: str | None) -> None:
        self.simulator.kinesis_endpoint = endpoint

    @property
    def simulations(self) -> Mapping[str, Simulation]:
        """flow id -> its Simulation (``truth``, ``records``, ``sent``, ``state``, ``await wait()``)."""
        return self.simulator.simulations

    async def simulation(self, flow_id: str, timeout_s: float = 10.0) -> Simulation:
        """The flow's simulation once it exists (it does as soon as the flow is enabled and mapped)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while flow_id not in self.simulator.simulations:
            if loop.time() > deadline:
                raise TimeoutError(f"no export simulation for flow {flow_id} after {timeout_s:g} s: is it enabled, "
                                   "mapped to an audience, and was the fake given ExportSettings?")
            await asyncio.sleep(0.02)
        return self.simulator.simulations[flow_id]

    def __repr__(self) -> str:
        return f"FakePlatform(url={self.url!r}, client_id={self.ims.client_id!r}, org_id={self.org_id!r})"
