"""APEX as an in-process reward function for verl and verl-omni.

verl loads a custom reward function from ``reward.custom_reward_function`` (``path``, ``name``,
``reward_kwargs``; older releases read a top-level ``custom_reward_function``), binds
``reward_kwargs`` to it, and calls it once per sample with keyword arguments only:

* verl-omni's audio reward manager: ``compute_score(data_source=..., solution_audio=(waveform,
  sample_rate), ground_truth=..., extra_info=...)``, where ``waveform`` is float32 ``[T]``, or
  ``solution_audio=None`` when the rollout produced no audio;
* plain verl: ``compute_score(data_source=..., solution_str=..., ground_truth=...,
  extra_info=...)``; the text is turned into audio by a ``decoder="module:function"`` named in
  ``reward_kwargs``.

Both managers check ``inspect.iscoroutinefunction``: a coroutine function is awaited on their
event loop, a plain one runs in an executor thread. :func:`compute_score` is the plain one (one
forward pass per sample); :func:`compute_score_async` submits each sample to a per-process
:class:`~apex_reward.integrations.serving.batcher.DynamicBatcher`, so samples the manager scores
concurrently share model batches.

Both return ``{"score": float, **extras}``, every value a finite float: ``apex_<name>`` per score
of the checkpoint, ``apex_reward`` (the checkpoint's configured reward), ``apex_flagged`` (1.0
when a signal check fired), ``apex_failed`` (0.0), and under a guard other than ``off`` one
``apex_signal_<name>`` per signal (:data:`apex_reward.signals.SIGNAL_NAMES`), and with
``windows`` in ``reward_kwargs`` the per-window rewards and times (dense rewards, see
:mod:`apex_reward.windows`). The key set depends only on the checkpoint and ``reward_kwargs``, so
verl can stack extras across samples.

Failures fail closed, as verl-omni's own scorers do: input that cannot be scored (no audio,
empty, non-finite, a bad sample rate, too short, a decoder error) raises a typed
:class:`~apex_reward.errors.AudioError` (a ``ValueError``) before the model runs, and a model
failure or a non-finite value raises :class:`~apex_reward.errors.ApexError`. Nothing is ever
turned into a silent 0. To keep training through such samples instead, set a finite
``failure_value`` in ``reward_kwargs``: the sample then gets ``score=failure_value``,
``apex_failed=1.0`` and 0.0 for every other extra (filter on ``apex_failed`` when reading them).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apex_reward.errors import (
    ApexError,
    AudioDecodeError,
    AudioError,
    AudioShapeError,
    ConfigError,
    error_class,
)
from apex_reward.ood import floors
from apex_reward.scoring import ScoreResult
from apex_reward.signals import SIGNAL_NAMES

from .decoders import decode_response
from .model_cache import load_cached_model
from .score_spec import score_value, spec_floor
from .serving.batcher import DynamicBatcher
from .verl_settings import Settings, parse_settings, sample_condition, score_spec_of

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "CountingBatcher",
    "batcher_for",
    "close_batchers",
    "compute_score",
    "compute_score_async",
]

_WHERE = "solution_audio"


def _window_extras(result: ScoreResult | None, settings: Settings) -> dict[str, float]:
    """``apex_num_windows`` and, for the first ``max_windows`` windows, ``apex_window_<k>_reward``
    / ``_start_s`` / ``_end_s`` (padding: 0.0 reward and -1.0 times, past ``apex_num_windows``);
    empty without windows. A fixed key set, so verl can stack it across samples."""
    if settings.windows is None:
        return {}
    windows = (result.windows if result is not None else None) or []
    out = {"apex_num_windows": float(len(windows))}
    for k in range(settings.max_windows):
        w = windows[k] if k < len(windows) else None
        out[f"apex_window_{k}_reward"] = float(w["reward"]) if w else 0.0
        out[f"apex_window_{k}_start_s"] = float(w["start_s"]) if w else -1.0
        out[f"apex_window_{k}_end_s"] = float(w["end_s"]) if w else -1.0
    return out


# ----------------------------------------------------------------------------------------------
# the sample -> a validated waveform


def _waveform(obj: Any) -> torch.Tensor:
    if isinstance(obj, np.ndarray):
        if not np.issubdtype(obj.dtype, np.number):
            raise AudioShapeError(f"waveform dtype {obj.dtype} is not numeric", _WHERE)
        obj = torch.from_numpy(np.ascontiguousarray(obj, dtype=np.float32))
    elif isinstance(obj, (list, tuple)):
        obj = torch.as_tensor(np.asarray(obj, dtype=np.float32))
    if not isinstance(obj, torch.Tensor):
        raise AudioShapeError(
            f"waveform must be an array or tensor, got {type(obj).__name__}", _WHERE
        )
    if obj.ndim not in (1, 2):
        raise AudioShapeError(
            f"waveform must be [T] or [C, T], got shape {tuple(obj.shape)}", _WHERE
        )
    return obj.detach().to("cpu", torch.float32)


def _solution(
    settings: Settings, solution_audio: Any, solution_str: Any
) -> tuple[torch.Tensor, int]:
    """The sample's ``(waveform, sample_rate)``, not yet checked by the front end."""
    if solution_audio is None and solution_str is not None:
        if settings.decoder is None:
            raise ConfigError(
                "got solution_str (plain verl) but no decoder: set reward_kwargs.decoder to a "
                "'module:function' that turns the response text into audio"
            )
        solution_audio = decode_response(
            settings.decoder, solution_str, sample_rate=settings.sample_rate, where=_WHERE
        )
    if solution_audio is None:
        raise AudioDecodeError("no audio: the rollout produced none for this sample", _WHERE)
    if not (isinstance(solution_audio, (tuple, list)) and len(solution_audio) == 2):
        raise AudioShapeError(
            f"expected solution_audio=(waveform, sample_rate), got {type(solution_audio).__name__}",
            _WHERE,
        )
    wav, sr = solution_audio
    return _waveform(wav), sr


# ----------------------------------------------------------------------------------------------
# a result -> verl's dict


def _raise_failure(result: ScoreResult) -> None:
    exc = result.exception
    if isinstance(exc, ApexError):
        raise exc
    cls = error_class(result.error_type)
    message = f"{result.error_type}: {result.error}"
    if cls is not None and issubclass(cls, AudioError):
        raise cls(result.error or message, _WHERE)  # type: ignore[call-arg]
    raise ApexError(f"{_WHERE}: scoring failed: {message}") from exc


def _to_dict(result: ScoreResult, settings: Settings, model: ApexRewardModel) -> dict[str, float]:
    if not result.ok or result.scores is None:
        _raise_failure(result)
    spec = score_spec_of(settings, model)
    flagged = bool(result.flags)
    if settings.guard == "penalize" and floors(model.config, result.flags):
        value: float | None = spec_floor(spec, model.config)
    else:
        value = score_value(result, spec)
    if value is None or not math.isfinite(value):
        raise ApexError(f"{_WHERE}: the model returned a non-finite score {value!r}")
    out = {"score": float(value)}
    for name in model.score_names:
        out[f"apex_{name}"] = float(result.scores[name])
    out["apex_reward"] = float(result.reward) if result.reward is not None else math.nan
    out["apex_flagged"] = float(flagged)
    out["apex_failed"] = 0.0
    if settings.guard != "off":
        signals = result.signals or {}
        for name in SIGNAL_NAMES:
            out[f"apex_signal_{name}"] = float(signals.get(name, 0.0))
    out.update(_window_extras(result, settings))
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise ApexError(f"{_WHERE}: non-finite values for {bad}")
    return out


def _failure(
    error: ApexError, settings: Settings, model: ApexRewardModel | None
) -> dict[str, float]:
    """The dict for a sample that could not be scored, under ``failure_value``."""
    assert settings.failure_value is not None
    logger.debug("sample not scored (failure_value %g): %r", settings.failure_value, error)
    out = {"score": settings.failure_value}
    names = model.score_names if model is not None else ()
    for name in names:
        out[f"apex_{name}"] = 0.0
    out["apex_reward"] = 0.0
    out["apex_flagged"] = 0.0
    out["apex_failed"] = 1.0
    if settings.guard != "off":
        for name in SIGNAL_NAMES:
            out[f"apex_signal_{name}"] = 0.0
    out.update(_window_extras(None, settings))
    return out


# ----------------------------------------------------------------------------------------------
# the sync reward function


def compute_score(
    data_source: Any = None,
    solution_audio: tuple[Any, int] | None = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **reward_kwargs: Any,
) -> dict[str, float]:
    """Score one verl sample with APEX (synchronous; verl runs it in an executor thread).

    Args:
        data_source, ground_truth: passed by verl; not used (APEX scores the audio alone).
        extra_info: passed by verl; with ``condition_key`` set, ``extra_info[condition_key]``
            is the sample's condition for a conditioned checkpoint.
        solution_audio: ``(waveform, sample_rate)`` from verl-omni's audio reward manager;
            ``waveform`` float ``[T]`` or ``[C, T]`` (array or tensor).
        solution_str: the response text from plain verl, turned into audio by ``decoder``.
        **reward_kwargs: from the config's ``reward_kwargs``: ``model`` (checkpoint directory or
            hub id, required), ``score`` (``"reward"``, a score name or ``{name: weight}``),
            ``guard`` (``"penalize"``, ``"flag"`` or ``"off"``), ``device``, ``dtype``,
            ``encoder``, ``decoder`` (``"module:function"``: text -> ``(waveform, rate)``, a
            waveform with ``sample_rate``, or an audio file path), ``sample_rate``,
            ``failure_value``, ``windows`` (``true`` for the 30 s segments, or
            ``{length_s, hop_s}``) and ``max_windows`` (default 8): per-window rewards and
            times as extras (``apex_num_windows``, ``apex_window_<k>_reward/_start_s/_end_s``);
            for a conditioned checkpoint ``condition`` (the audience of every sample; default
            the learned average) and ``condition_key`` (the ``extra_info`` field holding each
            sample's own, e.g. ``"platform"``; a sample without it gets ``condition``).

    Returns:
        ``{"score": float, **extras}`` (see the module docstring).

    Raises:
        AudioError: the sample cannot be scored (no audio, empty, NaN/inf, a bad rate, ...).
        ApexError: the model failed on it or returned a non-finite value.
        ConfigError: bad ``reward_kwargs``.
    """
    settings = parse_settings(**reward_kwargs)
    model, lock = load_cached_model(settings.model_options())
    try:
        wav, sr = _solution(settings, solution_audio, solution_str)
        model.frontend.check(wav, sr, _WHERE)
        condition = sample_condition(settings, model, extra_info)
        with lock:
            [result] = model.score(
                [(wav, int(sr))],
                num_workers=0,
                guard=settings.guard,
                windows=settings.windows,
                condition=condition,
            )
        return _to_dict(result, settings, model)
    except ApexError as e:
        if settings.failure_value is None or isinstance(e, ConfigError):
            raise
        return _failure(e, settings, model)


# ----------------------------------------------------------------------------------------------
# the async reward function: concurrent samples share model batches


class CountingBatcher(DynamicBatcher):
    """A :class:`DynamicBatcher` that holds the model's lock while it runs a batch (so sync and
    async calls on one cached model never run it at once) and counts what it ran.

    Attributes:
        batches: forward passes run so far.
        clips: clips scored so far.
    """

    def __init__(self, model: ApexRewardModel, lock: threading.Lock, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self.model_lock = lock
        self.batches = 0
        self.clips = 0

    def _process(self, batch: list) -> None:
        with self.model_lock:
            # counted before the results are delivered, so an awaiting caller sees them
            self.batches += 1
            self.clips += len(batch)
            super()._process(batch)


_BATCHERS: dict[Settings, CountingBatcher] = {}
_BATCHERS_LOCK = threading.Lock()


def _batcher_key(settings: Settings) -> Settings:
    # only what the forward pass depends on: score selection, decoder and failure handling
    # happen per call
    return Settings(
        options=settings.options,
        guard=settings.guard,
        max_batch=settings.max_batch,
        max_wait_s=settings.max_wait_s,
        windows=settings.windows,
    )


def _get_batcher(settings: Settings) -> tuple[CountingBatcher, ApexRewardModel]:
    key = _batcher_key(settings)
    with _BATCHERS_LOCK:
        batcher = _BATCHERS.get(key)
        if batcher is None or not batcher.alive:
            model, lock = load_cached_model(settings.model_options())
            batcher = CountingBatcher(
                model,
                lock,
                max_batch=settings.max_batch,
                max_wait_s=settings.max_wait_s,
                guard=settings.guard,
                windows=settings.windows,
            )
            batcher.start()
            _BATCHERS[key] = batcher
        return batcher, batcher.model


def batcher_for(**reward_kwargs: Any) -> CountingBatcher:
    """The batcher :func:`compute_score_async` uses in this process for these ``reward_kwargs``
    (started, and its model loaded, on first use); its ``batches``/``clips`` counters tell how
    well concurrent samples were coalesced."""
    return _get_batcher(parse_settings(**reward_kwargs))[0]


def close_batchers() -> None:
    """Stop every batcher this process started for :func:`compute_score_async`."""
    with _BATCHERS_LOCK:
        batchers = list(_BATCHERS.values())
        _BATCHERS.clear()
    for b in batchers:
        b.stop()


async def compute_score_async(
    data_source: Any = None,
    solution_audio: tuple[Any, int] | None = None,
    solution_str: str | None = None,
    ground_truth: Any = None,
    extra_info: Mapping[str, Any] | None = None,
    **reward_kwargs: Any,
) -> dict[str, float]:
    """:func:`compute_score` as a coroutine function: verl awaits it on its event loop, and
    samples scored concurrently are coalesced into model batches of up to ``max_batch``
    (``reward_kwargs``, default 16), waiting at most ``max_wait_s`` (default 0.01) for
    company. Same arguments, result and errors as :func:`compute_score`.

    The first call in a process loads the model in a worker thread; a ``decoder`` also runs in
    one, so neither blocks the event loop.
    """
    settings = parse_settings(**reward_kwargs)
    key = _batcher_key(settings)
    batcher = _BATCHERS.get(key)
    if batcher is None or not batcher.alive:
        batcher, model = await asyncio.to_thread(_get_batcher, settings)
    model = batcher.model
    try:
        if solution_audio is None and solution_str is not None:
            wav, sr = await asyncio.to_thread(_solution, settings, solution_audio, solution_str)
        else:
            wav, sr = _solution(settings, solution_audio, solution_str)
        condition = sample_condition(settings, model, extra_info)
        model.frontend.check(wav, sr, _WHERE)
        result = await batcher.score(_WHERE, wav, int(sr), condition=condition)
        return _to_dict(result, settings, model)
    except ApexError as e:
        if settings.failure_value is None or isinstance(e, ConfigError):
            raise
        return _failure(e, settings, model)
