"""How calls to Adobe are repeated: which failures, how often, how long to wait in between.

One policy for IMS and the platform APIs. What may be repeated at all is the caller's question
(``PlatformHttp.request``): a read or a delete can be sent again, a create cannot, since Adobe may
have done it even when its answer never came.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_TIMEOUT_S = 60.0  # one call, from sending it to the end of its answer


@dataclass(frozen=True)
class RetrySettings:
    attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    max_retry_after_s: float = 120.0

    def delay_s(self, attempt: int, retry_after: str | None = None) -> float:
        """The wait after failed attempt ``attempt`` (1-based): exponential, jittered so that
        several copies of a script do not retry in step, at least the server's ``Retry-After``
        (seconds; capped)."""
        delay = min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1))
        delay = random.uniform(delay / 2, delay)
        if retry_after is not None:
            try:
                delay = max(delay, min(float(retry_after), self.max_retry_after_s))
            except ValueError:
                pass  # an HTTP date: rare here, the backoff is fine
        return delay

    async def pause(self, attempt: int, retry_after: str | None = None) -> None:
        await asyncio.sleep(self.delay_s(attempt, retry_after))
