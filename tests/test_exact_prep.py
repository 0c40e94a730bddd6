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


@pytest.mark.parametrize("resampler", ["exact", "soxr"])
def test_fast_paths_apply_the_ood_flag_and_penalty_like_model_score(tiny_model, resampler):
    """The decode thread measures the signal checks; the forward still adds the OOD flag and
    applies the policy: the floor for an OOD-only flag, or the smooth penalty when asked."""
    import copy

    from apex_reward.ood import fit_statistics, set_statistics, song_features

    model = copy.deepcopy(tiny_model)
    songs = [synth_music(1.5, 24000, seed=s)[0] for s in range(24)]
    with torch.no_grad():
        x = song_features(model.encode([torch.from_numpy(s) for s in songs], 24000))
    stats, info = fit_statistics(x, folds=3, seed=0)
    set_statistics(model, stats, info)
    model.config.ood.features = "layer_mean"
    model.config.ood.flag_percentile = 50.0  # about half of these songs lie beyond it
    clips = [(torch.from_numpy(synth_music(1.5, 24000, seed=100 + s)), 24000) for s in range(6)]
    prep = InferencePrep(model, ServeConfig(resampler=resampler, guard="penalize"))
    for weight in (0.0, 0.5):
        model.config.ood.penalty_weight = weight
        ref = model.score(clips, num_workers=0, guard="penalize")
        assert any("ood" in r.flags for r in ref) and not all("ood" in r.flags for r in ref)
        for (wav, sr), r in zip(clips, ref):
            p = prep(wav, sr)
            (g,) = score_waveforms(
                model, [("x", p.wav, p.sample_rate)], guard=prep.batcher_guard, checks=[p.checks]
            )
            g = prep.finish(g, p)
            assert g.flags == r.flags and g.ood == pytest.approx(r.ood, abs=1e-3)
            assert g.reward == pytest.approx(r.reward, abs=1e-5)
            if "ood" in r.flags and weight == 0.0:
                assert g.reward == 0.0  # the floor of the reward "overall"
            if "ood" in r.flags and weight > 0:
                assert (
                    0.0
                    < g.reward
                    < model.reward_from_scores(
                        {k: torch.tensor([v]) for k, v in g.scores.items()}
                    ).item()
                )  # penalised, not floored
