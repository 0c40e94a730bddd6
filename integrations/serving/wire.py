"""What :class:`~apex_reward.integrations.serving.client.ApexRewardClient` sends and reads back.

Audio travels as files: a path is read and uploaded (or sent as a server-side path), an array is
written as a 32-bit float WAV, so the server decodes exactly the samples given
(:func:`make_part`, :func:`encode_wav`). Parts are grouped into requests under the server's clip
and body limits (:func:`chunk_parts`). A batch row comes back as a
:class:`~apex_reward.scoring.ScoreResult` (:func:`score_result`), an error answer as its type and
message (:func:`error_of`).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apex_reward.errors import ApexError, AudioDecodeError, AudioShapeError
from apex_reward.scoring import ScoreResult

__all__ = [
    "RemoteError",
    "Comparison",
    "AudioLike",
    "Part",
    "encode_wav",
    "make_part",
    "chunk_parts",
    "is_pair",
    "b64_clip",
    "error_of",
    "score_result",
]


class RemoteError(ApexError):
    """The server refused a request (4xx) or could not be reached after all retries.

    Attributes:
        status: HTTP status, or None when no answer came back.
        type: the server's error type (e.g. ``"Unauthorized"``), or ``"Unavailable"``.
        message: what went wrong.
    """

    def __init__(self, status: int | None, type: str, message: str) -> None:
        self.status = status
        self.type = type
        self.message = message
        prefix = f"HTTP {status} " if status is not None else ""
        super().__init__(f"{prefix}{type}: {message}")


@dataclass
class Comparison:
    """Result of :meth:`~apex_reward.integrations.serving.client.ApexRewardClient.compare`.

    Attributes:
        logit: ``logit P(a > b)``.
        probability: ``P(a > b)`` in [0, 1].
        reward_a, reward_b: the two rewards.
        scores_a, scores_b: ``{score name: value}`` of each clip.
        method: ``"preference_head"`` or ``"bradley_terry"``.
    """

    logit: float
    probability: float
    reward_a: float
    reward_b: float
    scores_a: dict[str, float]
    scores_b: dict[str, float]
    method: str


#: What the client accepts as one clip: a path, an array/tensor, or ``(array, sample_rate)``.
AudioLike = Any  # str | Path | np.ndarray | torch.Tensor | tuple[array, int]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    try:
        import torch

        if isinstance(x, torch.Tensor):
            return x.detach().to("cpu", torch.float32).numpy()
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    raise AudioShapeError(
        f"expected a path, an array/tensor or an (array, sample_rate) tuple, got {type(x).__name__}"
    )


def encode_wav(array: Any, sample_rate: int) -> bytes:
    """``[T]`` or ``[C, T]`` samples -> the bytes of a 32-bit float WAV file (lossless)."""
    import soundfile as sf

    a = _to_numpy(array)
    if a.dtype.kind in "iu":
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    a = np.asarray(a, dtype=np.float32)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise AudioShapeError(f"expected [T] or [C, T], got shape {a.shape}")
    if a.shape[0] > a.shape[1]:
        raise AudioShapeError(
            f"shape {a.shape} looks like [samples, channels]; pass [channels, samples]"
        )
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise AudioShapeError(f"arrays need a positive integer sample_rate, got {sample_rate!r}")
    buf = io.BytesIO()
    sf.write(buf, a.T, int(sample_rate), format="WAV", subtype="FLOAT")
    return buf.getvalue()


@dataclass
class Part:
    """One clip ready to send: an upload (``data``) or a server-side ``path``."""

    index: int
    name: str
    data: bytes | None = None  # upload
    path: str | None = None  # server-side path


def is_pair(x: Any) -> bool:
    """Whether ``x`` is an ``(array, sample_rate)`` tuple."""
    return (
        isinstance(x, tuple)
        and len(x) == 2
        and hasattr(x[0], "shape")
        and isinstance(x[1], (int, np.integer))
        and not isinstance(x[1], bool)
    )


def make_part(index: int, item: AudioLike, sample_rate: int | None, *, send_paths: bool) -> Part:
    """Clip ``index`` of a call as a :class:`Part`.

    Raises:
        AudioDecodeError: a path that is not a file (when uploading).
        AudioShapeError: an array without a sample rate, or of an unusable shape.
    """
    if isinstance(item, (str, Path)):
        name = str(item)
        if send_paths:
            return Part(index, name, path=name)
        p = Path(item)
        if not p.is_file():
            raise AudioDecodeError("file not found", name)
        return Part(index, name, data=p.read_bytes())
    if is_pair(item):
        array, rate = item
    else:
        array, rate = item, sample_rate
    if rate is None:
        raise AudioShapeError("arrays need a sample_rate", f"array[{index}]")
    return Part(index, f"array[{index}]", data=encode_wav(array, rate))


def chunk_parts(parts: list[Part], max_clips: int, max_bytes: int) -> list[list[Part]]:
    """``parts`` grouped into requests of at most ``max_clips`` clips and about ``max_bytes``;
    uploads and paths never share a request."""
    chunks: list[list[Part]] = []
    current: list[Part] = []
    size = 0
    for part in parts:
        n = len(part.data or b"") + 1024  # multipart overhead per part is small
        if current and (
            len(current) >= max_clips
            or size + n > max_bytes
            or (current[0].path is None) != (part.path is None)
        ):
            chunks.append(current)
            current, size = [], 0
        current.append(part)
        size += n
    if current:
        chunks.append(current)
    return chunks


def b64_clip(part: Part) -> dict[str, str]:
    """An uploaded part as a JSON clip ``{"base64", "name"}``."""
    import base64

    return {"base64": base64.b64encode(part.data or b"").decode("ascii"), "name": part.name}


def error_of(resp: Any) -> tuple[str, str]:
    """``(type, message)`` of an error answer (``HTTP<status>`` and its text when not JSON)."""
    try:
        err = resp.json()["error"]
        return str(err["type"]), str(err["message"])
    except Exception:
        return f"HTTP{resp.status_code}", resp.text[:500]


def score_result(name: str, row: dict[str, Any]) -> ScoreResult:
    """One row of a ``/v1/score/batch`` answer as a ScoreResult (scored, or its error)."""
    if "error" in row:
        err = row["error"] or {}
        return ScoreResult(name, error=str(err.get("message")), error_type=str(err.get("type")))
    return ScoreResult(
        name,
        scores={k: float(v) for k, v in row["scores"].items()},
        reward=float(row["reward"]),
        duration_s=row.get("duration_s"),
        signals=None
        if row.get("signals") is None
        else {k: float(v) for k, v in row["signals"].items()},
        flags=None if row.get("flags") is None else [str(f) for f in row["flags"]],
        windows=row.get("windows"),
        ood=None if row.get("ood") is None else float(row["ood"]),
        std=None if row.get("std") is None else {k: float(v) for k, v in row["std"].items()},
    )
