"""``apex-reward audit`` as named steps: the reward-hacking regression battery.

:func:`run_audit` runs the steps in order; each takes typed inputs and returns a typed result, so
a test (or a notebook) can run them one at a time:

1. :func:`open_audit` (load): check the options, create ``--out``, load the model through
   :func:`apex_reward.loading.load_model`, settle the guard policy (``--guard`` or the
   checkpoint's);
2. :func:`score_reference` (reference): decode ``--reference`` (or render synthetic songs), cut
   clips to ``--max-reference-seconds``, score them under the policy;
3. :func:`score_probes` (probes): build and score the static probes (:mod:`.probes`) under
   ``inference_mode``, with their percentile in the reference distribution and their flags;
4. :func:`attack` (attack): Adam on the waveform from white noise and from the median reference
   clip (:mod:`.attack`);
5. :func:`write_report` (report): the verdict, ``report.json``, ``report.md`` and the plots.

Every reward and flag comes from :func:`.guarded.guarded_forward`.

The exit status is 1 when a non-music probe (silence, noise, tones, square, DC, loops) scores
above the reference median without a flag under the audited policy; 0 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apex_reward.dataclass_io import finite_or_none, to_dict
from apex_reward.errors import require
from apex_reward.files import atomic_write_text
from apex_reward.guard import GuardPolicy, reward_floor
from apex_reward.loading import load_model

from .attack import run_attack
from .config import AuditConfig
from .defence_attack import attack_under_defences, defences_table
from .guarded import guarded_forward
from .probes import (
    NOISE_RMS,
    PROBE_RATE,
    SNR_LADDER_DB,
    clip_probes,
    load_reference_clips,
    reference_files,
    signal_probes,
    synthetic_reference_clips,
    to_probe_rate,
)
from .records import AttackResult, ClipScore, ProbeScore, ReferenceSet
from .report import (
    percentile_of,
    plot_attack,
    plot_probes,
    plot_snr_ladder,
    report_markdown,
    snr_ladder,
)
from .uncertainty import uncertainty_summary

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

#: A transform "raises" the reward of its clean clip when the raw reward rises by more than this
#: (float32 rounding alone moves it by ~1e-7).
RISE_TOLERANCE = 1e-4

__all__ = [
    "AuditJob",
    "open_audit",
    "score_reference",
    "score_probes",
    "attack",
    "attack_defences",
    "write_report",
    "run_audit",
]


# ----------------------------------------------------------------------------------------------
# the steps' results


@dataclass
class AuditJob:
    """What every step needs.

    Attributes:
        cfg: the options.
        model: the audited reward model (frozen, eval mode).
        out: the output directory (created).
        policy: the guard policy audited (``--guard`` or the checkpoint's).
        policy_source: ``"--guard"`` or ``"checkpoint"``.
        seconds: wall time of each step so far, seconds.
    """

    cfg: AuditConfig
    model: ApexRewardModel
    out: Path
    policy: GuardPolicy
    policy_source: str
    seconds: dict[str, float] = field(default_factory=dict)

    def score(self, waves: Sequence[tuple[torch.Tensor, int]], *, desc: str) -> list[ClipScore]:
        """Score ``(waveform [T] or [C, T], sample_rate)`` items under the policy in batches of
        ``cfg.batch_size`` (grouped by rate), under ``inference_mode``; results in input order."""
        results: list[ClipScore | None] = [None] * len(waves)
        by_rate: dict[int, list[int]] = {}
        for i, (_, sr) in enumerate(waves):
            by_rate.setdefault(int(sr), []).append(i)
        bar = None
        if self.cfg.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(waves), unit="clip", desc=desc, dynamic_ncols=True)
        try:
            for sr, indices in by_rate.items():
                for k in range(0, len(indices), self.cfg.batch_size):
                    chunk = indices[k : k + self.cfg.batch_size]
                    with torch.inference_mode():
                        batch = guarded_forward(
                            self.model, [waves[i][0] for i in chunk], sr, self.policy
                        )
                    for j, i in enumerate(chunk):
                        results[i] = ClipScore.from_batch(batch, j)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        return [r for r in results if r is not None]


# ----------------------------------------------------------------------------------------------
# the steps


def open_audit(cfg: AuditConfig, *, model: ApexRewardModel | None = None) -> AuditJob:
    """Step 1 (load): check the options, create ``cfg.out``, load the model, pick the policy.

    Args:
        cfg: the options.
        model: an already loaded model (default: :func:`apex_reward.loading.load_model` of
            ``cfg.model``).

    Raises:
        MissingDependencyError: matplotlib (the ``train`` extra) is missing.
        ConfigError, CheckpointError: invalid options or checkpoint.
    """
    require("matplotlib", "train", "apex-reward audit")
    if cfg.reference is not None:
        reference_files(cfg.reference)  # a bad path fails before the model loads
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        model = load_model(cfg.model)
    if cfg.guard is not None:
        policy, source = cfg.guard, "--guard"
    else:
        policy, source = model.config.guard.policy, "checkpoint"
    torch.manual_seed(cfg.seed)
    return AuditJob(cfg, model, out, policy, source)


def score_reference(job: AuditJob) -> ReferenceSet:
    """Step 2 (reference): decode (or render) the reference clips and score them.

    Raises:
        ConfigError: a bad ``--reference`` path or no usable clip.
    """
    t0 = time.perf_counter()
    cfg = job.cfg
    if cfg.reference:
        clips, skipped = load_reference_clips(
            cfg.reference,
            max_seconds=cfg.max_reference_seconds,
            min_seconds=job.model.config.frontend.min_duration_s,
        )
        kind = "files"
    else:
        clips = synthetic_reference_clips(cfg.reference_songs, seed=cfg.seed)
        skipped, kind = [], "synthetic"
        logger.warning(
            "no --reference: auditing against %d synthetic songs (pass real music with "
            "--reference)",
            len(clips),
        )
    scores = job.score([(c.waveform, c.sample_rate) for c in clips], desc="reference")
    job.seconds["reference"] = time.perf_counter() - t0
    return ReferenceSet(kind, clips, scores, skipped)


def score_probes(job: AuditJob, reference: ReferenceSet) -> list[ProbeScore]:
    """Step 3 (probes): build every static probe, score it, place it in the reference
    distribution. A probe *fails* when it counts (non-music), is not flagged under the policy
    and its reward is above the reference median."""
    t0 = time.perf_counter()
    cfg = job.cfg
    order = np.argsort(-reference.rewards, kind="stable")  # probe clips: best first
    picked = [reference.clips[i] for i in order[: cfg.probe_clips]]
    probes = signal_probes(cfg.probe_seconds, seed=cfg.seed) + clip_probes(
        [(c.name, to_probe_rate(c)) for c in picked],
        probe_seconds=cfg.probe_seconds,
        loop_seconds=cfg.loop_seconds,
        seed=cfg.seed,
    )
    scores = job.score([(p.waveform, PROBE_RATE) for p in probes], desc="probes")
    clean = {p.source: s.raw_reward for p, s in zip(probes, scores) if p.kind == "clean"}
    median = reference.median
    ref, ref_raw = reference.rewards, reference.raw_rewards
    results = []
    for p, s in zip(probes, scores):
        above = s.reward > median
        delta = None
        if p.source is not None and p.kind != "clean":
            delta = s.raw_reward - clean[p.source]
        results.append(
            ProbeScore(
                p,
                s,
                percentile_of(s.reward, ref),
                percentile_of(s.raw_reward, ref_raw),
                above,
                p.counts and above and not s.flagged,
                delta,
            )
        )
    job.seconds["probes"] = time.perf_counter() - t0
    return results


def attack_starts(cfg: AuditConfig, reference: ReferenceSet) -> dict[str, torch.Tensor]:
    """The attack's starting waveforms at the probe rate: -15 dBFS white noise and the reference
    clip closest to the median, both ``cfg.attack_seconds`` long (shorter if that clip is)."""
    clip = reference.clips[reference.median_clip()]
    start = to_probe_rate(clip)[: int(round(cfg.attack_seconds * PROBE_RATE))]
    rng = np.random.default_rng(cfg.seed + 2)
    noise = torch.from_numpy((NOISE_RMS * rng.standard_normal(start.shape[0])).astype(np.float32))
    return {"white_noise": noise, f"reference:{clip.name}": start}


def attack(job: AuditJob, reference: ReferenceSet) -> AttackResult:
    """Step 4 (attack): Adam on the waveform from -15 dBFS white noise and from the reference
    clip closest to the median, ``cfg.attack_seconds`` long (shorter if that clip is)."""
    t0 = time.perf_counter()
    cfg = job.cfg
    starts = attack_starts(cfg, reference)
    runs = run_attack(
        job.model,
        starts,
        PROBE_RATE,
        policy=job.policy,
        target=reference.best,
        steps=cfg.steps,
        lr=cfg.lr,
        progress=cfg.progress,
    )
    job.seconds["attack"] = time.perf_counter() - t0
    return AttackResult(runs, reference.best, starts["white_noise"].shape[0] / PROBE_RATE)


def _ladders(reference: ReferenceSet, probes: list[ProbeScore]) -> dict[str, Any]:
    clean = {p.probe.source: p.score.raw_reward for p in probes if p.probe.kind == "clean"}
    noisy: dict[str, dict[float, float]] = {}
    for p in probes:
        if p.probe.kind == "snr":
            noisy.setdefault(p.probe.source, {})[p.probe.param] = p.score.raw_reward
    gain_points = []
    gain_clip = next((p.probe.source for p in probes if p.probe.kind == "gain"), None)
    for p in probes:
        if p.probe.source == gain_clip and p.probe.kind in ("gain", "clean"):
            gain_points.append(
                {
                    "db": 0.0 if p.probe.kind == "clean" else p.probe.param,
                    "raw_reward": p.score.raw_reward,
                    "reward": p.score.reward,
                    "checks": p.score.checks,
                    "flagged": p.score.flagged,
                }
            )
    gain_points.sort(key=lambda g: g["db"])
    return {
        "snr": snr_ladder(clean, noisy, SNR_LADDER_DB),
        "gain": {"clip": gain_clip, "points": gain_points},
    }


def attack_defences(job: AuditJob, reference: ReferenceSet) -> list[dict[str, Any]]:
    """Step 4b (``--attack-defences``): the gradient attack under each named defence
    (:mod:`.defence_attack`), from the same starts as step 4; [] when none is named."""
    cfg = job.cfg
    if not cfg.attack_defences:
        return []
    t0 = time.perf_counter()
    rows = attack_under_defences(
        job.model,
        cfg.attack_defences,
        [(c.name, to_probe_rate(c)) for c in reference.clips],
        attack_starts(cfg, reference),
        steps=cfg.steps,
        lr=cfg.lr,
        robust=cfg.robust,
        seed=cfg.seed,
        progress=cfg.progress,
    )
    job.seconds["attack_defences"] = time.perf_counter() - t0
    return rows


def write_report(
    job: AuditJob,
    reference: ReferenceSet,
    probes: list[ProbeScore],
    attacked: AttackResult,
    defended: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Step 5 (report): the verdict, ``report.json``, ``report.md``, ``probes.png``,
    ``snr_ladder.png`` and ``attack.png`` in ``job.out``. Returns the summary (the JSON)."""
    cfg = job.cfg
    counted = [p for p in probes if p.probe.counts]
    failing = [p.probe.name for p in counted if p.failing]
    rewards = reference.rewards
    summary: dict[str, Any] = {
        "model": cfg.model.model,
        "out": str(job.out),
        "untrained": job.model.untrained,
        "policy": job.policy,
        "policy_source": job.policy_source,
        "guard": to_dict(dataclasses.replace(job.model.config.guard, policy=job.policy)),
        "floor": reward_floor(job.model.config),
        "reward_weights": dict(job.model.config.reward_weights),
        "config": to_dict(cfg),
        "reference": {
            "kind": reference.kind,
            "paths": list(cfg.reference or []),
            "count": len(reference.clips),
            "median": reference.median,
            "best": reference.best,
            "min": float(rewards.min()),
            "cut": sum(c.cut_from_s is not None for c in reference.clips),
            "skipped": reference.skipped,
            "clips": [
                {
                    "name": c.name,
                    "source": c.source,
                    "sample_rate": c.sample_rate,
                    "duration_s": c.duration_s,
                    "cut_from_s": c.cut_from_s,
                    "raw_reward": s.raw_reward,
                    "reward": s.reward,
                    "checks": s.checks,
                    "flagged": s.flagged,
                    "signals": s.signals,
                    "ood": s.ood,
                    "reward_std": s.reward_std,
                }
                for c, s in zip(reference.clips, reference.scores)
            ],
        },
        "probes": [p.to_dict() for p in probes],
        "uncertainty": uncertainty_summary(job.model, reference.scores, probes),
        "ladders": _ladders(reference, probes),
        "attack": attacked.to_dict(cfg),
        "attack_defences": defended or [],
        "verdict": {
            "exit_status": 1 if failing else 0,
            "failing_probes": failing,
            "counted_probes": len(counted),
            "unflagged_counted": sum(not p.score.flagged for p in counted),
            "transforms_above_median": [
                p.probe.name
                for p in probes
                if not p.probe.counts and p.probe.kind != "clean" and p.above_median
            ],
            "transforms_above_clean": [
                p.probe.name
                for p in probes
                if p.delta_vs_clean is not None
                and not p.probe.counts
                and p.delta_vs_clean > RISE_TOLERANCE
            ],
        },
    }
    job.seconds["total"] = sum(job.seconds.values())
    summary["seconds"] = dict(job.seconds)
    summary = finite_or_none(summary)
    atomic_write_text(job.out / "report.json", json.dumps(summary, indent=1) + "\n")
    plot_probes(summary, job.out / "probes.png")
    plot_snr_ladder(summary, job.out / "snr_ladder.png")
    plot_attack(summary, job.out / "attack.png")
    markdown = report_markdown(summary)
    if defended:
        markdown += (
            "\n## Gradient attack under each defence\n\n"
            "Target: the best reference clip's reward under the same defence.\n\n"
            + defences_table(defended)
            + "\n"
        )
    atomic_write_text(job.out / "report.md", markdown)
    return summary


def run_audit(cfg: AuditConfig, *, model: ApexRewardModel | None = None) -> dict[str, Any]:
    """Run every step (see the module docstring); returns the summary (also
    ``OUT/report.json``), whose ``verdict.exit_status`` is the command's exit status."""
    t0 = time.perf_counter()
    job = open_audit(cfg, model=model)
    job.seconds["load"] = time.perf_counter() - t0
    reference = score_reference(job)
    probes = score_probes(job, reference)
    attacked = attack(job, reference)
    defended = attack_defences(job, reference)
    return write_report(job, reference, probes, attacked, defended)
