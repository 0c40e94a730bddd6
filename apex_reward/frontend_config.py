"""The audio front end's configuration (:class:`FrontendConfig`, ``config.json`` ``frontend``) and
the front-end settings of new models (:data:`NEW_FRONTEND`). Part of :mod:`apex_reward.config`,
which re-exports both."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .dataclass_io import from_dict, to_dict
from .errors import ConfigError

__all__ = ["MIN_SEGMENT_SECONDS", "NEW_FRONTEND", "FrontendConfig"]

#: Shortest accepted encoder segment (s): far below any useful value, but long enough for the
#: encoder's convolutional front (400 samples at 24 kHz) and never a zero-sample segment.
MIN_SEGMENT_SECONDS = 0.1


@dataclass
class FrontendConfig:
    """Audio front end (docs/model.md#front-end). All steps run in torch and are differentiable."""

    sample_rate: int = field(default=24000, metadata={"help": "encoder sample rate in Hz"})
    segment_seconds: float = field(
        default=30.0, metadata={"help": "length of the non-overlapping segments, seconds"}
    )
    normalize: bool = field(
        default=True,
        metadata={
            "help": "per-segment zero-mean/unit-variance over the unpadded samples, as "
            "Wav2Vec2FeatureExtractor(do_normalize=True)"
        },
    )
    resampler: Literal["julius", "torchaudio"] = field(
        default="julius", metadata={"help": "differentiable resampler backend"}
    )
    min_duration_s: float = field(
        default=1.0, metadata={"help": "shorter audio is rejected (AudioTooShortError)"}
    )
    max_duration_s: float = field(
        default=1800.0, metadata={"help": "longer audio is rejected (AudioTooLongError)"}
    )
    segment_weighting: Literal["duration", "uniform"] = field(
        default="duration",
        metadata={
            "help": "how a song's segments are averaged: by their unpadded duration, or equally"
        },
    )
    # The three fields below default to the original behaviour (checkpoints written before they
    # existed score exactly as before); ApexConfig.from_preset turns them on for new models.
    trim_silence: bool = field(
        default=False,
        metadata={
            "help": "trim leading and trailing digital silence (|x| <= trim_threshold_db, at the "
            "input rate, before resampling) so that padding a song does not move its score"
        },
    )
    trim_threshold_db: float = field(
        default=-140.0,
        metadata={
            "help": "level in dBFS at or below which a sample counts as digital silence for "
            "trim_silence (-140 dBFS = 1e-7: exact zeros and float residue below 24-bit "
            "resolution; a higher level would trim the fade-in of quiet songs)"
        },
    )
    silent_segment_db: float | None = field(
        default=None,
        metadata={
            "help": "a segment whose RMS level (dBFS, mean removed) is below this gets weight 0 "
            "in its song's average, unless all of the song's segments are; None = off"
        },
    )
    normalize_floor: float = field(
        default=1e-7,
        metadata={
            "help": "the per-segment normaliser is (x - mean) / sqrt(var + normalize_floor); a "
            "larger floor bounds the waveform gradient of near-silent input"
        },
    )
    normalize_level_db: float | None = field(
        default=None,
        metadata={
            "help": "with normalize, each segment is scaled to this RMS level in dBFS instead of "
            "unit variance (for an encoder trained on natural-level audio, such as AST: it "
            "still sees natural levels, but the input's gain no longer reaches it); None = "
            "unit variance"
        },
    )

    gradient_gate_db: float | None = field(
        default=None,
        metadata={
            "help": "segments whose RMS level (dBFS, mean removed) is at or below this pass no "
            "gradient to the waveform; the gradient fades in linearly over the next 10 dB. The "
            "scores are unchanged. Bounds the gradient of (near-)silent input; None = off"
        },
    )

    segment_padding: Literal["full", "none"] = field(
        default="full",
        metadata={
            "help": "full: a song's last segment is zero-padded to segment_seconds (the paper); "
            "none: it is encoded at its own length (at least min_segment_seconds), so a short "
            "clip costs the encoder only its own duration"
        },
    )
    min_segment_seconds: float = field(
        default=1.0,
        metadata={
            "help": "with segment_padding=none, a shorter last segment is zero-padded to this "
            "length (capped at segment_seconds), seconds"
        },
    )

    def __post_init__(self) -> None:
        if self.segment_padding not in ("full", "none"):
            raise ConfigError(
                f"frontend.segment_padding: expected 'full' or 'none', got {self.segment_padding!r}"
            )
        if not (math.isfinite(self.min_segment_seconds) and self.min_segment_seconds > 0):
            raise ConfigError(
                f"frontend.min_segment_seconds: must be a finite number > 0, got "
                f"{self.min_segment_seconds!r}"
            )
        if self.gradient_gate_db is not None and not math.isfinite(self.gradient_gate_db):
            raise ConfigError(
                f"frontend.gradient_gate_db: must be finite or None, got {self.gradient_gate_db!r}"
            )
        if not (math.isfinite(self.normalize_floor) and self.normalize_floor > 0):
            raise ConfigError(
                f"frontend.normalize_floor: must be a finite number > 0, got "
                f"{self.normalize_floor!r}"
            )
        if self.normalize_level_db is not None and not (
            math.isfinite(self.normalize_level_db) and self.normalize_level_db <= 0
        ):
            raise ConfigError(
                f"frontend.normalize_level_db: must be a finite level at or below 0 dBFS, or "
                f"None, got {self.normalize_level_db!r}"
            )
        if not (math.isfinite(self.trim_threshold_db) and self.trim_threshold_db < 0):
            raise ConfigError(
                f"frontend.trim_threshold_db: must be a finite level below 0 dBFS, got "
                f"{self.trim_threshold_db!r}"
            )
        if self.silent_segment_db is not None and not math.isfinite(self.silent_segment_db):
            raise ConfigError(
                f"frontend.silent_segment_db: must be finite or None, got "
                f"{self.silent_segment_db!r}"
            )
        if not (isinstance(self.sample_rate, int) and math.isfinite(self.segment_seconds)):
            raise ConfigError(
                f"frontend: sample_rate must be an integer and segment_seconds finite, got "
                f"{self.sample_rate!r}, {self.segment_seconds!r}"
            )
        if self.sample_rate <= 0 or self.segment_seconds < MIN_SEGMENT_SECONDS:
            raise ConfigError(
                f"frontend: sample_rate must be positive and segment_seconds at least "
                f"{MIN_SEGMENT_SECONDS:g} s, got "
                f"{self.sample_rate!r}, {self.segment_seconds!r}"
            )
        if not 0 <= self.min_duration_s <= self.max_duration_s:
            raise ConfigError(
                f"frontend: need 0 <= min_duration_s <= max_duration_s, got "
                f"{self.min_duration_s!r}, {self.max_duration_s!r}"
            )

    @classmethod
    def canonical(cls, data: dict[str, Any]) -> dict[str, Any]:
        """A recorded front end (``config.json``, an embedding store's fingerprint) with every
        field this version knows, defaults filled in: a front end written before a field
        existed compares equal to the same front end written now."""
        return to_dict(from_dict(cls, data, where="frontend"))

    @property
    def segment_samples(self) -> int:
        """Samples per segment at the encoder rate (720,000 for 30 s at 24 kHz)."""
        return int(round(self.segment_seconds * self.sample_rate))

    def encoded_samples(self, valid: int) -> int:
        """Samples the encoder sees for a segment with ``valid`` unpadded samples: the full
        segment under ``segment_padding="full"``, else ``valid`` raised to the minimum."""
        if self.segment_padding == "full":
            return self.segment_samples
        floor = int(round(self.min_segment_seconds * self.sample_rate))
        return min(self.segment_samples, max(int(valid), floor))


#: Front-end settings of new models (``ApexConfig.from_preset``); the ``FrontendConfig`` defaults
#: keep the original behaviour for checkpoints written before these fields existed
#: (docs/model.md#silence-and-level).
NEW_FRONTEND: dict[str, Any] = dict(
    trim_silence=True,
    trim_threshold_db=-140.0,
    silent_segment_db=-70.0,
    gradient_gate_db=-75.0,
)
