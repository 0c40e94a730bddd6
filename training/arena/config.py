"""Options of ``apex-reward arena``: :class:`ArenaConfig` (every field is a ``--flag``).

The model is given with the shared :class:`~apex_reward.loading.ModelOptions` (``--model``,
``--device``, ``--dtype``, ``--encoder``, ``--revision``); a config file may give them flat
(``model: DIR``, ``dtype: fp32``) or nested under ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from apex_reward.errors import ConfigError
from apex_reward.loading import ModelOptions

from .evaluation import CLASSIFIERS, DEFAULT_SVM_GRID

__all__ = ["ArenaConfig"]


@dataclass
class ArenaConfig:
    """Options of ``apex-reward arena`` (every field is a ``--flag``; ``--config FILE`` too)."""

    model: ModelOptions = field(
        default_factory=ModelOptions,
        metadata={
            "flatten": True,
            "help": "required --model: the APEX checkpoint that scores audio; --device, --dtype "
            "(auto = the GPU fast path on CUDA, fp32 = exact, fast path off), --encoder, --revision",
        },
    )
    battles: str | None = field(
        default=None,
        metadata={
            "help": "battles: the Music Arena dataset directory (battle_data/**/*.json), the "
            "dataset on the Hub (hf://music-arena/music-arena-dataset[@rev]), or a "
            ".json/.jsonl/.parquet/.csv/.tsv file"
        },
    )
    out: str = field(default="runs/arena", metadata={"help": "output directory"})
    audio_root: str | None = field(
        default=None,
        metadata={
            "help": "directory relative audio paths are resolved against (unset: the dataset "
            "directory, or the battle file's directory and its parents)"
        },
    )
    field_map: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "JSON object mapping canonical fields (battle_id, date, prompt, audio_a, "
            "audio_b, system_a, system_b, preference, is_instrumental) to the keys of your "
            "records; dotted keys reach into nested objects"
        },
    )
    date_from: str | None = field(
        default=None, metadata={"help": "keep battles on or after this ISO date/datetime"}
    )
    date_to: str | None = field(
        default=None, metadata={"help": "keep battles on or before this ISO date/datetime"}
    )
    last_days: float | None = field(
        default=None,
        metadata={"help": "keep battles within this many days of the newest one (paper: ~122)"},
    )
    batch_size: int = field(default=8, metadata={"help": "30 s segments per encoder call"})
    num_workers: int = field(default=2, metadata={"help": "audio decoding threads"})
    cache: str | None = field(
        default=None,
        metadata={
            "help": "score cache file (SQLite; unset: $APEX_REWARD_CACHE/scores.sqlite or "
            "~/.cache/apex-reward/scores.sqlite)"
        },
    )
    use_cache: bool = field(
        default=True, metadata={"help": "read and write the persistent score cache"}
    )
    folds: int = field(default=10, metadata={"help": "stratified cross-validation folds"})
    seed: int = field(default=0, metadata={"help": "seed of the fold shuffling and classifiers"})
    classifiers: list[str] = field(
        default_factory=lambda: list(CLASSIFIERS),
        metadata={
            "help": f"classifiers to cross-validate, some of {list(CLASSIFIERS)} (logreg, the "
            "preference head's model, always runs)"
        },
    )
    svm_grid: dict[str, list[Any]] = field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_SVM_GRID.items()},
        metadata={"help": "JSON grid of SVC parameters searched by an inner 3-fold CV"},
    )
    n_jobs: int = field(default=1, metadata={"help": "threads of the random forest and XGBoost"})
    ratio_eps: float = field(default=1e-6, metadata={"help": "epsilon of the ratio features"})
    calibration_bins: int = field(
        default=10, metadata={"help": "bins of the reliability diagram / ECE"}
    )
    export_head: bool = field(
        default=False,
        metadata={"help": "write the logistic model fitted on all battles into the checkpoint"},
    )
    export_system_offsets: bool = field(
        default=False,
        metadata={"help": "write per-system Bradley-Terry offsets into the checkpoint"},
    )
    export_to: str | None = field(
        default=None,
        metadata={
            "help": "write the exported checkpoint to this new directory instead of updating "
            "--model in place"
        },
    )
    swap_augment: bool = field(
        default=False,
        metadata={
            "help": "fit the exported head on every battle and its A/B-swapped copy (removes "
            "the arena's position bias: P(A>B) ~ 1-P(B>A))"
        },
    )
    offset_l2: float = field(
        default=1.0, metadata={"help": "L2 strength (Gaussian prior) of the system offsets"}
    )
    synthetic: bool = field(
        default=False,
        metadata={
            "help": "demo: generate a synthetic arena (clips + battles, hidden preference a known "
            "function of --model's scores) in OUT/synthetic_arena and evaluate on it"
        },
    )
    synthetic_battles: int = field(default=200, metadata={"help": "battles of --synthetic"})
    synthetic_songs: int = field(default=40, metadata={"help": "clips of --synthetic"})
    synthetic_seconds: float = field(default=2.0, metadata={"help": "clip length of --synthetic"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})

    def __post_init__(self) -> None:
        self.model.require_model()
        unknown = [c for c in self.classifiers if c not in CLASSIFIERS]
        if unknown:
            raise ConfigError(
                f"classifiers: unknown {unknown}; expected some of {list(CLASSIFIERS)}"
            )
        if self.folds < 2:
            raise ConfigError(f"folds: need at least 2, got {self.folds}")
        if not self.offset_l2 > 0:
            raise ConfigError(f"offset_l2: must be > 0, got {self.offset_l2}")
        if self.calibration_bins < 2:
            raise ConfigError(f"calibration_bins: need at least 2, got {self.calibration_bins}")
        if not self.battles and not self.synthetic:
            raise ConfigError("battles: give a battles file/directory, or --synthetic for a demo")
