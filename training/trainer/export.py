"""Step 5 of training: write the run's results and the trained reward-model checkpoint."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apex_reward.checkpoint import read_checkpoint, save_checkpoint
from apex_reward.config import ApexConfig, PopularityReferenceConfig
from apex_reward.dataclass_io import from_dict, to_dict
from apex_reward.errors import ConfigError
from apex_reward.heads import ApexHead, weighted_song_mean
from apex_reward.ood import DYNAMIC_KINDS, fit_statistics, song_feature_matrix

from .calibration import fit_validation_temperature
from .config import TrainConfig
from .state import TrainState, atomic_json
from .views import augmentation_provenance

if TYPE_CHECKING:
    from torch import nn

    from .data import SplitData, TrainingData
    from .run import BestEvaluation, TrainingRun

__all__ = ["export_run", "export_checkpoint", "song_level_features"]

logger = logging.getLogger(__name__)

#: fewest training songs OOD statistics are fitted on (5 cross-fitting folds of 2+ songs)
MIN_OOD_SONGS = 10


def export_run(
    run: TrainingRun,
    state: TrainState,
    best: BestEvaluation,
    *,
    seconds: float,
    params_in_sync: bool,
) -> Path | None:
    """Step 5 (main process writes): ``metrics.json``, ``history.json``,
    ``test_predictions.parquet`` and, with ``export`` and ``model``, the checkpoint in
    ``out/model``. Returns the checkpoint's path (on every process), or None."""
    config, accelerator, out = run.config, run.accelerator, run.out
    checkpoint = None
    if accelerator.is_main_process:
        atomic_json(
            out / "metrics.json",
            {
                "metrics": best.metrics,
                "best_epoch": state.best_epoch,
                "sigma2": dict(zip(run.tasks, np.exp(best.log_vars).tolist())),
                "train_seconds_this_run": seconds,
                "world_size": run.world,
                "params_in_sync": params_in_sync,
                "config": to_dict(config),
            },
        )
        atomic_json(out / "history.json", state.history)
        best.predictions.to_parquet(out / "test_predictions.parquet", index=False)
        if config.export and config.model:
            checkpoint = export_checkpoint(
                run.module.head,
                config,
                out / "model",
                data=run.data,
                scorer=run.module,
                device=run.device,
                metrics=best.metrics,
                best_epoch=state.best_epoch,
            )
    accelerator.wait_for_everyone()
    if checkpoint is None and config.export and config.model:
        checkpoint = out / "model"
    return checkpoint


def song_level_features(split: SplitData) -> torch.Tensor:
    """``[S, L, H]`` float32 song features of a split (segment mode: the weighted mean of each
    song's segments, as the model averages them)."""
    return weighted_song_mean(
        split.features.float(), split.song_index, split.weights, len(split.song_ids)
    )


def export_checkpoint(
    head: ApexHead | Sequence[ApexHead],
    config: TrainConfig,
    out: Path,
    *,
    data: TrainingData,
    scorer: nn.Module,
    device: torch.device,
    metrics: dict[str, Any] | None = None,
    best_epoch: int | None = None,
    extra_training: dict[str, Any] | None = None,
) -> Path:
    """Write a trained :class:`~apex_reward.ApexRewardModel` checkpoint: the trained ``head`` (or
    the heads of an ensemble, member 0 first), the front end and encoder of ``config.model`` (its
    stored encoder weights are copied; a referenced encoder stays referenced), the popularity
    reference of ``config.prepared``, OOD statistics fitted on the training split's song features
    (:mod:`apex_reward.ood`), the Bradley–Terry temperature fitted on the validation split with
    ``scorer`` (the trained module, or the ensemble, on ``device``; :mod:`.calibration`), and the
    training provenance (``config``, the views and masks of ``data``, ``extra_training``)."""
    heads = [head] if isinstance(head, ApexHead) else list(head)
    raw, tensors, _ = read_checkpoint(config.model)
    base = ApexConfig.from_dict(raw)
    cfg = copy.deepcopy(base)
    cfg.head = copy.deepcopy(heads[0].config)
    cfg.ensemble_size = len(heads)
    cfg.untrained = False
    cfg.preference.head = None  # a preference head is fitted for specific heads (apex-reward arena)
    fitted = fit_validation_temperature(
        scorer,
        data,
        device,
        dict(cfg.reward_weights),
        source=str(config.prepared or config.embeddings or "the training data"),
        seed=config.seed,
    )
    if fitted is not None:
        cfg.preference.temperature, cfg.preference.calibration = fitted
    ref_path = (
        Path(config.prepared).parent / "popularity_reference.json" if config.prepared else None
    )
    if ref_path is not None and ref_path.is_file():
        cfg.popularity_reference = from_dict(
            PopularityReferenceConfig, json.loads(ref_path.read_text())
        )
    cfg.training = {
        "config": to_dict(config),
        "best_epoch": best_epoch,
        "test_metrics": (metrics or {}).get("test"),
        "base_checkpoint": str(config.model),
        **(extra_training or {}),
        **augmentation_provenance(config, data),
    }
    ood_songs = song_level_features(data.splits["train"])
    out_tensors = {k: v for k, v in tensors.items() if k.startswith("encoder.")}
    out_tensors.update(
        {f"head.{k}": v.detach().float().cpu() for k, v in heads[0].state_dict().items()}
    )
    for i, member in enumerate(heads[1:]):
        out_tensors.update(
            {f"ensemble.{i}.{k}": v.detach().float().cpu() for k, v in member.state_dict().items()}
        )
    if cfg.ood.features in DYNAMIC_KINDS:
        logger.warning(
            "ood.features=%s needs the encoder's frames, not in the embeddings store: no OOD "
            "statistics written (add them with apex-reward ood-stats --from-audio)",
            cfg.ood.features,
        )
    elif len(ood_songs) >= MIN_OOD_SONGS:
        x = song_feature_matrix(ood_songs.double(), cfg.ood.features)
        stats, info = fit_statistics(x, seed=config.seed)
        cfg.ood.fitted_on = {**info, "source": "training split", "embeddings": config.embeddings}
        out_tensors.update(stats.to_tensors())
    else:
        logger.warning(
            "%d training songs are too few for OOD statistics (need %d); the model reports "
            "ood null",
            len(ood_songs),
            MIN_OOD_SONGS,
        )
    if cfg.encoder.source is None and not any(k.startswith("encoder.") for k in out_tensors):
        raise ConfigError(f"{config.model} neither references nor stores its encoder weights")
    save_checkpoint(out, cfg.to_dict(), out_tensors)
    return out
