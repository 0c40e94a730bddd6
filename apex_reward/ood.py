"""Out-of-distribution score: how far a song lies from the songs the heads were trained on.

The checkpoint stores statistics of the training songs' embeddings (docs/model.md#out-of-distribution-score):

* ``ood.mean`` ``[D]`` and ``ood.precision`` ``[D, D]`` (float64): location and inverse of a
  Ledoit-Wolf shrinkage covariance of the song features (scikit-learn, at fit time);
* ``ood.train_distances`` ``[N]`` (float64, sorted): each training song's Mahalanobis distance,
  measured *cross-fitted* (statistics fitted without the song's fold), so the distribution is that
  of a new song from the training distribution, not the optimistic in-sample one.

A song's feature is its segment-weighted mean of the pooled encoder layers (``[L, H]``), reduced
to the mean over layers (``features="layer_mean"``, ``D = H``) or concatenated (``"layers"``,
``D = L*H``); ``"moments"`` (``D = 3H``) adds how the frames move within each segment: the mean
over layers of the frames' standard deviation and of their frame-to-frame difference RMS
(:mod:`apex_reward.frame_moments`). Those need the encoder's frames, which an embeddings store does
not keep, so ``moments`` statistics are fitted from audio (``ood-stats --from-audio``). Its distance ``d = sqrt((x - mean)^T precision (x - mean))`` is a torch expression
of the waveform (differentiable); ``ood`` is its percentile among the training distances (0–100,
not differentiable). ``"ood"`` joins the flags when ``d`` exceeds the threshold
``t_high = quantile(train_distances, flag_percentile / 100)`` or, with ``lower_tail`` (off by
default), falls below ``t_low = quantile(train_distances, 1 - flag_percentile / 100)``: in many dimensions
the training songs lie on a shell around their mean, and an input much closer to the mean than
any of them (white noise, near-silence) is as atypical as one far outside (a typicality test).
Under the guard policy ``penalize`` a flagged song gets the floor, or, with
``penalty_weight = w > 0``, the smooth penalty
``reward - w * (relu(d / t_high - 1) ** 2 + relu(t_low / d - 1) ** 2)`` instead (zero between the
thresholds, gradient pointing back towards the training distribution beyond them).

Fitting needs scikit-learn (the ``train`` extra); scoring needs only torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from .errors import CheckpointError, ConfigError
from .heads import weighted_song_mean

if TYPE_CHECKING:
    from .config import ApexConfig
    from .model import ApexRewardModel
    from .outputs import ApexOutput, SegmentFeatures

__all__ = [
    "OodStatistics",
    "fit_statistics",
    "song_features",
    "attach_ood",
    "ood_penalty",
    "guarded_reward",
    "set_statistics",
]

#: tensor names (under the ``ood.`` prefix of ``model.safetensors``)
TENSOR_NAMES = ("mean", "precision", "train_distances")


class OodStatistics(nn.Module):
    """The stored statistics (buffers, float64) and the distance they define.

    Args:
        mean: ``[D]`` location of the training song features.
        precision: ``[D, D]`` inverse shrinkage covariance (symmetric positive definite).
        train_distances: ``[N]`` cross-fitted distances of the training songs (sorted here).
    """

    def __init__(
        self, mean: torch.Tensor, precision: torch.Tensor, train_distances: torch.Tensor
    ) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().to(torch.float64).clone())
        self.register_buffer("precision", precision.detach().to(torch.float64).clone())
        self.register_buffer(
            "train_distances", torch.sort(train_distances.detach().to(torch.float64)).values
        )

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])

    @property
    def num_songs(self) -> int:
        return int(self.train_distances.shape[0])

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], where: Any) -> OodStatistics:
        """Validate and wrap the ``ood.*`` tensors of a checkpoint.

        Raises:
            CheckpointError: a missing or unexpected tensor, inconsistent shapes, non-finite values.
        """
        names = set(tensors)
        if names != set(TENSOR_NAMES):
            raise CheckpointError(
                f"{where}: OOD statistics need tensors {sorted(TENSOR_NAMES)} under 'ood.', got "
                f"{sorted(names)}"
            )
        mean, precision, dist = (tensors[n] for n in TENSOR_NAMES)
        d = mean.shape[0] if mean.ndim == 1 else -1
        if d < 1 or tuple(precision.shape) != (d, d) or dist.ndim != 1 or dist.shape[0] < 2:
            raise CheckpointError(
                f"{where}: OOD statistics have inconsistent shapes: mean {tuple(mean.shape)}, "
                f"precision {tuple(precision.shape)}, train_distances {tuple(dist.shape)}"
            )
        for name, t in zip(TENSOR_NAMES, (mean, precision, dist)):
            if not torch.isfinite(t).all():
                raise CheckpointError(f"{where}: ood.{name} holds non-finite values")
        return cls(mean, precision, dist)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """``{"ood.mean", "ood.precision", "ood.train_distances"}`` for ``model.safetensors``."""
        return {f"ood.{n}": getattr(self, n).detach().cpu() for n in TENSOR_NAMES}

    def distance(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` song features -> ``[B]`` Mahalanobis distances (float64, differentiable)."""
        if x.shape[-1] != self.dim:
            raise ConfigError(
                f"OOD statistics describe {self.dim}-dimensional features, got {x.shape[-1]}"
            )
        diff = x.to(torch.float64) - self.mean
        m = torch.einsum("bi,ij,bj->b", diff, self.precision, diff)
        return m.clamp_min(1e-12).sqrt()

    def percentile(self, distance: torch.Tensor) -> torch.Tensor:
        """``[B]`` percentage (0–100) of training songs at or below each distance (float32)."""
        ref = self.train_distances
        count = torch.searchsorted(ref, distance.detach().to(ref.dtype).contiguous(), right=True)
        return (100.0 * count.to(torch.float64) / ref.shape[0]).float()

    def threshold(self, percentile: float) -> float:
        """The distance at ``percentile`` (0–100) of the training distances (linear interpolation).

        Memoised per percentile while the stored distances are unchanged: every guarded forward
        asks for it, and the quantile copies the distances to the CPU (a device sync on a GPU)."""
        ref = self.train_distances
        key = (float(percentile), ref.data_ptr(), ref._version)
        cache = self.__dict__.setdefault("_thresholds", {})
        if key not in cache:
            cache[key] = float(torch.quantile(ref.cpu(), percentile / 100.0))
        return cache[key]


#: feature kinds that need the frames' dynamics (not in an embeddings store)
DYNAMIC_KINDS = ("moments",)


def needs_dynamics(model: ApexRewardModel) -> bool:
    """Whether the model's OOD statistics describe a feature that needs the frames' dynamics."""
    return model.ood_stats is not None and model.config.ood.features in DYNAMIC_KINDS


def split_dynamics(
    encoded: torch.Tensor, dynamics: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's ``[N, L, H]`` output, or with ``dynamics`` its ``[N, 3L, H]`` output, ->
    ``(layer_features [N, L, H], dynamics [N, 2, L, H] or None)``."""
    if not dynamics:
        return encoded, None
    n_layers = encoded.shape[1] // 3
    return encoded[:, :n_layers], encoded[:, n_layers:].unflatten(1, (2, n_layers))


def song_features(features: SegmentFeatures, kind: str = "layer_mean") -> torch.Tensor:
    """Per-segment encoder features -> ``[B, D]`` float64 song features (see module doc).

    Raises:
        ConfigError: ``kind="moments"`` on features without ``dynamics``.
    """

    def pool(values: torch.Tensor) -> torch.Tensor:
        return weighted_song_mean(
            values.to(torch.float64), features.song_index, features.weights, features.num_songs
        )

    pooled = pool(features.layer_features)
    if kind not in DYNAMIC_KINDS:
        return song_feature_matrix(pooled, kind)
    if features.dynamics is None:
        raise ConfigError(
            f"ood.features={kind!r} needs the frames' dynamics; encode with dynamics=True"
        )
    moving = pool(features.dynamics)  # [B, 2, L, H]
    return torch.cat([pooled.mean(dim=1), moving[:, 0].mean(dim=1), moving[:, 1].mean(dim=1)], 1)


def song_feature_matrix(pooled: torch.Tensor, kind: str) -> torch.Tensor:
    """``[B, L, H]`` song-averaged layer features -> ``[B, D]`` (``layer_mean``: ``D = H``;
    ``layers``: ``D = L*H``)."""
    if kind == "layer_mean":
        return pooled.mean(dim=1)
    if kind == "layers":
        return pooled.flatten(1)
    if kind in DYNAMIC_KINDS:
        raise ConfigError(
            f"ood.features={kind!r} needs the encoder's frames, which an embeddings store does not "
            "keep: fit the statistics from audio (apex-reward ood-stats --from-audio)"
        )
    raise ConfigError(f"ood.features: expected layer_mean, layers or moments, got {kind!r}")


#: shrinkages tried (after Ledoit-Wolf's own) when the in-sample share is bounded
SHRINKAGE_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7)


def fit_statistics(
    x: np.ndarray | torch.Tensor,
    *,
    folds: int = 5,
    seed: int = 0,
    in_sample_share: tuple[float, float] | None = None,
) -> tuple[OodStatistics, dict[str, Any]]:
    """Fit the statistics on ``[N, D]`` training song features.

    Mean and precision come from scikit-learn's ``LedoitWolf`` on all N songs; the reference
    distances are cross-fitted: each song's distance under statistics fitted on the other
    ``folds - 1`` folds.

    With ``in_sample_share=(p, s)`` the shrinkage is raised (``SHRINKAGE_GRID``) until at most a
    share ``s`` of the training songs themselves, measured in-sample (as a training song is
    scored), fall below the ``100 - p`` percentile of the cross-fitted distances. In many
    dimensions in-sample distances are much smaller than a new song's (the covariance was fitted
    on the song), so a lower-tail (typicality) flag would otherwise fire on training songs.

    Returns:
        ``(statistics, info)`` with ``info`` = songs, dimension, folds, shrinkage, seed (and
        ``in_sample_below``, the measured share, with ``in_sample_share``).

    Raises:
        ConfigError: fewer than ``2 * folds`` songs, or non-finite features.
        MissingDependencyError: scikit-learn is not installed.
    """
    from .errors import require

    require("sklearn", "train", "fitting OOD statistics")
    from sklearn.covariance import LedoitWolf, ShrunkCovariance

    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = arr.astype(np.float64, copy=False)
    if arr.ndim != 2:
        raise ConfigError(f"OOD statistics: expected [N, D] song features, got {arr.shape}")
    n = arr.shape[0]
    if n < 2 * folds:
        raise ConfigError(f"OOD statistics need at least {2 * folds} training songs, got {n}")
    if not np.isfinite(arr).all():
        raise ConfigError("OOD statistics: the training song features hold non-finite values")
    full = LedoitWolf().fit(arr)
    shrinkage = float(full.shrinkage_)
    dist = _cross_fitted(arr, folds, seed, None)
    info: dict[str, Any] = {}
    if in_sample_share is not None:
        percentile, share = in_sample_share
        for candidate in (None, *(g for g in SHRINKAGE_GRID if g > shrinkage)):
            fitted = full if candidate is None else ShrunkCovariance(shrinkage=candidate).fit(arr)
            if candidate is not None:  # Ledoit-Wolf's own shrinkage: the distances above
                dist = _cross_fitted(arr, folds, seed, candidate)
            low = np.quantile(dist, 1.0 - percentile / 100.0)
            below = float(np.mean(_mahalanobis(fitted, arr) < low))
            full, shrinkage = fitted, shrinkage if candidate is None else candidate
            if below <= share:
                break
        info["in_sample_below"] = below
    stats = OodStatistics(
        torch.from_numpy(full.location_), torch.from_numpy(full.precision_), torch.from_numpy(dist)
    )
    info = {
        "songs": int(n),
        "dimension": int(arr.shape[1]),
        "folds": int(folds),
        "shrinkage": shrinkage,
        "seed": int(seed),
        **info,
    }
    return stats, info


def _mahalanobis(fitted: Any, x: np.ndarray) -> np.ndarray:
    diff = x - fitted.location_
    return np.sqrt(np.einsum("bi,ij,bj->b", diff, fitted.precision_, diff))


def _cross_fitted(x: np.ndarray, folds: int, seed: int, shrinkage: float | None) -> np.ndarray:
    """Each song's distance under statistics fitted without its fold (``shrinkage`` None:
    Ledoit-Wolf's own per fold)."""
    from sklearn.covariance import LedoitWolf, ShrunkCovariance
    from sklearn.model_selection import KFold

    dist = np.empty(x.shape[0])
    for fit_idx, held_idx in KFold(folds, shuffle=True, random_state=seed).split(x):
        est = LedoitWolf() if shrinkage is None else ShrunkCovariance(shrinkage=shrinkage)
        dist[held_idx] = _mahalanobis(est.fit(x[fit_idx]), x[held_idx])
    return dist


def set_statistics(
    model: ApexRewardModel, stats: OodStatistics | None, info: dict[str, Any] | None = None
) -> None:
    """Attach (or with None remove) statistics on ``model``; ``info`` goes to
    ``config.ood.fitted_on``."""
    if stats is None:
        model.ood_stats = None
        model.config.ood.fitted_on = {}
        return
    model.ood_stats = stats.to(model.device)
    model.config.ood.fitted_on = dict(info or {})


def load_statistics(
    model: ApexRewardModel, tensors: Mapping[str, torch.Tensor], where: Path | str
) -> None:
    """``from_pretrained``'s hook: the ``ood.*`` tensors (none: no statistics, ``ood`` null)."""
    if tensors:
        model.ood_stats = OodStatistics.from_tensors(tensors, where)


def threshold_of(model: ApexRewardModel) -> float | None:
    """The upper flag threshold distance, or None (no statistics, or ``flag_percentile`` None)."""
    p = model.config.ood.flag_percentile
    if model.ood_stats is None or p is None:
        return None
    return model.ood_stats.threshold(p)


def lower_threshold_of(model: ApexRewardModel) -> float | None:
    """The lower flag threshold distance (``lower_tail``), or None."""
    p = model.config.ood.flag_percentile
    if model.ood_stats is None or p is None or not model.config.ood.lower_tail:
        return None
    return model.ood_stats.threshold(100.0 - p)


def attach_ood(model: ApexRewardModel, out: ApexOutput, features: SegmentFeatures) -> None:
    """Set ``out.ood`` (``[B]`` percentile) and ``out.ood_distance`` (``[B]``, differentiable)
    from the segment features (both None when the model has no statistics, or when they need the
    frames' dynamics and ``features`` comes without them, e.g. from an embeddings store)."""
    stats = model.ood_stats
    if stats is None or (needs_dynamics(model) and features.dynamics is None):
        out.ood, out.ood_distance = None, None
        return
    d = stats.distance(song_features(features, model.config.ood.features))
    out.ood_distance = d.float()
    out.ood = stats.percentile(d)


def beyond_threshold(model: ApexRewardModel, out: ApexOutput) -> list[bool] | None:
    """Per song, whether its distance lies beyond a flag threshold; None without statistics."""
    if out.ood_distance is None:
        return None
    d = out.ood_distance.detach().double()
    beyond = torch.zeros_like(d, dtype=torch.bool)
    high, low = threshold_of(model), lower_threshold_of(model)
    if high is not None:
        beyond |= d > high
    if low is not None:
        beyond |= d < low
    return [bool(v) for v in beyond.tolist()]


def merge_flags(flags: list[list[str]], beyond: Sequence[bool] | None) -> list[list[str]]:
    """``flags`` with ``"ood"`` appended for every song beyond the threshold."""
    if beyond is None:
        return flags
    return [list(f) + (["ood"] if b else []) for f, b in zip(flags, beyond)]


def ood_penalty(
    distance: torch.Tensor, threshold: float, weight: float, lower: float | None = None
) -> torch.Tensor:
    """``weight * (relu(distance / threshold - 1) ** 2 + relu(lower / distance - 1) ** 2)``
    ``[B]`` (the second term only with a ``lower`` threshold): zero between the thresholds,
    smooth (continuous first derivative) beyond them."""
    penalty = torch.relu(distance / threshold - 1.0) ** 2
    if lower is not None:
        penalty = penalty + torch.relu(lower / distance - 1.0) ** 2
    return weight * penalty


def guarded_reward(
    model: ApexRewardModel,
    reward: torch.Tensor,
    flags: Sequence[Sequence[str]],
    policy: str,
    floor: float,
    distance: torch.Tensor | None,
) -> torch.Tensor:
    """The reward under the guard ``policy`` with the OOD flag: under ``penalize`` a flagged
    song gets ``floor`` (zero gradient), except that with ``ood.penalty_weight > 0`` the ``ood``
    flag alone does not floor: the smooth :func:`ood_penalty` is subtracted instead."""
    from .guard import apply_policy

    if policy != "penalize":
        return reward
    weight = model.config.ood.penalty_weight
    t = threshold_of(model)
    if weight > 0 and distance is not None and t is not None:
        low = lower_threshold_of(model)
        reward = reward - ood_penalty(distance.to(reward.dtype), t, weight, low)
        flags = [[f for f in fl if f != "ood"] for fl in flags]
    return apply_policy(reward, flags, policy, floor)


def floors(config: ApexConfig, flags: Sequence[str] | None) -> bool:
    """Whether these flags floor a reward under ``penalize`` (``ood`` does not when the smooth
    penalty is on)."""
    if not flags:
        return False
    if config.ood.penalty_weight > 0:
        return any(f != "ood" for f in flags)
    return True
