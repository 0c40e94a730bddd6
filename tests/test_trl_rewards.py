"""The TRL reward function and best-of-N.

The reward function is checked against ``ApexRewardModel.score`` on the same audio, pickled, run
with broken completions, called the way TRL calls it (``log_metric``, ``completion_ids``,
``trainer_state``) and run inside TRL's ``GRPOTrainer`` (async variant) for two steps.
"""

from __future__ import annotations

import asyncio
import math
import pickle

import numpy as np
import pytest
import torch
from conftest import fast_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.errors import ConfigError
from apex_reward.integrations.model_cache import clear_model_cache
from apex_reward.integrations.score_spec import score_value
from apex_reward.integrations.trl_rewards import (
    ApexRewardFunction,
    AsyncApexRewardFunction,
    best_of_n,
)

SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


class SeedDecoder:
    """Completion ``"song <seed> [<seconds>]"`` -> synthetic music; anything else raises."""

    def __call__(self, completion: str):
        parts = completion.split()
        if not parts or parts[0] != "song":
            raise ValueError(f"not a song: {completion!r}")
        seconds = float(parts[2]) if len(parts) > 2 else 1.5
        if parts[1] == "none":
            return None
        wav = synth_music(seconds, SR, seed=int(parts[1]))[0]
        if parts[1] == "7":
            wav = wav.copy()
            wav[100] = np.nan
        return wav, SR


@pytest.fixture(scope="module")
def fast_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast") / "ckpt"
    fast_model().save_pretrained(d)
    return d


def test_values_equal_model_score_on_the_same_audio(fast_checkpoint):
    fn = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder(), score="clarity")
    completions = ["song 1", "song 2 2.5", "song 3"]
    results = fn.score_completions(completions)
    values = fn(prompts=["p"] * 3, completions=completions)
    audio = [(synth_music(s, SR, seed=k)[0], SR) for k, s in ((1, 1.5), (2, 2.5), (3, 1.5))]
    # the reward function guards by default (penalize): a flagged completion gets the bottom of
    # the score's range; the others equal the model's own scores under the same policy
    expected = ApexRewardModel.from_pretrained(fast_checkpoint).score(audio, guard="penalize")
    assert [r.flags for r in expected] == [[], [], ["held_tone"]]  # "song 3": one partial
    assert values == [1.0 if r.flags else r.scores["clarity"] for r in expected]
    assert [r.flags for r in results] == [r.flags for r in expected]
    unguarded = ApexRewardFunction(
        fast_checkpoint, decoder=SeedDecoder(), score="clarity", guard="off"
    )
    assert unguarded(prompts=["p"] * 3, completions=completions) == [
        r.scores["clarity"] for r in expected
    ]
    assert [r.scores for r in results] == [r.scores for r in expected]
    assert [r.reward for r in results] == [r.reward for r in expected]
    # the default is the checkpoint's reward; weights combine named scores and "reward"
    reward_fn = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder())
    assert reward_fn.__name__ == "apex_reward"
    assert reward_fn.values(results) == [r.reward for r in expected]
    weighted = ApexRewardFunction(
        fast_checkpoint, decoder=SeedDecoder(), score={"overall": 2.0, "musicality": -0.5}
    )
    assert weighted.__name__ == "apex_weighted"
    for v, r in zip(weighted.values(results), expected):
        # a flagged clip gets the lowest value the weights can give: 2 * 0 - 0.5 * 5
        want = -2.5 if r.flags else 2.0 * r.scores["overall"] - 0.5 * r.scores["musicality"]
        assert v == pytest.approx(want)


def test_one_value_per_completion_and_none_for_undecodable(fast_checkpoint):
    fn = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder(), score="overall")
    completions = [
        "song 1",  # fine
        "lyrics about rain",  # the decoder raises
        "song none",  # the decoder returns None
        "song 2 0.2",  # too short for the model (0.5 s minimum)
        "song 7",  # NaN samples
        "song 3",  # fine
    ]
    values = fn(prompts=["p"] * len(completions), completions=completions)
    assert len(values) == len(completions)
    assert [v is None for v in values] == [False, True, True, True, True, False]
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in (values[0], values[5]))
    results = fn.score_completions(completions)
    assert [r.error_type for r in results] == [
        None,
        "ValueError",
        "AudioDecodeError",
        "AudioTooShortError",
        "NonFiniteAudioError",
        None,
    ]
    # a penalty instead of None, when asked for
    penalised = ApexRewardFunction(
        fast_checkpoint, decoder=SeedDecoder(), score="overall", failure_value=-1.0
    )
    assert penalised(None, completions) == [v if v is not None else -1.0 for v in values]


def test_completions_that_already_are_audio(fast_checkpoint, tmp_path):
    import soundfile as sf

    path = tmp_path / "a.wav"
    sf.write(path, synth_music(1.5, SR, seed=4).T, SR)
    wav = synth_music(1.5, SR, seed=5)[0]
    fn = ApexRewardFunction(fast_checkpoint, sample_rate=SR)
    values = fn(
        None,
        [
            str(path),
            (wav, SR),
            torch.from_numpy(wav),  # bare waveform: uses sample_rate=
            [{"role": "assistant", "content": str(path)}],  # conversational: last message
            str(tmp_path / "missing.wav"),
        ],
    )
    assert values[0] is not None and values[0] == values[3]
    assert values[1] == values[2] is not None
    assert values[4] is None


def test_pickle_round_trip_does_not_carry_the_model(fast_checkpoint):
    fn = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder(), score="coherence")
    completions = ["song 1", "nope", "song 2"]
    before = fn(None, completions)
    assert fn._model is not None  # loaded by the call
    blob = pickle.dumps(fn)
    assert len(blob) < 4096  # a path and options, not weights
    clear_model_cache()  # as in a fresh worker process
    copy = pickle.loads(blob)
    assert copy._model is None and copy.__name__ == "apex_coherence"
    assert copy(None, completions) == before
    assert copy.model is not fn.model  # loaded again after the cache was cleared


def test_in_memory_model_cannot_be_pickled_but_can_be_copied():
    import copy

    model = fast_model()
    fn = ApexRewardFunction(model, decoder=SeedDecoder())
    with pytest.raises(TypeError, match="checkpoint directory"):
        pickle.dumps(fn)
    dup = copy.deepcopy(fn)
    assert dup.model is model  # the frozen model is shared, not copied


def test_processes_share_one_model_per_checkpoint(fast_checkpoint, tmp_path):
    a = ApexRewardFunction(fast_checkpoint, score="overall")
    b = ApexRewardFunction(fast_checkpoint, score={"clarity": 1.0})
    assert a.model is b.model
    # a checkpoint rewritten at the same path is loaded again, not served from the cache
    fast_model(seed=1).save_pretrained(tmp_path / "c")
    first = ApexRewardFunction(tmp_path / "c").model
    fast_model(seed=2).save_pretrained(tmp_path / "c")
    second = ApexRewardFunction(tmp_path / "c").model
    assert second is not first
    assert not torch.equal(first.head.aggregate.weight, second.head.aggregate.weight)


def test_log_metric_and_trl_keyword_arguments(fast_checkpoint):
    logged: dict[str, list[float]] = {}

    def log_metric(name: str, value: float) -> None:
        logged.setdefault(name, []).append(value)

    fn = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder(), name="apex")
    completions = ["song 1", "song 2", "bad"]
    values = fn(
        prompts=["a", "b", "c"],
        completions=completions,
        completion_ids=[[1], [2], [3]],
        trainer_state=object(),
        log_extra=lambda column, values: None,
        log_metric=log_metric,
        some_dataset_column=["x", "y", "z"],
    )
    results = fn.score_completions(completions)
    from apex_reward.signals import SIGNAL_NAMES

    always = {f"apex/{n}" for n in (*fn.score_names, "reward", "failed", "flagged")}
    always |= {f"apex/signal_{s}" for s in SIGNAL_NAMES}
    assert set(logged) >= always
    assert all(k.startswith("apex/flag_") for k in set(logged) - always)  # flags that fired
    assert logged["apex/signal_loudness_lufs"] == [
        pytest.approx(
            (results[0].signals["loudness_lufs"] + results[1].signals["loudness_lufs"]) / 2
        )
    ]
    assert logged["apex/failed"] == [pytest.approx(1 / 3)]
    assert logged["apex/clarity"] == [
        pytest.approx((results[0].scores["clarity"] + results[1].scores["clarity"]) / 2)
    ]
    assert logged["apex/reward"] == [pytest.approx((values[0] + values[1]) / 2)]


def test_decode_from_completion_ids_and_batched_decoder(fast_checkpoint):
    def from_ids(ids):
        return SeedDecoder()(f"song {ids[0]}")

    fn = ApexRewardFunction(fast_checkpoint, decoder=from_ids, decode_from="completion_ids")
    text = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder())
    expected = text(None, ["song 3", "song 4"])
    assert fn(None, ["ignored", "ignored"], completion_ids=[[3], [4]]) == expected
    with pytest.raises(ConfigError, match="completion_ids"):
        fn(None, ["x"])

    calls = []

    def batched(items):
        calls.append(len(items))
        return [SeedDecoder()(c) if c.startswith("song") else None for c in items]

    fb = ApexRewardFunction(fast_checkpoint, decoder=batched, batched_decoder=True)
    assert fb(None, ["song 3", "x", "song 4"]) == [expected[0], None, expected[1]]
    assert calls == [3]
    wrong = ApexRewardFunction(fast_checkpoint, decoder=lambda items: [], batched_decoder=True)
    assert wrong(None, ["song 3"]) == [None]


def test_async_variant(fast_checkpoint):
    import copy
    import inspect

    from trl.trainer.utils import is_async_callable

    sync = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder())
    afn = AsyncApexRewardFunction(fast_checkpoint, decoder=SeedDecoder())
    assert is_async_callable(afn) and not is_async_callable(sync)
    # the plain stdlib check some TRL versions use on the reward function object itself
    for fn in (afn, pickle.loads(pickle.dumps(afn)), copy.deepcopy(afn), copy.copy(afn)):
        assert inspect.iscoroutinefunction(fn) and asyncio.iscoroutinefunction(fn)
    assert not inspect.iscoroutinefunction(sync)
    assert not inspect.iscoroutinefunction(AsyncApexRewardFunction)  # the class is not
    assert list(inspect.signature(afn).parameters) == ["prompts", "completions", "kwargs"]
    completions = ["song 1", "bad", "song 2"]

    async def both():
        return await asyncio.gather(afn(None, completions), afn(None, completions[::-1]))

    first, second = asyncio.run(both())
    assert first == sync(None, completions)
    assert second == first[::-1]
    assert asyncio.run(pickle.loads(pickle.dumps(afn))(None, completions[:1])) == first[:1]


def test_bad_options_are_reported(fast_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match="'loudness' is not an output"):
        ApexRewardFunction(fast_checkpoint, score="loudness")
    with pytest.raises(ConfigError, match="weight of 'clarity'"):
        ApexRewardFunction(fast_checkpoint, score={"clarity": math.nan})
    with pytest.raises(ConfigError, match="decode_from"):
        ApexRewardFunction(fast_checkpoint, decode_from="tokens")
    with pytest.raises(ConfigError, match="prompts"):
        ApexRewardFunction(fast_checkpoint)(["a"], ["x", "y"])
    from apex_reward.errors import CheckpointError

    with pytest.raises(CheckpointError):
        ApexRewardFunction(tmp_path / "nowhere")


def test_score_value_handles_failures():
    from apex_reward.scoring import ScoreResult

    ok = ScoreResult("a", scores={"overall": 0.25, "clarity": 3.0}, reward=0.5)
    assert score_value(ok) == 0.5
    assert score_value(ok, {"overall": 2.0, "reward": 1.0}) == 1.0
    assert score_value(ScoreResult("b", error="x", error_type="E")) is None
    assert (
        score_value(ScoreResult("c", scores={"overall": math.nan}, reward=0.1), "overall") is None
    )


def test_best_of_n(fast_checkpoint):
    fn = ApexRewardFunction(fast_checkpoint, decoder=SeedDecoder(), score="overall")
    groups = [["song 1", "song 2", "bad", "song 3"], ["bad", "song none"], ["song 4"]]
    best = best_of_n(fn, groups)
    assert len(best) == 3
    values = fn(None, groups[0])
    i = int(np.nanargmax([np.nan if v is None else v for v in values]))
    assert best[0].index == i and best[0].candidate == groups[0][i]
    assert best[0].value == values[i] == best[0].scores["overall"]
    assert best[0].values == values and len(best[0].results) == 4
    assert best[1].index is None and best[1].candidate is None and best[1].values == [None, None]
    assert best[2].index == 0
    # built from a path with the same options: same answer
    again = best_of_n(fast_checkpoint, groups[:1], decoder=SeedDecoder(), score="overall")
    assert again[0].index == i


def _grpo_args(tmp_path, **overrides):
    """GRPOConfig for a CPU smoke run of the tiny note policy (4 generations of 8 tokens)."""
    from trl import GRPOConfig

    return GRPOConfig(
        **{
            "output_dir": str(tmp_path),
            "num_generations": 4,
            "max_completion_length": 8,
            "save_strategy": "no",
            "report_to": "none",
            "use_cpu": True,
            "bf16": False,
            "seed": 0,
            "disable_tqdm": True,
            **overrides,
        }
    )


@pytest.mark.parametrize("detection", ["trl", "iscoroutinefunction"])
def test_grpo_trainer_runs_with_the_async_reward_function(
    fast_checkpoint, tmp_path, monkeypatch, detection
):
    """TRL's GRPOTrainer (CPU, GPT-2 from a config, local tokenizer) calls the reward function
    through its async event loop, with log_metric; two optimiser steps. ``iscoroutinefunction``:
    the trainer decides what to await with ``inspect.iscoroutinefunction(reward_func)`` alone,
    as some TRL versions do (a plain async callable instance would be called synchronously)."""
    import inspect
    import sys

    if detection == "iscoroutinefunction":
        import trl.trainer.grpo_trainer as grpo_trainer

        monkeypatch.setattr(grpo_trainer, "is_async_callable", inspect.iscoroutinefunction)

    from conftest import REPO

    sys.path.insert(0, str(REPO / "examples"))
    import note_lm
    from datasets import Dataset
    from trl import GRPOTrainer

    tokenizer = note_lm.build_tokenizer()
    policy = note_lm.build_policy(tokenizer, seed=0, n_layer=1)
    reward = AsyncApexRewardFunction(
        fast_checkpoint, decoder=note_lm.NoteDecoder(), score="overall", name="apex_overall"
    )
    reward = pickle.loads(pickle.dumps(reward))  # what a launcher would hand each process
    before = [p.detach().clone() for p in policy.parameters()]
    trainer = GRPOTrainer(
        model=policy,
        reward_funcs=[reward],
        args=_grpo_args(tmp_path, per_device_train_batch_size=4, max_steps=2, logging_steps=1),
        train_dataset=Dataset.from_dict({"prompt": ["<calm>", "<dark>"] * 2}),
        processing_class=tokenizer,
    )
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "rewards/apex_overall/mean" in h]
    assert len(logs) == 2
    assert all("apex_overall/clarity" in h and "apex_overall/failed" in h for h in logs)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))


class _FailAt:
    """Batched decoder: the note decoder, but ``None`` (not audio) at fixed batch positions."""

    def __init__(self, positions: set[int]) -> None:
        import sys

        from conftest import REPO

        sys.path.insert(0, str(REPO / "examples"))
        import note_lm

        self.positions = positions
        self.decode = note_lm.NoteDecoder()

    def __call__(self, items: list) -> list:
        return [None if i in self.positions else self.decode(c) for i, c in enumerate(items)]


def test_none_in_grpo_with_a_second_reward_function(fast_checkpoint, tmp_path):
    """What TRL's GRPOTrainer makes of ``None`` next to another reward function (the documented
    behaviour): the rewards of all functions are summed with ``nansum``, so a ``None`` from APEX
    counts as 0 whenever another function scored the completion (here it is then the group's
    worst, with a negative advantage); only a completion that *every* function left ``None``
    is left out of the group baseline and gets advantage 0.

    One real optimiser step (two prompts x four generations); the advantages TRL computed are
    checked against that rule, recomputed from the per-function rewards TRL logged."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "examples"))
    import note_lm
    from datasets import Dataset
    from trl import GRPOTrainer

    def format_reward(prompts, completions, **kwargs):
        # a constant "format" reward; None for the last completion of the batch only
        return [None if i == len(completions) - 1 else 1.0 for i in range(len(completions))]

    apex = ApexRewardFunction(
        fast_checkpoint,
        decoder=_FailAt({1, 6, 7}),
        batched_decoder=True,
        score="overall",
        guard="off",
        name="apex_overall",
    )
    tokenizer = note_lm.build_tokenizer()
    trainer = GRPOTrainer(
        model=note_lm.build_policy(tokenizer, seed=0, n_layer=1),
        reward_funcs=[apex, format_reward],
        args=_grpo_args(tmp_path, per_device_train_batch_size=8, max_steps=1),
        train_dataset=Dataset.from_dict({"prompt": ["<calm>", "<dark>"]}),
        processing_class=tokenizer,
    )
    trainer.train()
    per_func = np.array(
        [list(trainer._logs["rewards"][n]) for n in ("apex_overall", "format_reward")]
    ).T  # [8 completions, 2 functions], NaN where a function returned None
    advantages = np.array(list(trainer._logs["advantages"]))
    assert per_func.shape == (8, 2) and advantages.shape == (8,)
    assert set(np.flatnonzero(np.isnan(per_func[:, 0]))) >= {1, 6, 7}
    assert list(np.flatnonzero(np.isnan(per_func[:, 1]))) == [7]

    # the documented rule: nansum over functions (None counts as 0), rows that every function
    # left None are out of the baseline, advantage = (r - group mean) / (group std + 1e-4)
    total = np.nansum(per_func, axis=1)
    total[np.isnan(per_func).all(axis=1)] = np.nan
    expected = np.zeros(8)
    for g in (slice(0, 4), slice(4, 8)):
        r = total[g]
        expected[g] = (r - np.nanmean(r)) / (np.nanstd(r, ddof=1) + 1e-4)
    expected = np.nan_to_num(expected, nan=0.0)
    np.testing.assert_allclose(advantages, expected, rtol=1e-4, atol=1e-5)

    # APEX None + format 1.0: the completion's reward is 1.0 (APEX counted as 0), below every
    # scored sibling (1.0 + overall), so it is pushed down, not left alone
    assert total[1] == 1.0 and advantages[1] < -0.5 and advantages[1] == advantages[:4].min()
    assert total[6] == 1.0 and advantages[6] < 0
    # every function None: advantage exactly 0, and not part of its group's baseline
    assert advantages[7] == 0.0
