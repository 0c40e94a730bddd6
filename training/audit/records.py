"""What the audit's steps produce: a clip's scores, the reference set, a scored probe and the
attack's result. The job (:mod:`.job`) builds them; the report and the uncertainty summary read
them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .probes import PROBE_RATE, Clip, Probe

if TYPE_CHECKING:
    from .attack import AttackRun
    from .config import AuditConfig
    from .guarded import GuardedBatch

__all__ = ["AttackResult", "ClipScore", "ProbeScore", "ReferenceSet"]


@dataclass
class ClipScore:
    """One clip's rewards and flags (see :class:`.guarded.GuardedBatch`)."""

    raw_reward: float
    reward: float
    checks: list[str]
    flagged: bool
    signals: dict[str, float]
    ood: float | None = None
    reward_std: float | None = None

    @classmethod
    def from_batch(cls, batch: GuardedBatch, i: int) -> ClipScore:
        return cls(
            float(batch.raw_reward[i]),
            float(batch.reward[i]),
            list(batch.checks[i]),
            bool(batch.flags[i]),
            dict(batch.signals[i]),
            None if batch.ood is None else batch.ood[i],
            None if batch.reward_std is None else batch.reward_std[i],
        )


@dataclass
class ReferenceSet:
    """The reference clips and their rewards (step 2).

    Attributes:
        kind: ``"files"`` or ``"synthetic"``.
        clips: the clips (cut to the maximum length).
        scores: one :class:`ClipScore` per clip.
        skipped: files of a reference directory that could not be used, ``[{"path", "error"}]``.
    """

    kind: str
    clips: list[Clip]
    scores: list[ClipScore]
    skipped: list[dict[str, str]]

    @property
    def rewards(self) -> np.ndarray:
        """``[N]`` rewards under the policy."""
        return np.array([s.reward for s in self.scores], dtype=np.float64)

    @property
    def raw_rewards(self) -> np.ndarray:
        """``[N]`` raw rewards."""
        return np.array([s.raw_reward for s in self.scores], dtype=np.float64)

    @property
    def median(self) -> float:
        return float(np.median(self.rewards))

    @property
    def best(self) -> float:
        return float(self.rewards.max())

    def median_clip(self) -> int:
        """Index of the clip whose reward is closest to the median."""
        return int(np.argmin(np.abs(self.rewards - self.median)))


@dataclass
class ProbeScore:
    """A scored probe (step 3)."""

    probe: Probe
    score: ClipScore
    percentile: float
    raw_percentile: float
    above_median: bool
    failing: bool
    delta_vs_clean: float | None

    def to_dict(self) -> dict[str, Any]:
        p, s = self.probe, self.score
        return {
            "name": p.name,
            "kind": p.kind,
            "counts": p.counts,
            "source": p.source,
            "param": p.param,
            "seconds": p.waveform.shape[-1] / PROBE_RATE,
            "raw_reward": s.raw_reward,
            "reward": s.reward,
            "percentile": self.percentile,
            "raw_percentile": self.raw_percentile,
            "checks": s.checks,
            "flagged": s.flagged,
            "above_median": self.above_median,
            "failing": self.failing,
            "delta_vs_clean": self.delta_vs_clean,
            "signals": s.signals,
            "ood": s.ood,
            "reward_std": s.reward_std,
        }


@dataclass
class AttackResult:
    """The gradient attack (step 4)."""

    runs: list[AttackRun]
    target: float
    seconds: float

    def to_dict(self, cfg: AuditConfig) -> dict[str, Any]:
        return {
            "lr": cfg.lr,
            "steps": cfg.steps,
            "seconds": self.seconds,
            "target": self.target,
            "runs": [
                {
                    "start": r.start,
                    "target": r.target,
                    "steps_to_beat": r.steps_to_beat,
                    "steps_to_beat_unflagged": r.steps_to_beat_unflagged,
                    "final_raw_reward": r.final.raw_reward,
                    "final_reward": r.final.reward,
                    "final_checks": r.final.checks,
                    "final_flagged": r.final.flagged,
                    "trajectory": [dataclasses.asdict(p) for p in r.trajectory],
                }
                for r in self.runs
            ],
        }
