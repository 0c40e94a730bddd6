"""What the trainer optimises and how it is measured: the trained module (head + uncertainty
parameters), the loss strategies, and per-task regression metrics in native units."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from apex_reward.config import POPULARITY_TASKS
from apex_reward.errors import require
from apex_reward.heads import ApexHead
from apex_reward.popularity import percentile_ranks

from .data import SplitData, TrainingData, unit_scale

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "TrainModule",
    "init_log_vars",
    "task_weights",
    "combine_losses",
    "consistency_loss",
    "regression_metrics",
    "predict_songs",
    "evaluate",
]


class TrainModule(nn.Module):
    """The head plus the uncertainty parameters; ``forward`` gives unit-range predictions."""

    def __init__(self, head: ApexHead, num_tasks: int) -> None:
        super().__init__()
        self.head = head
        self.log_vars = nn.Parameter(torch.zeros(num_tasks))

    def forward(
        self, features: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``[B, L, H]`` (and ``[B]`` condition indices of a conditioned head) -> ``[B, T]``
        predictions in [0, 1] (sigmoid of the head logits)."""
        z = self.head.logits(self.head.embed(features), conditions)
        return torch.sigmoid(torch.stack(list(z.values()), dim=1))


@torch.no_grad()
def init_log_vars(
    module: TrainModule, split: SplitData, lo: torch.Tensor, span: torch.Tensor, seed: int
) -> None:
    """Start each s_t at log(initial MSE of task t) on up to 4096 training samples.

    With s_t = 0 the uncertainty weights start at 1 and Adam moves s_t by at most ~lr per step,
    so reaching log sigma_t^2 (about -6 for a well-predicted task in unit range) takes thousands
    of steps; starting from the initial loss puts every task on the same footing at step 0.
    Every process computes the same value (same seed, same samples)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(split), generator=g)[:4096]
    was_training = module.training
    module.eval()
    pred = module(split.features[idx], split.conditions_at(idx)).float()
    module.train(was_training)
    target = (split.targets[idx] - lo) / span
    mse = ((pred - target) ** 2).mean(dim=0).clamp_min(1e-8)
    module.log_vars.copy_(torch.log(mse))


def task_weights(config: TrainConfig, tasks: tuple[str, ...]) -> torch.Tensor:
    """``[T]`` fixed task weights: the manual ones for ``manual``, else 1 (the validation loss
    of every strategy uses them)."""
    if config.loss == "manual":
        return torch.tensor(
            [
                config.popularity_weight if t in POPULARITY_TASKS else config.aesthetic_weight
                for t in tasks
            ]
        )
    return torch.ones(len(tasks))


def combine_losses(
    per_task: torch.Tensor, strategy: str, weights: torch.Tensor, log_vars: torch.Tensor
) -> torch.Tensor:
    """Total loss from per-task MSEs ``[T]``: the weighted sum (``equal``, ``manual``) or the
    uncertainty weighting (``uncertainty``; see ``docs/training.md``)."""
    if strategy == "uncertainty":
        return (0.5 * torch.exp(-log_vars) * per_task + 0.5 * log_vars).sum()
    return (weights.to(per_task.device) * per_task).sum()


def consistency_loss(
    pred: torch.Tensor,
    partner: torch.Tensor,
    strategy: str,
    weights: torch.Tensor,
    log_vars: torch.Tensor,
) -> torch.Tensor:
    """The view-consistency penalty of two ``[B, T]`` unit-range predictions of the same songs:
    the per-task mean squared difference, weighted like the regression error (the uncertainty
    precisions 0.5 exp(-s_t), held fixed, or the strategy's fixed weights), summed over tasks.
    The penalty does not move s_t."""
    per_task = ((pred - partner) ** 2).mean(dim=0)
    if strategy == "uncertainty":
        w = 0.5 * torch.exp(-log_vars.detach())
    else:
        w = weights.to(per_task.device)
    return (w * per_task).sum()


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """MSE, MAE, Pearson and Spearman (average ranks for ties) of two ``[N]`` arrays."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    err = pred - true

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        if a.std() == 0 or b.std() == 0:
            return float("nan")
        return float(np.corrcoef(a, b)[0, 1])

    return {
        "mse": float(np.mean(err**2)),
        "mae": float(np.mean(np.abs(err))),
        "pearson": corr(pred, true),
        "spearman": corr(percentile_ranks(pred), percentile_ranks(true)),
        "n": int(len(pred)),
    }


@torch.no_grad()
def predict_songs(
    module: TrainModule, split: SplitData, device: torch.device, batch: int = 4096
) -> torch.Tensor:
    """``[S, T]`` per-song predictions in unit range (segment mode: weighted mean of segments)."""
    module.eval()
    outs = []
    for start in range(0, len(split), batch):
        x = split.features[start : start + batch].to(device)
        c = split.conditions_at(slice(start, start + batch))
        outs.append(module(x, None if c is None else c.to(device)).float().cpu())
    pred = torch.cat(outs)
    if split.song_index.numel() == len(split.song_ids) and torch.equal(
        split.song_index, torch.arange(len(split.song_ids))
    ):
        return pred
    w = split.weights.float()[:, None]
    num = torch.zeros(len(split.song_ids), pred.shape[1]).index_add_(0, split.song_index, pred * w)
    den = torch.zeros(len(split.song_ids), 1).index_add_(0, split.song_index, w)
    return num / den


def evaluate(module: TrainModule, data: TrainingData, device) -> tuple[dict[str, Any], Any]:
    """Per-split, per-task metrics in native units, and the test predictions as a DataFrame."""
    pd = require("pandas", "train")
    lo, span = unit_scale(data.tasks)
    metrics: dict[str, Any] = {}
    test_frame = None
    for name, split in data.splits.items():
        pred = predict_songs(module, split, device) * span + lo
        true = split.song_targets
        metrics[name] = {
            t: regression_metrics(pred[:, j].numpy(), true[:, j].numpy())
            for j, t in enumerate(data.tasks)
        }
        if name == "test":
            test_frame = pd.DataFrame(
                {
                    "id": split.song_ids,
                    **{f"pred_{t}": pred[:, j].numpy() for j, t in enumerate(data.tasks)},
                    **{f"true_{t}": true[:, j].numpy() for j, t in enumerate(data.tasks)},
                }
            )
    return metrics, test_frame
