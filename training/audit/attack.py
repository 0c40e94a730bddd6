"""The gradient attack: Adam on the waveform itself, maximising the reward under the guard.

This is the cheapest optimiser an RL fine-tune can stand in for: no generator, the samples are
the parameters. Each step scores the current waveforms with :func:`.guarded.guarded_forward`
(so under ``penalize`` a flagged waveform gets the floor and no gradient, exactly as a trainer
would see it), ascends the reward, and projects the samples back to [-1, 1] (what a PCM file
can hold). The trajectory says how many steps it takes to beat the best reference clip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from apex_reward.guard import GuardPolicy

from .guarded import guarded_forward

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["AttackPoint", "AttackRun", "run_attack"]

logger = logging.getLogger(__name__)


@dataclass
class AttackPoint:
    """The attacked waveform after ``step`` Adam updates.

    Attributes:
        step: number of updates applied (0 = the start).
        raw_reward: the model's reward before the guard.
        reward: the reward under the audited policy (what the optimiser ascends).
        checks: flags the signal checks raise (checkpoint thresholds, whatever the policy).
        flagged: flagged under the audited policy.
    """

    step: int
    raw_reward: float
    reward: float
    checks: list[str]
    flagged: bool


@dataclass
class AttackRun:
    """One attack from one start.

    Attributes:
        start: ``white_noise`` or ``reference:<clip name>``.
        target: the reward to beat (the best reference clip's, under the policy).
        trajectory: ``steps + 1`` points, one per update count 0..steps.
        steps_to_beat: the first step whose reward (under the policy) exceeds ``target``, or
            None (never).
        steps_to_beat_unflagged: the first such step at which the signal checks raise nothing,
            or None.
    """

    start: str
    target: float
    trajectory: list[AttackPoint] = field(default_factory=list)
    steps_to_beat: int | None = None
    steps_to_beat_unflagged: int | None = None

    @property
    def final(self) -> AttackPoint:
        return self.trajectory[-1]


def run_attack(
    model: ApexRewardModel,
    starts: Mapping[str, torch.Tensor],
    sample_rate: int,
    *,
    policy: GuardPolicy,
    target: float,
    steps: int,
    lr: float = 1e-3,
    progress: bool = False,
    robust: int = 0,
    seed: int = 0,
    time_limit_s: float | None = None,
) -> list[AttackRun]:
    """Run Adam (``lr``) for ``steps`` steps on every start at once.

    Args:
        model: the reward model (frozen; gradients flow to the waveform only).
        starts: ``{name: waveform [T]}``, equal lengths, at ``sample_rate`` Hz.
        policy: the guard policy applied to the objective.
        target: the reward to beat (best reference clip under ``policy``).
        steps: Adam updates; the trajectory has ``steps + 1`` points.
        lr: Adam learning rate (full scale = 1).
        progress: a tqdm bar on stderr.
        robust: K > 0 attacks the robust reward (:mod:`apex_reward.robust`), with fresh
            transforms at every step (seed ``seed + step``), as a trainer calling it would see.
        time_limit_s: stop after the first step that ends past this many seconds (the
            trajectory is then shorter than ``steps + 1``; None: no limit).

    Returns:
        One :class:`AttackRun` per start, in ``starts`` order.
    """
    names = list(starts)
    x = torch.stack([starts[n].detach().to(model.device, torch.float32) for n in names])
    x = x.clone().requires_grad_(True)  # [B, T]
    opt = torch.optim.Adam([x], lr=lr)
    runs = [AttackRun(n, float(target)) for n in names]
    bar = None
    t0 = time.perf_counter()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps + 1, unit="step", desc="attack", dynamic_ncols=True)
    try:
        for step in range(steps + 1):
            with torch.enable_grad():
                batch = guarded_forward(
                    model, list(x.unbind(0)), sample_rate, policy, robust=robust, seed=seed + step
                )
            raw = batch.raw_reward.detach().double().cpu().tolist()
            reward = batch.reward.detach().double().cpu().tolist()
            for i, run in enumerate(runs):
                point = AttackPoint(step, raw[i], reward[i], batch.checks[i], bool(batch.flags[i]))
                run.trajectory.append(point)
                if run.steps_to_beat is None and point.reward > target:
                    run.steps_to_beat = step
                if (
                    run.steps_to_beat_unflagged is None
                    and point.reward > target
                    and not point.checks
                ):
                    run.steps_to_beat_unflagged = step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(reward=" ".join(f"{r:.3f}" for r in reward))
            if step == steps:
                break
            if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                logger.warning("attack stopped after %d of %d steps (time limit)", step, steps)
                break
            opt.zero_grad(set_to_none=True)
            if batch.reward.requires_grad:
                (-batch.reward.sum()).backward()
            if x.grad is None:  # every start floored: no gradient, Adam still runs its momentum
                x.grad = torch.zeros_like(x)
            opt.step()
            with torch.no_grad():
                x.clamp_(-1.0, 1.0)
    finally:
        if bar is not None:
            bar.close()
    return runs
