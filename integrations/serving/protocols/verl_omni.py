"""verl-omni's HTTP audio scorer protocol, version 1: ``POST /v1/verl/score``.

verl-omni's audio reward client posts one JSON object per rollout sample::

    {"protocol_version": "1", "waveform_f32_base64": "<little-endian float32 samples>",
     "num_samples": 240000, "sample_rate": 24000, "prompt": "...", "metadata": {"id": "..."}}

and reads back ``{"score": float, ...}`` in which every other value is a finite JSON scalar (it
refuses anything else), or fails the sample on ``{"error": ...}`` or a non-200 status; it
retries on 408, 429 and 5xx. The waveform is mono (``num_samples`` samples at
``sample_rate``) and is read by the server's one raw-PCM reader
(:meth:`~apex_reward.integrations.serving.decoding.ClipDecoder.decode_pcm`), so no container is
parsed.

The answer: ``score`` (the served reward, under the server's ``--guard``), ``apex_<name>`` for
each score of the checkpoint, ``apex_flagged`` (1.0 when a signal check fired), one
``apex_signal_<name>`` per signal unless the guard is ``off``, and ``duration_s``; the key set
depends only on the checkpoint and the guard. Audio that cannot be scored (empty, NaN or
infinite samples, a rate the server does not accept, too short or too long, ``num_samples`` not
matching the data) is answered 422 ``{"error": {"type", "message"}}``, which the client does not
retry; a full queue is 503, which it does. ``prompt`` and ``metadata`` are validated and not
used: APEX scores the audio alone.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from apex_reward.signals import SIGNAL_NAMES

from ..admission import decode_pcm_request
from ..errors import ModelOutputError

if TYPE_CHECKING:
    from apex_reward.scoring import ScoreResult

    from ..state import ServerState

__all__ = ["PROTOCOL_VERSION", "ScorerRequest", "score", "answer"]

#: The protocol version this endpoint speaks.
PROTOCOL_VERSION = "1"

_Scalar = StrictStr | StrictInt | StrictFloat | StrictBool | None


class ScorerRequest(BaseModel):
    """The request body of protocol v1 (unknown top-level keys are ignored)."""

    model_config = ConfigDict(frozen=True)

    protocol_version: Literal["1"]
    waveform_f32_base64: StrictStr
    num_samples: StrictInt = Field(ge=0)
    sample_rate: StrictInt
    prompt: StrictStr = ""
    metadata: dict[str, _Scalar] = Field(default_factory=dict)


def answer(result: ScoreResult, score_names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """The protocol's answer for a scored clip: ``{"score", "apex_<name>"..., "apex_flagged",
    "apex_signal_<name>"..., "duration_s"}``, every value a finite float.

    Raises:
        ModelOutputError: a value is missing or not finite (never answered as a score).
    """
    out = {"score": float(result.reward if result.reward is not None else math.nan)}
    scores = result.scores or {}
    for name in score_names:
        out[f"apex_{name}"] = float(scores.get(name, math.nan))
    out["apex_flagged"] = 1.0 if result.flags else 0.0
    if result.signals is not None:
        for name in SIGNAL_NAMES:
            out[f"apex_signal_{name}"] = float(result.signals.get(name, 0.0))
    out["duration_s"] = float(result.duration_s or 0.0)
    bad = sorted(k for k, v in out.items() if not math.isfinite(v))
    if bad:
        raise ModelOutputError(f"waveform: non-finite values for {bad}")
    return out


async def score(state: ServerState, body: Any) -> dict[str, float]:
    """Answer one request whose parsed JSON is ``body``.

    Raises:
        InvalidRequest: not a v1 request (missing or mistyped field, another protocol version).
        InvalidBase64: ``waveform_f32_base64`` is not base64.
        ClipError: the waveform cannot be scored (its status: 422 for bad audio, 503 when the
            server is overloaded).
    """
    from ..schemas import validate

    request = validate(ScorerRequest, body, "verl score request")
    name = "waveform"
    data = state.decoder.b64decode(request.waveform_f32_base64, name)
    clip = await decode_pcm_request(
        state,
        name,
        data,
        encoding="f32le",
        sample_rate=request.sample_rate,
        channels=1,
        num_samples=request.num_samples,
    )
    if clip.error is not None:
        raise clip.error
    result = await state.score_one(clip)
    return answer(result, state.model.score_names)
