"""Training data integrity: a changed shard byte is a typed error (and one line from ``train``);
extraction redoes a shard whose record is unreadable, removes what a killed run left behind, and
writes shards with the same permissions as their records."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pandas as pd
import pytest
from conftest import fast_model
from fault_files import write_tone

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.cli import main
from apex_reward.errors import DataIntegrityError
from apex_reward.loading import ModelOptions
from apex_reward.training.embeddings import EmbeddingStore
from apex_reward.training.extract import ExtractConfig, run_extraction
from apex_reward.training.synthetic import synthetic_embedding_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    return synthetic_embedding_corpus(out, num_songs=48, shard_size=16, seed=3)


def _flip_byte(path, offset_from_end=64):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_shard_byte_is_a_typed_error(corpus, tmp_path):
    emb = tmp_path / "embeddings"
    shutil.copytree(corpus["embeddings"], emb)
    before = EmbeddingStore(emb).songs()
    _flip_byte(emb / "shards" / "shard-000001.safetensors")
    store = EmbeddingStore(emb)
    first = store.song_ids[:16]  # shard 0 is intact and still reads
    assert store.songs(first).shape == before[:16].shape
    with pytest.raises(DataIntegrityError, match=r"shard-000001\.safetensors: checksum mismatch"):
        store.songs()
    with pytest.raises(DataIntegrityError, match="rerun the same apex-reward extract"):
        EmbeddingStore(emb).segments()


def test_train_reports_a_corrupt_shard_without_a_traceback(corpus, tmp_path, capsys):
    emb = tmp_path / "embeddings"
    shutil.copytree(corpus["embeddings"], emb)
    _flip_byte(emb / "shards" / "shard-000002.safetensors")
    ckpt = tmp_path / "base"  # the configuration the synthetic store says it was extracted with
    ApexRewardModel.from_config(ApexConfig.from_preset("tiny"), encoder="random").save_pretrained(
        ckpt
    )
    argv = ["train", "--embeddings", str(emb), "--prepared", corpus["prepared"], "--model"]
    argv += [str(ckpt), "--device", "cpu", "--epochs", "1", "--log-with", "none", "--no-export"]
    code = main([*argv, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1
    assert "shard-000002.safetensors: checksum mismatch" in err and "rerun" in err
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def extraction(tmp_path_factory):
    """A finished extraction of 6 tones in 3 shards, and how to rerun it."""
    root = tmp_path_factory.mktemp("extract")
    rows = []
    for i in range(6):
        write_tone(root / f"s{i}.wav", seconds=1.0 + 0.25 * i, sr=16000, freq=200 + 50 * i)
        rows.append({"id": f"s{i}", "audio_path": f"s{i}.wav"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    fast_model().save_pretrained(root / "model")

    def run(out, progress=False):
        cfg = ExtractConfig(
            manifest=str(root / "manifest.csv"),
            model=ModelOptions(model=str(root / "model"), device="cpu"),
            out=str(out),
            shard_size=2,
            batch_size=4,
            num_workers=0,
        )
        return run_extraction(cfg, progress=progress)

    first = root / "first"
    summary = run(first)
    assert summary["songs_extracted"] == 6 and summary["shards"] == 3
    return first, run


def test_unreadable_shard_records_are_redone(extraction, tmp_path, capsys):
    first, run = extraction
    out = tmp_path / "again"
    shutil.copytree(first, out)
    records = [b"[]", b'{"sha256": 1, "songs": [], "errors": []}', b"\xff\xfe{not utf-8"]
    for k, record in enumerate(records):
        (out / "shards" / f"shard-{k:06d}.json").write_bytes(record)
    summary = run(out, progress=True)
    assert summary["songs_extracted"] == 6 and summary["shards_skipped_on_resume"] == 0
    bar = capsys.readouterr().err
    assert "audio-h/h" in bar and "songs/s" not in bar  # one songs rate: tqdm's own
    for k in range(3):
        rec = json.loads((out / "shards" / f"shard-{k:06d}.json").read_text())
        assert [s["id"] for s in rec["songs"]] == [f"s{2 * k}", f"s{2 * k + 1}"]
    assert len(EmbeddingStore(out).songs()) == 6


def test_stale_temporaries_removed_and_modes_consistent(extraction, tmp_path):
    first, run = extraction
    # the fixture's fresh extraction: shard files get the same permission bits as their records
    for k in range(3):
        data = first / "shards" / f"shard-{k:06d}.safetensors"
        rec = first / "shards" / f"shard-{k:06d}.json"
        assert stat.S_IMODE(data.stat().st_mode) == stat.S_IMODE(rec.stat().st_mode)
        assert stat.S_IMODE(data.stat().st_mode) & 0o044  # group/other may read, like records
    out = tmp_path / "again"
    shutil.copytree(first, out)
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = out / "shards" / f"shard-000000.safetensors.tmp{dead_pid}"
    stale.write_bytes(b"half a shard")
    (out / f"index.parquet.tmp{dead_pid}").write_bytes(b"half an index")
    live = out / "shards" / f"shard-000002.safetensors.tmp{os.getpid()}"
    live.write_bytes(b"being written by a live process")
    run(out)
    assert not stale.exists() and not (out / f"index.parquet.tmp{dead_pid}").exists()
    assert live.exists()
