"""The APEX prediction network on top of pooled MERT layer features (docs/model.md#prediction-head).

``ApexHead`` is everything that is trained: layer aggregation (``Conv1d(L -> 1, k=1)``), the shared
trunk (``Linear -> BatchNorm1d -> GELU -> Dropout(0.3)`` x 2 or 3) and one head per task
(``Linear(256 -> 64) -> BatchNorm1d -> GELU -> Dropout(0.1) -> Linear(64 -> 1)``). It works on
cached embeddings as well as on the live encoder output, so training and inference share it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .conditioning import ConditionInput, trunk_input_width
from .config import AESTHETIC_TASKS, POPULARITY_TASKS, HeadConfig
from .errors import ConfigError

__all__ = [
    "ApexHead",
    "combine_scores",
    "weighted_reward",
    "weighted_song_mean",
    "scale_task_output",
]


def scale_task_output(task: str, z: torch.Tensor) -> torch.Tensor:
    """Map a head's logit to its native range: popularity ``100*sigmoid``, aesthetics ``1+4*sigmoid``."""
    if task in POPULARITY_TASKS:
        return 100.0 * torch.sigmoid(z)
    return 1.0 + 4.0 * torch.sigmoid(z)


def weighted_song_mean(
    values: torch.Tensor, song_index: torch.Tensor, weights: torch.Tensor, num_songs: int
) -> torch.Tensor:
    """Per-song weighted mean of per-segment ``values`` (``[N, ...]`` -> ``[B, ...]``).

    ``weights`` is ``[N]`` (non-negative; each song needs a positive total).
    """
    w = weights.to(values.dtype)
    shape = (num_songs,) + tuple(values.shape[1:])
    wv = values * w.view(-1, *([1] * (values.ndim - 1)))
    total = torch.zeros(shape, dtype=values.dtype, device=values.device).index_add(
        0, song_index, wv
    )
    wsum = torch.zeros(num_songs, dtype=values.dtype, device=values.device).index_add(
        0, song_index, w
    )
    return total / wsum.view(-1, *([1] * (values.ndim - 1)))


def combine_scores(pred: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the combined scores (docs/model.md#combined-scores) to per-task predictions.

    ``popularity`` = mean(streams, likes) in 0–100; ``songeval`` = mean of the five aesthetic
    scores in 1–5 (full task set only); ``overall`` = mean(popularity/100, (songeval-1)/4) in 0–1,
    or popularity/100 for popularity-only models. All tensors are ``[B]``.
    """
    out = dict(pred)
    popularity = torch.stack([pred[t] for t in POPULARITY_TASKS]).mean(0)
    out["popularity"] = popularity
    if all(t in pred for t in AESTHETIC_TASKS):
        songeval = torch.stack([pred[t] for t in AESTHETIC_TASKS]).mean(0)
        out["songeval"] = songeval
        out["overall"] = 0.5 * (popularity / 100.0 + (songeval - 1.0) / 4.0)
    else:
        out["overall"] = popularity / 100.0
    return out


def weighted_reward(
    scores: Mapping[str, torch.Tensor], reward_weights: Mapping[str, float]
) -> torch.Tensor:
    """The scalar reward ``sum_k w_k * scores[k]`` over ``reward_weights`` (non-empty). ``[B]``."""
    total = None
    for name, w in reward_weights.items():
        term = w * scores[name]
        total = term if total is None else total + term
    assert total is not None  # reward_weights is validated to be non-empty
    return total


class ApexHead(nn.Module):
    """Aggregation + shared trunk + task heads.

    Args:
        hidden_size: H, the encoder width (768 for MERT-v1-95M).
        num_layer_features: L, the number of pooled encoder layers (4).
        config: trunk depth, task set, mode, dropout, and the optional conditioning input
            (:mod:`apex_reward.conditioning`).
    """

    def __init__(self, hidden_size: int, num_layer_features: int, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.hidden_size = hidden_size
        self.aggregate = nn.Conv1d(num_layer_features, 1, kernel_size=1)
        layers: list[nn.Module] = []
        width = trunk_input_width(hidden_size, config.condition)
        for out in config.trunk_widths:
            layers += [
                nn.Linear(width, out),
                nn.BatchNorm1d(out),
                nn.GELU(),
                nn.Dropout(config.trunk_dropout),
            ]
            width = out
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleDict(
            {
                task: nn.Sequential(
                    nn.Linear(width, config.head_hidden),
                    nn.BatchNorm1d(config.head_hidden),
                    nn.GELU(),
                    nn.Dropout(config.head_dropout),
                    nn.Linear(config.head_hidden, 1),
                )
                for task in config.task_names
            }
        )
        # built last, so the trunk and heads draw the same initial weights as without it
        self.condition: ConditionInput | None = None
        if config.condition is not None:
            self.condition = ConditionInput(config.condition, config.trunk_widths)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(self.heads.keys())

    def embed(self, layer_features: torch.Tensor) -> torch.Tensor:
        """``[N, L, H]`` pooled layer features -> ``[N, H]`` learned combination of layers.

        Computed in the head's parameter dtype (float64 inside :class:`ApexRewardModel`).
        """
        return self.aggregate(layer_features.to(self.aggregate.weight.dtype)).squeeze(1)

    def logits(
        self, embeddings: torch.Tensor, condition: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``[M, H]`` embeddings -> per-task logits ``{task: [M]}`` (before range scaling).

        ``condition``: ``[M]`` int64 condition indices of a conditioned head (None: the learned
        average; :func:`apex_reward.conditioning.condition_indices`).
        """
        if self.condition is None:
            if condition is not None:
                raise ConfigError("this head has no conditioning input; condition must be None")
            h = self.trunk(embeddings)
        else:
            h = self.condition.run_trunk(self.trunk, embeddings, condition)
        return {task: head(h).squeeze(-1) for task, head in self.heads.items()}

    def predict(
        self, embeddings: torch.Tensor, condition: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """``[M, H]`` embeddings -> per-task predictions ``{task: [M]}`` in native units."""
        return {t: scale_task_output(t, z) for t, z in self.logits(embeddings, condition).items()}

    def forward(
        self,
        layer_features: torch.Tensor,
        song_index: torch.Tensor,
        weights: torch.Tensor,
        num_songs: int,
        condition: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-segment layer features -> per-song task predictions.

        Args:
            layer_features: ``[N, L, H]`` for N segments.
            song_index: ``[N]`` song of each segment (0..B-1).
            weights: ``[N]`` weight of each segment in its song's average.
            num_songs: B.
            condition: ``[B]`` condition index of each song (conditioned heads; None: average).

        Returns:
            ``{task: [B]}`` in native units. Song mode averages segment embeddings, then predicts;
            segment mode predicts per segment, then averages the predictions.
        """
        emb = self.embed(layer_features)
        if self.config.mode == "song":
            return self.predict(weighted_song_mean(emb, song_index, weights, num_songs), condition)
        per_segment = self.predict(emb, None if condition is None else condition[song_index])
        return {
            t: weighted_song_mean(v, song_index, weights, num_songs) for t, v in per_segment.items()
        }
