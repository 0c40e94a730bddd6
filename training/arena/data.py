"""Music Arena battles: reading exports, field mapping, the evaluation's filters, and a report of
each (see ``docs/arena.md``).

Formats (those of the Hugging Face dataset ``music-arena/music-arena-dataset``, and flat ones):

* **the dataset directory** as released: ``battle_data/<period>/<battle>.json``, one JSON object
  per battle, and ``audio_files/<period>/<file>`` with the audio. Every ``*.json`` / ``*.jsonl``
  under the directory is read; relative audio paths are resolved against the directory.
* **JSON Lines** (``.jsonl``/``.ndjson``): one battle object per line; a ``.json`` file holding
  one object, a list of objects, or JSON lines.
* **flat tables** (``.parquet``, ``.csv``, ``.tsv``): one battle per row.

Fields (the names of the released battle records; each has aliases, see :data:`FIELD_ALIASES`,
and ``field_map`` maps any of them to another key, dotted paths reaching into nested objects,
e.g. ``{"system_a": "a_metadata.system_key.system_tag"}`` for raw platform logs):

==================  ==============================================================================
``battle_id``       ``battle_uuid`` — unique id (a battle without one gets ``<file>:<line>``)
``date``            ``date`` (ISO 8601) or ``timestamp`` (Unix seconds) — for the date window
``prompt``          the text prompt (kept for reference)
``audio_a/_b``      audio paths; empty when the platform did not release a system's audio
``system_a/_b``     generator names (``system_tag``), used for per-system offsets
``preference``      ``A``, ``B``, ``TIE`` or ``BOTH_BAD`` (also ``model_a``/``model_b``/``tie``)
``is_instrumental`` true/false (``"true"``/``"false"``, 1/0); missing means vocal, as the platform
                    itself treats it
==================  ==============================================================================

Filters, in order, each counted in :class:`BattleLoadReport`: bad records (malformed JSON line,
unknown preference value, missing audio field value types...) are reported with file and line and
skipped; duplicate battle ids; preferences other than A/B (TIE, BOTH_BAD, no vote); the optional
date window; audio not released (empty path); audio file missing on disk (also reported per
battle). Audio that cannot be decoded is removed later, after scoring (``audio_unreadable``).
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from apex_reward.errors import ApexError

logger = logging.getLogger(__name__)

__all__ = [
    "ArenaDataError",
    "Battle",
    "BattleIssue",
    "BattleLoadReport",
    "FIELD_ALIASES",
    "PREFERENCE_VALUES",
    "load_battles",
    "parse_datetime",
]


class ArenaDataError(ApexError, ValueError):
    """Battles that cannot be read at all, or too few battles to evaluate."""


#: Canonical field -> keys tried in order (the first present wins). ``field_map`` entries go first.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "battle_id": ("battle_uuid", "battle_id", "uuid", "id"),
    "date": ("date", "timestamp", "preference_time", "created_at"),
    "prompt": ("prompt", "overall_prompt"),
    "audio_a": ("audio_a", "audio_a_path", "audio_path_a", "a_audio_path"),
    "audio_b": ("audio_b", "audio_b_path", "audio_path_b", "b_audio_path"),
    "system_a": ("system_a", "model_a", "a_metadata.system_key.system_tag"),
    "system_b": ("system_b", "model_b", "b_metadata.system_key.system_tag"),
    "preference": ("preference", "winner", "vote.preference"),
    "is_instrumental": ("is_instrumental", "instrumental", "prompt_detailed.instrumental"),
}

#: Accepted preference spellings (case-insensitive) -> canonical value.
PREFERENCE_VALUES: dict[str, str] = {
    "a": "A",
    "model_a": "A",
    "b": "B",
    "model_b": "B",
    "tie": "TIE",
    "both_bad": "BOTH_BAD",
    "bothbad": "BOTH_BAD",
    "tie (bothbad)": "BOTH_BAD",
}

_TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")


@dataclass
class Battle:
    """One pairwise battle.

    Attributes:
        battle_id: unique id.
        preference: ``"A"``, ``"B"``, ``"TIE"`` or ``"BOTH_BAD"``.
        audio_a, audio_b: resolved audio paths, or None when not released.
        system_a, system_b: generator names, or None.
        is_instrumental: the prompt asked for instrumental music.
        date: when the vote was cast (UTC), or None.
        prompt: the text prompt, or None.
        source: ``file:line`` of the record.
    """

    battle_id: str
    preference: str
    audio_a: Path | None
    audio_b: Path | None
    system_a: str | None = None
    system_b: str | None = None
    is_instrumental: bool = False
    date: datetime | None = None
    prompt: str | None = None
    source: str = ""

    @property
    def label(self) -> int:
        """1 if A was preferred, 0 if B (only meaningful for A/B battles)."""
        return 1 if self.preference == "A" else 0


@dataclass
class BattleIssue:
    """A problem with one record: where it is, which battle, what is wrong, whether it was dropped."""

    source: str
    line: int | None
    battle_id: str | None
    problem: str
    dropped: bool = True

    @classmethod
    def of(cls, battle: Battle, problem: str) -> BattleIssue:
        """An issue of a parsed battle (its ``source`` is ``"file:line"``), dropped."""
        src, _, line = battle.source.rpartition(":")
        return cls(
            src or battle.source, int(line) if line.isdigit() else None, battle.battle_id, problem
        )

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        bid = f" [{self.battle_id}]" if self.battle_id else ""
        return f"{where}{bid}: {self.problem}"


#: Filter names in the order they are applied, with a description for reports.
FILTERS: dict[str, str] = {
    "bad_record": "malformed or invalid records (see issues)",
    "duplicate_id": "duplicate battle id (first kept)",
    "not_a_or_b": "preference is not A or B (TIE, BOTH_BAD, no vote)",
    "outside_date_window": "outside the date window (or no date while a window is set)",
    "audio_not_released": "an audio path is empty (audio not released)",
    "audio_missing": "an audio file does not exist",
    "audio_unreadable": "an audio file could not be decoded or scored",
}


@dataclass
class BattleLoadReport:
    """What loading and filtering did: counts per filter, preference counts, and every issue."""

    inputs: list[str] = field(default_factory=list)
    records: int = 0
    preference_counts: dict[str, int] = field(default_factory=dict)
    removed: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FILTERS})
    issues: list[BattleIssue] = field(default_factory=list)
    instrumental_unknown: int = 0
    date_window: dict[str, str | None] = field(default_factory=dict)
    kept: int = 0

    def add_issue(self, issue: BattleIssue) -> None:
        self.issues.append(issue)
        logger.info("battle record %s", issue)

    def remove(self, name: str, n: int = 1) -> None:
        """Count ``n`` battles removed by filter ``name`` (one of :data:`FILTERS`)."""
        if name not in FILTERS:
            raise KeyError(f"unknown filter {name!r}")
        self.removed[name] += n
        self.kept -= n

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "records": self.records,
            "preference_counts": self.preference_counts,
            "removed": dict(self.removed),
            "kept": self.kept,
            "instrumental_unknown": self.instrumental_unknown,
            "date_window": self.date_window,
            "issues": [
                {
                    "source": i.source,
                    "line": i.line,
                    "battle_id": i.battle_id,
                    "problem": i.problem,
                    "dropped": i.dropped,
                }
                for i in self.issues
            ],
        }

    def to_markdown(self, max_issues: int = 50) -> str:
        """The filter table and the first ``max_issues`` issues as Markdown."""
        lines = [
            f"Records read: {self.records}",
            "",
            "| filter | removed |",
            "|---|---:|",
        ]
        for name, desc in FILTERS.items():
            lines.append(f"| {name}: {desc} | {self.removed[name]} |")
        lines += [f"| **kept** | **{self.kept}** |", ""]
        if self.preference_counts:
            counts = ", ".join(f"{k} {v}" for k, v in sorted(self.preference_counts.items()))
            lines.append(f"Preferences among valid records: {counts}.")
        if self.instrumental_unknown:
            lines.append(
                f"{self.instrumental_unknown} records had no is_instrumental value (taken as vocal)."
            )
        if self.issues:
            lines += ["", f"Issues ({len(self.issues)}):", ""]
            lines += [f"- {i}" for i in self.issues[:max_issues]]
            if len(self.issues) > max_issues:
                lines.append(
                    f"- ... and {len(self.issues) - max_issues} more (see the JSON report)"
                )
        return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# value parsing


def _missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    if isinstance(v, str) and not v.strip():
        return True
    try:  # pandas NA / NaT
        import pandas as pd

        return bool(pd.isna(v)) if not isinstance(v, (list, dict, tuple)) else False
    except (ImportError, TypeError, ValueError):
        return False


def parse_datetime(value: Any) -> datetime | None:
    """ISO 8601 string (``Z`` allowed), Unix seconds (or milliseconds), date or datetime -> UTC.

    Naive values are taken as UTC. Returns None for missing values; raises ``ValueError`` for
    values that are not a date.
    """
    if _missing(value):
        return None
    if hasattr(value, "to_pydatetime"):  # pandas Timestamp
        value = value.to_pydatetime()
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) / (1000.0 if abs(value) > 1e11 else 1.0)
        dt = datetime.fromtimestamp(seconds, tz=timezone.utc)
    elif isinstance(value, str):
        s = value.strip()
        try:
            num = float(s)
        except ValueError:
            if s.endswith(("Z", "z")):
                s = s[:-1] + "+00:00"
            dt = datetime.fromisoformat(s)
        else:
            return parse_datetime(num)
    elif hasattr(value, "isoformat"):  # datetime.date
        dt = datetime.fromisoformat(value.isoformat())
    else:
        raise ValueError(f"not a date: {value!r}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def _parse_bool(value: Any) -> bool | None:
    """True/False from bools, 0/1 and common strings; None for a missing value."""
    if _missing(value):
        return None
    if isinstance(value, bool):
        return value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalar
        value = value.item()
        if isinstance(value, bool):
            return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        s = value.strip().lower()
        if s in ("true", "t", "yes", "y", "1", "1.0", "instrumental"):
            return True
        if s in ("false", "f", "no", "n", "0", "0.0", "vocal"):
            return False
    raise ValueError(f"is_instrumental: {value!r} is not true/false")


def _lookup(record: Mapping[str, Any], key: str) -> Any:
    """``record[key]``; a dotted key reaches into nested objects (a literal key wins)."""
    if key in record:
        return record[key]
    cur: Any = record
    for part in key.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _get(record: Mapping[str, Any], name: str, field_map: Mapping[str, str]) -> Any:
    if name in field_map:
        return _lookup(record, field_map[name])
    for key in FIELD_ALIASES[name]:
        v = _lookup(record, key)
        if not _missing(v):
            return v
    return None


# ----------------------------------------------------------------------------------------------
# reading records


@dataclass
class _Raw:
    source: str
    line: int | None
    record: dict[str, Any] | None
    error: str | None = None
    base: Path | None = None  # directory relative audio paths are resolved against


def _iter_json_lines(path: Path, text: str, base: Path) -> Iterator[_Raw]:
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield _Raw(
                str(path), i, None, f"malformed JSON line ({e.msg} at column {e.colno})", base
            )
            continue
        if not isinstance(obj, dict):
            yield _Raw(
                str(path), i, None, f"expected a JSON object, got {type(obj).__name__}", base
            )
            continue
        yield _Raw(str(path), i, obj, None, base)


def _iter_json_file(path: Path, base: Path) -> Iterator[_Raw]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        yield _Raw(str(path), None, None, f"cannot read file: {e}", base)
        return
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _iter_json_lines(path, text, base)
        return
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) > 1 and all(ln.lstrip().startswith("{") for ln in lines):
            yield from _iter_json_lines(path, text, base)  # JSON lines in a .json file
        else:
            yield _Raw(str(path), e.lineno, None, f"malformed JSON ({e.msg})", base)
        return
    if isinstance(obj, dict):
        yield _Raw(str(path), 1, obj, None, base)
    elif isinstance(obj, list):
        for i, item in enumerate(obj, start=1):
            if isinstance(item, dict):
                yield _Raw(f"{path}[item]", i, item, None, base)
            else:
                yield _Raw(
                    f"{path}[item]", i, None, f"expected an object, got {type(item).__name__}", base
                )
    else:
        yield _Raw(
            str(path), 1, None, f"expected an object or a list, got {type(obj).__name__}", base
        )


def _iter_table(path: Path, base: Path) -> Iterator[_Raw]:
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            df = pd.read_parquet(path)
            first = 1  # row numbers
        else:
            df = pd.read_csv(
                path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False
            )
            first = 2  # line numbers: the header is line 1
    except Exception as e:  # pandas/pyarrow raise many types for unreadable files
        raise ArenaDataError(f"{path}: cannot read table: {type(e).__name__}: {e}") from e
    for i, rec in enumerate(df.to_dict(orient="records")):
        yield _Raw(str(path), i + first, rec, None, base)


def _iter_path(path: Path, base: Path) -> Iterator[_Raw]:
    suffix = path.suffix.lower()
    if suffix in _TABLE_SUFFIXES:
        yield from _iter_table(path, base)
    elif suffix in _JSON_SUFFIXES:
        yield from _iter_json_file(path, base)
    else:
        raise ArenaDataError(
            f"{path}: unknown battle file type {suffix!r}; expected a directory or one of "
            f"{', '.join(_JSON_SUFFIXES + _TABLE_SUFFIXES)}"
        )


def _input_files(path: Path) -> tuple[list[Path], Path]:
    """The battle files to read and the default base directory of relative audio paths."""
    if not path.exists():
        raise ArenaDataError(f"battles {str(path)!r} do not exist")
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in _JSON_SUFFIXES + _TABLE_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise ArenaDataError(f"{path}: no battle files (*.json, *.jsonl, *.parquet, *.csv)")
        return files, path
    return [path], path.parent


# ----------------------------------------------------------------------------------------------
# loading


def _resolve_audio(value: Any, bases: list[Path]) -> Path | None:
    if _missing(value):
        return None
    p = Path(str(value).strip()).expanduser()
    if p.is_absolute():
        return p
    for b in bases:
        if (b / p).exists():
            return b / p
    return bases[0] / p


def _parse_record(
    raw: _Raw,
    field_map: Mapping[str, str],
    audio_root: Path | None,
    report: BattleLoadReport,
) -> Battle | None:
    rec = raw.record
    assert rec is not None
    bid_raw = _get(rec, "battle_id", field_map)
    bid = None if _missing(bid_raw) else str(bid_raw)
    where = f"{raw.source}:{raw.line}" if raw.line is not None else raw.source

    def bad(problem: str) -> None:
        report.add_issue(BattleIssue(raw.source, raw.line, bid, problem))
        report.remove("bad_record")

    pref_raw = _get(rec, "preference", field_map)
    if _missing(pref_raw):
        pref = "NO_VOTE"
    else:
        pref = PREFERENCE_VALUES.get(str(pref_raw).strip().lower(), "")
        if not pref:
            bad(
                f"unknown preference value {pref_raw!r}; expected one of A, B, TIE, BOTH_BAD "
                "(or model_a, model_b, tie)"
            )
            return None
    try:
        inst = _parse_bool(_get(rec, "is_instrumental", field_map))
    except ValueError as e:
        bad(str(e))
        return None
    if inst is None:
        report.instrumental_unknown += 1
        inst = False
    date = None
    date_raw = _get(rec, "date", field_map)
    try:
        date = parse_datetime(date_raw)
    except (ValueError, OverflowError, OSError):
        report.add_issue(
            BattleIssue(raw.source, raw.line, bid, f"unparseable date {date_raw!r}", dropped=False)
        )
    bases: list[Path] = []
    if audio_root is not None:
        bases.append(audio_root)
    if raw.base is not None:
        bases.append(raw.base)
    src_dir = Path(raw.source.removesuffix("[item]")).parent
    bases += [src_dir, *list(src_dir.parents)[:3]]
    audio = {}
    for side in ("audio_a", "audio_b"):
        v = _get(rec, side, field_map)
        if not _missing(v) and not isinstance(v, str):
            bad(f"{side}: expected a path, got {type(v).__name__}")
            return None
        audio[side] = _resolve_audio(v, bases)

    def text(name: str) -> str | None:
        v = _get(rec, name, field_map)
        return None if _missing(v) else str(v)

    return Battle(
        battle_id=bid or where,
        preference=pref,
        audio_a=audio["audio_a"],
        audio_b=audio["audio_b"],
        system_a=text("system_a"),
        system_b=text("system_b"),
        is_instrumental=inst,
        date=date,
        prompt=text("prompt"),
        source=where,
    )


def load_battles(
    path: str | Path,
    *,
    field_map: Mapping[str, str] | None = None,
    audio_root: str | Path | None = None,
    date_from: str | datetime | None = None,
    date_to: str | datetime | None = None,
    last_days: float | None = None,
) -> tuple[list[Battle], BattleLoadReport]:
    """Read battles, apply the filters (:data:`FILTERS`, in order), and report what each removed.

    Args:
        path: the dataset directory, a ``.json``/``.jsonl``/``.parquet``/``.csv``/``.tsv`` file.
        field_map: canonical field (``battle_id``, ``date``, ``prompt``, ``audio_a``,
            ``audio_b``, ``system_a``, ``system_b``, ``preference``, ``is_instrumental``) -> the
            key in the records (dotted for nested objects).
        audio_root: directory relative audio paths are resolved against (default: the dataset
            directory, or the battle file's directory and its parents).
        date_from, date_to: keep battles with ``date_from <= date <= date_to`` (ISO dates or
            datetimes; naive means UTC; a bare date as ``date_to`` includes that whole day).
        last_days: keep battles within this many days of the newest battle (the paper used the
            last 4 months, about 122 days); combined with ``date_from``/``date_to`` if given.

    Returns:
        ``(battles, report)``: A/B battles whose two audio files exist, and the report.

    Raises:
        ArenaDataError: the path does not exist, is of an unknown type, or a table is unreadable.
    """
    fmap = dict(field_map or {})
    unknown = sorted(set(fmap) - set(FIELD_ALIASES))
    if unknown:
        raise ArenaDataError(
            f"field_map: unknown field(s) {unknown}; expected some of {list(FIELD_ALIASES)}"
        )
    root = Path(path).expanduser()
    files, base = _input_files(root)
    aroot = Path(audio_root).expanduser() if audio_root is not None else None
    report = BattleLoadReport(inputs=[str(f) for f in files])

    parsed: list[Battle] = []
    for f in files:
        for raw in _iter_path(f, base):
            report.records += 1
            report.kept += 1
            if raw.record is None:
                report.add_issue(BattleIssue(raw.source, raw.line, None, raw.error or "bad record"))
                report.remove("bad_record")
                continue
            b = _parse_record(raw, fmap, aroot, report)
            if b is not None:
                parsed.append(b)

    # duplicates
    seen: set[str] = set()
    unique = []
    for b in parsed:
        if b.battle_id in seen:
            report.remove("duplicate_id")
            continue
        seen.add(b.battle_id)
        unique.append(b)

    report.preference_counts = dict(Counter(b.preference for b in unique))
    ab = [b for b in unique if b.preference in ("A", "B")]
    report.remove("not_a_or_b", len(unique) - len(ab))

    # date window
    lo = _bound(date_from, end=False)
    hi = _bound(date_to, end=True)
    if last_days is not None:
        dates = [b.date for b in ab if b.date is not None]
        if dates:
            recent = max(dates) - timedelta(days=float(last_days))
            lo = recent if lo is None else max(lo, recent)
    report.date_window = {
        "from": lo.isoformat() if lo else None,
        "to": hi.isoformat() if hi else None,
    }
    if lo is not None or hi is not None:
        in_window = [
            b
            for b in ab
            if b.date is not None and (lo is None or b.date >= lo) and (hi is None or b.date <= hi)
        ]
        report.remove("outside_date_window", len(ab) - len(in_window))
        ab = in_window

    # audio present
    released = [b for b in ab if b.audio_a is not None and b.audio_b is not None]
    report.remove("audio_not_released", len(ab) - len(released))
    present = []
    for b in released:
        missing = [str(p) for p in (b.audio_a, b.audio_b) if p is not None and not p.is_file()]
        if missing:
            report.add_issue(BattleIssue.of(b, "audio file missing: " + ", ".join(missing)))
            report.remove("audio_missing")
            continue
        present.append(b)
    return present, report


def _bound(value: str | datetime | None, *, end: bool) -> datetime | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        dt = parse_datetime(value)
    except ValueError as e:
        raise ArenaDataError(f"date window: {value!r} is not an ISO date or datetime") from e
    assert dt is not None
    if end and isinstance(value, str) and len(value.strip()) == 10:  # a bare date: whole day
        dt = dt + timedelta(days=1) - timedelta(microseconds=1)
    return dt
