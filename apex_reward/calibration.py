"""Calibrated preferences: the Bradley–Terry temperature fitted by maximum likelihood.

Without a fitted preference head, ``logit P(A > B) = (r_A - r_B) / T``. With the reward bounded to
[0, 1] and ``T = 1`` the model could never state more than ``sigmoid(1) = 0.73``, however sure it
is; ``T`` has to be fitted. :func:`fit_temperature` finds the ``T`` that maximises the likelihood
of labelled pairs (a one-parameter logistic regression without intercept on ``d = r_A - r_B``,
solved by Newton's method on ``beta = 1 / T``, a concave problem). :func:`calibrate_temperature`
adds the reliability of the fitted probabilities (:func:`reliability`: ECE over 10 equal-width
bins, Brier score, log loss) at ``T`` and at ``T = 1``.

Every trained checkpoint is calibrated on its own validation songs at the end of training (pairs
ordered by the reward computed from their targets); ``apex-reward calibrate`` refits ``T`` on a
user's labelled pairs. A fitted preference head (``apex-reward arena``) still takes precedence
over Bradley–Terry; :func:`describe_preference` says which calibration a checkpoint uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .config import PreferenceCalibration
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import ApexConfig

__all__ = [
    "Reliability",
    "reliability",
    "fit_temperature",
    "calibrate_temperature",
    "ordered_pairs",
    "describe_preference",
]


@dataclass
class Reliability:
    """A reliability diagram's data: per bin mean predicted P(A), observed frequency, count."""

    ece: float
    bin_edges: list[float]
    mean_predicted: list[float]
    observed: list[float]
    counts: list[int]
    brier: float
    log_loss: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def reliability(prob: np.ndarray, y: np.ndarray, *, bins: int = 10) -> Reliability:
    """Expected calibration error over ``bins`` equal-width bins of P(A preferred).

    ``ECE = sum_b (n_b / N) |observed_b - mean_predicted_b|``; also the Brier score and log loss.
    ``prob`` and ``y`` are ``[N]``; ``y`` is 1 (A preferred), 0 (B) or a soft label in between.
    """
    p = np.clip(np.asarray(prob, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(y, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=True), 0, bins - 1)
    mean_pred, obs, counts = [], [], []
    ece = 0.0
    for b in range(bins):
        m = idx == b
        c = int(m.sum())
        counts.append(c)
        if c:
            mp, ob = float(p[m].mean()), float(y[m].mean())
            ece += c / len(p) * abs(ob - mp)
        else:
            mp, ob = math.nan, math.nan
        mean_pred.append(mp)
        obs.append(ob)
    eps = 1e-12
    ll = float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps)))
    return Reliability(
        ece=float(ece),
        bin_edges=edges.tolist(),
        mean_predicted=mean_pred,
        observed=obs,
        counts=counts,
        brier=float(np.mean((p - y) ** 2)),
        log_loss=ll,
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free


def _check_pairs(diff: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(diff, dtype=np.float64).reshape(-1)
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    if d.shape != y.shape:
        raise ConfigError(f"calibration: {d.size} reward differences but {y.size} labels")
    if d.size == 0:
        raise ConfigError("calibration: no labelled pairs to fit")
    if not (np.isfinite(d).all() and np.isfinite(y).all()):
        raise ConfigError("calibration: reward differences and labels must be finite")
    if ((y < 0) | (y > 1)).any():
        raise ConfigError("calibration: labels must lie in [0, 1] (1 = A preferred, 0 = B)")
    return d, y


def fit_temperature(diff: Any, labels: Any, *, max_iter: int = 100) -> float:
    """The maximum-likelihood Bradley–Terry temperature of labelled pairs.

    Args:
        diff: ``[N]`` reward differences ``r_A - r_B`` (the reward's units).
        labels: ``[N]`` 1 when A is preferred, 0 when B is, or a soft label in [0, 1].
        max_iter: Newton iterations.

    Returns:
        ``T > 0`` maximising ``sum y log s(d/T) + (1 - y) log s(-d/T)``, in the reward's units.

    Raises:
        ConfigError: no pairs, non-finite values, labels outside [0, 1], all differences zero,
            or a reward that orders the pairs against their labels (no positive ``T`` fits).
    """
    d, y = _check_pairs(diff, labels)
    if not np.any(d != 0):
        raise ConfigError("calibration: every pair has equal rewards; nothing to fit")
    score0 = float(np.sum(d * (y - 0.5)))  # the log-likelihood's slope at beta = 0
    if score0 <= 0:
        raise ConfigError(
            "calibration: the reward orders these pairs against their labels (a higher reward "
            "is not preferred more often); no positive temperature fits"
        )
    # separable data: the likelihood grows without bound; cap beta at a huge value
    beta_max = 1e6 / max(float(np.abs(d).max()), 1e-300)
    beta = 1.0 / max(float(np.std(d)), 1e-12)
    for _ in range(max_iter):
        p = _sigmoid(beta * d)
        grad = float(np.sum(d * (y - p)))
        hess = float(np.sum(d * d * p * (1 - p)))
        if hess <= 0:
            break
        step = grad / hess
        new = beta + step
        if new <= 0:  # stay in the positive half-line (the optimum is there: slope at 0 > 0)
            new = beta / 2
        new = min(new, beta_max)
        if abs(new - beta) <= 1e-10 * max(1.0, beta):
            beta = new
            break
        beta = new
    if not (math.isfinite(beta) and beta > 0):
        raise ConfigError(f"calibration: the fit did not converge (beta = {beta!r})")
    return 1.0 / beta


def calibrate_temperature(
    diff: Any,
    labels: Any,
    *,
    data: str,
    held_out: tuple[Any, Any] | None = None,
    bins: int = 10,
) -> tuple[float, PreferenceCalibration]:
    """Fit ``T`` (:func:`fit_temperature`) and measure the probabilities it gives.

    Args:
        diff, labels: the ``[N]`` pairs to fit (see :func:`fit_temperature`).
        data: a description of the pairs (stored in the checkpoint).
        held_out: optional ``(diff, labels)`` pairs not used in the fit, measured too.
        bins: reliability bins.

    Returns:
        ``(temperature, calibration)``: ECE, Brier and log loss at ``T`` and at ``T = 1``; on
        the held-out pairs also ``max_probability`` (the largest P(A > B) stated there).
    """
    d, y = _check_pairs(diff, labels)
    t = fit_temperature(d, y)
    after, before = (
        reliability(_sigmoid(d / t), y, bins=bins),
        reliability(_sigmoid(d), y, bins=bins),
    )
    held: dict[str, float] = {}
    if held_out is not None:
        hd, hy = _check_pairs(*held_out)
        p = _sigmoid(hd / t)
        ha, hb = reliability(p, hy, bins=bins), reliability(_sigmoid(hd), hy, bins=bins)
        held = {
            "pairs": int(hd.size),
            "ece": ha.ece,
            "brier": ha.brier,
            "log_loss": ha.log_loss,
            "ece_before": hb.ece,
            "brier_before": hb.brier,
            "max_probability": float(np.max(np.maximum(p, 1 - p))),
        }
    cal = PreferenceCalibration(
        data=data,
        pairs=int(d.size),
        ece=after.ece,
        brier=after.brier,
        log_loss=after.log_loss,
        ece_before=before.ece,
        brier_before=before.brier,
        held_out=held,
    )
    return t, cal


def ordered_pairs(
    predicted: np.ndarray, target: np.ndarray, *, max_pairs: int = 20000, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Labelled pairs from songs with a predicted and a true reward.

    Every pair of songs whose true rewards differ (at most ``max_pairs``, sampled with
    ``seed``), in random order: ``diff = predicted[a] - predicted[b]``, ``label = 1`` when
    ``target[a] > target[b]``. Both inputs are ``[S]``; returns ``([N], [N])``.
    """
    pred = np.asarray(predicted, dtype=np.float64).reshape(-1)
    true = np.asarray(target, dtype=np.float64).reshape(-1)
    if pred.shape != true.shape:
        raise ConfigError(f"ordered_pairs: {pred.size} predictions for {true.size} targets")
    ia, ib = np.triu_indices(pred.size, k=1)
    keep = true[ia] != true[ib]
    ia, ib = ia[keep], ib[keep]
    rng = np.random.default_rng(seed)
    if ia.size > max_pairs:
        pick = rng.choice(ia.size, size=max_pairs, replace=False)
        ia, ib = ia[pick], ib[pick]
    swap = rng.random(ia.size) < 0.5
    ia, ib = np.where(swap, ib, ia), np.where(swap, ia, ib)
    return pred[ia] - pred[ib], (true[ia] > true[ib]).astype(np.float64)


def describe_preference(config: ApexConfig) -> dict[str, Any]:
    """Which preference model and calibration a checkpoint uses.

    Returns:
        ``{"method": "preference_head" | "bradley_terry", "calibration": ...}`` where the
        calibration is ``"preference_head"`` (a fitted head: it takes precedence),
        ``"fitted_temperature"`` or ``"fixed_temperature"`` (not fitted), plus ``temperature``
        and, for a fitted one, the data and ECE it was fitted with.
    """
    pref = config.preference
    if pref.head is not None:
        return {"method": "preference_head", "calibration": "preference_head"}
    out: dict[str, Any] = {"method": "bradley_terry", "temperature": pref.temperature}
    if pref.calibration is None:
        out["calibration"] = "fixed_temperature"
    else:
        out["calibration"] = "fitted_temperature"
        out["fitted_on"] = pref.calibration.data
        out["ece"] = pref.calibration.ece
    return out
