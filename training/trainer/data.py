"""The trainer's data: per-split features and native-unit targets.

:class:`TrainingData` joins an :class:`~apex_reward.training.embeddings.EmbeddingStore` with
``prepared.parquet`` (song mode: one sample per song, its segments averaged; segment mode: one
sample per segment) or wraps in-memory tensors (tests, benchmarks).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from apex_reward.checkpoint import ENCODER_DIGEST_KEY
from apex_reward.conditioning import column_indices, column_vocabulary
from apex_reward.config import AESTHETIC_TASKS, SCORE_RANGES, TASK_SETS, FrontendConfig
from apex_reward.errors import ConfigError, require

if TYPE_CHECKING:
    from .config import TrainConfig

logger = logging.getLogger(__name__)

__all__ = [
    "TARGET_COLUMNS",
    "SplitData",
    "TrainingData",
    "load_training_data",
    "unit_scale",
]

#: target column in prepared.parquet for each task
TARGET_COLUMNS: dict[str, str] = {
    "streams": "streams_score",
    "likes": "likes_score",
    **{t: t for t in AESTHETIC_TASKS},
}


@dataclass
class SplitData:
    """One split, ready for training.

    Attributes:
        features: ``[M, L, H]`` per-sample layer features (fp16 or fp32, CPU); M = songs in song
            mode, segments in segment mode.
        targets: ``[M, T]`` float32 targets in native units (one row per sample).
        song_index: ``[M]`` int64 song of each sample (index into ``song_ids``).
        weights: ``[M]`` float32 weight of each sample in its song's average (segment mode).
        song_ids: the songs, in index order.
        conditions: ``[M]`` int64 condition index of each sample (conditioned training,
            :mod:`apex_reward.conditioning`; the average index for a missing or unseen value),
            or None.
        extra_views: ``[V-1, M, L, H]`` song features of the augmented views 1..V-1 (song mode,
            training split of a store extracted with ``--views V``), else None; ``features``
            is view 0.
    """

    features: torch.Tensor
    targets: torch.Tensor
    song_index: torch.Tensor
    weights: torch.Tensor
    song_ids: list[str]
    conditions: torch.Tensor | None = None
    extra_views: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def conditions_at(self, rows: torch.Tensor | slice) -> torch.Tensor | None:
        """The condition indices of ``rows`` (None when unconditioned)."""
        return None if self.conditions is None else self.conditions[rows]

    @property
    def song_targets(self) -> torch.Tensor:
        """``[S, T]`` native-unit targets per song."""
        out = torch.empty(len(self.song_ids), self.targets.shape[1])
        out[self.song_index] = self.targets
        return out


@dataclass
class TrainingData:
    """Train/val/test splits for one task set and input mode; with ``condition_values`` (the
    vocabulary of the manifest column ``condition_column``) each split carries its samples'
    condition indices."""

    tasks: tuple[str, ...]
    mode: str
    splits: dict[str, SplitData]
    condition_column: str | None = None
    condition_values: list[str] | None = None
    #: how the store's augmented views were made (``extraction.json``), when training uses them
    views: dict | None = None

    @property
    def num_layers(self) -> int:
        return int(self.splits["train"].features.shape[1])

    @property
    def hidden_size(self) -> int:
        return int(self.splits["train"].features.shape[2])

    @classmethod
    def from_extraction(
        cls,
        store,
        prepared,
        tasks: str,
        mode: str,
        condition: str | None = None,
        *,
        sample_views: bool = False,
    ) -> TrainingData:
        """Join an :class:`EmbeddingStore` with ``prepared`` (DataFrame) on song id;
        ``condition`` names a categorical column to condition on (its vocabulary is the
        training split's values).

        ``sample_views``: also load the training songs' augmented views (song mode) when the
        store has them (``extract --views N``)."""
        use_views = sample_views and store.views > 1
        if use_views and mode != "song":
            raise ConfigError(
                f"{store.dir} holds {store.views} views per song; sampling them is supported in "
                "song mode (train on view 0 only with --no-sample-views)"
            )
        names = TASK_SETS[tasks]
        cols = [TARGET_COLUMNS[t] for t in names]
        missing = [c for c in cols + ["split"] + ([condition] if condition else [])]
        missing = [c for c in missing if c not in prepared.columns]
        if missing:
            raise ConfigError(
                f"prepared data lacks column(s) {missing}"
                + (" (aesthetic labels are needed for --tasks full)" if tasks == "full" else "")
            )
        extracted = set(store.song_ids)
        df = prepared[prepared["id"].isin(extracted)]
        dropped = len(prepared) - len(df)
        if dropped:
            logger.warning(
                "%d prepared songs have no embeddings (unreadable at extraction); skipped", dropped
            )
        if df[cols].isna().any().any():
            raise ConfigError("prepared data has missing target values")
        vocab = None
        if condition:
            vocab = column_vocabulary(df.loc[df["split"] == "train", condition].tolist())
            if not vocab:
                raise ConfigError(f"the training split has no values in column {condition!r}")
        splits = {}
        for split in ("train", "val", "test"):
            part = df[df["split"] == split]
            if part.empty:
                raise ConfigError(f"the {split} split is empty")
            ids = part["id"].tolist()
            y = torch.as_tensor(part[cols].to_numpy(dtype=np.float32, copy=True))
            cond = None
            if vocab is not None:
                cond, unseen = column_indices(part[condition].tolist(), vocab)
                if unseen:
                    logger.warning(
                        "%d %s songs have a %s the training split lacks; they get the average "
                        "condition",
                        unseen,
                        split,
                        condition,
                    )
            if mode == "song":
                # float32: rounding the averaged song features to fp16 would make the trainer's
                # predictions differ from the exported model's (which averages fp16 segments)
                feats = store.songs(ids)
                n = len(ids)
                extra = None
                if use_views and split == "train":
                    extra = torch.stack([store.songs(ids, view=v) for v in range(1, store.views)])
                splits[split] = SplitData(
                    feats, y, torch.arange(n), torch.ones(n), ids, cond, extra_views=extra
                )
            else:
                seg = store.segments(ids)
                splits[split] = SplitData(
                    seg.layer_features.to(torch.float16),
                    y[seg.song_index],
                    seg.song_index,
                    seg.weights,
                    ids,
                    None if cond is None else cond[seg.song_index],
                )
        return cls(
            tuple(names),
            mode,
            splits,
            condition,
            vocab,
            views=store.fingerprint.get("views") if use_views else None,
        )

    @classmethod
    def from_arrays(
        cls,
        features: dict[str, torch.Tensor],
        targets: dict[str, torch.Tensor],
        tasks: tuple[str, ...],
        *,
        conditions: dict[str, torch.Tensor] | None = None,
        condition_values: list[str] | None = None,
        condition_column: str = "platform",
    ) -> TrainingData:
        """Song-mode data from in-memory tensors: ``features[split]`` ``[N, L, H]``,
        ``targets[split]`` ``[N, T]`` in native units (tests, benchmarks); ``conditions[split]``
        ``[N]`` int64 indices into ``condition_values`` for conditioned training."""
        splits = {}
        for split in ("train", "val", "test"):
            x, y = features[split], targets[split].float()
            n = x.shape[0]
            splits[split] = SplitData(
                x,
                y,
                torch.arange(n),
                torch.ones(n),
                [f"{split}{i}" for i in range(n)],
                None if conditions is None else conditions[split].long(),
            )
        if conditions is None:
            return cls(tuple(tasks), "song", splits)
        return cls(tuple(tasks), "song", splits, condition_column, list(condition_values or []))


def unit_scale(tasks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, span)`` ``[T]`` of each task's native range: ``(y - lo) / span`` is in [0, 1]."""
    lo = torch.tensor([SCORE_RANGES[t][0] for t in tasks])
    hi = torch.tensor([SCORE_RANGES[t][1] for t in tasks])
    return lo, hi - lo


def load_training_data(config: TrainConfig) -> TrainingData:
    """Join ``config.embeddings`` with ``config.prepared`` for the configured tasks and mode."""
    pd = require("pandas", "train")
    from ..embeddings import EmbeddingStore

    if not config.embeddings or not config.prepared:
        raise ConfigError("train: --embeddings and --prepared are required")
    store = EmbeddingStore(config.embeddings)
    if config.model:
        _check_extraction_matches(store, config.model)
    prepared = pd.read_parquet(config.prepared)
    return TrainingData.from_extraction(
        store,
        prepared,
        config.tasks,
        config.mode,
        config.condition,
        sample_views=config.sample_views,
    )


def _check_extraction_matches(store, model_dir: str) -> None:
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    fp = store.fingerprint
    enc = cfg["encoder"]
    if (
        fp["encoder"]["hubert"] != enc["hubert"]
        or fp["encoder"]["layers"] != enc["layers"]
        or FrontendConfig.canonical(fp["frontend"]) != FrontendConfig.canonical(cfg["frontend"])
    ):
        raise ConfigError(
            f"the embeddings in {store.dir} were not extracted with {model_dir} (front end or encoder differ)"
        )
    if fp.get("encoder_weights_sha256") not in (None, cfg.get(ENCODER_DIGEST_KEY)):
        raise ConfigError(f"the embeddings in {store.dir} come from other weights than {model_dir}")
