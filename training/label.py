"""``apex-reward label``: SongEval's five aesthetic labels for every song of a manifest.

``accelerate launch [--multi_gpu --num_processes N] -m apex_reward label --manifest M
--songeval DIR --out OUT`` (or plain ``apex-reward label ...`` for one process).

The job runs like ``extract``: songs sorted by id are cut into fixed shards of ``shard_size``
songs, shard ``k`` belongs to process ``k % world_size``; DataLoader workers decode and resample to
the feature model's rate ahead of the model; each finished shard is written atomically as
``shards/labels-KKKKKK.json`` (the labels of its songs and the songs that could not be read, with
reasons). Rerunning the same command after a crash or SIGKILL skips finished shards. When all are
finished the main process writes

* ``labelled.parquet``: the input manifest, every column kept, with the five label columns
  (``coherence`` … ``naturalness``, in [1, 5]) added — the file ``apex-reward prepare`` reads;
  songs that could not be labelled have empty labels (``prepare`` then lists them as invalid);
* ``errors.jsonl`` and ``summary.json``.

``labelling.json`` fingerprints the head, the feature model and the shard layout: a rerun with
different weights refuses to mix labels.

One song per forward pass: SongEval's head pools over the whole song and has no padding mask, so
padding songs into a batch would change their labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apex_reward.cli import Command
from apex_reward.config import FrontendConfig
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args
from apex_reward.errors import ConfigError, require
from apex_reward.files import atomic_write_text, file_sha256, remove_stale_temporaries

from .distributed import accelerator_cpu, check_launch, claim_output, finish_distributed
from .extract import AudioDataset, read_songs
from .manifest import LABEL_COLUMNS, read_table
from .songeval import SONGEVAL_ORDER, feature_model, load_songeval_head

logger = logging.getLogger(__name__)

__all__ = ["LabelConfig", "run_labelling", "COMMAND"]

assert set(SONGEVAL_ORDER) == set(LABEL_COLUMNS)


@dataclass
class LabelConfig:
    """Options of ``apex-reward label``."""

    manifest: str = field(
        default="", metadata={"help": "songs to label: any manifest with id and audio_path"}
    )
    songeval: str = field(
        default="",
        metadata={
            "help": "SongEval's released model: its model.safetensors, or a folder holding "
            "ckpt/model.safetensors (or model.safetensors) and config.yaml (CC BY-NC-SA 4.0)"
        },
    )
    songeval_config: str | None = field(
        default=None,
        metadata={"help": "SongEval's config.yaml (default: found next to the weights)"},
    )
    features: str = field(
        default="muq",
        metadata={
            "help": "feature model: muq (SongEval's; needs the label extra) or tiny (a random "
            "stand-in for tests: its labels mean nothing)"
        },
    )
    features_source: str | None = field(
        default=None,
        metadata={"help": "MuQ hub id or folder (default OpenMuQ/MuQ-large-msd-iter)"},
    )
    features_revision: str | None = field(
        default=None, metadata={"help": "MuQ revision (commit) to pin"}
    )
    features_layer: int | None = field(
        default=None, metadata={"help": "hidden-state index the head reads (muq default 6)"}
    )
    out: str = field(default="runs/labels", metadata={"help": "output directory"})
    columns: str | None = field(
        default=None, metadata={"help": "column mapping schema=source,... for id and audio_path"}
    )
    device: str | None = field(
        default=None,
        metadata={"help": "cpu or cuda (unset: accelerate's choice, a GPU when there is one)"},
    )
    num_workers: int = field(
        default=2, metadata={"help": "DataLoader processes decoding and resampling audio"}
    )
    shard_size: int = field(
        default=256, metadata={"help": "songs per shard (the unit of resumption)"}
    )
    max_duration_s: float = field(
        default=900.0, metadata={"help": "songs longer than this are recorded as errors"}
    )
    limit: int | None = field(default=None, metadata={"help": "label only the first N songs"})
    replace_labels: bool = field(
        default=False,
        metadata={"help": "replace label columns the manifest already has (else refuse)"},
    )

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size: must be >= 1, got {self.shard_size}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if not (math.isfinite(self.max_duration_s) and self.max_duration_s > 0):
            raise ConfigError(f"max_duration_s: must be > 0, got {self.max_duration_s}")


def _songeval_files(config: LabelConfig) -> tuple[Path, Path | None]:
    """(weights file, config.yaml or None to search next to it)."""
    p = Path(config.songeval)
    if p.is_dir():
        for cand in (p / "ckpt" / "model.safetensors", p / "model.safetensors"):
            if cand.is_file():
                p = cand
                break
        else:
            raise ConfigError(
                f"--songeval {config.songeval}: no ckpt/model.safetensors or model.safetensors in it"
            )
    return p, Path(config.songeval_config) if config.songeval_config else None


def _shard_path(shards: Path, k: int) -> Path:
    return shards / f"labels-{k:06d}.json"


def _shard_done(shards: Path, k: int, ids: list[str]) -> dict[str, Any] | None:
    """The shard's record if it is finished and covers exactly ``ids``; else None (redo it)."""
    p = _shard_path(shards, k)
    try:
        rec = json.loads(p.read_text(encoding="utf-8"))
        got = sorted([s["id"] for s in rec["songs"]] + [e["id"] for e in rec["errors"]])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return rec if got == sorted(ids) else None


def run_labelling(config: LabelConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Label this process's share of the songs; the main process then writes the manifest.

    Returns the summary on the main process (None on others).

    Raises:
        ConfigError: missing options, a manifest that already has labels (without
            ``replace_labels``), or an output folder holding labels made another way.
        CheckpointError: SongEval weights that do not match their config.
        MissingDependencyError: ``accelerate`` (train extra) or ``muq`` (label extra) absent.
    """
    if not config.manifest or not config.songeval:
        raise ConfigError("label: --manifest and --songeval are required")
    accelerate = require("accelerate", "train", "apex-reward label")
    table = read_table(config.manifest)
    present = [c for c in LABEL_COLUMNS if c in table.columns]
    if present and not config.replace_labels:
        raise ConfigError(
            f"{config.manifest} already has label columns {present}; pass --replace-labels to "
            "overwrite them"
        )
    weights, yaml_path = _songeval_files(config)
    head = load_songeval_head(weights, yaml_path)
    accelerator = accelerate.Accelerator(cpu=accelerator_cpu(config.device))
    check_launch(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    feats = feature_model(
        config.features,
        source=config.features_source,
        revision=config.features_revision,
        layer=config.features_layer,
    )
    if feats.dim != head.config.in_features:
        raise ConfigError(
            f"the {config.features} feature model gives {feats.dim}-wide hidden states but the "
            f"SongEval head expects {head.config.in_features}"
        )
    head, feats = head.to(device), feats.to(device)

    out = Path(config.out)
    shards = out / "shards"
    songs = read_songs(config.manifest, config.columns, config.limit)
    n_shards = (len(songs) + config.shard_size - 1) // config.shard_size
    fingerprint = {
        "format_version": 1,
        "songeval_weights_sha256": file_sha256(weights),
        "songeval_head": dataclasses.asdict(head.config),
        "features": {
            "kind": config.features,
            "source": config.features_source,
            "revision": config.features_revision,
            "layer": config.features_layer,
        },
        "shard_size": config.shard_size,
        "songs_sha256": hashlib.sha256(json.dumps(songs).encode()).hexdigest(),
    }
    fp_path = out / "labelling.json"
    if accelerator.is_main_process:
        shards.mkdir(parents=True, exist_ok=True)
        claim_output(fp_path, fingerprint, "labels made differently")
        remove_stale_temporaries(shards)  # a killed run's (a live process's are kept)
    accelerator.wait_for_everyone()

    def shard_songs(k: int) -> list[tuple[str, str]]:
        return songs[k * config.shard_size : (k + 1) * config.shard_size]

    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if _shard_done(shards, k, [s for s, _ in shard_songs(k)]) is None]
    skipped = len(mine) - len(todo)
    items = [(k, sid, path) for k in todo for sid, path in shard_songs(k)]
    t0 = time.perf_counter()
    n_done = _label_items(
        head, feats, items, shards, config, device, progress and accelerator.is_main_process
    )
    elapsed = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
        summary = _write_outputs(out, config, table, songs, n_shards)
        summary.update(
            wall_s_this_run=round(elapsed, 3),
            world_size=world,
            device=str(device),
            shards_skipped_on_resume=skipped if world == 1 else None,
            main_process_songs_per_s=round(n_done / elapsed, 3) if elapsed > 0 else None,
        )
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary


def _label_items(head, feats, items, shards: Path, config: LabelConfig, device, show: bool) -> int:
    """Label ``items`` ``[(shard, id, path)]`` in shard order, writing each shard when it ends."""
    frontend_cfg = FrontendConfig(
        sample_rate=feats.sample_rate, max_duration_s=config.max_duration_s
    )
    from apex_reward.audio import AudioFrontEnd

    loader = torch.utils.data.DataLoader(
        AudioDataset(items, AudioFrontEnd(frontend_cfg)),
        batch_size=None,
        num_workers=config.num_workers,
        prefetch_factor=4 if config.num_workers > 0 else None,
    )
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(items), unit="song", desc="labelling (main process)", dynamic_ncols=True
        )
    record: dict[str, Any] | None = None
    n = 0

    def flush() -> None:
        if record is not None:
            atomic_write_text(_shard_path(shards, record["shard"]), json.dumps(record) + "\n")

    for item in loader:
        if record is None or item["shard"] != record["shard"]:
            flush()
            record = {"shard": item["shard"], "songs": [], "errors": []}
        if item["audio"] is None:
            record["errors"].append(
                {
                    "id": item["id"],
                    "path": item["path"],
                    "error_type": item["error_type"],
                    "reason": item["reason"],
                }
            )
        else:
            with torch.inference_mode():
                y = head(feats(item["audio"].to(device)).float())[0].tolist()
            if all(math.isfinite(v) for v in y):
                record["songs"].append({"id": item["id"], "labels": dict(zip(SONGEVAL_ORDER, y))})
            else:
                record["errors"].append(
                    {
                        "id": item["id"],
                        "path": item["path"],
                        "error_type": "NonFiniteLabel",
                        "reason": "the SongEval head gave a non-finite label",
                    }
                )
        n += 1
        if bar is not None:
            bar.update(1)
    flush()
    if bar is not None:
        bar.close()
    return n


def _write_outputs(out: Path, config: LabelConfig, table, songs, n_shards: int) -> dict[str, Any]:
    """Join every shard's labels onto the manifest; write labelled.parquet and errors.jsonl."""
    labels: dict[str, dict[str, float]] = {}
    errors: list[dict[str, Any]] = []
    for k in range(n_shards):
        ids = [s for s, _ in songs[k * config.shard_size : (k + 1) * config.shard_size]]
        rec = _shard_done(out / "shards", k, ids)
        if rec is None:
            raise ConfigError(f"label: shard {k} is unfinished after all processes ended; rerun")
        labels.update({s["id"]: s["labels"] for s in rec["songs"]})
        errors.extend(rec["errors"])
    from .manifest import parse_column_map

    id_col = parse_column_map(config.columns).get("id", "id")
    ids = table[id_col].astype(str)
    labelled = table.copy()
    for name in SONGEVAL_ORDER:
        labelled[name] = [labels.get(i, {}).get(name, float("nan")) for i in ids]
    from apex_reward.files import atomic_path

    with atomic_path(out / "labelled.parquet") as tmp:
        labelled.to_parquet(tmp, index=False)
    atomic_write_text(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    return {
        "songs": len(songs),
        "songs_labelled": len(labels),
        "songs_failed": len(errors),
        "manifest": str(out / "labelled.parquet"),
        "label_means": {
            name: round(sum(v[name] for v in labels.values()) / len(labels), 4) if labels else None
            for name in SONGEVAL_ORDER
        },
    }


# ----------------------------------------------------------------------------------------------
# CLI


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, LabelConfig)


def _run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(LabelConfig, args)
    summary = run_labelling(config)
    if summary is not None:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        if summary["songs_failed"]:
            sys.stderr.write(
                f"{summary['songs_failed']} songs could not be labelled; see "
                f"{Path(config.out) / 'errors.jsonl'}\n"
            )
    return finish_distributed(0)


COMMAND = Command(
    "label",
    "label songs with SongEval's five aesthetic scores (distributed, resumable)",
    _add_arguments,
    _run,
)
