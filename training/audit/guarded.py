"""The audit's one source of rewards and flags: :func:`guarded_forward`.

Every number the audit reports — reference rewards, probe rewards, the attack's objective —
comes from this function, so the audit sees the reward exactly as a trainer would under the
audited guard policy. It returns both the raw reward (the model's, before any guard) and the
reward under the policy, plus what the signal checks raise (with the checkpoint's thresholds,
whatever the policy: under ``off`` they are reported as "would flag").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apex_reward.signals import guard_flags, measure_signals

from .config import GuardPolicy

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["GuardedBatch", "guarded_forward", "reward_floor"]


@dataclass
class GuardedBatch:
    """Rewards of a batch of B clips under a guard policy.

    Attributes:
        raw_reward: ``[B]`` the model's reward before the guard (differentiable when the call
            was).
        reward: ``[B]`` the reward under the policy: under ``penalize`` a flagged clip gets
            :func:`reward_floor` with zero gradient; otherwise ``raw_reward``.
        checks: per clip, the flags the signal checks raise with the checkpoint's thresholds
            (also under ``off``: what the guard *would* flag).
        flags: per clip, the flags under the policy (``[]`` for every clip under ``off``).
        signals: per clip, ``{signal name: value}`` (:func:`apex_reward.signals.measure_signals`).
    """

    raw_reward: torch.Tensor
    reward: torch.Tensor
    checks: list[list[str]]
    flags: list[list[str]]
    signals: list[dict[str, float]]


def reward_floor(model: ApexRewardModel) -> float:
    """The reward a flagged clip gets under ``penalize``: ``config.guard.floor``, else the bottom
    of the reward's range (``sum_k w_k * low_k``, ``high_k`` for negative weights)."""
    from apex_reward.config import SCORE_RANGES

    floor = model.config.guard.floor
    if floor is not None:
        return float(floor)
    total = 0.0
    for name, w in model.config.reward_weights.items():
        low, high = SCORE_RANGES[name]
        total += w * (low if w >= 0 else high)
    return total


def guarded_forward(
    model: ApexRewardModel,
    waveforms: Sequence[torch.Tensor],
    sample_rate: int,
    policy: GuardPolicy,
) -> GuardedBatch:
    """Score ``waveforms`` under guard ``policy``, as the model applies it.

    Runs in the caller's gradient mode (wrap in ``torch.inference_mode()`` for static scoring).

    Args:
        model: the reward model (its ``config.guard`` gives the thresholds).
        waveforms: B clips, ``[T]`` or ``[C, T]`` float32 each (lengths may differ).
        sample_rate: Hz, all clips.
        policy: ``off``, ``flag`` or ``penalize``.

    Returns:
        :class:`GuardedBatch`.
    """
    out = model(list(waveforms), sample_rate)
    checking = dataclasses.replace(model.config.guard, policy="flag")
    signals = [measure_signals(w, sample_rate) for w in waveforms]
    checks = [guard_flags(s, checking) for s in signals]
    flags = [list(c) if policy != "off" else [] for c in checks]
    raw = out.reward
    reward = raw
    if policy == "penalize" and any(flags):
        flagged = torch.tensor([bool(f) for f in flags], device=raw.device)
        floor = torch.full_like(raw, reward_floor(model))
        reward = torch.where(flagged, floor, raw)  # the floor carries no gradient
    return GuardedBatch(raw, reward, checks, flags, signals)
