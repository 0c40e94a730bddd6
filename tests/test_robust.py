"""The robust reward: ``model(x, sample_rate, robust=K, seed=s)`` (apex_reward.robust)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, synth_music

from apex_reward.errors import ConfigError
from apex_reward.robust import GAIN_DB, apply_transform, draw_transforms

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(seed=3)


@pytest.fixture(scope="module")
def songs():
    return [torch.from_numpy(synth_music(3.0, SR, seed=s)[0]) for s in (1, 2)]


def test_robust_reward_is_the_mean_over_its_transforms(model, songs):
    k, seed = 3, 7
    with torch.no_grad():
        out = model(songs, SR, robust=k, seed=seed, guard="off")
        seg = int(model.config.frontend.segment_seconds * SR)
        draws = draw_transforms(k, [len(s) for s in songs], [seg, seg], seed)
        by_hand = torch.stack(
            [
                model([apply_transform(s, draws[i][d]) for i, s in enumerate(songs)], SR).reward
                for d in range(k)
            ]
        ).mean(0)
        plain = model(songs, SR, guard="off").reward
    assert out.reward.shape == (2,) and set(out.scores) == set(model.score_names)
    torch.testing.assert_close(out.reward, by_hand, atol=1e-5, rtol=0)
    # the transforms do change what the model sees
    assert not torch.allclose(out.reward, plain, atol=1e-6)
    # every draw stays within the documented ranges
    for d in draws[0] + draws[1]:
        assert -4 <= d.stretch <= 4 and abs(d.gain_db) <= GAIN_DB and 0 <= d.offset < seg


def test_deterministic_for_a_seed_and_independent_of_the_batch(model, songs):
    with torch.no_grad():
        a = model(songs, SR, robust=2, seed=11, guard="off").reward
        b = model(songs, SR, robust=2, seed=11, guard="off").reward
        c = model(songs, SR, robust=2, seed=12, guard="off").reward
        alone = model(songs[:1], SR, robust=2, seed=11, guard="off").reward
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-7)
    torch.testing.assert_close(alone[0], a[0], atol=1e-5, rtol=0)


def test_robust_reward_is_differentiable(model, songs):
    x = songs[0].clone().requires_grad_(True)
    out = model(x[None], SR, robust=2, seed=0, guard="off")
    out.reward.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_guard_checks_the_song_as_given(model):
    """Noise at -50 dBFS must not hide silence from the signal checks."""
    silence = torch.zeros(3 * SR)
    with torch.no_grad():
        out = model(silence[None], SR, robust=2, seed=0, guard="penalize")
    assert out.flags is not None and out.flags[0]
    assert float(out.reward[0]) == 0.0


def test_bad_robust_values_are_typed_errors(model, songs):
    for bad in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="robust"):
            model(songs, SR, robust=bad, guard="off")


def test_trl_reward_function_uses_the_robust_reward(model, songs):
    """TRL's calling convention: ``fn(prompts=..., completions=..., **kwargs)``, completions as
    ``(waveform, sample_rate)`` tuples; robust=K gives the robust reward for that seed."""
    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    fn = ApexRewardFunction(model, guard="off", robust=2, robust_seed=5, log_scores=False)
    plain_fn = ApexRewardFunction(model, guard="off", log_scores=False)
    completions = [(s.numpy(), SR) for s in songs]
    values = fn(prompts=["p0", "p1"], completions=completions, trainer_state=None)
    plain = plain_fn(prompts=["p0", "p1"], completions=completions)
    with torch.no_grad():
        expected = model(songs, SR, robust=2, seed=5, guard="off").reward
    assert values == pytest.approx(expected.tolist(), abs=1e-5)
    assert values != pytest.approx(plain, abs=1e-6)
    with pytest.raises(ConfigError, match="robust"):
        ApexRewardFunction(model, robust=-2)


def test_server_batcher_scores_with_the_robust_reward(model, songs):
    """The reward server's batch loop (``serve --robust K``) returns the robust reward."""
    import asyncio

    from apex_reward.integrations.serving.batcher import DynamicBatcher
    from apex_reward.integrations.serving.config import ServeConfig

    batcher = DynamicBatcher(model, max_batch=4, max_wait_s=0.2, robust=2, robust_seed=9)
    batcher.start()

    async def submit_all():
        return await asyncio.gather(*(batcher.score(f"c{i}", s, SR) for i, s in enumerate(songs)))

    try:
        results = asyncio.run(submit_all())
    finally:
        batcher.stop()
    with torch.no_grad():
        expected = model(songs, SR, robust=2, seed=9).reward
    assert [r.reward for r in results] == pytest.approx(expected.tolist(), abs=1e-5)
    with pytest.raises(ConfigError, match="robust"):
        ServeConfig(robust=-1)
