"""The ``moments`` OOD feature: the frames' standard deviation and difference RMS next to the
pooled mean, fitted from audio by ``ood-stats --from-audio``, with the two-sided (typicality)
flag. One tiny random-encoder model fitted on procedural songs of the demo's distribution."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from test_ood import corpus_songs

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.cli import main
from apex_reward.errors import ConfigError
from apex_reward.frame_moments import frame_moments
from apex_reward.ood import (
    SHRINKAGE_GRID,
    fit_statistics,
    set_statistics,
    song_feature_matrix,
    song_features,
)
from apex_reward.training.audit.probes import PROBE_RATE, signal_probes

pytestmark = pytest.mark.usefixtures("one_thread")


def moment_features(model: ApexRewardModel, songs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                song_features(model.encode(songs[i : i + 16], PROBE_RATE, dynamics=True), "moments")
                for i in range(0, len(songs), 16)
            ]
        )


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend.segment_seconds = 4.0
    model = ApexRewardModel.from_config(cfg, encoder="random")
    x = moment_features(model, corpus_songs(80, seed=1))
    stats, info = fit_statistics(x, seed=0, in_sample_share=(99.0, 0.05))
    model.config.ood.features = "moments"
    model.config.ood.lower_tail = True
    set_statistics(model, stats, {**info, "source": "test"})
    return model, x


def test_frame_moments_match_a_direct_computation():
    torch.manual_seed(0)
    hidden = [torch.randn(2, 6, 3) for _ in range(2)]
    mask = torch.tensor([[1.0] * 6, [1.0] * 4 + [0.0] * 2])
    out = frame_moments(hidden, (0, 1), mask)
    assert out.shape == (2, 2, 2, 3)
    for layer in (0, 1):
        for n, frames in ((0, 6), (1, 4)):
            h = hidden[layer][n, :frames].double()
            std = h.std(dim=0, unbiased=False)
            rms = (h[1:] - h[:-1]).pow(2).mean(dim=0).sqrt()
            torch.testing.assert_close(out[n, 0, layer].double(), std, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out[n, 1, layer].double(), rms, rtol=1e-5, atol=1e-5)
    flat = frame_moments([torch.ones(1, 5, 3, requires_grad=True)], (0,), None)
    assert float(flat.detach().max()) < 1e-5  # constant frames: no spread, no movement
    flat.sum().backward()  # and a finite gradient there


def test_dynamics_leave_the_pooled_features_unchanged(fitted):
    model, _ = fitted
    songs = corpus_songs(3, seed=4)
    with torch.no_grad():
        plain = model.encode(songs, PROBE_RATE, dynamics=False)
        moving = model.encode(songs, PROBE_RATE)  # the statistics ask for the dynamics
    assert plain.dynamics is None and moving.dynamics is not None
    assert moving.dynamics.shape == (moving.layer_features.shape[0], 2, 4, 64)
    torch.testing.assert_close(plain.layer_features, moving.layer_features)
    assert song_features(moving, "moments").shape == (3, 192)
    with pytest.raises(ConfigError, match="dynamics"):
        song_features(plain, "moments")
    with pytest.raises(ConfigError, match="from-audio"):
        song_feature_matrix(torch.zeros(2, 4, 64), "moments")
    out = model.predict_from_features(plain)  # e.g. an embeddings store: no frames, ood null
    assert out.ood is None and out.ood_distance is None


def test_far_probes_are_flagged_and_held_out_and_training_songs_are_not(fitted):
    model, x = fitted
    probes = signal_probes(4.0, seed=0)
    with torch.inference_mode():
        out = model([p.waveform for p in probes], PROBE_RATE, guard="flag")
        songs = model(corpus_songs(40, seed=2), PROBE_RATE, guard="flag")
    flagged = {p.name: "ood" in f for p, f in zip(probes, out.flags)}
    far = ["digital_silence", "dc_0.5", "sine_220hz", "sine_440hz", "sine_1000hz"]
    assert all(flagged[name] for name in far + ["clipped_square_110hz"]), flagged
    assert np.mean(["ood" in f for f in songs.flags]) <= 0.05
    # the training songs scored in-sample: the shrinkage was raised until at most 5 % of them
    # fall below the lower threshold (or the grid ran out), and the stored share is what it is
    info, stats = model.config.ood.fitted_on, model.ood_stats
    below = float((stats.distance(x) < stats.threshold(1.0)).double().mean())
    assert below == pytest.approx(info["in_sample_below"])
    assert below <= 0.05 or info["shrinkage"] == SHRINKAGE_GRID[-1]
    d = stats.distance(x)
    assert float(stats.threshold(1.0)) < float(d.median()) < float(stats.threshold(99.0))


def test_moments_distance_is_differentiable(fitted):
    model, _ = fitted
    wave = corpus_songs(1, seed=6)[0].clone().requires_grad_(True)
    out = model([wave], PROBE_RATE, guard="off")
    expected = model.ood_stats.distance(moment_features(model, [wave.detach()]))
    torch.testing.assert_close(out.ood_distance.double(), expected, rtol=1e-4, atol=1e-6)
    out.ood_distance.sum().backward()
    assert torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0


def test_ood_stats_from_audio_writes_moments_statistics(tmp_path):
    import pandas as pd

    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend.segment_seconds = 4.0
    ApexRewardModel.from_config(cfg, encoder="random").save_pretrained(tmp_path / "base")
    rows = []
    for i, song in enumerate(corpus_songs(24, seed=7)):
        path = tmp_path / f"s{i}.wav"
        sf.write(path, song.numpy(), PROBE_RATE)
        rows.append({"id": f"s{i}", "audio_path": str(path), "split": "train" if i < 22 else "val"})
    (tmp_path / "broken.wav").write_bytes(b"RIFF not audio")
    rows.append({"id": "broken", "audio_path": str(tmp_path / "broken.wav"), "split": "train"})
    pd.DataFrame(rows).to_parquet(tmp_path / "prepared.parquet")
    store_only = ["ood-stats", "--model", str(tmp_path / "base"), "--embeddings", "x"]
    assert main([*store_only, "--features", "moments"]) != 0  # a store has no frames
    args = ["ood-stats", "--model", str(tmp_path / "base"), "--prepared"]
    args += [str(tmp_path / "prepared.parquet"), "--from-audio", "--features", "moments"]
    assert main([*args, "--lower-tail", "--out", str(tmp_path / "m")]) == 0
    model = ApexRewardModel.from_pretrained(tmp_path / "m")
    assert model.config.ood.features == "moments" and model.config.ood.lower_tail
    assert model.ood_stats.num_songs == 22 and model.ood_stats.dim == 192
    assert model.config.ood.fitted_on["failed"] == 1
    record = model.score([(corpus_songs(1, seed=8)[0].numpy(), PROBE_RATE)])[0].to_dict()
    assert 0.0 <= record["ood"] <= 100.0
