"""The guard policy: what a reward does with a clip its signal checks flag.

Three policies (docs/model.md#signal-checks), chosen per call or by the checkpoint's
``config.guard.policy``:

* ``off``: no checks; outputs carry no signals or flags.
* ``flag``: the checks run; every output carries its signals and flags; scores and reward are
  unchanged.
* ``penalize``: as ``flag``, and a flagged clip's reward becomes the floor
  (:func:`reward_floor`: ``config.guard.floor``, by default the bottom of the reward's range),
  with zero gradient (never NaN). Scores stay as predicted, so a report still shows them.

The command line's ``score`` and ``compare`` default to ``flag``; the RL entry points (the TRL
reward functions and the reward server) default to ``penalize``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch

from .config import SCORE_RANGES
from .errors import ConfigError
from .signals import guard_flags, measure_signals

if TYPE_CHECKING:
    from .config import ApexConfig, GuardConfig

__all__ = ["POLICIES", "GuardPolicy", "resolve_policy", "reward_floor", "check", "apply_policy"]

GuardPolicy = Literal["off", "flag", "penalize"]
POLICIES: tuple[str, ...] = ("off", "flag", "penalize")


def resolve_policy(config: ApexConfig, guard: str | None) -> str:
    """The policy a call runs under: ``guard`` when given, else the checkpoint's."""
    policy = config.guard.policy if guard is None else guard
    if policy not in POLICIES:
        raise ConfigError(f"guard: expected one of {', '.join(POLICIES)}, got {policy!r}")
    return policy


def reward_floor(config: ApexConfig) -> float:
    """The reward a flagged clip gets under ``penalize``: ``config.guard.floor``, or the lowest
    value the configured reward can take (``sum_k w_k * low_k`` over the reward's score ranges,
    the high end for negative weights; 0 for the default reward ``overall``)."""
    if config.guard.floor is not None:
        return float(config.guard.floor)
    low = 0.0
    for name, w in config.reward_weights.items():
        lo, hi = SCORE_RANGES[name]
        low += w * (lo if w >= 0 else hi)
    return low


def check(
    waveforms: Sequence[torch.Tensor], sample_rates: Sequence[int], config: GuardConfig
) -> tuple[list[dict[str, float]], list[list[str]]]:
    """Measure every song's signals and the flags they raise.

    Args:
        waveforms: one ``[T]`` or ``[C, T]`` tensor per song, as given (before the front end).
        sample_rates: Hz, one per song.
        config: the thresholds.

    Returns:
        ``(signals, flags)``: per song ``{name: value}`` and the flag names that fired.
    """
    if config.policy == "off":  # the caller asked for checks: use the thresholds as they are
        config = dataclasses.replace(config, policy="flag")
    signals = [measure_signals(w.detach(), int(sr)) for w, sr in zip(waveforms, sample_rates)]
    return signals, [guard_flags(s, config) for s in signals]


def apply_policy(
    reward: torch.Tensor, flags: Sequence[Sequence[str]], policy: str, floor: float
) -> torch.Tensor:
    """``reward`` ``[B]`` with every flagged song's value replaced by ``floor`` under
    ``penalize`` (``torch.where``: its gradient there is exactly zero); unchanged otherwise."""
    if policy != "penalize" or not any(flags):
        return reward
    flagged = torch.tensor([bool(f) for f in flags], device=reward.device)
    return torch.where(flagged, torch.full_like(reward, floor), reward)
