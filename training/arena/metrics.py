"""Metrics, tables and plots of the arena evaluation (see ``docs/arena.md``).

* :func:`evaluate`: AUC and accuracy overall and by vocal/instrumental from the out-of-fold
  scores of :func:`~apex_reward.training.arena.evaluation.cross_validate` (each battle is in
  exactly one of the two groups), as rows shaped like the paper's Table 3.
* :func:`write_metric_tables` (markdown and CSV), :func:`plot_roc`, :func:`plot_reliability`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apex_reward.calibration import Reliability

from ..formatting import fmt_number
from .evaluation import CLASSIFIERS, RULE_SUBSETS, CVResult, PreferenceData, rule_scores

logger = logging.getLogger(__name__)

__all__ = [
    "MetricRow",
    "evaluate",
    "metric_rows_to_markdown",
    "write_metric_tables",
    "plot_roc",
    "plot_reliability",
]

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
    return fmt_number(v, digits)


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
