"""Multi-task training of the APEX heads on extracted embeddings (``apex-reward train``)."""

from __future__ import annotations

from .steps import (
    COMMAND,
    SplitData,
    TrainConfig,
    TrainingData,
    TrainResult,
    combine_losses,
    export_checkpoint,
    format_metrics,
    load_training_data,
    regression_metrics,
    train,
)

__all__ = [
    "COMMAND",
    "SplitData",
    "TrainConfig",
    "TrainingData",
    "TrainResult",
    "combine_losses",
    "export_checkpoint",
    "format_metrics",
    "load_training_data",
    "regression_metrics",
    "train",
]
