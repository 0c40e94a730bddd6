"""The out-of-distribution score: statistics of training song embeddings stored in the
checkpoint, the percentile and flag on every output, the smooth penalty, the ``ood-stats``
command. One tiny random-encoder model (like the demo's), fitted on procedural songs of the
demo's corpus distribution, then shown the audit's static probes and held-out songs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.checkpoint import read_checkpoint, save_checkpoint
from apex_reward.cli import main
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.model import ApexOutput
from apex_reward.ood import (
    beyond_threshold,
    fit_statistics,
    ood_penalty,
    set_statistics,
    song_features,
)
from apex_reward.training.audit.probes import PROBE_RATE, signal_probes
from apex_reward.training.synthetic import QUALITY_PARAMS, render_song

pytestmark = pytest.mark.usefixtures("one_thread")


def corpus_songs(n: int, seed: int, *, clean: bool = False) -> list[torch.Tensor]:
    """Songs drawn like the demo corpus's (random quality parameters; ``clean``: none of the
    degradations), 3–4 s at 24 kHz."""
    songs = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        params = {p: 0.0 if clean else float(rng.beta(1.1, 1.6)) for p in QUALITY_PARAMS}
        audio = render_song(params, float(rng.uniform(3.0, 4.0)), PROBE_RATE, rng)
        songs.append(torch.from_numpy(audio.astype(np.float32)))
    return songs


def encode_songs(model: ApexRewardModel, songs: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(
            [
                song_features(model.encode(songs[i : i + 16], PROBE_RATE))
                for i in range(0, len(songs), 16)
            ]
        )


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend.segment_seconds = 4.0  # short songs, short segments (the demo: 10 s)
    model = ApexRewardModel.from_config(cfg, encoder="random")
    train = corpus_songs(100, seed=1)
    x = encode_songs(model, train)
    stats, info = fit_statistics(x, seed=0)
    set_statistics(model, stats, {**info, "source": "test"})
    return model, train, x


@pytest.fixture(scope="module")
def held_out():
    return corpus_songs(40, seed=2)


def _flagged(model, waves) -> list[bool]:
    with torch.inference_mode():
        out = model(list(waves), PROBE_RATE, guard="flag")
    return ["ood" in f for f in out.flags]


def test_static_probes_are_flagged_and_held_out_songs_are_not(fitted, held_out):
    model, _, _ = fitted
    probes = signal_probes(4.0, seed=0)
    flagged = dict(zip([p.name for p in probes], _flagged(model, [p.waveform for p in probes])))
    # silence, DC, sines and the square lie far outside the songs' features; noise does not for
    # this random encoder: the corpus has songs drowned in noise (its "noise" quality axis), so
    # noise is in distribution here and left to the noise_like / too_quiet signal checks
    far = ["digital_silence", "dc_0.5", "sine_220hz", "sine_440hz", "sine_1000hz"]
    assert all(flagged[name] for name in far + ["clipped_square_110hz"]), flagged
    song_flags = _flagged(model, held_out)
    assert np.mean(song_flags) <= 0.05, sum(song_flags)
    with torch.inference_mode():
        out = model([p.waveform for p in probes if p.name in far], PROBE_RATE, guard="off")
    assert float(out.ood.min()) == 100.0  # beyond every training song


def test_training_songs_lie_below_the_threshold(fitted):
    model, train, x = fitted
    stats = model.ood_stats
    d = stats.distance(x)
    beyond = beyond_threshold(model, ApexOutput({}, torch.zeros(len(d)), ood_distance=d.float()))
    assert np.mean(beyond) <= 0.05
    median_song = int(torch.argsort(d)[len(d) // 2])
    with torch.inference_mode():
        out = model([train[median_song]], PROBE_RATE, guard="flag")
    assert float(out.ood[0]) < model.config.ood.flag_percentile and "ood" not in out.flags[0]
    assert 0.0 <= float(out.ood[0]) <= 100.0


def test_distance_is_a_differentiable_expression_of_the_waveform(fitted, held_out):
    model, _, _ = fitted
    wave = held_out[3].clone().requires_grad_(True)
    out = model([wave], PROBE_RATE, guard="off")
    assert out.flags is None and out.ood is not None  # the score is there under every policy
    expected = model.ood_stats.distance(encode_songs(model, [held_out[3]]))
    torch.testing.assert_close(out.ood_distance.double(), expected, rtol=1e-4, atol=1e-6)
    out.ood_distance.sum().backward()
    assert torch.isfinite(wave.grad).all() and wave.grad.abs().sum() > 0


def test_penalize_floors_ood_or_applies_the_smooth_penalty(fitted):
    model, _, _ = fitted
    ood = model.config.ood
    songs = corpus_songs(8, seed=3, clean=True)  # no signal flags
    try:
        ood.flag_percentile = 50.0  # half the songs beyond the threshold
        with torch.inference_mode():
            flagged = model(songs, PROBE_RATE, guard="penalize")
        only_ood = [f == ["ood"] for f in flagged.flags]
        assert any(only_ood) and not all(only_ood)
        raw = model.reward_from_scores(flagged.scores)
        assert all(f in ([], ["ood"]) for f in flagged.flags)  # clean songs: no signal flag
        for i, o in enumerate(only_ood):
            expected = 0.0 if o else float(raw[i])  # the floor of the reward "overall" is 0
            assert float(flagged.reward[i]) == pytest.approx(expected, abs=1e-6)

        ood.penalty_weight = 0.5
        waves = [s.clone().requires_grad_(True) for s in songs]
        out = model(waves, PROBE_RATE, guard="penalize")
        penalty = ood_penalty(out.ood_distance, model.ood_stats.threshold(50.0), 0.5, None)
        torch.testing.assert_close(out.reward, model.reward_from_scores(out.scores) - penalty)
        i = only_ood.index(True)
        assert float(penalty[i].detach()) > 0 and out.flags[i] == ["ood"]
        out.reward[i].backward()
        assert waves[i].grad.abs().sum() > 0  # not floored: the gradient leads back
    finally:
        ood.flag_percentile, ood.penalty_weight = 99.0, 0.0


def test_both_tails_flag_and_the_penalty_pushes_back_inside(fitted):
    model, _, _ = fitted
    stats = model.ood_stats
    low, high = stats.threshold(1.0), stats.threshold(99.0)
    d = torch.tensor([0.5 * low, 0.5 * (low + high), 2.0 * high], requires_grad=True)
    out = ApexOutput({}, torch.zeros(3), ood_distance=d)
    assert beyond_threshold(model, out) == [False, False, True]  # the default: upper tail only
    penalty = ood_penalty(d, high, 1.0, low)
    assert float(penalty[1]) == 0.0 and float(penalty[0]) == pytest.approx(1.0)
    assert float(penalty[2]) == pytest.approx(1.0)
    penalty.sum().backward()  # the reward (minus the penalty) rises towards the inside
    assert d.grad[0] < 0 and d.grad[1] == 0 and d.grad[2] > 0
    model.config.ood.lower_tail = True
    try:
        assert beyond_threshold(model, out) == [True, False, True]
    finally:
        model.config.ood.lower_tail = False


def test_statistics_round_trip_through_the_checkpoint(fitted, held_out, tmp_path):
    model, _, _ = fitted
    model.save_pretrained(tmp_path / "m")
    loaded = ApexRewardModel.from_pretrained(tmp_path / "m")
    assert loaded.config.ood.fitted_on["songs"] == 100
    assert loaded.config.ood.fitted_on["source"] == "test"
    with torch.inference_mode():
        a = model(held_out[:3], PROBE_RATE, guard="flag")
        b = loaded(held_out[:3], PROBE_RATE, guard="flag")
    torch.testing.assert_close(a.ood, b.ood)
    record = loaded.score([(held_out[0].numpy(), PROBE_RATE)])[0].to_dict()
    assert 0.0 <= record["ood"] <= 100.0


def test_checkpoints_without_statistics_report_null(tiny_checkpoint):
    model = ApexRewardModel.from_pretrained(tiny_checkpoint)
    assert model.ood_stats is None and model.config.ensemble_size == 1
    wave = torch.from_numpy(corpus_songs(1, seed=5)[0].numpy())
    out = model([wave], PROBE_RATE)
    assert out.ood is None and out.ood_distance is None and out.std is None
    assert "ood" not in out.flags[0]
    record = model.score([(wave.numpy(), PROBE_RATE)])[0].to_dict()
    assert "ood" in record and json.loads(json.dumps(record))["ood"] is None
    assert "std" not in record


def test_inconsistent_statistics_are_a_checkpoint_error(fitted, tmp_path):
    model, _, _ = fitted
    model.save_pretrained(tmp_path / "m")
    raw, tensors, _ = read_checkpoint(tmp_path / "m")
    tensors["ood.mean"] = tensors["ood.mean"][:-1]
    save_checkpoint(tmp_path / "bad", raw, tensors)
    with pytest.raises(CheckpointError, match="inconsistent shapes"):
        ApexRewardModel.from_pretrained(tmp_path / "bad")
    del tensors["ood.mean"]
    save_checkpoint(tmp_path / "bad2", raw, tensors)
    with pytest.raises(CheckpointError, match="need tensors"):
        ApexRewardModel.from_pretrained(tmp_path / "bad2")


def test_fit_rejects_too_few_songs_and_bad_percentiles():
    with pytest.raises(ConfigError, match="at least 10"):
        fit_statistics(np.zeros((5, 3)))
    with pytest.raises(ConfigError, match="flag_percentile"):
        ApexConfig.from_dict({**ApexConfig().to_dict(), "ood": {"flag_percentile": 120}})


def test_ood_stats_command_adds_statistics_from_a_store(tmp_path):
    from apex_reward.training.synthetic import synthetic_embedding_corpus

    corpus = synthetic_embedding_corpus(tmp_path / "c", num_songs=120, seed=0)
    base = tmp_path / "base"
    torch.manual_seed(0)
    ApexRewardModel.from_config(ApexConfig.from_preset("tiny"), encoder="random").save_pretrained(
        base
    )
    prepared = tmp_path / "c" / "prepared" / "prepared.parquet"
    assert ApexRewardModel.from_pretrained(base).ood_stats is None
    code = main(
        [
            "ood-stats",
            "--model",
            str(base),
            "--embeddings",
            str(tmp_path / "c" / "embeddings"),
            "--prepared",
            str(prepared),
        ]
    )
    assert code == 0
    import pandas as pd

    n_train = int((pd.read_parquet(prepared)["split"] == "train").sum())
    model = ApexRewardModel.from_pretrained(base)
    assert model.ood_stats is not None and model.ood_stats.num_songs == n_train
    assert model.config.ood.fitted_on["songs"] == n_train and corpus
