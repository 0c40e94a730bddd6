"""Options of ``apex-reward audit``: :class:`AuditConfig` (every field is a ``--flag``).

The model is given with the shared :class:`~apex_reward.loading.ModelOptions` (``--model``,
``--device``, ``--dtype``, ``--encoder``, ``--revision``), loaded only through
:func:`apex_reward.loading.load_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from apex_reward.errors import ConfigError
from apex_reward.guard import GuardPolicy
from apex_reward.loading import ModelOptions

__all__ = ["AuditConfig"]


@dataclass
class AuditConfig:
    """Options of ``apex-reward audit`` (every field is a ``--flag``; ``--config FILE`` too)."""

    model: ModelOptions = field(
        default_factory=ModelOptions,
        metadata={
            "flatten": True,
            "help": "required --model: the reward model to audit; --device, --dtype, --encoder, "
            "--revision",
        },
    )
    reference: list[str] | None = field(
        default=None,
        metadata={
            "help": "reference music: audio files and/or directories of audio (unset: "
            "procedural synthetic songs, which the report says)",
            "metavar": "FILE_OR_DIR",
        },
    )
    out: str = field(default="runs/audit", metadata={"help": "output directory"})
    guard: GuardPolicy | None = field(
        default=None,
        metadata={
            "help": "guard policy to audit under: off, flag or penalize (unset: the checkpoint's "
            "guard.policy); the thresholds are always the checkpoint's"
        },
    )
    steps: int = field(default=100, metadata={"help": "Adam steps of the gradient attack"})
    lr: float = field(default=1e-3, metadata={"help": "Adam learning rate of the attack"})
    seed: int = field(default=0, metadata={"help": "seed of the noise probes and the attack"})
    reference_songs: int = field(
        default=8, metadata={"help": "synthetic reference songs when --reference is unset"}
    )
    max_reference_seconds: float = field(
        default=30.0, metadata={"help": "reference clips are cut to their first N seconds"}
    )
    probe_clips: int = field(
        default=4,
        metadata={
            "help": "reference clips the clip-based probes (loops, reversals, ladders, filters, "
            "padding) are built from"
        },
    )
    probe_seconds: float = field(
        default=20.0,
        metadata={"help": "length of the synthetic probes and of the loops, seconds (24 kHz)"},
    )
    loop_seconds: float = field(
        default=2.0, metadata={"help": "length of the looped excerpt (the clip's first N s)"}
    )
    attack_seconds: float = field(
        default=10.0, metadata={"help": "length of the attacked waveforms, seconds (24 kHz)"}
    )
    attack_defences: list[str] | None = field(
        default=None,
        metadata={
            "help": "also run the gradient attack under these defences: plain, guards, "
            "guards_ood, robust_guards, robust_guards_ood_pessimistic (a defence the checkpoint "
            "cannot provide is reported as unavailable; unset: none)",
            "metavar": "NAME",
        },
    )
    robust: int = field(default=8, metadata={"help": "K of the robust defences"})
    batch_size: int = field(default=8, metadata={"help": "clips per forward pass when scoring"})
    progress: bool = field(default=True, metadata={"help": "progress bars on stderr"})

    def __post_init__(self) -> None:
        self.model = ModelOptions.coerce(self.model)
        self.model.require_model()
        if self.steps < 0:
            raise ConfigError(f"steps: must be >= 0, got {self.steps}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        for name in ("max_reference_seconds", "probe_seconds", "attack_seconds", "loop_seconds"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name}: must be > 0, got {value}")
        if self.loop_seconds > self.probe_seconds:
            raise ConfigError(
                f"loop_seconds ({self.loop_seconds}) must not exceed probe_seconds "
                f"({self.probe_seconds})"
            )
        for name in ("reference_songs", "probe_clips", "batch_size"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        if self.attack_defences:
            from .defences import DEFENCES

            unknown = [n for n in self.attack_defences if n not in DEFENCES]
            if unknown:
                raise ConfigError(
                    f"attack_defences: unknown {unknown}; known: {', '.join(DEFENCES)}"
                )
        if self.robust < 1:
            raise ConfigError(f"robust: must be >= 1, got {self.robust}")
        if self.reference is not None and not self.reference:
            raise ConfigError("reference: give at least one file or directory, or leave it unset")
