"""``apex-reward calibrate``: refit a checkpoint's Bradley–Terry temperature on labelled pairs.

The pairs file is JSONL, one pair per line: ``{"a": AUDIO, "b": AUDIO, "label": L}`` with ``L``
1 when A is preferred, 0 when B is (a soft label in between, e.g. 0.5 for a tie, also counts).
Relative audio paths are taken relative to the pairs file's directory. Every distinct file is
scored once; a file that cannot be scored drops its pairs (counted and named in the summary),
the rest are fitted. The temperature (maximum likelihood, :mod:`apex_reward.calibration`) and its
provenance — the pairs file, their number, ECE and Brier score before and after — are written
to the checkpoint's ``config.json`` (in place, or to a copy with ``--out``). A fitted preference
head (``apex-reward arena``), when the checkpoint has one, still takes precedence; the command
says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apex_reward.calibration import calibrate_temperature
from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments, to_dict
from apex_reward.errors import ConfigError
from apex_reward.guard import GuardPolicy
from apex_reward.loading import ModelOptions, load_model

from .flags import ENCODER_DTYPE, add_renamed_flags, config_from_args

logger = logging.getLogger(__name__)

__all__ = ["CalibrateConfig", "LabelledPair", "read_pairs", "run_calibration", "COMMAND"]


@dataclass
class CalibrateConfig:
    """Options of ``apex-reward calibrate`` (every field is a ``--flag``; ``--config FILE`` too)."""

    model: ModelOptions = field(
        default_factory=ModelOptions,
        metadata={
            "flatten": True,
            "help": "required --model: the checkpoint directory to calibrate; --device, --dtype, "
            "--encoder, --revision",
        },
    )
    pairs: str = field(
        default="",
        metadata={
            "help": 'required: JSONL of labelled pairs {"a": AUDIO, "b": AUDIO, "label": 1|0} '
            "(1 = A preferred; relative paths are relative to this file)",
            "metavar": "FILE",
        },
    )
    out: str | None = field(
        default=None,
        metadata={
            "help": "write the calibrated checkpoint here (unset: update --model in place)",
            "metavar": "DIR",
        },
    )
    guard: GuardPolicy = field(
        default="flag",
        metadata={"help": "guard policy the rewards are computed under (off, flag, penalize)"},
    )
    batch_size: int = field(default=8, metadata={"help": "segments per encoder call"})

    def __post_init__(self) -> None:
        self.model = ModelOptions.coerce(self.model)
        self.model.require_model()
        if not self.pairs:
            raise ConfigError("pairs: give the labelled-pairs JSONL file (--pairs FILE)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


@dataclass
class LabelledPair:
    """One line of the pairs file: audio paths (resolved) and P(A preferred) in [0, 1]."""

    a: str
    b: str
    label: float


def read_pairs(path: str | Path) -> list[LabelledPair]:
    """Parse the pairs file; errors name the line.

    Raises:
        ConfigError: a missing file, invalid JSON, a missing key or a label outside [0, 1].
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"pairs: {str(path)!r} is not a file")
    base = p.parent
    pairs = []
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: invalid JSON ({e})") from e
        if not isinstance(row, dict) or not {"a", "b", "label"} <= set(row):
            raise ConfigError(f'{where}: expected an object with "a", "b" and "label"')
        label = row["label"]
        if isinstance(label, bool) or not isinstance(label, (int, float)):
            raise ConfigError(f"{where}: label must be a number in [0, 1], got {label!r}")
        if not (math.isfinite(label) and 0 <= label <= 1):
            raise ConfigError(f"{where}: label must be in [0, 1], got {label!r}")
        ab = []
        for key in ("a", "b"):
            if not isinstance(row[key], str) or not row[key]:
                raise ConfigError(f"{where}: {key!r} must be an audio path, got {row[key]!r}")
            f = Path(row[key]).expanduser()
            ab.append(str(f if f.is_absolute() else base / f))
        pairs.append(LabelledPair(ab[0], ab[1], float(label)))
    if not pairs:
        raise ConfigError(f"pairs: {p} holds no pairs")
    return pairs


def run_calibration(cfg: CalibrateConfig) -> dict[str, Any]:
    """Score the pairs' audio, fit the temperature, write it to the checkpoint.

    Returns:
        The summary: ``temperature``, ``previous_temperature``, the fit's metrics, the pairs
        used and skipped, the files that failed, the checkpoint written and the calibration in
        use (:attr:`~apex_reward.ApexRewardModel.preference_calibration`).
    """
    from .arena.head import write_preference_to_checkpoint

    pairs = read_pairs(cfg.pairs)
    model = load_model(cfg.model)
    files = sorted({p.a for p in pairs} | {p.b for p in pairs})
    results = model.score(files, batch_size=cfg.batch_size, guard=cfg.guard)
    reward = {f: r.reward for f, r in zip(files, results) if r.ok}
    failed = {f: r.error for f, r in zip(files, results) if not r.ok}
    used = [p for p in pairs if p.a in reward and p.b in reward]
    if not used:
        raise ConfigError(
            f"calibrate: no pair could be scored ({len(failed)} files failed, e.g. "
            f"{next(iter(failed.items()), None)})"
        )
    diff = np.array([reward[p.a] - reward[p.b] for p in used])
    labels = np.array([p.label for p in used])
    temperature, calibration = calibrate_temperature(
        diff, labels, data=f"{Path(cfg.pairs).expanduser().resolve()} ({len(used)} pairs)"
    )
    previous = model.config.preference.temperature
    written = write_preference_to_checkpoint(
        cfg.model.model, temperature=(temperature, calibration), out=cfg.out
    )
    summary: dict[str, Any] = {
        "checkpoint": str(written),
        "temperature": temperature,
        "previous_temperature": previous,
        **to_dict(calibration),
        "pairs_skipped": len(pairs) - len(used),
        "failed_files": failed,
    }
    if model.preference_head is not None:
        summary["note"] = (
            "this checkpoint has a fitted preference head, which takes precedence: the "
            "temperature applies only without it"
        )
        logger.warning(summary["note"])
    model.config.preference.temperature = temperature
    model.config.preference.calibration = calibration
    summary["in_use"] = model.preference_calibration
    return summary


def add_calibrate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward calibrate`` (generated from :class:`CalibrateConfig`)."""
    add_dataclass_arguments(parser, CalibrateConfig)
    add_renamed_flags(parser, [ENCODER_DTYPE])


def run_calibrate_command(args: argparse.Namespace) -> int:
    """``apex-reward calibrate``: the summary as one JSON object on stdout."""
    cfg = config_from_args(CalibrateConfig, args, [ENCODER_DTYPE])
    summary = run_calibration(cfg)
    sys.stdout.write(json.dumps(summary) + "\n")
    return 0


COMMAND = Command(
    "calibrate",
    "fit the Bradley-Terry temperature of a checkpoint on labelled pairs (JSONL: a, b, label)",
    add_calibrate_arguments,
    run_calibrate_command,
)
