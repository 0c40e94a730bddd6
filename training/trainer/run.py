"""What a training run is made of and what it returns: the shared state of one run's steps
(:class:`TrainingRun`), an epoch's statistics, the best epoch's evaluation and the result of
:func:`~.entry.train`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from .config import TrainConfig
    from .data import TrainingData
    from .objective import TrainModule
    from .views import InputAugment

__all__ = ["BestEvaluation", "EpochStats", "TrainResult", "TrainingRun"]


@dataclass
class TrainResult:
    """What :func:`~.entry.train` returns (on every process)."""

    metrics: dict[str, dict[str, dict[str, float]]]
    history: list[dict[str, Any]]
    best_epoch: int
    finished: bool
    log_vars: list[float]
    out: Path
    checkpoint: Path | None = None
    member_metrics: list[dict[str, Any]] | None = None


@dataclass
class TrainingRun:
    """What the steps of one run share (built by :func:`~.steps.setup`).

    Attributes:
        config: the options; data: the splits; out: the output directory.
        accelerator: the ``accelerate.Accelerator`` (processes, device, mixed precision).
        module: the module being trained, unwrapped (what is saved and exported).
        optimizer: AdamW over the parameter groups of :func:`~.steps.build_optimizer`.
        scheduler: cosine annealing over ``epochs * steps_per_epoch`` steps.
        steps_per_epoch: optimizer steps per epoch; global_batch: samples per step, all processes.
        lo, span: ``[T]`` native range of each task (the loss sees ``(y - lo) / span``).
        weights: ``[T]`` fixed task weights (:func:`~.objective.task_weights`).
        model: the module as accelerate prepared it (DDP-wrapped with several processes); set by
            :func:`~.state.resume`.
        augment: the training inputs' views and masks (:mod:`.views`), or None.
    """

    config: TrainConfig
    data: TrainingData
    out: Path
    accelerator: Any
    module: TrainModule
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    global_batch: int
    lo: torch.Tensor
    span: torch.Tensor
    weights: torch.Tensor
    model: nn.Module | None = None
    augment: InputAugment | None = None

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def view_consistency(self) -> float:
        """The view-consistency weight in force: ``config.view_consistency`` when views are
        sampled, else 0."""
        return self.augment.consistency if self.augment is not None else 0.0

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.data.tasks


@dataclass
class EpochStats:
    """One epoch of optimizer steps on this process: mean training loss, samples, seconds."""

    train_loss: float
    samples: int
    seconds: float


@dataclass
class BestEvaluation:
    """The best epoch's module evaluated: per split and task metrics in native units, the test
    predictions (a DataFrame: id, ``pred_<task>``, ``true_<task>``) and the learned s_t."""

    metrics: dict[str, dict[str, dict[str, float]]]
    predictions: Any
    log_vars: list[float]
