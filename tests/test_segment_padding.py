"""``segment_padding="none"``: short clips are encoded at their own length, segments of equal
length share encoder calls so that batching never moves a score, the choice is recorded in the
checkpoint, and extraction follows it."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_model, synth_music

from apex_reward import ApexRewardModel, ConfigError, FrontendConfig
from apex_reward.buckets import length_groups

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000


def _variant(model: ApexRewardModel, **frontend) -> ApexRewardModel:
    """The same weights with other front-end settings."""
    m = copy.deepcopy(model)
    for k, v in frontend.items():
        setattr(m.config.frontend, k, v)
    return m


@pytest.fixture(scope="module")
def base():
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def none_model(base):
    return _variant(
        base,
        segment_seconds=4.0,
        segment_padding="none",
        min_segment_seconds=1.0,
        min_duration_s=0.5,
    )


def _clips() -> list[tuple[torch.Tensor, int]]:
    """Mixed lengths and rates: shorter than the minimum segment, two of the same length,
    one spanning two segments, one at 44.1 kHz."""
    spec = [(0.8, SR), (1.3, SR), (2.5, SR), (2.5, SR), (5.2, SR), (3.9, 44100), (2.2, 22050)]
    return [
        (torch.from_numpy(synth_music(s, r, seed=40 + i)[0]), r) for i, (s, r) in enumerate(spec)
    ]


def test_batching_never_changes_a_score_with_mixed_lengths(none_model):
    clips = _clips()
    with torch.inference_mode():
        alone = torch.cat([none_model([w], r).reward for w, r in clips])
        together = none_model([w for w, _ in clips], [r for _, r in clips]).reward
        small = none_model(
            [w for w, _ in clips], [r for _, r in clips], segment_batch_size=2
        ).reward
        reversed_ = none_model(
            [w for w, _ in clips[::-1]], [r for _, r in clips[::-1]], segment_batch_size=3
        ).reward.flip(0)
    scored = torch.tensor([r.reward for r in none_model.score(clips, batch_size=4)])
    for other in (together, small, reversed_, scored):
        assert (other - alone).abs().max().item() <= 1e-4
    # the two 2.5 s clips differ in content, so the test is not comparing equal inputs
    assert abs(alone[2] - alone[3]) > 1e-6


def test_a_short_clip_is_encoded_at_its_own_length(base, none_model):
    """A 2.5 s clip under `none` (4 s segments) scores as a `full` model whose segments are
    exactly 2.5 s long (no padding at all), and differently from `full` 4 s segments."""
    wav = torch.from_numpy(synth_music(2.5, SR, seed=7)[0])
    exact = _variant(base, segment_seconds=2.5)
    padded = _variant(base, segment_seconds=4.0)
    with torch.inference_mode():
        got = none_model([wav], SR).scores
        want = exact([wav], SR).scores
        full = padded([wav], SR).scores
    for name in got:
        assert torch.allclose(got[name], want[name], atol=1e-5), name
    assert max(abs(float(got[n] - full[n])) for n in got) > 1e-4


def test_segments_are_only_as_wide_as_needed(none_model):
    fe = none_model.frontend
    segs = fe.segment([torch.randn(int(0.5 * SR)), torch.randn(int(1.5 * SR))])
    assert segs.audio.shape == (2, int(1.5 * SR))
    assert fe.encoded_lengths(segs.valid).tolist() == [SR, int(1.5 * SR)]  # 1 s minimum
    assert segs.valid.tolist() == [int(0.5 * SR), int(1.5 * SR)]
    # padding beyond the valid samples stays exactly zero after normalisation
    assert segs.audio[0, int(0.5 * SR) :].abs().max().item() == 0.0
    long = fe.segment([torch.randn(int(9.0 * SR))])
    assert fe.encoded_lengths(long.valid).tolist() == [4 * SR, 4 * SR, SR]
    groups = length_groups(fe.encoded_lengths(long.valid))
    assert [(n, idx.tolist()) for n, idx in groups] == [(4 * SR, [0, 1]), (SR, [2])]


def test_recorded_in_the_checkpoint(none_model, tmp_path):
    none_model.save_pretrained(tmp_path / "m")
    loaded = ApexRewardModel.from_pretrained(tmp_path / "m")
    assert loaded.config.frontend.segment_padding == "none"
    assert loaded.config.frontend.min_segment_seconds == 1.0
    wav = torch.from_numpy(synth_music(1.7, SR, seed=9)[0])
    with torch.inference_mode():
        assert torch.allclose(loaded([wav], SR).reward, none_model([wav], SR).reward, atol=1e-6)
    # checkpoints written before the field existed keep zero-padding
    assert FrontendConfig().segment_padding == "full"


def test_gradient_reaches_the_waveform(none_model):
    wav = torch.from_numpy(synth_music(1.6, SR, seed=11)[0]).requires_grad_(True)
    none_model([wav], SR).reward.sum().backward()
    assert wav.grad is not None and torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "field, value", [("segment_padding", "short"), ("min_segment_seconds", 0.0)]
)
def test_bad_values_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        FrontendConfig(**{field: value})


def test_demo_trains_without_padding_and_scores_follow_its_embeddings(tmp_path):
    """The demo pipeline with segment_padding=none: extraction records it, the trained checkpoint
    keeps it, and the exported model scores audio as its heads score the stored embeddings."""
    from apex_reward import load_audio
    from apex_reward.training.demo import DemoConfig, run_demo_pipeline
    from apex_reward.training.embeddings import EmbeddingStore

    out = tmp_path / "demo"
    empty = tmp_path / "no_audio"  # no real audio to score at the end
    empty.mkdir()
    report = run_demo_pipeline(
        DemoConfig(
            out=str(out),
            songs=40,
            min_seconds=1.5,
            max_seconds=3.5,
            segment_seconds=4.0,
            segment_padding="none",
            epochs=3,
            workers=1,
            audio_dir=str(empty),
        ),
        progress=False,
    )
    model = ApexRewardModel.from_pretrained(report["model"])
    assert model.config.frontend.segment_padding == "none" and not model.untrained
    store = EmbeddingStore(out / "embeddings")
    assert store.fingerprint["frontend"]["segment_padding"] == "none"
    import pandas as pd

    prepared = pd.read_parquet(out / "prepared" / "prepared.parquet").set_index("id")
    ids = store.song_ids[:8]
    audio = [load_audio(prepared.loc[i, "audio_path"]) for i in ids]
    with torch.inference_mode():
        live = model([a for a, _ in audio], [sr for _, sr in audio]).scores
        cached = model.predict_from_features(store.segments(ids)).scores
    for name in live:
        scale = 100.0 if name in ("streams", "likes", "popularity") else 5.0
        # the store keeps fp16 embeddings: agreement to 1e-3 of each score's range
        assert torch.allclose(cached[name], live[name], atol=1e-3 * scale), name
