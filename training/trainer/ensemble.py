"""``train --ensemble K``: K heads on bootstrap resamples of the training split, one checkpoint.

Member ``i`` is an ordinary run (:func:`~.steps.train_one`) with seed ``seed + i`` on a bootstrap
resample of the training songs (drawn with replacement, with the same seed; validation and test
are unchanged), written to ``out/member{i}`` (each member resumes on its own). The ensemble is
then evaluated as the mean of its members' predictions, and exported as one
:class:`~apex_reward.ApexRewardModel` checkpoint holding all K heads and one encoder
(:mod:`apex_reward.ensemble`).

Files in ``out``: ``metrics.json`` (the mean's metrics per split and task, every member's test
metrics, K), ``test_predictions.parquet`` (the mean's) and ``model/``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from apex_reward.dataclass_io import to_dict
from apex_reward.heads import ApexHead

from .config import TrainConfig
from .data import SplitData, TrainingData, load_training_data
from .export import export_checkpoint
from .objective import TrainModule, evaluate
from .state import atomic_json
from .steps import head_config, train_one

logger = logging.getLogger(__name__)

__all__ = ["EnsembleModule", "bootstrap_split", "train_ensemble"]


class EnsembleModule(nn.Module):
    """The mean of several :class:`TrainModule` s: ``[B, L, H]`` -> ``[B, T]`` unit-range
    predictions (what :func:`~.objective.evaluate` measures)."""

    def __init__(self, members: list[TrainModule]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(
        self, features: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.stack([m(features, conditions) for m in self.members]).mean(0)


def bootstrap_split(split: SplitData, seed: int) -> SplitData:
    """A bootstrap resample of ``split`` by song (with replacement, ``S`` songs drawn); in
    segment mode every segment of a drawn song comes along."""
    n_songs = len(split.song_ids)
    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(n_songs, (n_songs,), generator=g)
    order = torch.argsort(split.song_index, stable=True)
    counts = torch.bincount(split.song_index, minlength=n_songs)
    starts = torch.cumsum(counts, 0) - counts
    rows = torch.cat([order[starts[s] : starts[s] + counts[s]] for s in drawn.tolist()])
    return SplitData(
        split.features[rows],
        split.targets[rows],
        torch.repeat_interleave(torch.arange(n_songs), counts[drawn]),
        split.weights[rows],
        [split.song_ids[s] for s in drawn.tolist()],
        split.conditions_at(rows),
        extra_views=None if split.extra_views is None else split.extra_views[:, rows],
    )


def train_ensemble(config: TrainConfig, data: TrainingData | None = None, *, progress: bool = True):
    """Train ``config.ensemble`` members and export them as one checkpoint.

    Returns:
        A :class:`~.run.TrainResult` whose metrics are the ensemble mean's (``member_metrics``:
        each member's per-split metrics), or the unfinished member's result when a member
        stopped early (``max_epochs_this_run``; rerun to continue).
    """
    if data is None:
        data = load_training_data(config)
    out = Path(config.out)
    modules: list[TrainModule] = []
    results = []
    head_cfg = head_config(config, data)
    for i in range(config.ensemble):
        seed = config.seed + i
        splits = dict(data.splits, train=bootstrap_split(data.splits["train"], seed))
        member_cfg = dataclasses.replace(
            config, ensemble=1, seed=seed, out=str(out / f"member{i}"), export=False
        )
        member_data = dataclasses.replace(data, splits=splits)
        result = train_one(member_cfg, member_data, progress=progress)
        if not result.finished:
            return result
        module = TrainModule(ApexHead(data.hidden_size, data.num_layers, head_cfg), len(data.tasks))
        module.load_state_dict(load_file(str(out / f"member{i}" / "best" / "module.safetensors")))
        modules.append(module.eval())
        results.append(result)
    ensemble = EnsembleModule(modules)
    metrics, predictions = evaluate(ensemble, data, torch.device("cpu"))
    member_metrics = [r.metrics for r in results]
    result = dataclasses.replace(
        results[0], metrics=metrics, out=out, checkpoint=None, member_metrics=member_metrics
    )
    import accelerate.state

    if accelerate.state.PartialState().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_json(
            out / "metrics.json",
            {
                "metrics": metrics,
                "ensemble": config.ensemble,
                "member_metrics": member_metrics,
                "best_epoch": results[0].best_epoch,
                "best_epochs": [r.best_epoch for r in results],
                "config": to_dict(config),
            },
        )
        predictions.to_parquet(out / "test_predictions.parquet", index=False)
        # member 0's learning curve stands for the run (grid plots read out/history.json)
        shutil.copyfile(out / "member0" / "history.json", out / "history.json")
        if config.export and config.model:
            export_checkpoint(
                [m.head for m in modules],
                config,
                out / "model",
                metrics=metrics,
                best_epoch=results[0].best_epoch,
                data=data,
                # the ensemble's mean reward is what preference_logits compares
                scorer=ensemble,
                device=torch.device("cpu"),
                extra_training={
                    "ensemble": config.ensemble,
                    "member_seeds": [config.seed + i for i in range(config.ensemble)],
                    "member_best_epochs": [r.best_epoch for r in results],
                    "member_test_metrics": [m.get("test") for m in member_metrics],
                    "bootstrap": "training songs resampled with replacement, seed = member seed",
                },
            )
    if config.export and config.model:
        result.checkpoint = out / "model"
    return result
