"""The server's fast path without a server: the raw-PCM reader and the soxr preparation.

* :meth:`ClipDecoder.decode_pcm` reads interleaved little-endian float32/int16 frames exactly,
  and refuses what cannot be scored with typed errors;
* :class:`InferencePrep` (``--resampler soxr``): with nothing to resample, the scores, signals,
  flags and the penalised floor equal in-process ``model.score``; with resampling, they stay
  close to the model's own resampler.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synth_music

from apex_reward.errors import (
    AudioDecodeError,
    AudioShapeError,
    EmptyAudioError,
    NonFiniteAudioError,
    UnsupportedSampleRateError,
)
from apex_reward.fast_resample import resample_fast
from apex_reward.integrations.serving import ServeConfig
from apex_reward.integrations.serving.decoding import ClipDecoder
from apex_reward.integrations.serving.prepare import InferencePrep
from apex_reward.scoring import score_waveforms

pytest.importorskip("soxr")


@pytest.fixture(scope="module")
def decoder(tiny_model):
    return ClipDecoder(tiny_model, ServeConfig())


def test_decode_pcm_reads_interleaved_frames_exactly(decoder):
    x = synth_music(1.2, 22050, channels=2, seed=3)
    f32 = x.T.astype("<f4").tobytes()  # frame after frame
    wav, sr = decoder.decode_pcm(f32, encoding="f32le", sample_rate=22050, channels=2, name="a")
    assert sr == 22050 and wav.shape == (2, x.shape[1]) and wav.dtype == torch.float32
    assert torch.equal(wav, torch.from_numpy(x.astype(np.float32)))
    ints = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    wav16, _ = decoder.decode_pcm(
        ints.T.tobytes(), encoding="s16le", sample_rate=22050, channels=2, name="b"
    )
    assert torch.equal(wav16, torch.from_numpy(ints.astype(np.float32) / 32768.0))


@pytest.mark.parametrize(
    ("data", "kw", "error"),
    [
        (b"", {}, EmptyAudioError),
        (b"\x00" * 6, {}, AudioShapeError),  # not whole float32 frames
        (b"\x00" * 8 * 24000, {"channels": 2, "num_samples": 5}, AudioShapeError),
        (np.full(24000, np.nan, "<f4").tobytes(), {}, NonFiniteAudioError),
        (np.zeros(24000, "<f4").tobytes(), {"sample_rate": 12345}, UnsupportedSampleRateError),
        (np.zeros(24000, "<f4").tobytes(), {"encoding": "f64le"}, AudioDecodeError),
    ],
)
def test_decode_pcm_refuses_what_cannot_be_scored(decoder, data, kw, error):
    args = {"encoding": "f32le", "sample_rate": 24000, "channels": 1, **kw}
    with pytest.raises(error) as e:
        decoder.decode_pcm(data, name="clip7", **args)
    assert "clip7" in str(e.value)


def _prepared_scores(model, prep, clips):
    out = []
    for wav, sr in clips:
        p = prep(wav, sr)
        (r,) = score_waveforms(
            model, [("x", p.wav, p.sample_rate)], guard=prep.batcher_guard, checks=[p.checks]
        )
        out.append(prep.finish(r, p))
    return out


def test_soxr_preparation_equals_model_score_at_the_encoder_rate(tiny_model):
    """At the encoder's rate nothing is resampled: the soxr path computes what the model does,
    the guard included (the silent clip is flagged and gets the floor reward)."""
    prep = InferencePrep(tiny_model, ServeConfig(resampler="soxr", guard="penalize"))
    assert prep.batcher_guard == "penalize"
    clips = [(torch.from_numpy(synth_music(2.0, 24000, channels=2, seed=s)), 24000) for s in (1, 2)]
    clips.append((torch.zeros(1, 24000), 24000))
    ref = tiny_model.score(clips, num_workers=0, guard="penalize")
    got = _prepared_scores(tiny_model, prep, clips)
    for g, r in zip(got, ref):
        assert abs(g.reward - r.reward) <= 1e-5
        assert all(abs(g.scores[k] - v) <= 1e-5 * max(1.0, abs(v)) for k, v in r.scores.items())
        assert g.flags == r.flags and g.signals == pytest.approx(r.signals)
        assert g.duration_s == pytest.approx(r.duration_s)
    assert got[-1].flags and got[-1].reward == pytest.approx(ref[-1].reward)


def test_soxr_preparation_stays_close_to_the_model_resampler(tiny_model):
    prep = InferencePrep(tiny_model, ServeConfig(resampler="soxr", guard="flag"))
    clips = [
        (torch.from_numpy(synth_music(2.0, sr, channels=2, seed=sr)), sr) for sr in (44100, 16000)
    ]
    ref = tiny_model.score(clips, num_workers=0, guard="flag")
    got = _prepared_scores(tiny_model, prep, clips)
    for g, r in zip(got, ref):
        assert g.flags == r.flags
        assert abs(g.reward - r.reward) <= 5e-3, (g.reward, r.reward)
    y = resample_fast(clips[0][0], 44100, 24000)
    assert y.shape == (2, int(np.ceil(clips[0][0].shape[-1] * 24000 / 44100)))
