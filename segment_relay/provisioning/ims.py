"""Adobe IMS OAuth server-to-server tokens (client credentials), cached and renewed before they expire.

There is no refresh token in this grant: a new token is requested with the same credentials
once the cached one is within ``refresh_margin_s`` of its ``expires_in`` (seconds, about 24 h).
A token request changes nothing on Adobe's side, so throttling, server errors and network
failures are retried with the platform calls' policy.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from .errors import ProvisioningError
from .retry import DEFAULT_TIMEOUT_S, RETRIED_STATUSES, RetrySettings

DEFAULT_IMS_URL = "https://ims-na1.adobelogin.com"
DEFAULT_SCOPES = ("openid", "AdobeID", "read_organizations", "additional_info.projectedProductContext", "session")


class ImsClient:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        client_id: str,
        client_secret: SecretStr,
        scopes: tuple[str, ...] | list[str] = DEFAULT_SCOPES,
        ims_url: str = DEFAULT_IMS_URL,
        secret_source: str = "the client secret",
        refresh_margin_s: float = 300.0,
        retry: RetrySettings | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        """``secret_source`` names where the secret came from (e.g. "$ADOBE_CLIENT_SECRET") so
        that a refusal can say what to fix without showing the secret."""
        self._session = session
        self.client_id = client_id
        self._client_secret = client_secret
        self.scopes = tuple(scopes)
        self.ims_url = ims_url
        self.token_url = ims_url.rstrip("/") + "/ims/token/v3"
        self.retry = retry or RetrySettings()
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._secret_source = secret_source
        self._refresh_margin_s = refresh_margin_s
        self._token: SecretStr | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.tokens_issued = 0

    def __repr__(self) -> str:
        return f"ImsClient(client_id={self.client_id!r}, token_url={self.token_url!r})"

    async def token(self) -> str:
        """A valid access token, from the cache while it has more than the margin left."""
        async with self._lock:
            if self._token is None or time.monotonic() >= self._expires_at - self._refresh_margin_s:
                await self._fetch()
            assert self._token is not None
            return self._token.get_secret_value()

    def invalidate(self) -> None:
        """Forget the cached token (the platform refused it): the next call fetches a new one."""
        self._token = None

    async def _fetch(self) -> None:
        status, body = await self._exchange()
        if status != 200 or not isinstance(body, dict) or "access_token" not in body:
            error = body.get("error") if isinstance(body, dict) else None
            description = body.get("error_description") if isinstance(body, dict) else None
            if error in ("invalid_client", "unauthorized_client") or status == 401:
                raise ProvisioningError(
                    f"Adobe IMS refused the client credentials ({error or status}: {description or 'no detail'}): "
                    f"check the client id {self.client_id!r} and {self._secret_source} "
                    "(Developer Console → project → OAuth Server-to-Server)"
                )
            if error == "invalid_scope":
                raise ProvisioningError(
                    f"Adobe IMS refused the scopes {','.join(self.scopes)} ({description or 'invalid_scope'}): "
                    "use the scopes the Developer Console lists for the credential"
                )
            raise ProvisioningError(f"Adobe IMS token request failed: {status} {error or ''} {description or ''}".strip())
        self._token = SecretStr(str(body["access_token"]))
        self._expires_at = time.monotonic() + float(body.get("expires_in", 86399))
        self.tokens_issued += 1

    async def _exchange(self) -> tuple[int, Any]:
        """POST the credentials; the status and the parsed JSON answer, after retries."""
        form = {
            "grant_type": "client_credentials",
            "client_id": self.client_id,
            "client_secret": self._client_secret.get_secret_value(),
            "scope": ",".join(self.scopes),
        }
        attempt = 0
        while True:
            attempt += 1
            last = attempt >= self.retry.attempts
            try:
                async with self._session.post(self.token_url, data=form, timeout=self._timeout) as response:
                    status = response.status
                    text = await response.text()
                    retry_after = response.headers.get("Retry-After")
                    content_type = response.content_type
            except (aiohttp.ClientError, TimeoutError) as exc:
                if last:
                    raise ProvisioningError(
                        f"cannot reach Adobe IMS at {self.token_url}: {type(exc).__name__} {exc}".strip()
                        + f"; check adobe.ims_url ({self.ims_url})") from None
                await self.retry.pause(attempt)
                continue
            if status in RETRIED_STATUSES and not last:
                await self.retry.pause(attempt, retry_after)
                continue
            try:
                return status, orjson.loads(text) if text else None
            except orjson.JSONDecodeError:
                if status in RETRIED_STATUSES:
                    raise ProvisioningError(
                        f"Adobe IMS at {self.token_url} kept failing ({status}, {attempt} tries): "
                        "try again later (status.adobe.com), or check what lies between (a proxy)") from None
                # An HTML error page, a proxy's login page, a URL that is not IMS at all.
                raise ProvisioningError(
                    f"Adobe IMS at {self.token_url} answered {status} with {content_type or 'a body'} that is not "
                    f"JSON: check adobe.ims_url ({self.ims_url}) in the destination file; Adobe's is "
                    f"{DEFAULT_IMS_URL}") from None
