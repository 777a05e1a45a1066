"""Calls to Adobe Experience Platform APIs: the headers every call needs, retries with backoff on
throttling and server errors, and Adobe's error bodies turned into one line with the request id.

A call that may be sent again (a read, a delete) is repeated here after a timeout, a dropped
connection or a server error. A create or a patch is not: Adobe may have done it although its
answer never came, so the caller looks at what is there before deciding (``FlowService``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import aiohttp
import orjson

from .errors import AdobeApiError, ProvisioningError, UncertainOutcome
from .ims import ImsClient
from .retry import DEFAULT_TIMEOUT_S, RETRIED_STATUSES, RetrySettings

DEFAULT_PLATFORM_URL = "https://platform.adobe.io"
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})  # the same call twice does no more

# What a 403 means and what to do about it, by cause. The gateway answers with a code; Flow
# Service and Segmentation only in words.
_PERMISSION_HINT = (
    "add the API credential to a role with the permissions this needs (View/Manage/Activate Destinations, "
    "View Profiles, View Segments) in Adobe Experience Platform → Permissions → Roles → API credentials"
)
_GATEWAY_403_HINTS = {
    "403025": "the credential is not valid for this organization: check adobe.org_id, and that the credential's "
              "project has an Adobe Experience Platform product profile (Developer Console → project → "
              "OAuth Server-to-Server → Organization ID, Product profiles)",
    "403000": "the call carried no API key (x-api-key, the client id): a bug in segment-relay, please report it",
    "403003": "the API key (the client id) is not the one the token was issued to: check adobe.client_id",
    "403010": "the call carried no token: a bug in segment-relay, please report it",
}
_SANDBOX_HINT = ("check 'sandbox' in the destination file (Adobe Experience Platform → Sandboxes lists their "
                 "names) and that the credential's role includes that sandbox (Permissions → Roles → Sandboxes)")


def _forbidden_hint(code: str | None, text: str) -> str:
    """What to do about a 403: a wrong organization or product profile, an unknown sandbox, or a
    missing permission, told apart by the gateway's code or Adobe's words."""
    if code in _GATEWAY_403_HINTS:
        return _GATEWAY_403_HINTS[code]
    if "sandbox" in text.lower() and "permission" not in text.lower():
        return _SANDBOX_HINT
    return _PERMISSION_HINT


@dataclass(frozen=True)
class Response:
    status: int
    body: Any  # parsed JSON, or None for an empty body
    headers: dict[str, str]


class PlatformHttp:
    """One sandbox of one organization, as one API credential sees it."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        ims: ImsClient,
        *,
        org_id: str,
        sandbox: str,
        platform_url: str = DEFAULT_PLATFORM_URL,
        retry: RetrySettings | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._session = session
        self._ims = ims
        self.org_id = org_id
        self.sandbox = sandbox
        self.platform_url = platform_url.rstrip("/")
        self.retry = retry or RetrySettings()
        self.timeout_s = timeout_s  # one call, from sending to the whole answer
        self.deletion_wait_s = max(120.0, timeout_s)  # how long a dataflow marked for deletion may take to go
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.retries = 0  # how many calls were repeated (throttling, server errors, an expired token)

    async def request(
        self,
        method: str,
        url: str,
        *,
        json: Any = None,
        params: list[tuple[str, str]] | dict[str, str] | None = None,
        headers: dict[str, str] | None = None,
        replayable: bool | None = None,
    ) -> Response:
        """``url`` is absolute or a path under the platform URL. A 2xx comes back; anything
        else raises AdobeApiError. 429 is always retried (honouring Retry-After): Adobe did
        nothing. A timeout, a dropped connection and a 5xx are retried only when the call is
        ``replayable`` (default: by its method); otherwise they raise at once, UncertainOutcome
        or AdobeApiError, for the caller to look before it sends the call again."""
        if replayable is None:
            replayable = method in REPLAYABLE_METHODS
        full_url = url if url.startswith(("http://", "https://")) else self.platform_url + url
        attempt = 0
        refreshed_token = False
        while True:
            attempt += 1
            call_headers = {
                "Authorization": f"Bearer {await self._ims.token()}",
                "x-api-key": self._ims.client_id,
                "x-gw-ims-org-id": self.org_id,
                "x-sandbox-name": self.sandbox,
                "Accept": "application/json",
                **(headers or {}),
            }
            if json is not None:
                call_headers["Content-Type"] = "application/json"
            try:
                async with self._session.request(method, full_url, json=json, params=params, headers=call_headers,
                                                 timeout=self._timeout) as raw:
                    status = raw.status
                    text = await raw.text()
                    response_headers = {k.lower(): v for k, v in raw.headers.items()}
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure = _network_failure(exc, self.timeout_s)
                if not replayable:
                    raise UncertainOutcome(
                        f"{method} {_path(full_url)}: no answer from Adobe ({failure}); it may have been done: run "
                        "the command again (it looks at what is there before it repeats a write)",
                        method=method, path=_path(full_url)) from None
                if attempt >= self.retry.attempts:
                    raise ProvisioningError(f"{method} {_path(full_url)}: cannot reach Adobe: {failure}") from None
                await self.backoff(attempt, None)
                continue
            body = _parse(text)
            if 200 <= status < 300:
                return Response(status, body, response_headers)
            if status == 401 and not refreshed_token:
                self._ims.invalidate()  # expired or revoked early: one new token, then give up
                refreshed_token = True
                self.retries += 1
                continue
            retriable = status == 429 or (status in RETRIED_STATUSES and replayable)
            if retriable and attempt < self.retry.attempts:
                await self.backoff(attempt, response_headers.get("retry-after"))
                continue
            raise error_from(method, full_url, status, body, response_headers)

    async def backoff(self, attempt: int, retry_after: str | None) -> None:
        self.retries += 1
        await self.retry.pause(attempt, retry_after)

    async def pages(self, path: str, *, params: list[tuple[str, str]] | None = None, items_key: str = "items") -> list[Any]:
        """Every item of a list, following ``_links.next.href`` until there is none. A next link
        may carry the whole query or only a continuation token: the filters it leaves out are
        sent again, or page 2 on would list everything."""
        found: list[Any] = []
        url: str | None = self.platform_url + path
        query: list[tuple[str, str]] | None = params
        seen: set[str] = set()
        while url is not None:
            response = await self.request("GET", url, params=query)
            body = response.body or {}
            found.extend(body.get(items_key) or [])
            href = ((body.get("_links") or {}).get("next") or {}).get("href")
            if not href or href in seen:  # a server repeating a page must not loop us forever
                break
            seen.add(href)
            url = _with_params(self._resolve(path, href), params or [])
            query = None
        return found

    def _resolve(self, path: str, href: str) -> str:
        """Next links are absolute, absolute paths, or relative to the service's base path."""
        if href.startswith(("http://", "https://")):
            return href
        service = path.rsplit("/", 1)[0]  # e.g. /data/foundation/flowservice
        if href.startswith(service) or not href.startswith("/"):
            return urljoin(self.platform_url + path, href)
        return self.platform_url + service + href


def _with_params(url: str, params: list[tuple[str, str]]) -> str:
    """``url`` with each of ``params`` whose name its query lacks added."""
    parts = urlsplit(url)
    present = parse_qsl(parts.query, keep_blank_values=True)
    names = {name for name, _ in present}
    missing = [(name, value) for name, value in params if name not in names]
    if not missing:
        return url
    return urlunsplit(parts._replace(query=urlencode([*present, *missing])))


def _parse(text: str) -> Any:
    if not text:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"message": text[:300]}


def _path(url: str) -> str:
    return urlsplit(url).path


def _segmentation_messages(body: dict[str, Any]) -> str | None:
    """Segmentation's {"errors": {"403": [{"code", "message"}]}} in words."""
    errors = body.get("errors")
    if not isinstance(errors, dict):
        return None
    messages = [str(item.get("message")) for items in errors.values() if isinstance(items, list)
                for item in items if isinstance(item, dict) and item.get("message")]
    return "; ".join(messages) or None


def _network_failure(exc: BaseException, timeout_s: float) -> str:
    """A network error in words (aiohttp's timeouts have empty messages)."""
    if isinstance(exc, TimeoutError):
        return f"no complete answer within {timeout_s:g} s"
    return f"{type(exc).__name__} {exc}".strip()


def error_from(method: str, url: str, status: int, body: Any, headers: dict[str, str]) -> AdobeApiError:
    """One line out of Adobe's several error shapes: the gateway's {error_code, message}, Flow
    Service's RFC-7807-like {title, status, report{detailed-message, request-id}, errorMessage,
    errorDetails}, older {errorMessage, errorDetails} and Segmentation's {title, errors{status:
    [{code, message}]}, requestId}."""
    body = body if isinstance(body, dict) else {}
    report = body.get("report") if isinstance(body.get("report"), dict) else {}
    code = body.get("error_code") or body.get("code") or body.get("type")
    summary = body.get("title") or body.get("message") or body.get("errorMessage") or body.get("error")
    detail = (report.get("detailed-message") or body.get("errorDetails") or body.get("detail")
              or body.get("errorMessage") or _segmentation_messages(body))  # the words, when "title" took the summary
    if isinstance(detail, dict | list):
        detail = str(detail)
    request_id = (report.get("request-id") or headers.get("x-request-id") or body.get("request-id")
                  or body.get("requestId"))
    parts = [f"{method} {_path(url)}: {status}"]
    if summary:
        parts.append(f" {summary}")
    if detail and detail != summary:
        parts.append(f": {detail}")
    if status == 403:
        parts.append(f"; {_forbidden_hint(str(code) if code else None, f'{summary} {detail}')}")
    if status == 412:
        parts.append("; the entity changed since it was read (etag)")
    if request_id:
        parts.append(f" (request id {request_id})")
    return AdobeApiError("".join(parts), status=status, request_id=request_id, code=str(code) if code else None)
