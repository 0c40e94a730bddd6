"""The configuration of the reward's integrity checks: the signal guards (:class:`GuardConfig`,
``config.json`` ``guard``) and the out-of-distribution score (:class:`OodConfig`, ``ood``). Part
of :mod:`apex_reward.config`, which re-exports both."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["GuardConfig", "OodConfig"]


@dataclass
class GuardConfig:
    """Reward guards: thresholds of the signal checks (:mod:`apex_reward.signals`) and what to do
    with a flagged clip (docs/model.md#signal-checks). A threshold of None disables its flag.

    Thresholds were chosen from measurements (``benchmarks/signal_thresholds.py``): no real clip
    and at most 2 % of clean synthetic songs flagged, every static probe (silence, near-silence,
    noise, sines, square, DC, loops) flagged by at least one check.
    """

    policy: Literal["off", "flag", "penalize"] = field(
        default="flag",
        metadata={
            "help": "off: no checks; flag: report flags next to the scores; penalize: also "
            "replace a flagged clip's reward by `floor`"
        },
    )
    floor: float | None = field(
        default=None,
        metadata={
            "help": "reward given to a flagged clip under policy=penalize; None = the bottom "
            "of the reward's range"
        },
    )
    min_loudness_lufs: float | None = field(
        default=-50.0,
        metadata={"help": "too_quiet: integrated loudness (BS.1770) below this, LUFS"},
    )
    max_silent_fraction: float | None = field(
        default=0.5,
        metadata={"help": "mostly_silent: more than this fraction of 50 ms frames below -60 dBFS"},
    )
    max_dc_offset: float | None = field(
        default=0.02,
        metadata={"help": "dc_offset: |mean sample| above this (full scale = 1)"},
    )
    max_clipped_fraction: float | None = field(
        default=0.01,
        metadata={
            "help": "clipped: more than this fraction of samples in flat runs (>= 3 samples) at "
            "the clip's peak"
        },
    )
    max_spectral_flatness: float | None = field(
        default=0.2,
        metadata={
            "help": "noise_like: median spectral flatness (0 tonal .. ~0.56 white) above this"
        },
    )
    max_tonal_dominance: float | None = field(
        default=0.7,
        metadata={
            "help": "held_tone: more than this share of the long-term power within ±6 Hz of "
            "one spectral peak"
        },
    )
    max_repetition: float | None = field(
        default=0.9,
        metadata={
            "help": "looped: spectrogram correlation with itself shifted by 1-4 s above this "
            "(exact-copy loops)"
        },
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name != "policy" and v is not None and not math.isfinite(v):
                raise ConfigError(f"guard.{f.name}: must be finite or None, got {v!r}")


@dataclass
class OodConfig:
    """Out-of-distribution score (docs/model.md#out-of-distribution-score): how far a song's
    embedding lies from the training songs' (Mahalanobis distance under a Ledoit-Wolf covariance
    stored in the checkpoint), as a percentile of the training songs' own distances."""

    flag_percentile: float | None = field(
        default=99.0,
        metadata={
            "help": "'ood' joins a song's flags when its distance exceeds this percentile of the "
            "training songs' distances; None = never flag"
        },
    )
    lower_tail: bool = field(
        default=False,
        metadata={
            "help": "also flag distances below the (100 - flag_percentile)th percentile: in many "
            "dimensions a song closer to the mean than almost every training song is as atypical "
            "as one far away (a typicality test; it also flags that share of in-distribution songs)"
        },
    )
    penalty_weight: float = field(
        default=0.0,
        metadata={
            "help": "under guard policy penalize, > 0 replaces the floor for 'ood' by the smooth "
            "penalty reward -= penalty_weight * (relu(d / t_high - 1) ** 2 + relu(t_low / d - 1) "
            "** 2), d the distance, t_high/t_low the flag thresholds"
        },
    )
    features: Literal["layer_mean", "layers", "moments"] = field(
        default="layer_mean",
        metadata={
            "help": "song feature the statistics describe: the mean of the pooled layers [H], "
            "all pooled layers concatenated [L*H], or moments: the layer mean plus the frames' "
            "standard deviation and difference RMS within each segment [3H] (fitted from audio)"
        },
    )
    fitted_on: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "provenance of the stored statistics (songs, dimension, source)"},
    )

    def __post_init__(self) -> None:
        p = self.flag_percentile
        if p is not None and not (math.isfinite(p) and 0 < p <= 100):
            raise ConfigError(f"ood.flag_percentile: must be in (0, 100] or None, got {p!r}")
        if not (math.isfinite(self.penalty_weight) and self.penalty_weight >= 0):
            raise ConfigError(
                f"ood.penalty_weight: must be a finite number >= 0, got {self.penalty_weight!r}"
            )
