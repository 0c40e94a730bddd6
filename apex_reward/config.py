"""The APEX reward model's configuration: everything needed to reproduce a score.

``ApexConfig`` round-trips through ``config.json`` (see :mod:`apex_reward.checkpoint`). It records
the audio front end (sample rate, segment length, the normalisation flag), the encoder (preset,
the full ``HubertConfig`` architecture, source id/path and revision, which layers are pooled), the
prediction head (trunk depth, tasks, song/segment mode), the reward weights, the preference
model, the popularity reference quantiles, and whether the model was trained at all.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ._version import __version__
from .dataclass_io import from_dict, to_dict
from .errors import ConfigError
from .presets import ENCODER_FAMILIES, ENCODER_PRESETS

FORMAT_VERSION = 1

#: Shortest accepted encoder segment (s): far below any useful value, but long enough for the
#: encoder's convolutional front (400 samples at 24 kHz) and never a zero-sample segment.
MIN_SEGMENT_SECONDS = 0.1
#: Widest accepted task-head hidden layer (a width of 10^12 would try to allocate petabytes).
MAX_HEAD_HIDDEN = 65536

POPULARITY_TASKS: tuple[str, ...] = ("streams", "likes")
AESTHETIC_TASKS: tuple[str, ...] = (
    "coherence",
    "musicality",
    "memorability",
    "clarity",
    "naturalness",
)
ALL_TASKS: tuple[str, ...] = POPULARITY_TASKS + AESTHETIC_TASKS
TASK_SETS: dict[str, tuple[str, ...]] = {"popularity": POPULARITY_TASKS, "full": ALL_TASKS}
COMBINED_SCORES: tuple[str, ...] = ("popularity", "songeval", "overall")

#: Output range of every score, (low, high).
SCORE_RANGES: dict[str, tuple[float, float]] = {
    **{t: (0.0, 100.0) for t in POPULARITY_TASKS},
    **{t: (1.0, 5.0) for t in AESTHETIC_TASKS},
    "popularity": (0.0, 100.0),
    "songeval": (1.0, 5.0),
    "overall": (0.0, 1.0),
}


def score_names(tasks: str) -> tuple[str, ...]:
    """Names of all scores a model with task set ``tasks`` outputs (predicted, then combined)."""
    predicted = TASK_SETS[tasks]
    combined = (
        ("popularity", "songeval", "overall") if tasks == "full" else ("popularity", "overall")
    )
    return predicted + combined


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


@dataclass
class LoraAdapterConfig:
    """A LoRA adapter on the encoder (PEFT), for fine-tuning it end to end from audio.

    Recorded in ``config.json`` (``encoder.lora``) so that ``from_pretrained`` rebuilds the
    adapter; its weights are stored in ``model.safetensors`` under the ``encoder_lora.`` prefix.
    Added and merged with :mod:`apex_reward.integrations.lora`, rebuilt on load by
    :mod:`apex_reward.lora` (both need ``peft``).
    """

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (alpha / r)"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(
        default=("q_proj", "v_proj"),
        metadata={"help": "names of the encoder's linear layers that get an adapter"},
    )

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"encoder.lora.r: must be an integer >= 1, got {self.r!r}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"encoder.lora.alpha: must be > 0, got {self.alpha!r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"encoder.lora.dropout: must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules:
            raise ConfigError("encoder.lora.target_modules: must name at least one module")
        self.target_modules = tuple(self.target_modules)


@dataclass
class EncoderConfig:
    """The MERT encoder: architecture, where its weights come from, which layers are pooled."""

    preset: str = field(default="mert-v1-95m", metadata={"help": "encoder preset name"})
    hubert: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "architecture: HubertConfig (mert) or ASTConfig (ast) keyword arguments; "
            "filled from preset"
        },
    )
    layers: tuple[int, ...] = field(
        default=(3, 6, 9, -1),
        metadata={"help": "hidden-state indices to mean-pool (0 = input of layer 1, -1 = last)"},
    )
    source: str | None = field(
        default="m-a-p/MERT-v1-95M",
        metadata={"help": "Hugging Face hub id or local directory of the MERT weights"},
    )
    revision: str | None = field(
        default=None,
        metadata={
            "help": "hub revision (commit hash recommended); left empty with the preset's own "
            "source, the preset's pinned commit"
        },
    )
    stored: bool = field(
        default=False,
        metadata={"help": "encoder weights are stored inside the checkpoint (no download)"},
    )
    lora: LoraAdapterConfig | None = field(
        default=None,
        metadata={
            "help": "LoRA adapter on the encoder (weights under encoder_lora. in the checkpoint)"
        },
    )
    family: str | None = field(
        default=None,
        metadata={"help": "encoder family: mert or ast; empty: the preset's (mert if none)"},
    )

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = ENCODER_PRESETS.get(self.preset, {}).get("family", "mert")
        if self.family not in ENCODER_FAMILIES:
            raise ConfigError(
                f"encoder.family: unknown family {self.family!r}; expected one of "
                f"{list(ENCODER_FAMILIES)}"
            )
        if not self.hubert:
            if self.preset not in ENCODER_PRESETS:
                raise ConfigError(
                    f"encoder.preset: unknown preset {self.preset!r}; expected one of "
                    f"{sorted(ENCODER_PRESETS)} or an explicit encoder.hubert architecture"
                )
            self.hubert = copy.deepcopy(ENCODER_PRESETS[self.preset]["hubert"])
        preset = ENCODER_PRESETS.get(self.preset)
        if self.revision is None and preset is not None and self.source == preset["source"]:
            self.revision = preset["revision"]  # the preset's hub id at its pinned commit
        for key in ("hidden_size", "num_hidden_layers"):
            if key not in self.hubert:
                raise ConfigError(f"encoder.hubert: missing {key!r}")
        n = self.num_hidden_states
        if not self.layers:
            raise ConfigError("encoder.layers: must name at least one layer")
        for i in self.layers:
            if not -n <= i < n:
                raise ConfigError(
                    f"encoder.layers: layer {i} does not exist; the encoder has {n} hidden "
                    f"states (indices {-n}..{n - 1})"
                )

    @classmethod
    def from_preset(
        cls, preset: str, *, source: str | None = "preset", revision: str | None = None
    ) -> EncoderConfig:
        """Config of a named preset; ``source="preset"`` keeps the preset's default source.

        With the preset's own hub id and no ``revision``, the preset's pinned commit is used
        (reproducible weights); another source gets ``revision`` as given."""
        if preset not in ENCODER_PRESETS:
            raise ConfigError(
                f"unknown encoder preset {preset!r}; expected one of {sorted(ENCODER_PRESETS)}"
            )
        p = ENCODER_PRESETS[preset]
        return cls(
            preset=preset,
            hubert=copy.deepcopy(p["hubert"]),
            layers=tuple(p["layers"]),
            source=p["source"] if source == "preset" else source,
            revision=revision,
            family=p.get("family", "mert"),
        )

    @property
    def hidden_size(self) -> int:
        return int(self.hubert["hidden_size"])

    @property
    def num_hidden_states(self) -> int:
        """Entries of ``output_hidden_states``: one per layer plus the input of the first."""
        return int(self.hubert["num_hidden_layers"]) + 1


@dataclass
class ConditionConfig:
    """A categorical conditioning input of the head (docs/model.md#conditioning): one learned
    vector per value of a manifest column (e.g. ``platform``), plus a learned average vector used
    when no condition is given (trained by condition dropout)."""

    values: list[str] = field(
        metadata={"help": "the vocabulary, fixed at training time from the training split"}
    )
    column: str = field(default="platform", metadata={"help": "the manifest column"})
    mode: Literal["token", "embedding"] = field(
        default="token",
        metadata={
            "help": "token: a learned vector of width `dim` concatenated to the trunk's input; "
            "embedding: a learned vector added to the trunk's hidden state after its first block"
        },
    )
    dim: int = field(default=32, metadata={"help": "width of the token (mode token)"})
    dropout: float = field(
        default=0.15,
        metadata={
            "help": "probability that a training song's condition is replaced by the average "
            "vector (which trains the average)"
        },
    )

    def __post_init__(self) -> None:
        self.values = [str(v) for v in self.values]
        if not self.values or len(set(self.values)) != len(self.values):
            raise ConfigError(f"head.condition.values: need distinct values, got {self.values!r}")
        if isinstance(self.dim, bool) or not isinstance(self.dim, int) or self.dim < 1:
            raise ConfigError(f"head.condition.dim: must be an integer >= 1, got {self.dim!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ConfigError(
                f"head.condition.dropout: must be a probability in [0, 1), got {self.dropout!r}"
            )


@dataclass
class HeadConfig:
    """Aggregation, shared trunk and task heads (docs/model.md#prediction-head)."""

    trunk_layers: Literal[2, 3] = field(default=2, metadata={"help": "shared trunk depth"})
    tasks: Literal["full", "popularity"] = field(
        default="full", metadata={"help": "7 heads (full) or streams+likes (popularity)"}
    )
    mode: Literal["song", "segment"] = field(
        default="song",
        metadata={
            "help": "song: average segment embeddings, then predict; segment: predict per "
            "segment, then average predictions"
        },
    )
    head_hidden: int = field(default=64, metadata={"help": "hidden width of each task head"})
    trunk_dropout: float = field(default=0.3, metadata={"help": "dropout in the shared trunk"})
    head_dropout: float = field(default=0.1, metadata={"help": "dropout in the task heads"})
    condition: ConditionConfig | None = field(
        default=None,
        metadata={"help": "conditioning input (platform, region, ...); None = unconditioned"},
    )

    def __post_init__(self) -> None:
        if not (isinstance(self.head_hidden, int) and 1 <= self.head_hidden <= MAX_HEAD_HIDDEN):
            raise ConfigError(
                f"head.head_hidden: must be an integer from 1 to {MAX_HEAD_HIDDEN}, got "
                f"{self.head_hidden!r}"
            )
        for name in ("trunk_dropout", "head_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0 <= p < 1):
                raise ConfigError(f"head.{name}: must be a probability in [0, 1), got {p!r}")

    @property
    def trunk_widths(self) -> tuple[int, ...]:
        """Trunk output widths: 2 layers 512, 256; 3 layers 512, 384, 256."""
        return (512, 256) if self.trunk_layers == 2 else (512, 384, 256)

    @property
    def task_names(self) -> tuple[str, ...]:
        return TASK_SETS[self.tasks]


@dataclass
class PreferenceHeadConfig:
    """A fitted logistic preference model over pairwise features (docs/model.md#preference-head)."""

    features: list[str] = field(metadata={"help": "feature names, in coefficient order"})
    coef: list[float] = field(metadata={"help": "logistic-regression coefficients"})
    intercept: float = field(metadata={"help": "logistic-regression intercept"})
    mean: list[float] | None = field(
        default=None, metadata={"help": "feature standardisation mean (None: not standardised)"}
    )
    scale: list[float] | None = field(
        default=None, metadata={"help": "feature standardisation scale"}
    )
    ratio_eps: float = field(default=1e-6, metadata={"help": "epsilon in a / (b + eps)"})
    fitted_on: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "provenance: data, battles, CV metrics"}
    )

    def __post_init__(self) -> None:
        n = len(self.features)
        if len(self.coef) != n:
            raise ConfigError(f"preference.head: {len(self.coef)} coefficients for {n} features")
        for name in ("mean", "scale"):
            v = getattr(self, name)
            if v is not None and len(v) != n:
                raise ConfigError(f"preference.head.{name}: {len(v)} values for {n} features")


@dataclass
class PreferenceCalibration:
    """Where ``preference.temperature`` came from: a maximum-likelihood fit of Bradley–Terry on
    labelled pairs (:mod:`apex_reward.calibration`), with its calibration on those pairs."""

    data: str = field(metadata={"help": "the labelled pairs the temperature was fitted on"})
    pairs: int = field(metadata={"help": "number of pairs fitted"})
    ece: float = field(metadata={"help": "expected calibration error (10 bins) at the fit"})
    brier: float = field(metadata={"help": "Brier score at the fitted temperature"})
    log_loss: float = field(metadata={"help": "mean log loss at the fitted temperature"})
    ece_before: float = field(metadata={"help": "ECE of the same pairs at temperature 1"})
    brier_before: float = field(metadata={"help": "Brier score at temperature 1"})
    held_out: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "the same metrics on held-out pairs (when there were any)"},
    )


@dataclass
class PreferenceConfig:
    """How ``logit P(A > B)`` is computed."""

    temperature: float = field(
        default=1.0,
        metadata={"help": "Bradley-Terry temperature: logit = (r_A - r_B) / temperature"},
    )
    head: PreferenceHeadConfig | None = field(
        default=None, metadata={"help": "fitted preference head; replaces Bradley-Terry"}
    )
    system_offsets: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "optional per-generator Bradley-Terry offsets (anchor calibration)"},
    )
    calibration: PreferenceCalibration | None = field(
        default=None,
        metadata={"help": "provenance of a fitted temperature (None: temperature not fitted)"},
    )

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"preference.temperature: must be > 0, got {self.temperature!r}")


@dataclass
class PopularityReferenceConfig:
    """Reference distribution of raw counts (docs/popularity.md), stored as quantiles."""

    levels: list[float] = field(metadata={"help": "quantile levels in [0, 1], increasing"})
    streams: list[float] = field(metadata={"help": "stream-count quantiles at `levels`"})
    likes: list[float] = field(metadata={"help": "like-count quantiles at `levels`"})
    num_songs: int = field(default=0, metadata={"help": "size of the reference set"})

    def __post_init__(self) -> None:
        n = len(self.levels)
        if n < 2 or len(self.streams) != n or len(self.likes) != n:
            raise ConfigError(
                "popularity_reference: levels, streams and likes must have the same length >= 2"
            )


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


@dataclass
class ApexConfig:
    """Complete configuration of an :class:`~apex_reward.ApexRewardModel` checkpoint."""

    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    reward_weights: dict[str, float] = field(
        default_factory=lambda: {"overall": 1.0},
        metadata={"help": "scalar reward = sum of weight * named score"},
    )
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    popularity_reference: PopularityReferenceConfig | None = None
    guard: GuardConfig = field(
        default_factory=GuardConfig,
        metadata={"help": "reward guards: signal-check thresholds and policy"},
    )
    ood: OodConfig = field(
        default_factory=OodConfig,
        metadata={"help": "out-of-distribution score: flag percentile and smooth penalty"},
    )
    ensemble_size: int = field(
        default=1, metadata={"help": "number of trained heads (members) sharing the encoder"}
    )
    reward_mode: Literal["mean", "pessimistic"] = field(
        default="mean",
        metadata={
            "help": "ensembles: mean = reward of the members' mean scores; pessimistic = that "
            "minus pessimism_k times the members' standard deviation of the reward"
        },
    )
    pessimism_k: float = field(
        default=1.0, metadata={"help": "k of reward_mode pessimistic (mean - k * std)"}
    )
    untrained: bool = field(
        default=True, metadata={"help": "True until the heads have been trained"}
    )
    training: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "provenance of the trained heads"}
    )
    format_version: int = FORMAT_VERSION
    apex_reward_version: str = __version__

    def __post_init__(self) -> None:
        if self.format_version > FORMAT_VERSION:
            raise ConfigError(
                f"format_version {self.format_version} is newer than this apex-reward "
                f"({__version__}) understands ({FORMAT_VERSION}); upgrade apex-reward"
            )
        if isinstance(self.ensemble_size, bool) or self.ensemble_size < 1:
            raise ConfigError(f"ensemble_size: must be an integer >= 1, got {self.ensemble_size!r}")
        if not (math.isfinite(self.pessimism_k) and self.pessimism_k >= 0):
            raise ConfigError(
                f"pessimism_k: must be a finite number >= 0, got {self.pessimism_k!r}"
            )
        if self.encoder.family == "ast" and self.frontend.sample_rate != 16000:
            raise ConfigError(
                f"frontend.sample_rate: the AST encoder reads 16 kHz audio, got "
                f"{self.frontend.sample_rate}"
            )
        names = set(self.score_names)
        if not self.reward_weights:
            raise ConfigError("reward_weights: must name at least one score")
        for name, w in self.reward_weights.items():
            if name not in names:
                raise ConfigError(
                    f"reward_weights: unknown score {name!r}; this model outputs {sorted(names)}"
                )
            if not math.isfinite(w):
                raise ConfigError(f"reward_weights.{name}: weight must be finite, got {w!r}")

    @property
    def score_names(self) -> tuple[str, ...]:
        """All score names in output order."""
        return score_names(self.head.tasks)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ApexConfig:
        """Strict parse: unknown or invalid fields raise ``ConfigError`` naming them."""
        return from_dict(cls, data, where="config")

    @classmethod
    def from_preset(
        cls,
        preset: str,
        *,
        encoder_source: str | None = "preset",
        revision: str | None = None,
        **head: Any,
    ) -> ApexConfig:
        """An untrained config for an encoder preset; ``head`` overrides :class:`HeadConfig`."""
        frontend = {**NEW_FRONTEND, **ENCODER_PRESETS.get(preset, {}).get("frontend", {})}
        return cls(
            frontend=FrontendConfig(**frontend),
            encoder=EncoderConfig.from_preset(preset, source=encoder_source, revision=revision),
            head=HeadConfig(**head),
        )
