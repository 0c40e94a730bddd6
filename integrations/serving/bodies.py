"""Reading request bodies: the clips a request carries, from multipart uploads, JSON or raw audio.

Each function takes a Starlette request and the
:class:`~apex_reward.integrations.serving.state.ServerState`, refuses a malformed body with a
typed :class:`~apex_reward.integrations.serving.errors.RequestError` (empty body, wrong
Content-Type, invalid JSON, a body that fails its :mod:`.schemas` model), and gives back the
decoded clips; a clip that cannot be decoded carries its
:class:`~apex_reward.integrations.serving.errors.ClipError` instead of failing the request.
"""

from __future__ import annotations

import json
from typing import Any

from .admission import decode_clip, decode_pcm_request, decode_request
from .errors import (
    ClipError,
    EmptyBody,
    InvalidJSON,
    InvalidRequest,
    RequestError,
    TooManyClips,
    UnsupportedMediaType,
)
from .state import Clip, ServerState

__all__ = [
    "media_type",
    "PCM_MEDIA_TYPE",
    "pcm_format",
    "unsupported",
    "require_body",
    "read_json",
    "one_clip",
    "batch_clips",
    "compare_clips",
]

#: Longest clip name kept from an upload or a header.
_MAX_NAME = 200


def media_type(headers: Any) -> str:
    """The Content-Type without parameters, lower case (``""`` when absent)."""
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


#: Content-Type of a raw PCM body: ``audio/pcm; rate=24000`` with optional ``channels=2``
#: (interleaved, default 1) and ``format=f32le`` (default ``s16le``, 16-bit little-endian).
PCM_MEDIA_TYPE = "audio/pcm"


def pcm_format(headers: Any) -> dict[str, Any]:
    """The ``encoding``, ``sample_rate`` and ``channels`` of an ``audio/pcm`` body, from its
    Content-Type parameters.

    Raises:
        InvalidRequest: no ``rate``, a non-integer ``rate``/``channels``, an unknown parameter.
    """
    params: dict[str, str] = {}
    for part in headers.get("content-type", "").split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip():
            params[key.strip().lower()] = value.strip().strip('"')
    unknown = sorted(set(params) - {"rate", "channels", "format"})
    if unknown:
        raise InvalidRequest(
            f"audio/pcm: unknown parameter(s) {unknown}; use rate, channels, format"
        )
    if "rate" not in params:
        raise InvalidRequest("audio/pcm needs its sample rate: 'Content-Type: audio/pcm; rate=N'")
    try:
        rate, channels = int(params["rate"]), int(params.get("channels", "1"))
    except ValueError:
        raise InvalidRequest("audio/pcm: 'rate' and 'channels' must be integers") from None
    return {
        "encoding": params.get("format", "s16le").lower(),
        "sample_rate": rate,
        "channels": channels,
    }


def unsupported(request: Any, accepted: str) -> UnsupportedMediaType:
    """The 415 for a request whose Content-Type is not ``accepted``."""
    got = request.headers.get("content-type")
    what = f"Content-Type {got!r} is not accepted" if got else "no Content-Type header"
    return UnsupportedMediaType(f"{what}; send {accepted}")


def require_body(request: Any) -> None:
    """Refuse a request that declares an empty body."""
    if request.headers.get("content-length") == "0":
        raise EmptyBody("the request body is empty")


async def _read_body(request: Any) -> bytes:
    body = await request.body()
    if not body:
        raise EmptyBody("the request body is empty")
    return body


async def read_json(request: Any, state: ServerState) -> Any:
    """The body parsed as JSON (on the decode pool: a large body must not block the loop)."""
    body = await _read_body(request)
    try:
        return await state.run_blocking(json.loads, body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidJSON(f"the body is not valid JSON ({e})") from None
    except RecursionError:
        raise InvalidJSON("the body's JSON is nested too deeply") from None


async def _form(request: Any, max_files: int) -> tuple[dict[str, tuple[str, bytes]], list, dict]:
    """The multipart body: ``({field: (file name, bytes)}, [(name, bytes)] in order, {field:
    text})``."""
    from starlette.datastructures import UploadFile

    by_field: dict[str, tuple[str, bytes]] = {}
    files: list[tuple[str, bytes]] = []
    fields: dict[str, str] = {}
    async with request.form(max_files=max_files, max_fields=16) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                item = ((value.filename or key)[:_MAX_NAME], await value.read())
                files.append(item)
                by_field.setdefault(key, item)
            else:
                fields.setdefault(key, value)
    return by_field, files, fields


def _json_clip(state: ServerState, data: Any, default_name: str) -> tuple[str, Any]:
    """A JSON clip object -> ``(name, source)``; raises a :class:`RequestError`."""
    from .schemas import ClipRef, validate

    clip = validate(ClipRef, data, default_name)
    name = clip.name or default_name
    return name, state.decoder.source_of(clip, name)


async def one_clip(request: Any, state: ServerState) -> Clip:
    """The one clip of a ``/v1/score`` request, decoded (or failed)."""
    require_body(request)
    media = media_type(request.headers)
    if media == "multipart/form-data":
        _, files, _ = await _form(request, max_files=1)
        if len(files) != 1:
            raise InvalidRequest("expected one file part in the multipart body, got none")
        name, source = files[0]
        if not source:
            raise EmptyBody(f"{name}: the uploaded file is empty")
        return await decode_clip(state, name, source)
    if media == "application/json":
        name, src = _json_clip(state, await read_json(request, state), "clip")
        return await decode_clip(state, name, src)
    if media == PCM_MEDIA_TYPE:
        body = await _read_body(request)
        name = request.headers.get("x-audio-name", "upload")[:_MAX_NAME]
        return await decode_pcm_request(state, name, body, **pcm_format(request.headers))
    if media.startswith("audio/") or media == "application/octet-stream":
        body = await _read_body(request)
        name = request.headers.get("x-audio-name", "upload")[:_MAX_NAME]
        return await decode_clip(state, name, body)
    raise unsupported(request, "multipart/form-data, application/json or an audio/* body")


async def batch_clips(request: Any, state: ServerState) -> list[Clip]:
    """The clips of a ``/v1/score/batch`` request; a malformed clip fails alone."""
    from .schemas import BatchRequest, validate

    require_body(request)
    media = media_type(request.headers)
    limit = state.config.max_clips_per_request
    if media == "multipart/form-data":
        _, files, _ = await _form(request, max_files=limit)
        if not files:
            raise InvalidRequest("no file parts in the multipart body")
        return await decode_request(state, files)
    if media != "application/json":
        raise unsupported(request, "multipart/form-data or application/json")
    items = validate(BatchRequest, await read_json(request, state), "batch").clips
    if len(items) > limit:
        raise TooManyClips(f"{len(items)} clips in one request; the limit is {limit}")

    def one(i: int, item: Any) -> tuple[str, Any]:
        try:
            return _json_clip(state, item, f"clips[{i}]")
        except RequestError as e:
            return f"clips[{i}]", ClipError(f"clips[{i}]", e)

    return await decode_request(state, [one(i, it) for i, it in enumerate(items)])


async def compare_clips(request: Any, state: ServerState) -> tuple[list[Clip], bool]:
    """Clips ``a`` and ``b`` of a ``/v1/compare`` request, and ``is_instrumental``."""
    from .schemas import CompareRequest, validate

    require_body(request)
    media = media_type(request.headers)
    if media == "multipart/form-data":
        parts, _, fields = await _form(request, max_files=2)
        instrumental = False
        flag = fields.get("is_instrumental")
        if flag is not None:
            if flag.lower() not in ("0", "1", "true", "false"):
                raise InvalidRequest("'is_instrumental' must be true/false/1/0")
            instrumental = flag.lower() in ("1", "true")
        missing = [k for k in ("a", "b") if k not in parts]
        if missing:
            raise InvalidRequest(f"missing file part(s) {missing}")
        sources = [parts["a"], parts["b"]]
    elif media == "application/json":
        body = validate(CompareRequest, await read_json(request, state), "compare")
        instrumental = body.is_instrumental
        sources = []
        for key, clip in (("a", body.a), ("b", body.b)):
            name = clip.name or key
            sources.append((name, state.decoder.source_of(clip, name)))
    else:
        raise unsupported(request, "multipart/form-data or application/json")
    clips = await decode_request(state, sources)
    for which, clip in zip("ab", clips):
        if clip.error is not None:
            raise clip.error.with_prefix(f"clip {which}: ")
    return list(clips), instrumental
