"""The grid's per-condition table: popularity metrics on the test split broken down by a
categorical column of the prepared data (``platform`` by default), for every run, conditioned or
not (docs/training.md#conditioning).

``table3.md``/``.csv``: one row per grid run, and per value of the column the test songs' streams
and likes Pearson and MSE (native units, 0–100), with the number of test songs. It is written when
the prepared data has the column with at least two values; the test predictions of each run
(``test_predictions.parquet``) are joined with the column by song id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apex_reward.config import POPULARITY_TASKS
from apex_reward.errors import require

from .formatting import fmt_number
from .trainer.objective import regression_metrics

__all__ = ["condition_metrics", "write_condition_table"]

#: metrics of table3, with their column titles
_METRICS: tuple[tuple[str, str], ...] = (("pearson", "Pearson"), ("mse", "MSE"))


def condition_metrics(predictions: Any, groups: Any) -> dict[str, dict[str, dict[str, float]]]:
    """``{value: {task: metrics}}`` of the popularity tasks per value of a column.

    Args:
        predictions: a run's test predictions (DataFrame: ``id``, ``pred_<task>``,
            ``true_<task>``).
        groups: DataFrame with ``id`` and one column, the group of each song.
    """
    column = [c for c in groups.columns if c != "id"][0]
    joined = predictions.merge(groups, on="id", how="inner")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for value, part in joined.groupby(column, sort=True):
        out[str(value)] = {
            t: regression_metrics(part[f"pred_{t}"].to_numpy(), part[f"true_{t}"].to_numpy())
            for t in POPULARITY_TASKS
            if f"pred_{t}" in part.columns
        }
    return out


def write_condition_table(
    out: Path, prepared: str, column: str, rows: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """Write ``out/table3.md`` and ``.csv`` for the finished runs ``rows`` (grid rows: ``name``,
    ``conditioning``). Returns ``{"column", "values", "streams_pearson": {run: {value: r}}}``, or
    None when ``prepared`` lacks the column or it has fewer than two values."""
    pd = require("pandas", "train")
    if not prepared or not Path(prepared).is_file():
        return None
    frame = pd.read_parquet(prepared)
    if column not in frame.columns or frame[column].nunique(dropna=True) < 2:
        return None
    groups = frame.loc[frame["split"] == "test", ["id", column]].dropna()
    values = sorted(str(v) for v in groups[column].unique())
    records, summary = [], {}
    for r in rows:
        preds = pd.read_parquet(out / "conditions" / r["name"] / "test_predictions.parquet")
        by = condition_metrics(preds, groups)
        rec: dict[str, Any] = {"condition": r["name"], "conditioning": r["conditioning"]}
        for v in values:
            for t in POPULARITY_TASKS:
                m = by.get(v, {}).get(t)
                for key, _ in _METRICS:
                    rec[f"{t}_{key}_{v}"] = None if m is None else m[key]
            rec[f"n_{v}"] = int(by[v][POPULARITY_TASKS[0]]["n"]) if v in by else 0
        records.append(rec)
        summary[r["name"]] = {v: rec[f"streams_pearson_{v}"] for v in values}
    table = pd.DataFrame(records)
    table.to_csv(out / "table3.csv", index=False)
    header = ["condition", "conditioning"]
    header += [
        f"{t} {title} ({v})" for v in values for t in POPULARITY_TASKS for _, title in _METRICS
    ]
    header += [f"n ({v})" for v in values]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rec in records:
        cells = [rec["condition"], rec["conditioning"]]
        cells += [
            _fmt(rec[f"{t}_{key}_{v}"])
            for v in values
            for t in POPULARITY_TASKS
            for key, _ in _METRICS
        ]
        cells += [str(rec[f"n_{v}"]) for v in values]
        lines.append("| " + " | ".join(cells) + " |")
    title = f"Table 3: popularity prediction on the test split by {column} (native units, 0–100)"
    (out / "table3.md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")
    return {"column": column, "values": values, "streams_pearson": summary}


def _fmt(x: float | None) -> str:
    return fmt_number(x, 3, missing="—")
