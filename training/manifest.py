"""The song manifest: a documented schema read from CSV, Parquet or JSONL, with column mapping.

Schema (one row per song; names after mapping):

========================  ========  ==========================================================
column                    required  meaning
========================  ========  ==========================================================
``id``                    yes       unique song id (string)
``platform``              yes       source platform, e.g. ``udio`` or ``suno`` (string)
``audio_path``            yes       path of the audio file; relative paths are resolved against
                                    the manifest's directory (or ``audio_root``)
``streams``               yes       stream / play count (integer >= 0)
``likes``                 yes       like / upvote count (integer >= 0)
``created_at``            yes       release time: ISO 8601 date/time or Unix seconds (UTC)
``coherence`` ...         no        the five SongEval aesthetic labels (``coherence``,
``naturalness``                     ``musicality``, ``memorability``, ``clarity``,
                                    ``naturalness``), numbers in [1, 5]; all five or none
========================  ========  ==========================================================

Other columns are kept as they are. ``column_map`` renames source columns to schema names
(``{"id": "song_id", "streams": "play_count"}``), so the Hugging Face datasets' own exports load
without editing. Validation never drops a row silently: every invalid row is excluded with its
row number (1-based, as in the file) and reason, and counted.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apex_reward.config import AESTHETIC_TASKS
from apex_reward.errors import ConfigError, require

logger = logging.getLogger(__name__)


def _shown(value: object) -> str:
    """A table cell for a message: numpy scalars as plain values (-5, not np.int64(-5))."""
    return repr(value.item() if type(value).__module__ == "numpy" else value)


REQUIRED_COLUMNS: tuple[str, ...] = (
    "id",
    "platform",
    "audio_path",
    "streams",
    "likes",
    "created_at",
)
LABEL_COLUMNS: tuple[str, ...] = AESTHETIC_TASKS

__all__ = [
    "REQUIRED_COLUMNS",
    "LABEL_COLUMNS",
    "ManifestReport",
    "read_table",
    "load_manifest",
    "parse_column_map",
]


@dataclass
class ManifestReport:
    """What validation kept and excluded.

    Attributes:
        total_rows: rows in the file.
        valid_rows: rows kept.
        invalid: ``[(row_number, reason), ...]`` for every excluded row (1-based file rows).
        has_labels: whether the aesthetic label columns are present.
        invalid_ids: ``{row_number: id}`` for the excluded rows that have an id.
    """

    total_rows: int
    valid_rows: int
    invalid: list[tuple[int, str]] = field(default_factory=list)
    has_labels: bool = False
    invalid_ids: dict[int, str] = field(default_factory=dict)

    @property
    def invalid_by_reason(self) -> dict[str, int]:
        return dict(Counter(reason.split(":")[0] for _, reason in self.invalid))

    def to_dict(self) -> dict[str, Any]:
        return {
            "total_rows": self.total_rows,
            "valid_rows": self.valid_rows,
            "invalid_rows": len(self.invalid),
            "invalid_by_reason": self.invalid_by_reason,
            "has_labels": self.has_labels,
        }


def parse_column_map(spec: str | dict[str, str] | None) -> dict[str, str]:
    """``"id=song_id,streams=play_count"`` or a JSON object string or dict -> ``{schema: source}``."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        mapping = dict(spec)
    else:
        text = spec.strip()
        if text.startswith("{"):
            try:
                mapping = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"column map: invalid JSON {text!r}: {e}") from e
        else:
            mapping = {}
            for part in text.split(","):
                if "=" not in part:
                    raise ConfigError(
                        f"column map: expected schema=source pairs separated by commas, got {part!r}"
                    )
                k, v = part.split("=", 1)
                mapping[k.strip()] = v.strip()
    allowed = set(REQUIRED_COLUMNS) | set(LABEL_COLUMNS)
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise ConfigError(
            f"column map: unknown schema column(s) {unknown}; expected {sorted(allowed)}"
        )
    return {str(k): str(v) for k, v in mapping.items()}


def read_table(path: str | Path):
    """Read a CSV, Parquet or JSONL (``.jsonl``/``.ndjson``/``.json`` lines) file into a DataFrame.

    Malformed JSON lines are not fatal: they become rows whose ``__parse_error__`` column holds the
    reason, so validation reports them with their line numbers.
    """
    pd = require("pandas", "train", "reading manifests")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(p)
        if suffix in (".csv", ".tsv"):
            return pd.read_csv(
                p, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
            )
        if suffix in (".jsonl", ".ndjson", ".json"):
            rows: list[dict[str, Any]] = []
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if not line.strip():
                        rows.append({"__parse_error__": "empty line"})
                        continue
                    try:
                        obj = json.loads(line)
                        if not isinstance(obj, dict):
                            raise ValueError("not a JSON object")
                        rows.append(obj)
                    except ValueError as e:
                        rows.append({"__parse_error__": f"malformed JSON ({e})"})
            return pd.DataFrame(rows)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read manifest {str(p)!r}: {e}") from e
    raise ConfigError(
        f"manifest {str(p)!r}: unsupported format {suffix!r}; use .csv, .parquet or .jsonl"
    )


def _parse_time(values):
    """Series of ISO strings / Unix seconds -> UTC datetimes (NaT when unparsable)."""
    pd = require("pandas", "train")
    num = pd.to_numeric(values, errors="coerce")
    as_unix = pd.to_datetime(num, unit="s", utc=True, errors="coerce")
    as_text = pd.to_datetime(values.where(num.isna()), utc=True, errors="coerce", format="mixed")
    return as_unix.fillna(as_text)


def load_manifest(
    path: str | Path,
    *,
    column_map: str | dict[str, str] | None = None,
    audio_root: str | Path | None = None,
):
    """Read and validate a manifest.

    Returns:
        ``(df, report)``: the valid rows with schema columns typed (``streams``/``likes`` int64,
        ``created_at`` UTC datetime, labels float64, ``audio_path`` absolute), the file's row
        number in ``row``, and a :class:`ManifestReport` listing every excluded row and why.
    """
    pd = require("pandas", "train")
    np = require("numpy", "train")
    p = Path(path)
    raw = read_table(p)
    mapping = parse_column_map(column_map)
    rename = {src: dst for dst, src in mapping.items()}
    missing_src = sorted(src for src in rename if src not in raw.columns)
    if missing_src:
        raise ConfigError(
            f"{p}: mapped column(s) {missing_src} not in the file; columns are {list(raw.columns)}"
        )
    df = raw.rename(columns=rename).copy()
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(
            f"{p}: missing required column(s) {missing}; found {list(raw.columns)}. "
            "Map your columns with --columns schema=source,... (see the manifest schema)"
        )
    n = len(df)
    df["row"] = np.arange(1, n + 1) + (1 if p.suffix.lower() in (".csv", ".tsv") else 0)
    reasons = pd.Series([None] * n, index=df.index, dtype=object)

    def flag(mask, reason_fn) -> None:
        mask = mask & reasons.isna()
        for idx in df.index[mask]:
            reasons[idx] = reason_fn(idx)

    if "__parse_error__" in df.columns:
        err = df["__parse_error__"]
        flag(
            err.notna() & (err.astype(str) != "nan"),
            lambda i: f"parse error: {df.at[i, '__parse_error__']}",
        )

    def text(col):
        s = df[col]
        return s.where(s.notna(), "").astype(str).str.strip()

    for col in ("id", "platform", "audio_path"):
        flag(text(col).isin(["", "nan", "None"]), lambda i, c=col: f"missing {c}")
    counts = {}
    for col in ("streams", "likes"):
        v = pd.to_numeric(df[col], errors="coerce")
        flag(v.isna(), lambda i, c=col: f"bad {c}: {_shown(df.at[i, c])} is not a number")
        flag(v < 0, lambda i, c=col: f"bad {c}: {_shown(df.at[i, c])} is negative")
        flag(
            v.notna() & (v != v.round()),
            lambda i, c=col: f"bad {c}: {_shown(df.at[i, c])} is not a whole number",
        )
        counts[col] = v
    created = _parse_time(df["created_at"])
    flag(
        created.isna(), lambda i: f"bad created_at: {_shown(df.at[i, 'created_at'])} is not a date"
    )
    present = [c for c in LABEL_COLUMNS if c in df.columns]
    if present and len(present) != len(LABEL_COLUMNS):
        raise ConfigError(
            f"{p}: has aesthetic label column(s) {present} but not all five {list(LABEL_COLUMNS)}"
        )
    labels = {}
    for col in present:
        v = pd.to_numeric(df[col], errors="coerce")
        flag(v.isna(), lambda i, c=col: f"bad {c}: {_shown(df.at[i, c])} is not a number")
        flag(
            (v < 1) | (v > 5), lambda i, c=col: f"bad {c}: {_shown(df.at[i, c])} is outside [1, 5]"
        )
        labels[col] = v
    ok = reasons.isna()
    ids = text("id")
    out = df.loc[ok].copy()
    out["id"] = ids[ok]
    out["platform"] = text("platform")[ok].str.lower()
    # absolute, so that manifests written elsewhere (prepare's output) keep pointing at the files
    root = (Path(audio_root) if audio_root is not None else p.parent).absolute()
    out["audio_path"] = [
        str(q if q.is_absolute() else (root / q)) for q in map(Path, text("audio_path")[ok])
    ]
    for col in ("streams", "likes"):
        out[col] = counts[col][ok].astype("int64")
    out["created_at"] = created[ok]
    for col in present:
        out[col] = labels[col][ok].astype("float64")
    out = out.drop(columns=[c for c in ("__parse_error__",) if c in out.columns]).reset_index(
        drop=True
    )
    report = ManifestReport(
        total_rows=n,
        valid_rows=int(ok.sum()),
        invalid=[(int(df.at[i, "row"]), str(reasons[i])) for i in df.index[~ok]],
        has_labels=bool(present),
        invalid_ids={
            int(df.at[i, "row"]): ids[i] for i in df.index[~ok] if ids[i] not in ("", "nan", "None")
        },
    )
    if report.invalid:
        logger.warning(
            "%s: %d of %d rows invalid (%s)", p, len(report.invalid), n, report.invalid_by_reason
        )
    return out, report
