"""Augmented views: `extract --views N` is deterministic and resumes exactly, the store serves
each view, and training samples one view per song per epoch (plus feature masking), recorded in
the checkpoint's provenance."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from interrupt import kill_after_shards

from apex_reward import ConfigError
from apex_reward.loading import ModelOptions
from apex_reward.training.embeddings import EmbeddingStore
from apex_reward.training.extract import ExtractConfig, run_extraction
from apex_reward.training.synthetic import SynthConfig, generate_corpus
from apex_reward.training.trainer import TrainConfig, TrainingData, train
from apex_reward.training.trainer.views import InputAugment
from apex_reward.training.views import ViewConfig, make_view

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
VIEWS = ViewConfig(views=4, view_seed=3, view_clip_seconds=2.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """16 readable songs of 2.5-6 s (longer than the 2 s view clip) and 2 unreadable files."""
    out = tmp_path_factory.mktemp("views_corpus")
    summary = generate_corpus(
        SynthConfig(
            out=str(out),
            num_songs=16,
            min_seconds=2.5,
            max_seconds=6.0,
            long_fraction=0.0,
            seed=11,
            sample_rates=[16000, 24000],
            zero_stream_fraction=0.0,
            recent_fraction=0.0,
            duplicate_id_fraction=0.0,
            duplicate_audio_fraction=0.0,
            unreadable_fraction=0.1,
            invalid_row_fraction=0.0,
        ),
        progress=False,
    )
    return out / "manifest.csv", pd.read_csv(summary["manifest"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from conftest import make_tiny_model

    model = make_tiny_model(seed=0)
    model.config.frontend.segment_seconds = 4.0
    d = tmp_path_factory.mktemp("views_model") / "tiny"
    model.save_pretrained(d)
    return d


def _args(manifest, model_dir, out):
    return [
        "extract",
        "--manifest",
        str(manifest),
        "--model",
        str(model_dir),
        "--out",
        str(out),
        "--shard-size",
        "2",
        "--batch-size",
        "4",
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--views",
        str(VIEWS.views),
        "--view-seed",
        str(VIEWS.view_seed),
        "--view-clip-seconds",
        str(VIEWS.view_clip_seconds),
    ]


@pytest.fixture(scope="module")
def store(corpus, model_dir, tmp_path_factory):
    """An uninterrupted single-process extraction with 4 views."""
    out = tmp_path_factory.mktemp("views_ref") / "emb"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the subprocess below (OMP_NUM_THREADS=1): the same kernels
    try:
        summary = run_extraction(_config(corpus, model_dir, out, VIEWS), progress=False)
    finally:
        torch.set_num_threads(threads)
    return out, summary


def _config(corpus, model_dir, out, augment: ViewConfig) -> ExtractConfig:
    return ExtractConfig(
        manifest=str(corpus[0]),
        model=ModelOptions(model=str(model_dir), device="cpu"),
        out=str(out),
        shard_size=2,
        batch_size=4,
        num_workers=0,
        augment=augment,
    )


def _all_views(directory) -> list[torch.Tensor]:
    s = EmbeddingStore(directory)
    return [s.segments(view=v).layer_features for v in range(s.views)]


def test_views_are_deterministic_clips_with_gain_and_roll():
    rng = np.random.default_rng(0)
    song = torch.from_numpy(rng.uniform(-0.5, 0.5, 24000 * 5).astype(np.float32))
    a = make_view(song, 24000, "song-a", 2, VIEWS, segment_seconds=4.0)
    again = make_view(song.clone(), 24000, "song-a", 2, VIEWS, segment_seconds=4.0)
    assert torch.equal(a.audio, again.audio) and a.record() == again.record()
    other = make_view(song, 24000, "song-b", 2, VIEWS, segment_seconds=4.0)
    assert other.record() != a.record()
    # the view is the clip at offset_s, times the gain, clipped to ±1, rolled by shift_s
    start, shift = round(a.offset_s * 24000), round(a.shift_s * 24000)
    expect = (song[start : start + 48000] * 10 ** (a.gain_db / 20)).clamp(-1, 1).roll(shift)
    assert a.audio.shape == (48000,) and torch.equal(a.audio, expect)
    assert VIEWS.view_min_gain_db <= a.gain_db <= VIEWS.view_max_gain_db
    with pytest.raises(ConfigError, match="view 0 is the song itself"):
        make_view(song, 24000, "song-a", 0, VIEWS, segment_seconds=4.0)
    with pytest.raises(ConfigError, match="views: must be >= 1"):
        ViewConfig(views=0)


def test_store_holds_every_view_and_view0_is_the_song(store, model_dir, corpus, tmp_path):
    out, summary = store
    s = EmbeddingStore(out)
    assert s.views == 4 and s.fingerprint["views"]["view_clip_seconds"] == 2.0
    assert "view" not in s.index.columns and summary["songs_extracted"] == 16
    assert summary["view_segments"] == 3 * 16  # a 2 s clip is one 4 s segment
    record = json.loads(next((out / "shards").glob("*.json")).read_text())
    drawn = record["songs"][0]["views"]
    assert [v["view"] for v in drawn] == [1, 2, 3]
    assert all({"offset_s", "gain_db", "shift_s"} <= set(v) for v in drawn)
    views = [s.songs(view=v) for v in range(4)]
    assert all(v.shape == views[0].shape for v in views)
    assert not torch.allclose(views[0], views[1])
    with pytest.raises(ConfigError, match="no view 4"):
        s.songs(view=4)
    # view 0 equals a store extracted without views; that store has no view column or key
    plain = tmp_path / "plain"
    run_extraction(_config(corpus, model_dir, plain, ViewConfig()), progress=False)
    p = EmbeddingStore(plain)
    assert p.views == 1 and "views" not in p.fingerprint
    assert list(pd.read_parquet(plain / "index.parquet").columns) == list(s.index.columns)
    # the same segments; only the rows move (each song's views follow it in its shard)
    pd.testing.assert_frame_equal(p.index.drop(columns="row"), s.index.drop(columns="row"))
    ea, eb = p.segments().layer_features, s.segments().layer_features
    ulp = torch.maximum(ea.abs(), eb.abs()) * 2**-10 + 2**-24  # one fp16 step
    assert ((ea - eb).abs() <= ulp).all()


def test_views_extraction_killed_and_resumed_is_exact(corpus, model_dir, store, tmp_path):
    """SIGKILL part-way through `extract --views 4`, rerun: the same index and every view's
    embeddings equal an uninterrupted run's."""
    ref_out, _ = store
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "apex_reward", *_args(corpus[0], model_dir, out)]
    assert kill_after_shards(cmd, out, 2, ENV) >= 2
    rerun = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["shards_skipped_on_resume"] >= 2
    pd.testing.assert_frame_equal(
        pd.read_parquet(ref_out / "index.parquet"), pd.read_parquet(out / "index.parquet")
    )
    for a, b in zip(_all_views(ref_out), _all_views(out), strict=True):
        assert torch.equal(a, b)
    # a rerun with other views refuses to mix them into the store
    with pytest.raises(ConfigError, match="different extraction"):
        run_extraction(_config(corpus, model_dir, out, ViewConfig(views=2)), progress=False)


def _prepared(s: EmbeddingStore, path):
    ids = s.song_ids
    rng = np.random.default_rng(1)
    split = ["train"] * (len(ids) - 4) + ["val"] * 2 + ["test"] * 2
    pd.DataFrame(
        {
            "id": ids,
            "streams_score": rng.uniform(0, 100, len(ids)),
            "likes_score": rng.uniform(0, 100, len(ids)),
            "split": split,
        }
    ).to_parquet(path)
    return path


def test_training_samples_views_and_records_them(store, model_dir, tmp_path):
    out, _ = store
    s = EmbeddingStore(out)
    prepared = pd.read_parquet(_prepared(s, tmp_path / "prepared.parquet"))
    data = TrainingData.from_extraction(s, prepared, "popularity", "song", sample_views=True)
    train_split = data.splits["train"]
    assert train_split.extra_views.shape == (3, *train_split.features.shape)
    assert all(data.splits[k].extra_views is None for k in ("val", "test"))
    cfg = TrainConfig(tasks="popularity", seed=5, mask_features=0.25, mask_layers=1)
    aug = InputAugment(train_split, cfg)
    views_e0, views_e1 = aug.epoch_views(0).clone(), aug.epoch_views(1).clone()
    assert torch.equal(views_e0, InputAugment(train_split, cfg).epoch_views(0))
    assert not torch.equal(views_e0, views_e1) and set(views_e0.tolist()) <= {0, 1, 2, 3}
    idx = torch.arange(len(train_split))
    x = aug.batch(idx, 0, 0)
    # each sample comes from its drawn view, with 1 of 4 layers and 25 % of dims at the mean
    src = torch.cat([train_split.features[None], train_split.extra_views])[views_e0, idx]
    masked = x == aug.fill
    hidden = x.shape[-1]
    assert (masked.all(dim=2).sum(dim=1) == 1).all()
    kept_layers = ~masked.all(dim=2)
    assert (masked.sum(dim=2)[kept_layers] == round(0.25 * hidden)).all()
    assert torch.equal(x[~masked], src[~masked])
    assert torch.equal(x, aug.batch(idx, 0, 0)) and not torch.equal(x, aug.batch(idx, 0, 1))
    with pytest.raises(ConfigError, match="sampling them is supported in song mode"):
        TrainingData.from_extraction(s, prepared, "popularity", "segment", sample_views=True)
    with pytest.raises(ConfigError, match="would leave none unmasked"):
        InputAugment(train_split, TrainConfig(mask_layers=4))

    result = train(
        TrainConfig(
            embeddings=str(out),
            prepared=str(tmp_path / "prepared.parquet"),
            model=str(model_dir),
            out=str(tmp_path / "run"),
            tasks="popularity",
            epochs=3,
            batch_size=4,
            mask_features=0.1,
            device="cpu",
            log_with="none",
        ),
        progress=False,
    )
    training = json.loads((result.checkpoint / "config.json").read_text())["training"]
    assert training["views"]["num_views"] == 4
    assert training["views"]["recipe"]["view_seed"] == VIEWS.view_seed
    assert training["feature_masking"]["mask_features"] == 0.1
    assert training["config"]["sample_views"] is True


def _view_spread(checkpoint, split) -> float:
    """Mean over training songs of the std of the head's unit-range predictions over the views."""
    from apex_reward import ApexRewardModel

    head = ApexRewardModel.from_pretrained(checkpoint).head.eval()
    views = torch.cat([split.features[None], split.extra_views]).float()  # [V, M, L, H]
    with torch.no_grad():
        pred = torch.stack(
            [
                torch.sigmoid(torch.stack(list(head.logits(head.embed(v)).values()), 1))
                for v in views
            ]
        )  # [V, M, T]
    return float(pred.std(dim=0, unbiased=False).mean())


def test_view_consistency_pairs_two_views_and_narrows_their_spread(store, model_dir, tmp_path):
    out, _ = store
    s = EmbeddingStore(out)
    prepared_path = _prepared(s, tmp_path / "prepared.parquet")
    prepared = pd.read_parquet(prepared_path)
    data = TrainingData.from_extraction(s, prepared, "popularity", "song", sample_views=True)
    split = data.splits["train"]
    aug = InputAugment(split, TrainConfig(tasks="popularity", seed=2, view_consistency=1.0))
    idx = torch.arange(len(split))
    views = torch.cat([split.features[None], split.extra_views]).float()  # [V, M, L, H]
    seen = set()
    for step in range(6):
        drawn = aug.epoch_views(0)
        partner = aug.partner_batch(idx, 0, step)
        is_view = (views == partner[None]).flatten(2).all(dim=2)  # [V, M]
        # every partner row is one of its own song's views, never the view drawn for it
        assert is_view.any(dim=0).all()
        assert not is_view[drawn, idx].any()
        seen |= set(is_view.float().argmax(dim=0).tolist())
        assert torch.equal(partner, aug.partner_batch(idx, 0, step))  # seeded
    assert seen == {0, 1, 2, 3}

    # without sampled views the penalty has nothing to compare: inactive, not an error
    plain = TrainingData.from_extraction(s, prepared, "popularity", "song", sample_views=False)
    assert InputAugment.for_run(plain.splits["train"], TrainConfig()) is None
    masked_only = InputAugment(plain.splits["train"], TrainConfig(mask_features=0.1))
    assert masked_only.consistency == 0.0
    with pytest.raises(ConfigError, match="view consistency needs sampled views"):
        masked_only.partner_batch(idx, 0, 0)
    with pytest.raises(ConfigError, match="must be >= 0"):
        TrainConfig(view_consistency=-0.5)

    spreads = {}
    for weight in (0.0, 10.0):
        result = train(
            TrainConfig(
                embeddings=str(out),
                prepared=str(prepared_path),
                model=str(model_dir),
                out=str(tmp_path / f"run{weight}"),
                tasks="popularity",
                epochs=40,
                patience=40,
                batch_size=4,
                view_consistency=weight,
                device="cpu",
                log_with="none",
            ),
            progress=False,
        )
        spreads[weight] = _view_spread(result.checkpoint, split)
        training = json.loads((result.checkpoint / "config.json").read_text())["training"]
        assert ("consistency" in training["views"]) == bool(weight)
    print("view spread without / with consistency:", spreads)
    assert spreads[10.0] < 0.5 * spreads[0.0]


def test_a_run_resumes_only_with_the_view_consistency_it_was_trained_with(
    store, model_dir, tmp_path
):
    out, _ = store
    prepared = _prepared(EmbeddingStore(out), tmp_path / "prepared.parquet")

    def run(**kw):
        return train(
            TrainConfig(
                embeddings=str(out),
                prepared=str(prepared),
                model=str(model_dir),
                out=str(tmp_path / "run"),
                tasks="popularity",
                epochs=3,
                batch_size=4,
                device="cpu",
                log_with="none",
                **kw,
            ),
            progress=False,
        )

    assert not run(max_epochs_this_run=1).finished  # the default weight, 10
    state_path = tmp_path / "run" / "last" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["view_consistency"] == 10.0
    with pytest.raises(ConfigError, match="trained with view consistency 10 .* with 3"):
        run(view_consistency=3.0)
    # a run saved before the option existed was trained without the penalty
    del state["view_consistency"]
    state_path.write_text(json.dumps(state))
    with pytest.raises(ConfigError, match="pass --view-consistency 0 to continue"):
        run()
    result = run(view_consistency=0.0)
    assert result.finished and len(result.history) == 3
