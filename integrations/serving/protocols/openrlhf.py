"""OpenRLHF's remote reward protocol: ``POST /get_reward``.

OpenRLHF posts ``{"query": [...], "prompts": [...], "labels": [...]}`` (query = prompt + response
text) and reads ``rewards``, ``scores`` and ``extra_logs``. The audio of sample *i* is the last
audio reference (:func:`find_audio_reference`) in the response part of ``query[i]`` (the text
after ``prompts[i]`` when the query starts with it), else in ``labels[i]``.

With ``--decoder module:function`` the server instead turns each response (the text after the
prompt: words, or codec tokens spelled as text) into audio with that function
(:func:`~apex_reward.integrations.decoders.decode_response`), checked under the server's limits.

The reply has one entry per query: ``rewards``, ``scores`` (the ``--openrlhf-score`` score),
``extra_logs`` (``apex_ok``, ``apex_flagged`` and ``apex_<score>`` per sample) and ``errors``
(null, or the problem); it is built by :class:`~apex_reward.integrations.reward_logs.RewardLogs`.
A sample without scoreable audio gets ``--failure-reward``, ``apex_ok = 0``, its error, and the
mean of scored samples in its score logs (so failures do not drag logged means down); it is
counted and written to ``--failure-log``. One bad rollout never fails the batch.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

import torch

from apex_reward.errors import AudioShapeError
from apex_reward.scoring import ScoreResult

from ...decoders import decode_response
from ...reward_logs import response_text
from ..admission import admit_decoded, decode_request
from ..errors import ClipError, NoAudioReference, RequestError, TooManyClips
from ..state import Clip

if TYPE_CHECKING:
    from ..state import ServerState

__all__ = ["find_audio_reference", "reference_for", "get_reward", "decode_checked"]

_DATA_URI = re.compile(
    r"data:(?:audio/[A-Za-z0-9.+-]+|application/octet-stream)(?:;[A-Za-z0-9.+-]+=[A-Za-z0-9.+-]+)*"
    r";base64,([A-Za-z0-9+/]*={0,2})"
)
_FILE_URI = re.compile(r"file://(/[^\s\"'<>]*)")


def find_audio_reference(text: str) -> tuple[Literal["base64", "path"], str] | None:
    """The last audio reference in ``text``: ``("base64", payload)`` or ``("path", path)``.

    Two forms are recognised anywhere in the text (the convention of ``/get_reward``):

    * a data URI ``data:audio/<type>;base64,<payload>`` (or ``application/octet-stream``) whose
      payload is a whole audio file (WAV, FLAC, Ogg, MP3) in standard base64 without line breaks;
    * a file URI ``file:///absolute/path.wav`` (percent-encoded, e.g. ``%20`` for a space); it
      ends at whitespace, a quote, ``<`` or ``>``, and trailing ``.,;:!?)]}`` are dropped. It is
      honoured only when the server allows paths (``--allow-dir``) and the file lies inside it.

    Returns None when the text holds neither.
    """
    best: tuple[int, Literal["base64", "path"], str] | None = None
    for m in _DATA_URI.finditer(text):
        best = (m.start(), "base64", m.group(1))
    for m in _FILE_URI.finditer(text):
        if best is None or m.start() > best[0]:
            best = (m.start(), "path", unquote(m.group(1).rstrip(".,;:!?)]}")))
    return None if best is None else (best[1], best[2])


def reference_for(query: str, prompt: Any, label: Any) -> tuple[str, str] | None:
    """The audio reference of one OpenRLHF sample: in the response part of the query (the text
    after the prompt, when the query starts with it), else in the label."""
    ref = find_audio_reference(response_text(query, prompt))
    if ref is None and isinstance(label, str):
        ref = find_audio_reference(label)
    return ref


async def get_reward(state: ServerState, body: Any, receive: Any = None) -> dict[str, Any]:
    """Answer one ``/get_reward`` request whose parsed JSON is ``body`` (``receive``: the
    request's ASGI receive, to drop its clips if the client goes away).

    Raises:
        InvalidRequest: not ``{"query": [str, ...]}``, or ``prompts``/``labels`` of another length.
        TooManyClips: more queries than ``--max-clips-per-request``.
    """
    from ..schemas import RewardRequest, validate  # pydantic: only where the app runs

    config = state.config
    request = validate(RewardRequest, body, "get_reward")
    queries = request.query
    if len(queries) > config.max_clips_per_request:
        raise TooManyClips(
            f"{len(queries)} queries in one request; the limit is {config.max_clips_per_request}"
        )
    prompts, labels = request.column("prompts"), request.column("labels")

    def one(i: int) -> tuple[str, Any]:
        name = f"query[{i}]"
        try:
            ref = reference_for(queries[i], prompts[i], labels[i])
            if ref is None:
                raise NoAudioReference(
                    f"{name}: no 'data:audio/...;base64,' or 'file://' reference in the "
                    "response part of the query or in the label"
                )
            kind, value = ref
            decoder = state.decoder
            src = (
                decoder.b64decode(value, name)
                if kind == "base64"
                else decoder.resolve_path(value, name)
            )
        except RequestError as e:
            return name, ClipError(name, e)
        return name, src

    async def decoded(name: str, response: str) -> Clip:
        """The ``--decoder``'s audio for one response, checked, prepared and charged to the
        decoded-size budget like an upload."""

        def work() -> Clip:
            wav, sr = decode_checked(state, config.decoder, response, name)
            return admit_decoded(state, name, wav, sr)

        try:
            return await state.run_blocking(work)
        except Exception as e:
            return Clip(name, error=ClipError(name, e))

    if config.decoder is not None:  # text/token responses: the decoder makes their audio
        clips = list(
            await asyncio.gather(
                *(
                    decoded(f"query[{i}]", response_text(queries[i], prompts[i]))
                    for i in range(len(queries))
                )
            )
        )
    else:  # audio references: headers, the decoded-size budget, then decoding
        clips = await decode_request(state, [one(i) for i in range(len(queries))])
    results = await state.score_clips(clips, receive=receive)
    return state.reward_logs.reply(
        [r if isinstance(r, ScoreResult) else r.to_json() for r in results],
        score_key=config.openrlhf_score,
        failure_reward=config.failure_reward,
        names=[c.name for c in clips],
        responses=[response_text(q, p) for q, p in zip(queries, prompts)],
    )


def decode_checked(state: ServerState, target: str, response: str, name: str):
    """Run the server's decoder on one response (blocking) and check the audio under the
    server's limits: ``(waveform float32, sample_rate)``."""
    wav, sr = decode_response(target, response, where=name)
    if not isinstance(sr, int) or sr <= 0:
        raise AudioShapeError(f"the decoder returned sample rate {sr!r}", name)
    wav = wav.to(torch.float32)
    state.decoder.check(wav, sr, name)
    return wav, sr
