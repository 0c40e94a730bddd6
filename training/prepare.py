"""Corpus preparation (docs/data.md#preparation): filters, platform balancing, popularity scores, split.

``apex-reward prepare --manifest songs.csv --out runs/prepared --snapshot-date 2024-11-01``

1. **Validation** of the manifest (:mod:`apex_reward.training.manifest`): invalid rows are
   excluded with row number and reason.
2. **Filters**, in this order, each counted and every removed song listed with its reason in
   ``removed.csv``: zero streams; duplicate ids (the first row is kept); releases within
   ``recency_days`` of the snapshot date; unreadable audio (decoded in parallel threads; also
   non-finite, too short or too long); duplicate audio content (same decoded samples, or the same
   bytes with ``audio_check=header``; the first is kept).
3. **Balancing**: every platform is subsampled to the size of the smallest one, stratified by
   streams-score bins computed within the platform, so each keeps its score distribution.
4. **Popularity scores** (§3) of the final set, and its reference quantiles
   (``popularity_reference.json``, stored later in model checkpoints).
5. **Split** train/test/val 85/10/5, stratified by streams-score bins: songs are ordered by bin
   (random order within a bin) and dealt to the split furthest behind its quota, so the overall
   proportions are exact to one song and each bin is split in the same proportions.

Outputs in ``--out``: ``prepared.parquet``, ``popularity_reference.json``, ``report.md``,
``report.json``, ``report.png`` (score histograms per split and platform), ``removed.csv``; each
is written to a temporary file and all are renamed into place together at the end, so a failed
run leaves a previous run's outputs intact. Deterministic given the inputs and ``--seed``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apex_reward.cli import Command
from apex_reward.config import AESTHETIC_TASKS
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args, to_dict
from apex_reward.errors import ApexError, ConfigError, require
from apex_reward.files import atomic_path, file_sha256
from apex_reward.popularity import PopularityReference, popularity_scores

from .hub_data import ingest_hub_manifest, is_hub_uri, parse_hub_uri
from .manifest import REQUIRED_COLUMNS, ManifestReport, load_manifest

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "test", "val")

__all__ = [
    "PrepareConfig",
    "prepare_corpus",
    "check_audio",
    "stratified_split",
    "balance_platforms",
    "score_bins",
]


@dataclass
class PrepareConfig:
    """Options of ``apex-reward prepare``."""

    manifest: str = field(
        default="",
        metadata={
            "help": "manifest file (CSV, Parquet or JSONL), or a Hub dataset hf://owner/name[@rev] "
            "(see docs/data.md#hub-datasets)"
        },
    )
    out: str = field(default="runs/prepared", metadata={"help": "output directory"})
    columns: str | None = field(
        default=None,
        metadata={"help": "column mapping schema=source,... (e.g. id=song_id,streams=play_count)"},
    )
    add_manifests: list[str] = field(
        default_factory=list,
        metadata={
            "help": "more manifests or hf:// datasets, combined with --manifest before filtering "
            "(platforms are balanced across all; --columns applies to each)"
        },
    )
    audio_root: str | None = field(
        default=None,
        metadata={"help": "resolve relative audio paths here (default: the manifest's directory)"},
    )
    snapshot_date: str | None = field(
        default=None,
        metadata={"help": "dataset snapshot date, YYYY-MM-DD (default: the latest created_at)"},
    )
    recency_days: float = field(
        default=14.0,
        metadata={"help": "drop songs released this many days before the snapshot or later"},
    )
    audio_check: Literal["decode", "header"] = field(
        default="decode",
        metadata={
            "help": "decode every file (catches truncation; hashes samples) or read headers only"
        },
    )
    workers: int = field(default=4, metadata={"help": "threads checking audio in parallel"})
    min_duration_s: float = field(
        default=1.0, metadata={"help": "shorter audio counts as unreadable"}
    )
    max_duration_s: float = field(
        default=1800.0, metadata={"help": "longer audio counts as unreadable"}
    )
    balance: bool = field(
        default=True, metadata={"help": "subsample platforms to the smallest one's size"}
    )
    bins: int = field(default=10, metadata={"help": "streams-score bins for stratification"})
    split: list[float] = field(
        default_factory=lambda: [0.85, 0.10, 0.05], metadata={"help": "train, test, val fractions"}
    )
    seed: int = field(default=0, metadata={"help": "random seed"})

    def __post_init__(self) -> None:
        if (
            len(self.split) != 3
            or any(p < 0 for p in self.split)
            or abs(sum(self.split) - 1) > 1e-6
        ):
            raise ConfigError(f"split: expected three fractions summing to 1, got {self.split}")
        if self.bins < 1:
            raise ConfigError(f"bins: must be >= 1, got {self.bins}")


def check_audio(path: str, mode: str, min_s: float, max_s: float) -> dict[str, Any]:
    """Check one audio file. Returns ``{"ok", "reason", "duration_s", "sample_rate",
    "channels", "content_hash"}``.

    Never raises for a bad file: unreadable, truncated, non-finite, too short or too long audio,
    and operating-system errors on the file (permission denied, a name too long, an I/O error)
    give ``ok=False`` with the reason, so one file cannot stop a corpus-wide job.
    """
    import soundfile as sf

    from apex_reward.audio import load_audio

    try:
        if mode == "header":
            p = Path(path)
            if not p.is_file() or p.stat().st_size == 0:
                raise ApexError("file missing or empty")
            try:
                info = sf.info(path)
            except Exception as e:
                raise ApexError(f"not a readable audio file ({e})") from e
            duration, sr, ch = info.frames / max(1, info.samplerate), info.samplerate, info.channels
            digest = file_sha256(p)
        else:
            wav, sr = load_audio(path, max_duration_s=max_s)
            if not bool(np.isfinite(wav.numpy()).all()):
                raise ApexError("audio contains NaN or infinite samples")
            duration, ch = wav.shape[-1] / sr, wav.shape[0]
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(wav.numpy()).tobytes())
            digest = h.hexdigest()
        if duration < min_s:
            raise ApexError(f"audio is {duration:.3g} s long; the minimum is {min_s:g} s")
        if duration > max_s:
            raise ApexError(f"audio is {duration:.1f} s long; the limit is {max_s:g} s")
        return {
            "ok": True,
            "reason": None,
            "duration_s": float(duration),
            "sample_rate": int(sr),
            "channels": int(ch),
            "content_hash": digest,
        }
    except ApexError as e:
        reason = getattr(e, "reason", None) or str(e)
    except OSError as e:  # PermissionError, name too long, I/O error: this file, not the job
        reason = f"cannot read the file: {e.strerror or e} ({type(e).__name__})"
    except Exception as e:  # a decoder crash on one file must not stop the job
        reason = f"{type(e).__name__}: {e}"
    return {
        "ok": False,
        "reason": reason,
        "duration_s": None,
        "sample_rate": None,
        "channels": None,
        "content_hash": None,
    }


def score_bins(scores: np.ndarray, bins: int) -> np.ndarray:
    """Quantile bin (0..bins-1) of each score; ties share a bin. ``[n] -> [n]`` int."""
    if len(scores) == 0:
        return np.zeros(0, dtype=int)
    edges = np.quantile(scores, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, scores, side="right")


def _allocate(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts proportional to ``weights`` summing to ``total`` (largest remainder)."""
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return counts


def balance_platforms(df, bins: int, rng: np.random.Generator):
    """Subsample each platform to the smallest platform's size, stratified by streams-score bins
    computed within the platform. Returns ``(kept_df, removed_counts_by_platform)``."""
    target = int(df.groupby("platform").size().min())
    keep_idx, removed = [], {}
    for platform, group in df.groupby("platform", sort=True):
        if len(group) == target:
            keep_idx.extend(group.index)
            removed[platform] = 0
            continue
        b = score_bins(popularity_scores(group["streams"].to_numpy()), bins)
        sizes = np.bincount(b, minlength=bins).astype(float)
        quota = _allocate(sizes, target)
        for k in range(bins):
            members = group.index[b == k].to_numpy()
            if quota[k]:
                keep_idx.extend(rng.choice(members, size=quota[k], replace=False))
        removed[platform] = len(group) - target
    return df.loc[sorted(keep_idx)], removed


def stratified_split(
    scores: np.ndarray, fractions: list[float], bins: int, rng: np.random.Generator
) -> np.ndarray:
    """Assign each song to a split index (0 train, 1 test, 2 val), stratified by score bins.

    Songs are ordered by bin (random within a bin) and each is dealt to the split whose quota
    ``fraction * (i + 1) - count`` is largest, so totals are exact to one song and every bin is
    split in the same proportions.
    """
    n = len(scores)
    b = score_bins(scores, bins)
    order = np.lexsort((rng.permutation(n), b))
    p = np.asarray(fractions, dtype=float)
    counts = np.zeros(len(p))
    out = np.empty(n, dtype=int)
    for i, idx in enumerate(order):
        s = int(np.argmax(p * (i + 1) - counts))
        out[idx] = s
        counts[s] += 1
    return out


def _read_sources(config: PrepareConfig, out: Path):
    """Every manifest (``--manifest`` and ``--add-manifests``) validated and concatenated.

    A ``hf://`` dataset is first streamed into ``out/hub/<owner>--<name>/`` (manifest + audio).
    Returns ``(songs, report, sources)``; ``sources`` records each one (for a Hub dataset: repo,
    commit, mapping version).
    """
    pd = require("pandas", "train", "apex-reward prepare")
    frames, reports, sources = [], [], []
    for src in [config.manifest, *config.add_manifests]:
        manifest, column_map, record = src, config.columns, {"manifest": src}
        if is_hub_uri(src):
            folder = out / "hub" / parse_hub_uri(src)[0].replace("/", "--")
            ingested = ingest_hub_manifest(src, folder, columns=config.columns)
            manifest, column_map, record = str(ingested.manifest), None, ingested.provenance()
        df, report = load_manifest(manifest, column_map=column_map, audio_root=config.audio_root)
        frames.append(df)
        reports.append(report)
        sources.append(record)
    if len(frames) == 1:
        return frames[0], reports[0], sources
    if len({r.has_labels for r in reports}) > 1:
        raise ConfigError(
            "prepare: some manifests have the five aesthetic label columns and others do not; "
            "label them all (apex-reward label) or drop the labels"
        )
    merged = ManifestReport(
        total_rows=sum(r.total_rows for r in reports),
        valid_rows=sum(r.valid_rows for r in reports),
        invalid=[item for r in reports for item in r.invalid],
        has_labels=reports[0].has_labels,
    )
    songs = pd.concat(
        frames, ignore_index=True
    )  # ids repeated across sources: the duplicate_id filter
    return songs, merged, sources


def prepare_corpus(config: PrepareConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run the whole preparation; writes the outputs and returns the report dict."""
    pd = require("pandas", "train", "apex-reward prepare")
    if not config.manifest:
        raise ConfigError("prepare: --manifest is required")
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    df, mreport, sources = _read_sources(config, out)
    removed: list[dict[str, Any]] = [
        {"id": mreport.invalid_ids.get(row), "row": row, "filter": "invalid_row", "reason": reason}
        for row, reason in mreport.invalid
    ]
    counts: dict[str, Any] = {"rows_read": mreport.total_rows, "invalid_rows": len(mreport.invalid)}

    def drop(mask, name: str, reasons=None) -> None:
        nonlocal df
        hit = df[mask]
        for j, (_, r) in enumerate(hit.iterrows()):
            removed.append(
                {
                    "id": r["id"],
                    "row": int(r["row"]),
                    "filter": name,
                    "reason": reasons[j] if reasons is not None else name.replace("_", " "),
                }
            )
        counts[name] = int(mask.sum())
        df = df[~mask].reset_index(drop=True)

    drop(df["streams"] == 0, "zero_streams")
    drop(df["id"].duplicated(keep="first"), "duplicate_id")
    if df.empty:
        raise ConfigError("prepare: no songs left after the zero-stream and duplicate-id filters")
    snapshot = (
        pd.Timestamp(config.snapshot_date, tz="UTC")
        if config.snapshot_date
        else df["created_at"].max()
    )
    counts["snapshot_date"] = snapshot.isoformat()
    recent = df["created_at"] > snapshot - pd.Timedelta(days=config.recency_days)
    drop(recent, "recent")

    paths = df["audio_path"].tolist()
    checks: list[dict[str, Any]]
    with ThreadPoolExecutor(max_workers=max(1, config.workers)) as pool:
        it = pool.map(
            lambda p: check_audio(
                p, config.audio_check, config.min_duration_s, config.max_duration_s
            ),
            paths,
        )
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, total=len(paths), desc="checking audio", unit="file")
        checks = list(it)
    info = pd.DataFrame(checks, index=df.index)
    bad = ~info["ok"].astype(bool)
    df = pd.concat([df, info.drop(columns=["ok"])], axis=1)
    drop(bad, "unreadable", reasons=info.loc[bad, "reason"].tolist())
    drop(df["content_hash"].duplicated(keep="first"), "duplicate_audio")
    if df.empty:
        raise ConfigError("prepare: no songs left after filtering")

    before = df.groupby("platform").size().to_dict()
    if config.balance and df["platform"].nunique() > 1:
        kept, by_platform = balance_platforms(df, config.bins, rng)
        dropped = df.index.difference(kept.index)
        for _, r in df.loc[dropped].iterrows():
            removed.append(
                {
                    "id": r["id"],
                    "row": int(r["row"]),
                    "filter": "balance",
                    "reason": f"{r['platform']} subsampled to the smallest platform",
                }
            )
        counts["balance"] = by_platform
        df = kept.reset_index(drop=True)
    else:
        counts["balance"] = {}
    counts["platforms_before_balance"] = {k: int(v) for k, v in before.items()}

    df["streams_score"] = popularity_scores(df["streams"].to_numpy())
    df["likes_score"] = popularity_scores(df["likes"].to_numpy())
    reference = PopularityReference.from_counts(
        {"streams": df["streams"].to_numpy(), "likes": df["likes"].to_numpy()}
    )
    split_idx = stratified_split(df["streams_score"].to_numpy(), config.split, config.bins, rng)
    df["split"] = [SPLITS[i] for i in split_idx]
    counts["final"] = len(df)
    counts["splits"] = {s: int((df["split"] == s).sum()) for s in SPLITS}

    columns = [
        *REQUIRED_COLUMNS,
        "streams_score",
        "likes_score",
        *[c for c in AESTHETIC_TASKS if c in df.columns],
        "split",
        "duration_s",
        "sample_rate",
        "channels",
        "content_hash",
        "row",
    ]
    extra = [c for c in df.columns if c not in columns]
    prepared = df[columns + extra]
    report = {
        "config": to_dict(config),
        "sources": sources,
        "manifest": mreport.to_dict(),
        "counts": counts,
        "distributions": _distributions(prepared),
        "audio_hours": float(prepared["duration_s"].sum() / 3600.0),
    }
    # Each output is written to a temporary file in `out`; all are renamed into place only once
    # every one is complete, so a failure (disk full, a plotting error) leaves the previous
    # outputs as they were instead of a truncated file or a mix of two runs.
    with ExitStack() as stack:

        def staged(name: str) -> Path:
            return stack.enter_context(atomic_path(out / name))

        prepared.to_parquet(staged("prepared.parquet"), index=False)
        staged("popularity_reference.json").write_text(
            json.dumps(to_dict(reference.to_config())) + "\n"
        )
        pd.DataFrame(removed, columns=["id", "row", "filter", "reason"]).to_csv(
            staged("removed.csv"), index=False
        )
        staged("report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        staged("report.md").write_text(_report_markdown(report))
        _plot(prepared, staged("report.png"))
    return report


def _distributions(df) -> dict[str, Any]:
    cols = ["streams_score", "likes_score", *[c for c in AESTHETIC_TASKS if c in df.columns]]
    out: dict[str, Any] = {}
    for key, group in [
        *(("split=" + s, g) for s, g in df.groupby("split")),
        *(("platform=" + p, g) for p, g in df.groupby("platform")),
    ]:
        out[key] = {
            c: {
                "n": int(len(group)),
                "mean": float(group[c].mean()),
                "std": float(group[c].std(ddof=0)),
                "p10": float(group[c].quantile(0.1)),
                "median": float(group[c].median()),
                "p90": float(group[c].quantile(0.9)),
            }
            for c in cols
        }
    return out


def _report_markdown(report: dict[str, Any]) -> str:
    c = report["counts"]
    lines = [
        "# Corpus preparation report",
        "",
        f"Snapshot date: {c['snapshot_date']}",
        "",
        "| step | songs removed |",
        "|---|---|",
    ]
    lines.append(f"| invalid manifest rows | {c['invalid_rows']} |")
    for name in ("zero_streams", "duplicate_id", "recent", "unreadable", "duplicate_audio"):
        lines.append(f"| {name.replace('_', ' ')} | {c.get(name, 0)} |")
    for platform, n in c.get("balance", {}).items():
        lines.append(f"| balance: {platform} subsampled | {n} |")
    lines += [
        "",
        f"Rows read: {c['rows_read']}; final corpus: **{c['final']}** songs "
        f"({report['audio_hours']:.2f} h); splits: "
        + ", ".join(f"{k} {v}" for k, v in c["splits"].items()),
        "",
    ]
    lines += [
        "## Score distributions",
        "",
        "| group | score | n | mean | std | p10 | median | p90 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, cols in report["distributions"].items():
        for col, s in cols.items():
            lines.append(
                f"| {group} | {col} | {s['n']} | {s['mean']:.2f} | {s['std']:.2f} | "
                f"{s['p10']:.2f} | {s['median']:.2f} | {s['p90']:.2f} |"
            )
    return "\n".join(lines) + "\n\n![score histograms](report.png)\n"


def _plot(df, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    edges = np.linspace(0, 100, 21)
    for row, col in enumerate(("streams_score", "likes_score")):
        for ax, key in zip(axes[row], ("split", "platform")):
            for name, group in df.groupby(key):
                ax.hist(
                    group[col],
                    bins=edges,
                    density=True,
                    histtype="step",
                    linewidth=1.5,
                    label=str(name),
                )
            ax.set_title(f"{col} by {key}")
            ax.set_xlabel(col)
            ax.legend()
    try:
        fig.tight_layout()
        fig.savefig(path, dpi=90, format="png")
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------------------------
# CLI


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PrepareConfig)


def run_prepare(args: argparse.Namespace) -> int:
    config = dataclass_from_args(PrepareConfig, args)
    report = prepare_corpus(config, progress=True)
    sys.stdout.write((Path(config.out) / "report.md").read_text())
    c = report["counts"]
    sys.stderr.write(f"wrote {config.out}/prepared.parquet: {c['final']} songs {c['splits']}\n")
    return 0


COMMAND = Command(
    "prepare",
    "filter, balance, score and split a manifest",
    add_prepare_arguments,
    run_prepare,
)
