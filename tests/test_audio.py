"""Audio decoding and the differentiable front end (docs/model.md#front-end)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_music, write_bad_files, write_good_files

from apex_reward import (
    AudioDecodeError,
    AudioRangeError,
    AudioShapeError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    FrontendConfig,
    NonFiniteAudioError,
    UnsupportedSampleRateError,
    load_audio,
)
from apex_reward.audio import AudioFrontEnd


def test_load_audio_formats(tmp_path):
    files = write_good_files(tmp_path)
    expected = {
        "a.wav": (44100, 2),
        "b.flac": (48000, 1),
        "c.ogg": (22050, 2),
        "d.mp3": (44100, 2),
        "e.opus": (48000, 1),
    }
    for f in files:
        wav, sr = load_audio(f)
        rate, ch = expected[f.name]
        assert sr == rate, f.name
        assert wav.dtype == torch.float32 and wav.shape[0] == ch, f.name
        seconds = wav.shape[1] / sr
        assert abs(seconds - sf.info(f).duration) < 0.1, f.name
        assert 0.01 < wav.abs().max() <= 1.0 + 1e-3, f.name


def test_load_audio_shared_clips(shared_audio):
    for f in shared_audio:
        wav, sr = load_audio(f)
        info = sf.info(str(f))
        assert sr == info.samplerate and wav.shape == (info.channels, info.frames)
        assert torch.isfinite(wav).all()


@pytest.mark.parametrize(
    "kind,error,fragment",
    [
        ("empty", EmptyAudioError, "empty"),
        ("truncated", AudioDecodeError, "truncated"),
        ("text", AudioDecodeError, "not a readable audio file"),
        ("cut_wav", AudioDecodeError, "truncated: the header announces"),
    ],
)
def test_load_audio_bad_files(tmp_path, kind, error, fragment):
    files = write_bad_files(tmp_path)
    with pytest.raises(error) as exc:
        load_audio(files[kind])
    assert fragment in str(exc.value)
    assert str(files[kind]) in str(exc.value)  # the error names the file


def test_load_audio_missing_and_too_long(tmp_path):
    with pytest.raises(AudioDecodeError, match="file not found"):
        load_audio(tmp_path / "missing.wav")
    p = tmp_path / "long.wav"
    sf.write(p, np.zeros(16000 * 5, dtype=np.float32), 16000)
    with pytest.raises(AudioTooLongError, match="limit is 4 s"):
        load_audio(p, max_duration_s=4.0)


def test_frontend_checks(tmp_path):
    fe = AudioFrontEnd(FrontendConfig(min_duration_s=1.0, max_duration_s=10.0))
    files = write_bad_files(tmp_path)
    nan, sr = load_audio(files["nan"])
    with pytest.raises(NonFiniteAudioError, match="10 NaN or infinite samples"):
        fe.check(nan, sr, "nan.wav")
    short, sr = load_audio(files["short"])
    with pytest.raises(AudioTooShortError, match="minimum is 1 s"):
        fe.check(short, sr, "short.wav")
    with pytest.raises(AudioTooLongError):
        fe.check(torch.zeros(11 * 8000), 8000, "x")
    with pytest.raises(EmptyAudioError):
        fe.check(torch.zeros(2, 0), 8000, "x")
    loud, sr = load_audio(files["loud"])
    with pytest.raises(AudioRangeError, match="loud.wav: peak \\|sample\\| is 3e\\+38"):
        fe.check(loud, sr, "loud.wav")
    low, sr = load_audio(files["low_rate"])
    with pytest.raises(UnsupportedSampleRateError, match="7 Hz is outside"):
        fe.check(low, sr, "low_rate.wav")
    with pytest.raises(AudioShapeError, match="65 channels; at most 64"):
        fe.check(torch.zeros(65, 16000), 16000, "x")


def test_out_of_range_input_never_scores_nan(tiny_model):
    """Huge finite samples used to overflow the normalisation (NaN, or silence-like scores):
    every entry point now raises a typed error for that input only."""
    good = torch.from_numpy(synth_music(2.0, 24000)[0])
    with pytest.raises(AudioRangeError, match="waveforms\\[1\\]"):
        tiny_model([good, torch.full((48000,), 1e30)], 24000)
    with pytest.raises(AudioRangeError):
        tiny_model(torch.randn(48000, dtype=torch.float64) * 1e300, 24000)
    # integer-scaled floats are fine: normalisation is scale-invariant
    with torch.inference_mode():
        a = tiny_model(good[None], 24000).reward
        b = tiny_model(good[None] * 32767.0, 24000).reward
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    records = tiny_model.score(
        [good.numpy(), np.full(48000, 1e20, np.float32), good.numpy()], sample_rate=24000
    )
    assert [r.ok for r in records] == [True, False, True]
    assert records[1].error_type == "AudioRangeError"


@pytest.mark.parametrize(
    "rate,error",
    [
        (0, AudioShapeError),
        (-24000, AudioShapeError),
        (24000.7, AudioShapeError),
        (float("nan"), AudioShapeError),
        ("abc", AudioShapeError),
        (7, UnsupportedSampleRateError),
        (48_000_000, UnsupportedSampleRateError),
    ],
)
def test_bad_sample_rates_are_typed_errors_everywhere(tiny_model, rate, error):
    """forward and score validate array sample rates the same way (no ZeroDivisionError, no
    'audio is -2 s long', no silent truncation of 24000.7)."""
    x = np.zeros(48000, np.float32)
    with pytest.raises(error):
        tiny_model([torch.from_numpy(x)], rate)
    (r,) = tiny_model.score([x], sample_rate=rate)
    assert r.error_type == error.__name__, r


def test_os_errors_and_odd_file_names_are_typed(tmp_path):
    """A path the OS refuses is an AudioDecodeError naming the reason; a file name that is not
    valid UTF-8 is still decoded."""
    import os

    odd = os.fsdecode(b"caf\xe9.wav")  # latin-1 bytes: not UTF-8
    sf.write(os.fsencode(tmp_path / odd), synth_music(1.0, 16000).T, 16000)
    wav, sr = load_audio(tmp_path / odd)
    assert sr == 16000 and wav.shape[-1] == 16000
    with pytest.raises(AudioDecodeError, match="cannot open: File name too long"):
        load_audio(tmp_path / ("x" * 300 + ".wav"))


def test_streamed_wav_with_unknown_size_is_not_truncated(tmp_path):
    """Streaming writers leave 0xFFFFFFFF as the data size: complete, not a truncated file."""
    import struct

    p = tmp_path / "streamed.wav"
    sf.write(p, synth_music(1.0, 16000).T, 16000, subtype="PCM_16")
    data = bytearray(p.read_bytes())
    at = data.find(b"data")
    data[4:8] = data[at + 4 : at + 8] = struct.pack("<I", 0xFFFFFFFF)
    p.write_bytes(bytes(data))
    wav, sr = load_audio(p)
    assert wav.shape[-1] == 16000


def test_frontend_shape_errors():
    fe = AudioFrontEnd(FrontendConfig())
    with pytest.raises(AudioShapeError, match="looks like \\[samples, channels\\]"):
        fe([torch.zeros(48000, 2)], 24000)
    with pytest.raises(AudioShapeError, match="expected \\[T\\], \\[B, T\\] or \\[B, C, T\\]"):
        fe(torch.zeros(1, 1, 1, 48000), 24000)
    with pytest.raises(AudioShapeError, match="sample rate must be a positive integer"):
        fe(torch.zeros(1, 48000), 0)
    with pytest.raises(AudioShapeError, match="2 sample rates for 3 songs"):
        fe([torch.zeros(48000)] * 3, [24000, 24000])
    with pytest.raises(AudioShapeError, match="model.score"):
        fe("song.wav", 24000)


def test_segmentation_and_padding():
    fe = AudioFrontEnd(FrontendConfig(normalize=False))
    S = fe.config.segment_samples
    assert S == 720_000
    songs = [torch.randn(24000 * 5), torch.randn(24000 * 31), torch.randn(24000 * 60)]
    seg = fe(songs, 24000)
    assert seg.audio.shape == (1 + 2 + 2, S)
    assert seg.song_index.tolist() == [0, 1, 1, 2, 2]
    assert seg.valid.tolist() == [120000, S, 24000, S, S]
    assert seg.durations.tolist() == [120000, 744000, 1440000]
    # padding only inside the last segment, and it is exactly zero
    assert torch.equal(seg.audio[0, :120000], songs[0])
    assert (seg.audio[0, 120000:] == 0).all()
    assert torch.equal(seg.audio[2, :24000], songs[1][S:])


def test_normalisation_matches_wav2vec2_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    fe = AudioFrontEnd(FrontendConfig(segment_seconds=2.0))
    x = torch.from_numpy(synth_music(3.0, 24000)[0]) * 0.3 + 0.05
    seg = fe([x], 24000)
    ref = Wav2Vec2FeatureExtractor(do_normalize=True, sampling_rate=24000, feature_size=1)
    first = ref(x[:48000].numpy(), sampling_rate=24000, return_tensors="np").input_values[0]
    tail = ref(x[48000:].numpy(), sampling_rate=24000, return_tensors="np").input_values[0]
    np.testing.assert_allclose(seg.audio[0].numpy(), first, atol=1e-5)
    np.testing.assert_allclose(seg.audio[1, :24000].numpy(), tail, atol=1e-5)
    assert (seg.audio[1, 24000:] == 0).all()


@pytest.mark.parametrize("rate", [16000, 22050, 24000, 44100, 48000])
def test_downmix_resample_length_and_gradient(rate):
    fe = AudioFrontEnd(FrontendConfig(segment_seconds=4.0))
    x = torch.from_numpy(synth_music(2.0, rate, channels=2)).requires_grad_(True)
    seg = fe(x[None], rate)  # [1, C, T]
    assert seg.valid.tolist() == [48000]  # 2 s at 24 kHz
    seg.audio.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_downmix_is_channel_mean():
    fe = AudioFrontEnd(FrontendConfig(normalize=False))
    x = torch.randn(2, 24000 * 2)
    a = fe([x], 24000).audio
    b = fe([x.mean(0)], 24000).audio
    assert torch.allclose(a, b)


def test_resampled_tone_keeps_its_pitch():
    fe = AudioFrontEnd(FrontendConfig(normalize=False))
    t = torch.arange(44100 * 2) / 44100
    x = torch.sin(2 * torch.pi * 1000.0 * t)
    y = fe([x], 44100).audio[0, :48000]
    spectrum = torch.fft.rfft(y[4000:44000]).abs()
    peak_hz = spectrum.argmax().item() * 24000 / 40000
    assert abs(peak_hz - 1000.0) < 2.0


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_chunked_resampler_equals_julius(rate, monkeypatch):
    import julius

    fe = AudioFrontEnd(FrontendConfig())
    monkeypatch.setattr(AudioFrontEnd, "_RESAMPLE_BLOCK", 1000)  # many blocks
    x = torch.randn(2, rate * 3 + 7, requires_grad=True)
    got = fe.resample(x, rate)
    ref = julius.resample_frac(x, rate, 24000)
    assert got.shape == ref.shape and torch.equal(got, ref)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_resampler_cache_works_after_inference_mode():
    """A kernel cached during inference_mode scoring must still serve differentiable calls."""
    fe = AudioFrontEnd(FrontendConfig())
    with torch.inference_mode():
        fe.resample(torch.randn(44100), 44100)
    x = torch.randn(44100, requires_grad=True)
    fe.resample(x, 44100).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_decode_audio_bytes(tmp_path):
    from apex_reward.audio import decode_audio_bytes

    files = write_good_files(tmp_path)
    for f in files:
        a, sra = decode_audio_bytes(f.read_bytes(), name=f.name)
        b, srb = load_audio(f)
        assert sra == srb and torch.equal(a, b), f.name
    bad = write_bad_files(tmp_path / "bad")
    with pytest.raises(EmptyAudioError, match="upload.wav"):
        decode_audio_bytes(b"", name="upload.wav")
    with pytest.raises(AudioDecodeError, match="upload.mp3: not a readable audio file"):
        decode_audio_bytes(bad["text"].read_bytes(), name="upload.mp3")
    with pytest.raises(AudioDecodeError, match="truncated"):
        decode_audio_bytes(bad["truncated"].read_bytes(), name="t.flac")
    with pytest.raises(AudioDecodeError, match="t.wav: truncated"):
        decode_audio_bytes(bad["cut_wav"].read_bytes(), name="t.wav")


@pytest.mark.parametrize("rate", [44101, 47999, 8001, 96017])
def test_odd_sample_rates_resample_with_a_small_filter(rate):
    """An odd rate must not make the resampler build a gigabyte filter bank (44101/24000 in lowest
    terms): the ratio is approximated to under 2e-4, and the output length stays right."""
    from fractions import Fraction

    from apex_reward.audio import _bounded_ratio

    approx = _bounded_ratio(Fraction(rate, 24000))
    assert max(approx.numerator, approx.denominator) <= 1000
    assert abs(float(approx) / (rate / 24000) - 1) < 2e-4  # < 0.35 cents of pitch
    fe = AudioFrontEnd(FrontendConfig(normalize=False))
    t = torch.arange(rate) / rate
    y = fe.resample(torch.sin(2 * torch.pi * 1000.0 * t), rate)
    assert abs(y.shape[-1] - 24000) <= 24000 * 2e-4 + 1  # the length follows the approximated ratio
    kernel = next(iter(fe._resamplers.values())).kernel
    assert kernel.numel() < 2_000_000
    spectrum = torch.fft.rfft(y[2000:22000]).abs()
    assert abs(spectrum.argmax().item() * 24000 / 20000 - 1000.0) < 2.0
