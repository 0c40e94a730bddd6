"""The audit's OOD and ensemble-spread figures: how the checkpoint's own trust signals see the
static probes against the reference clips.

* OOD (checkpoints with statistics, :mod:`apex_reward.ood`): how many non-music probes and how
  many reference clips the ``ood`` flag fires on, and the median OOD percentile of each group.
* Ensemble spread (ensemble checkpoints, :mod:`apex_reward.ensemble`): the median standard
  deviation of the reward over the heads, for the non-music probes and the reference clips, and
  their ratio (above 1: the heads disagree more on the probes than on music).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..formatting import fmt_number

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

    from .records import ClipScore, ProbeScore

__all__ = ["uncertainty_summary", "uncertainty_markdown"]


def _median(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.median(kept)) if kept else None


def uncertainty_summary(
    model: ApexRewardModel, reference: Sequence[ClipScore], probes: Sequence[ProbeScore]
) -> dict[str, Any]:
    """``{"ood": {...} | None, "ensemble": {...} | None}`` (see the module docstring)."""
    counted = [p.score for p in probes if p.probe.counts]
    ood = None
    if model.ood_stats is not None:
        ood = {
            "flag_percentile": model.config.ood.flag_percentile,
            "probes_flagged": sum("ood" in s.checks for s in counted),
            "probes": len(counted),
            "reference_flagged": sum("ood" in s.checks for s in reference),
            "reference": len(reference),
            "median_probe_percentile": _median([s.ood for s in counted]),
            "median_reference_percentile": _median([s.ood for s in reference]),
        }
    ensemble = None
    if model.config.ensemble_size > 1:
        on_probes = _median([s.reward_std for s in counted])
        on_reference = _median([s.reward_std for s in reference])
        ensemble = {
            "heads": model.config.ensemble_size,
            "reward_mode": model.config.reward_mode,
            "median_probe_std": on_probes,
            "median_reference_std": on_reference,
            "ratio": None if on_probes is None or not on_reference else on_probes / on_reference,
        }
    return {"ood": ood, "ensemble": ensemble}


def uncertainty_markdown(summary: dict[str, Any]) -> list[str]:
    """The report's "OOD and ensemble spread" section (lines)."""
    u = summary.get("uncertainty") or {}
    lines = ["## OOD and ensemble spread", ""]
    ood, ens = u.get("ood"), u.get("ensemble")
    if ood is None:
        lines.append("The checkpoint has no OOD statistics (`apex-reward ood-stats` adds them).")
    else:
        lines.append(
            f"OOD flag (beyond the {ood['flag_percentile']}th percentile of the training songs' "
            f"distances): {ood['probes_flagged']} of {ood['probes']} non-music probes, "
            f"{ood['reference_flagged']} of {ood['reference']} reference clips; median OOD "
            f"percentile {_fmt(ood['median_probe_percentile'])} (probes) vs "
            f"{_fmt(ood['median_reference_percentile'])} (reference)."
        )
    lines.append("")
    if ens is None:
        lines.append("Single-head checkpoint: no ensemble spread (`train --ensemble K`).")
    else:
        lines.append(
            f"Ensemble of {ens['heads']} heads (reward mode {ens['reward_mode']}): median "
            f"standard deviation of the reward {_fmt(ens['median_probe_std'], 4)} on non-music "
            f"probes vs {_fmt(ens['median_reference_std'], 4)} on reference clips (ratio "
            f"{_fmt(ens['ratio'], 2)})."
        )
    return lines + [""]


def _fmt(x: float | None, digits: int = 1) -> str:
    return fmt_number(x, digits)
