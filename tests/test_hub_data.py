"""Hub datasets as sources (``hf://owner/name[@rev]``), offline against a pre-filled Hub cache laid
out as ``huggingface_hub`` lays it out: ``prepare`` streams a song dataset (parquet with embedded
audio) into a manifest and audio files, ``arena`` reads the released battle layout, the commit is
recorded, and a schema change is a ConfigError naming the field and the fix."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from apex_reward import ConfigError
from apex_reward.training.hub_data import (
    HUB_DATASETS,
    ingest_hub_manifest,
    parse_hub_uri,
    resolve_hub_dataset,
)
from apex_reward.training.prepare import PrepareConfig, prepare_corpus

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: snapshot_download may only answer from it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _snapshot(cache, repo_id: str, commit: str = COMMIT):
    """The cache folder of a dataset at ``commit``, with ``refs/main`` pointing at it."""
    repo = cache / f"datasets--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    return snap


def _wav_bytes(seconds: float, freq: float, sr: int = 16000) -> bytes:
    t = np.arange(int(seconds * sr)) / sr
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr, format="WAV")
    return buf.getvalue()


def _udio_rows(n: int, streams_column: str = "play_count", freq0: float = 220) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "id": [f"udio-{i:03d}" for i in range(n)],
            streams_column: rng.integers(1, 5000, n),
            "like_count": rng.integers(0, 300, n),
            "created_at": [f"2025-0{1 + i % 6}-1{i % 9}T12:00:00Z" for i in range(n)],
            "audio": [
                {"bytes": _wav_bytes(1.2 + 0.1 * (i % 4), freq0 + 40 * i), "path": f"udio-{i}.wav"}
                for i in range(n)
            ],
            "lyrics": ["la la"] * n,
        }
    )


def test_uri_parsing():
    assert parse_hub_uri("hf://sleeping-ai/Udio-126K") == ("sleeping-ai/Udio-126K", None)
    assert parse_hub_uri("hf://a/b@v1.0") == ("a/b", "v1.0")
    with pytest.raises(ConfigError, match="hf://owner/name"):
        parse_hub_uri("hf://just-a-name")


def test_prepare_reads_a_hub_song_dataset_and_records_its_commit(hub_cache, tmp_path):
    snap = _snapshot(hub_cache, "sleeping-ai/Udio-126K")
    (snap / "data").mkdir()
    rows = _udio_rows(24)
    rows.iloc[:12].to_parquet(snap / "data" / "train-00000-of-00002.parquet", index=False)
    rows.iloc[12:].to_parquet(snap / "data" / "train-00001-of-00002.parquet", index=False)
    suno = _snapshot(hub_cache, "sleeping-ai/suno-307K", commit="f" * 40)
    suno_rows = _udio_rows(10, freq0=2000).rename(columns={"like_count": "upvote_count"})
    suno_rows["id"] = suno_rows["id"].str.replace("udio", "suno")
    suno_rows.to_parquet(suno / "suno.parquet", index=False)

    out = tmp_path / "prepared"
    report = prepare_corpus(
        PrepareConfig(
            manifest="hf://sleeping-ai/Udio-126K",
            add_manifests=["hf://sleeping-ai/suno-307K@" + "f" * 40],
            out=str(out),
            min_duration_s=1.0,
        )
    )
    source, suno_source = report["sources"]
    assert suno_source["commit"] == "f" * 40 and suno_source["revision_requested"] == "f" * 40
    assert source["commit"] == COMMIT and source["repo_id"] == "sleeping-ai/Udio-126K"
    assert source["mapping_version"] == HUB_DATASETS["sleeping-ai/udio-126k"].mapping_version
    assert "streams" in source["unverified_fields"] and source["rows"] == 24
    manifest = pd.read_parquet(out / "hub" / "sleeping-ai--Udio-126K" / "manifest.parquet")
    assert sorted(manifest["id"]) == sorted(rows["id"])
    assert (manifest["platform"] == "udio").all()
    assert manifest.set_index("id").loc["udio-005", "streams"] == rows.loc[5, "play_count"]
    audio = out / "hub" / "sleeping-ai--Udio-126K" / "audio" / "udio-005.wav"
    assert audio.read_bytes() == rows.loc[5, "audio"]["bytes"]
    prepared = pd.read_parquet(out / "prepared.parquet")
    assert report["counts"]["rows_read"] == 34 and len(prepared) > 0
    counts = prepared["platform"].value_counts()  # balanced across the two datasets
    assert set(counts.index) == {"udio", "suno"} and counts["udio"] == counts["suno"]
    assert (
        json.loads((out / "hub" / "sleeping-ai--Udio-126K" / "source.json").read_text())["commit"]
        == COMMIT
    )


def test_a_schema_change_names_the_field_and_the_fix(hub_cache, tmp_path):
    snap = _snapshot(hub_cache, "sleeping-ai/Udio-126K")
    _udio_rows(4, streams_column="plays").to_parquet(snap / "train.parquet", index=False)
    uri = "hf://sleeping-ai/Udio-126K"
    with pytest.raises(ConfigError) as e:
        ingest_hub_manifest(uri, tmp_path / "a")
    msg = str(e.value)
    assert (
        "'play_count'" in msg and "'streams'" in msg and "mapping sleeping-ai/Udio-126K v1" in msg
    )
    assert "--columns streams=<column>" in msg and "plays" in msg
    fixed = ingest_hub_manifest(uri, tmp_path / "b", columns="streams=plays")
    assert fixed.rows == 4 and fixed.audio_written == 4
    again = ingest_hub_manifest(uri, tmp_path / "b", columns="streams=plays")
    assert again.audio_written == 0  # audio already written is reused


def test_offline_without_a_cached_copy_and_unmapped_datasets(hub_cache, tmp_path):
    with pytest.raises(ConfigError, match="not in the local Hub cache"):
        resolve_hub_dataset("hf://sleeping-ai/suno-307K")
    snap = _snapshot(hub_cache, "someone/songs")
    _udio_rows(2).to_parquet(snap / "songs.parquet", index=False)
    with pytest.raises(ConfigError, match=r"no source column for \['id', 'streams'"):
        ingest_hub_manifest("hf://someone/songs", tmp_path / "x")
    done = ingest_hub_manifest(
        "hf://someone/songs",
        tmp_path / "y",
        columns="id=id,streams=play_count,likes=like_count,created_at=created_at,"
        "audio_path=audio,platform=lyrics",
    )
    assert done.rows == 2 and done.source.mapping is None


def test_arena_reads_the_released_layout_from_the_hub(hub_cache, tiny_checkpoint, tmp_path):
    from apex_reward.loading import ModelOptions
    from apex_reward.training.arena.job import ArenaConfig, load_battle_set, open_job

    snap = _snapshot(hub_cache, "music-arena/music-arena-dataset")
    for i, pref in enumerate(["A", "B", "TIE"]):
        d = snap / "battle_data" / "01-2025JULAUG"
        d.mkdir(parents=True, exist_ok=True)
        rec = {
            "battle_uuid": f"b{i}",
            "prompt": "a song",
            "audio_a": f"audio_files/01/a{i}.mp3",
            "audio_b": f"audio_files/01/b{i}.mp3",
            "system_a": "x",
            "system_b": "y",
            "preference": pref,
        }
        (d / f"b{i}.json").write_text(json.dumps(rec))
        for side in "ab":
            p = snap / "audio_files" / "01" / f"{side}{i}.mp3"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x")
    cfg = ArenaConfig(
        model=ModelOptions(model=str(tiny_checkpoint), dtype="fp32"),
        battles="hf://music-arena/music-arena-dataset",
        out=str(tmp_path / "arena"),
        use_cache=False,
        progress=False,
    )
    battle_set = load_battle_set(open_job(cfg))
    assert sorted(b.battle_id for b in battle_set.battles) == ["b0", "b1"]
    assert battle_set.hub["commit"] == COMMIT
    assert battle_set.battles[0].audio_a.is_relative_to(snap)
