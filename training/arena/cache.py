"""Score every distinct audio once: a persistent cache keyed by content hash and model fingerprint.

A battle set shares clips (the same song appears in several battles) and an evaluation is re-run
with other classifiers, filters or date windows; the model should see each audio content once,
ever. :func:`score_audio_files` hashes every file (SHA-256 of its bytes), looks the hashes up in a
SQLite cache under the model's fingerprint, scores only the misses (batched, via
``model.score``) and stores them. Two paths with identical bytes count as one content.

The **model fingerprint** is a SHA-256 over everything that changes a score: the tensors of the
heads and of the encoder (as loaded, so an ``--encoder`` override or a bf16 cast gives a new
fingerprint) and the front-end, encoder and head configuration. The reward weights and the
preference model are not part of it: the cache stores scores, not rewards, so exporting a
preference head leaves every cached score valid.

Decoding failures of a content (``AudioError``) are cached too: they are properties of the bytes.
Other failures (out of memory, ...) are not, so a re-run retries them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from apex_reward.dataclass_io import to_dict
from apex_reward.errors import AudioError, error_class
from apex_reward.files import file_sha256, update_with_tensor

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "CachedScore",
    "ScoreCache",
    "ScoringStats",
    "default_cache_path",
    "model_fingerprint",
    "score_audio_files",
]

#: Bump when what a cached score means changes (e.g. a new score definition).
CACHE_FORMAT = 1


def default_cache_path() -> Path:
    """``$APEX_REWARD_CACHE`` or ``$XDG_CACHE_HOME/apex-reward`` (``~/.cache/apex-reward``) +
    ``/scores.sqlite``."""
    import os

    root = os.environ.get("APEX_REWARD_CACHE")
    if root:
        return Path(root).expanduser() / "scores.sqlite"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "apex-reward" / "scores.sqlite"


def model_fingerprint(model: ApexRewardModel) -> str:
    """SHA-256 identifying the scores ``model`` produces (weights as loaded + scoring config).

    Costs one pass over the weights (about a second per GB).
    """
    h = hashlib.sha256()
    cfg = model.config
    meta = {
        "cache_format": CACHE_FORMAT,
        "frontend": to_dict(cfg.frontend),
        "encoder": {"hubert": cfg.encoder.hubert, "layers": list(cfg.encoder.layers)},
        "head": to_dict(cfg.head),
    }
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    for prefix, module in (("head", model.head), ("encoder", model.encoder.model)):
        for name, t in sorted(module.state_dict().items()):
            update_with_tensor(h, f"{prefix}.{name}", t)
    return h.hexdigest()


@dataclass
class CachedScore:
    """Scores of one audio content (or the error it gave)."""

    sha256: str
    scores: dict[str, float] | None
    error: str | None = None
    error_type: str | None = None
    duration_s: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.scores is not None


class ScoreCache:
    """SQLite store ``(model fingerprint, audio sha256) -> scores``. No pickle: JSON values."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = sqlite3.connect(str(self.path), timeout=60)
        self._conn.execute(
            "CREATE TABLE IF NOT EXISTS scores ("
            " model TEXT NOT NULL, sha256 TEXT NOT NULL, scores TEXT, error TEXT,"
            " error_type TEXT, duration_s REAL, created REAL NOT NULL,"
            " PRIMARY KEY (model, sha256))"
        )
        self._conn.commit()

    def get_many(self, model: str, hashes: Iterable[str]) -> dict[str, CachedScore]:
        """The cached entries among ``hashes`` for fingerprint ``model``."""
        out: dict[str, CachedScore] = {}
        hs = list(dict.fromkeys(hashes))
        for i in range(0, len(hs), 500):
            chunk = hs[i : i + 500]
            q = (
                "SELECT sha256, scores, error, error_type, duration_s FROM scores "
                f"WHERE model = ? AND sha256 IN ({','.join('?' * len(chunk))})"
            )
            for sha, scores, err, etype, dur in self._conn.execute(q, [model, *chunk]):
                out[sha] = CachedScore(
                    sha, json.loads(scores) if scores is not None else None, err, etype, dur
                )
        return out

    def put_many(self, model: str, entries: Iterable[CachedScore]) -> None:
        rows = [
            (
                model,
                e.sha256,
                json.dumps(e.scores) if e.scores is not None else None,
                e.error,
                e.error_type,
                e.duration_s,
                time.time(),
            )
            for e in entries
        ]
        self._conn.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        self._conn.commit()

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM scores").fetchone()[0])

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> ScoreCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class ScoringStats:
    """Counts of one :func:`score_audio_files` call.

    Attributes:
        files: distinct paths asked for.
        contents: distinct contents among them (by SHA-256).
        cache_hits: contents found in the cache.
        scored: contents run through the model now (cache misses).
        failed: contents without scores (decode or scoring errors, cached or new).
        unreadable_files: paths that could not be read to hash them.
    """

    files: int = 0
    contents: int = 0
    cache_hits: int = 0
    scored: int = 0
    failed: int = 0
    unreadable_files: int = 0
    seconds: float = 0.0
    cache_path: str | None = None
    fingerprint: str = ""
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def _cacheable(error_type: str | None) -> bool:
    """Whether a failure is a property of the audio bytes (an ``AudioError``), worth caching."""
    cls = error_class(error_type)
    return cls is not None and issubclass(cls, AudioError)


def score_audio_files(
    model: ApexRewardModel,
    paths: Sequence[str | Path],
    *,
    cache: ScoreCache | None = None,
    fingerprint: str | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    chunk_files: int = 64,
    progress: bool = False,
) -> tuple[dict[Path, CachedScore], ScoringStats]:
    """Scores of every path, each distinct content run through ``model`` at most once.

    Args:
        model: the reward model (its ``score`` method does the batched, inference-mode work).
        paths: audio files; duplicates and byte-identical files are scored once.
        cache: persistent store; None keeps results for this call only.
        fingerprint: the model's fingerprint (default :func:`model_fingerprint`).
        batch_size: 30 s segments per encoder call.
        num_workers: decoding threads.
        chunk_files: misses are scored and stored in chunks of this many files, so an
            interrupted run keeps what it finished.
        progress: tqdm progress bar over the misses.

    Returns:
        ``({path: CachedScore}, stats)`` with one entry per distinct input path.
    """
    t0 = time.perf_counter()
    fp = fingerprint or model_fingerprint(model)
    stats = ScoringStats(fingerprint=fp, cache_path=str(cache.path) if cache else None)
    unique = list(dict.fromkeys(Path(p) for p in paths))
    stats.files = len(unique)
    out: dict[Path, CachedScore] = {}
    sha_of: dict[Path, str] = {}
    for p in unique:
        try:
            sha_of[p] = file_sha256(p)
        except OSError as e:
            stats.unreadable_files += 1
            reason = e.strerror or str(e)
            out[p] = CachedScore("", None, f"cannot read file: {reason}", "AudioDecodeError")
            stats.errors[str(p)] = out[p].error or ""
    by_sha: dict[str, Path] = {}
    for p, sha in sha_of.items():
        by_sha.setdefault(sha, p)
    stats.contents = len(by_sha)
    known = cache.get_many(fp, by_sha) if cache is not None else {}
    stats.cache_hits = len(known)
    misses = [sha for sha in by_sha if sha not in known]
    bar = None
    if progress and misses:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(misses), unit="file", desc="scoring audio", dynamic_ncols=True)
    try:
        for i in range(0, len(misses), max(1, chunk_files)):
            chunk = misses[i : i + chunk_files]
            results = model.score(
                [by_sha[s] for s in chunk], batch_size=batch_size, num_workers=num_workers
            )
            new = []
            for sha, r in zip(chunk, results):
                entry = CachedScore(
                    sha,
                    dict(r.scores) if r.ok else None,
                    r.error,
                    r.error_type,
                    r.duration_s,
                )
                known[sha] = entry
                if r.ok or _cacheable(r.error_type):
                    new.append(entry)
            stats.scored += len(chunk)
            if cache is not None and new:
                cache.put_many(fp, new)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    for p, sha in sha_of.items():
        out[p] = known[sha]
    failed_shas = {sha for sha, e in known.items() if not e.ok}
    stats.failed = len(failed_shas) + stats.unreadable_files
    for p, e in out.items():
        if not e.ok:
            stats.errors[str(p)] = f"{e.error_type}: {e.error}"
    stats.seconds = time.perf_counter() - t0
    logger.info(
        "scored %d files (%d contents): %d cache hits, %d scored now, %d failed",
        stats.files,
        stats.contents,
        stats.cache_hits,
        stats.scored,
        stats.failed,
    )
    return out, stats
