"""plan / apply / status / destroy: make Adobe's side match a destination file.

One walk does both plan and apply, so what ``plan`` prints is what ``apply`` does:

    Profile Service base connection -> source connection          (the profiles)
    Kinesis / Event Hubs base connection -> target connection     (where they go)
    dataflow (source -> target) -> its audiences and attributes (JSON Patch) -> enabled

The dataflow is found by ``dataflow_id`` or by its name; when it exists, its connections are the
ones it is wired to, whatever they are named (a destination made in Adobe's UI is adopted so).
Otherwise each entity is found by its name (``property=name==...`` filters) before anything is
created, so a second ``apply`` creates nothing, and a failed run can simply be run again. What
differs from the file is repaired field by field (``Drift``), never by replacing what the file
does not declare.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from .destination import Destination
from .errors import AdobeApiError, ProvisioningError
from .flow_service import (
    EVENT_HUBS_SPEC,
    KINESIS_SPEC,
    PROFILE_DESTINATION_FLOW_SPEC,
    PROFILE_SOURCE_SPEC,
    FlowService,
)
from .segmentation import Segmentation, selector_value

SPEC_VERSION = "1.0"
_LOOK_UP: Any = object()  # Provisioner._ensure: find the entity by name


@dataclass
class Step:
    action: str  # keep | create | update | enable | disable | delete | absent
    what: str  # e.g. "dataflow", "audiences"
    name: str
    detail: str = ""
    id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EntityNames:
    profile_connection: str
    source_connection: str
    target_base_connection: str
    target_connection: str
    flow: str

    @classmethod
    def of(cls, destination: Destination) -> EntityNames:
        name = destination.spec.name
        kind = "Amazon Kinesis" if destination.spec.target_type == "kinesis" else "Azure Event Hubs"
        return cls(f"{name} - Profile Service", f"{name} - profiles", f"{name} - {kind}", f"{name} - target", name)


class Provisioner:
    def __init__(self, destination: Destination, flow_service: FlowService, segmentation: Segmentation,
                 on_step: Callable[[Step], None] | None = None) -> None:
        self.destination = destination
        self.spec = destination.spec
        self.flows = flow_service
        self.segmentation = segmentation
        self.names = EntityNames.of(destination)
        self._on_step = on_step
        self.steps: list[Step] = []

    def _step(self, step: Step) -> Step:
        self.steps.append(step)
        if self._on_step is not None:
            self._on_step(step)
        return step

    @property
    def _target_spec(self) -> str:
        return KINESIS_SPEC if self.spec.target_type == "kinesis" else EVENT_HUBS_SPEC

    # --- plan and apply --------------------------------------------------------------------
    async def reconcile(self, *, apply: bool, update_credentials: bool = False) -> list[Step]:
        """What differs from the file, as steps; with ``apply`` also carried out, in order.
        ``update_credentials``: send the destination's secrets again (Adobe never shows them, so
        a rotated one cannot be seen to differ)."""
        self.steps = []
        audiences = await self._resolve_audiences()  # first: a wrong audience fails before anything is written
        connection_spec = await self.flows.connection_spec(self._target_spec)
        auth_spec = self._auth_spec_name(connection_spec)
        target_params = self._target_params(connection_spec)
        existing_flow = await self._existing_flow()
        wired = await self._wiring(existing_flow) if existing_flow is not None else {}

        profile_id = await self._ensure("connections", self.names.profile_connection, apply, {
            "name": self.names.profile_connection,
            "description": "Profiles exported to the destination (managed by segment-relay provision)",
            "connectionSpec": {"id": PROFILE_SOURCE_SPEC, "version": SPEC_VERSION},
        }, what="profile base connection", filters={"connectionSpec__id": PROFILE_SOURCE_SPEC},
            existing=wired.get("profile base connection", _LOOK_UP))
        source_id = await self._ensure("sourceConnections", self.names.source_connection, apply, {
            "name": self.names.source_connection,
            "baseConnectionId": profile_id,
            "connectionSpec": {"id": PROFILE_SOURCE_SPEC, "version": SPEC_VERSION},
            "data": {"format": "json"},
            "params": {},
        }, what="source connection", depends_on=(profile_id,), filters={"baseConnectionId": str(profile_id)},
            existing=wired.get("source connection", _LOOK_UP))
        target_base_id = await self._ensure("connections", self.names.target_base_connection, apply, {
            "name": self.names.target_base_connection,
            "connectionSpec": {"id": self._target_spec, "version": SPEC_VERSION},
            "auth": {"specName": auth_spec, "params": self._auth_params()},
        }, what=f"{self.spec.target_type} base connection", filters={"connectionSpec__id": self._target_spec},
            detail=f"auth {auth_spec!r}", drift=lambda entity: self._auth_drift(entity, auth_spec, update_credentials),
            existing=wired.get("target base connection", _LOOK_UP))
        target_id = await self._ensure("targetConnections", self.names.target_connection, apply, {
            "name": self.names.target_connection,
            "baseConnectionId": target_base_id,
            "connectionSpec": {"id": self._target_spec, "version": SPEC_VERSION},
            "data": {"format": "json"},
            "params": target_params,
        }, what="target connection", depends_on=(target_base_id,), filters={"baseConnectionId": str(target_base_id)},
            drift=lambda entity: params_drift(entity, target_params), existing=wired.get("target connection", _LOOK_UP))
        flow_id = await self._ensure("flows", self.names.flow, apply, {
            "name": self.names.flow,
            "description": "Audience exports for segment-relay (managed by segment-relay provision)",
            "flowSpec": {"id": PROFILE_DESTINATION_FLOW_SPEC, "version": SPEC_VERSION},
            "sourceConnectionIds": [source_id],
            "targetConnectionIds": [target_id],
            "transformations": [{
                "name": "GeneralTransform",
                "params": {"profileSelectors": {"selectors": []}, "segmentSelectors": {"selectors": []}},
            }],
        }, what="dataflow", depends_on=(source_id, target_id), existing=existing_flow,
            drift=self._flow_name_drift if self.spec.dataflow_id is not None else None)
        # One read serves both: the selector patch re-reads for its etag, and leaves the state alone.
        flow = await self.flows.get("flows", flow_id) if flow_id is not None else None
        # Adobe creates a dataflow enabled. It exports nothing until audiences are mapped, so a
        # flow meant to be disabled is disabled before they are (no backfill ever starts), and
        # one meant to be enabled is enabled after (its backfill starts with the whole selection).
        if not self.spec.enabled:
            await self._state(flow, apply)
        await self._selectors(flow, audiences, apply)
        if self.spec.enabled:
            await self._state(flow, apply)
        return self.steps

    async def _existing_flow(self) -> dict[str, Any] | None:
        """The dataflow this file manages, as read by id: ``dataflow_id``'s (which must exist), or
        the one named ``name``, or None."""
        if self.spec.dataflow_id is not None:
            try:
                return await self.flows.get("flows", self.spec.dataflow_id)
            except ProvisioningError as exc:
                if isinstance(exc, AdobeApiError) and exc.status != 404:
                    raise
                raise ProvisioningError(
                    f"dataflow_id {self.spec.dataflow_id!r} is not a dataflow in sandbox {self.spec.sandbox!r}: "
                    "copy the id from Adobe's UI (Destinations → Browse → the dataflow) or remove dataflow_id"
                ) from None
        found = await self.flows.find_one("flows", self.names.flow)
        return await self.flows.get("flows", str(found["id"])) if found is not None else None

    async def _wiring(self, flow: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        """The connections an existing dataflow is wired to, whatever their names (a dataflow made
        in the UI names them its own way): they are what this file manages from now on."""
        def first(key: str) -> str | None:
            ids = flow.get(key) or []
            return str(ids[0]) if ids else None

        source_id, target_id = first("sourceConnectionIds"), first("targetConnectionIds")
        source = await self.flows.get("sourceConnections", source_id) if source_id else None
        target = await self.flows.get("targetConnections", target_id) if target_id else None
        profile_base = await self.flows.get("connections", str(source["baseConnectionId"])) if source else None
        target_base = await self.flows.get("connections", str(target["baseConnectionId"])) if target else None
        spec_id = ((target_base or {}).get("connectionSpec") or {}).get("id")
        if spec_id is not None and spec_id != self._target_spec:
            raise ProvisioningError(
                f"dataflow {flow.get('name')!r} ({flow.get('id')}) sends to another kind of destination (connection "
                f"spec {spec_id}) than this file's [{self.spec.target_type}] section: fix the section or the dataflow"
            )
        return {"source connection": source, "target connection": target,
                "profile base connection": profile_base, "target base connection": target_base}

    def _flow_name_drift(self, flow: dict[str, Any]) -> Drift:
        """An adopted dataflow is renamed to the file's ``name``."""
        if flow.get("name") == self.names.flow:
            return [], []
        return ([{"op": "replace", "path": "/name", "value": self.names.flow}],
                [f"name: {_shown(flow.get('name'))} -> {_shown(self.names.flow)}"])

    async def _resolve_audiences(self) -> dict[str, dict[str, Any]]:
        """The selector value of each audience (``selector_value``) by the id it is selected by,
        in file order."""
        resolved: dict[str, dict[str, Any]] = {}
        for ref in self.spec.audiences:
            found = await (self.segmentation.by_id(ref.id) if ref.id is not None else self.segmentation.by_name(ref.name or ""))
            value = selector_value(found)
            resolved[value["id"]] = value
        return resolved

    def _auth_spec_name(self, spec: dict[str, Any]) -> str:
        """The name of the auth spec our parameters fill, read from the connection spec (Adobe has
        renamed these; "Amazon Kinesis authentication credentials" became "Aws Kinesis ...")."""
        ours = set(self._auth_params())
        candidates = []
        for auth in spec.get("authSpec") or []:
            schema = auth.get("spec") or {}
            required = set(schema.get("required") or [])
            known = set((schema.get("properties") or {}).keys()) or required
            if required <= ours and ours <= known | required:
                candidates.append((len(required), str(auth.get("name"))))
        if not candidates:
            names = [a.get("name") for a in spec.get("authSpec") or []]
            if self.spec.eventhubs is not None and self.spec.eventhubs.hub_scoped_key:
                raise ProvisioningError(
                    f"hub_scoped_key: the Event Hubs connection spec offers no auth for a hub's own SAS policy "
                    f"(it offers {names}): use a namespace-level policy and set hub_scoped_key = false")
            raise ProvisioningError(
                f"connection spec {self._target_spec} has no auth spec for the parameters {sorted(ours)} "
                f"(it offers {names}): this version of segment-relay does not know this destination's auth"
            )
        return max(candidates)[1]  # the most specific one our parameters satisfy

    def _auth_params(self) -> dict[str, str]:
        d = self.destination
        if self.spec.kinesis is not None:
            k = self.spec.kinesis
            return {"accessKeyId": d.secret(k.access_key_id_env).get_secret_value(),
                    "secretKey": d.secret(k.secret_key_env).get_secret_value(), "region": k.region}
        e = self.spec.eventhubs
        assert e is not None
        params = {"sasKeyName": e.sas_key_name, "sasKey": d.secret(e.sas_key_env).get_secret_value(), "namespace": e.namespace}
        if e.hub_scoped_key:
            params["eventHubName"] = e.hub
        return params

    def _secret_params(self) -> dict[str, str]:
        """The auth parameters read from the environment (param -> variable): never compared
        (Adobe masks them), sent on create and with ``update_credentials``."""
        if self.spec.kinesis is not None:
            return {"accessKeyId": self.spec.kinesis.access_key_id_env, "secretKey": self.spec.kinesis.secret_key_env}
        assert self.spec.eventhubs is not None
        return {"sasKey": self.spec.eventhubs.sas_key_env}

    def _auth_drift(self, connection: dict[str, Any], auth_spec: str, update_credentials: bool) -> Drift:
        """The patch that makes a base connection's auth what the file says: the auth spec, each
        parameter that differs (removed when the file no longer has it), and the secrets only
        when asked to."""
        auth = _object(connection.get("auth"))
        current = _object(auth.get("params"))
        wanted = self._auth_params()
        secrets = self._secret_params()
        ops: list[dict[str, Any]] = []
        changes: list[str] = []
        if auth.get("specName") != auth_spec:
            ops.append(_set(auth, "specName", auth_spec, "/auth"))
            changes.append(f"auth spec: {_shown(auth.get('specName'))} -> {_shown(auth_spec)}")
        for key, value in wanted.items():
            if key in secrets:
                if update_credentials:
                    ops.append(_set(current, key, value, "/auth/params"))
                    changes.append(f"{key}: from ${secrets[key]}")
            elif key not in current or current[key] != value:
                ops.append(_set(current, key, value, "/auth/params"))
                changes.append(f"{key}: {_shown(current.get(key))} -> {_shown(value)}")
        for key in _MANAGED_AUTH_PARAMS[self.spec.target_type] - set(wanted):
            if key in current:  # e.g. eventHubName, once the key is no longer the hub's
                ops.append({"op": "remove", "path": f"/auth/params/{_pointer_token(key)}"})
                changes.append(f"{key}: {_shown(current[key])} -> (unset)")
        return ops, changes

    def _target_params(self, connection_spec: dict[str, Any]) -> dict[str, Any]:
        """The target connection parameters the file declares (the others are left as they are)."""
        params: dict[str, Any]
        if self.spec.kinesis is not None:
            params = {"stream": self.spec.kinesis.stream, "region": self.spec.kinesis.region}
        else:
            assert self.spec.eventhubs is not None
            params = {"eventHubName": self.spec.eventhubs.hub}
        for field in ("include_segment_names", "include_segment_timestamps"):
            wanted = getattr(self.spec, field)
            if wanted is not None:
                params[_toggle_param(connection_spec, field)] = wanted
        return params

    async def _ensure(self, kind: str, name: str, apply: bool, body: dict[str, Any], *, what: str,
                      depends_on: tuple[str | None, ...] = (), filters: dict[str, str] | None = None,
                      drift: Callable[[dict[str, Any]], Drift] | None = None, detail: str = "",
                      existing: Any = _LOOK_UP) -> str | None:
        """The entity's id, created when missing (apply); ``None`` only in a plan, for something
        that would be created. ``existing``: the entity as read by id (or None: there is none),
        or ``_LOOK_UP``: find it by name (and ``filters``), unless a dependency does not exist yet
        (then it cannot either). ``drift(entity)``: the patch that would repair it, and the
        changes in words."""
        read_by_id = existing is not _LOOK_UP
        if not read_by_id:
            existing = None
            if all(dependency is not None for dependency in depends_on):
                existing = await self.flows.find_one(kind, name, **(filters or {}))
        if existing is None:
            if not apply:
                self._step(Step("create", what, name, detail))
                return None
            entity_id = await self.flows.create(kind, body, **(filters or {}))
            self._step(Step("create", what, name, detail, entity_id))
            return entity_id
        entity_id = str(existing["id"])
        name = str(existing.get("name") or name)  # an adopted entity keeps the name it was given
        if kind == "flows":
            self._check_flow_connections(existing, *depends_on)
        if drift is not None:
            # A list may leave fields out: judge the entity as a read by id shows it.
            ops, changes = drift(existing if read_by_id else await self.flows.get(kind, entity_id))
            if ops:
                if apply:
                    await self.flows.patch(kind, entity_id, lambda fresh: drift(fresh)[0])
                self._step(Step("update", what, name, ", ".join(changes), entity_id))
                return entity_id
        self._step(Step("keep", what, name, detail, entity_id))
        return entity_id

    def _check_flow_connections(self, flow: dict[str, Any], *connection_ids: str | None) -> None:
        wired = set(flow.get("sourceConnectionIds") or []) | set(flow.get("targetConnectionIds") or [])
        if not {c for c in connection_ids if c is not None} <= wired:
            raise ProvisioningError(
                f"dataflow {flow.get('name')!r} ({flow.get('id')}) exists but is wired to other connections: "
                "rename this destination's 'name' or run 'segment-relay provision destroy' first"
            )

    async def _selectors(self, flow: dict[str, Any] | None, audiences: dict[str, dict[str, Any]], apply: bool) -> None:
        """``flow`` as read now; None in a plan where it would be created."""
        attributes = list(dict.fromkeys(self.spec.attributes))
        flow_id = str(flow["id"]) if flow is not None else None
        current_audiences, current_attributes = _selected(flow) if flow is not None else ([], [])
        add_a = [a for a in audiences if a not in current_audiences]
        del_a = [a for a in current_audiences if a not in audiences]
        add_p = [p for p in attributes if p not in current_attributes]
        del_p = [p for p in current_attributes if p not in attributes]
        name = self.names.flow
        for what, wanted, added, removed, shown in (
            ("audiences", list(audiences), add_a, del_a, lambda i: f"{audiences[i].get('name') or i} ({i})"),
            ("attributes", attributes, add_p, del_p, str),
        ):
            if added or removed:
                detail = ", ".join([f"+{shown(x)}" for x in added] + [f"-{x}" for x in removed])
                self._step(Step("update", what, name, detail, flow_id))
            else:
                self._step(Step("keep", what, name, f"{len(wanted)} selected", flow_id))
        if apply and flow_id is not None and (add_a or del_a or add_p or del_p):
            await self.flows.patch("flows", flow_id, lambda fresh: selector_patch(fresh, audiences, attributes))

    async def _state(self, flow: dict[str, Any] | None, apply: bool) -> None:
        want = "enabled" if self.spec.enabled else "disabled"
        # None: a plan, for a flow that would be created, and Adobe creates dataflows enabled.
        state = "enabled" if flow is None else str(flow.get("state") or "").lower()
        flow_id = str(flow["id"]) if flow is not None else None
        if state == want:
            self._step(Step("keep", "state", self.names.flow, want, flow_id))
            return
        if apply and flow_id is not None:
            await self.flows.flow_action(flow_id, "enable" if self.spec.enabled else "disable")
        self._step(Step("enable" if self.spec.enabled else "disable", "state", self.names.flow,
                        f"state: {_shown(state or None)} -> {_shown(want)}", flow_id))

    # --- status ----------------------------------------------------------------------------
    async def status(self, runs: int = 5) -> dict[str, Any]:
        flow = await self._existing_flow()
        if flow is None:
            return {"flow": None, "name": self.names.flow, "sandbox": self.spec.sandbox}
        audience_ids, attributes = _selected(flow)
        named = {segment_id: _selector_name(flow, segment_id) for segment_id in audience_ids}
        return {
            "name": self.names.flow,
            "sandbox": self.spec.sandbox,
            "flow": {"id": flow.get("id"), "state": flow.get("state"), "etag": flow.get("etag")},
            "audiences": [{"id": i, "name": n} for i, n in named.items()],
            "attributes": attributes,
            "runs": [_run_summary(run) for run in await self.flows.runs(str(flow["id"]), runs)],
        }

    # --- destroy ---------------------------------------------------------------------------
    async def destroy(self, *, apply: bool) -> list[Step]:
        """Dataflow first, then target, source and base connections (the order Adobe requires)."""
        self.steps = []
        flow = await self._existing_flow()
        wired = await self._wiring(flow) if flow is not None else {}
        await self._delete("flows", "dataflow", self.names.flow, flow, apply)
        for kind, what, key, name, spec in (
            ("targetConnections", "target connection", "target connection", self.names.target_connection, None),
            ("sourceConnections", "source connection", "source connection", self.names.source_connection, None),
            ("connections", f"{self.spec.target_type} base connection", "target base connection",
             self.names.target_base_connection, self._target_spec),
            ("connections", "profile base connection", "profile base connection", self.names.profile_connection,
             PROFILE_SOURCE_SPEC),
        ):
            if key in wired:  # what the dataflow was wired to, whatever its name
                entity = wired[key]
            else:
                entity = await self.flows.find_one(kind, name, **({"connectionSpec__id": spec} if spec else {}))
            await self._delete(kind, what, name if entity is None else str(entity.get("name") or name), entity, apply)
        return self.steps

    async def _delete(self, kind: str, what: str, name: str, entity: dict[str, Any] | None, apply: bool) -> None:
        if entity is None:
            self._step(Step("absent", what, name))
            return
        if apply:
            await self.flows.delete(kind, str(entity["id"]))
        self._step(Step("delete", what, name, "", str(entity["id"])))


def _general_transform(flow: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    transformations = flow.get("transformations") or []
    for index, transformation in enumerate(transformations):
        if transformation.get("name") == "GeneralTransform":
            return index, transformation.get("params") or {}
    raise ProvisioningError(f"dataflow {flow.get('id')} has no GeneralTransform transformation to hold selectors")


Drift = tuple[list[dict[str, Any]], list[str]]  # JSON Patch operations, and the changes they make in words

# The auth parameters this tool manages, per target: one the file no longer has is removed.
_MANAGED_AUTH_PARAMS = {"kinesis": frozenset({"accessKeyId", "secretKey", "region"}),
                        "eventhubs": frozenset({"sasKeyName", "sasKey", "namespace", "eventHubName"})}


def params_drift(connection: dict[str, Any], declared: dict[str, Any]) -> Drift:
    """The narrowest patch that gives a connection's ``params`` the declared values: one operation
    per parameter that differs; parameters the file does not declare (a toggle set in Adobe's UI)
    are left alone."""
    current = connection.get("params")
    if not isinstance(current, dict):
        return ([{"op": "add", "path": "/params", "value": declared}],
                [f"{key}: (unset) -> {_shown(value)}" for key, value in declared.items()])
    ops: list[dict[str, Any]] = []
    changes: list[str] = []
    for key, value in declared.items():
        if key in current and current[key] == value:
            continue
        ops.append(_set(current, key, value, "/params"))
        changes.append(f"{key}: {_shown(current.get(key))} -> {_shown(value)}")
    return ops, changes


def _toggle_param(connection_spec: dict[str, Any], field: str) -> str:
    """The target parameter behind one of the UI's export toggles. Adobe does not document its
    name, so it is read from the connection spec's target parameters (e.g. includeSegmentNames
    for include_segment_names)."""
    properties = ((connection_spec.get("targetSpec") or {}).get("spec") or {}).get("properties") or {}
    wanted = field.replace("_", "").lower()
    for name in properties:
        if name.lower() == wanted:
            return str(name)
    raise ProvisioningError(
        f"{field}: the connection spec {connection_spec.get('id')} has no such target parameter (it has "
        f"{sorted(properties)}): leave {field} out of the destination file and set the toggle in Adobe's UI"
    )


def _set(current: dict[str, Any], key: str, value: Any, parent: str) -> dict[str, Any]:
    """The JSON Patch operation that gives ``parent``/``key`` this value: replace when it is there."""
    return {"op": "replace" if key in current else "add", "path": f"{parent}/{_pointer_token(key)}", "value": value}


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _pointer_token(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


def _shown(value: Any) -> str:
    """A parameter value in a plan: JSON, so that "true" and true differ."""
    return "(unset)" if value is None else orjson.dumps(value).decode()


def _selected(flow: dict[str, Any]) -> tuple[list[str], list[str]]:
    _, params = _general_transform(flow)
    audiences = [str((s.get("value") or {}).get("id")) for s in (params.get("segmentSelectors") or {}).get("selectors") or []]
    attributes = [str((s.get("value") or {}).get("path")) for s in (params.get("profileSelectors") or {}).get("selectors") or []]
    return audiences, attributes


def _selector_name(flow: dict[str, Any], segment_id: str) -> str | None:
    _, params = _general_transform(flow)
    for selector in (params.get("segmentSelectors") or {}).get("selectors") or []:
        value = selector.get("value") or {}
        if value.get("id") == segment_id:
            return value.get("name")
    return None


def selector_patch(flow: dict[str, Any], audiences: dict[str, dict[str, Any]], attributes: list[str]) -> list[dict[str, Any]]:
    """JSON Patch operations that make the flow's selectors equal the wanted ones. Removals go
    first and from the highest index down (each removal shifts the indexes after it); additions
    append with "/-"."""
    index, params = _general_transform(flow)
    ops: list[dict[str, Any]] = []
    for key, wanted, value_of, selector in (
        ("segmentSelectors", list(audiences), lambda s: (s.get("value") or {}).get("id"),
         lambda i: {"type": "PLATFORM_SEGMENT", "value": dict(audiences[i])}),
        ("profileSelectors", attributes, lambda s: (s.get("value") or {}).get("path"),
         lambda p: {"type": "JSON_PATH", "value": {"operator": "EXISTS", "path": p}}),
    ):
        base = f"/transformations/{index}/params/{key}"
        if key not in params:
            ops.append({"op": "add", "path": base, "value": {"selectors": []}})
        current = (params.get(key) or {}).get("selectors") or []
        present = [value_of(s) for s in current]
        for position in reversed(range(len(current))):
            if present[position] not in wanted:
                ops.append({"op": "remove", "path": f"{base}/selectors/{position}"})
        for item in wanted:
            if item not in present:
                ops.append({"op": "add", "path": f"{base}/selectors/-", "value": selector(item)})
    return ops


def _run_summary(run: dict[str, Any]) -> dict[str, Any]:
    metrics = run.get("metrics") or {}
    records = metrics.get("recordSummary") or {}
    return {
        "id": run.get("id"),
        "status": (metrics.get("statusSummary") or {}).get("status"),
        "started": utc_time((metrics.get("durationSummary") or {}).get("startedAtUTC")),
        "input": records.get("inputRecordCount"),
        "output": records.get("outputRecordCount"),
        "failed": records.get("failedRecordCount"),
    }


def utc_time(value: Any) -> str | None:
    """A run time as ISO 8601 UTC (2026-12-04T21:00:00Z): Adobe answers epoch milliseconds."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value / 1000, tz=UTC)
        return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return None if value is None else str(value)  # already words: shown as they are
