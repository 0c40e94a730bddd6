"""Hugging Face Hub datasets as data sources: ``hf://owner/name[@revision]``.

``prepare --manifest hf://sleeping-ai/Udio-126K`` and ``arena --battles
hf://music-arena/music-arena-dataset`` resolve the dataset's files through ``huggingface_hub``
(``snapshot_download``: resumable, only the files the mapping's ``allow_patterns`` name, honours
``HF_HUB_OFFLINE``/``HF_HOME``/``HF_TOKEN``) and record the commit they read. For manifests, the
dataset's rows are then streamed (parquet record batches, JSON lines or CSV: a 100 GB dataset never
sits in memory), their columns mapped to the manifest schema by a documented, versioned
:class:`HubDataset` mapping, and embedded audio (a ``datasets`` ``Audio`` struct with ``bytes``)
written out as files, so that the rest of the pipeline reads an ordinary manifest.

The mapping of each dataset is in :data:`HUB_DATASETS`. Where a field could not be checked against
the real data, the mapping says so (``unverified``), a warning names it when it is used, and
``--columns schema=source,...`` overrides it. A mapped column missing from the data is a
:class:`ConfigError` naming the field, the mapping and the columns the data has.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_reward.errors import ConfigError, require
from apex_reward.files import atomic_path, atomic_write_text

logger = logging.getLogger(__name__)

__all__ = [
    "HubDataset",
    "HUB_DATASETS",
    "HubSource",
    "is_hub_uri",
    "parse_hub_uri",
    "resolve_hub_dataset",
    "ingest_hub_manifest",
]

_URI = re.compile(r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class HubDataset:
    """How one Hub dataset maps onto the manifest schema (docs/data.md#hub-datasets).

    Attributes:
        repo_id: the dataset's id on the Hub.
        mapping_version: bumped whenever the mapping changes; recorded in every output.
        allow_patterns: the files to download (globs, as ``snapshot_download`` takes them).
        platform: the ``platform`` value of every row, when the data has no such column.
        columns: manifest field -> dataset column (dotted paths reach into struct columns).
        audio: the column holding the audio: an ``Audio`` struct (``bytes``/``path``) or a path
            relative to the dataset root.
        unverified: fields whose source column is a best guess, not checked against the data.
        licence: the dataset's licence as its card states it.
    """

    repo_id: str
    mapping_version: str
    allow_patterns: tuple[str, ...]
    columns: dict[str, str] = field(default_factory=dict)
    audio: str = "audio"
    platform: str | None = None
    unverified: tuple[str, ...] = ()
    licence: str = "see the dataset card"


#: The datasets the paper uses. Neither song dataset documents its schema on its card, and the
#: Hub's viewer does not render them, so the column names below are unverified guesses: override
#: any of them with ``--columns`` (e.g. ``--columns streams=play_count``).
HUB_DATASETS: dict[str, HubDataset] = {
    d.repo_id.lower(): d
    for d in (
        HubDataset(
            repo_id="sleeping-ai/Udio-126K",
            mapping_version="1",
            allow_patterns=("*.parquet", "**/*.parquet", "*.jsonl", "**/*.jsonl"),
            columns={
                "id": "id",
                "streams": "play_count",
                "likes": "like_count",
                "created_at": "created_at",
            },
            audio="audio",
            platform="udio",
            unverified=("id", "streams", "likes", "created_at", "audio_path"),
            licence="not stated on the card",
        ),
        HubDataset(
            repo_id="sleeping-ai/suno-307K",
            mapping_version="1",
            allow_patterns=("*.parquet", "**/*.parquet", "*.jsonl", "**/*.jsonl"),
            columns={
                "id": "id",
                "streams": "play_count",
                "likes": "upvote_count",
                "created_at": "created_at",
            },
            audio="audio",
            platform="suno",
            unverified=("id", "streams", "likes", "created_at", "audio_path"),
            licence="CC BY-NC-ND 4.0",
        ),
        HubDataset(
            repo_id="music-arena/music-arena-dataset",
            mapping_version="1",
            allow_patterns=("battle_data/**", "audio_files/**", "*.md"),
            licence="see the dataset card (Music Arena's rolling release terms)",
        ),
    )
}


@dataclass(frozen=True)
class HubSource:
    """A resolved Hub dataset: where its files are and which commit they are.

    Attributes:
        uri: as given.
        repo_id: the dataset id.
        revision: the revision asked for (None = the default branch).
        commit: the commit the files came from (the pin to record and reuse).
        path: the local snapshot folder.
        mapping: the dataset's mapping, when it has one.
    """

    uri: str
    repo_id: str
    revision: str | None
    commit: str
    path: Path
    mapping: HubDataset | None

    def provenance(self) -> dict[str, Any]:
        """What an output records about its source (JSON-ready)."""
        m = self.mapping
        return {
            "uri": self.uri,
            "repo_id": self.repo_id,
            "revision_requested": self.revision,
            "commit": self.commit,
            "mapping_version": m.mapping_version if m else None,
            "unverified_fields": list(m.unverified) if m else [],
            "licence": m.licence if m else None,
        }


def is_hub_uri(value: str | None) -> bool:
    """Whether ``value`` names a Hub dataset (``hf://...``)."""
    return isinstance(value, str) and value.startswith("hf://")


def parse_hub_uri(uri: str) -> tuple[str, str | None]:
    """``hf://owner/name[@revision]`` -> ``(repo_id, revision or None)``.

    Raises:
        ConfigError: not of that form.
    """
    m = _URI.match(uri)
    if not m:
        raise ConfigError(
            f"{uri!r} is not a Hub dataset reference; expected hf://owner/name or "
            "hf://owner/name@revision"
        )
    return m.group("repo"), m.group("rev")


def resolve_hub_dataset(
    uri: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> HubSource:
    """Download (or find in the cache) the files of the dataset ``uri`` names.

    Args:
        uri: ``hf://owner/name[@revision]``.
        revision: overrides the revision in ``uri``.
        cache_dir: the Hub cache (default: ``HF_HOME``'s).
        token: a Hub token (default: the logged-in one, ``HF_TOKEN``).
        allow_patterns: the files to fetch (default: the mapping's, else everything).

    Raises:
        ConfigError: a malformed uri, or the dataset/revision/files cannot be had (offline
            without a cached copy, unknown repo, no access) — the message says which.
    """
    hub = require("huggingface_hub", "train", "Hub datasets")
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, rev = parse_hub_uri(uri)
    rev = revision or rev
    mapping = HUB_DATASETS.get(repo_id.lower())
    patterns = allow_patterns or (list(mapping.allow_patterns) if mapping else None)
    try:
        path = hub.snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=rev,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=patterns,
        )
    except GatedRepoError as e:
        raise ConfigError(
            f"{uri}: the dataset is gated; accept its terms on the Hub and log in"
        ) from e
    except RepositoryNotFoundError as e:
        raise ConfigError(f"{uri}: no such dataset on the Hub (or no access to it)") from e
    except RevisionNotFoundError as e:
        raise ConfigError(f"{uri}: revision {rev!r} not found") from e
    except LocalEntryNotFoundError as e:
        raise ConfigError(
            f"{uri}: not in the local Hub cache and downloading is off (HF_HUB_OFFLINE); "
            "download it once online or point HF_HOME at a cache that has it"
        ) from e
    except EntryNotFoundError as e:
        raise ConfigError(f"{uri}: {e}") from e
    path = Path(path)
    return HubSource(uri, repo_id, rev, path.name, path, mapping)


# ----------------------------------------------------------------------------------------------
# manifests from Hub datasets


def _data_files(root: Path) -> list[Path]:
    files = sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in (".parquet", ".jsonl", ".ndjson", ".csv")
    )
    if not files:
        raise ConfigError(f"{root}: the dataset snapshot holds no parquet, JSON-lines or CSV files")
    return files


def _iter_rows(path: Path, columns: list[str]) -> Iterator[dict[str, Any]]:
    """Rows of one data file, reading only the top-level ``columns`` it needs."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        pq = require("pyarrow.parquet", "train", "reading Hub datasets")
        f = pq.ParquetFile(path)
        have = set(f.schema_arrow.names)
        wanted = [c for c in columns if c in have]
        for batch in f.iter_batches(batch_size=32, columns=wanted):
            yield from batch.to_pylist()
    elif suffix in (".jsonl", ".ndjson"):
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{n}: not JSON ({e.msg})") from e
    else:
        import csv

        with open(path, encoding="utf-8", newline="") as fh:
            yield from csv.DictReader(fh)


def _columns_of(path: Path) -> list[str]:
    if path.suffix.lower() == ".parquet":
        pq = require("pyarrow.parquet", "train", "reading Hub datasets")
        return list(pq.ParquetFile(path).schema_arrow.names)
    first = next(_iter_rows(path, []), {})
    return list(first)


def _get(row: dict[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def _audio_file(value: Any, sid: str, root: Path, audio_dir: Path) -> str:
    """The audio of one row as a file path: embedded bytes are written out once."""
    if isinstance(value, dict) and value.get("bytes"):
        name = Path(str(value.get("path") or "")).suffix.lower() or ".bin"
        safe = re.sub(r"[^\w.-]", "_", sid)[:120] or "song"
        target = audio_dir / f"{safe}{name}"
        data = value["bytes"]
        if not (target.is_file() and target.stat().st_size == len(data)):
            with atomic_path(target) as tmp:
                tmp.write_bytes(data)
        return str(target)
    if isinstance(value, dict):
        value = value.get("path")
    if isinstance(value, str) and value:
        if re.match(r"^[a-z]+://", value):
            raise ConfigError(
                f"song {sid!r}: its audio is a URL ({value[:60]}…); only audio stored in the "
                "dataset (embedded bytes or a file of the repository) can be ingested"
            )
        p = Path(value)
        return str(p if p.is_absolute() else root / p)
    raise ConfigError(f"song {sid!r}: no audio in the row (got {type(value).__name__})")


@dataclass
class IngestedManifest:
    """The result of :func:`ingest_hub_manifest`."""

    manifest: Path
    source: HubSource
    rows: int
    audio_written: int

    def provenance(self) -> dict[str, Any]:
        return {**self.source.provenance(), "rows": self.rows, "manifest": str(self.manifest)}


def ingest_hub_manifest(
    uri: str,
    out: str | Path,
    *,
    columns: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> IngestedManifest:
    """A manifest (``out/manifest.parquet``) and audio files (``out/audio/``) from a Hub dataset.

    Args:
        uri: ``hf://owner/name[@revision]``; the dataset needs a mapping in
            :data:`HUB_DATASETS` unless ``columns`` maps every required field.
        out: output folder; audio already written there is reused.
        columns: ``schema=source,...`` overriding the mapping (``audio_path=`` names the audio
            column, ``platform=`` a column holding the platform).

    Raises:
        ConfigError: no mapping and no complete ``columns``; a mapped column missing from the data
            (names the field, the mapping and the columns the data has); audio given as URLs.
    """
    from .manifest import REQUIRED_COLUMNS, parse_column_map

    pd = require("pandas", "train", "reading Hub datasets")
    source = resolve_hub_dataset(uri, revision=revision, cache_dir=cache_dir, token=token)
    m = source.mapping
    mapping = dict(m.columns) if m else {}
    audio_col = m.audio if m else None
    platform = m.platform if m else None
    override = parse_column_map(columns)
    if "audio_path" in override:
        audio_col = override.pop("audio_path")
    mapping.update(override)
    if "platform" in mapping:
        platform = None
    needed = [c for c in REQUIRED_COLUMNS if c not in ("audio_path", "platform")]
    missing = [c for c in needed if c not in mapping]
    if audio_col is None:
        missing.append("audio_path")
    if platform is None and "platform" not in mapping:
        missing.append("platform")
    where = f"mapping {source.repo_id} v{m.mapping_version}" if m else "--columns"
    if missing:
        raise ConfigError(
            f"{uri}: no source column for {missing} ({where}); give them with --columns "
            "schema=source,..."
        )
    guessed = [f for f in (m.unverified if m else ()) if f not in override]
    if guessed:
        logger.warning(
            "%s: the columns for %s are unverified guesses of mapping v%s; check them against the "
            "data and override with --columns if they differ",
            source.repo_id,
            guessed,
            m.mapping_version,
        )
    from .manifest import LABEL_COLUMNS

    files = _data_files(source.path)
    out = Path(out)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    top = sorted({c.split(".")[0] for c in [*mapping.values(), audio_col]})
    records: list[dict[str, Any]] = []
    written_before = sum(1 for _ in audio_dir.iterdir())
    for path in files:
        have = _columns_of(path)
        absent = [
            (f, col)
            for f, col in [*mapping.items(), ("audio_path", audio_col)]
            if col.split(".")[0] not in have
        ]
        if absent:
            f, col = absent[0]
            raise ConfigError(
                f"{source.repo_id}: {path.relative_to(source.path)} has no column {col!r} for "
                f"the manifest field {f!r} ({where}); its columns are {have[:20]}; fix it with "
                f"--columns {f}=<column>"
            )
        for row in _iter_rows(path, top):
            rec: dict[str, Any] = {}
            for f, col in mapping.items():
                try:
                    rec[f] = _get(row, col)
                except KeyError:
                    rec[f] = None
            sid = str(rec.get("id"))
            rec["audio_path"] = _audio_file(_get(row, audio_col), sid, source.path, audio_dir)
            if platform is not None:
                rec["platform"] = platform
            records.append(rec)
    order = [*REQUIRED_COLUMNS, *[c for c in LABEL_COLUMNS if c in mapping]]
    table = pd.DataFrame.from_records(records)
    table = table[
        [c for c in order if c in table.columns] + [c for c in table.columns if c not in order]
    ]
    manifest = out / "manifest.parquet"
    with atomic_path(manifest) as tmp:
        table.astype({c: str for c in ("id", "audio_path")}).to_parquet(tmp, index=False)
    result = IngestedManifest(
        manifest, source, len(table), sum(1 for _ in audio_dir.iterdir()) - written_before
    )
    atomic_write_text(out / "source.json", json.dumps(result.provenance(), indent=2) + "\n")
    return result
