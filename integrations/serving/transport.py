"""The server's HTTP connection layer: JSON errors below the app, header timeouts, log redaction.

uvicorn answers what never reaches the ASGI app itself: a request it cannot parse (a bad
``Content-Length``, a malformed request line or header) gets a plain-text 400, and a client that
opens a connection and sends its headers slowly, or never, holds the connection for as long as
it likes. :class:`ApexHTTPProtocol` is uvicorn's h11 protocol with both fixed:

* the 400 is the server's JSON error shape (``{"error": {"type": "InvalidRequest", ...}}``);
* the request line and headers must arrive within ``--idle-timeout-s`` of the connection
  opening (or of the previous response); otherwise the client gets a JSON 408 and the connection
  is closed. (The body is timed by the :class:`~.middleware.Guard`.)

:func:`uvicorn_options` gives the keyword arguments ``uvicorn.run``/``uvicorn.Config`` need for
it; :class:`RedactApiKey` hides API keys in access-log lines, however the query spells them.
uvicorn and h11 are imported only when :func:`protocol_class` is called.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import unquote_plus

from .config import ServeConfig
from .errors import error_payload

__all__ = ["protocol_class", "uvicorn_options", "RedactApiKey", "redact_query", "raw_error"]

#: The query parameter holding an API key (``--allow-query-api-key``).
_KEY_PARAM = "api_key"


def redact_query(target: str) -> str:
    """``target`` (a path with its query) with every ``api_key`` value replaced by ``***``.

    The parameter name is compared after URL decoding, as the server reads it
    (``api%5Fkey``, ``%61pi_key`` and ``api_key`` are the same parameter).
    """
    path, sep, query = target.partition("?")
    if not sep:
        return target
    parts = []
    for pair in query.split("&"):
        name, eq, _value = pair.partition("=")
        if eq and unquote_plus(name) == _KEY_PARAM:
            pair = f"{name}=***"
        parts.append(pair)
    return f"{path}?{'&'.join(parts)}"


class RedactApiKey(logging.Filter):
    """Hides ``api_key`` query values in uvicorn's access-log lines (see :func:`redact_query`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                redact_query(a) if isinstance(a, str) and "?" in a else a for a in record.args
            )
        return True


def raw_error(status: int, reason: str, kind: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the server's JSON shape, closing the connection."""
    body = json.dumps(error_payload(kind, message)).encode("utf-8")
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_PROTOCOL: Any = None


def protocol_class() -> type:
    """uvicorn's h11 protocol with JSON 400s and a header timeout (built once, on first use).

    The header timeout is read from the uvicorn config attribute ``apex_idle_timeout_s``
    (:func:`uvicorn_options` sets it); without it there is none.
    """
    global _PROTOCOL
    if _PROTOCOL is not None:
        return _PROTOCOL
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class ApexHTTPProtocol(H11Protocol):
        """uvicorn's h11 protocol; answers in JSON and times out slow request headers."""

        _header_timer: Any = None
        _answered = False  # a response was sent on this connection

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._answered = True
            self._arm()

        def _waiting_for_headers(self) -> bool:
            busy = self.cycle is not None and not self.cycle.response_complete
            return self.conn.their_state is h11.IDLE and not busy

        def _arm(self) -> None:
            timeout = getattr(self.config, "apex_idle_timeout_s", None)
            if not timeout or self.transport.is_closing():
                return
            if not self._waiting_for_headers():
                self._disarm()
            elif self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout, self._headers_timed_out)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._waiting_for_headers():
                return
            timeout = getattr(self.config, "apex_idle_timeout_s", 0)
            if self._answered and not self.conn.trailing_data[0]:
                self.transport.close()  # an idle keep-alive connection: nothing to answer
                return
            self.transport.write(
                raw_error(
                    408,
                    "Request Timeout",
                    "RequestTimeout",
                    f"request too slow: no complete request headers within {timeout:g} s "
                    "(--idle-timeout-s)",
                )
            )
            self.transport.close()

        def send_400_response(self, msg: str) -> None:
            self._disarm()
            self.transport.write(
                raw_error(
                    400,
                    "Bad Request",
                    "InvalidRequest",
                    "invalid HTTP request: the request line, a header or the Content-Length "
                    "cannot be parsed",
                )
            )
            self.transport.close()

    _PROTOCOL = ApexHTTPProtocol
    return _PROTOCOL


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.Config`` that put :func:`protocol_class` in place.

    ``uvicorn.Config`` takes no header timeout, so the caller sets it on the config object:
    ``cfg = uvicorn.Config(app, **opts); cfg.apex_idle_timeout_s = config.idle_timeout_s``
    (:func:`configure` does both).
    """
    return {"http": protocol_class()}


def configure(uvicorn_config: Any, config: ServeConfig) -> Any:
    """Set the header timeout of ``config`` on a ``uvicorn.Config`` built with
    :func:`uvicorn_options`; returns it."""
    uvicorn_config.apex_idle_timeout_s = float(config.idle_timeout_s)
    return uvicorn_config
