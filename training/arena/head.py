"""The fitted preference head, per-system offsets, and writing them into a checkpoint.

* :func:`fit_preference_head` fits the paper's logistic model (StandardScaler + L2 logistic
  regression, C=0.1, balanced) on all battles and converts it to a
  :class:`~apex_reward.config.PreferenceHeadConfig` — features, coefficients, intercept, the
  scaler's mean and scale, provenance — which :class:`~apex_reward.preference.PreferenceHead`
  evaluates in torch: ``logit = ((x - mean) / scale) @ coef + intercept``, exactly the pipeline's
  ``decision_function``, differentiable with respect to both waveforms.
* :func:`fit_system_offsets` ("anchor calibration"): per-generator Bradley–Terry offsets
  ``theta_s`` with ``logit P(A > B) = base_logit + theta_sys(A) - theta_sys(B)``, fitted by
  L2-regularised maximum likelihood with the base logits fixed (Newton's method; the penalty
  ``l2 * sum theta^2 / 2`` is a Gaussian prior that shrinks rarely-seen systems towards 0 and
  makes the offsets sum to 0). Unknown systems get 0 at inference.
* :func:`write_preference_to_checkpoint` stores them in ``config.json`` (``preference.head``,
  ``preference.system_offsets``). Only ``config.json`` changes: the preference head has no
  tensors, so ``model.safetensors`` and its checksum stay valid byte for byte. In place, the new
  ``config.json`` is validated, written to a temporary file and renamed over the old one (atomic
  on POSIX), so an interrupted export never leaves a broken checkpoint; or a new directory gets a
  copy of the checkpoint with the new ``config.json``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from apex_reward.checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint, split_digests
from apex_reward.config import ApexConfig, PreferenceCalibration, PreferenceHeadConfig
from apex_reward.dataclass_io import from_dict, to_dict
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.files import atomic_path

from .evaluation import PreferenceData, head_pipeline

logger = logging.getLogger(__name__)

__all__ = [
    "fit_preference_head",
    "head_config_from_pipeline",
    "fit_system_offsets",
    "system_offset_logits",
    "write_preference_to_checkpoint",
]


def head_config_from_pipeline(
    pipeline: Any,
    feature_names: Sequence[str],
    *,
    ratio_eps: float = 1e-6,
    fitted_on: Mapping[str, Any] | None = None,
) -> PreferenceHeadConfig:
    """A fitted ``StandardScaler`` + ``LogisticRegression`` pipeline -> head config."""
    scaler, lr = pipeline[0], pipeline[-1]
    coef = np.asarray(lr.coef_, dtype=np.float64).reshape(-1)
    if coef.shape[0] != len(feature_names):
        raise ConfigError(
            f"preference head: {coef.shape[0]} coefficients for {len(feature_names)} features"
        )
    return PreferenceHeadConfig(
        features=list(feature_names),
        coef=[float(c) for c in coef],
        intercept=float(np.asarray(lr.intercept_).reshape(-1)[0]),
        mean=[float(m) for m in scaler.mean_],
        scale=[float(s) for s in scaler.scale_],
        ratio_eps=float(ratio_eps),
        fitted_on=dict(fitted_on or {}),
    )


def fit_preference_head(
    data: PreferenceData,
    *,
    C: float = 0.1,
    max_iter: int = 1000,
    seed: int = 0,
    swap_augment: bool = False,
    fitted_on: Mapping[str, Any] | None = None,
) -> tuple[PreferenceHeadConfig, Any]:
    """Fit the logistic preference model on all battles.

    Args:
        data: the battles' features (``data.feature_names`` become the head's features).
        C: inverse L2 strength. max_iter: solver iterations.
        swap_augment: also fit on every battle with A and B exchanged (label flipped). The
            paper's model learns the arena's position bias (A preferred more often) through its
            intercept and ``is_instrumental``; with this the head is close to order-invariant,
            ``P(A > B) ~ 1 - P(B > A)``, which suits reward use.
        fitted_on: provenance stored in the head.

    Returns:
        ``(head config, fitted sklearn pipeline)``; the pipeline's ``decision_function`` on
        ``data.X`` equals the head's logit.
    """
    X, y = data.X, data.y
    if swap_augment:
        sw = data.swapped()
        X, y = np.concatenate([X, sw.X]), np.concatenate([y, sw.y])
    pipe = head_pipeline(C=C, max_iter=max_iter, seed=seed)
    pipe.fit(X, y)
    prov = {
        "model": "StandardScaler + LogisticRegression",
        "C": C,
        "penalty": "l2",
        "class_weight": "balanced",
        "max_iter": max_iter,
        "swap_augment": swap_augment,
        **dict(fitted_on or {}),
    }
    head = head_config_from_pipeline(
        pipe, data.feature_names, ratio_eps=data.ratio_eps, fitted_on=prov
    )
    return head, pipe


# ----------------------------------------------------------------------------------------------
# per-system offsets


def _incidence(
    systems_a: Sequence[str | None], systems_b: Sequence[str | None], names: list[str]
) -> np.ndarray:
    col = {s: j for j, s in enumerate(names)}
    M = np.zeros((len(systems_a), len(names)))
    for i, (a, b) in enumerate(zip(systems_a, systems_b)):
        if a is not None and a in col:
            M[i, col[a]] += 1.0
        if b is not None and b in col:
            M[i, col[b]] -= 1.0
    return M


def fit_system_offsets(
    base_logits: np.ndarray,
    systems_a: Sequence[str | None],
    systems_b: Sequence[str | None],
    y: np.ndarray,
    *,
    l2: float = 1.0,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> dict[str, float]:
    """Per-system offsets maximising ``sum log P(y | base + theta_A - theta_B) - l2/2 |theta|^2``.

    Args:
        base_logits: ``[N]`` the preference logits without offsets (fixed).
        systems_a, systems_b: generator names (None: no offset on that side).
        y: ``[N]`` 1 when A was preferred.
        l2: strength of the Gaussian prior (must be > 0; larger shrinks more).

    Returns:
        ``{system: offset}`` in logit units, summing to 0 over the systems seen.
    """
    if not l2 > 0:
        raise ConfigError(f"system offsets: l2 must be > 0, got {l2!r}")
    names = sorted({s for s in (*systems_a, *systems_b) if s is not None})
    if not names:
        return {}
    M = _incidence(systems_a, systems_b, names)
    base = np.asarray(base_logits, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    theta = np.zeros(len(names))
    for _ in range(max_iter):
        z = base + M @ theta
        p = 1.0 / (1.0 + np.exp(-z))
        grad = M.T @ (yy - p) - l2 * theta
        H = (M * (p * (1 - p))[:, None]).T @ M + l2 * np.eye(len(names))
        step = np.linalg.solve(H, grad)
        theta += step
        if float(np.max(np.abs(step))) < tol:
            break
    return {s: float(t) for s, t in zip(names, theta)}


def system_offset_logits(
    offsets: Mapping[str, float],
    systems_a: Sequence[str | None],
    systems_b: Sequence[str | None],
) -> np.ndarray:
    """``theta_A - theta_B`` per battle (unknown or missing systems count 0). ``[N]``."""
    return np.array([offsets.get(a, 0.0) if a is not None else 0.0 for a in systems_a]) - np.array(
        [offsets.get(b, 0.0) if b is not None else 0.0 for b in systems_b]
    )


# ----------------------------------------------------------------------------------------------
# checkpoint export


def write_preference_to_checkpoint(
    checkpoint: str | Path,
    *,
    head: PreferenceHeadConfig | None = None,
    system_offsets: Mapping[str, float] | None = None,
    temperature: tuple[float, PreferenceCalibration] | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Store a preference head, system offsets and/or a fitted Bradley–Terry temperature in a
    checkpoint's ``config.json``.

    Args:
        checkpoint: a local checkpoint directory (``config.json`` + ``model.safetensors``).
        head: the head to store (None leaves the current one).
        system_offsets: offsets to store (None leaves the current ones).
        temperature: ``(temperature, provenance)`` to store (None leaves the current ones;
            :mod:`apex_reward.calibration`).
        out: write a new checkpoint directory instead of updating ``checkpoint`` in place. It
            receives copies of all files of ``checkpoint`` and the new ``config.json``.
        overwrite: allow ``out`` to exist and already hold a checkpoint.

    Returns:
        The directory written (verified: the checksum of the weights matches and the new config
        parses).

    Raises:
        CheckpointError: not a local checkpoint, checksum mismatch, or ``out`` exists.
        ConfigError: the resulting config is invalid.
    """
    src = Path(checkpoint).expanduser()
    if not (src / CONFIG_NAME).is_file() or not (src / WEIGHTS_NAME).is_file():
        raise CheckpointError(
            f"{str(checkpoint)!r} is not a local checkpoint directory; exporting a preference "
            "head needs one (download it, or pass a directory to write a new checkpoint to)"
        )
    read_checkpoint(src, verify=True)  # refuse to build on a corrupt checkpoint
    try:
        raw = json.loads((src / CONFIG_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{src / CONFIG_NAME}: invalid JSON ({e})") from e
    raw, digests = split_digests(raw)
    pref = dict(raw.get("preference") or {})
    if head is not None:
        head_dict = to_dict(head)
        from_dict(PreferenceHeadConfig, head_dict, where="preference.head")  # clear errors
        numbers = [*head.coef, head.intercept, *(head.mean or []), *(head.scale or [])]
        if not all(math.isfinite(v) for v in numbers):
            raise ConfigError("preference.head: coefficients/mean/scale must be finite")
        if head.scale is not None and min(head.scale) <= 0:
            raise ConfigError("preference.head.scale: must be > 0")
        pref["head"] = head_dict
    if system_offsets is not None:
        pref["system_offsets"] = {str(k): float(v) for k, v in system_offsets.items()}
    if temperature is not None:
        pref["temperature"] = float(temperature[0])
        pref["calibration"] = to_dict(temperature[1])
    raw["preference"] = pref
    ApexConfig.from_dict(json.loads(json.dumps(raw)))  # validate before touching any file
    raw.update(digests)  # the weights file is not touched: its digests stay valid
    text = json.dumps(raw, indent=2) + "\n"

    if out is None or Path(out).expanduser().resolve() == src.resolve():
        dst = src
    else:
        dst = Path(out).expanduser()
        if (dst / CONFIG_NAME).exists() and not overwrite:
            raise CheckpointError(f"{dst} already holds a checkpoint; choose another directory")
        dst.mkdir(parents=True, exist_ok=True)
        for f in sorted(src.iterdir()):
            if f.is_file() and f.name != CONFIG_NAME:
                shutil.copy2(f, dst / f.name)
    with atomic_path(dst / CONFIG_NAME) as tmp:
        tmp.write_text(text)
        if (dst / CONFIG_NAME).exists():
            shutil.copymode(dst / CONFIG_NAME, tmp)
    cfg, _, _ = read_checkpoint(dst, verify=True)
    ApexConfig.from_dict(cfg)
    logger.info("wrote preference model to %s", dst / CONFIG_NAME)
    return dst
