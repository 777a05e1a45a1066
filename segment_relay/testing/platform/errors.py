"""The error bodies of each family of Adobe endpoint, and the exception handlers raise.

Four shapes, because Adobe has four (notes §2.6, §3, segmentation.yaml):

- gateway (Adobe I/O, before any service): ``{"error_code": "401013", "message": ...}``
- Flow Service: RFC-7807-like ``{type, title, status, report{detailed-message, request-id}, errorMessage, errorDetails}``
- Segmentation: ``{requestId, errors{"<status>": [{code, message}]}, type, title, status}``
- IMS (OAuth): ``{"error": "invalid_client", "error_description": ...}``
"""

from __future__ import annotations

from typing import Any, Literal

Family = Literal["gateway", "flow", "segmentation", "ims"]

__all__ = ["ApiError", "GatewayError", "ImsError", "Family", "flow_body", "segmentation_body", "error_body"]

# Adobe's problem "type" URIs carry a service code. Only FLOW-1439-404 is seen in Adobe's docs;
# the others are the fake's own, stable so tests can match on them.
_FLOW_CODES = {400: "1000", 401: "1001", 403: "1003", 404: "1439", 409: "1009", 412: "1012", 415: "1015",
               422: "1022", 429: "1029", 500: "1050", 502: "1052", 503: "1053", 504: "1054"}
_TITLES = {400: "Bad request", 401: "Unauthorized", 403: "Forbidden", 404: "Resource not found",
           405: "Method not allowed", 409: "Conflict", 412: "Precondition failed",
           415: "Unsupported media type", 422: "Unprocessable entity", 429: "Too many requests",
           500: "Internal server error", 502: "Bad gateway", 503: "Service unavailable", 504: "Gateway timeout"}


class ApiError(Exception):
    """A service-level error: rendered in the Flow Service or Segmentation shape by route."""

    def __init__(self, status: int, message: str, *, title: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.title = title or _TITLES.get(status, "Error")
        self.headers = headers or {}


class GatewayError(Exception):
    """An Adobe I/O gateway rejection (token, API key, org, sandbox headers)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class ImsError(Exception):
    """An OAuth error from the IMS token endpoint."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.error = error
        self.description = description


def flow_body(status: int, message: str, request_id: str, title: str | None = None) -> dict[str, Any]:
    code = _FLOW_CODES.get(status, "1000")
    return {
        "type": f"https://ns.adobe.com/aep/errors/FLOW-{code}-{status}",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "report": {"detailed-message": message, "request-id": request_id},
        "errorMessage": message,
        "errorDetails": message,
    }


def segmentation_body(status: int, message: str, request_id: str, title: str | None = None) -> dict[str, Any]:
    return {
        "requestId": request_id,
        "errors": {str(status): [{"code": status, "message": message}]},
        "type": f"https://ns.adobe.com/aep/errors/UPAPI-{100000 + status}-{status}",
        "title": title or message,
        "status": status,
    }


def error_body(family: Family, status: int, message: str, request_id: str, title: str | None = None) -> dict[str, Any]:
    """An error of ``status`` in the shape of the endpoint family (for faults and unknown routes)."""
    if family == "segmentation":
        return segmentation_body(status, message, request_id, title)
    if family == "ims":
        error = {429: "too_many_requests", 503: "temporarily_unavailable"}.get(status, "server_error")
        return {"error": error, "error_description": message}
    if family == "gateway":
        return {"error_code": f"{status}000", "message": message}
    return flow_body(status, message, request_id, title)
