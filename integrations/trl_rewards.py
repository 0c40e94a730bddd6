"""APEX as a reward function for TRL's online trainers (GRPO, RLOO), plus best-of-N selection.

TRL calls each of a trainer's ``reward_funcs`` as ``func(prompts=..., completions=...,
completion_ids=..., trainer_state=..., log_metric=..., log_extra=..., **dataset_columns)`` and
expects one ``float`` (or ``None`` for "not applicable") per completion. An APEX model scores
audio, so :class:`ApexRewardFunction` turns each completion into audio first, with a decoder the
user supplies (token ids or text -> ``(waveform, sample_rate)``, e.g. a neural codec or a
synthesiser), or uses the completion as audio directly (a file path, an array, or an
``(array, sample_rate)`` tuple). Completions that cannot be decoded or scored get ``None`` (or
``failure_value``). What TRL makes of ``None`` depends on the other reward functions: see
``failure_value`` in :class:`ApexRewardFunction`.

The function is picklable (TRL's own convention for reward functions, needed by multi-process
launchers): it holds the checkpoint *path*, device and options, never the model. Each process
loads the model the first time it is called and keeps it in a per-process cache, so many
functions built from the same checkpoint (say, one per score) share one model.

:func:`best_of_n` scores N candidates per prompt and returns the best one with its scores.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from apex_reward.conditioning import per_input_conditions
from apex_reward.errors import ApexError, ConfigError, UnknownConditionError
from apex_reward.guard import POLICIES
from apex_reward.loading import ModelOptions
from apex_reward.ood import floors
from apex_reward.robust import check_robust
from apex_reward.scoring import ScoreResult, describe_error
from apex_reward.windows import WindowSpec

from .decoders import as_audio
from .model_cache import load_cached_model
from .score_spec import (
    ScoreSpec,
    check_spec,
    read_checkpoint_config,
    score_value,
    spec_floor,
    spec_label,
)

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "ApexRewardFunction",
    "AsyncApexRewardFunction",
    "BestOfN",
    "best_of_n",
]

#: A decoder maps one completion (text, token ids, or conversational messages) to audio: a
#: ``(waveform, sample_rate)`` tuple (``waveform`` ``[T]`` or ``[C, T]``, tensor or array), a bare
#: waveform (with ``sample_rate=`` given to the reward function), or a path to an audio file. It
#: may return ``None`` or raise for a completion that is not valid audio; that completion's reward
#: is then ``None``.
Decoder = Callable[[Any], Any]


# ----------------------------------------------------------------------------------------------
# completions -> audio


def _message_content(completion: Any) -> Any:
    """The content of the last message of a conversational completion, else the completion."""
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return completion[-1].get("content")
    return completion


def windows_column(result: ScoreResult) -> str | None:
    """A completion's windows as one table cell: JSON ``[[start_s, end_s, reward], ...]``, or
    None when it was not scored (or without windows)."""
    if not result.ok or result.windows is None:
        return None
    return json.dumps([[w["start_s"], w["end_s"], round(w["reward"], 6)] for w in result.windows])


# ----------------------------------------------------------------------------------------------
# the reward function


class ApexRewardFunction:
    """A TRL reward function: completions -> audio -> APEX score, one float (or None) each.

    Args:
        model: checkpoint directory or hub id, or :class:`~apex_reward.ModelOptions` (picklable;
            loaded lazily once per process with :func:`~apex_reward.load_model`), or an
            in-memory :class:`~apex_reward.ApexRewardModel` (convenient in one process; such a
            function cannot be pickled).
        decoder: completion -> audio (see :data:`Decoder`). ``None``: completions already are
            audio (paths, arrays with ``sample_rate``, or ``(array, sample_rate)`` tuples; for
            conversational completions, the last message's content).
        decode_from: ``"completions"`` (text or messages, the default) or ``"completion_ids"``
            (the token ids TRL passes alongside; what a codec-token language model needs).
        batched_decoder: the decoder takes the whole list of completions and returns a list
            (one audio or ``None`` each), e.g. to run a neural codec in one batch.
        score: ``"reward"`` (default: the checkpoint's configured reward), a score name, or
            weights ``{name: w}`` (value = ``sum(w * score)``).
        sample_rate: Hz of bare waveforms returned by the decoder.
        name: the ``__name__`` TRL logs the reward under (default ``"apex_<score>"``).
        device: where the model runs (default: this process's current CUDA device, else CPU).
        encoder: override where the MERT weights come from (hub id or local directory).
        dtype: ``"auto"`` (default: the fast path on CUDA, float32 on CPU), ``"fp32"``,
            ``"fp16"`` or ``"bf16"`` (:meth:`ApexRewardModel.set_precision`).
            (``device``, ``encoder`` and ``dtype`` are the :class:`~apex_reward.ModelOptions` of a
            checkpoint path; with ``ModelOptions`` or an in-memory model, leave them unset.)
        batch_size: 30 s segments per encoder call.
        num_workers: threads decoding audio files ahead of the encoder.
        guard: the guard policy (:mod:`apex_reward.guard`): ``"penalize"`` (default) gives a
            completion whose audio the signal checks flag (silence, noise, a held tone, a loop,
            DC, clipping) the lowest value ``score`` can take (:func:`spec_floor`); ``"flag"``
            only reports flags; ``"off"`` skips the checks.
        robust: K > 0 scores each completion by the robust reward, the mean over K random,
            differentiable transforms of its audio (gain, segmentation offset, resampling
            jitter, noise; :mod:`apex_reward.robust`), at K times the encoder cost; 0: off.
        robust_seed: seed of those transforms (None: fresh transforms at every call, drawn
            from torch's global generator; an integer repeats the same K transforms).
        log_scores: report the batch mean of every score and signal, the failed and flagged
            fractions and each flag's rate through TRL's
            ``log_metric`` hook, as ``<name>/<score>``.
        windows: also score time windows (:mod:`apex_reward.windows`; ``True`` the 30 s
            segments, or a :class:`~apex_reward.windows.WindowSpec`) and hand them to TRL's
            ``log_extra`` hook as the completions-table column ``<name>/windows``: per
            completion, a JSON list of ``[start_s, end_s, window reward]`` (``None`` for a
            failed one). The returned reward stays the song's.
        condition: a conditioned checkpoint's audience (:mod:`apex_reward.conditioning`), one
            of the values it was trained on (e.g. ``"udio"``); None: its learned average.
        condition_column: read each completion's condition from this dataset column (TRL
            passes the dataset's columns to reward functions as keyword arguments, one value
            per completion; a missing value gets ``condition``). Unknown values are errors.
        failure_value: what a completion that cannot be decoded or scored gets. ``None`` (the
            default) or a number (e.g. the bottom of the score's range, to penalise it).
            What TRL's GRPO and RLOO trainers (as of TRL 1.16) do with ``None``: they turn it
            into NaN and sum the weighted rewards of all reward functions with ``nansum``.

            * With APEX as the only reward function (or when every reward function returns
              ``None`` for that completion), the completion is left out of its group's
              baseline and gets advantage 0: the policy is not steered either way.
            * Next to other reward functions that score the completion (a format reward, a
              length penalty, ...), APEX's ``None`` counts as **0**: the completion's reward
              is the sum of the other functions' rewards only, and it takes part in the
              baseline. With APEX values above 0 (the usual case) that is a penalty, often the
              group's largest; with a score that can be negative (negative weights) it can be
              a bonus. Under GRPO's ``multi_objective_aggregation="normalize_then_sum"`` it
              counts as the group's mean APEX value instead.

            With several reward functions, set ``failure_value`` explicitly (e.g. the bottom
            of the score's range) so the penalty is a choice, not an accident of ``nansum``; or
            make the other functions return ``None`` for the same completions when they should
            get no signal at all.

    Calling it: ``func(prompts, completions, **kwargs) -> list[float | None]``.
    """

    def __init__(
        self,
        model: str | Path | ModelOptions | ApexRewardModel,
        *,
        decoder: Decoder | None = None,
        decode_from: Literal["completions", "completion_ids"] = "completions",
        batched_decoder: bool = False,
        score: ScoreSpec = "reward",
        sample_rate: int | None = None,
        name: str | None = None,
        device: str | torch.device | None = None,
        encoder: str | None = None,
        dtype: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        guard: Literal["off", "flag", "penalize"] = "penalize",
        log_scores: bool = True,
        failure_value: float | None = None,
        robust: int = 0,
        robust_seed: int | None = None,
        windows: bool | WindowSpec | None = None,
        condition: str | None = None,
        condition_column: str | None = None,
    ) -> None:
        from apex_reward.model import ApexRewardModel

        if decode_from not in ("completions", "completion_ids"):
            raise ConfigError(
                f"decode_from must be 'completions' or 'completion_ids', got {decode_from!r}"
            )
        if decoder is not None and not callable(decoder):
            raise ConfigError(f"decoder must be callable, got {type(decoder).__name__}")
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self._model: ApexRewardModel | None = None
        self._lock: threading.Lock | None = None
        overrides = {"device": device, "encoder": encoder, "dtype": dtype}
        given = {k: v for k, v in overrides.items() if v is not None}
        self.options: ModelOptions | None = None
        if isinstance(model, ApexRewardModel):
            if given:
                raise ConfigError(
                    f"{sorted(given)} apply to a checkpoint path; an in-memory model is used as "
                    "it is"
                )
            self._model, self._lock = model, threading.Lock()
            names = model.score_names
            conditioning = model.config.head.condition
        else:
            if isinstance(model, ModelOptions):
                if given:
                    raise ConfigError(f"{sorted(given)}: set them in the ModelOptions instead")
                self.options = model
            else:
                self.options = ModelOptions(
                    model=str(model),
                    encoder=encoder,
                    device=None if device is None else str(device),
                    dtype=dtype or "auto",  # type: ignore[arg-type]
                )
            config = read_checkpoint_config(self.options.require_model())
            names, conditioning = config.score_names, config.head.condition
        self.score_names: tuple[str, ...] = tuple(names)
        # checked now (UnknownConditionError names the checkpoint's values), not at every call
        per_input_conditions(conditioning, condition, 1)
        if condition_column is not None and conditioning is None:
            raise UnknownConditionError(
                f"condition_column={condition_column!r}: this checkpoint has no conditioning input"
            )
        self.condition = condition
        self.condition_column = condition_column
        self.score = check_spec(score, self.score_names)
        self.decoder = decoder
        self.decode_from = decode_from
        self.batched_decoder = batched_decoder
        self.sample_rate = sample_rate
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.log_scores = log_scores
        if guard not in POLICIES:
            raise ConfigError(f"guard must be one of {', '.join(POLICIES)}, got {guard!r}")
        self.guard = guard
        self.robust = check_robust(robust)
        self.robust_seed = robust_seed
        if failure_value is not None and not math.isfinite(failure_value):
            raise ConfigError(
                f"failure_value must be None or a finite number, got {failure_value!r}"
            )
        self.failure_value = failure_value
        self.windows = WindowSpec.coerce(windows)
        self.__name__ = name or "apex_" + (
            self.score if isinstance(self.score, str) else "weighted"
        )

    # -- pickling: never the model ---------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        if self.options is None:
            raise TypeError(
                f"{type(self).__name__} built from an in-memory model cannot be pickled; build it "
                "from the checkpoint directory (model.save_pretrained(dir); "
                f"{type(self).__name__}(dir, ...)) so each process loads its own copy"
            )
        state = dict(self.__dict__)
        state["_model"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __copy__(self) -> ApexRewardFunction:
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict) -> ApexRewardFunction:
        # a frozen reward model is shared, not copied
        new = object.__new__(type(self))
        new.__dict__ = {
            k: (v if k in ("_model", "_lock", "decoder") else copy.deepcopy(v, memo))
            for k, v in self.__dict__.items()
        }
        return new

    def __repr__(self) -> str:
        where = self.options.model if self.options is not None else "<in-memory model>"
        return f"{type(self).__name__}({where!r}, score={spec_label(self.score)!r})"

    # -- model -------------------------------------------------------------------------------

    def load(self) -> tuple[ApexRewardModel, threading.Lock]:
        """The model (loaded on first use in this process) and its lock."""
        if self._model is None:
            assert self.options is not None
            self._model, self._lock = load_cached_model(self.options)
        assert self._lock is not None
        return self._model, self._lock

    @property
    def model(self) -> ApexRewardModel:
        return self.load()[0]

    # -- decoding and scoring ----------------------------------------------------------------

    def _decode_all(self, items: Sequence[Any]) -> list[Any | BaseException]:
        """Audio for each item, or the exception that item raised."""
        n = len(items)
        if self.decoder is None:
            raw: list[Any] = [_message_content(c) for c in items]
        elif self.batched_decoder:
            try:
                raw = list(self.decoder(list(items)))
            except Exception as e:  # the whole batch failed to decode
                logger.warning("batched decoder failed on %d completions: %r", n, e)
                return [e] * n
            if len(raw) != n:
                err = ConfigError(f"batched decoder returned {len(raw)} outputs for {n} inputs")
                return [err] * n
        else:
            raw = []
            for item in items:
                try:
                    raw.append(self.decoder(item))
                except Exception as e:
                    raw.append(e)
        out: list[Any | BaseException] = []
        for i, r in enumerate(raw):
            if isinstance(r, BaseException):
                out.append(r)
                continue
            try:
                out.append(as_audio(r, self.sample_rate, f"completion[{i}]"))
            except ApexError as e:
                out.append(e)
        return out

    def score_completions(
        self,
        completions: Sequence[Any],
        *,
        completion_ids: Sequence[Any] | None = None,
        conditions: Sequence[str | None] | None = None,
    ) -> list[ScoreResult]:
        """Decode and score completions; one :class:`ScoreResult` each, in order.

        Completions that fail to decode get a result with ``error``/``error_type`` (the
        decoder's exception class name) and are not sent to the model. ``conditions``: one
        condition (or None: ``self.condition``) per completion; default ``self.condition``.
        """
        if self.decode_from == "completion_ids":
            if completion_ids is None:
                raise ConfigError(
                    "decode_from='completion_ids' but no completion_ids were given (TRL passes "
                    "them to reward functions; pass completion_ids= when calling it yourself)"
                )
            items: Sequence[Any] = completion_ids
        else:
            items = completions
        decoded = self._decode_all(items)
        results: list[ScoreResult | None] = [None] * len(decoded)
        audio, where = [], []
        for i, d in enumerate(decoded):
            if isinstance(d, BaseException):
                reason, kind = describe_error(d)
                logger.debug("completion %d could not be decoded: %s: %s", i, kind, reason)
                results[i] = ScoreResult(f"completion[{i}]", error=reason, error_type=kind)
            else:
                audio.append(d)
                where.append(i)
        if audio:
            model, lock = self.load()
            condition: Any = self.condition
            if conditions is not None:
                condition = [
                    self.condition if conditions[i] is None else conditions[i] for i in where
                ]
            with lock:
                scored = model.score(
                    audio,
                    batch_size=self.batch_size,
                    num_workers=self.num_workers,
                    guard=self.guard,
                    robust=self.robust,
                    seed=self.robust_seed,
                    windows=self.windows,
                    condition=condition,
                )
            for i, a, r in zip(where, audio, scored):
                if not isinstance(a, str):  # name in-memory audio by its completion, not "array[k]"
                    r.input = f"completion[{i}]"
                results[i] = r
        return [r for r in results if r is not None]

    def values(self, results: Sequence[ScoreResult]) -> list[float | None]:
        """The selected score of each result (``None`` for failures; the floor
        :func:`spec_floor` for a flagged one under the guard policy ``penalize``)."""
        values = [score_value(r, self.score) for r in results]
        if self.guard == "penalize" and any(r.flags for r in results if r is not None):
            config = self.model.config
            floor = spec_floor(self.score, config)
            values = [
                floor if v is not None and r is not None and floors(config, r.flags) else v
                for v, r in zip(values, results)
            ]
        return values

    def _log(self, results: Sequence[ScoreResult], log_metric: Any) -> None:
        if not (self.log_scores and callable(log_metric) and results):
            return
        ok = [r for r in results if r.ok and r.scores is not None]
        log_metric(f"{self.__name__}/failed", 1.0 - len(ok) / len(results))
        if not ok:
            return
        if self.guard != "off":  # the fraction flagged, each flag's rate, each signal's mean
            log_metric(f"{self.__name__}/flagged", float(np.mean([bool(r.flags) for r in ok])))
            for flag in sorted({f for r in ok for f in (r.flags or [])}):
                rate = float(np.mean([flag in (r.flags or []) for r in ok]))
                log_metric(f"{self.__name__}/flag_{flag}", rate)
            measured = [r.signals for r in ok if r.signals]
            for signal in measured[0] if measured else ():
                mean = float(np.mean([s[signal] for s in measured]))
                log_metric(f"{self.__name__}/signal_{signal}", mean)
        for name in self.score_names:
            log_metric(f"{self.__name__}/{name}", float(np.mean([r.scores[name] for r in ok])))
        log_metric(f"{self.__name__}/reward", float(np.mean([r.reward for r in ok])))
        ood = [r.ood for r in ok if r.ood is not None]
        if ood:  # mean OOD percentile of the batch (checkpoints with statistics)
            log_metric(f"{self.__name__}/ood", float(np.mean(ood)))
        spread = [r.std["reward"] for r in ok if r.std is not None]
        if spread:  # mean ensemble spread of the reward (ensemble checkpoints)
            log_metric(f"{self.__name__}/reward_std", float(np.mean(spread)))

    def compute(
        self,
        prompts: Sequence[Any] | None,
        completions: Sequence[Any],
        *,
        completion_ids: Sequence[Any] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        """The synchronous computation behind ``__call__`` (see the class docstring)."""
        if prompts is not None and len(prompts) != len(completions):
            raise ConfigError(f"got {len(prompts)} prompts for {len(completions)} completions")
        conditions = None
        if self.condition_column is not None:
            if self.condition_column not in kwargs:
                raise ConfigError(
                    f"condition_column={self.condition_column!r}: the trainer passed no such "
                    f"column (it passes the dataset's columns; got {sorted(kwargs)})"
                )
            conditions = list(kwargs[self.condition_column])
            if len(conditions) != len(completions):
                raise ConfigError(
                    f"column {self.condition_column!r} has {len(conditions)} values for "
                    f"{len(completions)} completions"
                )
        results = self.score_completions(
            completions, completion_ids=completion_ids, conditions=conditions
        )
        failed = sum(not r.ok for r in results)
        if results and failed == len(results):
            first = results[0]
            logger.warning(
                "%s: none of %d completions could be scored (first: %s: %s)",
                self.__name__,
                len(results),
                first.error_type,
                first.error,
            )
        self._log(results, log_metric)
        log_extra = kwargs.get("log_extra")
        if self.windows is not None and callable(log_extra):
            log_extra(f"{self.__name__}/windows", [windows_column(r) for r in results])
        values = self.values(results)
        if self.failure_value is not None:
            values = [self.failure_value if v is None else v for v in values]
        return values

    def __call__(
        self, prompts: Sequence[Any] | None, completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        """``(prompts, completions, **kwargs) -> list[float | None]``, one per completion.

        ``kwargs`` may hold ``completion_ids`` (needed with ``decode_from="completion_ids"``) and
        ``log_metric`` (TRL's metric hook); other TRL arguments (``trainer_state``,
        ``log_extra``, dataset columns) are accepted and ignored.
        """
        return self.compute(prompts, completions, **kwargs)


async def _async_call_signature(
    prompts: Sequence[Any] | None, completions: Sequence[Any], **kwargs: Any
) -> list[float | None]:
    """The call signature of :class:`AsyncApexRewardFunction` instances (never called: its code
    object is what ``inspect`` reads; see the class)."""
    raise NotImplementedError


class AsyncApexRewardFunction(ApexRewardFunction):
    """:class:`ApexRewardFunction` with ``async def __call__``.

    TRL runs async reward functions concurrently on an event loop (e.g. next to an LLM judge or a
    remote verifier). Scoring runs in a worker thread (``asyncio.to_thread``), so the event loop
    stays free; calls on one model are serialised by its lock.

    ``inspect.iscoroutinefunction(fn)`` is ``True`` for an instance ``fn``. Some TRL versions
    decide whether to await a reward function with exactly that check on the object, which for
    a plain callable instance is ``False`` (it looks at functions, not at ``__call__``); such a
    trainer would call the function synchronously and get a coroutine instead of rewards. The
    class therefore carries the attributes by which ``inspect`` recognises a function-like object
    (``__code__`` of an ``async def`` with the call's signature, ``__defaults__``,
    ``__kwdefaults__``; ``__name__`` is per instance). Classes are never function-like to
    ``inspect``, so the class itself is not reported as a coroutine function, and nothing of this
    is in an instance's state (pickling is unchanged). ``inspect.signature(fn)`` gives
    ``(prompts, completions, **kwargs)``.
    """

    __code__ = _async_call_signature.__code__
    __defaults__ = None
    __kwdefaults__ = None

    async def __call__(  # type: ignore[override]
        self, prompts: Sequence[Any] | None, completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        return await asyncio.to_thread(self.compute, prompts, completions, **kwargs)


# ----------------------------------------------------------------------------------------------
# best-of-N


@dataclass
class BestOfN:
    """The best of one prompt's N candidates.

    Attributes:
        index: position of the best candidate (the first one on ties), or ``None`` if none
            could be scored.
        candidate: the best candidate itself (``None`` if none could be scored).
        value: its selected score.
        scores: all its scores (``{name: value}``) and ``"reward"``.
        values: the selected score of every candidate (``None`` for failures), in order.
        results: every candidate's :class:`ScoreResult`.
    """

    index: int | None
    candidate: Any
    value: float | None
    scores: dict[str, float] | None
    values: list[float | None] = field(default_factory=list)
    results: list[ScoreResult] = field(default_factory=list)


def best_of_n(
    reward: ApexRewardFunction | ApexRewardModel | str | Path,
    candidates: Sequence[Sequence[Any]],
    **reward_kwargs: Any,
) -> list[BestOfN]:
    """Score N candidates per prompt and pick the best of each group.

    Args:
        reward: an :class:`ApexRewardFunction` (its decoder and score selection are used), or a
            model / checkpoint path, with ``reward_kwargs`` (``decoder=``, ``score=``, ...)
            passed to build one.
        candidates: ``[prompt][candidate]`` completions (or audio paths/arrays); groups may have
            different sizes. All candidates are scored in one batched pass.

    Returns:
        One :class:`BestOfN` per group, in order.
    """
    fn = (
        reward
        if isinstance(reward, ApexRewardFunction)
        else ApexRewardFunction(reward, **reward_kwargs)
    )
    if isinstance(reward, ApexRewardFunction) and reward_kwargs:
        raise ConfigError("reward_kwargs are only used when `reward` is a model or a path")
    flat = [c for group in candidates for c in group]
    ids = flat if fn.decode_from == "completion_ids" else None
    results = fn.score_completions(flat, completion_ids=ids) if flat else []
    out, start = [], 0
    for group in candidates:
        res = results[start : start + len(group)]
        start += len(group)
        vals = fn.values(res)
        valid = [(v, i) for i, v in enumerate(vals) if v is not None]
        if not valid:
            out.append(BestOfN(None, None, None, None, vals, list(res)))
            continue
        best = max(valid, key=lambda t: (t[0], -t[1]))[1]
        r = res[best]
        scores = dict(r.scores or {})
        scores["reward"] = float(r.reward) if r.reward is not None else math.nan
        out.append(BestOfN(best, group[best], vals[best], scores, vals, list(res)))
    return out
