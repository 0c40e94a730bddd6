"""Getting a decoded clip ready for the batch worker, on the decode pool.

The batch worker is one thread; whatever it does per clip besides the forward pass caps the
server. With ``--resampler exact`` or ``soxr`` each decode thread, right after decoding and
checking a clip, measures its guard signals on the audio as sent (as the model's own guard
does) and brings it to the encoder's rate as mono: ``exact`` with the model's own front-end
steps (downmix, silence trim at the clip's rate, the julius resampler with its cached filter:
the samples the batch worker would have computed, so scores equal in-process ``model.score``),
``soxr`` with soxr (:func:`apex_reward.fast_resample.to_encoder_rate`, a different filter). The
batch worker then runs the front end with nothing left to resample, and the model takes the
signals measured earlier (:attr:`Prepared.checks`) instead of measuring them again: the OOD flag
and the guard policy (the floor, or the smooth OOD penalty) apply exactly as in-process.
:meth:`InferencePrep.finish` restores the clip's duration as sent. With ``--resampler model``
clips are queued as decoded and the model does all of it on the batch worker.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from apex_reward import guard as guard_policy
from apex_reward.fast_resample import to_encoder_rate
from apex_reward.scoring import ScoreResult

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

    from .config import ServeConfig

__all__ = ["InferencePrep", "Prepared"]


@dataclass
class Prepared:
    """A clip ready to queue: ``wav`` at ``sample_rate`` (mono at the encoder rate on the exact
    and soxr paths), its guard ``signals``/``flags`` when measured here, and its duration as
    sent."""

    wav: torch.Tensor
    sample_rate: int
    duration_s: float
    signals: dict[str, float] | None = None
    flags: list[str] | None = None

    @property
    def checks(self) -> tuple[dict[str, float], list[str]] | None:
        """``(signals, flags)`` for the model's ``checks=``, or None when not measured here."""
        if self.signals is None:
            return None
        return self.signals, list(self.flags or [])


class InferencePrep:
    """The server's per-clip preparation policy (see the module docstring).

    Args:
        model: the served model (its front end rate and guard thresholds).
        config: the server options (``resampler``, ``guard``).
    """

    def __init__(self, model: ApexRewardModel, config: ServeConfig) -> None:
        self.fast = config.resampler in ("exact", "soxr")
        self.resampler = config.resampler
        self.frontend = model.frontend
        self.policy = guard_policy.resolve_policy(model.config, config.guard)
        self.guard_config = model.config.guard
        self.target_rate = int(model.config.frontend.sample_rate)
        #: the guard the batch worker runs the model with (on every path: the OOD flag and the
        #: policy are the model's; on the fast paths it reads the signals measured here)
        self.batcher_guard: str = self.policy

    def __call__(self, wav: torch.Tensor, sample_rate: int) -> Prepared:
        """Prepare one decoded, checked clip (blocking; run it on the decode pool)."""
        duration = wav.shape[-1] / sample_rate
        if not self.fast:
            return Prepared(wav, sample_rate, duration)
        signals = flags = None
        if self.policy != "off":
            (signals,), (flags,) = guard_policy.check([wav], [sample_rate], self.guard_config)
        if self.resampler == "exact":
            with torch.no_grad():
                mono = self.frontend.resample(self.frontend.downmix(wav), sample_rate)
        else:
            mono = to_encoder_rate(wav, sample_rate, self.target_rate)
        return Prepared(mono, self.target_rate, duration, signals, flags)

    def finish(self, result: ScoreResult, prepared: Prepared) -> ScoreResult:
        """``result`` with the clip's duration as sent (the exact and soxr paths queue it
        resampled to the encoder rate)."""
        if not self.fast or not result.ok:
            return result
        return dataclasses.replace(result, duration_s=prepared.duration_s)
