"""The end of training: fit the checkpoint's Bradley–Terry temperature on its validation songs.

Pairs of validation songs are labelled by the reward computed from their *targets* (the song
with the higher true reward is preferred) and the temperature that makes ``(r_A - r_B) / T``
most likely is fitted (:func:`apex_reward.calibration.calibrate_temperature`). The test split's
pairs, never used in the fit, are measured too (held-out ECE and Brier score before and after).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from apex_reward.calibration import calibrate_temperature, ordered_pairs
from apex_reward.config import PreferenceCalibration
from apex_reward.errors import ConfigError
from apex_reward.heads import combine_scores, weighted_reward

from .data import TrainingData, unit_scale
from .objective import TrainModule, predict_songs

logger = logging.getLogger(__name__)

__all__ = ["song_rewards", "fit_validation_temperature"]


def song_rewards(
    values: torch.Tensor, tasks: tuple[str, ...], reward_weights: Mapping[str, float]
) -> np.ndarray:
    """The configured reward of per-song task values ``[S, T]`` (native units). ``[S]``."""
    scores = combine_scores({t: values[:, j].double() for j, t in enumerate(tasks)})
    return weighted_reward(scores, reward_weights).numpy()


def fit_validation_temperature(
    module: TrainModule,
    data: TrainingData,
    device: torch.device,
    reward_weights: Mapping[str, float],
    *,
    source: str,
    seed: int = 0,
) -> tuple[float, PreferenceCalibration] | None:
    """Fit the temperature on validation pairs; measure it on test pairs.

    Args:
        module: the trained module (its best epoch's weights).
        data: the training data (``val`` and, optionally, ``test`` splits).
        device: where ``module`` runs.
        reward_weights: the checkpoint's ``reward_weights``.
        source: where the data came from (recorded with the fit).
        seed: seed of the pair sampling.

    Returns:
        ``(temperature, calibration)``, or None (with a warning) when the validation split has
        too few songs or the reward does not order them (nothing sensible to fit).
    """
    lo, span = unit_scale(data.tasks)
    pairs = {}
    for name in ("val", "test"):
        split = data.splits.get(name)
        if split is None or len(split.song_ids) < 2:
            continue
        pred = predict_songs(module, split, device) * span + lo
        predicted = song_rewards(pred, data.tasks, reward_weights)
        target = song_rewards(split.song_targets, data.tasks, reward_weights)
        d, y = ordered_pairs(predicted, target, seed=seed)
        if d.size:
            pairs[name] = (d, y)
    if "val" not in pairs:
        logger.warning("too few validation songs to fit the preference temperature; keeping it")
        return None
    described = (
        f"validation split of {source}: {len(data.splits['val'].song_ids)} songs, "
        f"{pairs['val'][0].size} pairs ordered by the reward of their targets"
    )
    try:
        return calibrate_temperature(*pairs["val"], data=described, held_out=pairs.get("test"))
    except ConfigError as e:
        logger.warning("preference temperature not fitted: %s", e)
        return None
