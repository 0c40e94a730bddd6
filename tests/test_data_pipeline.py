"""Manifests, the synthetic corpus, and `apex-reward prepare`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from apex_reward import ConfigError
from apex_reward.popularity import popularity_scores
from apex_reward.training.manifest import load_manifest
from apex_reward.training.prepare import PrepareConfig, prepare_corpus, score_bins, stratified_split
from apex_reward.training.synthetic import SynthConfig, generate_corpus, load_truth


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = generate_corpus(
        SynthConfig(
            out=str(out),
            num_songs=60,
            min_seconds=1.5,
            max_seconds=3.0,
            seed=7,
            sample_rates=[16000, 22050],
            zero_stream_fraction=0.05,
            recent_fraction=0.05,
            duplicate_id_fraction=0.05,
            duplicate_audio_fraction=0.05,
            unreadable_fraction=0.05,
            invalid_row_fraction=0.05,
        )
    )
    return out, summary


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    src, _ = corpus
    out = tmp_path_factory.mktemp("prepared")
    report = prepare_corpus(
        PrepareConfig(
            manifest=str(src / "manifest.csv"),
            out=str(out),
            snapshot_date="2025-06-01",
            workers=2,
            seed=3,
        )
    )
    return out, report


def test_synthetic_corpus_is_deterministic(tmp_path):
    import soundfile as sf

    def digest(p):
        # Ogg streams carry a random serial number: compare their decoded samples instead
        data = sf.read(p, dtype="float32")[0].tobytes() if p.suffix == ".ogg" else p.read_bytes()
        return hashlib.sha256(data).hexdigest()

    def run(d):
        generate_corpus(
            SynthConfig(out=str(d), num_songs=6, min_seconds=1.0, max_seconds=2.0, seed=11)
        )
        return {
            p.name: digest(p)
            for p in sorted(d.rglob("*"))
            if p.is_file() and p.name != "synth_summary.json"
        }

    a, b = run(tmp_path / "a"), run(tmp_path / "b")
    assert a == b and len(a) >= 8
    truth = load_truth(tmp_path / "a")
    rec = truth["song00000"]
    assert set(rec) >= {"noise", "clipping", "detune", "jitter", "dynamics", "clarity", "coherence"}
    assert 1 <= rec["clarity"] <= 5


def test_labels_follow_quality_parameters(corpus):
    src, _ = corpus
    truth = pd.DataFrame(load_truth(src).values())
    # clarity falls with noise and clipping; musicality with detuning
    assert np.corrcoef(truth["noise"] + truth["clipping"], truth["clarity"])[0, 1] < -0.6
    assert np.corrcoef(truth["detune"], truth["musicality"])[0, 1] < -0.5


def test_manifest_formats_and_column_mapping(tmp_path):
    rows = [
        {
            "song_id": "a",
            "src": "x",
            "file": "a.wav",
            "plays": "10",
            "upvotes": "1",
            "date": "2024-01-02",
        },
        {
            "song_id": "b",
            "src": "Y",
            "file": "/abs/b.wav",
            "plays": "-3",
            "upvotes": "1",
            "date": "2024-01-02",
        },
        {
            "song_id": "c",
            "src": "y",
            "file": "c.wav",
            "plays": "7",
            "upvotes": "2",
            "date": "yesterday",
        },
        {
            "song_id": "",
            "src": "y",
            "file": "d.wav",
            "plays": "7",
            "upvotes": "2",
            "date": "1700000000",
        },
        {
            "song_id": "e",
            "src": "y",
            "file": "e.wav",
            "plays": "2.5",
            "upvotes": "2",
            "date": "1700000000",
        },
        {
            "song_id": "f",
            "src": "y",
            "file": "f.wav",
            "plays": "8",
            "upvotes": "0",
            "date": "1700000000",
        },
    ]
    mapping = "id=song_id,platform=src,audio_path=file,streams=plays,likes=upvotes,created_at=date"
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet", index=False)
    with open(tmp_path / "m.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if i == 2:
                f.write("{not json\n")
    for name, first_row in (("m.csv", 2), ("m.parquet", 1), ("m.jsonl", 1)):
        df, report = load_manifest(tmp_path / name, column_map=mapping)
        assert df["id"].tolist() == ["a", "f"], name
        assert df["audio_path"].tolist() == [str(tmp_path / "a.wav"), str(tmp_path / "f.wav")]
        assert df["streams"].dtype == np.int64 and str(df["created_at"].dt.tz) == "UTC"
        assert df["created_at"].iloc[1] == pd.Timestamp(1700000000, unit="s", tz="UTC")
        reasons = dict(report.invalid)
        off = first_row
        assert "negative" in reasons[off + 1] and "not a date" in reasons[off + 2]
        if name == "m.jsonl":
            assert "malformed JSON" in reasons[4]  # the broken line keeps its line number
            off += 1
        assert reasons[off + 3] == "missing id" and "not a whole number" in reasons[off + 4]
        assert report.valid_rows == 2 and report.total_rows == len(rows) + (name == "m.jsonl")
    with pytest.raises(ConfigError, match="missing required column"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(ConfigError, match="unknown schema column"):
        load_manifest(tmp_path / "m.csv", column_map="song=song_id")


def test_each_filter_removes_exactly_the_injected_defects(corpus, prepared):
    _, summary = corpus
    out, report = prepared
    d, c = summary["defects"], report["counts"]
    assert c["invalid_rows"] == d["invalid_rows"] > 0
    assert c["zero_streams"] == d["zero_streams"] > 0
    assert c["duplicate_id"] == d["duplicate_ids"] > 0
    assert c["recent"] == d["recent"] > 0
    assert c["unreadable"] == d["unreadable"] > 0
    assert c["duplicate_audio"] == d["duplicate_audio"] > 0
    removed = pd.read_csv(out / "removed.csv")
    assert (removed["filter"] == "unreadable").sum() == d["unreadable"]
    assert removed.loc[removed["filter"] == "unreadable", "id"].str.startswith("bad").all()
    prep = pd.read_parquet(out / "prepared.parquet")
    # of each song and its byte-identical copy under a new id, exactly one survives
    dup_removed = set(removed.loc[removed["filter"] == "duplicate_audio", "id"])
    for dup, original in summary["duplicate_audio_of"].items():
        assert (dup in dup_removed) != (original in dup_removed), (dup, original)
    assert prep["id"].is_unique and (prep["streams"] > 0).all() and prep["content_hash"].is_unique
    total_removed = len(removed)
    assert total_removed + len(prep) == c["rows_read"]  # nothing disappears silently
    for f in ("report.md", "report.json", "report.png", "popularity_reference.json"):
        assert (out / f).stat().st_size > 0
    assert "| unreadable |" in (out / "report.md").read_text()


def test_balancing_equalises_platforms_and_keeps_distribution():
    rng = np.random.default_rng(0)
    n_big, n_small = 3000, 1000
    df = pd.DataFrame(
        {
            "id": [f"s{i}" for i in range(n_big + n_small)],
            "platform": ["suno"] * n_big + ["udio"] * n_small,
            "streams": np.r_[rng.lognormal(6, 2, n_big), rng.lognormal(4, 1.5, n_small)].round()
            + 1,
        }
    )
    from apex_reward.training.prepare import balance_platforms

    kept, removed = balance_platforms(df, 10, np.random.default_rng(1))
    assert kept.groupby("platform").size().to_dict() == {"suno": 1000, "udio": 1000}
    assert removed == {"suno": 2000, "udio": 0}
    big = df[df.platform == "suno"]
    before = (
        np.bincount(score_bins(popularity_scores(big["streams"].to_numpy()), 10), minlength=10)
        / n_big
    )
    kept_big = kept[kept.platform == "suno"]
    edges_scores = popularity_scores(big["streams"].to_numpy())
    kept_bins = score_bins(edges_scores, 10)[big.index.get_indexer(kept_big.index)]
    after = np.bincount(kept_bins, minlength=10) / len(kept_big)
    assert np.abs(before - after).max() < 0.005


def test_split_proportions_stratification_and_seed():
    rng = np.random.default_rng(0)
    scores = popularity_scores(rng.lognormal(5, 2, 5000).round() + 1)
    split = stratified_split(scores, [0.85, 0.10, 0.05], 10, np.random.default_rng(42))
    props = np.bincount(split, minlength=3) / len(split)
    assert np.abs(props - [0.85, 0.10, 0.05]).max() < 0.01
    bins = score_bins(scores, 10)
    for b in range(10):
        in_bin = split[bins == b]
        if len(in_bin) > 100:
            p = np.bincount(in_bin, minlength=3) / len(in_bin)
            assert np.abs(p - [0.85, 0.10, 0.05]).max() < 0.02, b
    again = stratified_split(scores, [0.85, 0.10, 0.05], 10, np.random.default_rng(42))
    other = stratified_split(scores, [0.85, 0.10, 0.05], 10, np.random.default_rng(43))
    assert np.array_equal(split, again) and not np.array_equal(split, other)


def test_prepared_split_is_disjoint_and_reproducible(corpus, prepared, tmp_path):
    src, _ = corpus
    out, report = prepared
    prep = pd.read_parquet(out / "prepared.parquet")
    assert set(prep["split"]) == {"train", "test", "val"}
    assert prep.groupby("id")["split"].nunique().max() == 1
    n = len(prep)
    for s, p in zip(("train", "test", "val"), (0.85, 0.10, 0.05)):
        assert abs((prep["split"] == s).sum() - p * n) <= 1.0 + 1e-9
    assert prep.groupby("platform").size().nunique() == 1  # balanced
    np.testing.assert_allclose(prep["streams_score"], popularity_scores(prep["streams"]))
    again = prepare_corpus(
        PrepareConfig(
            manifest=str(src / "manifest.csv"),
            out=str(tmp_path / "again"),
            snapshot_date="2025-06-01",
            workers=1,
            seed=3,
        )
    )
    prep2 = pd.read_parquet(tmp_path / "again" / "prepared.parquet")
    pd.testing.assert_frame_equal(prep, prep2)
    assert again["counts"] == report["counts"]


@pytest.mark.parametrize("failing", ["parquet", "plot"])
def test_failed_prepare_leaves_previous_outputs_intact(
    corpus, prepared, tmp_path, monkeypatch, failing
):
    """prepare used to write its outputs in place, one after the other: a failure halfway
    (simulated: the disk fills up while the Parquet file or the plot, the last output, is being
    written) left a truncated prepared.parquet, or a new one beside the previous run's reports.
    Now the previous outputs stay byte for byte, and no temporary file is left behind."""
    import shutil

    import matplotlib.figure

    src, _ = corpus
    out = tmp_path / "prepared"
    shutil.copytree(prepared[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(before) == {
        "prepared.parquet",
        "popularity_reference.json",
        "removed.csv",
        "report.json",
        "report.md",
        "report.png",
    }
    cls, method = (
        (pd.DataFrame, "to_parquet")
        if failing == "parquet"
        else (matplotlib.figure.Figure, "savefig")
    )
    real = getattr(cls, method)

    def half_then_disk_full(self, path, *args, **kwargs):
        real(self, path, *args, **kwargs)
        data = Path(path).read_bytes()
        Path(path).write_bytes(data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cls, method, half_then_disk_full)
    config = PrepareConfig(
        manifest=str(src / "manifest.csv"),
        out=str(out),
        snapshot_date="2025-06-01",
        workers=2,
        seed=4,  # another split than the previous run's: the outputs would differ
    )
    with pytest.raises(OSError, match="No space left"):
        prepare_corpus(config)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    pd.read_parquet(out / "prepared.parquet")  # still readable

    monkeypatch.setattr(cls, method, real)
    prepare_corpus(config)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(after) == set(before)
    assert after["prepared.parquet"] != before["prepared.parquet"]  # the new run replaced it


def test_os_error_on_one_file_is_recorded_and_the_job_goes_on(corpus, prepared, tmp_path):
    """An OSError while probing one file (here a real one: a file name longer than the file
    system allows) used to escape check_audio and abort prepare; it is now one removed song with
    its reason, in both audio_check modes."""
    from apex_reward.training.prepare import check_audio

    too_long = str(tmp_path / ("x" * 300 + ".flac"))
    for mode in ("decode", "header"):
        result = check_audio(too_long, mode, 1.0, 60.0)
        assert not result["ok"] and "File name too long" in result["reason"], (mode, result)

    src, _ = corpus
    prepared_dir, report = prepared
    victim = pd.read_parquet(prepared_dir / "prepared.parquet")["id"].iloc[0]
    manifest = pd.read_csv(src / "manifest.csv")
    first = manifest.index[manifest["id"] == victim][0]  # later rows are duplicate ids
    manifest.loc[first, "audio_path"] = too_long
    manifest.to_csv(tmp_path / "manifest.csv", index=False)
    out = tmp_path / "out"
    again = prepare_corpus(  # as the `prepared` fixture, but for that one file
        PrepareConfig(
            manifest=str(tmp_path / "manifest.csv"),
            audio_root=str(src),
            out=str(out),
            snapshot_date="2025-06-01",
            workers=2,
            seed=3,
        )
    )
    assert again["counts"]["unreadable"] == report["counts"]["unreadable"] + 1
    removed = pd.read_csv(out / "removed.csv")
    row = removed[(removed["id"] == victim) & (removed["filter"] == "unreadable")]
    assert row["reason"].tolist() == ["cannot open: File name too long"]
    assert victim not in set(pd.read_parquet(out / "prepared.parquet")["id"])


def test_relative_manifest_paths_become_absolute(tmp_path, monkeypatch):
    """A manifest named by a relative path (the demo's default `runs/demo/...`) yields absolute
    audio paths, so a manifest written elsewhere from them (prepare's output, which extraction
    resolves against its own directory) still points at the files."""
    (tmp_path / "corpus" / "audio").mkdir(parents=True)
    pd.DataFrame(
        [
            {
                "id": "a",
                "platform": "x",
                "audio_path": "audio/a.wav",
                "streams": 1,
                "likes": 1,
                "created_at": "2024-01-02",
            }
        ]
    ).to_csv(tmp_path / "corpus" / "manifest.csv", index=False)
    monkeypatch.chdir(tmp_path)
    df, _ = load_manifest("corpus/manifest.csv")
    assert df["audio_path"].tolist() == [str(tmp_path / "corpus" / "audio" / "a.wav")]


def test_invalid_row_reasons_show_plain_values(tmp_path):
    """removed.csv and the report say `-5`, not `np.int64(-5)` (typed parquet columns)."""
    rows = [
        {
            "id": "a",
            "platform": "x",
            "audio_path": "a.wav",
            "streams": -5,
            "likes": 3,
            "created_at": "2024-01-01",
        },
        {
            "id": "b",
            "platform": "x",
            "audio_path": "b.wav",
            "streams": 5,
            "likes": 3.5,
            "created_at": "2024-01-01",
        },
    ]
    pd.DataFrame(rows).to_parquet(tmp_path / "m.parquet", index=False)
    _, report = load_manifest(tmp_path / "m.parquet")
    assert report.invalid == [
        (1, "bad streams: -5 is negative"),
        (2, "bad likes: 3.5 is not a whole number"),
    ]
