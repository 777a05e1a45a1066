"""The fake Adobe platform (segment_relay.testing.platform) against Adobe's own OpenAPI specs and
the researched behaviour in notes/adobe-platform.md: IMS, gateway checks, Flow Service CRUD,
etags, JSON Patch, filters, paging, runs, Segmentation, permissions, faults and secrets.

Spec validation: every request the tests send and every response the fake gives is validated with
openapi-core against Adobe's specs (destinations.yaml, flow-service.yaml, segmentation.yaml, from
``$SEGMENT_RELAY_ADOBE_SPECS`` or /work/shared/reference). Where a spec contradicts itself or the
researched behaviour, a named ``Overlay`` below changes exactly that part and says why; everything
else must match the spec as published.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
import pytest

from segment_relay.testing.platform import (
    DEFAULT_AUDIENCES,
    DESTINATION_FLOW_SPEC_ID,
    EVENT_HUBS_AUTH_SPEC,
    EVENT_HUBS_SAS_AUTH_SPEC,
    EVENT_HUBS_SPEC_ID,
    KINESIS_AUTH_SPEC,
    KINESIS_SPEC_ID,
    MASK,
    PROFILE_SOURCE_SPEC_ID,
    Audience,
    FakePlatform,
    RecordedRequest,
)
from segment_relay.testing.platform.process import start_platform_process
from segment_relay.testing.processes import running

FS = "/data/foundation/flowservice"
UPS = "/data/core/ups"
A1, A2, A3 = (a.id for a in DEFAULT_AUDIENCES[:3])
SAS_KEY = "sas-key-that-must-never-leak"
AWS_SECRET = "aws-secret-that-must-never-leak"


# ----------------------------------------------------------------------------------------------
# a tiny client
# ----------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any

    @property
    def items(self) -> list[dict[str, Any]]:
        return self.body["items"]


class Api:
    """Calls the fake with every header a correct client sends (tests override per call)."""

    def __init__(self, fake: FakePlatform, session: aiohttp.ClientSession, sandbox: str = "prod") -> None:
        self.fake = fake
        self.session = session
        self.sandbox = sandbox
        self.token = fake.issue_token()

    def headers(self, **extra: str | None) -> dict[str, str]:
        headers = {"Authorization": f"Bearer {self.token}", "x-api-key": self.fake.credentials.client_id,
                   "x-gw-ims-org-id": self.fake.credentials.org_id, "x-sandbox-name": self.sandbox}
        for key, value in extra.items():
            name = key.replace("_", "-")
            headers = {k: v for k, v in headers.items() if k.lower() != name.lower()}
            if value is not None:
                headers[name] = value
        return headers

    async def call(self, method: str, path: str, *, json: Any = None, params: Any = None,
                   headers: dict[str, str] | None = None, **extra: str | None) -> Reply:
        url = path if path.startswith("http") else self.fake.url + path
        async with self.session.request(method, url, json=json, params=params,
                                        headers=headers if headers is not None else self.headers(**extra)) as r:
            raw = await r.read()
            return Reply(r.status, orjson.loads(raw) if raw else None, r.headers)

    async def get(self, path: str, **kw: Any) -> Reply:
        return await self.call("GET", path, **kw)

    async def post(self, path: str, json: Any = None, **kw: Any) -> Reply:
        return await self.call("POST", path, json=json, **kw)

    async def patch(self, path: str, json: Any, etag: str | None, **kw: Any) -> Reply:
        return await self.call("PATCH", path, json=json, if_match=etag, **kw)

    async def delete(self, path: str, **kw: Any) -> Reply:
        return await self.call("DELETE", path, **kw)



@pytest.fixture
async def api(fake: FakePlatform) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as session:
        yield Api(fake, session)


@dataclass
class Destination:
    profile_base: str
    source: str
    base: str
    target: str
    flow: str
    etag: str


async def provision(api: Api, kind: str = "eventhubs", *, name: str = "relay", audiences: tuple[str, ...] = (A1, A2),
                    attributes: tuple[str, ...] = ("person.name.lastName", "personalEmail.address"),
                    target_params: dict[str, Any] | None = None, namespace: str = "127.0.0.1:5673") -> Destination:
    """The streaming-destination tutorial, done right: read the auth spec name, one params object,
    baseConnectionId, quoted etag on PATCH."""
    spec_id = EVENT_HUBS_SPEC_ID if kind == "eventhubs" else KINESIS_SPEC_ID
    spec = (await api.get(f"{FS}/connectionSpecs/{spec_id}")).items[0]
    auth_name = spec["authSpec"][0]["name"]
    profile = await api.post(f"{FS}/connections", {
        "name": f"{name} profile", "connectionSpec": {"id": PROFILE_SOURCE_SPEC_ID, "version": "1.0"}})
    assert profile.status == 201, profile.body
    source = await api.post(f"{FS}/sourceConnections", {
        "name": f"{name} source", "baseConnectionId": profile.body["id"],
        "connectionSpec": {"id": PROFILE_SOURCE_SPEC_ID, "version": "1.0"}, "data": {"format": "json"}, "params": {}})
    assert source.status == 201, source.body
    if kind == "eventhubs":
        params: dict[str, Any] = {"sasKeyName": "RootManageSharedAccessKey", "sasKey": SAS_KEY, "namespace": namespace}
        target_params = target_params or {"eventHubName": "exports"}
    else:
        params = {"accessKeyId": "AKIAFAKEFAKEFAKE", "secretKey": AWS_SECRET, "region": "us-east-1"}
        target_params = target_params or {"stream": "exports", "region": "us-east-1"}
    base = await api.post(f"{FS}/connections", {
        "name": f"{name} account", "connectionSpec": {"id": spec_id, "version": "1.0"},
        "auth": {"specName": auth_name, "params": params}})
    assert base.status == 201, base.body
    target = await api.post(f"{FS}/targetConnections", {
        "name": f"{name} target", "baseConnectionId": base.body["id"],
        "connectionSpec": {"id": spec_id, "version": "1.0"}, "data": {"format": "json"}, "params": target_params})
    assert target.status == 201, target.body
    flow = await api.post(f"{FS}/flows", {
        "name": name, "description": "segment-relay export",
        "flowSpec": {"id": DESTINATION_FLOW_SPEC_ID, "version": "1.0"},
        "sourceConnectionIds": [source.body["id"]], "targetConnectionIds": [target.body["id"]],
        "transformations": [{"name": "GeneralTransform", "params": {
            "profileSelectors": {"selectors": []}, "segmentSelectors": {"selectors": []}}}]})
    assert flow.status == 201, flow.body
    etag = flow.body["etag"]
    operations = [{"op": "add", "path": "/transformations/0/params/segmentSelectors/selectors/-",
                   "value": {"type": "PLATFORM_SEGMENT", "value": {"id": a}}} for a in audiences]
    operations += [{"op": "add", "path": "/transformations/0/params/profileSelectors/selectors/-",
                    "value": {"type": "JSON_PATH", "value": {"operator": "EXISTS", "path": p}}} for p in attributes]
    if operations:
        patched = await api.patch(f"{FS}/flows/{flow.body['id']}", operations, etag)
        assert patched.status == 200, patched.body
        etag = patched.body["etag"]
    return Destination(profile.body["id"], source.body["id"], base.body["id"], target.body["id"], flow.body["id"], etag)


def flow_error(reply: Reply, status: int) -> str:
    """Assert the Flow Service error shape; return its message."""
    assert reply.status == status, (reply.status, reply.body)
    body = reply.body
    assert body["status"] == status and body["type"].endswith(f"-{status}") and body["title"]
    assert body["report"]["request-id"] == reply.headers["x-request-id"]
    assert body["errorMessage"] == body["report"]["detailed-message"]
    return str(body["errorMessage"])


def gateway_error(reply: Reply, status: int, code: str) -> str:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.body["error_code"] == code, reply.body
    return str(reply.body["message"])


# ----------------------------------------------------------------------------------------------
# Adobe's OpenAPI specs, with named corrections
# ----------------------------------------------------------------------------------------------

SPEC_NAMES = ("destinations", "flow-service", "segmentation")


def _spec_dir() -> Path:
    """$SEGMENT_RELAY_ADOBE_SPECS, else ../shared/reference beside the checkout (as CI lays it
    out), else this machine's /work/shared/reference."""
    if os.environ.get("SEGMENT_RELAY_ADOBE_SPECS"):
        return Path(os.environ["SEGMENT_RELAY_ADOBE_SPECS"])
    for candidate in (Path(__file__).resolve().parents[2] / "shared" / "reference", Path("/work/shared/reference")):
        if all((candidate / f"{name}.yaml").exists() for name in SPEC_NAMES):
            return candidate
    return Path("/work/shared/reference")


SPEC_DIR = _spec_dir()
SPECS = all((SPEC_DIR / f"{name}.yaml").exists() for name in SPEC_NAMES)
needs_specs = pytest.mark.skipif(not SPECS, reason=f"Adobe's OpenAPI specs are not in {SPEC_DIR} "
                                                   "(set SEGMENT_RELAY_ADOBE_SPECS)")


@dataclass(frozen=True)
class Overlay:
    spec: str
    why: str
    apply: Callable[[dict[str, Any]], None]


def _stringify_keys(node: Any) -> Any:
    # segmentation.yaml writes response codes as YAML integers (200:), which OpenAPI forbids
    if isinstance(node, dict):
        return {str(k): _stringify_keys(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_stringify_keys(v) for v in node]
    return node


def _schemas(spec: dict[str, Any]) -> dict[str, Any]:
    return spec["components"]["schemas"]


def _op(spec: dict[str, Any], path: str, method: str) -> dict[str, Any]:
    return spec["paths"][path][method]


def _json_schema(response_or_body: dict[str, Any]) -> dict[str, Any]:
    return response_or_body["content"]["application/json"]


def _set_servers(url: str) -> Callable[[dict[str, Any]], None]:
    def apply(spec: dict[str, Any]) -> None:
        spec["servers"] = [{"url": url}]
    return apply


def _fix_string_objects(spec: dict[str, Any]) -> None:
    """Schemas written ``type: string`` with ``properties`` are objects (inheritedAttributes...)."""
    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "properties" in node:
                node["type"] = "object"
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(spec["components"])


_CONNECTION_REF = {"type": "object", "required": ["id", "version"],
                   "properties": {"id": {"type": "string"}, "version": {"type": "string"}}}
_STREAMING_AUTH = {"type": "object", "required": ["specName", "params"],
                   "properties": {"specName": {"type": "string"}, "params": {"type": "object"}}}


def _destinations_streaming_connections(spec: dict[str, Any]) -> None:
    schemas = _schemas(spec)
    schemas["Fake_Streaming_Base_Connection_Request"] = {
        "type": "object", "required": ["name", "connectionSpec"],
        "properties": {"name": {"type": "string"}, "description": {"type": "string"},
                       "connectionSpec": _CONNECTION_REF, "auth": _STREAMING_AUTH}}
    schemas["Fake_Streaming_Target_Connection_Request"] = {
        "type": "object", "required": ["name", "baseConnectionId", "connectionSpec", "data", "params"],
        "properties": {"name": {"type": "string"}, "baseConnectionId": {"type": "string"},
                       "connectionSpec": _CONNECTION_REF, "data": {"type": "object"}, "params": {"type": "object"}}}
    _json_schema(_op(spec, "/connections", "post")["requestBody"])["schema"] = {
        "$ref": "#/components/schemas/Fake_Streaming_Base_Connection_Request"}
    _json_schema(_op(spec, "/targetConnections", "post")["requestBody"])["schema"] = {
        "$ref": "#/components/schemas/Fake_Streaming_Target_Connection_Request"}
    # the profile base connection carries no auth; streaming ones carry their own auth specs
    item = schemas["ConnectionItem"]
    item["required"] = [r for r in item["required"] if r != "auth"]
    item["properties"]["auth"] = _STREAMING_AUTH
    target = schemas["TargetConnectionItem"]
    target["properties"]["params"] = {"type": "object"}


def _inherited_base_connection(spec: dict[str, Any]) -> None:
    for item in ("SourceConnectionItem", "TargetConnectionItem"):
        _schemas(spec)[item]["properties"]["inheritedAttributes"] = {"type": "object", "properties": {
            "baseConnection": {"type": "object", "required": ["id", "connectionSpec"],
                               "properties": {"id": {"type": "string"}, "connectionSpec": _CONNECTION_REF}}}}


def _destinations_lists_and_lookups(spec: dict[str, Any]) -> None:
    for path, item in (("/connections", "ConnectionItem"), ("/sourceConnections", "SourceConnectionItem"),
                       ("/targetConnections", "TargetConnectionItem")):
        listing = {"type": "object", "properties": {
            "items": {"type": "array", "items": {"$ref": f"#/components/schemas/{item}"}},
            "_links": {"type": "object"}, "count": {"type": "integer"}}}
        _json_schema(_op(spec, path, "get")["responses"]["200"])["schema"] = listing
        _json_schema(_op(spec, f"{path}/{{id}}", "get")["responses"]["200"])["schema"] = listing


def _destinations_streaming_flows(spec: dict[str, Any]) -> None:
    schemas = _schemas(spec)
    streaming = {"$ref": "#/components/schemas/Streaming_Flow"}
    _json_schema(_op(spec, "/flows", "get")["responses"]["200"])["schema"] = streaming
    _json_schema(_op(spec, "/flows/{id}", "get")["responses"]["200"])["schema"] = streaming
    schemas["Streaming_Flow"]["properties"]["_links"] = {"type": "object"}
    schemas["StreamingTransformations"] = {"type": "object", "required": ["transformations"], "properties": {
        "transformations": {"type": "array", "items": {"$ref": "#/components/schemas/Fake_Streaming_Transformation"}}}}
    schemas["Fake_Streaming_Transformation"] = {
        "type": "object", "required": ["name", "params"], "properties": {
            "name": {"type": "string", "enum": ["GeneralTransform"]},
            "params": {"type": "object", "properties": {
                "segmentSelectors": {"type": "object", "properties": {"selectors": {
                    "type": "array", "items": {"$ref": "#/components/schemas/Fake_Streaming_Segment_Selector"}}}},
                "profileSelectors": {"type": "object", "properties": {"selectors": {
                    "type": "array", "items": {"$ref": "#/components/schemas/BatchProfileSelector"}}}}}}}}
    schemas["Fake_Streaming_Segment_Selector"] = {
        "type": "object", "required": ["type", "value"], "properties": {
            "type": {"type": "string", "enum": ["PLATFORM_SEGMENT"]},
            "value": {"allOf": [{"$ref": "#/components/schemas/BaseSegmentSelectorValue"},
                                {"type": "object", "required": ["id"]}]}}}
    request = schemas["Create_Streaming_Destination_Flow_Request"]
    request["properties"]["transformations"] = {
        "type": "array", "items": {"$ref": "#/components/schemas/Fake_Streaming_Transformation"}}
    _json_schema(_op(spec, "/flows", "post")["requestBody"])["schema"] = {
        "$ref": "#/components/schemas/Create_Streaming_Destination_Flow_Request"}
    inherited = schemas["BaseFlowItem"]["properties"]["inheritedAttributes"]["properties"]
    for key in ("sourceConnections", "targetConnections"):
        inherited[key] = {"type": "array", "items": {"type": "object", "required": ["id", "connectionSpec"],
                                                      "properties": {"id": {"type": "string"},
                                                                     "connectionSpec": _CONNECTION_REF}}}


def _json_patch_items(spec: dict[str, Any]) -> None:
    operation = {"type": "object", "required": ["op", "path"], "properties": {
        "op": {"type": "string", "enum": ["add", "replace", "remove"]}, "path": {"type": "string"}, "value": {}}}
    _schemas(spec)["Fake_Json_Patch"] = {"type": "array", "minItems": 1, "items": operation}
    for path in ("/flows/{id}", "/connections/{id}"):
        _json_schema(_op(spec, path, "patch")["requestBody"])["schema"] = {"$ref": "#/components/schemas/Fake_Json_Patch"}


def _flow_service_patch_and_delete(spec: dict[str, Any]) -> None:
    schemas = _schemas(spec)
    schemas["PatchInstruction"] = {"type": "object", "required": ["op", "path"], "properties": {
        "op": {"type": "string", "pattern": "^(?i:add|replace|remove)$"}, "path": {"type": "string"}, "value": {}}}
    _json_schema(_op(spec, "/connections/{BASE_CONNECTION_ID}/", "patch")["requestBody"])["schema"] = {
        "type": "array", "items": {"$ref": "#/components/schemas/PatchInstruction"}}
    for item in spec["paths"].values():
        if "delete" in item:
            item["delete"]["responses"]["202"] = {"description": "accepted (Destinations spec)"}


def _flow_service_action(spec: dict[str, Any]) -> None:
    for parameter in _op(spec, "/flows/{FLOW_ID}/action", "post")["parameters"]:
        if parameter.get("name") == "op":
            parameter["schema"] = {"type": "string", "pattern": "^(?i:enable|disable)$"}
        if parameter.get("name") == "subOp":
            parameter["required"] = False


def _segmentation_definitions_list(spec: dict[str, Any]) -> None:
    _json_schema(_op(spec, "/segment/definitions", "get")["responses"]["200"])["schema"] = {
        "type": "object", "required": ["segments", "page", "link"], "properties": {
            "segments": {"type": "array", "items": {"$ref": "#/components/schemas/SegmentDefinition"}},
            "page": {"type": "object", "required": ["totalCount", "totalPages", "pageSize", "limit"], "properties": {
                "totalCount": {"type": "integer"}, "totalPages": {"type": "integer"}, "sortField": {"type": "string"},
                "sort": {"type": "string"}, "pageSize": {"type": "integer"}, "limit": {"type": "integer"}}},
            "link": {"type": "object", "properties": {"next": {"type": "string"}}}}}


def _segmentation_audience_oneof(spec: dict[str, Any]) -> None:
    # Every field of both audience kinds is optional, so a platform audience matches both oneOf
    # branches; the fake serves platform audiences only.
    schema = _json_schema(_op(spec, "/audiences", "get")["responses"]["200"])["schema"]
    _schemas(spec)["AudiencesList"]["properties"]["children"]["items"] = {
        "$ref": "#/components/schemas/PlatformGeneratedAudience"}
    assert schema == {"$ref": "#/components/schemas/AudiencesList"}


OVERLAYS = (
    Overlay("destinations", "served from the fake, not platform.adobe.io", _set_servers("https://platform.adobe.io/data/foundation/flowservice")),
    Overlay("flow-service", "its server URL has no scheme", _set_servers("https://platform.adobe.io/data/foundation/flowservice")),
    Overlay("segmentation", "its server URL has no scheme", _set_servers("https://platform.adobe.io/data/core/ups")),
    Overlay("destinations", "inheritedAttributes/connectionSpec are written `type: string` but carry properties "
            "(objects in every example)", _fix_string_objects),
    Overlay("destinations", "the request/response schemas only cover S3 and SFTP; the streaming bodies are the "
            "tutorial's (notes §2.3): auth {specName, params}, target params, no auth on the profile connection",
            _destinations_streaming_connections),
    Overlay("destinations", "inheritedAttributes.baseConnection of source/target connections is typed as the id "
            "string; the spec's own examples (SourceConnectionsResponseUPS...) show {id, connectionSpec}",
            _inherited_base_connection),
    Overlay("destinations", "list responses are typed as one item; Flow Service wraps lists and lookups by id in "
            "{items} (notes §2.3, §2.5; flow-service.yaml's ConnectionListResponse)", _destinations_lists_and_lookups),
    Overlay("destinations", "GET /flows is oneOf Batch/Streaming (both match a streaming flow); "
            "Create_Streaming_Destination_Flow_Request.transformations is a string 'TBD'; inheritedAttributes "
            "source/targetConnections are arrays in every example", _destinations_streaming_flows),
    Overlay("destinations", "PATCH bodies: PatchConnectionItem is one object, not the RFC 6902 array; "
            "PatchFlowItem requires value for remove and only allows batch values", _json_patch_items),
    Overlay("flow-service", "PatchInstruction: op in upper case (RFC 6902 and every tutorial use lower case), value "
            "required even for remove and typed as an object; the /connections/{id}/ body is one object, not the "
            "RFC 6902 array; DELETE answers 204 here but 202 in the Destinations spec (the fake: 202, or 204 "
            "with delete_status=204)", _flow_service_patch_and_delete),
    Overlay("flow-service", "op is documented lower case in the tutorials (op=enable) and subOp is not sent "
            "(notes §2.3)", _flow_service_action),
    Overlay("segmentation", "GET /segment/definitions is typed as one definition; it is a page "
            "{segments, page, link} (notes §4.1)", _segmentation_definitions_list),
    Overlay("segmentation", "children oneOf Platform/External matches both for a platform audience",
            _segmentation_audience_oneof),
)


@functools.cache
def openapi(name: str) -> Any:
    import yaml
    from openapi_core import OpenAPI

    path = SPEC_DIR / f"{name}.yaml"
    spec = _stringify_keys(yaml.safe_load(path.read_text()))
    for overlay in OVERLAYS:
        if overlay.spec == name:
            overlay.apply(spec)
    return OpenAPI.from_dict(copy.deepcopy(spec))


def _spec_for(method: str, path: str) -> str | None:
    """Which spec documents this call (None: no published spec, i.e. IMS)."""
    if path.startswith(UPS + "/"):
        return "segmentation"
    if not path.startswith(FS + "/"):
        return None
    inner = path[len(FS):]
    # the Destinations spec lacks these; the Sources spec (same service) has them
    if (re.match(r"^/(connectionSpecs|flowSpecs)(/|$)|^/flows/[^/]+/action$|^/runs/[^/]+$|^/connections/[^/]+/$", inner)
            or (method == "PATCH" and re.match(r"^/(source|target)Connections/[^/]+$", inner))):
        return "flow-service"
    return "destinations"


class _Request:
    def __init__(self, record: RecordedRequest) -> None:
        from openapi_core.datatypes import RequestParameters
        from werkzeug.datastructures import Headers, ImmutableMultiDict

        self.host_url = "https://platform.adobe.io"
        self.path = record.path
        self.method = record.method.lower()
        self.parameters = RequestParameters(query=ImmutableMultiDict(list(record.query)),
                                            header=Headers(list(record.headers.items())),
                                            cookie=ImmutableMultiDict())
        self.body = orjson.dumps(record.body) if record.body is not None else None
        self.content_type = (record.header("Content-Type") or "").lower()


class _Response:
    def __init__(self, record: RecordedRequest) -> None:
        from werkzeug.datastructures import Headers

        self.status_code = record.status
        self.headers = Headers(list(record.response_headers.items()))
        self.content_type = record.response_headers.get("Content-Type", "application/json").lower()
        self.data = orjson.dumps(record.response) if record.response is not None else b""


def validate_against_specs(records: list[RecordedRequest]) -> dict[str, int]:
    """Validate each exchange's request and response; returns how many were checked per spec.

    Statuses a spec does not list for an operation (a 409, an injected 429...) are checked against
    the error shape of their endpoint family instead."""
    from openapi_core.templating.media_types.exceptions import MediaTypeNotFound
    from openapi_core.templating.paths.exceptions import OperationNotFound, PathNotFound
    from openapi_core.templating.responses.exceptions import ResponseNotFound
    from openapi_core.validation.response.exceptions import DataValidationError

    checked: dict[str, int] = {}
    failures: list[str] = []
    for record in records:
        name = _spec_for(record.method, record.path)
        if name is None:
            continue
        api = openapi(name)
        request, response = _Request(record), _Response(record)
        where = f"{record.method} {record.path}?{record.query} -> {record.status} ({name})"
        try:
            if record.status < 400:
                api.validate_request(request)
            try:
                api.validate_response(request, response)
            except ResponseNotFound:
                assert record.status >= 400, f"{record.status} is not a documented status"
                _check_error_shape(record)
            except DataValidationError as error:
                # Many error responses are documented with `content: {}` (no body described): the body
                # is then checked against the family's error shape instead.
                if not (record.status >= 400 and isinstance(error.__cause__, MediaTypeNotFound)
                        and "Valid mimetypes: []" in str(error.__cause__)):
                    raise
                _check_error_shape(record)
        except (PathNotFound, OperationNotFound) as error:
            if record.status not in (404, 405):  # else: a route Adobe does not have either
                failures.append(f"{where}: {type(error).__name__}: {error}")
            else:
                _check_error_shape(record)
        except Exception as error:  # noqa: BLE001 - collect every drift, report them together
            cause = error.__cause__ or error
            failures.append(f"{where}: {type(error).__name__}: {str(cause)[:600]}")
        checked[name] = checked.get(name, 0) + 1
    assert not failures, "the fake drifted from Adobe's specs:\n" + "\n".join(failures)
    return checked


def _check_error_shape(record: RecordedRequest) -> None:
    body = record.response
    if "error_code" in body:
        assert set(body) == {"error_code", "message"}
    elif record.path.startswith(UPS):
        assert body["status"] == record.status and str(record.status) in body["errors"] and body["requestId"]
    else:
        assert body["status"] == record.status and body["report"]["request-id"] == record.request_id


# ----------------------------------------------------------------------------------------------
# the whole client journey, validated against the specs
# ----------------------------------------------------------------------------------------------


@needs_specs
async def test_a_full_provisioning_journey_matches_adobes_openapi_specs(fake: FakePlatform, api: Api) -> None:
    specs = await api.get(f"{FS}/connectionSpecs", params={"property": "name==Amazon Kinesis,Azure Event Hubs"})
    assert sorted(s["id"] for s in specs.items) == sorted((KINESIS_SPEC_ID, EVENT_HUBS_SPEC_ID))
    assert (await api.get(f"{FS}/flowSpecs/{DESTINATION_FLOW_SPEC_ID}")).status == 200
    definitions = await api.get(f"{UPS}/segment/definitions", params={"limit": "3"})
    assert definitions.status == 200 and len(definitions.body["segments"]) == 3
    assert (await api.get(f"{UPS}/segment/definitions/{A1}")).status == 200
    assert (await api.post(f"{UPS}/segment/definitions/bulk-get", {"ids": [{"id": A1}, {"id": A2}]})).status == 207
    assert (await api.get(f"{UPS}/audiences", params={"name": "cart", "limit": "2"})).status == 200
    assert (await api.get(f"{UPS}/audiences/{A1}")).status == 200

    eventhubs = await provision(api, "eventhubs", name="eh")
    kinesis = await provision(api, "kinesis", name="kin", audiences=(A3,))
    for destination in (eventhubs, kinesis):
        for kind, entity in (("connections", destination.base), ("sourceConnections", destination.source),
                             ("targetConnections", destination.target), ("flows", destination.flow)):
            assert (await api.get(f"{FS}/{kind}/{entity}")).status == 200
    for kind in ("connections", "sourceConnections", "targetConnections", "flows"):
        listed = await api.get(f"{FS}/{kind}", params={"limit": "1"})
        assert listed.status == 200 and len(listed.items) == 1 and listed.body["_links"]["next"]["href"]
    flows = await api.get(f"{FS}/flows", params={"property": "inheritedAttributes.properties.isDestinationFlow==true"})
    assert len(flows.items) == 2
    patched = await api.patch(f"{FS}/connections/{eventhubs.base}", [
        {"op": "replace", "path": "/auth/params/sasKey", "value": "rotated-" + SAS_KEY}],
        (await api.get(f"{FS}/connections/{eventhubs.base}")).items[0]["etag"])
    assert patched.status == 200
    assert (await api.post(f"{FS}/flows/{eventhubs.flow}/action", params={"op": "disable"})).status == 200
    assert (await api.post(f"{FS}/flows/{eventhubs.flow}/action", params={"op": "ENABLE"})).status == 200
    fake.advance_clock(7200)
    runs = await api.get(f"{FS}/runs", params={"property": f"flowId=={eventhubs.flow}"})
    assert runs.status == 200 and {r["metrics"]["statusSummary"]["status"] for r in runs.items} >= {"Success", "Processing"}
    assert (await api.get(f"{FS}/runs/{runs.items[0]['id']}")).status == 200
    # some errors, which must have the documented shapes too
    assert (await api.patch(f"{FS}/flows/{eventhubs.flow}", [{"op": "replace", "path": "/name", "value": "x"}],
                            "\"stale\"")).status == 412
    assert (await api.get(f"{FS}/flows/00000000-0000-0000-0000-000000000000")).status == 404
    assert (await api.delete(f"{FS}/connections/{eventhubs.base}")).status == 409
    assert (await api.get(f"{UPS}/segment/definitions/nope")).status == 404
    assert (await api.get(f"{FS}/flows", authorization="Bearer nope")).status == 401
    for destination in (eventhubs, kinesis):
        for kind, entity in (("flows", destination.flow), ("targetConnections", destination.target),
                             ("sourceConnections", destination.source), ("connections", destination.base),
                             ("connections", destination.profile_base)):
            assert (await api.delete(f"{FS}/{kind}/{entity}")).status == 202
            if kind == "flows":
                api.fake.advance_clock(1)  # marked for deletion; gone a moment later
    assert (await api.get(f"{FS}/flows")).items == []

    checked = validate_against_specs(fake.requests)
    assert checked["destinations"] >= 40 and checked["flow-service"] >= 6 and checked["segmentation"] >= 6, checked


@needs_specs
async def test_the_spec_check_is_not_vacuous(fake: FakePlatform, api: Api) -> None:
    destination = await provision(api, "eventhubs")
    await api.get(f"{FS}/flows/{destination.flow}")
    record = fake.requests[-1]
    validate_against_specs([record])
    tampered = copy.deepcopy(record.response)
    tampered["items"][0]["state"] = "paused"  # not in the spec's enum
    with pytest.raises(AssertionError, match="drifted"):
        validate_against_specs([RecordedRequest(**{**record.__dict__, "response": tampered})])
    missing = copy.deepcopy(record.response)
    del missing["items"][0]["sandboxName"]  # required by BaseFlowItem
    with pytest.raises(AssertionError, match="drifted"):
        validate_against_specs([RecordedRequest(**{**record.__dict__, "response": missing})])


# ----------------------------------------------------------------------------------------------
# IMS and the gateway
# ----------------------------------------------------------------------------------------------


async def test_ims_issues_bearer_tokens_and_rejects_bad_credentials_in_its_own_shape(fake: FakePlatform, api: Api) -> None:
    credentials = fake.credentials
    form = {"grant_type": "client_credentials", "client_id": credentials.client_id,
            "client_secret": credentials.client_secret, "scope": credentials.scope}

    async def token(data: Any, **kwargs: Any) -> Reply:
        async with api.session.post(fake.ims_token_url, data=data, **kwargs) as response:
            return Reply(response.status, await response.json(), response.headers)

    good = await token(form)
    assert good.status == 200 and good.body["token_type"] == "bearer" and good.body["expires_in"] == 86399
    assert (await api.get(f"{FS}/flows", authorization=f"Bearer {good.body['access_token']}")).status == 200
    assert (await token({**form, "scope": ""})).status == 200  # scope is optional

    wrong = await token({**form, "client_secret": "guess"})
    assert wrong.status == 400 and wrong.body == {"error": "invalid_client",
                                                  "error_description": "invalid client_secret parameter"}
    assert (await token({**form, "client_id": "someone-else"})).body["error"] == "invalid_client"
    assert (await token({**form, "grant_type": "password"})).body["error"] == "unsupported_grant_type"
    assert (await token({**form, "scope": "openid,AdobeID,admin"})).body["error"] == "invalid_scope"
    missing = {k: v for k, v in form.items() if k != "client_secret"}
    assert (await token(missing)).body["error"] == "invalid_request"
    as_json = await token(None, json=form)
    assert as_json.status == 400 and as_json.body["error"] == "invalid_request"
    in_query = await token(None, params=form)
    assert in_query.status == 400 and "form body" in in_query.body["error_description"]
    for reply in fake.requests_to("POST", "/ims/"):
        assert credentials.client_secret not in repr(reply)


async def test_tokens_expire_after_expires_in_and_a_new_token_works(api: Api) -> None:
    fake = api.fake
    fake.token_ttl_s = 120
    api.token = fake.issue_token()
    assert (await api.get(f"{FS}/connectionSpecs")).status == 200
    fake.advance_clock(121)
    assert gateway_error(await api.get(f"{FS}/connectionSpecs"), 401, "401013") == "Oauth token is not valid"
    api.token = fake.issue_token()
    assert (await api.get(f"{FS}/connectionSpecs")).status == 200
    fake.expire_tokens()
    assert (await api.get(f"{FS}/connectionSpecs")).status == 401


async def test_every_platform_call_needs_the_gateway_headers(api: Api) -> None:
    path = f"{FS}/flows"
    assert gateway_error(await api.get(path, authorization=None), 403, "403010")
    assert gateway_error(await api.get(path, authorization="Bearer forged"), 401, "401013")
    assert gateway_error(await api.get(path, authorization=api.token), 401, "401013")  # no "Bearer "
    assert gateway_error(await api.get(path, x_api_key=None), 403, "403000")
    assert gateway_error(await api.get(path, x_api_key="another-client"), 403, "403003")
    assert "x-gw-ims-org-id" in gateway_error(await api.get(path, x_gw_ims_org_id=None), 400, "400003")
    assert gateway_error(await api.get(path, x_gw_ims_org_id="FFFF@AdobeOrg"), 403, "403025")
    message = gateway_error(await api.get(f"{UPS}/audiences", x_sandbox_name=None), 400, "400003")
    assert "x-sandbox-name" in message and "prod" in message
    assert gateway_error(await api.get(path, x_sandbox_name="Prod Sandbox"), 400, "400003")
    ok = await api.get(path, x_request_id="trace-123")
    assert ok.status == 200 and ok.headers["x-request-id"] == "trace-123"


async def test_unknown_routes_and_methods_answer_in_the_flow_service_shape(api: Api) -> None:
    flow_error(await api.get(f"{FS}/nothing-here"), 404)
    flow_error(await api.call("PUT", f"{FS}/flows"), 405)
    flow_error(await api.get(f"{FS}/connectionSpecs/00000000-0000-0000-0000-000000000000"), 404)


# ----------------------------------------------------------------------------------------------
# Flow Service
# ----------------------------------------------------------------------------------------------


async def test_connection_specs_carry_auth_and_target_specs_and_filter_by_property(api: Api) -> None:
    everything = await api.get(f"{FS}/connectionSpecs")
    assert {s["id"] for s in everything.items} == {PROFILE_SOURCE_SPEC_ID, KINESIS_SPEC_ID, EVENT_HUBS_SPEC_ID}
    kinesis = (await api.get(f"{FS}/connectionSpecs/{KINESIS_SPEC_ID}")).items[0]
    assert kinesis["authSpec"][0]["name"] == KINESIS_AUTH_SPEC == "Aws Kinesis authentication credentials"
    assert kinesis["authSpec"][0]["spec"]["properties"]["secretKey"]["format"] == "password"
    assert set(kinesis["targetSpec"]["spec"]["required"]) == {"stream", "region"}
    eventhubs = (await api.get(f"{FS}/connectionSpecs", params={"property": f"id=={EVENT_HUBS_SPEC_ID}"})).items
    assert [a["name"] for a in eventhubs[0]["authSpec"]][0] == EVENT_HUBS_AUTH_SPEC
    assert len(eventhubs[0]["authSpec"]) == 1  # the documented one; SAS's name is not documented
    async with FakePlatform(eventhubs_sas_auth=True) as guessing, aiohttp.ClientSession() as session:
        offered = (await Api(guessing, session).get(f"{FS}/connectionSpecs/{EVENT_HUBS_SPEC_ID}")).items[0]
        assert [a["name"] for a in offered["authSpec"]] == [EVENT_HUBS_AUTH_SPEC, EVENT_HUBS_SAS_AUTH_SPEC]
    assert eventhubs[0]["targetSpec"]["spec"]["required"] == ["eventHubName"]
    by_name = await api.get(f"{FS}/connectionSpecs", params={"property": "name==Amazon Kinesis"})
    assert [s["id"] for s in by_name.items] == [KINESIS_SPEC_ID]


async def test_creates_are_validated_like_adobe_with_messages_that_say_what_to_do(api: Api) -> None:
    base = {"name": "acct", "connectionSpec": {"id": KINESIS_SPEC_ID, "version": "1.0"}}
    auth = {"accessKeyId": "AKIA", "secretKey": AWS_SECRET, "region": "us-east-1"}
    assert "read it from GET /connectionSpecs" in flow_error(await api.post(f"{FS}/connections", {
        **base, "auth": {"specName": "Amazon Kinesis authentication credentials", "params": auth}}), 400)
    flow_error(await api.post(f"{FS}/connections", {**base, "connectionSpec": {"id": KINESIS_SPEC_ID},
                                                    "auth": {"specName": KINESIS_AUTH_SPEC, "params": auth}}), 422)
    assert "secretKey" in flow_error(await api.post(f"{FS}/connections", {
        **base, "auth": {"specName": KINESIS_AUTH_SPEC, "params": {"accessKeyId": "AKIA", "region": "eu-west-1"}}}), 400)
    assert "stream" in flow_error(await api.post(f"{FS}/connections", {  # target params in auth: unknown key
        **base, "auth": {"specName": KINESIS_AUTH_SPEC, "params": {**auth, "stream": "s"}}}), 400)
    assert MASK not in (await api.post(f"{FS}/connections", {
        **base, "auth": {"specName": KINESIS_AUTH_SPEC, "params": {**auth, "secretKey": MASK}}})).body["errorMessage"]
    created = await api.post(f"{FS}/connections", {**base, "auth": {"specName": KINESIS_AUTH_SPEC, "params": auth}})
    assert created.status == 201 and created.body["etag"].startswith('"') and created.body["etag"].endswith('"')
    target = {"name": "t", "connectionSpec": {"id": KINESIS_SPEC_ID, "version": "1.0"}, "data": {"format": "json"},
              "params": {"stream": "s", "region": "us-east-1"}}
    assert "'baseConnectionId'" in flow_error(await api.post(f"{FS}/targetConnections", {
        **target, "baseConnection": created.body["id"]}), 400)  # the 2020 tutorial's typo
    assert "region" in flow_error(await api.post(f"{FS}/targetConnections", {
        **target, "baseConnectionId": created.body["id"], "params": {"stream": "s"}}), 400)
    flow = {"name": "f", "flowSpec": {"id": DESTINATION_FLOW_SPEC_ID, "version": "1.0"},
            "sourceConnectionIds": ["missing"], "targetConnectionIds": ["missing"],
            "transformations": [{"name": "GeneralTransform", "params": {}}]}
    assert "source connection missing" in flow_error(await api.post(f"{FS}/flows", flow), 400)
    flow_error(await api.post(f"{FS}/flows", {**flow, "flowSpec": {"id": "51d675ce-e270-408d-91fc-22717bdf2148",
                                                                    "version": "1.0"}}), 400)
    flow_error(await api.call("POST", f"{FS}/connections", json=None, headers=api.headers()), 415)


async def test_etags_are_quoted_change_on_every_update_and_guard_patch(api: Api) -> None:
    destination = await provision(api)
    path = f"{FS}/flows/{destination.flow}"
    flow = (await api.get(path)).items[0]
    etag = flow["etag"]
    assert etag == destination.etag == flow["version"] and re.fullmatch(r'"[0-9a-f-]+"', etag)
    rename = [{"op": "replace", "path": "/name", "value": "renamed"}]
    assert "If-Match header is required" in flow_error(await api.patch(path, rename, None), 412)
    unquoted = flow_error(await api.patch(path, rename, etag.strip('"')), 412)
    assert unquoted.startswith(f"Supplied version=[{etag.strip(chr(34))}] does not match the current version on "
                               f"entity=[{etag}]") and "double quotes" in unquoted
    done = await api.patch(path, rename, etag)
    assert done.status == 200 and done.body == {"id": destination.flow, "etag": done.body["etag"]}
    assert done.body["etag"] != etag
    assert "re-read" in flow_error(await api.patch(path, rename, etag), 412)  # now stale
    after = (await api.get(path)).items[0]
    assert after["name"] == "renamed" and after["etag"] == after["version"] == done.body["etag"]
    # /action takes If-Match optionally; a stale one is refused, none is fine
    flow_error(await api.post(f"{path}/action", params={"op": "disable"}, if_match=etag), 412)
    disabled = await api.post(f"{path}/action", params={"op": "Disable"})
    assert disabled.status == 200 and disabled.body["etag"] != after["etag"]
    assert (await api.get(path)).items[0]["state"] == "disabled"
    flow_error(await api.post(f"{path}/action", params={"op": "pause"}), 400)
    # connections too
    base_path = f"{FS}/targetConnections/{destination.target}"
    base_etag = (await api.get(base_path)).items[0]["etag"]
    replace = [{"op": "replace", "path": "/params", "value": {"eventHubName": "other"}}]
    flow_error(await api.patch(base_path, replace, '"0"'), 412)
    assert (await api.patch(base_path, replace, base_etag)).status == 200
    assert (await api.get(base_path)).items[0]["params"] == {"eventHubName": "other"}


async def test_json_patch_adds_appends_removes_and_is_all_or_nothing(api: Api) -> None:
    destination = await provision(api, audiences=(A1,), attributes=())
    path = f"{FS}/flows/{destination.flow}"
    selectors = "/transformations/0/params/segmentSelectors/selectors"

    async def apply(operations: list[dict[str, Any]]) -> Reply:
        return await api.patch(path, operations, (await api.get(path)).items[0]["etag"])

    def segment(audience: str) -> dict[str, Any]:
        return {"type": "PLATFORM_SEGMENT", "value": {"id": audience, "name": "ignored"}}

    assert (await apply([{"op": "add", "path": f"{selectors}/-", "value": segment(A2)},
                         {"op": "add", "path": f"{selectors}/0", "value": segment(A3)}])).status == 200
    flow = (await api.get(path)).items[0]
    mapped = flow["transformations"][0]["params"]["segmentSelectors"]["selectors"]
    assert [s["value"]["id"] for s in mapped] == [A3, A1, A2]
    assert all(s["value"]["createTime"].isdigit() and s["value"]["updateTime"].isdigit() for s in mapped)
    # remove from the highest index down, as indexes shift
    assert (await apply([{"op": "remove", "path": f"{selectors}/2"}, {"op": "remove", "path": f"{selectors}/0"}])).status == 200
    flow = (await api.get(path)).items[0]
    assert [s["value"]["id"] for s in flow["transformations"][0]["params"]["segmentSelectors"]["selectors"]] == [A1]
    etag = flow["etag"]
    for operations, fragment in (
        ([{"op": "add", "path": f"{selectors}/-", "value": segment(A2)},
          {"op": "remove", "path": f"{selectors}/5"}], "out of range"),
        ([{"op": "add", "path": f"{selectors}/-", "value": segment("no-such-audience")}], "does not exist"),
        ([{"op": "add", "path": f"{selectors}/-", "value": segment(A1)}], "already mapped"),
        ([{"op": "add", "path": f"{selectors}/-", "value": {"type": "PLATFORM_SEGMENT"}}], "PLATFORM_SEGMENT"),
        ([{"op": "replace", "path": "/state", "value": "disabled"}], "not a patchable field"),
        ([{"op": "replace", "path": "/etag", "value": "x"}], "not a patchable field"),
        ([{"op": "frobnicate", "path": "/name"}], "unknown op"),
        ([], "non-empty"),
    ):
        assert fragment in flow_error(await api.patch(path, operations, etag), 400)
    assert (await api.get(path)).items[0]["etag"] == etag  # nothing was applied
    profile = [{"op": "add", "path": "/transformations/0/params/profileSelectors/selectors/-",
                "value": {"type": "JSON_PATH", "value": {"operator": "EXISTS", "path": "personalEmail.address"}}}]
    assert (await apply(profile)).status == 200
    attribute = (await api.get(path)).items[0]["transformations"][0]["params"]["profileSelectors"]["selectors"][0]
    assert attribute["value"]["mapping"]["source"] == "personalEmail.address"


async def test_lists_page_with_limit_and_continuation_most_recently_changed_first(api: Api) -> None:
    destination = await provision(api, name="flow-0")
    ids = [destination.flow]
    for n in range(1, 7):
        created = await api.post(f"{FS}/flows", {
            "name": f"flow-{n}", "flowSpec": {"id": DESTINATION_FLOW_SPEC_ID, "version": "1.0"},
            "sourceConnectionIds": [destination.source], "targetConnectionIds": [destination.target],
            "transformations": [{"name": "GeneralTransform", "params": {}}]})
        ids.append(created.body["id"])
    # touch flow-2: it becomes the most recently changed
    flow_2 = (await api.get(f"{FS}/flows/{ids[2]}")).items[0]
    await api.patch(f"{FS}/flows/{ids[2]}", [{"op": "replace", "path": "/description", "value": "touched"}], flow_2["etag"])
    expected = [ids[2], *[i for i in reversed(ids) if i != ids[2]]]

    seen: list[str] = []
    page = await api.get(f"{FS}/flows", params={"limit": "3"})
    while True:
        assert page.status == 200 and len(page.items) <= 3
        seen += [f["id"] for f in page.items]
        link = page.body["_links"].get("next")
        if link is None:
            break
        href = link["href"]
        assert href.startswith("/flows?") and "continuationToken=" in href  # relative to the Flow Service base
        assert "limit" not in href  # as Adobe's: the token only, the client sends the rest again
        page = await api.get(FS + href, params={"limit": "3"})
    assert seen == expected
    # the token alone also works
    first = await api.get(f"{FS}/flows", params={"limit": "4"})
    token = dict(parse_qsl(urlsplit(first.body["_links"]["next"]["href"]).query))["continuationToken"]
    rest = await api.get(f"{FS}/flows", params={"limit": "4", "continuationToken": token})
    assert [f["id"] for f in first.items + rest.items] == expected and rest.body["_links"] == {}
    assert (await api.get(f"{FS}/flows", params={"count": "true"})).body == {"count": 7}
    oldest_first = await api.get(f"{FS}/flows", params={"orderby": "createdAt"})
    assert [f["id"] for f in oldest_first.items] == ids
    flow_error(await api.get(f"{FS}/flows", params={"limit": "101"}), 400)
    flow_error(await api.get(f"{FS}/flows", params={"continuationToken": "garbage!"}), 400)


async def test_property_filters_cover_the_documented_forms(api: Api) -> None:
    eventhubs = await provision(api, "eventhubs", name="eh", audiences=(A1, A2))
    kinesis = await provision(api, "kinesis", name="kin", audiences=(A2, A3))
    await api.post(f"{FS}/flows/{kinesis.flow}/action", params={"op": "disable"})

    async def flow_ids(*filters: str) -> set[str]:
        reply = await api.get(f"{FS}/flows", params=[("property", f) for f in filters])
        assert reply.status == 200, reply.body
        return {f["id"] for f in reply.items}

    both = {eventhubs.flow, kinesis.flow}
    assert await flow_ids("inheritedAttributes.properties.isDestinationFlow==true") == both
    assert await flow_ids("name==eh") == {eventhubs.flow}
    assert await flow_ids("name==eh,kin") == both  # comma: any of
    assert await flow_ids("state==disabled") == {kinesis.flow}
    assert await flow_ids("state!=disabled") == {eventhubs.flow}
    assert await flow_ids(f"inheritedAttributes.targetConnections[].connectionSpec.id=={KINESIS_SPEC_ID}") == {kinesis.flow}
    selector = "transformations[].params.segmentSelectors.selectors[].value.id=="
    assert await flow_ids(selector + A2) == both
    assert await flow_ids(selector + A1) == {eventhubs.flow}
    assert await flow_ids(selector + A2, "state==enabled") == {eventhubs.flow}  # repeated: all of
    assert await flow_ids("transformations.params.segmentSelectors.selectors.value.id==" + A1) == set()  # [] required
    assert await flow_ids(f"createdAt>{10**12}") == both
    assert await flow_ids("name~K") == {kinesis.flow}
    assert await flow_ids("scheduleParams") == set()  # existence
    connections = await api.get(f"{FS}/connections", params={"property": f"connectionSpec.id=={EVENT_HUBS_SPEC_ID}"})
    assert [c["id"] for c in connections.items] == [eventhubs.base]
    targets = await api.get(f"{FS}/targetConnections", params={"property": f"baseConnectionId=={kinesis.base}"})
    assert [t["id"] for t in targets.items] == [kinesis.target]
    flow_error(await api.get(f"{FS}/flows", params={"property": "==x"}), 400)


async def test_sandboxes_keep_their_own_entities(fake: FakePlatform, api: Api) -> None:
    api.sandbox = "dev"
    destination = await provision(api, name="in-dev")
    assert [f["sandboxName"] for f in (await api.get(f"{FS}/flows")).items] == ["dev"]
    api.sandbox = "prod"
    assert (await api.get(f"{FS}/flows")).items == []
    flow_error(await api.get(f"{FS}/flows/{destination.flow}"), 404)
    fake.add_audiences([Audience("dev-only", "Only in dev")], sandbox="dev")
    assert (await api.get(f"{UPS}/audiences/dev-only")).status == 404
    api.sandbox = "dev"
    assert (await api.get(f"{UPS}/audiences/dev-only")).body["name"] == "Only in dev"


async def test_deletes_answer_202_and_refuse_while_still_referenced(api: Api) -> None:
    destination = await provision(api)
    for kind, entity, user in (("connections", destination.base, "targetConnection"),
                               ("connections", destination.profile_base, "sourceConnection"),
                               ("targetConnections", destination.target, "flow"),
                               ("sourceConnections", destination.source, "flow")):
        message = flow_error(await api.delete(f"{FS}/{kind}/{entity}"), 409)
        assert f"still used by {user}" in message
    deleted = await api.delete(f"{FS}/flows/{destination.flow}")
    assert deleted.status == 202 and deleted.body is None
    # Marked for deletion, as Adobe's 202 says: still there, its connections still in use, for a moment.
    assert (await api.get(f"{FS}/flows/{destination.flow}")).status == 200
    assert "still used by flow" in flow_error(await api.delete(f"{FS}/targetConnections/{destination.target}"), 409)
    assert (await api.delete(f"{FS}/flows/{destination.flow}")).status == 202  # again: no harm
    api.fake.advance_clock(1)
    flow_error(await api.get(f"{FS}/flows/{destination.flow}"), 404)
    flow_error(await api.delete(f"{FS}/flows/{destination.flow}"), 404)
    for kind, entity in (("targetConnections", destination.target), ("sourceConnections", destination.source),
                         ("connections", destination.base), ("connections", destination.profile_base)):
        suffix = "/" if kind == "connections" else ""  # the Sources spec writes this path with a trailing slash
        assert (await api.delete(f"{FS}/{kind}/{entity}{suffix}")).status == 202


async def test_the_tutorials_variants_202_patch_and_204_delete_can_be_chosen() -> None:
    async with FakePlatform(patch_status=202, delete_status=204) as fake, aiohttp.ClientSession() as session:
        api = Api(fake, session)
        destination = await provision(api, audiences=(), attributes=())
        patched = await api.patch(f"{FS}/flows/{destination.flow}", [{"op": "replace", "path": "/name", "value": "n"}],
                                  destination.etag)
        assert patched.status == 202 and patched.body is None
        deleted = await api.delete(f"{FS}/flows/{destination.flow}")
        assert deleted.status == 204 and deleted.body is None


async def test_credentials_are_masked_on_read_and_never_recorded_or_logged(
        fake: FakePlatform, api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    destination = await provision(api, "eventhubs")
    kinesis = await provision(api, "kinesis", name="k")
    connection = (await api.get(f"{FS}/connections/{destination.base}")).items[0]
    assert connection["auth"]["params"] == {"sasKeyName": "RootManageSharedAccessKey", "sasKey": MASK,
                                           "namespace": "127.0.0.1:5673"}
    assert (await api.get(f"{FS}/connections/{kinesis.base}")).items[0]["auth"]["params"]["secretKey"] == MASK
    await api.patch(f"{FS}/connections/{destination.base}",
                    [{"op": "replace", "path": "/auth/params/sasKey", "value": "rotated-" + SAS_KEY},
                     {"op": "replace", "path": "/auth/params", "value": {
                         "sasKeyName": "k", "sasKey": "twice-" + SAS_KEY, "namespace": "127.0.0.1:5673"}}],
                    connection["etag"])
    listed = await api.get(f"{FS}/connections")
    assert all(c.get("auth", {}).get("params", {}).get("sasKey", MASK) == MASK for c in listed.items)
    recorded = repr(fake.requests) + caplog.text
    for secret in (SAS_KEY, AWS_SECRET, fake.credentials.client_secret, api.token):
        assert secret not in recorded
    assert "client_secret=<redacted>" in repr(fake.credentials)


async def test_denied_permissions_answer_403_naming_the_permission(fake: FakePlatform, api: Api) -> None:
    fake.deny("Manage Destinations")
    message = flow_error(await api.post(f"{FS}/connections", {
        "name": "p", "connectionSpec": {"id": PROFILE_SOURCE_SPEC_ID, "version": "1.0"}}), 403)
    assert "'Manage Destinations'" in message
    assert (await api.get(f"{FS}/connections")).status == 200  # reading needs View Destinations only
    fake.allow("Manage Destinations")
    destination = await provision(api)
    fake.deny("Activate Destinations")
    assert "'Activate Destinations'" in flow_error(
        await api.post(f"{FS}/flows/{destination.flow}/action", params={"op": "disable"}), 403)
    fake.deny("View Segments")
    denied = await api.get(f"{UPS}/segment/definitions")
    assert denied.status == 403 and "'View Segments'" in denied.body["errors"]["403"][0]["message"]
    fake.allow()
    assert (await api.get(f"{UPS}/segment/definitions")).status == 200
    with pytest.raises(ValueError):
        fake.deny("Manage Everything")


async def test_injected_faults_and_latency(fake: FakePlatform, api: Api) -> None:
    fault = fake.inject(429, times=2, method="GET", path=r"/flows$", retry_after=3)
    for _ in range(2):
        throttled = await api.get(f"{FS}/flows")
        assert throttled.headers["Retry-After"] == "3"
        flow_error(throttled, 429)
    assert (await api.get(f"{FS}/flows")).status == 200
    assert fault.hits == 2 and fake.faults.pending == 0
    fake.inject(503, retry_after=None)  # any route, IMS included
    form = {"grant_type": "client_credentials", "client_id": fake.credentials.client_id,
            "client_secret": fake.credentials.client_secret}
    async with api.session.post(fake.ims_token_url, data=form) as response:
        assert response.status == 503 and "Retry-After" not in response.headers
        assert (await response.json())["error"] == "temporarily_unavailable"
    fake.inject(500, path="/segment/")
    failed = await api.get(f"{UPS}/segment/definitions")
    assert failed.status == 500 and failed.body["errors"]["500"]
    assert (await api.get(f"{FS}/connectionSpecs")).status == 200
    fake.add_latency(0.3, path="/connectionSpecs", times=1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await api.get(f"{FS}/connectionSpecs")).status == 200
    assert loop.time() - started >= 0.3
    started = loop.time()
    await api.get(f"{FS}/connectionSpecs")
    assert loop.time() - started < 0.3
    assert [r.status for r in fake.requests_to("GET", r"/flows$")] == [429, 429, 200]


# ----------------------------------------------------------------------------------------------
# runs and Segmentation
# ----------------------------------------------------------------------------------------------


async def test_runs_are_synthesized_hourly_for_enabled_flows(fake: FakePlatform, api: Api) -> None:
    destination = await provision(api)
    other = await provision(api, name="other")
    await api.post(f"{FS}/flows/{other.flow}/action", params={"op": "disable"})
    current = await api.get(f"{FS}/runs", params={"property": f"flowId=={destination.flow}"})
    assert [r["metrics"]["statusSummary"]["status"] for r in current.items] == ["Processing"]
    fake.advance_clock(3 * 3600)
    runs = await api.get(f"{FS}/runs", params={"property": f"flowId=={destination.flow}"})
    statuses = [r["metrics"]["statusSummary"]["status"] for r in runs.items]
    assert statuses[0] == "Processing" and set(statuses[1:]) == {"Success"} and len(statuses) >= 4
    assert runs.items[0]["createdAt"] > runs.items[-1]["createdAt"]  # newest first
    assert all(r["flowId"] == destination.flow for r in runs.items)
    assert all("completedAtUTC" in r["metrics"]["durationSummary"] for r in runs.items[1:])
    others = await api.get(f"{FS}/runs", params={"property": f"flowId=={other.flow}"})
    assert len(others.items) == 1  # disabled in its first hour: no more windows
    succeeded = await api.get(f"{FS}/runs", params=[("property", f"flowId=={destination.flow}"),
                                                    ("property", "metrics.statusSummary.status==Success")])
    assert len(succeeded.items) == len(statuses) - 1
    flow_error(await api.get(f"{FS}/runs/not-a-run"), 404)


async def test_segmentation_pages_definitions_and_finds_audiences(api: Api) -> None:
    first = await api.get(f"{UPS}/segment/definitions", params={"limit": "3", "sort": "name:asc"})
    assert first.body["page"] == {"totalCount": 7, "totalPages": 3, "sortField": "name", "sort": "asc",
                                  "pageSize": 3, "limit": 3}
    names = [s["name"] for s in first.body["segments"]]
    assert names == sorted(names)
    seen = list(names)
    reply = first
    while "next" in reply.body["link"]:
        reply = await api.get(UPS + reply.body["link"]["next"])
        seen += [s["name"] for s in reply.body["segments"]]
    assert seen == sorted(a.name for a in DEFAULT_AUDIENCES)
    by_page = await api.get(f"{UPS}/segment/definitions", params={"limit": "3", "page": "2", "sort": "name:asc"})
    assert [s["name"] for s in by_page.body["segments"]] == seen[6:]
    one = (await api.get(f"{UPS}/segment/definitions/{A1}")).body
    assert one["id"] == A1 and one["mergePolicyId"] and one["expression"]["type"] == "PQL"
    missing = await api.get(f"{UPS}/segment/definitions/nope")
    assert missing.status == 404 and missing.body["errors"]["404"][0]["code"] == 404
    bulk = await api.post(f"{UPS}/segment/definitions/bulk-get", {"ids": [{"id": A1}, {"id": "nope"}]})
    assert bulk.status == 207 and bulk.body["results"][A1]["name"] == DEFAULT_AUDIENCES[0].name
    assert "errors" in bulk.body["results"]["nope"]
    found = await api.get(f"{UPS}/audiences", params={"name": "CUSTOMERS"})
    assert [c["id"] for c in found.body["children"]] == [A1]  # substring, case-insensitive
    paged = await api.get(f"{UPS}/audiences", params={"limit": "2"})
    assert paged.body["_page"]["next"] == 2 and paged.body["_links"]["next"]["href"].startswith("@/audiences?start=2")
    by_id = await api.get(f"{UPS}/audiences", params={"property": f"audienceId=={A2}"})
    assert [c["name"] for c in by_id.body["children"]] == [DEFAULT_AUDIENCES[1].name]
    assert (await api.get(f"{UPS}/audiences/{A2}")).body["audienceId"] == A2


# ----------------------------------------------------------------------------------------------
# as a process
# ----------------------------------------------------------------------------------------------


async def test_runs_as_a_process_on_loopback() -> None:
    with running(start_platform_process("--client-secret", "process-secret", "--no-exports")) as server:
        assert server.url.startswith("http://127.0.0.1:")
        assert "process-secret" not in orjson.dumps(server.ready).decode()
        async with aiohttp.ClientSession() as session:
            async with session.post(server.ready["ims_token_url"], data={
                    "grant_type": "client_credentials", "client_id": server.ready["client_id"],
                    "client_secret": "process-secret"}) as response:
                token = (await response.json())["access_token"]
            headers = {"Authorization": f"Bearer {token}", "x-api-key": server.ready["client_id"],
                       "x-gw-ims-org-id": server.ready["org_id"], "x-sandbox-name": "prod"}
            async with session.get(server.ready["segmentation_url"] + "/audiences", headers=headers) as response:
                assert response.status == 200
                assert len((await response.json())["children"]) == len(DEFAULT_AUDIENCES)
