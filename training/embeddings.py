"""Reading extracted embeddings back (the output of ``apex-reward extract``).

:class:`EmbeddingStore` opens an extraction directory (``index.parquet`` + fp16 shards) and gives

* per-segment features for any songs, as :class:`apex_reward.model.SegmentFeatures` — what
  ``ApexRewardModel.predict_from_features`` consumes, so cached embeddings score exactly like audio;
* per-song features ``[songs, layers, hidden]``: the song's segment features averaged with the
  model's segment weighting. Because the layer aggregation is a 1x1 convolution (linear), averaging
  before it equals averaging after it, so song-mode training can work on one row per song.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from apex_reward.errors import ApexError, ConfigError, DataIntegrityError, require
from apex_reward.files import atomic_path, atomic_write_text, file_sha256
from apex_reward.outputs import SegmentFeatures

__all__ = [
    "EmbeddingStore",
    "ShardWriter",
    "shard_name",
    "shard_complete",
    "read_shard_record",
    "write_index",
]


class EmbeddingStore:
    """An extraction directory.

    Attributes:
        index: DataFrame, one row per segment (id, segment, duration_s, song_duration_s, shard, row)
            of view 0, the songs themselves.
        fingerprint: the ``extraction.json`` record (front end + encoder that produced the data).
        views: views stored per song (``extract --views N``; 1 for a store without augmented
            views). Every method reads view 0 unless given ``view=``.
    """

    def __init__(self, directory: str | Path) -> None:
        pd = require("pandas", "train")
        self.dir = Path(directory)
        index_path = self.dir / "index.parquet"
        if not index_path.is_file():
            raise ConfigError(
                f"{self.dir} has no index.parquet: not a finished extraction (rerun apex-reward extract)"
            )
        index = pd.read_parquet(index_path)
        self.fingerprint = json.loads((self.dir / "extraction.json").read_text())
        self.views = int(self.fingerprint.get("views", {}).get("views", 1))
        self._shards: dict[str, torch.Tensor] = {}
        # per view: its rows (grouped by song) and each song's (start, stop) in them
        self._views: dict[int, tuple[Any, dict[str, tuple[int, int]]]] = {}
        for v in range(self.views):
            table = index
            if "view" in index.columns:
                table = index[index["view"] == v].drop(columns="view").reset_index(drop=True)
            ids = table["id"].to_numpy()
            starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else []
            rows = {ids[s]: (s, e) for s, e in zip(starts, np.r_[starts[1:], len(ids)])}
            self._views[v] = (table, rows)
        self.index, self._song_rows = self._views[0]

    @property
    def song_ids(self) -> list[str]:
        """Ids of the extracted songs, in index order."""
        return list(self._song_rows)

    @property
    def num_layers(self) -> int:
        return len(self.fingerprint["encoder"]["layers"])

    @property
    def segment_weighting(self) -> str:
        return self.fingerprint["frontend"]["segment_weighting"]

    def _shard(self, name: str) -> torch.Tensor:
        """The shard's embeddings, checked against the SHA-256 in its record on first read.

        Raises:
            DataIntegrityError: the shard file or its record is missing, unreadable, or the file
                no longer matches the checksum recorded when extraction wrote it.
        """
        if name not in self._shards:
            from safetensors.torch import load_file

            data = self.dir / "shards" / f"{name}.safetensors"
            record = read_shard_record(self.dir / "shards" / f"{name}.json")
            fix = "rerun the same apex-reward extract command to redo it"
            if record is None:
                raise DataIntegrityError(
                    f"{data}: its shard record is missing or unreadable; {fix}"
                )
            try:
                actual = file_sha256(data)
            except OSError as e:
                raise DataIntegrityError(f"{data}: cannot read ({e.strerror or e}); {fix}") from e
            if actual != record["sha256"]:
                raise DataIntegrityError(
                    f"{data}: checksum mismatch (sha256 {actual[:12]}..., its record expects "
                    f"{record['sha256'][:12]}...): the file changed after extraction; {fix}"
                )
            self._shards[name] = load_file(str(data))["embeddings"]
        return self._shards[name]

    def segment_table(self, ids: Sequence[str] | None = None, *, view: int = 0):
        """Index rows of the given songs (all songs if None), grouped by song in ``ids`` order,
        of view ``view`` (0: the songs themselves)."""
        if view not in self._views:
            raise ConfigError(
                f"{self.dir} stores views 0..{self.views - 1}; there is no view {view}"
            )
        index, song_rows = self._views[view]
        if ids is None:
            return index
        missing = [i for i in ids if i not in song_rows]
        if missing:
            raise KeyError(f"{len(missing)} songs are not in {self.dir}, e.g. {missing[0]!r}")
        order = (
            np.concatenate([np.arange(*song_rows[i]) for i in ids])
            if len(ids)
            else np.zeros(0, int)
        )
        return index.iloc[order]

    def segments(self, ids: Sequence[str] | None = None, *, view: int = 0) -> SegmentFeatures:
        """Per-segment features of ``ids`` (all songs if None) in that order, of view ``view``.

        Returns :class:`SegmentFeatures` with ``layer_features`` ``[N, L, H]`` float32 (stored as
        fp16), ``song_index`` ``[N]``, ``weights`` ``[N]`` (the front end's segment weights as
        recorded at extraction; for older stores the segment duration in samples at the encoder
        rate, or 1 for uniform weighting) and ``durations_s`` ``[B]``.
        """
        table = self.segment_table(ids, view=view)
        song_ids = list(dict.fromkeys(table["id"])) if ids is None else list(ids)
        pos = {sid: k for k, sid in enumerate(song_ids)}
        feats = torch.empty((len(table), *self._shape_tail()), dtype=torch.float32)
        for shard, group in table.groupby("shard", sort=False):
            where = np.flatnonzero((table["shard"] == shard).to_numpy())
            feats[where] = self._shard(shard)[
                torch.as_tensor(group["row"].to_numpy(copy=True))
            ].float()
        sr = self.fingerprint["frontend"]["sample_rate"]
        recorded = table["weight"].to_numpy() if "weight" in table else None
        if recorded is not None and len(recorded) and not np.isnan(recorded).any():
            # the front end's own weights, recorded at extraction (silent segments weigh 0)
            weights = torch.tensor(recorded, dtype=torch.float32)
        elif self.segment_weighting == "uniform":
            weights = torch.ones(len(table))
        else:  # stores written before weights were recorded: the model weighs by unpadded samples
            weights = torch.as_tensor(
                np.round(table["duration_s"].to_numpy() * sr), dtype=torch.float32
            ).clone()
        song_index = torch.as_tensor([pos[i] for i in table["id"]], dtype=torch.int64)
        durations = table.drop_duplicates("id").set_index("id").loc[song_ids, "song_duration_s"]
        return SegmentFeatures(
            layer_features=feats,
            song_index=song_index,
            weights=weights,
            durations_s=torch.as_tensor(durations.to_numpy(copy=True), dtype=torch.float32),
            num_songs=len(song_ids),
        )

    def songs(
        self,
        ids: Sequence[str] | None = None,
        *,
        weighting: Literal["model", "uniform", "duration"] = "model",
        view: int = 0,
    ) -> torch.Tensor:
        """Per-song features ``[B, L, H]`` float32 of view ``view``: each song's segment
        features averaged (``weighting="model"``: the front end's weights as extraction recorded
        them; ``"uniform"``: equal; ``"duration"``: by unpadded samples)."""
        seg = self.segments(ids, view=view)
        w = seg.weights
        if weighting == "uniform":
            w = torch.ones_like(w)
        elif weighting == "duration":
            sr = self.fingerprint["frontend"]["sample_rate"]
            durations = self.segment_table(ids, view=view)["duration_s"].to_numpy()
            w = torch.as_tensor(np.round(durations * sr), dtype=torch.float32)
        from apex_reward.heads import weighted_song_mean

        return weighted_song_mean(seg.layer_features, seg.song_index, w, seg.num_songs)

    def _shape_tail(self) -> tuple[int, int]:
        first = self.index["shard"].iloc[0]
        shape = self._shard(first).shape
        return int(shape[1]), int(shape[2])


# ----------------------------------------------------------------------------------------------
# the on-disk format, written by `apex-reward extract` (and by synthetic stores for tests)


def shard_name(k: int) -> str:
    return f"shard-{k:06d}"


def read_shard_record(path: Path) -> dict[str, Any] | None:
    """A shard's completion record, or None when it is missing or malformed (not UTF-8 JSON,
    not an object, or lacking its checksum, songs or errors in the expected shape)."""
    try:
        rec = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # JSON and UTF-8 errors are ValueErrors
        return None
    song_keys = ("id", "row", "segment_duration_s", "duration_s")
    if not (
        isinstance(rec, dict)
        and isinstance(rec.get("sha256"), str)
        and isinstance(rec.get("songs"), list)
        and isinstance(rec.get("errors"), list)
        and all(isinstance(s, dict) and all(k in s for k in song_keys) for s in rec["songs"])
        and all(isinstance(e, dict) for e in rec["errors"])
    ):
        return None
    return rec


def shard_complete(shards_dir: Path, k: int) -> dict[str, Any] | None:
    """Shard ``k``'s record when the shard is complete (a well-formed record whose checksum
    matches the data file), else None: the shard is (re)done."""
    rec_path = shards_dir / f"{shard_name(k)}.json"
    data_path = shards_dir / f"{shard_name(k)}.safetensors"
    if not rec_path.is_file() or not data_path.is_file():
        return None
    rec = read_shard_record(rec_path)
    if rec is None or rec["sha256"] != file_sha256(data_path):
        return None
    return rec


class ShardWriter:
    """Collects one shard's embeddings and writes it atomically when the shard is done."""

    def __init__(self, shards_dir: Path, k: int) -> None:
        self.dir, self.k = shards_dir, k
        self.chunks: list[torch.Tensor] = []
        self.songs: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.rows = 0

    def add_song(
        self,
        sid: str,
        path: str,
        feats: torch.Tensor,
        valid_s: list[float],
        duration_s: float,
        weights: list[float] | None = None,
    ) -> None:
        """Add one song: ``feats`` ``[segments, L, H]``, each segment's unpadded seconds, the
        song's duration, and each segment's weight in the song's average as the front end gives
        it (:meth:`~apex_reward.audio.AudioFrontEnd.segment_weights`; None: by duration)."""
        self.chunks.append(feats.to(torch.float16).cpu())
        song = {
            "id": sid,
            "path": path,
            "row": self.rows,
            "segments": len(valid_s),
            "segment_duration_s": valid_s,
            "duration_s": duration_s,
        }
        if weights is not None:
            song["segment_weight"] = [float(w) for w in weights]
        self.songs.append(song)
        self.rows += len(valid_s)

    def add_view(
        self, view, feats: torch.Tensor, valid_s: list[float], weights: list[float]
    ) -> None:
        """Add an augmented view (:class:`~apex_reward.training.views.View`) of the song added
        last: ``feats`` ``[segments, L, H]``, each segment's unpadded seconds and weight. Its
        rows follow the song's; the record keeps them, with the view's draws, under the song's
        ``views``."""
        if not self.songs:
            raise ApexError("ShardWriter.add_view: no song to attach the view to")
        self.chunks.append(feats.to(torch.float16).cpu())
        self.songs[-1].setdefault("views", []).append(
            {
                "view": view.view,
                "row": self.rows,
                "segments": len(valid_s),
                "segment_duration_s": valid_s,
                "segment_weight": [float(w) for w in weights],
                "duration_s": float(sum(valid_s)),
                **view.record(),
            }
        )
        self.rows += len(valid_s)

    def add_error(self, item: dict[str, Any]) -> None:
        self.errors.append(
            {
                "id": item["id"],
                "path": item["path"],
                "error_type": item["error_type"],
                "reason": item["reason"],
            }
        )

    def write(self) -> dict[str, Any]:
        from safetensors.torch import save_file

        name = shard_name(self.k)
        data = self.dir / f"{name}.safetensors"
        emb = torch.cat(self.chunks) if self.chunks else torch.zeros(0, dtype=torch.float16)
        with atomic_path(data) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"format": "pt"})
        record = {
            "shard": self.k,
            "rows": self.rows,
            "songs": self.songs,
            "errors": self.errors,
            "sha256": file_sha256(data),
            "shape": list(emb.shape),
        }
        atomic_write_text(self.dir / f"{name}.json", json.dumps(record) + "\n")
        return record


def write_index(out: Path, n_shards: int, n_songs: int) -> dict[str, Any]:
    pd = require("pandas", "train")
    shards_dir = out / "shards"
    rows, errors, missing = [], [], []
    with_views = False
    for k in range(n_shards):
        rec = shard_complete(shards_dir, k)
        if rec is None:
            missing.append(k)
            continue
        for s in rec["songs"]:
            weights = s.get("segment_weight") or [math.nan] * len(s["segment_duration_s"])
            for j, (d, w) in enumerate(zip(s["segment_duration_s"], weights)):
                rows.append((s["id"], j, d, s["duration_s"], shard_name(k), s["row"] + j, w))
            for v in s.get("views", []):  # augmented views (extract --views N)
                with_views = True
                for j, (d, w) in enumerate(zip(v["segment_duration_s"], v["segment_weight"])):
                    rows.append(
                        (s["id"], j, d, v["duration_s"], shard_name(k), v["row"] + j, w, v["view"])
                    )
        errors.extend(rec["errors"])
    if missing:
        raise ApexError(
            f"{len(missing)} of {n_shards} shards are not complete (e.g. {shard_name(missing[0])}); "
            "rerun the same command to finish them"
        )
    columns = ["id", "segment", "duration_s", "song_duration_s", "shard", "row", "weight"]
    if with_views:  # view 0 (the song) first in each song's rows, then its augmented views
        columns.append("view")
        rows = [r if len(r) == len(columns) else (*r, 0) for r in rows]
    index = pd.DataFrame(rows, columns=columns)
    with atomic_path(out / "index.parquet") as tmp:
        index.to_parquet(tmp, index=False)
    atomic_write_text(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in errors))
    views = index[index["view"] > 0] if with_views else index.iloc[:0]
    index = index[index["view"] == 0] if with_views else index
    n_ok = int(index["id"].nunique()) if len(index) else 0
    song_durations = index.drop_duplicates("id")["song_duration_s"] if len(index) else []
    return {
        "songs": n_songs,
        "songs_extracted": n_ok,
        "songs_failed": len(errors),
        "segments": len(index),
        "audio_hours": float(sum(song_durations) / 3600.0),
        "shards": n_shards,
        **({"view_segments": len(views)} if with_views else {}),
    }
