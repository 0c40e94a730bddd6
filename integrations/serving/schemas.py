"""Request bodies of the reward server as pydantic models, and how a failed validation is answered.

pydantic comes with FastAPI (the ``serve`` extra); this module imports it at import time, so only
the app imports it. JSON bodies are parsed with :func:`json.loads` first (a body that is not JSON
is ``InvalidJSON``), then validated with :func:`validate`, which turns a
``pydantic.ValidationError`` into one typed 4xx error naming the field: ``InvalidRequest``, or
``InvalidBase64`` for a ``base64`` field that is not a string.

Unknown fields are refused in clip objects and in ``/v1/compare`` bodies; the batch and
``/get_reward`` bodies ignore them (OpenRLHF may add keys).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from .errors import InvalidBase64, InvalidRequest, RequestError

__all__ = ["ClipRef", "BatchRequest", "CompareRequest", "RewardRequest", "validate"]

M = TypeVar("M", bound=BaseModel)

#: Longest clip name kept (longer ones are cut).
MAX_NAME = 200


#: A non-empty string; pydantic refuses strings JSON lets through that are not valid UTF-8 (lone
#: surrogates).
Text = Annotated[StrictStr, Field(min_length=1)]


class ClipRef(BaseModel):
    """One clip in a JSON body: ``{"base64": ..., "name": ...}`` or ``{"path": ..., "name": ...}``.

    ``base64`` is a whole audio file (a ``data:...;base64,`` prefix and whitespace allowed);
    ``path`` is a server-side path, honoured under ``--allow-dir`` only.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    base64: Any = None
    path: Text | None = None
    name: Text | None = None

    @field_validator("base64")
    @classmethod
    def _base64_is_text(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, str):
            raise PydanticCustomError("InvalidBase64", "'base64' must be a string")
        return value

    @field_validator("path")
    @classmethod
    def _path_has_no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise PydanticCustomError("InvalidRequest", "'path' must not contain NUL")
        return value

    @field_validator("name")
    @classmethod
    def _short_name(cls, value: str | None) -> str | None:
        return value[:MAX_NAME] if value is not None else None

    @model_validator(mode="after")
    def _one_source(self) -> ClipRef:
        if (self.base64 is None) == (self.path is None):
            raise PydanticCustomError("InvalidRequest", "give exactly one of 'base64' and 'path'")
        return self


class BatchRequest(BaseModel):
    """``POST /v1/score/batch`` as JSON: ``{"clips": [clip, ...]}``.

    The clips stay unvalidated here: each is validated on its own (:class:`ClipRef`), so one
    malformed clip gets an error row and never fails the others.
    """

    clips: list[Any] = Field(min_length=1)


class CompareRequest(BaseModel):
    """``POST /v1/compare`` as JSON: ``{"a": clip, "b": clip, "is_instrumental": false}``."""

    model_config = ConfigDict(extra="forbid")

    a: ClipRef
    b: ClipRef
    is_instrumental: StrictBool = False


class RewardRequest(BaseModel):
    """OpenRLHF's ``POST /get_reward`` body: ``{"query": [...], "prompts": [...], "labels":
    [...]}``; ``prompts`` and ``labels`` are optional and, when given, as long as ``query``."""

    query: list[StrictStr]
    prompts: list[Any] | None = None
    labels: list[Any] | None = None

    @model_validator(mode="after")
    def _same_lengths(self) -> RewardRequest:
        n = len(self.query)
        for key in ("prompts", "labels"):
            value = getattr(self, key)
            if value is not None and len(value) != n:
                raise PydanticCustomError(
                    "InvalidRequest",
                    "'{key}' must be a list as long as 'query' ({n})",
                    {"key": key, "n": n},
                )
        return self

    def column(self, key: str) -> list[Any]:
        """``prompts`` or ``labels``, with ``None`` for each query when absent."""
        value = getattr(self, key)
        return list(value) if value is not None else [None] * len(self.query)


def _describe(e: ValidationError, where: str) -> RequestError:
    """The first validation problem as a typed error naming the field."""
    first = e.errors(include_url=False, include_input=False)[0]
    kind = first["type"]
    loc = ".".join(str(p) for p in first["loc"])
    if kind == "extra_forbidden":
        text = f"unknown field {loc!r}"
    elif kind == "missing":
        text = f"missing field {loc!r}"
    elif kind == "model_type" or kind == "model_attributes_type":
        text = f"expected a JSON object{f' for {loc!r}' if loc else ''}"
    else:
        text = f"{loc}: {first['msg']}" if loc else first["msg"]
    cls = InvalidBase64 if kind == "InvalidBase64" else InvalidRequest
    return cls(f"{where}: {text}")


def validate(model: type[M], data: Any, where: str) -> M:
    """``model`` validated from parsed JSON ``data``.

    Raises:
        InvalidRequest: a missing, unknown or mistyped field (the message names it and
            ``where``, e.g. ``"clips[3]"``).
        InvalidBase64: a ``base64`` field that is not a string.
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise _describe(e, where) from None
