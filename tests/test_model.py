"""ApexRewardModel: differentiable scores, batching invariance, ranges, reward, preferences."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model, synth_music

from apex_reward import SCORE_RANGES, ApexConfig, ApexRewardModel, AudioShapeError
from apex_reward.config import PreferenceHeadConfig
from apex_reward.heads import combine_scores
from apex_reward.preference import pairwise_feature_names, pairwise_features


@pytest.fixture(scope="module")
def segment_model():
    return make_tiny_model(seed=1, mode="segment")


@pytest.mark.parametrize("mode", ["song", "segment"])
@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
def test_gradient_reaches_waveform(tiny_model, segment_model, mode, channels, rate):
    """Finite, non-zero gradients w.r.t. the input waveform."""
    model = tiny_model if mode == "song" else segment_model
    assert model.config.head.mode == mode
    wav = torch.from_numpy(synth_music(1.5, rate, channels, seed=rate + channels))
    x = wav[None].clone().requires_grad_(True)  # [1, C, T]
    out = model(x, sample_rate=rate)
    out.reward.sum().backward()
    assert x.grad is not None
    assert torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    # every score (not only the reward) is differentiable
    x.grad = None
    model(x, sample_rate=rate).scores["clarity"].sum().backward()
    assert x.grad.abs().sum() > 0


def test_model_parameters_are_frozen_after_loading(tiny_checkpoint):
    model = ApexRewardModel.from_pretrained(tiny_checkpoint)
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training and not model.encoder.model.training


@pytest.mark.parametrize("mode", ["song", "segment"])
def test_batch_of_different_lengths_equals_single(tiny_model, segment_model, mode):
    """Batching does not change a score: 5 s, 31 s, 95 s batched == each alone (<= 1e-4), and deterministic."""
    model = tiny_model if mode == "song" else segment_model
    songs = [torch.from_numpy(synth_music(s, 24000, seed=i)[0]) for i, s in enumerate([5, 31, 95])]
    with torch.inference_mode():
        batched = model(songs, 24000).to_records()
        again = model(songs, 24000).to_records()
        singles = [model([s], 24000).to_records()[0] for s in songs]
        small_chunks = model(songs, 24000, segment_batch_size=1).to_records()
    for b, s, a, c in zip(batched, singles, again, small_chunks):
        for name in b:
            assert abs(b[name] - s[name]) <= 1e-4, name
            assert b[name] == a[name], name  # deterministic
            assert abs(b[name] - c[name]) <= 1e-4, name
    # the songs do get different scores
    assert len({round(r["reward"], 6) for r in batched}) == 3


def test_outputs_inside_ranges_random_audio():
    """Scores stay in their ranges (random audio, random weights incl. extreme heads)."""
    for seed in range(3):
        model = make_tiny_model(seed=seed)
        # push the heads towards saturation too
        with torch.no_grad():
            for head in model.head.heads.values():
                head[-1].bias.add_(torch.randn(1) * 50)
        x = torch.randn(4, 24000 * 3) * torch.tensor([1e-3, 0.1, 1.0, 10.0])[:, None]
        with torch.inference_mode():
            out = model(x, 24000)
        _assert_in_range(out.scores)


def test_outputs_inside_ranges_real_audio(tiny_model, shared_audio):
    """Scores stay in their ranges (real clips)."""
    results = tiny_model.score(shared_audio, batch_size=4)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    _assert_in_range({k: torch.tensor([r.scores[k] for r in results]) for k in results[0].scores})


def _assert_in_range(scores):
    for name, v in scores.items():
        lo, hi = SCORE_RANGES[name]
        assert torch.isfinite(v).all(), name
        assert (v >= lo).all() and (v <= hi).all(), (name, v)


def test_combined_scores_and_reward():
    pred = {
        "streams": torch.tensor([20.0, 80.0]),
        "likes": torch.tensor([40.0, 60.0]),
        "coherence": torch.tensor([1.0, 5.0]),
        "musicality": torch.tensor([2.0, 4.0]),
        "memorability": torch.tensor([3.0, 3.0]),
        "clarity": torch.tensor([4.0, 2.0]),
        "naturalness": torch.tensor([5.0, 1.0]),
    }
    s = combine_scores(pred)
    assert torch.allclose(s["popularity"], torch.tensor([30.0, 70.0]))
    assert torch.allclose(s["songeval"], torch.tensor([3.0, 3.0]))
    assert torch.allclose(s["overall"], torch.tensor([0.5 * (0.3 + 0.5), 0.5 * (0.7 + 0.5)]))
    popularity_only = combine_scores({"streams": pred["streams"], "likes": pred["likes"]})
    assert "songeval" not in popularity_only
    assert torch.allclose(popularity_only["overall"], torch.tensor([0.3, 0.7]))


def test_configurable_reward_weights():
    model = make_tiny_model()
    model.config.reward_weights = {"clarity": 2.0, "streams": -0.01}
    x = torch.randn(2, 24000 * 2)
    with torch.inference_mode():
        out = model(x, 24000)
    assert torch.allclose(out.reward, 2.0 * out.scores["clarity"] - 0.01 * out.scores["streams"])
    with pytest.raises(Exception, match="unknown score 'loudness'"):
        ApexConfig.from_dict({**ApexConfig().to_dict(), "reward_weights": {"loudness": 1.0}})


def test_popularity_only_model_has_two_heads():
    model = make_tiny_model(tasks="popularity", trunk_layers=3)
    assert set(model.head.heads) == {"streams", "likes"}
    assert [m.out_features for m in model.head.trunk if isinstance(m, torch.nn.Linear)] == [
        512,
        384,
        256,
    ]
    with torch.inference_mode():
        out = model(torch.randn(2, 24000 * 2), 24000)
    assert set(out.scores) == {"streams", "likes", "popularity", "overall"}


def test_input_forms_agree(tiny_model):
    """[B, T], [B, C, T], [T], lists and numpy arrays all give the same scores."""
    mono = torch.from_numpy(synth_music(2.0, 22050, seed=3)[0])
    stereo = torch.stack([mono, mono])
    with torch.inference_mode():
        ref = tiny_model(mono[None], 22050).reward
        for x in (mono, [mono], [stereo], stereo[None], [mono.numpy()], mono[None].numpy()):
            assert torch.allclose(tiny_model(x, 22050).reward, ref, atol=1e-6)
        half = tiny_model(mono[None].half(), 22050).reward
    assert torch.allclose(half, ref, atol=1e-3)


def test_mixed_sample_rates_in_one_batch(tiny_model):
    a = torch.from_numpy(synth_music(2.0, 44100, seed=1)[0])
    b = torch.from_numpy(synth_music(2.0, 16000, seed=2)[0])
    with torch.inference_mode():
        both = tiny_model([a, b], [44100, 16000]).reward
        ra = tiny_model([a], 44100).reward
        rb = tiny_model([b], 16000).reward
    assert torch.allclose(both, torch.cat([ra, rb]), atol=1e-5)


def test_return_embeddings(tiny_model):
    with torch.inference_mode():
        out = tiny_model(
            [torch.randn(24000 * 2), torch.randn(24000 * 40)], 24000, return_embeddings=True
        )
    assert out.embeddings.shape == (2, 64)
    assert out.features.layer_features.shape == (3, 4, 64)
    assert out.features.song_index.tolist() == [0, 1, 1]
    assert torch.allclose(out.features.durations_s, torch.tensor([2.0, 40.0]))


def test_shape_errors(tiny_model):
    with pytest.raises(AudioShapeError):
        tiny_model(torch.zeros(2, 2, 2, 100), 24000)
    with pytest.raises(AudioShapeError, match="sample rate"):
        tiny_model(torch.zeros(1, 48000), -5)


def test_bradley_terry_preference(tiny_model):
    a = torch.stack([torch.from_numpy(synth_music(2.0, 24000, seed=s)[0]) for s in (1, 2)])
    b = torch.stack([torch.from_numpy(synth_music(2.0, 24000, seed=s)[0]) for s in (3, 4)])
    a.requires_grad_(True)
    b.requires_grad_(True)
    tiny_model.config.preference.temperature = 0.05
    try:
        logit = tiny_model.preference_logits(a, b, sample_rate=24000)
        with torch.no_grad():
            ra, rb = tiny_model(a, 24000).reward, tiny_model(b, 24000).reward
            reverse = tiny_model.preference_logits(b, a, sample_rate=24000)
        assert torch.allclose(logit.detach(), (ra - rb) / 0.05, atol=1e-4)
        assert torch.allclose(reverse, -logit.detach(), atol=1e-5)
        logit.sum().backward()
        assert a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0
    finally:
        tiny_model.config.preference.temperature = 1.0


def test_fitted_preference_head_matches_manual_logistic(tiny_checkpoint, tmp_path):
    """A logistic head in config.json is used by preference_logits and stays differentiable."""
    import json

    names = pairwise_feature_names(ApexConfig().score_names)
    assert len(names) == 31
    rng = np.random.default_rng(0)
    head = PreferenceHeadConfig(
        features=names,
        coef=rng.normal(size=31).tolist(),
        intercept=0.1,
        mean=rng.normal(size=31).tolist(),
        scale=rng.uniform(0.5, 2.0, size=31).tolist(),
    )
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["preference"]["head"] = {
        k: getattr(head, k) for k in ("features", "coef", "intercept", "mean", "scale")
    }
    import shutil

    d = tmp_path / "with_head"
    shutil.copytree(tiny_checkpoint, d)
    (d / "config.json").write_text(json.dumps(cfg))
    model = ApexRewardModel.from_pretrained(d)
    a = torch.from_numpy(synth_music(2.0, 24000, seed=5)).requires_grad_(True)
    b = torch.from_numpy(synth_music(2.0, 24000, seed=6)).requires_grad_(True)
    logit = model.preference_logits([a], [b], 24000, is_instrumental=1.0)
    with torch.no_grad():
        sa, sb = model([a], 24000).scores, model([b], 24000).scores
        x = pairwise_features(sa, sb, 1.0, names).numpy()[0]
    manual = ((x - np.array(head.mean)) / np.array(head.scale)) @ np.array(head.coef) + 0.1
    assert abs(logit.item() - manual) < 1e-4
    logit.backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_encoder_dtype_bf16_close_to_fp32():
    model = make_tiny_model(seed=2)
    x = [torch.from_numpy(synth_music(3.0, 24000, seed=s)[0]) for s in range(3)]
    with torch.inference_mode():
        ref = model(x, 24000).scores
        model.set_encoder_dtype("bf16")
        assert model.encoder_dtype == torch.bfloat16
        low = model(x, 24000).scores
    for k in ref:
        assert torch.allclose(low[k], ref[k], rtol=5e-2), k
    with pytest.raises(Exception, match="unknown dtype"):
        model.set_encoder_dtype("int3")


def test_non_finite_model_output_is_an_error_record_not_a_score():
    """If the model itself yields NaN (e.g. broken weights), score() reports an error for that
    song instead of handing NaN to an RL loop or writing bare NaN into JSON output."""
    model = make_tiny_model(seed=5)
    x = synth_music(2.0, 24000, seed=1)[0]
    (ok,) = model.score([x], sample_rate=24000)
    assert ok.ok
    with torch.no_grad():
        next(p for p in model.head.parameters() if p.ndim == 1).fill_(float("nan"))
    (bad,) = model.score([x], sample_rate=24000)
    assert not bad.ok and bad.error_type == "NonFiniteOutput" and "NaN" in bad.error
    assert bad.reward is None and bad.to_dict()["error_type"] == "NonFiniteOutput"


def test_preference_logits_argument_errors_name_the_argument(tiny_model):
    from apex_reward import ConfigError

    x = torch.from_numpy(synth_music(2.0, 24000)[0])
    with pytest.raises(AudioShapeError, match="sample_rate \\(of a\\): got 2 sample rates for 1"):
        tiny_model.preference_logits([x], [x], [24000, 24000])
    with pytest.raises(ConfigError, match="got 2 for a batch of 1"):
        tiny_model.preference_logits([x], [x], 24000, systems_a=["a", "b"])
    with pytest.raises(ConfigError, match="expected a string or a list of strings"):
        tiny_model.preference_logits([x], [x], 24000, systems_a=[3])
