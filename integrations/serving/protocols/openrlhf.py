"""OpenRLHF's remote reward protocol: ``POST /get_reward``.

OpenRLHF posts ``{"query": [...], "prompts": [...], "labels": [...]}`` (query = prompt + response
text) and reads ``rewards``, ``scores`` and ``extra_logs``. The audio of sample *i* is the last
audio reference (:func:`find_audio_reference`) in the response part of ``query[i]`` (the text
after ``prompts[i]`` when the query starts with it), else in ``labels[i]``.

The reply has one entry per query: ``rewards``, ``scores`` (the ``--openrlhf-score`` score),
``extra_logs`` (``apex_ok`` and ``apex_<score>`` per sample) and ``errors`` (null, or the
problem). A sample without scoreable audio gets ``--failure-reward``, ``apex_ok = 0`` and its
error, so one bad rollout never fails the batch.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import unquote

from apex_reward.scoring import ScoreResult

from ..errors import ClipError, NoAudioReference, RequestError, TooManyClips

if TYPE_CHECKING:
    from ..state import ServerState

__all__ = ["find_audio_reference", "reference_for", "get_reward"]

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
    text = query[len(prompt) :] if isinstance(prompt, str) and query.startswith(prompt) else query
    ref = find_audio_reference(text)
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

    clips = await state.decode_all([one(i) for i in range(len(queries))])
    return reply(state, await state.score_clips(clips, receive=receive))


def reply(state: ServerState, results: list[ScoreResult | ClipError]) -> dict[str, Any]:
    """The ``/get_reward`` answer for the scored (or failed) samples, in order."""
    config = state.config
    names = state.model.score_names
    rewards: list[float] = []
    scores: list[float] = []
    ok: list[float] = []
    flagged: list[float] = []
    per_score: dict[str, list[float]] = {s: [] for s in names}
    errors: list[dict[str, str] | None] = []
    for res in results:
        if isinstance(res, ScoreResult):
            reward, values = float(res.reward or 0.0), res.scores or {}  # set: the clip is ok
            key = config.openrlhf_score
            rewards.append(reward)
            scores.append(reward if key == "reward" else float(values[key]))
            ok.append(1.0)
            flagged.append(1.0 if res.flags else 0.0)
            for s in names:
                per_score[s].append(float(values[s]))
            errors.append(None)
        else:
            rewards.append(config.failure_reward)
            scores.append(config.failure_reward)
            ok.append(0.0)
            flagged.append(0.0)
            for s in names:
                per_score[s].append(0.0)
            errors.append(res.to_json())
    extra_logs = {
        "apex_ok": ok,
        "apex_flagged": flagged,
        **{f"apex_{s}": v for s, v in per_score.items()},
    }
    return {"rewards": rewards, "scores": scores, "extra_logs": extra_logs, "errors": errors}
