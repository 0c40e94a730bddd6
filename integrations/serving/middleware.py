"""The reward server's outermost ASGI layer: API key, body-size limit, request metrics, last-resort
errors. Handlers never see a request this layer refused.

* :class:`ApiKeyAuth`: ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (and, with
  ``--allow-query-api-key``, ``?api_key=KEY``), compared in constant time; ``/health`` and
  ``/ready`` stay open for probes.
* :class:`Guard`: refuses a ``Host`` or ``Origin`` the :class:`~.hosts.HostPolicy` does not
  allow; refuses a body over ``--max-body-mb`` from its ``Content-Length`` before reading it,
  and while reading one sent without (raising :class:`BodyTooLarge` into the app, whose handler
  answers 413); times the body out (``--body-timeout-s`` in all, ``--idle-timeout-s`` per
  chunk: :class:`~.errors.RequestTimeout`, 408, connection closed); counts every request in the
  metrics; answers an unhandled fault with a 500 when no response has started.

No web framework is imported here: the guard builds its answers through the ``respond`` callable
the app gives it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from apex_reward.errors import ConfigError

from .errors import (
    InvalidRequest,
    PayloadTooLarge,
    RequestError,
    RequestTimeout,
    Unauthorized,
)
from .hosts import HostPolicy
from .metrics import ServerMetrics

logger = logging.getLogger(__name__)

__all__ = ["ApiKeyAuth", "Guard", "BodyTooLarge", "drain", "OPEN_PATHS"]

#: Endpoints that answer without an API key (load balancer and orchestrator probes).
OPEN_PATHS = frozenset({"/health", "/ready"})

#: ``respond(error)`` -> an ASGI response answering that error (and counting it).
Respond = Callable[[BaseException], Any]


class BodyTooLarge(Exception):
    """Raised into the app when a body sent without Content-Length grows past the limit."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyAuth:
    """The API key check.

    Args:
        env_var: the environment variable holding the key (``--api-key-env``); None: no key.
        allow_query: also accept ``?api_key=KEY`` (``--allow-query-api-key``).

    Raises:
        ConfigError: ``env_var`` is set but the variable is unset or empty.
    """

    def __init__(self, env_var: str | None, allow_query: bool = False) -> None:
        self.allow_query = allow_query
        self._key_digest: bytes | None = None
        if env_var:
            key = os.environ.get(env_var, "")
            if not key:
                raise ConfigError(
                    f"serve: --api-key-env {env_var}: that environment variable is not set or empty"
                )
            self._key_digest = _digest(key)

    @property
    def required(self) -> bool:
        """Whether requests need a key."""
        return self._key_digest is not None

    def authorized(self, headers: dict[str, str], query_string: str) -> bool:
        """Whether the request carries the API key (constant-time comparison)."""
        if self._key_digest is None:
            return True
        candidates = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if "x-api-key" in headers:
            candidates.append(headers["x-api-key"].strip())
        if self.allow_query and query_string:
            candidates.extend(parse_qs(query_string).get("api_key", [])[:1])
        ok = False
        for c in candidates:
            ok |= hmac.compare_digest(_digest(c), self._key_digest)
        return ok

    def refusal(self, headers: dict[str, str], query_string: str) -> Unauthorized:
        """The 401 for a request :meth:`authorized` refused, saying what was wrong."""
        which = (
            "wrong API key"
            if ("authorization" in headers or "x-api-key" in headers)
            else "missing API key"
        )
        if "api_key=" in query_string and not self.allow_query:
            which += " (?api_key= is read only with --allow-query-api-key)"
        return Unauthorized(
            f"{which}: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
            {"WWW-Authenticate": "Bearer"},
        )


async def drain(receive: Callable[[], Awaitable[dict]], limit: int) -> None:
    """Read and discard the rest of a request body (at most ``limit`` bytes), so the client can
    finish sending and read the error response instead of hitting a reset connection."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def too_large(size: int | None, limit: int, max_body_mb: float) -> PayloadTooLarge:
    """The 413 for a body of ``size`` bytes (None: found while reading) over ``limit``."""
    what = (
        f"request body is {size} bytes; the limit is {limit}"
        if size is not None
        else (f"request body exceeds {limit} bytes")
    )
    return PayloadTooLarge(f"{what} (--max-body-mb {max_body_mb:g})")


class Guard:
    """Outermost ASGI layer: API key, body-size limit, request metrics, last-resort 500s.

    Args:
        app: the ASGI app it wraps.
        auth: the API key check.
        metrics: where requests are counted.
        max_body_bytes, max_body_mb: the body limit (bytes, and as the flag gave it).
        respond: builds the response answering an error.
        client_disconnect: the exception the framework raises when the client went away.
    """

    def __init__(
        self,
        app: Any,
        *,
        auth: ApiKeyAuth,
        metrics: ServerMetrics,
        max_body_bytes: int,
        max_body_mb: float,
        respond: Respond,
        client_disconnect: type[Exception],
        hosts: HostPolicy | None = None,
        body_timeout_s: float = math.inf,
        idle_timeout_s: float = math.inf,
    ) -> None:
        self.app = app
        self.hosts = hosts
        self.body_timeout_s = body_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.auth = auth
        self.metrics = metrics
        self.limit = max_body_bytes
        self.max_body_mb = max_body_mb
        self.respond = respond
        self.client_disconnect = client_disconnect

    def _timed(self, receive: Callable[[], Awaitable[dict]]) -> Callable[[], Awaitable[dict]]:
        """``receive`` under the body deadline (``--body-timeout-s`` from the headers) and the
        idle limit (``--idle-timeout-s`` per chunk); raises :class:`RequestTimeout` (408, closing
        the connection) when the client is too slow. Once the body is complete, reads (the
        wait for a disconnect) are not timed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout_s
        done = [False]

        async def timed_receive() -> dict:
            if done[0]:
                return await receive()
            left = deadline - loop.time()
            wait = min(self.idle_timeout_s, left)
            try:
                if wait <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), wait)
            except (TimeoutError, asyncio.TimeoutError):
                done[0] = True
                which = (
                    f"the body did not arrive within {self.body_timeout_s:g} s (--body-timeout-s)"
                    if wait >= left
                    else f"no data for {self.idle_timeout_s:g} s (--idle-timeout-s)"
                )
                raise RequestTimeout(
                    f"request too slow: {which}", {"Connection": "close"}
                ) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                done[0] = True
            return message

        return timed_receive

    def _refusal(
        self, path: str, headers: dict[str, str], query: str, method: str = "POST"
    ) -> RequestError | None:
        """The error refusing this request before the app sees it, or None."""
        if self.hosts is not None:
            refused = self.hosts.refusal(method, headers, path in OPEN_PATHS)
            if refused is not None:
                return refused
        if self.auth.required and path not in OPEN_PATHS:
            if not self.auth.authorized(headers, query):
                return self.auth.refusal(headers, query)
        declared = headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                size = -1
            if size < 0:
                return InvalidRequest(f"invalid Content-Length {declared!r}")
            if size > self.limit:
                return too_large(size, self.limit, self.max_body_mb)
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        status = [0]
        t0 = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        limit = self.limit
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        query = scope.get("query_string", b"").decode("latin-1")
        self.metrics.inflight.inc()
        timed_receive = self._timed(receive)
        try:
            refusal = self._refusal(path, headers, query, scope.get("method", "GET"))
            if refusal is not None:
                if not isinstance(refusal, InvalidRequest):
                    try:
                        await drain(
                            timed_receive,
                            4 * limit if isinstance(refusal, PayloadTooLarge) else limit,
                        )
                    except RequestTimeout:
                        pass  # answer anyway; the connection closes after it
                await self.respond(refusal)(scope, receive, send_wrapper)
                return
            received = [0]
            over = [False]

            async def limited_receive() -> dict:
                message = await timed_receive()
                if over[0] or message["type"] != "http.request":
                    return message
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    over[0] = True  # later reads (the drain) pass through
                    raise BodyTooLarge()
                return message

            await self.app(scope, limited_receive, send_wrapper)
        except self.client_disconnect:
            status[0] = status[0] or 499
        except Exception as e:
            logger.exception("unhandled error on %s", path)
            if not status[0]:
                try:
                    await self.respond(e)(scope, receive, send_wrapper)
                except Exception:  # the connection is gone
                    status[0] = 500
        finally:
            self.metrics.inflight.dec()
            self.metrics.observe_request(path, status[0] or 500, time.perf_counter() - t0)
