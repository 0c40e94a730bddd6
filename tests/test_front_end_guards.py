"""Silence- and level-aware front end: trimming, silent-segment weights, the gradient gate, and
legacy behaviour for configs written before these fields existed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import synth_music

from apex_reward.audio import AudioFrontEnd, load_audio
from apex_reward.config import NEW_FRONTEND, ApexConfig, FrontendConfig
from apex_reward.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 44100
LEGACY = dict(
    trim_silence=False, silent_segment_db=None, normalize_floor=1e-7, gradient_gate_db=None
)


def _song(seconds: float = 6.0, seed: int = 3) -> torch.Tensor:
    return torch.from_numpy(synth_music(seconds, SR, channels=2, seed=seed))


def _reward(model, wav: torch.Tensor, sr: int = SR) -> float:
    with torch.no_grad():
        return float(model([wav], sr).reward)


def _grad_norm(model, wav: torch.Tensor, sr: int) -> float:
    x = wav.clone().requires_grad_(True)
    model([x], sr).reward.sum().backward()
    return float(x.grad.norm())


def _legacy_model(model):
    legacy = copy.deepcopy(model)
    raw = legacy.config.to_dict()
    for key in LEGACY:
        raw["frontend"].pop(key)
    raw["frontend"].pop("trim_threshold_db")
    legacy.config = ApexConfig.from_dict(raw)  # an old config.json: fields absent
    legacy.frontend = AudioFrontEnd(legacy.config.frontend)
    return legacy


def test_new_configs_turn_the_guards_on_and_defaults_keep_the_old_behaviour():
    new = ApexConfig.from_preset("tiny").frontend
    for key, value in NEW_FRONTEND.items():
        assert getattr(new, key) == value
    old = FrontendConfig()
    for key, value in LEGACY.items():
        assert getattr(old, key) == value


@pytest.mark.parametrize("seconds", [1, 5])
@pytest.mark.parametrize("side", ["leading", "trailing"])
def test_padding_with_digital_silence_does_not_move_scores(tiny_model, seconds, side):
    song = _song()
    pad = torch.zeros(2, seconds * SR)
    padded = torch.cat([pad, song], -1) if side == "leading" else torch.cat([song, pad], -1)
    base = _reward(tiny_model, song)
    assert abs(_reward(tiny_model, padded) - base) <= 1e-3
    # the old front end did move (documents what the trimming fixes)
    legacy = _legacy_model(tiny_model)
    assert abs(_reward(legacy, padded) - _reward(legacy, song)) > 1e-3


def test_padding_a_real_clip(tiny_model, shared_audio):
    wav, sr = load_audio(shared_audio[0])
    base = _reward(tiny_model, wav, sr)
    for seconds in (1, 5):
        pad = torch.zeros(wav.shape[0], seconds * sr)
        for padded in (torch.cat([pad, wav], -1), torch.cat([wav, pad], -1)):
            assert abs(_reward(tiny_model, padded, sr) - base) <= 1e-3


def test_level_does_not_move_scores(tiny_model):
    song = _song()
    assert _reward(tiny_model, song * 0.01) == pytest.approx(_reward(tiny_model, song), abs=1e-4)


@pytest.mark.parametrize("kind", ["silence", "noise_-80dBFS", "dc"])
def test_gradient_of_silence_noise_floor_and_dc_is_bounded(tiny_model, kind):
    n = 10 * SR
    probe = {
        "silence": torch.zeros(n),
        "noise_-80dBFS": 1e-4 * torch.randn(n, generator=torch.Generator().manual_seed(0)),
        "dc": torch.full((n,), 0.5),
    }[kind]
    real = _grad_norm(tiny_model, _song(10.0).mean(0), SR)
    g = _grad_norm(tiny_model, probe, SR)
    assert np.isfinite(g) and g <= 10 * real, (g, real)
    # the old front end: exploding or far larger
    legacy = _legacy_model(tiny_model)
    old = _grad_norm(legacy, probe, SR)
    assert not np.isfinite(old) or old > 100 * real


def test_all_silent_clip_is_scored(tiny_model):
    x = torch.zeros(2, 3 * SR, requires_grad=True)
    out = tiny_model([x], SR)
    assert torch.isfinite(out.reward).all()
    out.reward.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_silent_segments_get_no_weight(tiny_model):
    fe = tiny_model.frontend
    S = fe.config.segment_samples
    music = torch.from_numpy(synth_music(30.0, 24000, seed=1)[0])
    song = torch.cat([music, torch.zeros(S), music[: S // 3]])
    segs = fe.segment([song, torch.zeros(S + 100)])
    w = fe.segment_weights(segs)
    assert segs.song_index.tolist() == [0, 0, 0, 1, 1]
    assert w[:3].tolist() == [S, 0.0, S // 3]
    assert w[3:].tolist() == [S, 100.0]  # all silent: weights kept, the song still has a score
    assert segs.level_db[1] == pytest.approx(-200.0)


def test_gradient_gate_keeps_values_and_stops_gradient_below_the_gate(tiny_model):
    fe = tiny_model.frontend
    x = torch.from_numpy(synth_music(4.0, 24000, seed=2)[0])
    quiet = (x * 1e-5).requires_grad_(True)  # about -110 dBFS: below the gate
    loud = x.clone().requires_grad_(True)
    ungated = AudioFrontEnd(FrontendConfig(**{**NEW_FRONTEND, "gradient_gate_db": None}))
    a = fe.segment([quiet, loud])
    b = ungated.segment([quiet, loud])
    assert torch.equal(a.audio, b.audio)
    a.audio.square().sum().backward()
    assert torch.count_nonzero(quiet.grad) == 0
    assert torch.count_nonzero(loud.grad) > 0


def test_old_config_scores_exactly_like_the_old_front_end(tiny_model):
    """A config.json without the new fields: no trimming, variance floor 1e-7, duration weights;
    compared against the original formula written out here."""
    legacy = _legacy_model(tiny_model)
    assert legacy.config.frontend.normalize_floor == 1e-7
    song = torch.cat([torch.zeros(2, SR), _song(), torch.zeros(2, SR)], -1)
    mono = legacy.frontend.resample(song.mean(0), SR)
    S = legacy.config.frontend.segment_samples
    n = mono.shape[0]
    seg = torch.nn.functional.pad(mono, (0, S - n))[None]
    centred = seg[:, :n] - seg[:, :n].mean()
    var = (centred * centred).mean()
    expected = torch.nn.functional.pad(centred / torch.sqrt(var + 1e-7), (0, S - n))
    got = legacy.frontend([song], SR)
    assert torch.allclose(got.audio, expected, atol=1e-6)
    assert got.valid.tolist() == [n]
    feats = legacy.encode([song], SR)
    assert feats.weights.tolist() == [float(n)]
    with torch.no_grad():
        out = legacy([song], SR).reward
        ref = legacy.predict_from_features(feats).reward
    assert torch.equal(out, ref)


def test_invalid_frontend_fields_raise():
    with pytest.raises(ConfigError, match="normalize_floor"):
        FrontendConfig(normalize_floor=0.0)
    with pytest.raises(ConfigError, match="silent_segment_db"):
        FrontendConfig(silent_segment_db=float("inf"))
    with pytest.raises(ConfigError, match="trim_threshold_db"):
        FrontendConfig(trim_threshold_db=3.0)
