"""Defences the gradient attack is run against, and whether a checkpoint can provide them.

A defence is a combination of the reward's integrity switches: the guard policy (signal checks,
``penalize``), the smooth OOD penalty (``config.ood.penalty_weight`` under ``penalize``; needs
OOD statistics in the checkpoint), the robust reward (``robust=K``,
:mod:`apex_reward.robust`) and the pessimistic reward (``config.reward_mode = "pessimistic"``,
mean − k·std over a head ensemble; needs an ensemble). :func:`availability` finds out what a
checkpoint supports from one forward pass; a defence that needs a missing part is reported as
unavailable with the reason, never silently run without it. :func:`defended` applies a
defence's config switches for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apex_reward.errors import ConfigError
from apex_reward.guard import GuardPolicy

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["Defence", "DEFENCES", "availability", "unavailable_reason", "defended"]


@dataclass(frozen=True)
class Defence:
    """One defence.

    Attributes:
        name: its key (``--defences``).
        label: how reports name it.
        guard: the guard policy of the objective.
        ood: the smooth OOD penalty is on.
        robust: K robust draws (0: off; the benchmark's ``--robust`` replaces a non-zero K).
        pessimistic: the pessimistic reward (mean − k·std over the head ensemble).
    """

    name: str
    label: str
    guard: GuardPolicy
    ood: bool = False
    robust: int = 0
    pessimistic: bool = False


#: The defences, weakest first.
DEFENCES: dict[str, Defence] = {
    d.name: d
    for d in (
        Defence("plain", "(a) plain reward", "off"),
        Defence("guards", "guards (penalize)", "penalize"),
        Defence("guards_ood", "(b) guards + OOD penalty", "penalize", ood=True),
        Defence("robust_guards", "robust K + guards", "penalize", robust=8),
        Defence(
            "robust_guards_ood_pessimistic",
            "(c) robust K + guards + OOD + pessimistic",
            "penalize",
            ood=True,
            robust=8,
            pessimistic=True,
        ),
    )
}


def availability(model: ApexRewardModel, sample_rate: int = 24000) -> dict[str, bool]:
    """What the checkpoint supports: ``{"ood": ..., "ensemble": ...}``, from one forward pass
    on a short quiet noise clip (an output with ``ood_distance`` / ``std`` means yes)."""
    g = torch.Generator().manual_seed(0)
    n = int(max(model.config.frontend.min_duration_s, 1.0) * sample_rate)
    probe = 0.05 * torch.randn(n, generator=g)
    with torch.inference_mode():
        out = model(probe[None], sample_rate, guard="off")
    return {
        "ood": getattr(out, "ood_distance", None) is not None
        and getattr(model.config, "ood", None) is not None,
        "ensemble": getattr(out, "std", None) is not None,
    }


def unavailable_reason(defence: Defence, available: dict[str, bool]) -> str | None:
    """Why ``defence`` cannot run on this checkpoint, or None."""
    if defence.ood and not available.get("ood"):
        return "unavailable: checkpoint has no OOD statistics"
    if defence.pessimistic and not available.get("ensemble"):
        return "unavailable: checkpoint has no head ensemble (pessimistic reward needs std)"
    return None


@contextlib.contextmanager
def defended(
    model: ApexRewardModel,
    defence: Defence,
    *,
    ood_penalty_weight: float | None = None,
    pessimism_k: float | None = None,
) -> Iterator[None]:
    """Apply ``defence``'s config switches to ``model`` inside the block; restored after.

    Args:
        ood_penalty_weight: the OOD penalty weight when the defence uses it (None: the
            checkpoint's).
        pessimism_k: the k of mean − k·std when the defence is pessimistic (None: the
            checkpoint's).

    Raises:
        ConfigError: the checkpoint lacks a part the defence needs.
    """
    cfg = model.config
    ood_cfg = getattr(cfg, "ood", None)
    saved = {
        name: getattr(cfg, name) for name in ("reward_mode", "pessimism_k") if hasattr(cfg, name)
    }
    saved_weight = getattr(ood_cfg, "penalty_weight", None)
    try:
        ood = getattr(model.config, "ood", None)
        if ood is not None and hasattr(ood, "penalty_weight"):
            if not defence.ood:
                ood.penalty_weight = 0.0
            elif ood_penalty_weight is not None:
                ood.penalty_weight = float(ood_penalty_weight)
        elif defence.ood:
            raise ConfigError(f"{defence.name}: this checkpoint has no OOD configuration")
        if defence.pessimistic:
            if not hasattr(model.config, "reward_mode"):
                raise ConfigError(f"{defence.name}: this apex-reward has no pessimistic mode")
            model.config.reward_mode = "pessimistic"
            if pessimism_k is not None:
                model.config.pessimism_k = float(pessimism_k)
        elif hasattr(model.config, "reward_mode"):
            model.config.reward_mode = "mean"
        yield
    finally:
        for name, value in saved.items():
            setattr(cfg, name, value)
        if saved_weight is not None:
            ood_cfg.penalty_weight = saved_weight
