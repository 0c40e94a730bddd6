"""The APEX reward model's configuration: everything needed to reproduce a score.

``ApexConfig`` round-trips through ``config.json`` (see :mod:`apex_reward.checkpoint`). It records
the audio front end (sample rate, segment length, the normalisation flag), the encoder (preset,
the full ``HubertConfig`` architecture, source id/path and revision, which layers are pooled), the
prediction head (trunk depth, tasks, song/segment mode), the reward weights, the preference
model, the popularity reference quantiles, and whether the model was trained at all.

The front end's section is defined in :mod:`apex_reward.frontend_config` and the guard and OOD
sections in :mod:`apex_reward.integrity_config`; all are importable from here.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from ._version import __version__
from .dataclass_io import from_dict, to_dict
from .errors import ConfigError
from .frontend_config import NEW_FRONTEND, FrontendConfig
from .integrity_config import GuardConfig, OodConfig
from .presets import ENCODER_FAMILIES, ENCODER_PRESETS

FORMAT_VERSION = 1

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
