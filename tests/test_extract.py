"""Distributed, resumable embedding extraction: 4 processes match 1, a killed run resumes to the
same embeddings, and cached embeddings score like the audio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import accelerate_launch
from interrupt import kill_after_shards

from apex_reward import ApexRewardModel, ConfigError, load_audio
from apex_reward.cli import main
from apex_reward.loading import ModelOptions
from apex_reward.training.embeddings import EmbeddingStore
from apex_reward.training.extract import ExtractConfig, read_songs, run_extraction
from apex_reward.training.synthetic import SynthConfig, generate_corpus

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    """40 readable songs of varied lengths (a few span 3 segments) plus unreadable files."""
    out = tmp_path_factory.mktemp("extract_corpus")
    summary = generate_corpus(
        SynthConfig(
            out=str(out),
            num_songs=40,
            min_seconds=1.5,
            max_seconds=4.5,
            long_fraction=0.1,
            long_seconds=14.0,
            seed=5,
            sample_rates=[16000, 22050, 44100],
            zero_stream_fraction=0.0,
            recent_fraction=0.0,
            duplicate_id_fraction=0.0,
            duplicate_audio_fraction=0.0,
            unreadable_fraction=0.1,
            invalid_row_fraction=0.0,
        )
    )
    manifest = pd.read_csv(summary["manifest"])
    assert manifest["id"].str.startswith("bad").sum() == 4
    return out / "manifest.csv", manifest


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny model with 5 s segments: the same code paths as 30 s, six times cheaper."""
    from conftest import make_tiny_model

    model = make_tiny_model(seed=0)
    model.config.frontend.segment_seconds = 5.0
    d = tmp_path_factory.mktemp("extract_model") / "tiny"
    model.save_pretrained(d)
    return d


def _extract_cmd(manifest, model_dir, out, *extra):
    return [
        "extract",
        "--manifest",
        str(manifest),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--shard-size",
        "4",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture(scope="module")
def reference(songs, model_dir, tmp_path_factory):
    """An uninterrupted single-process extraction."""
    manifest, _ = songs
    out = tmp_path_factory.mktemp("ref") / "emb"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess runs below (OMP_NUM_THREADS=1): same kernels
    try:
        summary = run_extraction(
            ExtractConfig(
                manifest=str(manifest),
                model=ModelOptions(model=str(model_dir), device="cpu"),
                out=str(out),
                shard_size=4,
                batch_size=4,
                num_workers=1,
            ),
            progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    return out, summary


def _embeddings(directory: Path) -> torch.Tensor:
    return EmbeddingStore(directory).segments().layer_features


def test_index_lists_every_readable_song_once(songs, reference):
    _, manifest = songs
    out, summary = reference
    index = pd.read_parquet(out / "index.parquet")
    readable = set(manifest.loc[~manifest["id"].str.startswith("bad"), "id"])
    assert set(index["id"]) == readable
    assert summary["songs_extracted"] == len(readable) == 40 and summary["songs_failed"] == 4
    # one row per 30 s segment, every song exactly once (contiguous rows in one shard)
    per_song = index.groupby("id").agg(
        n=("segment", "size"), dur=("song_duration_s", "first"), shards=("shard", "nunique")
    )
    assert (per_song["shards"] == 1).all()
    assert (per_song["n"] == (per_song["dur"] / 5.0).apply(lambda x: max(1, -(-x // 1)))).all()
    assert per_song["n"].max() >= 3  # multi-segment songs are included
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == sorted(
        manifest.loc[manifest["id"].str.startswith("bad"), "id"]
    )
    assert all(
        e["reason"] and e["error_type"] in ("AudioDecodeError", "AudioTooShortError")
        for e in errors
    )
    assert not list((out / "shards").glob("*.tmp*"))


def test_cached_embeddings_score_like_audio(songs, reference, model_dir):
    """Heads on cached embeddings == ApexRewardModel on the audio (song mode)."""
    _, manifest = songs
    out, _ = reference
    store = EmbeddingStore(out)
    model = ApexRewardModel.from_pretrained(model_dir)
    assert model.config.head.mode == "song" and model.config.frontend.segment_seconds == 5.0
    ids = store.song_ids[:12]
    paths = manifest.set_index("id").loc[ids, "audio_path"]
    audio = [load_audio(Path(songs[0]).parent / p) for p in paths]
    with torch.inference_mode():
        live = model([a for a, _ in audio], [sr for _, sr in audio]).scores
        cached = model.predict_from_features(store.segments(ids)).scores
    for name in live:
        scale = 100.0 if name in ("streams", "likes", "popularity") else 5.0
        # fp16 storage of the embeddings: agreement to ~1e-3 of each score's range
        assert torch.allclose(cached[name], live[name], atol=1e-3 * scale), name
    # song-level features equal the weighted mean the head would compute
    songs_f = store.songs(ids)
    assert songs_f.shape == (12, 4, 64)


def test_four_process_extraction_matches_single_process(songs, model_dir, reference, tmp_path):
    """accelerate launch --multi_gpu --num_processes 4 on CPU (gloo)."""
    manifest, _ = songs
    ref_out, _ = reference
    out = tmp_path / "emb4"
    cmd = [
        *accelerate_launch(4),
        *_extract_cmd(manifest, model_dir, out, "--num-workers", "0"),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 4
    a = pd.read_parquet(ref_out / "index.parquet")
    b = pd.read_parquet(out / "index.parquet")
    pd.testing.assert_frame_equal(a, b)
    ea, eb = _embeddings(ref_out), _embeddings(out)
    ulp = torch.maximum(ea.abs(), eb.abs()) * 2**-10 + 2**-24  # one fp16 step
    assert ((ea - eb).abs() <= ulp).all()
    assert (out / "errors.jsonl").read_text() == (ref_out / "errors.jsonl").read_text()


def test_kill_and_resume(songs, model_dir, reference, tmp_path):
    """SIGKILL part-way, rerun, same index and embeddings as an uninterrupted run."""
    manifest, _ = songs
    ref_out, _ = reference
    out = tmp_path / "emb"
    cmd = [
        sys.executable,
        "-m",
        "apex_reward",
        *_extract_cmd(manifest, model_dir, out, "--num-workers", "1"),
    ]
    completed_before = kill_after_shards(cmd, out, 2, ENV)
    assert 2 <= completed_before < 10
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["shards_skipped_on_resume"] >= completed_before
    pd.testing.assert_frame_equal(
        pd.read_parquet(ref_out / "index.parquet"), pd.read_parquet(out / "index.parquet")
    )
    assert torch.equal(_embeddings(ref_out), _embeddings(out))


def _extract_in_process(manifest, model_dir, out):
    """``extract`` in this process, 4 songs per shard, no loader workers."""
    return run_extraction(
        ExtractConfig(
            manifest=str(manifest),
            model=ModelOptions(model=str(model_dir), device="cpu"),
            out=str(out),
            shard_size=4,
            num_workers=0,
        ),
        progress=False,
    )


def test_refuses_to_mix_embeddings_from_another_model(songs, reference, tmp_path):
    manifest, _ = songs
    ref_out, _ = reference
    from conftest import make_tiny_model

    other = tmp_path / "other"
    make_tiny_model(seed=9, trunk_layers=3).save_pretrained(other)  # different encoder weights
    with pytest.raises(ConfigError, match="different extraction"):
        _extract_in_process(manifest, other, ref_out)


def test_launch_without_a_group_is_refused(monkeypatch):
    """`accelerate launch --multi_gpu` on a GPU-less machine starts N lone processes (each sees
    WORLD_SIZE=N but a group of 1); extraction and training refuse instead of racing N copies."""
    from types import SimpleNamespace

    from apex_reward.errors import ConfigError
    from apex_reward.training.distributed import check_launch

    alone = SimpleNamespace(num_processes=1, device=torch.device("cpu"))  # what each one sees
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="launched 4 processes but they did not form a group"):
        check_launch(alone)
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_launch(alone)
    monkeypatch.delenv("WORLD_SIZE")
    check_launch(alone)


@pytest.mark.parametrize("limit", [-1, 0])
def test_limit_below_one_is_an_error(songs, model_dir, tmp_path, capsys, limit):
    """``--limit -1`` used to drop the last song (a Python slice) and ``--limit 0`` to succeed with
    no songs; both are now refused before anything is written."""
    manifest, _ = songs
    out = tmp_path / "emb"
    assert main(_extract_cmd(manifest, model_dir, out, "--limit", str(limit))) == 1
    err = capsys.readouterr().err
    assert f"limit: must be >= 1 (leave it unset to extract every song), got {limit}" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match=f"limit: must be >= 1.*got {limit}"):
        read_songs(str(manifest), limit=limit)
    every = read_songs(str(manifest))
    assert read_songs(str(manifest), limit=1) == every[:1]
    assert read_songs(str(manifest), limit=len(every) + 5) == every


def test_silent_segments_weigh_zero_in_the_store_as_in_the_model(model_dir, tmp_path):
    """Extraction records the front end's segment weights: a near-silent 5 s segment inside a
    song weighs 0 in both the store and the live model, and they score alike."""
    import numpy as np
    import soundfile as sf
    from conftest import synth_music

    sr = 24000
    music = synth_music(12.0, sr, seed=3)[0]
    quiet = 10 ** (-85 / 20) * np.random.default_rng(0).standard_normal(5 * sr)
    song = np.concatenate([music[: 5 * sr], quiet, music[5 * sr :]]).astype(np.float32)
    sf.write(tmp_path / "gap.wav", song, sr)
    sf.write(tmp_path / "plain.wav", music, sr)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("id,audio_path\ngap,gap.wav\nplain,plain.wav\n")
    run_extraction(
        ExtractConfig(
            manifest=str(manifest),
            model=ModelOptions(model=str(model_dir), device="cpu"),
            out=str(tmp_path / "emb"),
            num_workers=0,
        ),
        progress=False,
    )
    store = EmbeddingStore(tmp_path / "emb")
    model = ApexRewardModel.from_pretrained(model_dir)
    assert model.config.frontend.silent_segment_db is not None  # the level-aware front end
    seg = store.segments(["gap", "plain"])
    assert seg.weights[1] == 0 and (seg.weights[seg.song_index == 1] > 0).all()
    with torch.inference_mode():
        live = model([torch.from_numpy(song), torch.from_numpy(music)], sr, guard="off").scores
        cached = model.predict_from_features(seg).scores
    for name in live:
        scale = 100.0 if name in ("streams", "likes", "popularity") else 5.0
        assert torch.allclose(cached[name], live[name], atol=1e-3 * scale), name


def test_a_store_and_model_written_before_a_front_end_field_existed_still_match(
    songs, model_dir, reference, tmp_path
):
    """A front-end field added later (here ``normalize_level_db``) is absent from stores and
    checkpoints written before it; with its default they are the same front end, so extraction
    resumes and training accepts the pair. A real difference is still refused."""
    import shutil

    from apex_reward.training.trainer.data import _check_extraction_matches

    manifest, _ = songs
    ref_out, _ = reference
    old_store, old_model = tmp_path / "emb", tmp_path / "model"
    shutil.copytree(ref_out, old_store)
    shutil.copytree(model_dir, old_model)
    for path in (old_store / "extraction.json", old_model / "config.json"):
        data = json.loads(path.read_text())
        frontend = data["frontend"]
        assert frontend.pop("normalize_level_db", "absent") is None
        path.write_text(json.dumps(data))
    summary = _extract_in_process(manifest, old_model, old_store)
    assert summary["shards_skipped_on_resume"] == summary["shards"]
    store = EmbeddingStore(old_store)
    _check_extraction_matches(store, str(old_model))
    _check_extraction_matches(store, str(model_dir))
    changed = json.loads((old_model / "config.json").read_text())
    changed["frontend"]["normalize_floor"] = 1e-5
    (old_model / "config.json").write_text(json.dumps(changed))
    with pytest.raises(ConfigError, match="front end or encoder differ"):
        _check_extraction_matches(store, str(old_model))
