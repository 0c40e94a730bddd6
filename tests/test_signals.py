"""Signal checks (apex_reward.signals): probes are flagged by the expected check, real and clean
synthetic music is not, values are JSON-safe, thresholds live in the checkpoint config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import synth_music

from apex_reward.audio import load_audio
from apex_reward.config import ApexConfig, GuardConfig
from apex_reward.errors import ConfigError, EmptyAudioError, NonFiniteAudioError
from apex_reward.signals import FLAGS, SIGNAL_NAMES, guard_flags, measure_signals

SR = 24000
CONFIG = GuardConfig()


def _at(x: np.ndarray, rms_dbfs: float) -> np.ndarray:
    return (x / np.sqrt(np.mean(x**2)) * 10 ** (rms_dbfs / 20)).astype(np.float32)


def _probe(kind: str, seconds: float = 20.0) -> np.ndarray:
    rng = np.random.default_rng(0)
    n = int(seconds * SR)
    t = np.arange(n) / SR
    if kind == "silence":
        return np.zeros(n, np.float32)
    if kind == "noise_-80dBFS":
        return _at(rng.standard_normal(n), -80)
    if kind == "white_noise":
        return _at(rng.standard_normal(n), -15)
    if kind == "pink_noise":
        spec = np.fft.rfft(rng.standard_normal(n))
        f = np.fft.rfftfreq(n, 1 / SR)
        spec[1:] /= np.sqrt(f[1:])
        spec[0] = 0
        return _at(np.fft.irfft(spec, n), -15)
    if kind.startswith("sine_"):
        return (0.5 * np.sin(2 * np.pi * float(kind[5:]) * t)).astype(np.float32)
    if kind == "clipped_square":
        return np.clip(3 * np.sin(2 * np.pi * 110 * t), -1, 1).astype(np.float32)
    if kind == "dc":
        return np.full(n, 0.512, np.float32)
    if kind == "loop_2s":
        song = clean_song(0, 12.0, SR)
        return np.tile(song[4 * SR : 6 * SR], int(seconds / 2))
    raise ValueError(kind)


def clean_song(i: int, seconds: float, sr: int) -> np.ndarray:
    """A clean procedural song of the training corpus generator (quality parameters 0)."""
    from apex_reward.training.synthetic import QUALITY_PARAMS, render_song

    params = dict.fromkeys(QUALITY_PARAMS, 0.0)
    return render_song(params, seconds, sr, np.random.default_rng(1000 + i)).astype(np.float32)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("silence", {"too_quiet", "mostly_silent"}),
        ("noise_-80dBFS", {"too_quiet", "mostly_silent"}),
        ("white_noise", {"noise_like"}),
        ("pink_noise", {"noise_like"}),
        ("sine_220", {"held_tone"}),
        ("sine_440", {"held_tone"}),
        ("sine_1000", {"held_tone"}),
        ("clipped_square", {"clipped"}),
        ("dc", {"dc_offset"}),
        ("loop_2s", {"looped"}),
    ],
)
def test_probe_is_flagged_by_its_check(kind, expected):
    signals = measure_signals(_probe(kind), SR)
    flags = set(guard_flags(signals, CONFIG))
    assert expected <= flags, (kind, signals, flags)


def test_values_are_finite_and_json_safe_for_silence():
    for x in (np.zeros(3 * SR, np.float32), np.zeros((2, 3 * SR), np.float32)):
        s = measure_signals(x, SR)
        assert list(s) == list(SIGNAL_NAMES)
        assert all(isinstance(v, float) and np.isfinite(v) for v in s.values())
        json.dumps(s, allow_nan=False)  # raises on NaN/inf
        assert s["loudness_lufs"] == -200.0


def test_shared_clips_are_not_flagged(shared_audio):
    for path in shared_audio:
        wav, sr = load_audio(path)
        s = measure_signals(wav, sr)
        assert guard_flags(s, CONFIG) == [], (path.name, s)


def test_few_clean_synthetic_songs_are_flagged():
    rng = np.random.default_rng(7)
    songs = []
    for i in range(30):
        sr = int(rng.choice([22050, 24000, 44100]))
        songs.append((clean_song(i, float(rng.uniform(10, 30)), sr), sr))
    for i in range(30):
        songs.append((synth_music(float(rng.uniform(10, 30)), SR, seed=500 + i)[0], SR))
    flagged = [i for i, (x, sr) in enumerate(songs) if guard_flags(measure_signals(x, sr), CONFIG)]
    assert len(flagged) <= 0.02 * len(songs), flagged


def test_measurements_do_not_depend_much_on_rate_or_format():
    song = clean_song(3, 12.0, 48000)
    a = measure_signals(song, 48000)
    b = measure_signals(song[::2].copy(), 24000)  # crude decimation: content below 12 kHz
    ints = measure_signals((song * 32767).astype(np.int16), 48000)
    stereo = measure_signals(torch.from_numpy(np.stack([song, song])), 48000)
    assert abs(a["loudness_lufs"] - b["loudness_lufs"]) < 1.0
    assert abs(a["tonal_dominance"] - b["tonal_dominance"]) < 0.05
    assert abs(a["repetition"] - b["repetition"]) < 0.05
    assert abs(a["loudness_lufs"] - ints["loudness_lufs"]) < 0.01
    assert stereo == pytest.approx(a, abs=1e-6)


def test_level_is_caught_by_loudness():
    song = clean_song(4, 12.0, SR)
    loud, quiet = measure_signals(song, SR), measure_signals(song * 0.01, SR)
    assert loud["loudness_lufs"] - quiet["loudness_lufs"] == pytest.approx(40.0, abs=0.5)
    assert "too_quiet" in guard_flags(quiet, CONFIG)
    assert guard_flags(loud, CONFIG) == []


def test_ten_minute_file_is_measured():
    x = np.tile(clean_song(5, 20.0, 22050), 30)  # 10 min
    s = measure_signals(x, 22050)
    assert all(np.isfinite(v) for v in s.values())
    # the song's own measurement, not a loop: its period (20 s) is beyond the 1-4 s of the check
    assert s["repetition"] < CONFIG.max_repetition


def test_policy_off_and_disabled_thresholds():
    s = measure_signals(_probe("silence", 3.0), SR)
    assert guard_flags(s, GuardConfig(policy="off")) == []
    off = GuardConfig(min_loudness_lufs=None, max_silent_fraction=None)
    assert guard_flags(s, off) == []
    assert set(FLAGS) == {
        "too_quiet",
        "mostly_silent",
        "dc_offset",
        "clipped",
        "noise_like",
        "held_tone",
        "looped",
    }


def test_bad_input_raises_typed_errors():
    with pytest.raises(EmptyAudioError):
        measure_signals(np.zeros(0, np.float32), SR)
    x = np.zeros(SR, np.float32)
    x[10] = np.nan
    with pytest.raises(NonFiniteAudioError):
        measure_signals(x, SR)


def test_guard_config_is_recorded_and_old_configs_load():
    cfg = ApexConfig.from_preset("tiny")
    d = cfg.to_dict()
    assert d["guard"]["policy"] == "flag" and d["guard"]["max_repetition"] == 0.9
    old = {k: v for k, v in d.items() if k != "guard"}
    assert ApexConfig.from_dict(old).guard == GuardConfig()
    d["guard"]["max_dc_offset"] = 0.1
    assert ApexConfig.from_dict(d).guard.max_dc_offset == 0.1
    with pytest.raises(ConfigError):
        ApexConfig.from_dict({**d, "guard": {"policy": "maybe"}})
    with pytest.raises(ConfigError):
        GuardConfig(max_repetition=float("nan"))
