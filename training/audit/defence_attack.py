"""The gradient attack under each defence (:mod:`.defences`), for the audit and the benchmark.

For every defence: the target is the best reward of the reference clips under that defence's
objective; Adam (:func:`.attack.run_attack`) then ascends the same objective from each start.
A defence the checkpoint cannot provide gets a row saying why, and is not run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .attack import run_attack
from .defences import DEFENCES, availability, defended, unavailable_reason
from .guarded import guarded_forward
from .probes import PROBE_RATE

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["attack_under_defences", "defences_table"]

logger = logging.getLogger(__name__)


def _best_reward(model, clips, defence, robust: int, seed: int) -> tuple[float, int]:
    rewards: list[float] = []
    with torch.inference_mode():
        for i in range(0, len(clips), 4):
            batch = guarded_forward(
                model, clips[i : i + 4], PROBE_RATE, defence.guard, robust=robust, seed=seed
            )
            rewards += batch.reward.double().tolist()
    best = max(range(len(rewards)), key=rewards.__getitem__)
    return rewards[best], best


def attack_under_defences(
    model: ApexRewardModel,
    names: Sequence[str],
    clips: Sequence[tuple[str, torch.Tensor]],
    starts: Mapping[str, torch.Tensor],
    *,
    steps: int,
    lr: float = 1e-3,
    robust: int = 8,
    seed: int = 0,
    time_limit_s: float | None = None,
    ood_penalty_weight: float | None = None,
    pessimism_k: float | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Run the attack under each named defence.

    Args:
        model: the reward model.
        names: defence names (keys of :data:`.defences.DEFENCES`).
        clips: ``(name, waveform [T] at 24 kHz)`` reference clips; the target is their best.
        starts: ``{name: waveform [T]}`` attack starts, equal lengths, 24 kHz.
        steps, lr: Adam steps and learning rate.
        robust: K of the defences that use the robust reward.
        seed: seed of the robust transforms (targets: ``seed + 10000``; attack step ``s``:
            ``seed + s``).
        time_limit_s: per defence, stop the attack after this many seconds (None: no limit).
        ood_penalty_weight, pessimism_k: see :func:`.defences.defended`.
        progress: tqdm bars on stderr.

    Returns:
        One dict per defence: ``defence``, ``label`` and either ``unavailable`` (the reason) or
        ``target``, ``best_clip``, ``seconds`` and ``runs`` (per start: ``steps_run``,
        ``steps_to_beat`` (None: never), ``steps_to_beat_unflagged``, ``start_reward``,
        ``final_reward``, ``final_raw_reward``, ``final_checks``).
    """
    unknown = [n for n in names if n not in DEFENCES]
    if unknown:
        from apex_reward.errors import ConfigError

        raise ConfigError(f"unknown defences {unknown}; known: {', '.join(DEFENCES)}")
    available = availability(model, PROBE_RATE)
    waves = [w for _, w in clips]
    rows = []
    for name in names:
        defence = DEFENCES[name]
        k = robust if defence.robust else 0
        row: dict[str, Any] = {
            "defence": name,
            "label": defence.label.replace(" K ", f" K={k} "),
        }
        reason = unavailable_reason(defence, available)
        if reason is not None:
            row["unavailable"] = reason
            rows.append(row)
            logger.warning("%s: %s", name, reason)
            continue
        with defended(
            model, defence, ood_penalty_weight=ood_penalty_weight, pessimism_k=pessimism_k
        ):
            t0 = time.perf_counter()
            target, best = _best_reward(model, waves, defence, k, seed + 10_000)
            runs = run_attack(
                model,
                starts,
                PROBE_RATE,
                policy=defence.guard,
                target=target,
                steps=steps,
                lr=lr,
                robust=k,
                seed=seed,
                time_limit_s=time_limit_s,
                progress=progress,
            )
            seconds = time.perf_counter() - t0
        row.update(
            target=target,
            best_clip=clips[best][0],
            seconds=seconds,
            runs=[
                {
                    "start": r.start,
                    "steps_run": r.final.step,
                    "steps_to_beat": r.steps_to_beat,
                    "steps_to_beat_unflagged": r.steps_to_beat_unflagged,
                    "start_reward": r.trajectory[0].reward,
                    "final_reward": r.final.reward,
                    "final_raw_reward": r.final.raw_reward,
                    "final_checks": r.final.checks,
                }
                for r in runs
            ],
        )
        rows.append(row)
        logger.info("%s: done in %.0f s", name, seconds)
    return rows


def defences_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows of :func:`attack_under_defences` as a markdown table."""
    lines = [
        "| defence | start | target (best real clip) | steps to beat | reward at start "
        "| reward after last step (steps run) | checks at the end |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "unavailable" in row:
            lines.append(f"| {row['label']} | – | – | {row['unavailable']} | | | |")
            continue
        for r in row["runs"]:
            beat = "never" if r["steps_to_beat"] is None else str(r["steps_to_beat"])
            lines.append(
                f"| {row['label']} | {r['start']} | {row['target']:.4f} | {beat} | "
                f"{r['start_reward']:.4f} | {r['final_reward']:.4f} ({r['steps_run']}) | "
                f"{', '.join(r['final_checks']) or 'none'} |"
            )
    return "\n".join(lines)
