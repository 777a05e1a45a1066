"""Everything one provisioning command talks to, opened and closed together."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp

from .destination import Destination
from .flow_service import FlowService
from .http import PlatformHttp
from .ims import ImsClient
from .provisioner import Provisioner, Step
from .retry import DEFAULT_TIMEOUT_S, RetrySettings
from .segmentation import Segmentation


@contextlib.asynccontextmanager
async def provisioner_for(
    destination: Destination,
    *,
    on_step: Callable[[Step], None] | None = None,
    retry: RetrySettings | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> AsyncIterator[Provisioner]:
    """``timeout_s``: one call to Adobe, from sending it to the end of its answer."""
    spec = destination.spec
    async with aiohttp.ClientSession(raise_for_status=False) as session:
        ims = ImsClient(
            session, client_id=destination.client_id, client_secret=destination.secret(spec.adobe.client_secret_env),
            scopes=spec.adobe.scopes, ims_url=spec.adobe.ims_url, secret_source=f"${spec.adobe.client_secret_env}",
            retry=retry, timeout_s=timeout_s,
        )
        http = PlatformHttp(session, ims, org_id=spec.adobe.org_id, sandbox=spec.sandbox,
                            platform_url=spec.adobe.platform_url, retry=retry, timeout_s=timeout_s)
        yield Provisioner(destination, FlowService(http), Segmentation(http), on_step=on_step)
