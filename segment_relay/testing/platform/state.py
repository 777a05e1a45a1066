"""The fake's model of Adobe's side, free of HTTP: per-sandbox Flow Service entities (base, source
and target connections, dataflows), their validation, etags and JSON Patch updates, synthesized
dataflow runs, and the Segmentation views of the seeded audiences.

Every method takes the already-authenticated caller and sandbox, and raises ``ApiError`` with the
status Adobe would answer; ``app.py`` turns that into HTTP.
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .catalog import (
    DESTINATION_FLOW_SPEC_ID,
    DESTINATION_SPEC_IDS,
    PROFILE_SOURCE_SPEC_ID,
    Audience,
    connection_specs,
    flow_specs,
    secret_fields,
)
from .errors import ApiError
from .patch import PatchError, apply_patch, parse_pointer
from .query import Filter, matches, order

__all__ = ["Clock", "Caller", "Sandbox", "FlowService", "Segmentation", "WindowStats", "KINDS", "MASK"]

KINDS = ("connections", "sourceConnections", "targetConnections", "flows")
MASK = "XXXXXXXX"  # what a GET shows instead of a credential (the real value never leaves the fake)
_NAMESPACE = uuid.UUID("6f1c3d0e-5a7b-4e2c-9d8f-0a1b2c3d4e5f")
_ONE_HOUR = 3600
_MAX_RUN_WINDOWS = 168  # a week of hourly streaming runs per flow is plenty for a fake
# what a JSON Patch may touch, per entity kind; everything else is system-managed
_PATCHABLE = {
    "connections": {"name", "description", "auth"},
    "sourceConnections": {"name", "description", "params", "data"},
    "targetConnections": {"name", "description", "params", "data"},
    "flows": {"name", "description", "transformations", "scheduleParams"},
}
_SINGULAR = {"connections": "connection", "sourceConnections": "source connection",
             "targetConnections": "target connection", "flows": "flow"}


class Clock:
    """Wall time plus an offset tests can advance (token expiry, hourly runs) without sleeping."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass(frozen=True)
class Caller:
    client_id: str
    org_id: str

    @property
    def user(self) -> str:
        return f"{self.client_id}@AdobeID"


@dataclass
class Sandbox:
    name: str
    org_id: str
    entities: dict[str, dict[str, dict[str, Any]]] = field(default_factory=lambda: {k: {} for k in KINDS})
    changed: dict[str, int] = field(default_factory=dict)  # entity id -> change sequence (list order)
    enabled_periods: dict[str, list[list[float | None]]] = field(default_factory=dict)  # flow id -> [start, end]

    @property
    def id(self) -> str:
        return str(uuid.uuid5(_NAMESPACE, f"{self.org_id}/{self.name}"))

    @property
    def type(self) -> str:
        return "production" if self.name == "prod" else "development"


@dataclass
class WindowStats:
    """What the export simulator delivered for one flow in one hour (feeds synthesized runs)."""

    records: int = 0
    bytes: int = 0
    failed: int = 0
    by_audience: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _quoted_etag(counter: int, now: float) -> str:
    # Shaped like Adobe's (Cosmos DB) etags and, like them, with the double quotes inside the value.
    return f'"{counter:08x}-0000-0200-0000-{int(now) & 0xFFFFFFFF:08x}0000"'


def _require_text(body: Mapping[str, Any], key: str, what: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{what}: '{key}' is required and must be a non-empty string")
    return value


def check_params(params: Any, schema: Mapping[str, Any], what: str) -> None:
    """The small part of JSON Schema the catalogue's specs use: required, anyOf-required, types,
    and no unknown keys (so a misplaced or misspelt parameter is an error, not silently ignored)."""
    if not isinstance(params, dict):
        raise ApiError(400, f"{what} must be a JSON object")
    properties: Mapping[str, Any] = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if params.get(k) in (None, "")]
    if missing:
        raise ApiError(400, f"{what}: missing required parameter(s) {missing}; expected {sorted(properties)}")
    alternatives = schema.get("anyOf")
    if alternatives and not any(all(params.get(k) not in (None, "") for k in alt["required"]) for alt in alternatives):
        options = " or ".join("+".join(alt["required"]) for alt in alternatives)
        raise ApiError(400, f"{what}: one of {options} is required")
    unknown = sorted(k for k in params if k not in properties)
    if unknown:
        raise ApiError(400, f"{what}: unknown parameter(s) {unknown}; expected {sorted(properties)}")
    for key, value in params.items():
        expected = properties[key].get("type")
        if expected == "string" and not isinstance(value, str):
            raise ApiError(400, f"{what}: '{key}' must be a string")
        if expected == "boolean" and not isinstance(value, bool):
            raise ApiError(400, f"{what}: '{key}' must be a boolean")


class FlowService:
    """Flow Service entities for every sandbox of one org."""

    def __init__(self, clock: Clock, org_id: str, audiences: Callable[[str], Mapping[str, Audience]], *,
                 eventhubs_sas_auth: bool = False) -> None:
        self.clock = clock
        self.org_id = org_id
        self.audiences = audiences  # sandbox name -> {audience id: Audience}
        self.sandboxes: dict[str, Sandbox] = {}
        self._counter = itertools.count(0x04000000)
        self._sequence = itertools.count(1)
        self.specs = {spec["id"]: spec for spec in connection_specs(eventhubs_sas_auth=eventhubs_sas_auth)}
        # set by FakePlatform: told whenever a flow (or something it uses) changes
        self.on_change: Callable[[str, str | None], None] = lambda sandbox, flow_id: None
        # set by FakePlatform: hourly delivery stats of a flow's exports, for synthesized runs
        self.window_stats: Callable[[str, str], Mapping[int, WindowStats]] = lambda sandbox, flow_id: {}
        self.patch_status = 200
        self.delete_status = 202
        # With delete_status 202 a dataflow is only marked for deletion, as in Adobe: it stays (and
        # keeps its connections in use) for this long, then goes.
        self.flow_deletion_s = 0.2
        self._deleting: dict[tuple[str, str], float] = {}  # (sandbox, flow id) -> when it goes

    # --- helpers -----------------------------------------------------------------------
    def sandbox(self, name: str) -> Sandbox:
        box = self.sandboxes.get(name)
        if box is None:
            box = self.sandboxes[name] = Sandbox(name, self.org_id)
        if self._deleting:
            self._finish_deletions()
        return box

    def _finish_deletions(self) -> None:
        now = self.clock()
        for (sandbox, flow_id), due in list(self._deleting.items()):
            if due <= now:
                del self._deleting[(sandbox, flow_id)]
                self._remove(self.sandboxes[sandbox], "flows", flow_id)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _new_etag(self) -> str:
        return _quoted_etag(next(self._counter), self.clock())

    def _stamp(self, box: Sandbox, doc: dict[str, Any], caller: Caller, *, created: bool) -> None:
        now = self._now_ms()
        etag = self._new_etag()
        if created:
            doc.update(createdAt=now, createdBy=caller.user, createdClient=caller.client_id)
        doc.update(updatedAt=now, updatedBy=caller.user, updatedClient=caller.client_id,
                   sandboxId=box.id, sandboxName=box.name, imsOrgId=self.org_id, etag=etag, version=etag)
        box.changed[doc["id"]] = next(self._sequence)

    def _find(self, box: Sandbox, kind: str, entity_id: str) -> dict[str, Any]:
        doc = box.entities[kind].get(entity_id)
        if doc is None:
            raise ApiError(404, f"{kind} not found with id = [{entity_id}]")
        return doc

    def _spec(self, ref: Any, what: str) -> dict[str, Any]:
        if not isinstance(ref, dict) or not isinstance(ref.get("id"), str) or not ref["id"]:
            raise ApiError(400, f"{what}: please provide a valid spec id (connectionSpec.id)")
        spec = self.specs.get(ref["id"])
        if spec is None:
            raise ApiError(400, f"{what}: connection spec {ref['id']} does not exist")
        if not ref.get("version"):
            raise ApiError(422, f"{what}: connectionSpec.version is required for spec info; it is usually \"1.0\"")
        if ref["version"] != spec["version"]:
            raise ApiError(400, f"{what}: version {ref['version']!r} of connection spec {ref['id']} does not exist")
        return spec

    def render(self, kind: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The entity as a GET shows it: credentials masked."""
        out = copy.deepcopy(dict(doc))
        if kind == "connections" and isinstance(out.get("auth"), dict):
            auth = out["auth"]
            secrets = secret_fields(out["connectionSpec"]["id"], auth.get("specName", ""))
            params = auth.get("params")
            if isinstance(params, dict):
                auth["params"] = {k: (MASK if k in secrets and v else v) for k, v in params.items()}
        return out

    def raw(self, sandbox: str, kind: str, entity_id: str) -> dict[str, Any] | None:
        """The stored entity with real credentials (for the export simulator only)."""
        box = self.sandboxes.get(sandbox)
        if box is None or (sandbox, entity_id) in self._deleting:  # a flow marked for deletion exports no more
            return None
        return box.entities[kind].get(entity_id)

    # --- connection specs ----------------------------------------------------------------
    def connection_specs(self, filters: Sequence[Filter]) -> list[dict[str, Any]]:
        return [copy.deepcopy(s) for s in self.specs.values() if matches(s, filters)]

    def connection_spec(self, spec_id: str) -> dict[str, Any]:
        spec = self.specs.get(spec_id)
        if spec is None:
            raise ApiError(404, f"connectionSpecs not found with id = [{spec_id}]")
        return copy.deepcopy(spec)

    def flow_specs(self, filters: Sequence[Filter]) -> list[dict[str, Any]]:
        return [s for s in flow_specs() if matches(s, filters)]

    def flow_spec(self, spec_id: str) -> dict[str, Any]:
        for spec in flow_specs():
            if spec["id"] == spec_id:
                return spec
        raise ApiError(404, f"flowSpecs not found with id = [{spec_id}]")

    # --- validation per kind ---------------------------------------------------------------
    def _validate_connection(self, doc: dict[str, Any]) -> None:
        spec = self._spec(doc.get("connectionSpec"), "base connection")
        _require_text(doc, "name", "base connection")
        auth = doc.get("auth")
        if not spec["authSpec"]:
            if auth not in (None, {}):
                raise ApiError(400, f"base connection: {spec['name']} takes no 'auth'")
            return
        if not isinstance(auth, dict):
            raise ApiError(400, f"base connection: 'auth' with specName and params is required for {spec['name']}")
        names = [a["name"] for a in spec["authSpec"]]
        auth_spec = next((a for a in spec["authSpec"] if a["name"] == auth.get("specName")), None)
        if auth_spec is None:
            raise ApiError(400, f"base connection: auth.specName {auth.get('specName')!r} is not an auth spec of "
                                f"{spec['name']}; read it from GET /connectionSpecs/{spec['id']} (one of {names})")
        check_params(auth.get("params"), auth_spec["spec"], "auth.params")
        for key in secret_fields(spec["id"], auth_spec["name"]):
            if auth["params"].get(key) == MASK:
                raise ApiError(400, f"auth.params.{key} is the masked value a GET returns, not a credential")

    def _validate_source(self, box: Sandbox, doc: dict[str, Any]) -> None:
        spec = self._spec(doc.get("connectionSpec"), "source connection")
        _require_text(doc, "name", "source connection")
        if spec["id"] != PROFILE_SOURCE_SPEC_ID:
            raise ApiError(400, f"source connection: only the Profile Service source ({PROFILE_SOURCE_SPEC_ID}) "
                                "can feed a streaming destination")
        base_id = doc.get("baseConnectionId")
        if base_id is not None:
            base = box.entities["connections"].get(base_id) if isinstance(base_id, str) else None
            if base is None:
                raise ApiError(400, f"source connection: base connection {base_id} does not exist in sandbox {box.name}")
            if base["connectionSpec"]["id"] != spec["id"]:
                raise ApiError(400, "source connection: its base connection has another connection spec")
        data = doc.get("data", {})
        if not isinstance(data, dict) or data.get("format", "json") != "json":
            raise ApiError(400, "source connection: data.format must be \"json\"")
        if not isinstance(doc.get("params", {}), dict):
            raise ApiError(400, "source connection: params must be an object")

    def _validate_target(self, box: Sandbox, doc: dict[str, Any]) -> None:
        spec = self._spec(doc.get("connectionSpec"), "target connection")
        _require_text(doc, "name", "target connection")
        if spec["id"] not in DESTINATION_SPEC_IDS:
            raise ApiError(400, f"target connection: {spec['name']} is not a destination")
        if "baseConnectionId" not in doc:
            hint = " (found 'baseConnection': the field is 'baseConnectionId')" if "baseConnection" in doc else ""
            raise ApiError(400, f"target connection: 'baseConnectionId' is required{hint}")
        base_id = doc["baseConnectionId"]
        base = box.entities["connections"].get(base_id) if isinstance(base_id, str) else None
        if base is None:
            raise ApiError(400, f"target connection: base connection {base_id} does not exist in sandbox {box.name}")
        if base["connectionSpec"]["id"] != spec["id"]:
            raise ApiError(400, "target connection: connectionSpec differs from its base connection's")
        data = doc.get("data")
        if not isinstance(data, dict) or data.get("format") != "json":
            raise ApiError(400, "target connection: data.format must be \"json\" for streaming destinations")
        check_params(doc.get("params"), spec["targetSpec"]["spec"], "params")

    def _validate_flow(self, box: Sandbox, doc: dict[str, Any]) -> None:
        _require_text(doc, "name", "flow")
        flow_spec = doc.get("flowSpec")
        if not isinstance(flow_spec, dict) or flow_spec.get("id") != DESTINATION_FLOW_SPEC_ID:
            raise ApiError(400, f"flow: flowSpec.id must be {DESTINATION_FLOW_SPEC_ID} (profile-based destinations)")
        if not flow_spec.get("version"):
            raise ApiError(422, "flow: flowSpec.version is required; it is usually \"1.0\"")
        sources, targets = doc.get("sourceConnectionIds"), doc.get("targetConnectionIds")
        if not isinstance(sources, list) or not sources or not all(isinstance(s, str) for s in sources):
            raise ApiError(400, "flow: sourceConnectionIds must be a non-empty list of ids")
        if not isinstance(targets, list) or len(targets) != 1 or not isinstance(targets[0], str):
            raise ApiError(400, "flow: targetConnectionIds must hold exactly one target connection id")
        for source_id in sources:
            if source_id not in box.entities["sourceConnections"]:
                raise ApiError(400, f"flow: source connection {source_id} does not exist in sandbox {box.name}")
        if targets[0] not in box.entities["targetConnections"]:
            raise ApiError(400, f"flow: target connection {targets[0]} does not exist in sandbox {box.name}")
        self._validate_transformations(box, doc.get("transformations"))

    def _validate_transformations(self, box: Sandbox, transformations: Any) -> None:
        if not isinstance(transformations, list) or not transformations:
            raise ApiError(400, "flow: transformations must be a list holding the GeneralTransform")
        known = {audience.selector_id: audience for audience in self.audiences(box.name).values()}
        for t_index, transformation in enumerate(transformations):
            where = f"transformations[{t_index}]"
            if not isinstance(transformation, dict) or transformation.get("name") != "GeneralTransform":
                raise ApiError(400, f"{where}: name must be \"GeneralTransform\"")
            params = transformation.get("params")
            if not isinstance(params, dict):
                raise ApiError(400, f"{where}: params must be an object")
            seen: set[str] = set()
            for s_index, selector in enumerate(_selectors(params, "segmentSelectors", where)):
                here = f"{where}.params.segmentSelectors.selectors[{s_index}]"
                value = selector.get("value") if isinstance(selector, dict) else None
                if selector.get("type") != "PLATFORM_SEGMENT" or not isinstance(value, dict):
                    raise ApiError(400, f"{here}: expected {{type: PLATFORM_SEGMENT, value: {{id, name?, description?}}}}")
                audience_id = value.get("id")
                if not isinstance(audience_id, str) or not audience_id:
                    raise ApiError(400, f"{here}: value.id (the audience id) is required")
                audience = known.get(audience_id)
                if audience is None:
                    uploaded = next((a for a in known.values() if a.id == audience_id and a.external_id), None)
                    if uploaded is not None:
                        raise ApiError(400, f"{here}: audience {audience_id} was uploaded: select it by its "
                                            f"audienceId {uploaded.external_id!r} with systemSegmentId and namespace")
                    raise ApiError(400, f"{here}: audience {audience_id} does not exist in sandbox {box.name}")
                if audience.external_id is not None and (
                        value.get("systemSegmentId") != audience.id or value.get("namespace") != audience.namespace):
                    raise ApiError(400, f"{here}: the uploaded audience {audience_id} needs systemSegmentId "
                                        f"{audience.id!r} and namespace {audience.namespace!r}")
                if audience_id in seen:
                    raise ApiError(400, f"{here}: audience {audience_id} is already mapped to this flow")
                seen.add(audience_id)
            paths: set[str] = set()
            for p_index, selector in enumerate(_selectors(params, "profileSelectors", where)):
                here = f"{where}.params.profileSelectors.selectors[{p_index}]"
                value = selector.get("value") if isinstance(selector, dict) else None
                if (selector.get("type") != "JSON_PATH" or not isinstance(value, dict)
                        or not isinstance(value.get("path"), str) or not value["path"]
                        or value.get("operator", "EXISTS") != "EXISTS"):
                    raise ApiError(400, f"{here}: expected {{type: JSON_PATH, value: {{operator: EXISTS, path}}}}")
                if value["path"] in paths:
                    raise ApiError(400, f"{here}: attribute {value['path']} is already mapped")
                paths.add(value["path"])

    def _enrich(self, doc: dict[str, Any]) -> None:
        """What Adobe adds to selectors on save (notes §2.3): audience mapping times, attribute mappings."""
        now_s = str(int(self.clock()))
        for transformation in doc.get("transformations", []):
            params = transformation.get("params", {})
            for selector in params.get("segmentSelectors", {}).get("selectors", []):
                value = selector["value"]
                value.setdefault("createTime", now_s)
                value.setdefault("updateTime", now_s)
            for selector in params.get("profileSelectors", {}).get("selectors", []):
                value = selector["value"]
                value.setdefault("operator", "EXISTS")
                value.setdefault("mapping", {"sourceType": "text/x.schema-path", "source": value["path"],
                                             "destination": value["path"], "identity": False,
                                             "primaryIdentity": False})

    def _inherited(self, box: Sandbox, kind: str, doc: dict[str, Any]) -> dict[str, Any]:
        def base_of(entity: Mapping[str, Any]) -> dict[str, Any] | None:
            base = box.entities["connections"].get(entity.get("baseConnectionId", ""))
            if base is None:
                return None
            return {"id": base["id"], "connectionSpec": dict(base["connectionSpec"])}

        if kind in ("sourceConnections", "targetConnections"):
            return {"baseConnection": base_of(doc)}
        sources = []
        for source_id in doc["sourceConnectionIds"]:
            source = box.entities["sourceConnections"][source_id]
            sources.append({"id": source_id, "connectionSpec": dict(source["connectionSpec"]),
                            "baseConnection": base_of(source), "typeInfo": {"type": "ProfileFragments", "id": "ups"}})
        targets = []
        for target_id in doc["targetConnectionIds"]:
            target = box.entities["targetConnections"][target_id]
            targets.append({"id": target_id, "connectionSpec": dict(target["connectionSpec"]),
                            "baseConnection": base_of(target)})
        return {"sourceConnections": sources, "targetConnections": targets,
                "properties": {"isSourceFlow": False, "isDestinationFlow": True}}

    # --- CRUD ------------------------------------------------------------------------------
    def create(self, sandbox: str, kind: str, body: Any, caller: Caller) -> tuple[str, str]:
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        box = self.sandbox(sandbox)
        doc = copy.deepcopy(body)
        for key in ("id", "etag", "version", "state", "createdAt", "updatedAt", "inheritedAttributes"):
            doc.pop(key, None)  # system-managed: ignored on create, as Adobe does
        doc.setdefault("description", "")
        if kind == "connections":
            self._validate_connection(doc)
        elif kind == "sourceConnections":
            self._validate_source(box, doc)
            doc.setdefault("data", {"format": "json"})
            doc.setdefault("params", {})
        elif kind == "targetConnections":
            self._validate_target(box, doc)
        else:
            self._validate_flow(box, doc)
            self._enrich(doc)
        doc["id"] = str(uuid.uuid4())
        doc["state"] = "enabled"  # connections are usable and new dataflows run at once, as in Adobe
        if kind == "sourceConnections":
            doc["typeInfo"] = {"type": "ProfileFragments", "id": "ups"}
        if kind in ("sourceConnections", "targetConnections", "flows"):
            doc["inheritedAttributes"] = self._inherited(box, kind, doc)
        if kind == "flows":
            doc["runs"] = f"/runs?property=flowId=={doc['id']}"
            box.enabled_periods[doc["id"]] = [[self.clock(), None]]
        self._stamp(box, doc, caller, created=True)
        box.entities[kind][doc["id"]] = doc
        if kind == "flows":
            self.on_change(sandbox, doc["id"])
        return doc["id"], doc["etag"]

    def get(self, sandbox: str, kind: str, entity_id: str) -> dict[str, Any]:
        return self.render(kind, self._find(self.sandbox(sandbox), kind, entity_id))

    def list_entities(self, sandbox: str, kind: str, filters: Sequence[Filter], orderby: str | None) -> list[dict[str, Any]]:
        box = self.sandbox(sandbox)
        rendered = [self.render(kind, doc) for doc in box.entities[kind].values()]
        chosen = [doc for doc in rendered if matches(doc, filters)]
        if orderby:
            return order(chosen, orderby)
        # most recently changed first (several changes can share a millisecond: use the sequence)
        return sorted(chosen, key=lambda d: box.changed.get(d["id"], 0), reverse=True)

    def _check_etag(self, doc: Mapping[str, Any], if_match: str | None, *, required: bool) -> None:
        if if_match is None and not required:
            return
        current = doc["etag"]
        if if_match is None or if_match.strip() != current:
            supplied = "" if if_match is None else if_match.strip()
            hint = ("the If-Match header is required" if if_match is None else
                    "the etag must be sent with its double quotes" if supplied == current.strip('"') else
                    "re-read the entity and retry with its current etag")
            raise ApiError(412, f"Supplied version=[{supplied}] does not match the current version on "
                                f"entity=[{current}] ({hint})")

    def patch(self, sandbox: str, kind: str, entity_id: str, operations: Any, if_match: str | None,
              caller: Caller) -> tuple[str, str]:
        box = self.sandbox(sandbox)
        doc = self._find(box, kind, entity_id)
        self._check_etag(doc, if_match, required=True)
        if isinstance(operations, list):
            for operation in operations:
                for pointer in (operation.get("path"), operation.get("from")) if isinstance(operation, dict) else ():
                    if isinstance(pointer, str):
                        try:
                            tokens = parse_pointer(pointer)
                        except PatchError as error:
                            raise ApiError(400, f"Invalid JSON Patch: {error}") from None
                        if not tokens or tokens[0] not in _PATCHABLE[kind]:
                            raise ApiError(400, f"Invalid JSON Patch: {pointer!r} is not a patchable field of a "
                                                f"{_SINGULAR[kind]} (patchable: {sorted(_PATCHABLE[kind])})")
        try:
            updated = apply_patch(doc, operations)
        except PatchError as error:
            raise ApiError(400, f"Invalid JSON Patch: {error}") from None
        if kind == "connections":
            self._validate_connection(updated)
        elif kind == "sourceConnections":
            self._validate_source(box, updated)
        elif kind == "targetConnections":
            self._validate_target(box, updated)
        else:
            self._validate_transformations(box, updated.get("transformations"))
            _require_text(updated, "name", "flow")
            self._enrich(updated)
        self._stamp(box, updated, caller, created=False)
        box.entities[kind][entity_id] = updated
        self.on_change(sandbox, entity_id if kind == "flows" else None)
        return entity_id, updated["etag"]

    def delete(self, sandbox: str, kind: str, entity_id: str) -> None:
        box = self.sandbox(sandbox)
        self._find(box, kind, entity_id)
        # Adobe refuses to delete an account (base connection) that dataflows still use; the status
        # it answers is not documented. The fake answers 409 Conflict and names the users, for every
        # entity another one still references: delete flows, then target/source connections, then
        # base connections.
        users: list[str] = []
        if kind == "connections":
            users = [f"{k[:-1]} {d['id']}" for k in ("sourceConnections", "targetConnections")
                     for d in box.entities[k].values() if d.get("baseConnectionId") == entity_id]
        elif kind in ("sourceConnections", "targetConnections"):
            field_name = "sourceConnectionIds" if kind == "sourceConnections" else "targetConnectionIds"
            users = [f"flow {d['id']}" for d in box.entities["flows"].values() if entity_id in d[field_name]]
        if users:
            raise ApiError(409, f"{_SINGULAR[kind]} {entity_id} is still used by {', '.join(users)}; delete those first")
        if kind == "flows" and self.delete_status == 202 and self.flow_deletion_s > 0:
            if (sandbox, entity_id) not in self._deleting:  # marked: it exports no more, and goes later
                self._deleting[(sandbox, entity_id)] = self.clock() + self.flow_deletion_s
                self._stop(box, entity_id)
            return
        self._remove(box, kind, entity_id)

    def _remove(self, box: Sandbox, kind: str, entity_id: str) -> None:
        del box.entities[kind][entity_id]
        box.changed.pop(entity_id, None)
        if kind == "flows":
            self._stop(box, entity_id)

    def _stop(self, box: Sandbox, flow_id: str) -> None:
        periods = box.enabled_periods.get(flow_id, [])
        if periods and periods[-1][1] is None:
            periods[-1][1] = self.clock()
        self.on_change(box.name, flow_id)

    def action(self, sandbox: str, flow_id: str, op: str | None, if_match: str | None, caller: Caller) -> tuple[str, str]:
        box = self.sandbox(sandbox)
        doc = self._find(box, "flows", flow_id)
        wanted = {"enable": "enabled", "disable": "disabled"}.get((op or "").lower())
        if wanted is None:
            raise ApiError(400, f"op must be enable or disable (any case), got {op!r}")
        self._check_etag(doc, if_match, required=False)  # optional on /action (notes §2.2)
        if doc["state"] != wanted:
            doc["state"] = wanted
            self._stamp(box, doc, caller, created=False)
            periods = box.enabled_periods.setdefault(flow_id, [])
            if wanted == "enabled":
                periods.append([self.clock(), None])
            elif periods and periods[-1][1] is None:
                periods[-1][1] = self.clock()
            self.on_change(sandbox, flow_id)
        return flow_id, doc["etag"]

    # --- runs ------------------------------------------------------------------------------
    def runs(self, sandbox: str, filters: Sequence[Filter], orderby: str | None) -> list[dict[str, Any]]:
        box = self.sandbox(sandbox)
        now = self.clock()
        runs: list[dict[str, Any]] = []
        for flow_id, periods in box.enabled_periods.items():
            flow = box.entities["flows"].get(flow_id)
            if flow is None:
                continue
            stats = self.window_stats(sandbox, flow_id)
            windows: set[int] = set()
            for start, end in periods:
                assert start is not None
                hour = int(start // _ONE_HOUR) * _ONE_HOUR
                stop = now if end is None else end
                while hour <= stop:
                    windows.add(hour)
                    hour += _ONE_HOUR
            for hour in sorted(windows)[-_MAX_RUN_WINDOWS:]:
                runs.append(self._run(box, flow, hour, now, stats.get(hour, WindowStats())))
        chosen = [run for run in runs if matches(run, filters)]
        return order(chosen, orderby, default="-createdAt")

    def _run(self, box: Sandbox, flow: Mapping[str, Any], hour: int, now: float, stats: WindowStats) -> dict[str, Any]:
        done = hour + _ONE_HOUR <= now
        status = "Failed" if stats.errors and done else ("Success" if done else "Processing")
        started_ms, ended_ms = hour * 1000, min((hour + _ONE_HOUR) * 1000, int(now * 1000))
        target_id = flow["targetConnectionIds"][0]
        entities = [{"id": f"segment:{audience}", "outputRecordCount": count}
                    for audience, count in sorted(stats.by_audience.items())]
        duration: dict[str, Any] = {"startedAtUTC": started_ms}
        if done:
            duration["completedAtUTC"] = ended_ms
        return {
            "id": str(uuid.uuid5(_NAMESPACE, f"{flow['id']}/{hour}")),
            "flowId": flow["id"],
            "createdAt": started_ms, "updatedAt": ended_ms,
            "createdBy": flow["createdBy"], "updatedBy": flow["createdBy"],
            "createdClient": flow["createdClient"], "updatedClient": flow["createdClient"],
            "sandboxId": box.id, "sandboxName": box.name, "imsOrgId": self.org_id,
            "etag": _quoted_etag(hour & 0xFFFFFFF, ended_ms / 1000),
            "flowSpec": dict(flow["flowSpec"]),
            "metrics": {
                "durationSummary": duration,
                "sizeSummary": {"inputBytes": stats.bytes, "outputBytes": stats.bytes},
                "recordSummary": {
                    "inputRecordCount": stats.records + stats.failed,
                    "outputRecordCount": stats.records,
                    "failedRecordCount": stats.failed,
                    "skippedRecordCount": 0,
                    "sourceSummaries": [{"id": sid, "inputRecordCount": stats.records + stats.failed,
                                         "entitySummaries": entities} for sid in flow["sourceConnectionIds"]],
                    "targetSummaries": [{"id": target_id, "outputRecordCount": stats.records,
                                         "entitySummaries": entities}],
                },
                "statusSummary": {
                    "status": status,
                    "errors": [{"code": "ACTIVATION-STREAMING-0001-ERR", "message": m} for m in stats.errors[:10]],
                },
            },
        }

    def run(self, sandbox: str, run_id: str) -> dict[str, Any]:
        for run in self.runs(sandbox, [], None):
            if run["id"] == run_id:
                return run
        raise ApiError(404, f"runs not found with id = [{run_id}]")


def _selectors(params: Mapping[str, Any], key: str, where: str) -> list[Any]:
    group = params.get(key, {"selectors": []})
    if not isinstance(group, dict) or not isinstance(group.get("selectors", []), list):
        raise ApiError(400, f"{where}.params.{key} must be {{\"selectors\": [...]}}")
    selectors = group.get("selectors", [])
    for selector in selectors:
        if not isinstance(selector, dict):
            raise ApiError(400, f"{where}.params.{key}.selectors must hold objects")
    return selectors


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


class Segmentation:
    """The Segmentation views (segment definitions, audiences) of the seeded audiences."""

    def __init__(self, org_id: str, flow_service: FlowService) -> None:
        self.org_id = org_id
        self.flow_service = flow_service
        self.global_audiences: dict[str, Audience] = {}  # visible in every sandbox
        self.sandbox_audiences: dict[str, dict[str, Audience]] = {}  # only in one sandbox

    def add(self, audiences: Iterable[Audience], sandbox: str | None = None) -> None:
        target = self.global_audiences if sandbox is None else self.sandbox_audiences.setdefault(sandbox, {})
        for audience in audiences:
            target[audience.id] = audience

    def visible(self, sandbox: str) -> dict[str, Audience]:
        return {**self.global_audiences, **self.sandbox_audiences.get(sandbox, {})}

    def defined(self, sandbox: str) -> dict[str, Audience]:
        """The audiences that are segment definitions (an uploaded one is not)."""
        return {key: a for key, a in self.visible(sandbox).items() if a.external_id is None}

    def _sandbox_doc(self, sandbox: str) -> dict[str, Any]:
        box = self.flow_service.sandbox(sandbox)
        return {"sandboxId": box.id, "sandboxName": box.name, "type": box.type, "default": box.name == "prod"}

    def definition(self, sandbox: str, audience: Audience) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": audience.id,
            "schema": {"name": "_xdm.context.profile"},
            "profileInstanceId": "ups",
            "imsOrgId": self.org_id,
            "sandbox": self._sandbox_doc(sandbox),
            "name": audience.name,
            "description": audience.description,
            "expression": {"type": "PQL", "format": "pql/text", "value": audience.expression},
            "mergePolicyId": audience.merge_policy_id,
            "evaluationInfo": {"batch": {"enabled": not audience.continuous},
                               "continuous": {"enabled": audience.continuous},
                               "synchronous": {"enabled": False}},
            "dataGovernancePolicy": {"excludeOptOut": True},
            "creationTime": audience.created_ms,
            "updateEpoch": audience.updated_ms // 1000,
            "updateTime": audience.updated_ms,
        }
        doc.update(copy.deepcopy(audience.extra))
        return doc

    def audience_doc(self, sandbox: str, audience: Audience) -> dict[str, Any]:
        doc = self.definition(sandbox, audience)
        uploaded = audience.external_id is not None
        doc.update({
            "audienceId": audience.selector_id,
            "namespace": audience.namespace,
            "isSystem": False,
            "type": "ExternalAudience" if uploaded else "SegmentDefinition",
            "originName": "CUSTOM_UPLOAD" if uploaded else "REAL_TIME_CUSTOMER_PROFILE",
            "lifecycleState": "published",
            "createEpoch": audience.created_ms // 1000,
            "_etag": _quoted_etag(zlib.crc32(audience.id.encode()) & 0xFFFFFFF, audience.updated_ms / 1000),
            "dependents": [], "dependencies": [],
            "definedOn": [{"meta:resourceType": "unions", "meta:containerId": "tenant",
                           "$ref": "https://ns.adobe.com/xdm/context/profile__union"}],
            "createdBy": "audiences@AdobeID",
        })
        return doc

    def _get(self, sandbox: str, audience_id: str, what: str) -> Audience:
        audience = self.visible(sandbox).get(audience_id)
        if audience is None:
            raise ApiError(404, f"The {what} {audience_id} is not found in sandbox {sandbox}. Use a valid id and try again.")
        return audience

    @staticmethod
    def _sorted(docs: list[dict[str, Any]], sort: str | None, default: str) -> tuple[list[dict[str, Any]], str, str]:
        field_name, _, direction = (sort or default).partition(":")
        direction = (direction or "asc").lower()
        if direction not in ("asc", "desc") or not field_name:
            raise ApiError(400, f"Invalid sort {sort!r}: use <field>:asc or <field>:desc")
        return order(docs, ("-" if direction == "desc" else "") + field_name), field_name, direction

    @staticmethod
    def _window(start: int | None, page: int | None, limit: int | None, default_limit: int) -> tuple[int, int]:
        size = default_limit if limit is None else limit
        if not 1 <= size <= 100:
            raise ApiError(400, "limit must be between 1 and 100")
        if start is not None and start < 0 or page is not None and page < 0:
            raise ApiError(400, "start and page must not be negative")
        return (start if start is not None else (page or 0) * size), size

    def definitions(self, sandbox: str, *, start: int | None, page: int | None, limit: int | None,
                    sort: str | None) -> dict[str, Any]:
        docs = [self.definition(sandbox, a) for a in self.defined(sandbox).values()]
        docs, field_name, direction = self._sorted(docs, sort, "updateTime:desc")
        offset, size = self._window(start, page, limit, 20)
        chunk = docs[offset: offset + size]
        total = len(docs)
        link: dict[str, Any] = {}
        if offset + size < total:
            link["next"] = f"/segment/definitions?start={offset + size}&limit={size}&sort={field_name}:{direction}"
        return {
            "segments": chunk,
            "page": {"totalCount": total, "totalPages": -(-total // size), "sortField": field_name,
                     "sort": direction, "pageSize": len(chunk), "limit": size},
            "link": link,
        }

    def get_definition(self, sandbox: str, segment_id: str) -> dict[str, Any]:
        audience = self._get(sandbox, segment_id, "segment definition")
        if audience.external_id is not None:
            raise ApiError(404, f"The segment definition {segment_id} is not found in sandbox {sandbox}. "
                                "Use a valid id and try again.")
        return self.definition(sandbox, audience)

    def bulk(self, sandbox: str, body: Any, *, audiences: bool) -> dict[str, Any]:
        ids = body.get("ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, dict) and isinstance(i.get("id"), str) for i in ids):
            raise ApiError(400, 'The body must be {"ids": [{"id": "<id>"}, ...]} with at least one id')
        results: dict[str, Any] = {}
        known = self.visible(sandbox)
        for item in ids:
            audience = known.get(item["id"])
            if audience is None:
                results[item["id"]] = {"id": item["id"], "errors": {"404": [
                    {"code": 404, "message": f"{item['id']} is not found in sandbox {sandbox}"}]}}
            else:
                results[item["id"]] = (self.audience_doc(sandbox, audience) if audiences
                                       else self.definition(sandbox, audience))
        return {"results": results}

    def audiences(self, sandbox: str, *, name: str | None, description: str | None, filters: Sequence[Filter],
                  start: int | None, limit: int | None, sort: str | None) -> dict[str, Any]:
        docs = [self.audience_doc(sandbox, a) for a in self.visible(sandbox).values()]
        if name:
            docs = [d for d in docs if name.lower() in d["name"].lower()]
        if description:
            docs = [d for d in docs if description.lower() in d.get("description", "").lower()]
        docs = [d for d in docs if matches(d, filters)]
        docs, field_name, direction = self._sorted(docs, sort, "name:asc")
        offset, size = self._window(start, None, limit, 20)
        chunk = docs[offset: offset + size]
        total = len(docs)
        page: dict[str, Any] = {"totalCount": total, "totalPages": -(-total // size), "sortField": field_name,
                                "sort": direction, "pageSize": len(chunk), "limit": size, "start": offset}
        links: dict[str, Any] = {}
        if offset + size < total:
            page["next"] = offset + size
            query = f"start={offset + size}&limit={size}"
            if name:
                query += f"&name={name}"
            # Adobe's own example writes the link as "@/audiences?..." (relative to the service):
            # follow _page.next with start= rather than the href.
            links["next"] = {"href": f"@/audiences?{query}"}
        return {"children": chunk, "_page": page, "_links": links}

    def get_audience(self, sandbox: str, audience_id: str) -> dict[str, Any]:
        return self.audience_doc(sandbox, self._get(sandbox, audience_id, "audience entity"))
