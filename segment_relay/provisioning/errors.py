"""Errors of the provisioning commands: each one line that says what failed and what to do."""

from __future__ import annotations


class ProvisioningError(Exception):
    """Provisioning cannot go on; the message is meant for a person."""


class AdobeApiError(ProvisioningError):
    """An Adobe API answered with an error (after retries, where retrying made sense)."""

    def __init__(self, message: str, *, status: int, request_id: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.request_id = request_id
        self.code = code


class UncertainOutcome(ProvisioningError):
    """A write that got no answer (a timeout, a dropped connection): Adobe may have done it, may
    still be doing it, or may never have seen it. Sending it again could do it twice; the caller
    finds out what happened first."""

    def __init__(self, message: str, *, method: str, path: str) -> None:
        super().__init__(message)
        self.method = method
        self.path = path
