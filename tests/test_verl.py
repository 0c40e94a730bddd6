"""The verl / verl-omni reward functions, driven the way verl drives them.

verl is not installed here: :func:`run_single` re-types its calling convention (``reward_kwargs``
bound to the function, sync or async chosen by ``inspect.iscoroutinefunction``, keyword arguments
only, ``solution_audio=(waveform, rate)`` for verl-omni or ``solution_str`` for plain verl, a
float or a dict with a finite ``"score"`` back). Rewards are checked against
``ApexRewardModel.score`` on the same audio under the same guard policy.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import fast_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.errors import (
    ApexError,
    AudioDecodeError,
    AudioShapeError,
    ConfigError,
    EmptyAudioError,
    NonFiniteAudioError,
    UnsupportedSampleRateError,
)
from apex_reward.integrations import verl as apex_verl
from apex_reward.integrations.model_cache import clear_model_cache

SR = 16000
REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# verl's side, re-typed


def bind_reward_kwargs(fn, reward_kwargs: dict):
    """What verl does with ``custom_reward_function``: bind ``reward_kwargs`` (they win over
    call-time keywords), keeping a coroutine function a coroutine function."""

    def call(raw, extra, *args, **kwargs):
        return raw(*args, **{**kwargs, **extra})

    async def acall(raw, extra, *args, **kwargs):
        return await raw(*args, **{**kwargs, **extra})

    return partial(acall if inspect.iscoroutinefunction(fn) else call, fn, dict(reward_kwargs))


async def run_single(compute_score, *, solution_audio=None, solution_str=None) -> dict:
    """One sample through a reward manager's ``run_single``: ``{"reward_score", "extra"}``."""
    kwargs = {"data_source": "music", "ground_truth": None, "extra_info": {"num_turns": 1}}
    if solution_str is None:
        kwargs["solution_audio"] = solution_audio
    else:
        kwargs["solution_str"] = solution_str
    if inspect.iscoroutinefunction(compute_score):
        result = await compute_score(**kwargs)
    else:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, lambda: compute_score(**kwargs))
    assert isinstance(result, dict)
    score = result["score"]
    assert isinstance(score, float) and math.isfinite(score)
    extra = {k: v for k, v in result.items() if k != "score"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in extra.values()), extra
    return {"reward_score": score, "extra": extra}


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def fast_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("verl") / "ckpt"
    fast_model().save_pretrained(d)
    yield d
    apex_verl.close_batchers()
    clear_model_cache()


@pytest.fixture(scope="module")
def reference(fast_checkpoint):
    return ApexRewardModel.from_pretrained(fast_checkpoint)


def clip(seed: int, seconds: float = 1.5) -> tuple[np.ndarray, int]:
    return synth_music(seconds, SR, seed=seed)[0].astype(np.float32), SR


def run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------------------------
# rewards


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_rewards_equal_model_score_under_the_same_guard(fast_checkpoint, reference, name):
    fn = bind_reward_kwargs(getattr(apex_verl, name), {"model": str(fast_checkpoint)})
    clips = [clip(1), clip(2, 2.5), clip(3)]
    got = [run(run_single(fn, solution_audio=c)) for c in clips]
    expected = reference.score(clips, guard="penalize")
    assert [r.flags for r in expected] == [[], [], ["held_tone"]]  # one flagged clip
    for g, r in zip(got, expected):
        assert g["reward_score"] == pytest.approx(r.reward, abs=1e-5)  # the floor when flagged
        assert g["extra"]["apex_flagged"] == float(bool(r.flags))
        assert g["extra"]["apex_failed"] == 0.0
        for k, v in r.scores.items():
            assert g["extra"][f"apex_{k}"] == pytest.approx(v, abs=1e-5)
        for k, v in r.signals.items():
            assert g["extra"][f"apex_signal_{k}"] == pytest.approx(v, abs=1e-5)
    # the same key set for every sample: verl stacks extras across samples
    assert len({tuple(sorted(g["extra"])) for g in got}) == 1


def test_score_name_weights_and_guard_off(fast_checkpoint, reference):
    clips = [clip(1), clip(3)]
    unguarded = reference.score(clips, guard="off")
    base = {"model": str(fast_checkpoint), "guard": "off"}
    fn = bind_reward_kwargs(apex_verl.compute_score, {**base, "score": "clarity"})
    got = [run(run_single(fn, solution_audio=c)) for c in clips]
    assert [g["reward_score"] for g in got] == pytest.approx(
        [r.scores["clarity"] for r in unguarded], abs=1e-5
    )
    assert not any(k.startswith("apex_signal_") for k in got[0]["extra"])  # no checks ran
    weights = {"clarity": 0.5, "reward": 2.0}
    fn = bind_reward_kwargs(apex_verl.compute_score_async, {**base, "score": weights})
    got = [run(run_single(fn, solution_audio=c)) for c in clips]
    expected = [0.5 * r.scores["clarity"] + 2.0 * r.reward for r in unguarded]
    assert [g["reward_score"] for g in got] == pytest.approx(expected, abs=1e-5)
    # a flagged clip under penalize gets the bottom of the selected score's range
    fn = bind_reward_kwargs(
        apex_verl.compute_score, {"model": str(fast_checkpoint), "score": "clarity"}
    )
    assert run(run_single(fn, solution_audio=clips[1]))["reward_score"] == 1.0


def test_32_concurrent_async_calls_share_at_most_4_batches(fast_checkpoint, reference):
    kwargs = {"model": str(fast_checkpoint), "max_wait_s": 0.05}
    fn = bind_reward_kwargs(apex_verl.compute_score_async, kwargs)
    assert inspect.iscoroutinefunction(fn)  # what verl-omni checks before awaiting it
    batcher = apex_verl.batcher_for(**kwargs)
    before_batches, before_clips = batcher.batches, batcher.clips
    clips = [clip(10 + i, 1.0 + 0.25 * (i % 4)) for i in range(32)]

    async def all_at_once():
        return await asyncio.gather(*(run_single(fn, solution_audio=c) for c in clips))

    got = run(all_at_once())
    assert batcher.clips - before_clips == 32
    assert 1 <= batcher.batches - before_batches <= 4
    expected = reference.score(clips, guard="penalize")
    assert [g["reward_score"] for g in got] == pytest.approx([r.reward for r in expected], abs=1e-5)


def test_plain_verl_text_goes_through_the_decoder(fast_checkpoint, reference):
    kwargs = {"model": str(fast_checkpoint), "decoder": "verl_text_decoder:decode"}
    expected = reference.score([clip(1), clip(2, 2.5)], guard="penalize")
    for name in ("compute_score", "compute_score_async"):
        fn = bind_reward_kwargs(getattr(apex_verl, name), kwargs)
        got = [run(run_single(fn, solution_str=s)) for s in ("song 1", "song 2 2.5")]
        assert [g["reward_score"] for g in got] == pytest.approx(
            [r.reward for r in expected], abs=1e-5
        )
        with pytest.raises(AudioDecodeError, match="decoder raised ValueError"):
            run(run_single(fn, solution_str="no music here"))
    no_decoder = bind_reward_kwargs(apex_verl.compute_score, {"model": str(fast_checkpoint)})
    with pytest.raises(ConfigError, match="decoder"):
        run(run_single(no_decoder, solution_str="song 1"))


# ----------------------------------------------------------------------------------------------
# failures: typed errors, or the configured failure value


BAD = [
    (None, AudioDecodeError),
    ((np.zeros(0, np.float32), SR), EmptyAudioError),
    ((np.concatenate([clip(1)[0][:100], [np.nan], clip(1)[0][101:]]), SR), NonFiniteAudioError),
    ((clip(1)[0], 0), AudioShapeError),
    ((clip(1)[0], 7), UnsupportedSampleRateError),
    ((clip(1)[0], 16000.5), AudioShapeError),
    ((np.zeros((2, 2, 100), np.float32), SR), AudioShapeError),
    ("not a tuple", AudioShapeError),
]


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
@pytest.mark.parametrize(("audio", "error"), BAD)
def test_bad_input_raises_a_typed_error(fast_checkpoint, name, audio, error):
    fn = bind_reward_kwargs(getattr(apex_verl, name), {"model": str(fast_checkpoint)})
    with pytest.raises(error) as info:
        run(run_single(fn, solution_audio=audio))
    assert isinstance(info.value, ApexError) and isinstance(info.value, ValueError)
    assert "solution_audio" in str(info.value)


@pytest.mark.parametrize("name", ["compute_score", "compute_score_async"])
def test_failure_value_keeps_the_extras_key_set(fast_checkpoint, name):
    kwargs = {"model": str(fast_checkpoint), "failure_value": -1.0}
    fn = bind_reward_kwargs(getattr(apex_verl, name), kwargs)
    good = run(run_single(fn, solution_audio=clip(1)))
    bad = run(run_single(fn, solution_audio=(np.full(SR, np.nan, np.float32), SR)))
    assert bad["reward_score"] == -1.0
    assert bad["extra"]["apex_failed"] == 1.0 and good["extra"]["apex_failed"] == 0.0
    assert sorted(bad["extra"]) == sorted(good["extra"])


def test_bad_reward_kwargs_raise_config_errors(fast_checkpoint):
    sample = {"solution_audio": clip(1)}
    with pytest.raises(ConfigError, match="model is required"):
        apex_verl.compute_score(**sample)
    with pytest.raises(ConfigError, match="guard"):
        apex_verl.compute_score(**sample, model=str(fast_checkpoint), guard="strict")
    with pytest.raises(ConfigError, match="not an output"):
        apex_verl.compute_score(**sample, model=str(fast_checkpoint), score="loudness")
    with pytest.raises(ConfigError, match="failure_value"):
        apex_verl.compute_score(**sample, model=str(fast_checkpoint), failure_value=math.nan)
    with pytest.raises(ConfigError, match="module:function"):
        apex_verl.compute_score(**sample, model=str(fast_checkpoint), decoder="nocolon")
    with pytest.raises(ConfigError, match="cannot import"):
        apex_verl.compute_score(
            solution_str="song 1", model=str(fast_checkpoint), decoder="no_such_mod:f"
        )
    # what verl-omni adds with a reward router is accepted; a typo is warned about
    out = apex_verl.compute_score(**sample, model=str(fast_checkpoint), model_name="x")
    assert math.isfinite(out["score"])
    with pytest.warns(UserWarning, match="scor"):
        apex_verl.compute_score(**sample, model=str(fast_checkpoint), scor="clarity")


def test_example_config_names_these_functions(fast_checkpoint):
    cfg = yaml.safe_load((REPO / "examples" / "verl_reward.yaml").read_text())
    crf = cfg["reward"]["custom_reward_function"]
    module = crf["path"].removeprefix("pkg://")
    assert module == apex_verl.__name__
    fn = getattr(apex_verl, crf["name"])
    assert inspect.iscoroutinefunction(fn)
    kwargs = {**crf["reward_kwargs"], "model": str(fast_checkpoint)}
    got = run(run_single(bind_reward_kwargs(fn, kwargs), solution_audio=clip(1)))
    assert 0.0 <= got["reward_score"] <= 1.0
