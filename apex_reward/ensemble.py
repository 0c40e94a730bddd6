"""Head ensembles: K trained heads sharing one encoder pass (docs/model.md#head-ensembles).

An ensemble checkpoint (``config.ensemble_size = K > 1``) stores member 0 as the usual ``head.*``
tensors (so every single-head code path still sees ``model.head``) and members 1..K-1 under
``ensemble.{i-1}.*``. The encoder runs once; every member predicts from the same features.

Outputs: ``scores`` are the members' mean, ``std`` the members' standard deviation per score
(``[B]`` each, plus ``"reward"``: the standard deviation of the members' rewards). The reward is
the reward of the mean scores (``reward_mode="mean"``) or ``mean - pessimism_k * std`` of the
members' rewards (``"pessimistic"``). A single-head checkpoint has ``std`` None and its reward is
unchanged by the mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import state_mismatch
from .errors import CheckpointError
from .heads import ApexHead, combine_scores

if TYPE_CHECKING:
    from .config import ApexConfig
    from .model import ApexRewardModel
    from .outputs import SegmentFeatures

__all__ = ["build_members", "members", "predict_members", "load_members", "member_tensors"]


def build_members(config: ApexConfig) -> nn.ModuleList:
    """Members 1..K-1 (float64, like the main head); empty for a single-head model."""
    return nn.ModuleList(
        ApexHead(config.encoder.hidden_size, len(config.encoder.layers), config.head).to(
            torch.float64
        )
        for _ in range(config.ensemble_size - 1)
    )


def members(model: ApexRewardModel) -> list[ApexHead]:
    """All K heads, member 0 (``model.head``) first."""
    return [model.head, *model.ensemble_heads]


def predict_members(
    model: ApexRewardModel, features: SegmentFeatures, condition: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor] | None]:
    """Every member's prediction from the shared encoder features (``condition``: ``[B]``
    condition indices of a conditioned head, None: its average).

    Returns:
        ``(scores, reward, std)``: mean scores ``{name: [B]}`` float32, the reward ``[B]`` under
        ``config.reward_mode``, and ``{name: [B]}`` member standard deviations (with
        ``"reward"``), None for a single head.
    """
    args = (
        features.layer_features,
        features.song_index,
        features.weights,
        features.num_songs,
        condition,
    )
    heads = members(model)
    if len(heads) == 1:
        scores = {k: v.float() for k, v in combine_scores(heads[0](*args)).items()}
        return scores, model.reward_from_scores(scores), None
    per = [combine_scores(h(*args)) for h in heads]
    stacked = {k: torch.stack([p[k] for p in per]) for k in per[0]}  # {name: [K, B]} float64
    rewards = torch.stack([model.reward_from_scores(p) for p in per])  # [K, B]
    scores = {k: v.mean(0).float() for k, v in stacked.items()}
    std = {k: v.std(0).float() for k, v in stacked.items()}
    reward_std = rewards.std(0)
    std["reward"] = reward_std.float()
    reward = rewards.mean(0)
    if model.config.reward_mode == "pessimistic":
        reward = reward - model.config.pessimism_k * reward_std
    return scores, reward.float(), std


def member_tensors(model: ApexRewardModel) -> dict[str, torch.Tensor]:
    """Members 1..K-1 as ``ensemble.{i}.{name}`` tensors for ``model.safetensors``."""
    return {f"ensemble.{k}": v for k, v in model.ensemble_heads.state_dict().items()}


def load_members(
    model: ApexRewardModel, state: Mapping[str, torch.Tensor], where: Path | str
) -> None:
    """``from_pretrained``'s hook: load members 1..K-1 strictly (``config.ensemble_size``).

    Raises:
        CheckpointError: the stored members do not match ``ensemble_size`` or the head config.
    """
    problem = state_mismatch(model.ensemble_heads.state_dict(), state)
    if problem:
        raise CheckpointError(
            f"{where}: ensemble weights do not match config.json (ensemble_size "
            f"{model.config.ensemble_size}): {problem}"
        )
    model.ensemble_heads.load_state_dict(dict(state), strict=True)
