"""The audit's one source of rewards and flags: :func:`guarded_forward`.

Every number the audit reports — reference rewards, probe rewards, the attack's objective —
comes from this function, so the audit sees the reward exactly as a trainer would under the
audited guard policy. It returns both the raw reward (the model's, before any guard) and the
reward under the policy, plus what the signal checks raise (with the checkpoint's thresholds,
whatever the policy: under ``off`` they are reported as "would flag").

The guard is the model's own (``model(..., guard=...)``, :mod:`apex_reward.guard`): the audit
runs the model under ``penalize`` when that is the audited policy (so the floor and its zero
gradient are the model's), and under ``flag`` otherwise (the checks run, the reward is raw).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apex_reward.guard import GuardPolicy

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["GuardedBatch", "guarded_forward"]


@dataclass
class GuardedBatch:
    """Rewards of a batch of B clips under a guard policy.

    Attributes:
        raw_reward: ``[B]`` the model's reward before the guard (differentiable when the call
            was).
        reward: ``[B]`` the reward under the policy: under ``penalize`` a flagged clip gets
            :func:`apex_reward.guard.reward_floor` with zero gradient; otherwise ``raw_reward``.
        checks: per clip, the flags the signal checks raise with the checkpoint's thresholds
            (also under ``off``: what the guard *would* flag).
        flags: per clip, the flags under the policy (``[]`` for every clip under ``off``).
        signals: per clip, ``{signal name: value}`` (:func:`apex_reward.signals.measure_signals`).
        ood: per clip, the OOD percentile (None without OOD statistics; the ``ood`` flag is
            among the checks beyond the threshold).
        reward_std: per clip, the ensemble's standard deviation of the reward (None for a
            single head).
    """

    raw_reward: torch.Tensor
    reward: torch.Tensor
    checks: list[list[str]]
    flags: list[list[str]]
    signals: list[dict[str, float]]
    ood: list[float | None] | None = None
    reward_std: list[float | None] | None = None


def guarded_forward(
    model: ApexRewardModel,
    waveforms: Sequence[torch.Tensor],
    sample_rate: int,
    policy: GuardPolicy,
    *,
    robust: int = 0,
    seed: int | None = None,
) -> GuardedBatch:
    """Score ``waveforms`` under guard ``policy``, as the model applies it.

    Runs in the caller's gradient mode (wrap in ``torch.inference_mode()`` for static scoring).

    Args:
        model: the reward model (its ``config.guard`` gives the thresholds).
        waveforms: B clips, ``[T]`` or ``[C, T]`` float32 each (lengths may differ).
        sample_rate: Hz, all clips.
        policy: ``off``, ``flag`` or ``penalize``.
        robust: K > 0: the robust reward, averaged over K random transforms
            (:mod:`apex_reward.robust`) drawn with ``seed``; 0: the plain reward.

    Returns:
        :class:`GuardedBatch`.
    """
    out = model(
        list(waveforms),
        sample_rate,
        guard="penalize" if policy == "penalize" else "flag",
        robust=robust,
        seed=seed,
    )
    assert out.flags is not None and out.signals is not None  # the policy is not "off"
    raw = model.reward_from_scores(out.scores)  # scores stay as predicted under every policy
    reward = out.reward if policy == "penalize" else raw
    checks = [list(f) for f in out.flags]
    flags = [list(c) if policy != "off" else [] for c in checks]
    signals = [{name: float(v[i]) for name, v in out.signals.items()} for i in range(len(checks))]
    n = len(checks)
    ood = [None] * n if out.ood is None else [float(v) for v in out.ood.detach()]
    spread = [None] * n if out.std is None else [float(v) for v in out.std["reward"].detach()]
    return GuardedBatch(raw, reward, checks, flags, signals, ood, spread)
