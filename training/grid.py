"""The paper's 24-condition grid (see ``docs/training.md``): 3 loss strategies x {2, 3} shared layers x
{song, segment} mode x {popularity-only, full} tasks.

``apex-reward grid --embeddings E --prepared P --model BASE --out runs/grid [--epochs N]``

Conditions are named like the paper's models: letters A–F for (loss, depth) — A equal/2,
B manual/2, C uncertainty/2, D equal/3, E manual/3, F uncertainty/3 — then mode and task set,
e.g. ``C-song-full`` (the paper's best, "Model C"). Each runs the trainer in
``out/conditions/NAME``; a condition with ``metrics.json`` is finished and skipped when the grid
is rerun when it was trained with the same configuration (recorded in its
``grid_condition.json``; a changed ``--epochs``, ``--lr`` or other training option trains it
again), and an interrupted condition resumes from its own saved state. Outputs:

* ``table1.md``/``.csv`` — popularity metrics (streams and likes: MSE, MAE, Pearson, Spearman on
  the test split, native units) for all 24 conditions (paper Table 1);
* ``table2.md``/``.csv`` — aesthetic metrics for all 24 conditions (popularity-only conditions
  have no aesthetic heads: "—") (paper Table 2);
* ``table3.md``/``.csv`` — streams and likes Pearson and MSE on the test split per value of
  ``--condition-column`` (``platform``), when the prepared data has two or more; with
  ``--conditioning none token embedding`` every condition is also trained conditioned on that
  column (``C-song-full+platform-token``, ...), so the table compares conditioned and
  unconditioned models (:mod:`.grid_conditions`);
* ``learning_curves.png`` and ``pred_vs_true.png`` (test split, best condition);
* ``best_model/`` — the best condition's exported checkpoint. "Best" is chosen on the
  validation split (mean Pearson of streams and likes), never on the test split.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apex_reward.cli import Command
from apex_reward.config import AESTHETIC_TASKS, POPULARITY_TASKS
from apex_reward.dataclass_io import add_dataclass_arguments, to_dict
from apex_reward.errors import ConfigError, require

from .distributed import DEVICE_HELP, accelerator_cpu, finish_distributed
from .flags import CPU, add_renamed_flags, config_from_args
from .formatting import fmt_number
from .grid_conditions import write_condition_table
from .trainer import TrainConfig, TrainingData, load_training_data, train
from .trainer.state import resume_key

logger = logging.getLogger(__name__)

LETTERS: dict[tuple[str, int], str] = {
    ("equal", 2): "A",
    ("manual", 2): "B",
    ("uncertainty", 2): "C",
    ("equal", 3): "D",
    ("manual", 3): "E",
    ("uncertainty", 3): "F",
}

__all__ = ["GridConfig", "conditions", "run_grid_experiment", "write_tables", "LETTERS"]


@dataclass
class GridConfig:
    """Options of ``apex-reward grid``; training options apply to every condition."""

    embeddings: str = field(default="", metadata={"help": "extraction directory"})
    prepared: str = field(default="", metadata={"help": "prepared.parquet"})
    model: str = field(
        default="", metadata={"help": "checkpoint the embeddings were extracted with (for export)"}
    )
    out: str = field(default="runs/grid", metadata={"help": "output directory"})
    losses: list[str] = field(
        default_factory=lambda: ["equal", "manual", "uncertainty"],
        metadata={"help": "loss strategies"},
    )
    trunk_layers: list[int] = field(
        default_factory=lambda: [2, 3], metadata={"help": "shared trunk depths"}
    )
    modes: list[str] = field(
        default_factory=lambda: ["song", "segment"], metadata={"help": "input modes"}
    )
    tasks: list[str] = field(
        default_factory=lambda: ["popularity", "full"], metadata={"help": "task sets"}
    )
    only: list[str] | None = field(
        default=None, metadata={"help": "run only these condition names (e.g. C-song-full)"}
    )
    epochs: int = field(default=100, metadata={"help": "maximum epochs per condition"})
    patience: int = field(default=10, metadata={"help": "early-stopping patience"})
    batch_size: int = field(default=512, metadata={"help": "samples per process per step"})
    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=1e-2, metadata={"help": "AdamW weight decay"})
    popularity_weight: float = field(
        default=1.0, metadata={"help": "manual strategy: popularity weight"}
    )
    aesthetic_weight: float = field(
        default=0.5, metadata={"help": "manual strategy: aesthetic weight"}
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = field(
        default="auto", metadata={"help": "mixed precision"}
    )
    seed: int = field(default=0, metadata={"help": "random seed (the same for every condition)"})
    device: str | None = field(default=None, metadata={"help": DEVICE_HELP})
    log_with: Literal["auto", "tensorboard", "none"] = field(
        default="auto", metadata={"help": "experiment tracker"}
    )
    ensemble: int = field(
        default=1, metadata={"help": "heads per condition (train --ensemble: bootstrap members)"}
    )
    conditioning: list[str] = field(
        default_factory=lambda: ["none"],
        metadata={
            "help": "variants of every condition: none (unconditioned), token, embedding "
            "(conditioned on --condition-column; train --condition-mode); named e.g. "
            "C-song-full+platform-token"
        },
    )
    condition_column: str = field(
        default="platform",
        metadata={
            "help": "the categorical column of the prepared data that conditioned variants "
            "learn, and by which table3 breaks the test metrics down"
        },
    )

    def __post_init__(self) -> None:
        bad = [x for x in self.losses if x not in ("equal", "manual", "uncertainty")]
        bad += [str(x) for x in self.trunk_layers if x not in (2, 3)]
        bad += [x for x in self.modes if x not in ("song", "segment")]
        bad += [x for x in self.tasks if x not in ("popularity", "full")]
        bad += [x for x in self.conditioning if x not in ("none", "token", "embedding")]
        if bad:
            raise ConfigError(f"grid: unknown values {bad}")


def condition_name(
    loss: str, layers: int, mode: str, tasks: str, conditioning: str = "none", column: str = ""
) -> str:
    base = f"{LETTERS[(loss, layers)]}-{mode}-{tasks}"
    return base if conditioning == "none" else f"{base}+{column}-{conditioning}"


def conditions(config: GridConfig) -> list[dict[str, Any]]:
    """The grid's conditions in table order (by model letter, then mode, then task set)."""
    out = []
    for layers in config.trunk_layers:
        for loss in config.losses:
            for mode in config.modes:
                for tasks in config.tasks:
                    for variant in config.conditioning:
                        name = condition_name(
                            loss, layers, mode, tasks, variant, config.condition_column
                        )
                        out.append(
                            {
                                "name": name,
                                "loss": loss,
                                "trunk_layers": layers,
                                "mode": mode,
                                "tasks": tasks,
                                "conditioning": variant,
                            }
                        )
    variants = ["none", "token", "embedding"]
    out.sort(
        key=lambda c: (
            c["name"][0],
            ["song", "segment"].index(c["mode"]),
            c["tasks"] != "popularity",
            variants.index(c["conditioning"]),
        )
    )
    if config.only:
        unknown = sorted(set(config.only) - {c["name"] for c in out})
        if unknown:
            raise ConfigError(f"grid --only: unknown condition(s) {unknown}")
        out = [c for c in out if c["name"] in config.only]
    return out


def run_grid_experiment(
    config: GridConfig,
    *,
    progress: bool = True,
    data: dict[tuple, TrainingData] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every condition, then write the tables, plots and best model.

    ``data``: training data already loaded, keyed ``(tasks, mode)`` (or ``(tasks, mode,
    condition column)`` for conditioned variants).

    Raises:
        ConfigError: invalid options, e.g. a ``device`` this machine lacks (checked before any
            data is loaded).
    """
    accelerator_cpu(config.device)
    out = Path(config.out)
    cache: dict[tuple, TrainingData] = {
        (k if len(k) == 3 else (*k, None)): v for k, v in (data or {}).items()
    }
    ran, skipped = [], []
    for cond in conditions(config):
        cdir = out / "conditions" / cond["name"]
        tcfg = TrainConfig(
            embeddings=config.embeddings,
            prepared=config.prepared,
            model=config.model,
            out=str(cdir),
            tasks=cond["tasks"],
            trunk_layers=cond["trunk_layers"],
            mode=cond["mode"],
            loss=cond["loss"],
            popularity_weight=config.popularity_weight,
            aesthetic_weight=config.aesthetic_weight,
            lr=config.lr,
            weight_decay=config.weight_decay,
            epochs=config.epochs,
            batch_size=config.batch_size,
            patience=config.patience,
            mixed_precision=config.mixed_precision,
            seed=config.seed,
            device=config.device,
            log_with=config.log_with,
            ensemble=config.ensemble,
            resume=True,
            export=bool(config.model),
            condition=None if cond["conditioning"] == "none" else config.condition_column,
            condition_mode="token" if cond["conditioning"] == "token" else "embedding",
        )
        if _reuse_condition(cdir, tcfg, cond["name"]):
            skipped.append(cond["name"])
            continue
        key = (cond["tasks"], cond["mode"], tcfg.condition)
        if key not in cache:
            cache[key] = load_training_data(tcfg)
        logger.info("grid: training %s", cond["name"])
        train(tcfg, cache[key], progress=progress)
        ran.append(cond["name"])
    summary = write_tables(config)
    summary.update(ran=ran, skipped=skipped)
    (out / "grid_summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    return summary


#: Where a grid condition records the training configuration it ran with.
CONDITION_KEY = "grid_condition.json"


def condition_key(tcfg: TrainConfig) -> dict[str, Any]:
    """What a condition's results depend on: the fields a run must match to resume
    (:func:`~.trainer.state.resume_key`) plus those a finished run's results also depend on
    (epochs, patience, precision)."""
    return {
        **resume_key(tcfg),
        "epochs": tcfg.epochs,
        "patience": tcfg.patience,
        "mixed_precision": tcfg.mixed_precision,
    }


def _reuse_condition(cdir: Path, tcfg: TrainConfig, name: str) -> bool:
    """True when ``cdir`` holds this configuration's finished results. A condition trained (or
    started) with another configuration -- other epochs, learning rate, data -- is removed so it
    is trained anew; an unfinished one with the same configuration resumes."""
    key = condition_key(tcfg)
    key_path = cdir / CONDITION_KEY
    if cdir.exists():
        try:
            recorded = json.loads(key_path.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == key:
            return (cdir / "metrics.json").is_file()
        changed = sorted(
            k for k in set(key) | set(recorded or {}) if (recorded or {}).get(k) != key.get(k)
        )
        logger.warning(
            "grid: %s was trained with another configuration (%s); training it again",
            name,
            ", ".join(changed) if recorded else "no record of it",
        )
        shutil.rmtree(cdir)
    cdir.mkdir(parents=True)
    key_path.write_text(json.dumps(key, indent=2) + "\n")
    return False


def _load_results(config: GridConfig) -> list[dict[str, Any]]:
    rows = []
    for cond in conditions(config):
        path = Path(config.out) / "conditions" / cond["name"] / "metrics.json"
        if path.is_file():
            rows.append({**cond, **json.loads(path.read_text())})
    return rows


def _fmt(x: float | None, digits: int) -> str:
    return fmt_number(x, digits, missing="—")


def write_tables(config: GridConfig) -> dict[str, Any]:
    """Write table1/table2 (Markdown + CSV) and the plots from the finished conditions."""
    pd = require("pandas", "train")
    out = Path(config.out)
    rows = _load_results(config)
    if not rows:
        raise ConfigError(f"{out}: no finished conditions to tabulate")
    metrics = ("mse", "mae", "pearson", "spearman")
    digits = {"mse": 3, "mae": 3, "pearson": 3, "spearman": 3}

    def table(tasks: tuple[str, ...]) -> Any:
        records = []
        for r in rows:
            rec: dict[str, Any] = {
                "condition": r["name"],
                "loss": r["loss"],
                "shared_layers": r["trunk_layers"],
                "mode": r["mode"],
                "tasks": r["tasks"],
            }
            for t in tasks:
                m = r["metrics"]["test"].get(t)
                for k in metrics:
                    rec[f"{t}_{k}"] = None if m is None else m[k]
            records.append(rec)
        return pd.DataFrame(records)

    t1, t2 = table(POPULARITY_TASKS), table(AESTHETIC_TASKS)
    for name, df, tasks in (("table1", t1, POPULARITY_TASKS), ("table2", t2, AESTHETIC_TASKS)):
        df.to_csv(out / f"{name}.csv", index=False)
        header = ["condition", "loss", "layers", "mode", "tasks"] + [
            f"{t} {k.upper() if k in ('mse', 'mae') else k.capitalize()}"
            for t in tasks
            for k in metrics
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, rec in df.iterrows():
            cells = [
                rec["condition"],
                rec["loss"],
                str(rec["shared_layers"]),
                rec["mode"],
                rec["tasks"],
            ]
            cells += [_fmt(rec[f"{t}_{k}"], digits[k]) for t in tasks for k in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        title = (
            "Table 1: popularity prediction on the test split (native units, 0–100)"
            if name == "table1"
            else "Table 2: aesthetic prediction on the test split (native units, 1–5)"
        )
        (out / f"{name}.md").write_text(f"# {title}\n\n" + "\n".join(lines) + "\n")

    # best condition: chosen on validation by the popularity tasks (the primary ones),
    def val_score(r: dict[str, Any]) -> float:
        return float(np.mean([r["metrics"]["val"][t]["pearson"] for t in POPULARITY_TASKS]))

    # among the full-task conditions (when run): best_model/ is a reward model, and a
    # popularity-only one has no aesthetic scores (its "overall" would be popularity alone)
    full = [r for r in rows if r["tasks"] == "full"]
    best = max(full or rows, key=val_score)
    best_dir = Path(config.out) / "conditions" / best["name"]
    if (best_dir / "model").is_dir():
        target = out / "best_model"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(best_dir / "model", target)
    _plot_learning_curves(rows, out / "learning_curves.png", Path(config.out))
    _plot_pred_vs_true(
        best_dir / "test_predictions.parquet", out / "pred_vs_true.png", best["name"]
    )
    by_column = write_condition_table(out, config.prepared, config.condition_column, rows)
    return {
        "conditions": len(rows),
        "best": best["name"],
        "best_val_popularity_pearson": val_score(best),
        "config": to_dict(config),
        "by_condition_column": by_column,
    }


def _plot_learning_curves(rows: list[dict[str, Any]], path: Path, root: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(rows)
    cols = min(6, n)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.4 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        hist = json.loads((root / "conditions" / r["name"] / "history.json").read_text())
        ep = [h["epoch"] for h in hist]
        ax.plot(ep, [h["train_loss"] for h in hist], label="train")
        ax.plot(ep, [h["val_loss"] for h in hist], label="val")
        ax.axvline(r["best_epoch"], color="grey", linestyle=":", linewidth=1)
        ax.set_title(r["name"], fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("loss (unit range)", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("learning curves (loss in unit range; dotted: best epoch)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_pred_vs_true(pred_path: Path, path: Path, name: str) -> None:
    pd = require("pandas", "train")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_parquet(pred_path)
    tasks = [c[len("pred_") :] for c in df.columns if c.startswith("pred_")]
    fig, axes = plt.subplots(1, len(tasks), figsize=(2.8 * len(tasks), 2.9), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        x, y = df[f"true_{t}"], df[f"pred_{t}"]
        ax.scatter(x, y, s=4, alpha=0.4)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
        r = np.corrcoef(x, y)[0, 1] if len(df) > 1 else float("nan")
        ax.set_title(f"{t} (r={r:.2f})", fontsize=9)
        ax.set_xlabel("true", fontsize=8)
        ax.set_ylabel("predicted", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{name}: predicted vs true on the test split")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward grid`` (generated from :class:`GridConfig`)."""
    add_dataclass_arguments(parser, GridConfig)
    add_renamed_flags(parser, [CPU])


def run_grid(args: argparse.Namespace) -> int:
    config = config_from_args(GridConfig, args, [CPU])
    summary = run_grid_experiment(config)
    import accelerate.state

    if accelerate.state.PartialState().is_main_process:
        sys.stdout.write((Path(config.out) / "table1.md").read_text() + "\n")
        sys.stdout.write((Path(config.out) / "table2.md").read_text() + "\n")
        if summary.get("by_condition_column"):
            sys.stdout.write((Path(config.out) / "table3.md").read_text() + "\n")
        sys.stderr.write(
            f"grid: {len(summary['ran'])} conditions trained, {len(summary['skipped'])} already finished; "
            f"best on validation: {summary['best']}\n"
        )
    return finish_distributed(0)


COMMAND = Command(
    "grid",
    "run the 24-condition grid and write the paper's tables",
    add_grid_arguments,
    run_grid,
)
