"""The popularity score (docs/popularity.md).

For a count ``c`` (streams or likes): its percentile rank ``q`` in a reference set (ties share
their average rank; ``q = average_rank / n`` in (0, 1]), then ``score = 100 * q**K`` with
``K = ln 0.5 / ln 0.8 ~= 3.106``, so the 80th percentile scores 50 and the upper tail is
compressed. :class:`PopularityReference` stores the reference distribution as quantiles so that
counts from a new dataset can be scored against the training distribution.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from .config import POPULARITY_TASKS, PopularityReferenceConfig
from .errors import ConfigError

#: Exponent chosen so that the 80th percentile maps to a score of 50.
POPULARITY_EXPONENT: float = math.log(0.5) / math.log(0.8)

__all__ = [
    "POPULARITY_EXPONENT",
    "percentile_ranks",
    "score_from_percentile",
    "popularity_scores",
    "PopularityReference",
]


def percentile_ranks(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Percentile rank of each count within ``counts``: ``average_rank / n`` in (0, 1].

    Ties get their average rank (the same ``q``). ``[n] -> [n]`` float64.
    """
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("counts contain NaN or infinite values")
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # average 1-based rank of each run of equal values
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_x)) + 1]
    ends = np.r_[starts[1:], x.size]
    avg = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks / x.size


def score_from_percentile(q: np.ndarray | float) -> np.ndarray:
    """``100 * q**K`` for percentile ranks ``q`` in [0, 1] (0–100)."""
    q = np.clip(np.asarray(q, dtype=np.float64), 0.0, 1.0)
    return 100.0 * q**POPULARITY_EXPONENT


def popularity_scores(counts: Sequence[float] | np.ndarray) -> np.ndarray:
    """Popularity scores (0–100) of ``counts`` ranked within themselves. ``[n] -> [n]``."""
    return score_from_percentile(percentile_ranks(counts))


class PopularityReference:
    """Reference distributions of stream and like counts, stored as quantiles.

    ``score(counts, "streams")`` places new counts in the reference distribution (linear
    interpolation between stored quantiles; values tied with a flat run of quantiles get the
    middle of that run) and applies the §3 transform.
    """

    def __init__(self, levels: np.ndarray, quantiles: Mapping[str, np.ndarray], num_songs: int):
        self.levels = np.asarray(levels, dtype=np.float64)
        self.quantiles = {k: np.asarray(v, dtype=np.float64) for k, v in quantiles.items()}
        self.num_songs = int(num_songs)
        if np.any(np.diff(self.levels) <= 0) or self.levels[0] < 0 or self.levels[-1] > 1:
            raise ConfigError("popularity_reference.levels must increase within [0, 1]")
        for k, v in self.quantiles.items():
            if v.shape != self.levels.shape or np.any(np.diff(v) < 0):
                raise ConfigError(
                    f"popularity_reference.{k}: quantiles must be non-decreasing, one per level"
                )

    @classmethod
    def from_counts(
        cls, counts: Mapping[str, Sequence[float] | np.ndarray], num_levels: int = 1001
    ) -> PopularityReference:
        """Build from raw counts, e.g. ``{"streams": [...], "likes": [...]}``."""
        levels = np.linspace(0.0, 1.0, num_levels)
        quantiles, n = {}, 0
        for kind in POPULARITY_TASKS:
            x = np.asarray(counts[kind], dtype=np.float64)
            if x.size == 0:
                raise ValueError(f"no {kind} counts to build a reference from")
            quantiles[kind] = np.quantile(x, levels)
            n = max(n, x.size)
        return cls(levels, quantiles, n)

    def percentile(self, counts: Sequence[float] | np.ndarray, kind: str) -> np.ndarray:
        """Approximate percentile rank of ``counts`` in the reference ``kind`` distribution."""
        if kind not in self.quantiles:
            raise ValueError(f"unknown count kind {kind!r}; expected one of {list(self.quantiles)}")
        x = np.asarray(counts, dtype=np.float64)
        v, p = self.quantiles[kind], self.levels
        lo_idx = np.searchsorted(v, x, side="left")
        hi_idx = np.searchsorted(v, x, side="right")
        # between two distinct quantiles: linear interpolation; equal to a run of stored
        # quantiles (a tie in the reference): the middle of the run's levels
        q = np.interp(x, v, p, left=0.0, right=1.0)
        tie = hi_idx > lo_idx
        last = len(p) - 1
        mid = (p[np.clip(lo_idx, 0, last)] + p[np.clip(hi_idx - 1, 0, last)]) / 2.0
        q = np.where(tie, mid, q)
        return np.clip(q, 0.0, 1.0)

    def score(self, counts: Sequence[float] | np.ndarray, kind: str) -> np.ndarray:
        """Popularity score (0–100) of raw ``counts`` against the reference."""
        return score_from_percentile(self.percentile(counts, kind))

    def to_config(self) -> PopularityReferenceConfig:
        return PopularityReferenceConfig(
            levels=self.levels.tolist(),
            streams=self.quantiles["streams"].tolist(),
            likes=self.quantiles["likes"].tolist(),
            num_songs=self.num_songs,
        )

    @classmethod
    def from_config(cls, cfg: PopularityReferenceConfig) -> PopularityReference:
        return cls(
            np.asarray(cfg.levels),
            {"streams": np.asarray(cfg.streams), "likes": np.asarray(cfg.likes)},
            cfg.num_songs,
        )
