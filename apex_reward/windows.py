"""Dense rewards: scores of each time window of a song, with where the window lies.

A song's score is an average over its 30 s segments (docs/model.md). For credit assignment on
long tracks (token-level RL on codec language models, "which part of the track does this score
refer to?") :meth:`ApexRewardModel.forward` can also return the score of every window,
``model(x, sr, return_windows=True)``:

* ``True`` (or ``WindowSpec()``): the windows are the encoder's own 30 s segments. They come
  from the same encoder pass as the song score, at no extra cost, and each window's score is
  what the head gives that segment alone. With the head in ``segment`` mode, a song's score is
  exactly the weighted mean of its window scores (weights :attr:`WindowScores.weights`); in
  ``song`` mode the head averages embeddings before predicting, so the mean is close, not equal.
* ``WindowSpec(length_s=10, hop_s=5)``: windows of that length every ``hop_s`` seconds, run
  through the encoder in an extra pass (the last window is aligned to the end of the song, so
  every window is full length; a song shorter than one window is one window).

Window scores are differentiable with respect to the waveform, and a window's score depends only
on the samples inside it (plus the resampler's few-millisecond filter context at its edges): the
front end normalises each window on its own and the encoder sees one window at a time.
:func:`window_token_spans` maps window times to the token spans of a codec with a fixed frame
rate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .audio import AudioFrontEnd, Segments, WaveformInput, as_waveform_list, per_song_rates
from .errors import ConfigError
from .segment_rows import cut_rows

if TYPE_CHECKING:
    from .model import ApexRewardModel
    from .outputs import SegmentFeatures

__all__ = ["WindowSpec", "WindowScores", "window_scores", "window_token_spans"]


@dataclass(frozen=True)
class WindowSpec:
    """Which windows to score.

    Attributes:
        length_s: window length in seconds; None = the encoder's segments
            (``frontend.segment_seconds``, non-overlapping, from the song-score pass).
        hop_s: seconds between window starts; None = ``length_s`` (no overlap).
    """

    length_s: float | None = None
    hop_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("length_s", "hop_s"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ConfigError(
                    f"windows: {name} must be a positive number of seconds, got {v!r}"
                )
        if self.length_s is None and self.hop_s is not None:
            raise ConfigError("windows: hop_s needs length_s (segment windows never overlap)")

    @classmethod
    def coerce(cls, value: bool | WindowSpec | None) -> WindowSpec | None:
        """``True`` -> the segments, ``False``/None -> no windows, a spec -> itself."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            return value
        raise ConfigError(f"return_windows: expected a bool or WindowSpec, got {value!r}")


@dataclass
class WindowScores:
    """Per-window outputs for a batch of B songs with at most W windows each.

    Songs with fewer windows are padded at the end: there ``mask`` is False and every other
    tensor holds 0.

    Attributes:
        scores: ``{name: [B, W]}`` float32, the same names and units as the song scores.
        reward: ``[B, W]`` the configured reward of each window (under the guard policy
            ``penalize``, the floor for every window of a flagged song).
        start_s: ``[B, W]`` float64 window start, seconds from the start of the input audio.
        end_s: ``[B, W]`` float64 window end (exclusive), seconds.
        weights: ``[B, W]`` float32 weight of each window in its song's average (the unpadded
            duration, or 1, as the front end weights segments; 0 for padding).
        mask: ``[B, W]`` bool, True for real windows.
    """

    scores: dict[str, torch.Tensor]
    reward: torch.Tensor
    start_s: torch.Tensor
    end_s: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor

    def mean(self) -> dict[str, torch.Tensor]:
        """``{name: [B]}`` weighted mean of the window scores and ``"reward"`` of each song."""
        w = self.weights.to(torch.float64)
        total = w.sum(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
        items = dict(self.scores, reward=self.reward)
        return {k: (v.to(torch.float64) * w).sum(dim=1) / total for k, v in items.items()}

    def to_records(self) -> list[list[dict[str, Any]]]:
        """Per song, one ``{"start_s", "end_s", "scores": {...}, "reward"}`` dict per window."""
        names = list(self.scores)
        values = torch.stack([self.scores[n] for n in names] + [self.reward], dim=-1)
        values = values.detach().double().cpu().tolist()
        starts, ends = self.start_s.tolist(), self.end_s.tolist()
        mask = self.mask.cpu().tolist()
        out = []
        for b, row in enumerate(values):
            out.append(
                [
                    {
                        "start_s": round(starts[b][w], 6),
                        "end_s": round(ends[b][w], 6),
                        "scores": dict(zip(names, row[w][:-1])),
                        "reward": row[w][-1],
                    }
                    for w in range(len(row))
                    if mask[b][w]
                ]
            )
        return out


def window_token_spans(
    start_s: torch.Tensor | Sequence[float],
    end_s: torch.Tensor | Sequence[float],
    frame_rate: float,
    *,
    num_tokens: int | None = None,
    offset_s: float = 0.0,
) -> torch.Tensor:
    """Token span ``[first, stop)`` of each window for a codec emitting ``frame_rate`` tokens/s.

    A token at index i covers ``[i, i + 1) / frame_rate`` seconds after ``offset_s`` (e.g. the
    length of a prompt that is not part of the generated audio); a window's span is every token
    that overlaps it, ``floor((start - offset) * rate)`` to ``ceil((end - offset) * rate)``,
    clipped to ``[0, num_tokens]`` when that is given. Multi-codebook codecs that emit several
    tokens per frame multiply the result by their tokens per frame.

    Args:
        start_s, end_s: window times in seconds, any shape (e.g. ``[B, W]`` from
            :class:`WindowScores`).
        frame_rate: codec frames per second (e.g. 50 for EnCodec 24 kHz, 75 for MERT frames).

    Returns:
        int64 ``[..., 2]``: ``[..., 0]`` first token, ``[..., 1]`` one past the last token.
    """
    if not (math.isfinite(frame_rate) and frame_rate > 0):
        raise ConfigError(f"frame_rate must be a positive number, got {frame_rate!r}")
    start = torch.as_tensor(start_s, dtype=torch.float64) - offset_s
    end = torch.as_tensor(end_s, dtype=torch.float64) - offset_s
    # a tolerance so that 2.0 s at 50 Hz is token 100, not 100.00000000000001 -> 101
    eps = 1e-9
    first = torch.floor(start * frame_rate + eps)
    stop = torch.ceil(end * frame_rate - eps)
    spans = torch.stack([first, torch.maximum(stop, first)], dim=-1).clamp_min(0)
    if num_tokens is not None:
        spans = spans.clamp_max(int(num_tokens))
    return spans.to(torch.int64)


# ----------------------------------------------------------------------------------------------


def _predict(
    model: ApexRewardModel, layer_features: torch.Tensor, condition: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """``[N, L, H]`` window features (``[N]`` condition indices) -> ``{name: [N]}`` scores plus
    ``"reward"``: every window scored as a one-segment song, through the same member heads,
    ensemble mean and reward mode as the songs."""
    from .ensemble import predict_members
    from .outputs import SegmentFeatures

    n = layer_features.shape[0]
    dev = layer_features.device
    features = SegmentFeatures(
        layer_features,
        torch.arange(n, device=dev),
        torch.ones(n, device=dev),
        torch.zeros(n, device=dev),
        n,
    )
    scores, reward, _ = predict_members(model, features, condition)
    return {**scores, "reward": reward}


def _trim_offsets(
    model: ApexRewardModel, songs: Sequence[torch.Tensor], rates: Sequence[int]
) -> list[float]:
    """Seconds of leading silence the front end trims from each input song (0 without trim)."""
    if not model.config.frontend.trim_silence:
        return [0.0] * len(songs)
    fe = model.frontend
    return [fe.trim_span(fe.downmix(w.detach()), sr)[0] / sr for w, sr in zip(songs, rates)]


def _cut(
    frontend: AudioFrontEnd, mono: Sequence[torch.Tensor], length: int, hop: int
) -> tuple[Segments, list[int]]:
    """Windows of ``length`` samples every ``hop`` samples (the last one end-aligned) of each
    mono song at the encoder rate -> front-end :class:`Segments` and the start sample of each."""
    cfg = frontend.config
    spans, index, starts = [], [], []
    for b, x in enumerate(mono):
        n = x.shape[-1]
        if n <= length:
            song_starts = [0]
        else:
            song_starts = list(range(0, n - length, hop)) + [n - length]
        for s in song_starts:
            spans.append((x, s, min(length, n - s)))
            index.append(b)
            starts.append(s)
    audio, level_db = cut_rows(
        spans,
        length,
        normalize=cfg.normalize,
        floor=cfg.normalize_floor,
        target_db=cfg.normalize_level_db,
    )
    device = audio.device
    valid_t = torch.tensor([k for _, _, k in spans], dtype=torch.int64, device=device)
    if cfg.gradient_gate_db is not None:
        from .audio import gate_gradient

        audio = gate_gradient(audio, level_db, cfg.gradient_gate_db)
    segments = Segments(
        audio=audio,
        valid=valid_t,
        song_index=torch.tensor(index, dtype=torch.int64, device=device),
        num_songs=len(mono),
        level_db=level_db,
    )
    return segments, starts


def window_scores(
    model: ApexRewardModel,
    waveforms: WaveformInput,
    sample_rate: int | Sequence[int],
    spec: WindowSpec,
    *,
    features: SegmentFeatures | None = None,
    segment_batch_size: int | None = None,
    flags: Sequence[Sequence[str]] | None = None,
    policy: str = "off",
    condition: torch.Tensor | None = None,
) -> WindowScores:
    """Score the windows ``spec`` describes of each song (the work behind ``return_windows``).

    Args:
        model: the reward model.
        waveforms, sample_rate: the input as given to ``model(...)`` (already checked).
        spec: which windows.
        features: the song-score pass's segment features; required for segment windows
            (``spec.length_s`` None), which reuse them.
        segment_batch_size: windows per encoder call for windows of a configured length.
        flags, policy: the guard's flags per song and the policy; under ``penalize`` a flagged
            song's window rewards are the floor.
        condition: ``[B]`` condition indices of a conditioned head (None: its average).

    Returns:
        :class:`WindowScores` with ``[B, W]`` tensors.
    """
    songs = as_waveform_list(waveforms)
    rates = per_song_rates(sample_rate, len(songs), "sample_rate")
    enc_rate = model.config.frontend.sample_rate
    offsets = _trim_offsets(model, songs, rates)
    if spec.length_s is None:
        if features is None:
            raise ConfigError("segment windows need the song pass's features")
        S = model.frontend.config.segment_samples
        index = features.song_index.cpu().tolist()
        totals = [int(round(float(d) * enc_rate)) for d in features.durations_s.cpu()]
        starts, valid, seen = [], [], [0] * len(songs)
        for b in index:
            k = seen[b]
            seen[b] += 1
            starts.append(k * S)
            valid.append(min(S, totals[b] - k * S))
        layer_features, weights = features.layer_features, features.weights
    else:
        length = max(1, int(round(spec.length_s * enc_rate)))
        hop = max(1, int(round((spec.hop_s or spec.length_s) * enc_rate)))
        fe = model.frontend
        device = model.device
        mono = [
            fe.resample(fe.downmix(w.to(device=device, dtype=torch.float32)), sr)
            for w, sr in zip(songs, rates)
        ]
        segments, starts = _cut(fe, mono, length, hop)
        layer_features = torch.cat(list(model.iter_encoded_chunks(segments, segment_batch_size)))
        weights = fe.segment_weights(segments)
        index = segments.song_index.cpu().tolist()
        valid = segments.valid.cpu().tolist()
    if condition is not None:
        condition = condition[torch.tensor(index, dtype=torch.long, device=condition.device)]
    values = _predict(model, layer_features, condition)
    # position of each window within its song
    pos, seen = [], [0] * len(songs)
    for b in index:
        pos.append(seen[b])
        seen[b] += 1
    B, W = len(songs), max(seen)
    dev = layer_features.device
    rows = torch.tensor(index, dtype=torch.int64, device=dev)
    cols = torch.tensor(pos, dtype=torch.int64, device=dev)

    def scatter(v: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(B, W, dtype=v.dtype, device=v.device)
        return out.index_put((rows, cols), v)

    padded = {k: scatter(v) for k, v in values.items()}
    reward = padded.pop("reward")
    mask = scatter(torch.ones(len(index), dtype=torch.bool, device=dev))
    if policy == "penalize" and flags is not None and any(flags):
        from .guard import reward_floor
        from .ood import floors

        # the song reward's rule: the "ood" flag alone does not floor under the smooth penalty
        floored = [floors(model.config, f) for f in flags]
        flagged = torch.tensor(floored, device=reward.device)[:, None]
        floor = torch.full_like(reward, reward_floor(model.config))
        reward = torch.where(flagged & mask, floor, reward)
    off = torch.tensor(offsets, dtype=torch.float64)[index]
    start_s = off + torch.tensor(starts, dtype=torch.float64) / enc_rate
    end_s = start_s + torch.tensor(valid, dtype=torch.float64) / enc_rate
    return WindowScores(
        scores=padded,
        reward=reward,
        start_s=scatter(start_s.to(dev)).cpu(),
        end_s=scatter(end_s.to(dev)).cpu(),
        weights=scatter(weights.to(torch.float32)),
        mask=mask,
    )
