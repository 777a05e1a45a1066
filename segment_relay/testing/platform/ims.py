"""Adobe IMS OAuth Server-to-Server, as far as a client needs it: ``POST /ims/token/v3`` with
``grant_type=client_credentials`` in a form body, bearer tokens with an expiry (seconds), no
refresh tokens (notes §3)."""

from __future__ import annotations

import base64
import hmac
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import orjson

from .errors import ImsError
from .state import Caller

__all__ = ["Ims", "IssuedToken"]


@dataclass
class IssuedToken:
    client_id: str
    org_id: str
    scopes: tuple[str, ...]
    expires_at: float


class Ims:
    def __init__(self, clock: Callable[[], float], *, client_id: str, client_secret: str, org_id: str,
                 scopes: Sequence[str], ttl_s: int) -> None:
        self.clock = clock
        self.client_id = client_id
        self._client_secret = client_secret
        self.org_id = org_id
        self.scopes = tuple(scopes)
        self.ttl_s = ttl_s
        self.tokens: dict[str, IssuedToken] = {}
        self.issued = 0

    def _token(self) -> str:
        # JWT-looking like IMS tokens, but opaque to clients: they must not parse it.
        header = base64.urlsafe_b64encode(orjson.dumps({"alg": "none", "x5u": "fake-ims"})).decode().rstrip("=")
        return f"{header}.{secrets.token_urlsafe(24)}.{secrets.token_urlsafe(16)}"

    def issue(self, client_id: str | None = None, scopes: Sequence[str] | None = None) -> tuple[str, int]:
        """A token for the configured client (tests use it to skip the token call)."""
        token = self._token()
        self.tokens[token] = IssuedToken(client_id or self.client_id, self.org_id,
                                         tuple(scopes or self.scopes), self.clock() + self.ttl_s)
        self.issued += 1
        return token, self.ttl_s

    def exchange(self, form: Mapping[str, str]) -> dict[str, object]:
        grant = form.get("grant_type")
        if grant != "client_credentials":
            raise ImsError(400, "unsupported_grant_type",
                           "grant_type must be client_credentials (OAuth Server-to-Server)")
        client_id = form.get("client_id")
        secret = form.get("client_secret")
        if not client_id:
            raise ImsError(400, "invalid_request", "missing client_id parameter")
        if not secret:
            raise ImsError(400, "invalid_request", "missing client_secret parameter")
        if client_id != self.client_id:
            raise ImsError(400, "invalid_client", "invalid client_id parameter")
        # Adobe IMS answers a wrong secret with 400 invalid_client (RFC 6749 would also allow 401).
        if not hmac.compare_digest(secret.encode(), self._client_secret.encode()):
            raise ImsError(400, "invalid_client", "invalid client_secret parameter")
        requested = [s.strip() for s in form.get("scope", "").replace(" ", ",").split(",") if s.strip()]
        unknown = [s for s in requested if s not in self.scopes]
        if unknown:
            raise ImsError(400, "invalid_scope", f"invalid scope(s) {unknown} for this credential")
        token, ttl = self.issue(client_id, requested or self.scopes)
        return {"access_token": token, "token_type": "bearer", "expires_in": ttl}

    def caller(self, token: str) -> Caller | None:
        issued = self.tokens.get(token)
        if issued is None or issued.expires_at <= self.clock():
            return None
        return Caller(issued.client_id, issued.org_id)

    def expire_all(self) -> None:
        for issued in self.tokens.values():
            issued.expires_at = 0.0
