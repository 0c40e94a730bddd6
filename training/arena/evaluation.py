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
* :func:`evaluate`: AUC and accuracy overall and by vocal/instrumental from the out-of-fold
  scores (each battle is in exactly one of the two groups), as rows shaped like Table 3.
* :func:`write_metric_tables`, :func:`plot_roc`, :func:`reliability`, :func:`plot_reliability`.

Label convention: ``y = 1`` when A was preferred.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apex_reward.calibration import Reliability, reliability
from apex_reward.config import AESTHETIC_TASKS, ALL_TASKS
from apex_reward.preference import pairwise_feature_names, pairwise_features

from .data import ArenaDataError

logger = logging.getLogger(__name__)

__all__ = [
    "CLASSIFIERS",
    "RULE_SUBSETS",
    "PreferenceData",
    "CVResult",
    "MetricRow",
    "build_preference_data",
    "make_classifier",
    "cross_validate",
    "rule_scores",
    "evaluate",
    "metric_rows_to_markdown",
    "write_metric_tables",
    "plot_roc",
    "reliability",
    "plot_reliability",
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


# ----------------------------------------------------------------------------------------------
# metrics and tables


@dataclass
class MetricRow:
    """One row of the results table: AUC and accuracy overall, on vocal and instrumental battles."""

    method: str
    key: str
    auc: float
    accuracy: float
    auc_vocal: float
    accuracy_vocal: float
    auc_instrumental: float
    accuracy_instrumental: float
    n: int
    n_vocal: int
    n_instrumental: int
    auc_fold_mean: float = math.nan
    auc_fold_std: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if len(np.unique(y)) == 2 else math.nan


def _acc(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.mean(y == pred)) if len(y) else math.nan


def metric_row(
    method: str,
    key: str,
    y: np.ndarray,
    score: np.ndarray,
    pred: np.ndarray,
    instrumental: np.ndarray,
    fold_auc: Sequence[float] | None = None,
) -> MetricRow:
    """AUC/accuracy overall and within the vocal and instrumental battles."""
    inst = instrumental.astype(bool)
    voc = ~inst
    fa = np.array([a for a in (fold_auc or []) if not math.isnan(a)])
    return MetricRow(
        method=method,
        key=key,
        auc=_auc(y, score),
        accuracy=_acc(y, pred),
        auc_vocal=_auc(y[voc], score[voc]),
        accuracy_vocal=_acc(y[voc], pred[voc]),
        auc_instrumental=_auc(y[inst], score[inst]),
        accuracy_instrumental=_acc(y[inst], pred[inst]),
        n=int(len(y)),
        n_vocal=int(voc.sum()),
        n_instrumental=int(inst.sum()),
        auc_fold_mean=float(fa.mean()) if len(fa) else math.nan,
        auc_fold_std=float(fa.std()) if len(fa) else math.nan,
    )


def evaluate(data: PreferenceData, cv: CVResult) -> tuple[list[MetricRow], list[MetricRow]]:
    """Table-3 rows (the rule with all predicted scores, then each classifier) and the rule's
    feature-subset comparison (likes, popularity, aesthetics, all), from out-of-fold scores."""
    rules = []
    for subset, dims in RULE_SUBSETS.items():
        if not all(d in data.scores_a for d in dims):
            continue
        s = rule_scores(data, dims)
        rules.append(
            metric_row(
                f"Rule: higher summed score ({subset})",
                f"rule_{subset}",
                data.y,
                s,
                (s > 0).astype(np.int64),
                data.instrumental,
            )
        )
    main = [r for r in rules if r.key == "rule_all"] or rules[-1:]
    for name in CLASSIFIERS:
        if name in cv.scores:
            main.append(
                metric_row(
                    CLASSIFIERS[name],
                    name,
                    data.y,
                    cv.scores[name],
                    cv.predictions[name],
                    data.instrumental,
                    cv.fold_auc.get(name),
                )
            )
    return main, rules


def _fmt(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def metric_rows_to_markdown(rows: Sequence[MetricRow], *, title: str | None = None) -> str:
    """Rows as a Markdown table shaped like the paper's Table 3 (overall | vocal | instrumental)."""
    if not rows:
        return ""
    r0 = rows[0]
    lines = []
    if title:
        lines += [f"**{title}**", ""]
    lines += [
        "| method | AUC | Acc | AUC vocal | Acc vocal | AUC instr. | Acc instr. | AUC fold mean ± sd |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fold = (
            f"{_fmt(r.auc_fold_mean)} ± {_fmt(r.auc_fold_std)}"
            if not math.isnan(r.auc_fold_mean)
            else "—"
        )
        lines.append(
            f"| {r.method} | {_fmt(r.auc)} | {_fmt(r.accuracy)} | {_fmt(r.auc_vocal)} | "
            f"{_fmt(r.accuracy_vocal)} | {_fmt(r.auc_instrumental)} | "
            f"{_fmt(r.accuracy_instrumental)} | {fold} |"
        )
    lines += [
        "",
        f"{r0.n} battles: {r0.n_vocal} vocal, {r0.n_instrumental} instrumental. AUC and accuracy "
        "from pooled out-of-fold predictions; the rule needs no fitting and is evaluated on all "
        "battles.",
    ]
    return "\n".join(lines) + "\n"


def write_metric_tables(rows: Sequence[MetricRow], out_stem: str | Path, *, title: str) -> None:
    """Write ``<stem>.md`` and ``<stem>.csv``."""
    import csv

    stem = Path(out_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(metric_rows_to_markdown(rows, title=title))
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        keys = list(rows[0].to_dict()) if rows else list(MetricRow.__dataclass_fields__)
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow(r.to_dict())


# ----------------------------------------------------------------------------------------------
# plots and calibration


def _figure(width: float = 5.5, height: float = 5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)  # Agg canvas: no display, no global pyplot state
    return fig


def plot_roc(
    y: np.ndarray, curves: Mapping[str, np.ndarray], path: str | Path, *, title: str = "ROC"
) -> Path:
    """ROC curves (out-of-fold scores per method) in one PNG."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, s in curves.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, lw=1.5, label=f"{label} (AUC {roc_auc_score(y, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="chance")
    ax.set_xlabel("false positive rate (B preferred, predicted A)")
    ax.set_ylabel("true positive rate (A preferred, predicted A)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p)
    return p


def plot_reliability(rel: Reliability, path: str | Path, *, title: str) -> Path:
    """Reliability diagram (observed vs predicted P(A preferred), with bin counts) as a PNG."""
    fig = _figure(5.5, 6.0)
    ax = fig.add_axes((0.14, 0.34, 0.8, 0.58))
    hx = fig.add_axes((0.14, 0.08, 0.8, 0.18), sharex=ax)
    ok = [i for i, c in enumerate(rel.counts) if c]
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.plot(
        [rel.mean_predicted[i] for i in ok],
        [rel.observed[i] for i in ok],
        marker="o",
        lw=1.5,
        label=f"out-of-fold (ECE {rel.ece:.3f})",
    )
    ax.set_ylabel("observed fraction A preferred")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    centers = [(a + b) / 2 for a, b in zip(rel.bin_edges[:-1], rel.bin_edges[1:])]
    hx.bar(centers, rel.counts, width=1.0 / len(rel.counts) * 0.9, color="tab:blue", alpha=0.6)
    hx.set_xlabel("predicted P(A preferred)")
    hx.set_ylabel("battles")
    p = Path(path)
    fig.savefig(p)
    return p
