"""``--resampler exact``: the decode threads run the model's own downmix, trim and resampler, so
a clip scored through the server's preparation gets exactly what in-process ``model.score``
gives: scores, reward, signals, flags and the penalised floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synth_music

from apex_reward.integrations.serving import ServeConfig
from apex_reward.integrations.serving.prepare import InferencePrep
from apex_reward.scoring import score_waveforms

pytestmark = pytest.mark.usefixtures("one_thread")


def _clips() -> list[tuple[torch.Tensor, int]]:
    clips = [
        (torch.from_numpy(synth_music(2.0, sr, channels=ch, seed=sr)), sr)
        for sr, ch in ((44100, 2), (16000, 1))
    ]
    # digital silence around the music: trimmed at 44.1 kHz before resampling
    x = synth_music(1.5, 44100, channels=2, seed=5)
    pad = np.zeros((2, 30000), dtype=np.float32)
    clips.append((torch.from_numpy(np.concatenate([pad, x, pad[:, :7001]], axis=1)), 44100))
    clips.append((torch.zeros(2, 44100), 44100))  # silent: flagged, the floor under penalize
    return clips


def test_exact_preparation_scores_like_model_score(tiny_model):
    prep = InferencePrep(tiny_model, ServeConfig(resampler="exact", guard="penalize"))
    assert prep.fast and prep.batcher_guard == "penalize"
    clips = _clips()
    ref = tiny_model.score(clips, num_workers=0, guard="penalize")
    got = []
    for wav, sr in clips:
        p = prep(wav, sr)
        assert p.sample_rate == 24000 and p.wav.ndim == 1
        (r,) = score_waveforms(
            tiny_model, [("x", p.wav, p.sample_rate)], guard=prep.batcher_guard, checks=[p.checks]
        )
        got.append(prep.finish(r, p))
    for g, r in zip(got, ref):
        assert g.ok and r.ok
        assert g.reward == r.reward  # the same samples reach the encoder
        assert g.scores == r.scores
        assert g.flags == r.flags and g.signals == r.signals
        assert g.duration_s == pytest.approx(r.duration_s)
    assert got[-1].flags and not got[0].flags
