"""The reward server's errors and the one mapping from an error's type to its HTTP answer.

Every error the server answers is ``{"error": {"type": ..., "message": ...}}`` with a status
that :func:`status_of` reads from the error's class, walking :data:`STATUS_BY_TYPE` in order:

* the request's fault, 4xx: the :class:`RequestError` family (malformed JSON or schema, bad
  base64, empty body, too many clips, a path outside ``--allow-dir``, a missing API key, a body
  over ``--max-body-mb`` ...) and audio that cannot be scored
  (:class:`~apex_reward.errors.AudioError` subclasses, and a
  :class:`~apex_reward.errors.ConfigError` raised while handling the request) -> 422;
* back-pressure, 503 with ``Retry-After``: a full queue, a batch worker that is not running, a
  request not scored within ``--request-timeout-s``;
* the server's fault, 500: a :class:`~apex_reward.errors.CheckpointError`, a missing dependency,
  and any other exception (answered as ``InternalError``).

A clip that fails inside a request becomes a :class:`ClipError`: the exception itself, with its
status, type and message, so a batch endpoint can answer it in its row and a single-clip
endpoint can raise it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from apex_reward.errors import (
    ApexError,
    AudioError,
    CheckpointError,
    ConfigError,
    MissingDependencyError,
)

from .batcher import BatcherStoppedError, OverloadedError

if TYPE_CHECKING:
    from apex_reward.scoring import ScoreResult

__all__ = [
    "RequestError",
    "InvalidRequest",
    "InvalidJSON",
    "InvalidBase64",
    "EmptyBody",
    "TooManyClips",
    "NoAudioReference",
    "Unauthorized",
    "PathNotAllowed",
    "NotFound",
    "MethodNotAllowed",
    "PayloadTooLarge",
    "UnsupportedMediaType",
    "RequestTimeout",
    "HostNotAllowed",
    "OriginNotAllowed",
    "ClientGone",
    "NotReady",
    "ScoringTimeout",
    "ModelOutputError",
    "STATUS_BY_TYPE",
    "status_of",
    "type_of",
    "ClipError",
    "error_payload",
]


class RequestError(Exception):
    """A request the server refuses; the class name is the JSON error ``type``.

    Attributes:
        message: what is wrong, naming the offending part of the request.
        headers: extra response headers (e.g. ``WWW-Authenticate``), or None.
    """

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers


class InvalidRequest(RequestError):
    """The request's shape is wrong: a missing or unknown field, a value of the wrong type."""


class InvalidJSON(RequestError):
    """The body is not valid JSON (or is nested too deeply)."""


class InvalidBase64(RequestError):
    """A ``base64`` field is not standard base64 (or a ``data:`` URI that is not ``;base64,``)."""


class EmptyBody(RequestError):
    """The request body, or an uploaded file, is empty."""


class TooManyClips(RequestError):
    """More clips than ``--max-clips-per-request`` in one request."""


class NoAudioReference(RequestError):
    """An OpenRLHF sample names no audio (no ``data:audio/...`` or ``file://`` reference)."""


class Unauthorized(RequestError):
    """The API key is missing or wrong."""


class PathNotAllowed(RequestError):
    """A server-side path while paths are off, or one outside ``--allow-dir``."""


class NotFound(RequestError):
    """No endpoint at that path."""


class MethodNotAllowed(RequestError):
    """The endpoint does not take that HTTP method."""


class PayloadTooLarge(RequestError):
    """The request body exceeds ``--max-body-mb``."""


class RequestTimeout(RequestError):
    """The client sent its request too slowly (``--body-timeout-s``, ``--idle-timeout-s``)."""


class HostNotAllowed(RequestError):
    """The ``Host`` header names a host outside ``--allowed-hosts`` (DNS rebinding guard)."""


class OriginNotAllowed(RequestError):
    """A state-changing request from a web page whose ``Origin`` is not in
    ``--allowed-origins``."""


class ClientGone(ApexError):
    """The client closed the connection before its clips were scored (they are dropped)."""


class UnsupportedMediaType(RequestError):
    """The Content-Type is not one the endpoint takes."""


class NotReady(ApexError):
    """The server is warming up or its batch worker is not running."""


class ScoringTimeout(ApexError):
    """A clip was not scored within ``--request-timeout-s``."""


class ModelOutputError(RuntimeError):
    """Scoring a clip failed inside the model without an exception (e.g. non-finite scores)."""


#: Error class -> HTTP status; the first entry the error is an instance of wins, anything else
#: is 500. The one place statuses are decided.
STATUS_BY_TYPE: tuple[tuple[type[BaseException], int], ...] = (
    (Unauthorized, 401),
    (PathNotAllowed, 403),
    (OriginNotAllowed, 403),
    (RequestTimeout, 408),
    (NotFound, 404),
    (MethodNotAllowed, 405),
    (PayloadTooLarge, 413),
    (UnsupportedMediaType, 415),
    (RequestError, 400),
    (OverloadedError, 503),
    (BatcherStoppedError, 503),
    (NotReady, 503),
    (ScoringTimeout, 503),
    (ClientGone, 499),
    (AudioError, 422),
    (ConfigError, 422),
    (CheckpointError, 500),
    (MissingDependencyError, 500),
)

#: JSON ``type`` of errors whose class name is not the name clients know.
_TYPE_NAMES: dict[type[BaseException], str] = {
    OverloadedError: "Overloaded",
    BatcherStoppedError: "NotReady",
    ScoringTimeout: "Timeout",
}


def status_of(error: BaseException) -> int:
    """The HTTP status answering ``error`` (see :data:`STATUS_BY_TYPE`)."""
    for cls, status in STATUS_BY_TYPE:
        if isinstance(error, cls):
            return status
    return 500


def type_of(error: BaseException) -> str:
    """The JSON error ``type`` of ``error``: its class name for errors the server or apex_reward
    raise on purpose, ``"InternalError"`` for anything unexpected."""
    for cls, name in _TYPE_NAMES.items():
        if isinstance(error, cls):
            return name
    if isinstance(error, (RequestError, ApexError)):
        return type(error).__name__
    return "InternalError"


def _message_of(error: BaseException) -> str:
    if isinstance(error, (RequestError, ApexError)):
        return str(error)
    return f"{type(error).__name__}: {error}"


class ClipError(Exception):
    """One clip of a request that could not be scored.

    Attributes:
        name: the clip's name in the request (``"clips[2]"``, an upload's file name ...).
        error: the exception that stopped it (an ``AudioError``, a :class:`RequestError`, a
            ``CheckpointError``, an unexpected fault ...), without its traceback: the frames
            of the call that failed hold the upload's bytes and decoded audio.
        status: the HTTP status :func:`status_of` gives ``error``.
        type: the JSON error type (:func:`type_of`).
        message: what went wrong, for the client.
    """

    def __init__(self, name: str, error: BaseException, message: str | None = None) -> None:
        self.name = name
        self.error = error.with_traceback(None)
        self.status = status_of(error)
        self.type = type_of(error)
        self.message = message if message is not None else _message_of(error)
        super().__init__(self.message)

    @property
    def retryable(self) -> bool:
        """Whether the client should retry (a 503: back-pressure, not a bad clip)."""
        return self.status == 503

    def with_prefix(self, prefix: str) -> ClipError:
        """The same error with ``prefix`` before its message (e.g. ``"clip a: "``)."""
        return ClipError(self.name, self.error, prefix + self.message)

    def to_json(self) -> dict[str, str]:
        """``{"type", "message"}``, the error object of a response or a batch row."""
        return {"type": self.type, "message": self.message}


def error_payload(type: str, message: str) -> dict[str, Any]:
    """The body of an error response: ``{"error": {"type", "message"}}``."""
    return {"error": {"type": type, "message": message}}


def result_error(r: ScoreResult) -> ClipError:
    """The typed error of a clip the model could not score."""
    message = f"{r.input}: {r.error}" if r.error and r.input else (r.error or "failed")
    # no exception: the model's output was unusable (e.g. non-finite scores), a server fault
    error = r.exception if r.exception is not None else ModelOutputError(message)
    if type_of(error) == "InternalError":
        message = f"{r.error_type}: {message}"
    return ClipError(r.input, error, message)
