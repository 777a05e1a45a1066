"""The HTTP face of the fake: IMS, Flow Service and Segmentation routes on one aiohttp app.

One middleware does what Adobe's gateway and services do around every call, in this order:
request id, injected latency, injected faults, (for /data/*) token → API key → org → sandbox →
permissions, then the route; errors are rendered in the shape of the endpoint family, and every
exchange is recorded with credentials redacted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import uuid
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode

import orjson
from aiohttp import web

from .catalog import SECRET_KEYS
from .control import REDACTED, RecordedRequest, redact, redact_headers, required_permissions
from .errors import ApiError, Family, GatewayError, ImsError, error_body, flow_body, segmentation_body
from .query import paginate, parse_filters
from .state import KINDS, Caller

if TYPE_CHECKING:
    from .server import FakePlatform

__all__ = ["build_app", "FLOW_SERVICE_PATH", "SEGMENTATION_PATH", "IMS_TOKEN_PATH"]

log = logging.getLogger(__name__)

FLOW_SERVICE_PATH = "/data/foundation/flowservice"
SEGMENTATION_PATH = "/data/core/ups"
IMS_TOKEN_PATH = "/ims/token/v3"
_SANDBOX_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,254}$")
_JSON_TYPES = ("application/json", "application/json-patch+json")
FAKE: web.AppKey[FakePlatform] = web.AppKey("fake")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Who is calling, in which sandbox: set by the middleware for the handler (same task). A context
# variable rather than request["..."] keeps it typed and free of aiohttp version differences.
_CALLER: ContextVar[Caller] = ContextVar("fake_platform_caller")
_SANDBOX: ContextVar[str] = ContextVar("fake_platform_sandbox")


def _family(path: str) -> Family:
    if path.startswith("/ims/"):
        return "ims"
    if path.startswith(SEGMENTATION_PATH):
        return "segmentation"
    return "flow"


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json", headers=headers)


def _query_int(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name} must be an integer, got {raw!r}") from None


async def _json_body(request: web.Request) -> Any:
    if request.content_type not in _JSON_TYPES:
        raise ApiError(415, f"Content-Type must be application/json, got {request.content_type or 'none'!r}")
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise ApiError(400, f"The body is not valid JSON: {error}") from None


def _list_body(request: web.Request, items: list[Any], resource: str) -> dict[str, Any]:
    """Flow Service list paging: ``limit`` (1-100), ``continuationToken``, ``_links.next.href``
    relative to the Flow Service base path, ``count=true`` for just the count. As in Adobe's
    examples, the next link carries the token only: a client must send its filters again."""
    if request.query.get("count", "").lower() == "true":
        return {"count": len(items)}
    limit = _query_int(request, "limit")
    limit = 100 if limit is None else limit
    if not 1 <= limit <= 100:
        raise ApiError(400, f"limit must be between 1 and 100, got {limit}")
    page, token = paginate(items, limit, request.query.get("continuationToken"))
    links: dict[str, Any] = {}
    if token is not None:
        links["next"] = {"href": f"{resource}?{urlencode([('continuationToken', token)])}"}
    return {"items": page, "_links": links}


# ------------------------------------------------------------------------------------------
# middleware: gateway, faults, recording
# ------------------------------------------------------------------------------------------


def _authenticate(fake: FakePlatform, request: web.Request, family: Family) -> None:
    headers = request.headers
    authorization = headers.get("Authorization")
    if not authorization:
        raise GatewayError(403, "403010", "Oauth token is missing.")
    scheme, _, token = authorization.partition(" ")
    caller = fake.ims.caller(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
    if caller is None:
        raise GatewayError(401, "401013", "Oauth token is not valid")
    api_key = headers.get("x-api-key")
    if not api_key:
        raise GatewayError(403, "403000", "Api Key is required")
    if api_key != caller.client_id:
        raise GatewayError(403, "403003", "Api Key is invalid")
    org = headers.get("x-gw-ims-org-id")
    if not org:
        raise GatewayError(400, "400003", "Missing header: x-gw-ims-org-id")
    if org != caller.org_id:
        raise GatewayError(403, "403025", "Profile is not valid")
    sandbox = headers.get("x-sandbox-name")
    if not sandbox:
        # Adobe would quietly use "prod"; the fake insists, so a client cannot write to prod by accident.
        raise GatewayError(400, "400003", "Missing header: x-sandbox-name. Send the sandbox name on every "
                                          "Platform call (Adobe falls back to prod without it).")
    if not _SANDBOX_NAME.match(sandbox):
        raise GatewayError(400, "400003", f"Invalid header x-sandbox-name {sandbox!r}: lowercase letters, "
                                          "digits and hyphens")
    if fake.sandbox_names is not None and sandbox not in fake.sandbox_names:
        raise ApiError(403, f"Sandbox {sandbox!r} does not exist in org {caller.org_id} or the credential "
                            "has no access to it")
    for permission in required_permissions(request.method, family, request.path):
        if permission in fake.denied:
            raise ApiError(403, f"The credential lacks the permission '{permission}' in sandbox '{sandbox}'. "
                                "Add it to the credential's role (Permissions > Roles > API credentials).",
                           title="Access denied")
    _CALLER.set(caller)
    _SANDBOX.set(sandbox)


def _error_response(family: Family, error: Exception, request_id: str) -> web.Response:
    if isinstance(error, GatewayError):
        return _json({"error_code": error.code, "message": error.message}, error.status)
    if isinstance(error, ImsError):
        return _json({"error": error.error, "error_description": error.description}, error.status)
    if isinstance(error, ApiError):
        render = segmentation_body if family == "segmentation" else flow_body
        return _json(render(error.status, error.message, request_id, error.title), error.status, error.headers)
    if isinstance(error, web.HTTPException):
        message = {404: "No such endpoint in the fake platform",
                   405: "Method not allowed on this endpoint",
                   }.get(error.status, error.reason or "Error")
        return _json(error_body(family, error.status, message, request_id), error.status)
    return _json(error_body(family, 500, "Internal error in the fake platform (see its log)", request_id), 500)


def _parse_recorded(raw: bytes, content_type: str) -> Any:
    if not raw:
        return None
    if content_type == "application/x-www-form-urlencoded":
        return redact(dict(parse_qsl(raw.decode(errors="replace"), keep_blank_values=True)))
    try:
        return redact(orjson.loads(raw))
    except orjson.JSONDecodeError:
        return raw[:2000].decode(errors="replace")


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    fake = request.app[FAKE]
    request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
    family = _family(request.path)
    raw = await request.read()
    delay, answer_delay = fake.faults.delay(request.method, request.path)
    try:
        if delay > 0:
            await asyncio.sleep(delay)  # injected latency: the delay is the point
        fault = fake.faults.take(request.method, request.path)
        if fault is not None:
            headers = {}
            if fault.retry_after is not None and fault.status in (429, 503):
                headers["Retry-After"] = str(math.ceil(fault.retry_after))
            title = {429: "Too many requests", 500: "Internal server error", 502: "Bad gateway",
                     503: "Service unavailable", 504: "Gateway timeout"}.get(fault.status, "Error")
            response: web.StreamResponse = _json(
                error_body(family, fault.status, f"{title} (injected by the fake)", request_id), fault.status, headers)
        else:
            if request.path.startswith("/data/"):
                _authenticate(fake, request, family)
            response = await handler(request)
    except (ApiError, GatewayError, ImsError, web.HTTPException) as error:
        response = _error_response(family, error, request_id)
    except Exception:
        log.exception("fake platform: %s %s failed", request.method, request.path)
        response = _error_response(family, RuntimeError(), request_id)
    response.headers["x-request-id"] = request_id
    body = response.body if isinstance(response, web.Response) else None
    fake.requests.append(RecordedRequest(
        method=request.method,
        path=request.path,
        query=tuple((k, REDACTED if k in SECRET_KEYS else v) for k, v in request.query.items()),
        headers=redact_headers(request.headers),
        body=_parse_recorded(raw, request.content_type),
        status=response.status,
        response=_parse_recorded(body, "application/json") if isinstance(body, bytes) else None,
        response_headers=dict(response.headers),
        request_id=request_id,
        at=fake.clock(),
    ))
    log.debug("%s %s -> %s", request.method, request.path, response.status)
    if answer_delay > 0:
        await asyncio.sleep(answer_delay)  # done (and recorded) already; only the answer is late
    return response


# ------------------------------------------------------------------------------------------
# routes
# ------------------------------------------------------------------------------------------


def build_app(fake: FakePlatform) -> web.Application:
    app = web.Application(middlewares=[_middleware], client_max_size=16 * 1024 * 1024)
    app[FAKE] = fake
    flows = fake.flow_service
    segmentation = fake.segmentation

    async def ims_token(request: web.Request) -> web.Response:
        if any(k in request.query for k in ("client_secret", "client_id")):
            raise ImsError(400, "invalid_request", "send the credentials in the form body, not the query string")
        if request.content_type != "application/x-www-form-urlencoded":
            raise ImsError(400, "invalid_request", "the body must be application/x-www-form-urlencoded")
        form = await request.post()
        return _json(fake.ims.exchange({k: str(v) for k, v in form.items()}))

    async def connection_specs(request: web.Request) -> web.Response:
        return _json({"items": flows.connection_specs(parse_filters(request.query.getall("property", [])))})

    async def connection_spec(request: web.Request) -> web.Response:
        return _json({"items": [flows.connection_spec(request.match_info["id"])]})

    async def flow_specs(request: web.Request) -> web.Response:
        return _json({"items": flows.flow_specs(parse_filters(request.query.getall("property", [])))})

    async def flow_spec(request: web.Request) -> web.Response:
        return _json({"items": [flows.flow_spec(request.match_info["id"])]})

    def entity_routes(kind: str) -> dict[str, Handler]:
        async def listing(request: web.Request) -> web.Response:
            filters = parse_filters(request.query.getall("property", []))
            items = flows.list_entities(_SANDBOX.get(), kind, filters, request.query.get("orderby"))
            return _json(_list_body(request, items, f"/{kind}"))

        async def create(request: web.Request) -> web.Response:
            entity_id, etag = flows.create(_SANDBOX.get(), kind, await _json_body(request), _CALLER.get())
            return _json({"id": entity_id, "etag": etag}, 201)

        async def get(request: web.Request) -> web.Response:
            # Flow Service answers a lookup by id with a one-item list (notes §2.3; Sources spec).
            return _json({"items": [flows.get(_SANDBOX.get(), kind, request.match_info["id"])]})

        async def patch(request: web.Request) -> web.Response:
            entity_id, etag = flows.patch(_SANDBOX.get(), kind, request.match_info["id"],
                                          await _json_body(request), request.headers.get("If-Match"),
                                          _CALLER.get())
            if flows.patch_status == 202:
                return web.Response(status=202)
            return _json({"id": entity_id, "etag": etag}, 200)

        async def delete(request: web.Request) -> web.Response:
            flows.delete(_SANDBOX.get(), kind, request.match_info["id"])
            return web.Response(status=flows.delete_status)

        return {"list": listing, "create": create, "get": get, "patch": patch, "delete": delete}

    async def action(request: web.Request) -> web.Response:
        flow_id, etag = flows.action(_SANDBOX.get(), request.match_info["id"], request.query.get("op"),
                                     request.headers.get("If-Match"), _CALLER.get())
        return _json({"id": flow_id, "etag": etag})

    async def runs(request: web.Request) -> web.Response:
        filters = parse_filters(request.query.getall("property", []))
        return _json(_list_body(request, flows.runs(_SANDBOX.get(), filters, request.query.get("orderby")), "/runs"))

    async def run(request: web.Request) -> web.Response:
        return _json({"items": [flows.run(_SANDBOX.get(), request.match_info["id"])]})

    async def definitions(request: web.Request) -> web.Response:
        return _json(segmentation.definitions(
            _SANDBOX.get(), start=_query_int(request, "start"), page=_query_int(request, "page"),
            limit=_query_int(request, "limit"), sort=request.query.get("sort")))

    async def definition(request: web.Request) -> web.Response:
        return _json(segmentation.get_definition(_SANDBOX.get(), request.match_info["id"]))

    async def definitions_bulk(request: web.Request) -> web.Response:
        return _json(segmentation.bulk(_SANDBOX.get(), await _json_body(request), audiences=False), 207)

    async def audiences(request: web.Request) -> web.Response:
        return _json(segmentation.audiences(
            _SANDBOX.get(), name=request.query.get("name"), description=request.query.get("description"),
            filters=parse_filters(request.query.getall("property", [])), start=_query_int(request, "start"),
            limit=_query_int(request, "limit"), sort=request.query.get("sort")))

    async def audience(request: web.Request) -> web.Response:
        return _json(segmentation.get_audience(_SANDBOX.get(), request.match_info["id"]))

    async def audiences_bulk(request: web.Request) -> web.Response:
        return _json(segmentation.bulk(_SANDBOX.get(), await _json_body(request), audiences=True), 207)

    router = app.router
    router.add_post(IMS_TOKEN_PATH, ims_token)
    base = FLOW_SERVICE_PATH
    router.add_get(f"{base}/connectionSpecs", connection_specs)
    router.add_get(f"{base}/connectionSpecs/{{id}}", connection_spec)
    router.add_get(f"{base}/flowSpecs", flow_specs)
    router.add_get(f"{base}/flowSpecs/{{id}}", flow_spec)
    for kind in KINDS:
        handlers = entity_routes(kind)
        router.add_get(f"{base}/{kind}", handlers["list"])
        router.add_post(f"{base}/{kind}", handlers["create"])
        for suffix in ("", "/"):  # the Sources spec writes some of these paths with a trailing slash
            router.add_get(f"{base}/{kind}/{{id}}{suffix}", handlers["get"])
            router.add_patch(f"{base}/{kind}/{{id}}{suffix}", handlers["patch"])
            router.add_delete(f"{base}/{kind}/{{id}}{suffix}", handlers["delete"])
    router.add_post(f"{base}/flows/{{id}}/action", action)
    router.add_get(f"{base}/runs", runs)
    router.add_get(f"{base}/runs/{{id}}", run)
    ups = SEGMENTATION_PATH
    router.add_get(f"{ups}/segment/definitions", definitions)
    router.add_post(f"{ups}/segment/definitions/bulk-get", definitions_bulk)
    router.add_get(f"{ups}/segment/definitions/{{id}}", definition)
    router.add_get(f"{ups}/audiences", audiences)
    router.add_post(f"{ups}/audiences/bulk-get", audiences_bulk)
    router.add_get(f"{ups}/audiences/{{id}}", audience)
    return app
