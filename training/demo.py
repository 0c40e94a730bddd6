"""``apex-reward demo``: the whole pipeline, offline, in a few minutes on a laptop CPU.

synthetic corpus (procedural songs whose quality is known) -> ``prepare`` -> a ``tiny`` model with a
random MERT-shaped encoder -> ``extract`` -> ``train`` (all seven tasks, uncertainty loss, song mode)
-> export -> score real audio (``../shared/audio`` when present, else fresh synthetic songs) ->
``report.md`` with the test metrics against the synthetic ground truth and a plot.

The demo encoder is *untrained* (random weights): the trained heads learn what its random features
happen to expose about the synthetic degradations (noise, clipping, detuning, timing, level jumps).
It demonstrates the pipeline, not musical judgement. With real MERT weights and real data the same
steps run unchanged (see README: "Training").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apex_reward.cli import Command
from apex_reward.config import AESTHETIC_TASKS, ALL_TASKS
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args, to_dict
from apex_reward.loading import ModelOptions, load_model

logger = logging.getLogger(__name__)

__all__ = ["DemoConfig", "run_demo_pipeline", "default_audio_dir"]


@dataclass
class DemoConfig:
    """Options of ``apex-reward demo``."""

    out: str = field(default="runs/demo", metadata={"help": "output directory"})
    songs: int = field(default=600, metadata={"help": "synthetic songs to generate"})
    min_seconds: float = field(default=5.0, metadata={"help": "shortest synthetic song, seconds"})
    max_seconds: float = field(default=10.0, metadata={"help": "longest synthetic song, seconds"})
    audio_dir: str | None = field(
        default=None,
        metadata={
            "help": "real audio to score at the end (default: ../shared/audio if present, else synthetic songs)"
        },
    )
    segment_seconds: float = field(
        default=10.0,
        metadata={"help": "segment length of the demo model's front end (the paper: 30)"},
    )
    segment_padding: Literal["full", "none"] = field(
        default="full",
        metadata={
            "help": "the demo model's front end: full = pad each song's last segment to "
            "--segment-seconds, none = encode it at its own length (extraction, training and "
            "scoring all follow the checkpoint's setting)"
        },
    )
    epochs: int = field(default=200, metadata={"help": "training epochs (early stopping applies)"})
    seed: int = field(default=0, metadata={"help": "random seed for everything"})
    ensemble: int = field(
        default=1,
        metadata={"help": "heads to train (train --ensemble: bootstrap members, one checkpoint)"},
    )
    workers: int = field(
        default=2, metadata={"help": "threads/processes for audio checks and decoding"}
    )
    ood_features: Literal["layer_mean", "moments"] = field(
        default="moments",
        metadata={
            "help": "OOD statistics of the exported model: moments = refitted from the training "
            "songs' audio with the frames' dynamics and the two-sided flag (ood-stats "
            "--from-audio); layer_mean = the trainer's, from the embeddings store"
        },
    )


def default_audio_dir() -> Path | None:
    """``../shared/audio`` next to the current directory or the source checkout, if it exists."""
    here = Path(__file__).resolve()
    for cand in (Path.cwd().parent / "shared" / "audio", here.parents[2] / "shared" / "audio"):
        if cand.is_dir() and any(cand.iterdir()):
            return cand
    return None


def _stage(name: str, t0: float) -> None:
    sys.stderr.write(f"[demo {time.perf_counter() - t0:6.1f}s] {name}\n")
    sys.stderr.flush()


def run_demo_pipeline(config: DemoConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every stage; returns the report's numbers. Each stage writes under ``config.out``."""
    import pandas as pd
    import torch

    from apex_reward import ApexConfig, ApexRewardModel

    from .extract import ExtractConfig, run_extraction
    from .prepare import PrepareConfig, prepare_corpus
    from .synthetic import SynthConfig, generate_corpus, load_truth
    from .trainer import TrainConfig, train

    t0 = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    synth = SynthConfig(
        out=str(out / "corpus"),
        num_songs=config.songs,
        min_seconds=config.min_seconds,
        max_seconds=config.max_seconds,
        sample_rates=[22050, 24000, 32000],
        seed=config.seed,
        suno_fraction=0.5,
    )
    _stage(f"1/6 synthesising {config.songs} songs", t0)
    corpus = generate_corpus(synth, progress=progress)
    _stage("2/6 preparing the corpus (filters, balance, popularity scores, split)", t0)
    prep = prepare_corpus(
        PrepareConfig(
            manifest=corpus["manifest"],
            out=str(out / "prepared"),
            snapshot_date=synth.snapshot_date,
            workers=config.workers,
            split=[0.7, 0.15, 0.15],
            seed=config.seed,
        ),
        progress=progress,
    )
    _stage("3/6 building a tiny model with a random encoder, extracting embeddings", t0)
    torch.manual_seed(config.seed)
    base_cfg = ApexConfig.from_preset("tiny")
    # the synthetic songs are 5–10 s: 10 s segments avoid encoding 20 s of padding per song
    base_cfg.frontend.segment_seconds = config.segment_seconds
    base_cfg.frontend.segment_padding = config.segment_padding
    base = ApexRewardModel.from_config(base_cfg, encoder="random")
    base.save_pretrained(out / "base_model")
    ext = run_extraction(
        ExtractConfig(
            manifest=str(out / "prepared" / "prepared.parquet"),
            model=ModelOptions(model=str(out / "base_model"), device="cpu"),
            out=str(out / "embeddings"),
            num_workers=min(config.workers, 2),
            batch_size=8,
        ),
        progress=progress,
    )
    _stage("4/6 training: all seven tasks, uncertainty loss, song mode", t0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the heads are tiny: one thread beats several on small batches
    try:
        result = train(
            TrainConfig(
                embeddings=str(out / "embeddings"),
                prepared=str(out / "prepared" / "prepared.parquet"),
                model=str(out / "base_model"),
                out=str(out / "train"),
                tasks="full",
                mode="song",
                loss="uncertainty",
                epochs=config.epochs,
                patience=40,
                batch_size=512,
                lr=1e-3,
                seed=config.seed,
                ensemble=config.ensemble,
                device="cpu",
                log_with="none",
                resume=False,
                save_interval_s=30.0,
            ),
            progress=progress,
        )
    finally:
        torch.set_num_threads(threads)
    model_dir = result.checkpoint
    if config.ood_features == "moments":
        from .ood_stats import OodStatsConfig, add_ood_statistics

        add_ood_statistics(
            OodStatsConfig(
                model=str(model_dir),
                prepared=str(out / "prepared" / "prepared.parquet"),
                from_audio=True,
                features="moments",
                lower_tail=True,
            )
        )
    _stage(f"5/6 exported {model_dir}; scoring audio", t0)
    model = load_model(ModelOptions(model=str(model_dir), device="cpu"))
    audio_dir = Path(config.audio_dir) if config.audio_dir else default_audio_dir()
    scored: list[dict[str, Any]]
    if audio_dir is not None:
        files = sorted(
            p
            for p in audio_dir.iterdir()
            if p.suffix.lower() in (".wav", ".flac", ".ogg", ".opus", ".mp3")
        )
        scored = [r.to_dict() for r in model.score(files, batch_size=8)]
        source = f"real audio in {audio_dir}"
    else:
        fresh = generate_corpus(
            SynthConfig(
                out=str(out / "fresh"),
                num_songs=8,
                min_seconds=config.min_seconds,
                max_seconds=config.max_seconds,
                seed=config.seed + 1000,
                zero_stream_fraction=0,
                recent_fraction=0,
                duplicate_id_fraction=0,
                duplicate_audio_fraction=0,
                unreadable_fraction=0,
                invalid_row_fraction=0,
            ),
            progress=False,
        )
        truth = load_truth(out / "fresh")
        manifest = pd.read_csv(fresh["manifest"])
        files = [out / "fresh" / p for p in manifest["audio_path"]]
        scored = []
        for sid, r in zip(manifest["id"], model.score(files, batch_size=8)):
            d = r.to_dict()
            d["true"] = {t: truth[sid][t] for t in AESTHETIC_TASKS}
            scored.append(d)
        source = "8 fresh synthetic songs (not in the training corpus), with their true labels"
    _stage("6/6 writing the report", t0)
    test = result.metrics["test"]
    report = {
        "seconds": time.perf_counter() - t0,
        "prepare": prep["counts"],
        "extraction": ext,
        "test_metrics": test,
        "best_epoch": result.best_epoch,
        "model": str(model_dir),
        "scored_source": source,
        "scored": scored,
        "calibration": model.preference_calibration,
    }
    if model.config.preference.calibration is not None:
        report["calibration"].update(to_dict(model.config.preference.calibration))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    _plot(out / "train" / "test_predictions.parquet", out / "demo_test_predictions.png")
    (out / "report.md").write_text(_markdown(report))
    return report


def _plot(pred_path: Path, path: Path) -> None:
    import matplotlib
    import pandas as pd

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.read_parquet(pred_path)
    fig, axes = plt.subplots(1, len(ALL_TASKS), figsize=(2.6 * len(ALL_TASKS), 2.8))
    for ax, t in zip(axes, ALL_TASKS):
        x, y = df[f"true_{t}"], df[f"pred_{t}"]
        ax.scatter(x, y, s=8, alpha=0.6)
        lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
        ax.plot([lo, hi], [lo, hi], color="grey", linewidth=1)
        ax.set_title(f"{t} r={np.corrcoef(x, y)[0, 1]:.2f}", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.suptitle("demo: predicted vs true on held-out synthetic songs (test split)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _markdown(r: dict[str, Any]) -> str:
    c = r["prepare"]
    lines = [
        "# apex-reward demo report",
        "",
        "> The demo encoder is a **randomly initialised** MERT-shaped network, and the songs are",
        "> procedural. The numbers show that the pipeline (prepare → extract → train → export → score)",
        "> works end to end and learns what it can from these features; they say nothing about music.",
        "",
        f"Ran in {r['seconds']:.0f} s. Corpus: {c['rows_read']} manifest rows → {c['final']} songs after the filters "
        f"(zero streams {c['zero_streams']}, duplicate ids {c['duplicate_id']}, recent {c['recent']}, "
        f"unreadable {c['unreadable']}, duplicate audio {c['duplicate_audio']}, invalid rows {c['invalid_rows']}); "
        f"splits {c['splits']}. Best epoch {r['best_epoch']}.",
        "",
        "## Test metrics against the synthetic ground truth (songs not trained on)",
        "",
        "| task | MSE | MAE | Pearson | Spearman |",
        "|---|---|---|---|---|",
    ]
    for t, m in r["test_metrics"].items():
        lines.append(
            f"| {t} | {m['mse']:.4g} | {m['mae']:.4g} | {m['pearson']:.3f} | {m['spearman']:.3f} |"
        )
    cal = r.get("calibration") or {}
    if cal.get("held_out"):
        h = cal["held_out"]
        lines += [
            "",
            "## Preference calibration",
            "",
            f"Bradley–Terry temperature {cal['temperature']:.4g}, fitted on {cal['fitted_on']}. "
            f"On {h['pairs']} held-out test pairs: ECE {h['ece_before']:.3f} → {h['ece']:.3f}, "
            f"Brier {h['brier_before']:.3f} → {h['brier']:.3f} (temperature 1 → fitted); the "
            f"largest stated P(A > B) is {h['max_probability']:.3f}.",
        ]
    lines += [
        "",
        "![predicted vs true](demo_test_predictions.png)",
        "",
        f"## Scores of {r['scored_source']}",
        "",
    ]
    lines += [_scores_table(r["scored"])]
    return "\n".join(lines) + "\n"


def _scores_table(rows: list[dict[str, Any]]) -> str:
    head = ["file", "streams", "likes", "coh", "mus", "mem", "clar", "nat", "reward"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        name = Path(r["path"]).name
        if "error" in r:
            out.append(f"| {name} | error: {r['error']} |" + " |" * (len(head) - 2))
            continue
        s = r["scores"]
        cells = [name, f"{s['streams']:.1f}", f"{s['likes']:.1f}"]
        for t in AESTHETIC_TASKS:
            cell = f"{s[t]:.2f}"
            if "true" in r:
                cell += f" ({r['true'][t]:.2f})"
            cells.append(cell)
        cells.append(f"{r['reward']:.3f}")
        out.append("| " + " | ".join(cells) + " |")
    if rows and "true" in rows[0]:
        out.append("\n(true label in brackets)")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# CLI


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, DemoConfig)


def run_demo(args: argparse.Namespace) -> int:
    config = dataclass_from_args(DemoConfig, args)
    report = run_demo_pipeline(config)
    sys.stdout.write(
        f"\nScores of {report['scored_source']} by the demo model {report['model']}:\n\n"
    )
    sys.stdout.write(_scores_table(report["scored"]) + "\n\n")
    sys.stdout.write("Test metrics on held-out synthetic songs:\n\n")
    from .trainer import format_metrics

    sys.stdout.write(format_metrics(report["test_metrics"]) + "\n\n")
    sys.stdout.write(
        f"Report: {Path(config.out) / 'report.md'}. The demo encoder is untrained (random weights): "
        "this shows the pipeline, not musical judgement.\n"
    )
    return 0


COMMAND = Command(
    "demo",
    "offline end-to-end demo: synthetic corpus -> trained model -> scores",
    add_demo_arguments,
    run_demo,
)
