"""Which server a client request goes to: round-robin over several URLs with failover, and the
backoff between attempts (used by :class:`~.client.ApexRewardClient`)."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ServerRotation", "backoff_delay"]


class ServerRotation:
    """Round-robin over server base URLs; a server that refused a connection goes last for
    ``down_s`` seconds. Thread-safe; pickles without its lock."""

    def __init__(self, urls: list[str], down_s: float) -> None:
        self.urls = urls
        self.down_s = float(down_s)
        self._turn = 0
        self._down_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def order(self) -> list[str]:
        """The servers to try for one attempt, the next in turn first; servers that refused a
        connection less than ``down_s`` ago go last."""
        if len(self.urls) == 1:
            return self.urls
        with self._lock:
            start = self._turn
            self._turn = (self._turn + 1) % len(self.urls)
        order = self.urls[start:] + self.urls[:start]
        now = time.monotonic()
        up = [u for u in order if self._down_until.get(u, 0.0) <= now]
        return up + [u for u in order if u not in up]

    def mark_down(self, base: str) -> None:
        """``base`` could not be reached: try the others first for ``down_s`` seconds."""
        if len(self.urls) > 1:
            logger.warning("%s cannot be reached; trying the other servers", base)
            self._down_until[base] = time.monotonic() + self.down_s


def backoff_delay(attempt: int, retry_after: str | None, backoff_s: float) -> float:
    """Seconds to wait before retry ``attempt + 1``: exponential from ``backoff_s`` with jitter,
    at least the server's ``Retry-After``, at most 30 s."""
    base = backoff_s * (2**attempt)
    if retry_after:
        try:
            base = max(base, float(retry_after))
        except ValueError:
            pass
    return min(30.0, base + random.uniform(0, backoff_s))
