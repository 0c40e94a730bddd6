"""Distributed, resumable extraction of MERT layer embeddings (see ``docs/training.md``).

``accelerate launch [--multi_gpu --num_processes N] -m apex_reward extract --manifest M --model DIR --out OUT``
(or plain ``apex-reward extract ...`` for one process).

Songs are sorted by id and cut into fixed shards of ``shard_size`` songs; shard ``k`` belongs to
process ``k % world_size``, so every process takes a disjoint share and the shards' contents do
not depend on how many processes run. Each process decodes and resamples in DataLoader workers
(overlapped with encoding), runs the front end's segmentation + the frozen encoder on its device in
batches of ``batch_size`` segments, and writes, per shard,

* ``shards/shard-KKKKKK.safetensors``: ``embeddings`` fp16 ``[segments, layers, hidden]``;
* ``shards/shard-KKKKKK.json``: the completion record (songs with their rows and segment
  durations, unreadable songs with reasons, the SHA-256 of the safetensors file).

Both are written to temporary names and renamed; a shard is complete only when its record exists
and the checksum matches. Rerunning the same command after a crash or kill skips complete shards
and redoes the rest. When all shards are complete the main process writes ``index.parquet`` (one
row per segment: id, segment, duration_s, song_duration_s, shard, row), ``errors.jsonl`` and
``summary.json``. ``extraction.json`` fingerprints the front end, encoder and shard layout; a rerun
with a different model refuses to mix embeddings.

``--views N`` also stores N-1 augmented views of every song after its rows (random preview clips,
gain and time shift, deterministic per song, view and seed; :mod:`.views`), listed under the
song's ``views`` in the shard record and with a ``view`` column in the index.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from apex_reward.checkpoint import ENCODER_DIGEST_KEY
from apex_reward.cli import Command
from apex_reward.config import FrontendConfig
from apex_reward.dataclass_io import add_dataclass_arguments, to_dict
from apex_reward.errors import ApexError, ConfigError, require
from apex_reward.files import atomic_write_text, remove_stale_temporaries
from apex_reward.loading import ModelOptions, load_model

from .distributed import accelerator_cpu, check_launch, claim_output, finish_distributed
from .embeddings import ShardWriter, shard_complete, write_index
from .flags import CPU, add_renamed_flags, config_from_args
from .views import ViewConfig, make_views

logger = logging.getLogger(__name__)

__all__ = ["ExtractConfig", "AudioDataset", "run_extraction", "read_songs"]


@dataclass
class ExtractConfig:
    """Options of ``apex-reward extract``."""

    manifest: str = field(
        default="",
        metadata={
            "help": "songs to extract: prepared.parquet or any manifest with id and audio_path"
        },
    )
    model: ModelOptions = field(
        default_factory=ModelOptions,
        metadata={
            "flatten": True,
            "help": "the checkpoint whose front end and encoder define the embeddings (--model), "
            "where it runs (--device: cpu = the CPU even where GPUs are present, gloo between "
            "processes; unset = accelerate's choice) and its precision (--dtype)",
        },
    )
    out: str = field(default="runs/embeddings", metadata={"help": "output directory"})
    columns: str | None = field(
        default=None, metadata={"help": "column mapping schema=source,... for id and audio_path"}
    )
    batch_size: int = field(default=16, metadata={"help": "30 s segments per encoder call"})
    num_workers: int = field(
        default=2, metadata={"help": "DataLoader processes decoding and resampling audio"}
    )
    shard_size: int = field(
        default=256, metadata={"help": "songs per shard (the unit of resumption)"}
    )
    limit: int | None = field(
        default=None, metadata={"help": "extract only the first N songs (by id)"}
    )
    augment: ViewConfig = field(
        default_factory=ViewConfig,
        metadata={
            "flatten": True,
            "help": "augmented views per song (--views N: view 0 is the song, views 1..N-1 "
            "random preview clips with random gain and time shift; training samples one per epoch)",
        },
    )

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(
                f"limit: must be >= 1 (leave it unset to extract every song), got {self.limit}"
            )


def read_songs(
    manifest: str, columns: str | None = None, limit: int | None = None
) -> list[tuple[str, str]]:
    """``[(id, absolute audio path)]`` sorted by id, from any manifest with id and audio_path.

    ``limit`` keeps only the first ``limit`` songs (by id); it must be >= 1 when given.

    Raises:
        ConfigError: a missing column, duplicate ids, or ``limit`` < 1.
    """
    from .manifest import parse_column_map, read_table

    if limit is not None and limit < 1:
        raise ConfigError(f"limit: must be >= 1 (or None for every song), got {limit}")

    p = Path(manifest)
    df = read_table(p)
    rename = {src: dst for dst, src in parse_column_map(columns).items()}
    df = df.rename(columns=rename)
    for col in ("id", "audio_path"):
        if col not in df.columns:
            raise ConfigError(f"{p}: needs an {col!r} column (map yours with --columns)")
    df = df[["id", "audio_path"]].astype(str)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise ConfigError(
            f"{p}: duplicate ids, e.g. {dup.iloc[0]!r}; run apex-reward prepare first"
        )
    songs = sorted(
        (sid, str(Path(path) if Path(path).is_absolute() else p.parent / path))
        for sid, path in zip(df["id"], df["audio_path"])
    )
    return songs[:limit] if limit is not None else songs


class AudioDataset(torch.utils.data.Dataset):
    """Decodes, checks, downmixes and resamples one song per item (runs in DataLoader workers)."""

    def __init__(
        self, items: list[tuple[int, str, str]], frontend, views: ViewConfig | None = None
    ) -> None:
        self.items = items
        self.frontend = frontend
        self.views = views or ViewConfig()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from apex_reward.audio import load_audio

        shard, sid, path = self.items[i]
        out: dict[str, Any] = {"shard": shard, "id": sid, "path": path, "audio": None}
        try:
            wav, sr = load_audio(path, max_duration_s=self.frontend.config.max_duration_s)
            self.frontend.check(wav, sr, path)
            with torch.inference_mode():
                mono = self.frontend.resample(self.frontend.downmix(wav), sr).contiguous()
            out["audio"] = mono.clone()
            out["duration_s"] = wav.shape[-1] / sr
            cfg = self.frontend.config
            out["views"] = make_views(
                out["audio"], cfg.sample_rate, sid, self.views, segment_seconds=cfg.segment_seconds
            )
        except ApexError as e:
            out["error_type"], out["reason"] = type(e).__name__, getattr(e, "reason", str(e))
        except Exception as e:  # a decoder crash on one file must not stop the job
            out["error_type"], out["reason"] = type(e).__name__, str(e)
        return out


def _fingerprint(model, config: ExtractConfig, encoder_sha: str | None) -> dict[str, Any]:
    """What the embeddings depend on: front end, encoder architecture/source/revision, the stored
    encoder weights' digest (None for a referenced encoder: source + revision name it)."""
    enc = model.config.encoder
    return {
        "format_version": 2,
        "frontend": to_dict(model.config.frontend),
        "encoder": {
            "preset": enc.preset,
            "hubert": enc.hubert,
            "layers": list(enc.layers),
            "source": enc.source,
            "revision": enc.revision,
            "stored": enc.stored,
        },
        "encoder_weights_sha256": encoder_sha,
        "shard_size": config.shard_size,
        "dtype": "fp16 storage",
        # only stores with augmented views carry the key: a views=1 store is as before
        **({"views": _view_recipe(model, config)} if config.augment.views > 1 else {}),
    }


def _canonical_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """``fp`` with its front end's defaults filled in (a store written before a front-end field
    existed resumes with the same front end now)."""
    if not isinstance(fp.get("frontend"), dict):
        return fp
    return {**fp, "frontend": FrontendConfig.canonical(fp["frontend"])}


def _view_recipe(model, config: ExtractConfig) -> dict[str, Any]:
    """The views' settings with the clip length resolved (what the stored views depend on)."""
    recipe = to_dict(config.augment)
    if recipe["view_clip_seconds"] is None:
        recipe["view_clip_seconds"] = model.config.frontend.segment_seconds
    return recipe


def run_extraction(config: ExtractConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Extract embeddings for this process's share; the main process then writes the index.

    Returns the summary on the main process (None on others).
    """
    if not config.manifest or not config.model.model:
        raise ConfigError("extract: --manifest and --model are required")
    accelerate = require("accelerate", "train", "apex-reward extract")
    accelerator = accelerate.Accelerator(cpu=accelerator_cpu(config.model.device))
    check_launch(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device
    out = Path(config.out)
    shards_dir = out / "shards"
    songs = read_songs(config.manifest, config.columns, config.limit)
    n_shards = (len(songs) + config.shard_size - 1) // config.shard_size

    # the device accelerate gave this process (each process of a launch its own GPU)
    # extraction runs only the front end and encoder: an untrained base checkpoint is normal
    model = load_model(dataclasses.replace(config.model, device=str(device)), heads=False)
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[
        model.encoder_dtype
    ]
    checkpoint_cfg = (
        json.loads((Path(config.model.model) / "config.json").read_text())
        if Path(config.model.model).is_dir()
        else {}
    )
    fingerprint = _fingerprint(model, config, checkpoint_cfg.get(ENCODER_DIGEST_KEY))
    fingerprint["songs_sha256"] = hashlib.sha256(json.dumps(songs).encode()).hexdigest()
    fp_path = out / "extraction.json"
    if accelerator.is_main_process:
        shards_dir.mkdir(parents=True, exist_ok=True)
        # temporaries of a killed run (a live process's, e.g. another rank's, are kept)
        stale = remove_stale_temporaries(shards_dir) + remove_stale_temporaries(out)
        if stale:
            logger.info("removed %d temporary files a killed run left behind", len(stale))
        claim_output(
            fp_path, fingerprint, "embeddings from a different extraction", _canonical_fingerprint
        )
    accelerator.wait_for_everyone()
    if not fp_path.is_file():
        raise ConfigError(f"{fp_path} was not written by the main process")

    mine = [k for k in range(n_shards) if k % world == rank]
    todo = [k for k in mine if shard_complete(shards_dir, k) is None]
    skipped = len(mine) - len(todo)
    if skipped:
        logger.info(
            "rank %d: %d of its %d shards already complete, skipping them", rank, skipped, len(mine)
        )
    items = [
        (k, sid, path)
        for k in todo
        for sid, path in songs[k * config.shard_size : (k + 1) * config.shard_size]
    ]
    t_start = time.perf_counter()
    stats = _extract_items(
        model, items, shards_dir, config, device, progress and accelerator.is_main_process, world
    )
    elapsed = time.perf_counter() - t_start

    accelerator.wait_for_everyone()
    summary = None
    if accelerator.is_main_process:
        summary = write_index(out, n_shards, len(songs))
        summary.update(
            wall_s_this_run=elapsed,
            world_size=world,
            device=str(device),
            dtype=dtype,
            shards_skipped_on_resume=skipped if world == 1 else None,
            main_process_songs_per_s=stats["songs"] / elapsed if elapsed > 0 else None,
        )
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return summary


def _extract_items(
    model, items, shards_dir: Path, config: ExtractConfig, device, show: bool, world: int
) -> dict[str, float]:
    loader = torch.utils.data.DataLoader(
        AudioDataset(items, model.frontend, config.augment),
        batch_size=None,
        num_workers=config.num_workers,
        prefetch_factor=4 if config.num_workers > 0 else None,
        persistent_workers=False,
    )
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(items), unit="song", desc="extracting (main process)", dynamic_ncols=True
        )
    sr = model.config.frontend.sample_rate
    writer: ShardWriter | None = None
    pending: list[dict[str, Any]] = []
    pending_segments = 0
    stats = {"songs": 0, "audio_s": 0.0}
    t0 = time.perf_counter()

    def encode_pending() -> None:
        nonlocal pending, pending_segments
        if not pending:
            return
        with torch.inference_mode():
            segs = model.frontend.segment([p["audio"].to(device) for p in pending])
            feats = torch.cat(list(model.iter_encoded_chunks(segs, config.batch_size))).float()
            weights = model.frontend.segment_weights(segs).tolist()
        start = 0
        for p in pending:
            n = p["n_segments"]
            valid_s = (segs.valid[start : start + n].float() / sr).tolist()
            if "view" in p:  # an augmented view of the song added just before
                writer.add_view(
                    p["view"], feats[start : start + n], valid_s, weights[start : start + n]
                )
            else:
                writer.add_song(
                    p["id"],
                    p["path"],
                    feats[start : start + n],
                    valid_s,
                    p["duration_s"],
                    weights=weights[start : start + n],
                )
            start += n
        pending, pending_segments = [], 0

    def finish_shard() -> None:
        nonlocal writer
        if writer is not None:
            encode_pending()
            writer.write()
            writer = None

    seg_len = model.config.frontend.segment_samples
    for item in loader:
        if writer is None or item["shard"] != writer.k:
            finish_shard()
            writer = ShardWriter(shards_dir, item["shard"])
        if item["audio"] is None:
            writer.add_error(item)
        else:
            # the song, then its augmented views: their rows follow the song's in the shard
            for entry in [item] + [{"view": v, "audio": v.audio} for v in item.pop("views")]:
                n = max(1, -(-entry["audio"].shape[-1] // seg_len))
                entry["n_segments"] = n
                pending.append(entry)
                pending_segments += n
            if pending_segments >= config.batch_size:
                encode_pending()
            stats["audio_s"] += item["duration_s"]
        stats["songs"] += 1
        if bar is not None:
            bar.update(1)
            dt = max(1e-9, time.perf_counter() - t0)
            # tqdm shows the songs/s rate itself; the postfix adds the audio rate only
            bar.set_postfix_str(
                f"{stats['audio_s'] / dt:.1f} audio-h/h"
                + (f" (x{world} processes)" if world > 1 else "")
            )
    finish_shard()
    if bar is not None:
        bar.close()
    return stats


# ----------------------------------------------------------------------------------------------
# CLI


def add_extract_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward extract`` (generated from :class:`ExtractConfig`)."""
    add_dataclass_arguments(parser, ExtractConfig)
    add_renamed_flags(parser, [CPU])


def run_extract(args: argparse.Namespace) -> int:
    """``apex-reward extract``: extract, then print the summary (main process)."""
    config = config_from_args(ExtractConfig, args, [CPU])
    summary = run_extraction(config)
    code = 0
    if summary is not None:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        if summary["songs_failed"]:
            sys.stderr.write(
                f"{summary['songs_failed']} songs could not be read; see {Path(config.out) / 'errors.jsonl'}\n"
            )
    return finish_distributed(code)


COMMAND = Command(
    "extract",
    "extract MERT layer embeddings (distributed, resumable)",
    add_extract_arguments,
    run_extract,
)
