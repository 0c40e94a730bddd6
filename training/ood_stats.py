"""``apex-reward ood-stats``: add OOD statistics to an existing checkpoint from an embeddings store.

Training writes the statistics itself (:func:`~.trainer.export.export_checkpoint`); this command
gives them to a checkpoint trained before they existed, or refits them on other songs::

    apex-reward ood-stats --model runs/train/model --embeddings runs/embeddings \
        --prepared runs/prepared/prepared.parquet --split train

The store must come from the checkpoint's front end and encoder (checked). The statistics
(:mod:`apex_reward.ood`) replace any the checkpoint had; the checkpoint is rewritten in place, or
copied to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_reward.checkpoint import read_checkpoint, save_checkpoint
from apex_reward.cli import Command
from apex_reward.config import ApexConfig
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args
from apex_reward.errors import ConfigError, require
from apex_reward.ood import fit_statistics, song_feature_matrix

__all__ = ["OodStatsConfig", "add_ood_statistics", "COMMAND"]


@dataclass
class OodStatsConfig:
    """Options of ``apex-reward ood-stats``."""

    model: str = field(default="", metadata={"help": "checkpoint directory to add statistics to"})
    embeddings: str = field(
        default="",
        metadata={"help": "extraction directory made with this checkpoint (apex-reward extract)"},
    )
    prepared: str | None = field(
        default=None,
        metadata={"help": "prepared.parquet: use only the songs of --split (default: every song)"},
    )
    split: str = field(default="train", metadata={"help": "split to fit on, with --prepared"})
    out: str | None = field(
        default=None, metadata={"help": "write the checkpoint here (default: rewrite --model)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the cross-fitting folds"})

    def __post_init__(self) -> None:
        if not self.model or not self.embeddings:
            raise ConfigError("ood-stats: --model and --embeddings are required")


def add_ood_statistics(config: OodStatsConfig) -> dict[str, Any]:
    """Fit the statistics on the store's songs and write the checkpoint.

    Returns:
        ``{"checkpoint", "songs", "dimension", "threshold", "flag_percentile", ...}``.

    Raises:
        ConfigError: the store does not match the checkpoint, no songs in the split, too few songs.
        CheckpointError: an unreadable checkpoint.
    """
    from .embeddings import EmbeddingStore
    from .trainer.data import _check_extraction_matches

    raw, tensors, directory = read_checkpoint(config.model)
    cfg = ApexConfig.from_dict(raw)
    store = EmbeddingStore(config.embeddings)
    _check_extraction_matches(store, str(directory))
    ids = store.song_ids
    source = f"all songs of {config.embeddings}"
    if config.prepared:
        pd = require("pandas", "train")
        prepared = pd.read_parquet(config.prepared)
        wanted = set(prepared.loc[prepared["split"] == config.split, "id"])
        ids = [i for i in ids if i in wanted]
        source = f"split {config.split!r} of {config.prepared}"
        if not ids:
            raise ConfigError(f"ood-stats: no song of split {config.split!r} has embeddings")
    x = song_feature_matrix(store.songs(ids).double(), cfg.ood.features)
    stats, info = fit_statistics(x, seed=config.seed)
    cfg.ood.fitted_on = {**info, "source": source, "embeddings": config.embeddings}
    kept = {k: v for k, v in tensors.items() if not k.startswith("ood.")}
    out = Path(config.out) if config.out else directory
    save_checkpoint(out, cfg.to_dict(), {**kept, **stats.to_tensors()})
    p = cfg.ood.flag_percentile
    return {
        "checkpoint": str(out),
        **info,
        "source": source,
        "flag_percentile": p,
        "threshold": None if p is None else stats.threshold(p),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, OodStatsConfig)


def run(args: argparse.Namespace) -> int:
    summary = add_ood_statistics(dataclass_from_args(OodStatsConfig, args))
    threshold = summary["threshold"]
    sys.stderr.write(
        f"wrote OOD statistics of {summary['songs']} songs ({summary['dimension']}-dimensional, "
        f"Ledoit-Wolf shrinkage {summary['shrinkage']:.3f}) to {summary['checkpoint']}; flag "
        + (
            "off\n"
            if threshold is None
            else f"above distance {threshold:.4g} ({summary['flag_percentile']:g}th percentile)\n"
        )
    )
    return 0


COMMAND = Command(
    "ood-stats",
    "add out-of-distribution statistics to a checkpoint from an embeddings store",
    add_arguments,
    run,
)
