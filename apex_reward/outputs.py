"""The named outputs of :class:`~apex_reward.model.ApexRewardModel`: per-segment encoder
features before the head, and the scores, reward and trust signals of a batch of songs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .windows import WindowScores

__all__ = ["SegmentFeatures", "ApexOutput"]


@dataclass
class SegmentFeatures:
    """Encoder output for a batch of songs, before the head.

    Attributes:
        layer_features: ``[N, L, H]`` float32 time-pooled hidden states of the L selected layers,
            one row per 30 s segment.
        song_index: ``[N]`` int64 song of each segment.
        weights: ``[N]`` float32 weight of each segment in its song's average.
        durations_s: ``[B]`` float32 song durations in seconds.
        num_songs: B.
        dynamics: ``[N, 2, L, H]`` float32 frame standard deviation and difference RMS of each
            segment's layers (:mod:`apex_reward.frame_moments`), when the OOD statistics need
            them; None otherwise.
    """

    layer_features: torch.Tensor
    song_index: torch.Tensor
    weights: torch.Tensor
    durations_s: torch.Tensor
    num_songs: int
    dynamics: torch.Tensor | None = None


@dataclass
class ApexOutput:
    """Named outputs of :class:`ApexRewardModel`; every tensor is ``[B]`` unless noted.

    Attributes:
        scores: ``{name: [B]}`` — the predicted tasks (streams, likes in 0–100; coherence,
            musicality, memorability, clarity, naturalness in 1–5) and the combined scores
            popularity (0–100), songeval (1–5, full models) and overall (0–1).
        reward: ``[B]`` the configured weighted sum of scores.
        embeddings: ``[B, H]`` song embeddings (aggregated layers, averaged over segments), when
            requested with ``return_embeddings=True``.
        features: the per-segment :class:`SegmentFeatures`, when requested.
        signals: ``{name: [B]}`` float64 signal checks of each input waveform
            (:mod:`apex_reward.signals`); None under the guard policy ``off``.
        flags: per song, the names of the flags its signals raised (``[]`` when none), with
            ``"ood"`` beyond the OOD threshold; None under ``off``. Under ``penalize`` a flagged
            song's ``reward`` is the floor (or, for ``ood`` with ``ood.penalty_weight > 0``,
            reduced by the smooth penalty, :mod:`apex_reward.ood`).
        ood: ``[B]`` percentile (0–100) of the song's OOD distance among the training songs';
            None when the checkpoint has no OOD statistics.
        ood_distance: ``[B]`` the Mahalanobis distance itself (differentiable); None likewise.
        std: ``{name: [B]}`` standard deviation over the ensemble's heads of every score and of
            the reward (``"reward"``); None for a single-head checkpoint.
        windows: per-window scores ``[B, W]`` with their times
            (:class:`~apex_reward.windows.WindowScores`), when requested with ``return_windows``.
    """

    scores: dict[str, torch.Tensor]
    reward: torch.Tensor
    embeddings: torch.Tensor | None = None
    features: SegmentFeatures | None = None
    signals: dict[str, torch.Tensor] | None = None
    flags: list[list[str]] | None = None
    windows: WindowScores | None = None
    ood: torch.Tensor | None = None
    ood_distance: torch.Tensor | None = None
    std: dict[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.reward if name == "reward" else self.scores[name]

    def to_records(self) -> list[dict[str, float]]:
        """One ``{score name: float, ..., "reward": float}`` dict per song."""
        names = list(self.scores)
        values = torch.stack([self.scores[n] for n in names] + [self.reward], dim=1)
        return [
            dict(zip(names + ["reward"], row)) for row in values.detach().float().cpu().tolist()
        ]
