"""The public way to train: one head (:func:`~.steps.train_one`) or, with ``ensemble > 1``, an
ensemble of heads (:func:`~.ensemble.train_ensemble`, whose members are ordinary one-head runs)."""

from __future__ import annotations

from .config import TrainConfig
from .data import TrainingData
from .ensemble import train_ensemble
from .run import TrainResult
from .steps import train_one

__all__ = ["train"]


def train(
    config: TrainConfig, data: TrainingData | None = None, *, progress: bool = True
) -> TrainResult:
    """Train what ``config`` asks for and export it: one head, or ``config.ensemble`` heads
    exported as one checkpoint. ``data`` overrides loading from
    ``config.embeddings``/``config.prepared`` (tests). Resumable: rerunning the same config
    continues where a killed run stopped.

    Returns:
        The run's :class:`~.run.TrainResult` (on every process).
    """
    if config.ensemble > 1:
        return train_ensemble(config, data, progress=progress)
    return train_one(config, data, progress=progress)
