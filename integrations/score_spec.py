"""Which number a reward adapter returns: a score spec, checked against a checkpoint.

A spec is ``"reward"`` (the checkpoint's configured reward), any score name (``"overall"``,
``"clarity"``, ...), or weights ``{name: w}`` over score names and ``"reward"`` (the value is
``sum(w * score)``). The TRL, verl and preference-pair adapters all read a spec the same way:
:func:`check_spec` when they are built, :func:`score_value` per scored input, :func:`spec_floor`
for what a flagged input gets under the ``penalize`` guard policy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from apex_reward.config import SCORE_RANGES
from apex_reward.errors import ConfigError
from apex_reward.guard import reward_floor

if TYPE_CHECKING:
    from apex_reward.config import ApexConfig
    from apex_reward.scoring import ScoreResult

__all__ = [
    "ScoreSpec",
    "check_spec",
    "read_checkpoint_config",
    "score_value",
    "spec_floor",
    "spec_label",
]

#: Which number a reward function returns: ``"reward"``, a score name, or ``{name: weight}``.
ScoreSpec = str | Mapping[str, float]


def read_checkpoint_config(path: str | Path) -> ApexConfig:
    """A checkpoint's configuration, from its ``config.json`` only (cheap; no weights)."""
    from apex_reward.checkpoint import CONFIG_NAME, resolve_checkpoint_dir, split_digests
    from apex_reward.config import ApexConfig

    directory = resolve_checkpoint_dir(path)
    try:
        raw = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{directory / CONFIG_NAME}: cannot read ({e})") from e
    return ApexConfig.from_dict(split_digests(raw)[0])


def check_spec(spec: ScoreSpec, names: Sequence[str]) -> ScoreSpec:
    """``spec`` checked against a model's score ``names`` (weights as plain floats); a name the
    model does not output, an empty dict or a non-finite weight raises
    :class:`~apex_reward.errors.ConfigError`."""
    allowed = set(names) | {"reward"}
    if isinstance(spec, str):
        if spec not in allowed:
            raise ConfigError(
                f"score {spec!r} is not an output of this model; expected 'reward' or one of "
                f"{list(names)}"
            )
        return spec
    if not isinstance(spec, Mapping) or not spec:
        raise ConfigError(
            f"score must be a score name or a non-empty dict of weights, got {spec!r}"
        )
    out = {}
    for name, w in spec.items():
        if name not in allowed:
            raise ConfigError(
                f"score weights: {name!r} is not an output of this model; expected 'reward' or "
                f"one of {list(names)}"
            )
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(
                f"score weights: weight of {name!r} must be a finite number, got {w!r}"
            )
        out[str(name)] = float(w)
    return out


def score_value(result: ScoreResult | None, spec: ScoreSpec = "reward") -> float | None:
    """The number ``spec`` selects from a :class:`ScoreResult`; ``None`` for a failed input or a
    non-finite value."""
    if result is None or not result.ok or result.scores is None:
        return None

    def get(name: str) -> float:
        return float(result.reward if name == "reward" else result.scores[name])

    if isinstance(spec, str):
        value = get(spec)
    else:
        value = sum(w * get(name) for name, w in spec.items())
    return value if math.isfinite(value) else None


def spec_floor(spec: ScoreSpec, config: ApexConfig) -> float:
    """The lowest value ``spec`` can select: what a flagged completion gets under the guard
    policy ``penalize``. For ``"reward"`` the checkpoint's floor
    (:func:`apex_reward.guard.reward_floor`); for a score, the bottom of its range; for weights,
    the weighted sum of those (the top of the range for a negative weight)."""

    def low(name: str, w: float) -> float:
        if name == "reward":
            return reward_floor(config)
        lo, hi = SCORE_RANGES[name]
        return lo if w >= 0 else hi

    if isinstance(spec, str):
        return low(spec, 1.0)
    return sum(w * low(name, w) for name, w in spec.items())


def spec_label(spec: ScoreSpec) -> str:
    """A spec as a short label: the name, or ``"w*name+..."`` for weights."""
    if isinstance(spec, str):
        return spec
    return "+".join(f"{w:g}*{k}" for k, w in spec.items())
