"""Segmentation Service: audiences (segment definitions) looked up by id or by name."""

from __future__ import annotations

from typing import Any

from .errors import AdobeApiError, ProvisioningError
from .http import PlatformHttp

BASE_PATH = "/data/core/ups"
_PAGE = 100


# The namespaces of audiences made in Platform; any other is an uploaded (external) audience.
PLATFORM_NAMESPACES = frozenset({"AEPSegments", "ups"})


def selector_value(audience: dict[str, Any]) -> dict[str, Any]:
    """How a dataflow's segment selector names an audience. One made in Platform: by its id. One
    uploaded (a CSV, Audience Manager): by its external ``audienceId``, with ``systemSegmentId``
    (Platform's id) and its ``namespace``, as Adobe's example for external audiences does."""
    audience_id = str(audience["id"])
    external = audience.get("audienceId")
    namespace = audience.get("namespace")
    name = str(audience.get("name") or "")
    if external and (external != audience_id or (namespace and namespace not in PLATFORM_NAMESPACES)):
        return {"id": str(external), "systemSegmentId": audience_id, "namespace": str(namespace or ""), "name": name}
    return {"id": audience_id, "name": name}


class Segmentation:
    def __init__(self, http: PlatformHttp) -> None:
        self.http = http
        self._all: list[dict[str, Any]] | None = None

    async def by_id(self, audience_id: str) -> dict[str, Any]:
        """A segment definition, or else an audience of any origin (e.g. a CSV upload)."""
        for path in (f"{BASE_PATH}/segment/definitions/{audience_id}", f"{BASE_PATH}/audiences/{audience_id}"):
            try:
                response = await self.http.request("GET", path)
            except AdobeApiError as exc:
                if exc.status == 404:
                    continue
                raise
            return dict(response.body or {})
        raise ProvisioningError(
            f"audience {audience_id!r} does not exist in sandbox {self.http.sandbox!r}: "
            "check the id (Audiences → the audience → its details) and the sandbox"
        )

    async def by_name(self, name: str) -> dict[str, Any]:
        """The one audience with exactly this name. The API has no name filter for segment
        definitions, so all of them are listed (once per run) and matched here."""
        matches = [segment for segment in await self.all() if segment.get("name") == name]
        if not matches:  # not a segment definition: perhaps an uploaded (external) audience
            matches = [a for a in await self._audiences_named(name) if a.get("name") == name]
        if not matches:
            raise ProvisioningError(
                f"no audience is named {name!r} in sandbox {self.http.sandbox!r}: check the spelling or use its id"
            )
        if len(matches) > 1:
            ids = ", ".join(str(m.get("id")) for m in matches)
            raise ProvisioningError(f"{len(matches)} audiences are named {name!r} ({ids}): give the id instead")
        return matches[0]

    async def _audiences_named(self, name: str) -> list[dict[str, Any]]:
        """/audiences?name= matches a case-insensitive substring, so a short name can match many;
        every page is read (``start``, as ``_page.next`` says) and the caller keeps exact names."""
        found: list[dict[str, Any]] = []
        start = 0
        while True:
            response = await self.http.request("GET", f"{BASE_PATH}/audiences", params={
                "name": name, "limit": str(_PAGE), "start": str(start)})
            body = response.body or {}
            page = list(body.get("children") or [])
            found.extend(page)
            following = str((body.get("_page") or {}).get("next"))
            if not page or not following.isdigit() or int(following) <= start:
                return found  # the last page (no next offset; or one that is not an offset, never seen)
            start = int(following)

    async def all(self) -> list[dict[str, Any]]:
        if self._all is None:
            found: list[dict[str, Any]] = []
            start = 0
            while True:
                response = await self.http.request(
                    "GET", f"{BASE_PATH}/segment/definitions", params={"limit": str(_PAGE), "start": str(start)}
                )
                body = response.body or {}
                page = list(body.get("segments") or [])
                found.extend(page)
                total = (body.get("page") or {}).get("totalCount")
                start += len(page)
                if not page or len(page) < _PAGE or (total is not None and start >= int(total)):
                    break
            self._all = found
        return self._all
