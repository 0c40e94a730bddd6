"""Options of ``apex-reward train``: :class:`TrainConfig` (every field is a ``--flag``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from apex_reward.errors import ConfigError

from ..distributed import DEVICE_HELP

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Options of ``apex-reward train`` (one run of the paper's multi-task training)."""

    embeddings: str = field(
        default="", metadata={"help": "extraction directory (apex-reward extract --out)"}
    )
    prepared: str = field(
        default="", metadata={"help": "prepared.parquet with targets and the split"}
    )
    model: str = field(
        default="",
        metadata={
            "help": "the checkpoint the embeddings were extracted with: its front end and encoder go into the exported model"
        },
    )
    out: str = field(default="runs/train", metadata={"help": "output directory"})
    tasks: Literal["full", "popularity"] = field(
        default="full", metadata={"help": "7 heads or streams+likes only"}
    )
    trunk_layers: Literal[2, 3] = field(default=2, metadata={"help": "shared trunk depth"})
    mode: Literal["song", "segment"] = field(
        default="song",
        metadata={"help": "song: average segments first; segment: one sample per segment"},
    )
    loss: Literal["equal", "manual", "uncertainty"] = field(
        default="uncertainty", metadata={"help": "loss strategy"}
    )
    popularity_weight: float = field(
        default=1.0, metadata={"help": "manual strategy: weight of streams and likes"}
    )
    aesthetic_weight: float = field(
        default=0.5, metadata={"help": "manual strategy: weight of each aesthetic task"}
    )
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    uncertainty_lr: float | None = field(
        default=None,
        metadata={
            "help": "learning rate of the uncertainty parameters s_t (default: 10 x lr; they are "
            "scalars that must travel several units in log space)"
        },
    )
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    epochs: int = field(default=100, metadata={"help": "maximum epochs (cosine schedule length)"})
    batch_size: int = field(default=512, metadata={"help": "samples per process per step"})
    sample_views: bool = field(
        default=True,
        metadata={
            "help": "with a store extracted with --views N: train each epoch on one view per "
            "song drawn at random (seeded); evaluation always uses view 0 (--no-sample-views: "
            "view 0 only)"
        },
    )
    view_consistency: float = field(
        default=10.0,
        metadata={
            "help": "when views are sampled: also score a second, different view of each "
            "training song and add this factor times the squared difference of the two "
            "predictions (weighted per task like the regression error) to the loss; 0: off, "
            "views are only sampled (docs/training.md#augmented-views-and-feature-masking)"
        },
    )
    mask_features: float = field(
        default=0.0,
        metadata={
            "help": "SpecAugment-style masking in training: the fraction of hidden dimensions "
            "replaced, per sample, by the training mean (the same dimensions in every layer)"
        },
    )
    mask_layers: int = field(
        default=0,
        metadata={
            "help": "SpecAugment-style masking in training: encoder layers replaced, per sample, "
            "by the training mean"
        },
    )
    patience: int = field(
        default=10, metadata={"help": "early stopping: epochs without validation improvement"}
    )
    min_delta: float = field(
        default=0.0, metadata={"help": "early stopping: smallest improvement that counts"}
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        default="auto",
        metadata={"help": "auto: fp16 on GPU, none on CPU (CPU fp16 is not supported)"},
    )
    seed: int = field(default=0, metadata={"help": "random seed"})
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})
    log_with: Literal["auto", "tensorboard", "none"] = field(
        default="auto", metadata={"help": "experiment tracker (auto: TensorBoard when installed)"}
    )
    resume: bool = field(default=True, metadata={"help": "continue from out/last when it exists"})
    export: bool = field(
        default=True, metadata={"help": "write the ApexRewardModel checkpoint to out/model"}
    )
    save_interval_s: float = field(
        default=0.0,
        metadata={
            "help": "save the resumable state at most this often, seconds (0: every epoch; always at the end)"
        },
    )
    max_epochs_this_run: int | None = field(
        default=None,
        metadata={"help": "stop (resumably) after this many epochs in this invocation"},
    )

    ensemble: int = field(
        default=1,
        metadata={
            "help": "train K heads on bootstrap resamples of the training songs (seeds seed..seed+K-1) "
            "and export them as one checkpoint sharing the encoder"
        },
    )

    condition: str | None = field(
        default=None,
        metadata={
            "help": "condition the popularity heads on this categorical column of the prepared "
            "data (e.g. platform): one learned vector per value of the training split, plus "
            "a learned average (docs/training.md#conditioning); unset: unconditioned"
        },
    )
    condition_mode: Literal["token", "embedding"] = field(
        default="token",
        metadata={
            "help": "token: a learned vector concatenated to the trunk's input; embedding: a "
            "learned vector added to the trunk's hidden state after its first block"
        },
    )
    condition_dropout: float = field(
        default=0.15,
        metadata={
            "help": "probability that a training song's condition is replaced by the learned "
            "average (which trains the average used by unconditioned calls)"
        },
    )

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "patience", "ensemble"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.mask_features < 1.0:
            raise ConfigError(f"mask_features: must be in [0, 1), got {self.mask_features}")
        if not self.view_consistency >= 0.0:
            raise ConfigError(f"view_consistency: must be >= 0, got {self.view_consistency}")
        if self.mask_layers < 0:
            raise ConfigError(f"mask_layers: must be >= 0, got {self.mask_layers}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
