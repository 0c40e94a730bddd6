"""Preference prediction from APEX scores (the paper's §4.4 / Table 3; see ``docs/arena.md``).

* :func:`build_preference_data`: the pairwise features of every battle — for each score
  dimension ``diff``, ``ratio`` and ``diff x is_instrumental``, plus ``is_instrumental`` (31 for a
  full model) — computed by :func:`apex_reward.preference.pairwise_features`, the same function the
  model's preference head runs, so a fitted head reproduces the classifier exactly.
* :func:`cross_validate`: logistic regression (L2, C=0.1, balanced), random forest (300 trees,
  depth 4, balanced), XGBoost (300, lr 0.05, depth 4, ``scale_pos_weight`` = negatives/positives
  of the training fold), AdaBoost (300, lr 0.05) and an SVM (grid search in an inner 3-fold CV),
  under stratified K-fold CV with a seed. Every battle gets one out-of-fold score per classifier.
* :func:`rule_scores`: the rule baseline "higher summed score wins" for a subset of scores.

Metrics, tables and plots of the out-of-fold scores are in :mod:`.metrics`.

Label convention: ``y = 1`` when A was preferred.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from apex_reward.calibration import reliability
from apex_reward.config import AESTHETIC_TASKS, ALL_TASKS
from apex_reward.preference import pairwise_feature_names, pairwise_features

from .data import ArenaDataError

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIERS",
    "RULE_SUBSETS",
    "PreferenceData",
    "CVResult",
    "build_preference_data",
    "make_classifier",
    "cross_validate",
    "rule_scores",
    "reliability",
    "head_pipeline",
]

#: Classifier key -> display name, in table order.
CLASSIFIERS: dict[str, str] = {
    "logreg": "Logistic regression",
    "random_forest": "Random forest",
    "xgboost": "XGBoost",
    "adaboost": "AdaBoost",
    "svm": "SVM",
}

#: Rule-baseline subsets: which predicted scores are summed.
RULE_SUBSETS: dict[str, tuple[str, ...]] = {
    "likes": ("likes",),
    "popularity": ("streams", "likes"),
    "aesthetics": AESTHETIC_TASKS,
    "all": ALL_TASKS,
}

#: The SVM's default hyper-parameter grid (searched by an inner stratified 3-fold CV).
DEFAULT_SVM_GRID: dict[str, list[Any]] = {"C": [0.1, 1.0, 10.0], "kernel": ["linear", "rbf"]}


@dataclass
class PreferenceData:
    """Battles as a feature matrix.

    Attributes:
        X: ``[N, F]`` float64 pairwise features, columns ``feature_names``.
        y: ``[N]`` int64, 1 when A was preferred.
        instrumental: ``[N]`` bool.
        scores_a, scores_b: ``{score name: [N] float64}`` of the two songs.
        battle_ids: ``N`` ids; systems_a, systems_b: generator names (or None).
    """

    X: np.ndarray
    y: np.ndarray
    instrumental: np.ndarray
    feature_names: list[str]
    scores_a: dict[str, np.ndarray]
    scores_b: dict[str, np.ndarray]
    battle_ids: list[str]
    systems_a: list[str | None]
    systems_b: list[str | None]
    ratio_eps: float = 1e-6

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> PreferenceData:
        """The battles at integer positions ``idx``."""
        return PreferenceData(
            self.X[idx],
            self.y[idx],
            self.instrumental[idx],
            self.feature_names,
            {k: v[idx] for k, v in self.scores_a.items()},
            {k: v[idx] for k, v in self.scores_b.items()},
            [self.battle_ids[i] for i in idx],
            [self.systems_a[i] for i in idx],
            [self.systems_b[i] for i in idx],
            self.ratio_eps,
        )

    def swapped(self) -> PreferenceData:
        """The same battles with A and B exchanged (labels flipped)."""
        return build_preference_data(
            self.scores_b,
            self.scores_a,
            self.instrumental,
            1 - self.y,
            names=self.feature_names,
            ratio_eps=self.ratio_eps,
            battle_ids=self.battle_ids,
            systems_a=self.systems_b,
            systems_b=self.systems_a,
        )

    def to_frame(self):
        """A pandas DataFrame: battle id, systems, label, is_instrumental, scores, features."""
        import pandas as pd

        cols: dict[str, Any] = {
            "battle_id": self.battle_ids,
            "system_a": self.systems_a,
            "system_b": self.systems_b,
            "a_preferred": self.y,
        }
        for k, v in self.scores_a.items():
            cols[f"a_{k}"] = v
        for k, v in self.scores_b.items():
            cols[f"b_{k}"] = v
        for j, name in enumerate(self.feature_names):
            cols[name] = self.X[:, j]
        return pd.DataFrame(cols)


def build_preference_data(
    scores_a: Mapping[str, Sequence[float] | np.ndarray],
    scores_b: Mapping[str, Sequence[float] | np.ndarray],
    is_instrumental: Sequence[bool] | np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    names: Sequence[str] | None = None,
    ratio_eps: float = 1e-6,
    battle_ids: Sequence[str] | None = None,
    systems_a: Sequence[str | None] | None = None,
    systems_b: Sequence[str | None] | None = None,
) -> PreferenceData:
    """Pairwise features of ``N`` battles from per-song scores (``{name: [N]}`` each).

    ``names`` defaults to :func:`~apex_reward.preference.pairwise_feature_names` of the score
    names present in both (31 for a full model).
    """
    sa = {k: np.asarray(v, dtype=np.float64) for k, v in scores_a.items()}
    sb = {k: np.asarray(v, dtype=np.float64) for k, v in scores_b.items()}
    y = np.asarray(labels, dtype=np.int64)
    n = y.shape[0]
    inst = np.asarray(is_instrumental, dtype=bool).reshape(-1)
    if inst.shape[0] != n or any(v.shape != (n,) for v in (*sa.values(), *sb.values())):
        raise ArenaDataError(
            "build_preference_data: scores, labels and is_instrumental differ in length"
        )
    if names is None:
        names = pairwise_feature_names([k for k in sa if k in sb])
    X = pairwise_features(
        {k: torch.from_numpy(v) for k, v in sa.items()},
        {k: torch.from_numpy(v) for k, v in sb.items()},
        torch.from_numpy(inst.astype(np.float64)),
        list(names),
        ratio_eps=ratio_eps,
    ).numpy()
    ids = list(battle_ids) if battle_ids is not None else [str(i) for i in range(n)]
    return PreferenceData(
        X=X,
        y=y,
        instrumental=inst,
        feature_names=list(names),
        scores_a=sa,
        scores_b=sb,
        battle_ids=ids,
        systems_a=list(systems_a) if systems_a is not None else [None] * n,
        systems_b=list(systems_b) if systems_b is not None else [None] * n,
        ratio_eps=ratio_eps,
    )


# ----------------------------------------------------------------------------------------------
# classifiers


def head_pipeline(*, C: float = 0.1, max_iter: int = 1000, seed: int = 0):
    """StandardScaler + LogisticRegression (L2, ``C``, balanced class weights): the paper's
    logistic model and the preference head's form."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # L2 is LogisticRegression's default penalty in every supported scikit-learn version.
    return make_pipeline(
        StandardScaler(),
        LogisticRegression(C=C, class_weight="balanced", max_iter=max_iter, random_state=seed),
    )


def make_classifier(
    name: str,
    *,
    y_train: np.ndarray,
    seed: int = 0,
    n_jobs: int = 1,
    svm_grid: Mapping[str, Sequence[Any]] | None = None,
):
    """A fresh, unfitted scikit-learn-compatible classifier ``name`` (one of :data:`CLASSIFIERS`).

    ``y_train`` sets XGBoost's ``scale_pos_weight`` (negatives / positives).
    """
    from sklearn.ensemble import AdaBoostClassifier, RandomForestClassifier
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if name == "logreg":
        return head_pipeline(seed=seed)
    if name == "random_forest":
        return RandomForestClassifier(
            n_estimators=300,
            max_depth=4,
            class_weight="balanced",
            random_state=seed,
            n_jobs=n_jobs,
        )
    if name == "xgboost":
        from apex_reward.errors import require

        xgb = require("xgboost", "train", "the XGBoost classifier")
        pos = int(np.sum(y_train == 1))
        neg = int(np.sum(y_train == 0))
        return xgb.XGBClassifier(
            n_estimators=300,
            learning_rate=0.05,
            max_depth=4,
            scale_pos_weight=neg / max(pos, 1),
            random_state=seed,
            n_jobs=n_jobs,
            tree_method="hist",
            eval_metric="logloss",
            verbosity=0,
        )
    if name == "adaboost":
        return AdaBoostClassifier(n_estimators=300, learning_rate=0.05, random_state=seed)
    if name == "svm":
        grid = {f"svc__{k}": list(v) for k, v in (svm_grid or DEFAULT_SVM_GRID).items()}
        pipe = make_pipeline(StandardScaler(), SVC(class_weight="balanced", random_state=seed))
        inner = StratifiedKFold(n_splits=3, shuffle=True, random_state=seed)
        # single process: SVC fits on battle-sized data take milliseconds, a process pool's
        # start-up takes seconds
        return GridSearchCV(pipe, grid, scoring="roc_auc", cv=inner)
    raise KeyError(f"unknown classifier {name!r}; expected one of {list(CLASSIFIERS)}")


@dataclass
class CVResult:
    """Out-of-fold results of K-fold cross-validation.

    Attributes:
        folds: K; seed: the shuffling seed.
        fold_of: ``[N]`` the fold each battle was tested in.
        scores: ``{classifier: [N]}`` out-of-fold continuous scores (decision function, or
            P(A) for classifiers without one); higher means A more likely preferred.
        predictions: ``{classifier: [N]}`` out-of-fold predicted labels (0/1).
        probabilities: ``{classifier: [N]}`` out-of-fold P(A preferred) of the logistic model
            and the tree ensembles.
        fold_auc: ``{classifier: [K]}`` AUC within each test fold.
        best_params: ``{classifier: [K dicts]}`` (the SVM's grid-search choices).
        seconds: ``{classifier: wall time}``.
    """

    folds: int
    seed: int
    fold_of: np.ndarray
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    predictions: dict[str, np.ndarray] = field(default_factory=dict)
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)
    fold_auc: dict[str, list[float]] = field(default_factory=dict)
    best_params: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _check_cv(y: np.ndarray, folds: int) -> None:
    counts = np.bincount(y, minlength=2)
    if folds < 2:
        raise ArenaDataError(f"cross-validation needs at least 2 folds, got {folds}")
    if counts.min() < folds:
        raise ArenaDataError(
            f"{folds}-fold stratified cross-validation needs at least {folds} battles of each "
            f"outcome; got {int(counts[1])} A wins and {int(counts[0])} B wins"
        )


def cross_validate(
    data: PreferenceData,
    classifiers: Sequence[str] = tuple(CLASSIFIERS),
    *,
    folds: int = 10,
    seed: int = 0,
    n_jobs: int = 1,
    svm_grid: Mapping[str, Sequence[Any]] | None = None,
    progress: bool = False,
) -> CVResult:
    """Stratified ``folds``-fold CV (shuffled with ``seed``) of each classifier on ``data``.

    Every battle is tested exactly once per classifier; the same folds are used for all.

    Raises:
        ArenaDataError: fewer battles of an outcome than folds.
    """
    import time

    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    for name in classifiers:
        if name not in CLASSIFIERS:
            raise KeyError(f"unknown classifier {name!r}; expected some of {list(CLASSIFIERS)}")
    _check_cv(data.y, folds)
    skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    splits = list(skf.split(data.X, data.y))
    n = len(data)
    fold_of = np.full(n, -1, dtype=np.int64)
    for k, (_, test) in enumerate(splits):
        fold_of[test] = k
    result = CVResult(folds=folds, seed=seed, fold_of=fold_of)
    it: Any = classifiers
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(classifiers, desc="cross-validation", unit="classifier", dynamic_ncols=True)
    for name in it:
        t0 = time.perf_counter()
        s = np.zeros(n)
        pred = np.zeros(n, dtype=np.int64)
        prob = np.full(n, np.nan)
        fold_auc, params = [], []
        for train, test in splits:
            model = make_classifier(
                name, y_train=data.y[train], seed=seed, n_jobs=n_jobs, svm_grid=svm_grid
            )
            model.fit(data.X[train], data.y[train])
            xt = data.X[test]
            if hasattr(model, "decision_function"):
                s[test] = np.asarray(model.decision_function(xt), dtype=np.float64)
                pred[test] = np.asarray(model.predict(xt), dtype=np.int64)
                if name == "logreg":  # the head's probabilities, for the calibration report
                    prob[test] = model.predict_proba(xt)[:, 1]
            else:  # tree ensembles: P(A) is the score; predict() is P(A) > 0.5
                prob[test] = model.predict_proba(xt)[:, 1]
                s[test] = prob[test]
                pred[test] = (prob[test] > 0.5).astype(np.int64)
            yt = data.y[test]
            fold_auc.append(float(roc_auc_score(yt, s[test])) if len(set(yt)) == 2 else math.nan)
            if hasattr(model, "best_params_"):
                params.append(dict(model.best_params_))
        result.scores[name] = s
        result.predictions[name] = pred
        if not np.isnan(prob).any():
            result.probabilities[name] = prob
        result.fold_auc[name] = fold_auc
        if params:
            result.best_params[name] = params
        result.seconds[name] = time.perf_counter() - t0
        logger.info("%s: %d-fold CV in %.1f s", name, folds, result.seconds[name])
    return result


def rule_scores(data: PreferenceData, subset: Sequence[str]) -> np.ndarray:
    """The rule baseline's score ``sum_s a_s - sum_s b_s`` over ``subset``; ``[N]``.

    Positive means A has the higher summed score, i.e. the rule predicts A.
    """
    missing = [s for s in subset if s not in data.scores_a or s not in data.scores_b]
    if missing:
        raise KeyError(f"rule subset needs scores {missing}, which this model does not output")
    return sum(data.scores_a[s] - data.scores_b[s] for s in subset)
