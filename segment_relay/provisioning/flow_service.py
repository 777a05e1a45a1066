"""Flow Service API: connection specs, connections, source and target connections, dataflows, runs.

Kinds of entity share one shape of call, so one client covers them: ``kind`` is the path
segment ("connections", "sourceConnections", "targetConnections", "flows").
"""

from __future__ import annotations

import time
from typing import Any

from .errors import AdobeApiError, ProvisioningError, UncertainOutcome
from .http import PlatformHttp

BASE_PATH = "/data/foundation/flowservice"

PROFILE_SOURCE_SPEC = "8a9c3494-9708-43d7-ae3f-cda01e5030e1"  # Profile Service (the source of every export)
KINESIS_SPEC = "86043421-563b-46ec-8e6c-e23184711bf6"
EVENT_HUBS_SPEC = "bf9f5905-92b7-48bf-bf20-455bc6b60a4e"
PROFILE_DESTINATION_FLOW_SPEC = "71471eba-b620-49e4-90fd-23f1fa0174d8"

KINDS = ("connections", "sourceConnections", "targetConnections", "flows")
_ETAG_ATTEMPTS = 5


class FlowService:
    def __init__(self, http: PlatformHttp) -> None:
        self.http = http

    # --- connection specs ------------------------------------------------------------
    async def connection_spec(self, spec_id: str) -> dict[str, Any]:
        response = await self.http.request("GET", f"{BASE_PATH}/connectionSpecs/{spec_id}")
        return _single(response.body, f"connection spec {spec_id}")

    # --- entities ----------------------------------------------------------------------
    async def find(self, kind: str, **properties: str) -> list[dict[str, Any]]:
        """Entities whose properties equal these (``property=name==X`` filters, ANDed)."""
        params = [("property", f"{_path_of(key)}=={value}") for key, value in properties.items()]
        return await self.http.pages(f"{BASE_PATH}/{kind}", params=params)

    async def find_one(self, kind: str, name: str, **properties: str) -> dict[str, Any] | None:
        """The entity with this name (and properties); an error if there are several, since
        then which one a re-run manages would be a guess."""
        found = [item for item in await self.find(kind, name=name, **properties) if item.get("name") == name]
        if len(found) > 1:
            ids = ", ".join(str(item.get("id")) for item in found)
            raise ProvisioningError(
                f"{len(found)} {kind} are named {name!r} ({ids}): delete the extra ones or rename them, "
                "then run again"
            )
        return found[0] if found else None

    async def get(self, kind: str, entity_id: str) -> dict[str, Any]:
        response = await self.http.request("GET", f"{BASE_PATH}/{kind}/{entity_id}")
        return _single(response.body, f"{kind} {entity_id}")

    async def create(self, kind: str, body: dict[str, Any], **properties: str) -> str:
        """Create, returning the id. Never twice: after a failure that may have created it anyway
        (a timeout, a dropped connection, a 5xx), look it up by name (and ``properties``, as
        ``find_one``) and adopt what is there; send the create again only once it has not
        appeared for a whole request timeout (Adobe may still have been working on the first)."""
        retry = self.http.retry
        for attempt in range(1, retry.attempts + 1):
            try:
                response = await self.http.request("POST", f"{BASE_PATH}/{kind}", json=body, replayable=False)
            except (AdobeApiError, UncertainOutcome) as exc:
                if not _maybe_done(exc) or attempt == retry.attempts:
                    raise
                existing = await self._appeared(kind, body["name"], properties, attempt, exc)
                if existing is not None:
                    return str(existing["id"])
                continue
            return str((response.body or {})["id"])
        raise AssertionError("unreachable")

    async def _appeared(self, kind: str, name: str, properties: dict[str, str], attempt: int,
                        failure: ProvisioningError) -> dict[str, Any] | None:
        """The entity that a create which failed (its ``attempt``-th try) may have made. After a
        5xx, Adobe is done with the call: one look. After no answer, it may still be working on
        it: looked for on the backoff schedule until a whole request timeout has passed."""
        settle_s = self.http.timeout_s if isinstance(failure, UncertainOutcome) else 0.0
        started = time.monotonic()
        while True:
            await self.http.backoff(attempt, None)
            existing = await self.find_one(kind, name, **properties)
            if existing is not None or time.monotonic() - started >= settle_s:
                return existing

    async def patch(self, kind: str, entity_id: str, build_ops: Any) -> bool:
        """JSON Patch with If-Match. ``build_ops(entity)`` turns a fresh read into the operations
        (an empty list: nothing to do). A 412 means someone changed it meanwhile; a timeout or a
        5xx may or may not have applied it. Either way: read it again, rebuild the operations
        from what is there now, and send only those (none, when the last one was applied)."""
        sent = False  # a patch whose outcome is unknown was sent: it may be what applied the change
        conflicts = failures = 0
        while conflicts < _ETAG_ATTEMPTS:
            entity = await self.get(kind, entity_id)
            ops = build_ops(entity)
            if not ops:
                return sent
            etag = _quoted(entity.get("etag"))
            try:
                await self.http.request(
                    "PATCH", f"{BASE_PATH}/{kind}/{entity_id}", json=ops, headers={"If-Match": etag}
                )
                return True
            except (AdobeApiError, UncertainOutcome) as exc:
                if isinstance(exc, AdobeApiError) and exc.status == 412:
                    conflicts += 1
                    continue
                failures += 1
                if not _maybe_done(exc) or failures == self.http.retry.attempts:
                    raise
                sent = True
                await self.http.backoff(failures, None)
        raise ProvisioningError(
            f"{kind} {entity_id} kept changing while it was being updated ({_ETAG_ATTEMPTS} tries): "
            "is another tool editing it? Run again once it is quiet"
        )

    async def delete(self, kind: str, entity_id: str) -> None:
        """Delete, and for a dataflow wait until it is gone: Adobe answers 202, "marked for
        deletion", and its connections stay in use (cannot be deleted) until it is."""
        try:
            await self.http.request("DELETE", f"{BASE_PATH}/{kind}/{entity_id}")
        except AdobeApiError as exc:
            if exc.status != 404:  # already gone: what destroy wanted
                raise
        if kind == "flows":
            await self._gone(kind, entity_id)

    async def _gone(self, kind: str, entity_id: str) -> None:
        deadline = time.monotonic() + self.http.deletion_wait_s
        attempt = 0
        while True:
            try:
                response = await self.http.request("GET", f"{BASE_PATH}/{kind}/{entity_id}")
            except AdobeApiError as exc:
                if exc.status == 404:
                    return
                raise
            if isinstance(response.body, dict) and response.body.get("items") == []:  # gone as well
                return
            if time.monotonic() >= deadline:
                raise ProvisioningError(
                    f"{kind} {entity_id} is still being deleted after {self.http.deletion_wait_s:g} s: "
                    "run destroy again later (it goes on from where it stopped)")
            attempt = min(attempt + 1, self.http.retry.attempts)
            await self.http.retry.pause(attempt)

    # --- dataflows ---------------------------------------------------------------------
    async def flow_action(self, flow_id: str, op: str) -> None:
        # Enable and disable set a state: sending one twice ends in the same state, so it is
        # repeated like a read.
        await self.http.request("POST", f"{BASE_PATH}/flows/{flow_id}/action", params={"op": op}, replayable=True)

    async def runs(self, flow_id: str, limit: int = 5) -> list[dict[str, Any]]:
        response = await self.http.request(
            "GET", f"{BASE_PATH}/runs", params=[("property", f"flowId=={flow_id}"), ("limit", str(limit))]
        )
        return list((response.body or {}).get("items") or [])[:limit]


def _maybe_done(exc: ProvisioningError) -> bool:
    """A failed write that Adobe may have carried out all the same."""
    return isinstance(exc, UncertainOutcome) or (isinstance(exc, AdobeApiError) and exc.status >= 500)


def _single(body: Any, what: str) -> dict[str, Any]:
    """GET by id answers ``{"items": [entity]}`` (Flow Service) or the entity itself."""
    if isinstance(body, dict) and isinstance(body.get("items"), list):
        if not body["items"]:
            raise ProvisioningError(f"{what} was not found")
        return dict(body["items"][0])
    if isinstance(body, dict):
        return body
    raise ProvisioningError(f"{what}: unexpected answer {str(body)[:200]}")


def _quoted(etag: Any) -> str:
    """Etags come with their double quotes inside the JSON string and go back exactly so."""
    text = str(etag or "")
    return text if text.startswith('"') else f'"{text}"'


def _path_of(key: str) -> str:
    """Python keyword names for filter paths: connectionSpec__id -> connectionSpec.id."""
    return key.replace("__", ".")
