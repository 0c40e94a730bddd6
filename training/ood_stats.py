"""``apex-reward ood-stats``: add OOD statistics to an existing checkpoint from an embeddings store.

Training writes the statistics itself (:func:`~.trainer.export.export_checkpoint`); this command
gives them to a checkpoint trained before they existed, or refits them on other songs::

    apex-reward ood-stats --model runs/train/model --embeddings runs/embeddings \
        --prepared runs/prepared/prepared.parquet --split train

The store must come from the checkpoint's front end and encoder (checked). With ``--from-audio``
the songs of ``--prepared`` (its ``audio_path`` column) are encoded again by the checkpoint instead
(no store needed): the ``moments`` feature needs the encoder's frames, which a store does not keep::

    apex-reward ood-stats --model runs/train/model --prepared runs/prepared/prepared.parquet \
        --from-audio --features moments --lower-tail true

A song that fails to decode or encode is skipped and counted (``failed``). The statistics
(:mod:`apex_reward.ood`) replace any the checkpoint had; the checkpoint is rewritten in place, or
copied to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from apex_reward.checkpoint import read_checkpoint, save_checkpoint
from apex_reward.cli import Command
from apex_reward.config import ApexConfig
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args
from apex_reward.errors import ConfigError, require
from apex_reward.ood import DYNAMIC_KINDS, fit_statistics, song_feature_matrix, song_features

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
    from_audio: bool = field(
        default=False,
        metadata={
            "help": "encode the songs of --prepared from their audio with the checkpoint instead "
            "of reading --embeddings (needed for --features moments)"
        },
    )
    features: Literal["layer_mean", "layers", "moments"] | None = field(
        default=None,
        metadata={"help": "song feature to describe (default: the checkpoint's ood.features)"},
    )
    lower_tail: bool | None = field(
        default=None,
        metadata={"help": "set ood.lower_tail (two-sided typicality flag); default: keep"},
    )
    in_sample_share: float = field(
        default=0.05,
        metadata={
            "help": "with the lower tail on: raise the covariance shrinkage until at most this "
            "share of the training songs, scored in-sample, fall below the lower threshold"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "songs per encoder call (--from-audio)"})
    device: str = field(default="cpu", metadata={"help": "device for --from-audio"})

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("ood-stats: --model is required")
        if self.from_audio and not self.prepared:
            raise ConfigError("ood-stats: --from-audio needs --prepared (its audio_path column)")
        if not self.from_audio and not self.embeddings:
            raise ConfigError("ood-stats: --embeddings is required (or --from-audio --prepared)")
        if self.features in DYNAMIC_KINDS and not self.from_audio:
            raise ConfigError(
                f"ood-stats: --features {self.features} needs the encoder's frames: add --from-audio"
            )
        if not 0.0 <= self.in_sample_share <= 1.0:
            raise ConfigError(
                f"ood-stats: --in-sample-share must be in [0, 1], got {self.in_sample_share}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"ood-stats: --batch-size must be >= 1, got {self.batch_size}")


def audio_song_features(
    model: Any, paths: list[str], kind: str, batch_size: int = 8
) -> tuple[torch.Tensor, list[dict[str, str]]]:
    """Encode audio files with ``model`` -> ``([S, D]`` float64 OOD song features of the files
    that worked, ``[{"path", "error"}]`` of those that did not)."""
    from apex_reward.scoring import iter_decoded

    rows: list[torch.Tensor] = []
    failed: list[dict[str, str]] = []
    waves: list[torch.Tensor] = []
    rates: list[int] = []

    def encode() -> None:
        with torch.inference_mode():
            feats = model.encode(waves, rates, dynamics=kind in DYNAMIC_KINDS, check=False)
            rows.append(song_features(feats, kind))
        waves.clear()
        rates.clear()

    for path, wave, rate, error in iter_decoded(model, paths):
        if error is not None:
            failed.append({"path": path, "error": f"{type(error).__name__}: {error}"})
            continue
        waves.append(wave)
        rates.append(rate)
        if len(waves) == batch_size:
            encode()
    if waves:
        encode()
    if not rows:
        raise ConfigError("ood-stats: no song could be encoded from its audio")
    return torch.cat(rows), failed


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
    if config.features is not None:
        cfg.ood.features = config.features
    if config.lower_tail is not None:
        cfg.ood.lower_tail = config.lower_tail
    failed: list[dict[str, str]] = []
    if config.from_audio:
        from apex_reward import ApexRewardModel

        pd = require("pandas", "train")
        prepared = pd.read_parquet(config.prepared)
        paths = [str(p) for p in prepared.loc[prepared["split"] == config.split, "audio_path"]]
        if not paths:
            raise ConfigError(f"ood-stats: no song of split {config.split!r} in {config.prepared}")
        model = ApexRewardModel.from_pretrained(directory, device=config.device)
        x, failed = audio_song_features(model, paths, cfg.ood.features, config.batch_size)
        source = f"audio of split {config.split!r} of {config.prepared}"
        extra: dict[str, Any] = {"from_audio": True, "failed": len(failed)}
    else:
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
        extra = {"embeddings": config.embeddings}
    p = cfg.ood.flag_percentile
    bound = (p, config.in_sample_share) if cfg.ood.lower_tail and p is not None else None
    stats, info = fit_statistics(x, seed=config.seed, in_sample_share=bound)
    info["features"] = cfg.ood.features
    cfg.ood.fitted_on = {**info, "source": source, **extra}
    kept = {k: v for k, v in tensors.items() if not k.startswith("ood.")}
    out = Path(config.out) if config.out else directory
    save_checkpoint(out, cfg.to_dict(), {**kept, **stats.to_tensors()})
    return {
        "checkpoint": str(out),
        **info,
        "source": source,
        "flag_percentile": p,
        "threshold": None if p is None else stats.threshold(p),
        "lower_threshold": None
        if p is None or not cfg.ood.lower_tail
        else stats.threshold(100.0 - p),
        "failed": failed,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, OodStatsConfig)


def run(args: argparse.Namespace) -> int:
    summary = add_ood_statistics(dataclass_from_args(OodStatsConfig, args))
    threshold, lower = summary["threshold"], summary["lower_threshold"]
    sys.stderr.write(
        f"wrote OOD statistics of {summary['songs']} songs ({summary['features']}, "
        f"{summary['dimension']}-dimensional, covariance shrinkage {summary['shrinkage']:.3f}) to "
        f"{summary['checkpoint']}; flag "
        + (
            "off"
            if threshold is None
            else f"above distance {threshold:.4g} ({summary['flag_percentile']:g}th percentile)"
        )
        + ("" if lower is None else f" and below {lower:.4g}")
        + "\n"
    )
    for item in summary["failed"]:
        sys.stderr.write(f"skipped {item['path']}: {item['error']}\n")
    return 0


COMMAND = Command(
    "ood-stats",
    "add out-of-distribution statistics to a checkpoint from an embeddings store or audio",
    add_arguments,
    run,
)
