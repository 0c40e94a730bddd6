"""Batched scoring of files and arrays: the engine behind ``model.score`` and ``apex-reward score``.

Files are decoded by a small thread pool a bounded window ahead of the encoder; songs are grouped
so each encoder call gets about ``batch_size`` 30 s segments; every input gets a
:class:`ScoreResult`, with its scores or the error it raised, in input order. A bad input never
stops the others.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .audio import as_waveform_list, check_sample_rate, load_audio
from .conditioning import ConditionArg, per_input_conditions
from .errors import ApexError, AudioShapeError

if TYPE_CHECKING:
    from .model import ApexRewardModel
    from .windows import WindowSpec

logger = logging.getLogger(__name__)

__all__ = ["ScoreResult", "iter_decoded", "score_inputs", "score_waveforms"]


@dataclass
class ScoreResult:
    """The outcome of scoring one input.

    Attributes:
        input: the file path, or ``"array[i]"`` for in-memory input i.
        scores: ``{name: value}`` (popularity tasks 0–100, aesthetics 1–5, overall 0–1), or None.
        reward: the scalar reward, or None on error.
        error: what went wrong (None on success).
        error_type: the error's class name, e.g. ``"AudioDecodeError"``.
        duration_s: the audio's duration in seconds, when it was decoded.
        signals: ``{name: value}`` signal checks of the input (:mod:`apex_reward.signals`), or
            None under the guard policy ``off`` (and on error).
        flags: the flags the signals raised (``[]`` when none; ``"ood"`` beyond the OOD
            threshold), or None as ``signals``. Under ``penalize`` a flagged input's ``reward``
            is the floor.
        ood: percentile (0–100) of the input's OOD distance among the training songs
            (:mod:`apex_reward.ood`); None when the checkpoint has no OOD statistics.
        std: ``{name: value}`` standard deviation over an ensemble's heads of each score and of
            the reward; None for single-head checkpoints.
        windows: per-window scores when requested (``windows=``): one
            ``{"start_s", "end_s", "scores", "reward"}`` dict per window
            (:mod:`apex_reward.windows`); None otherwise.
        exception: the exception that stopped it, when one did (not part of the record,
            :meth:`to_dict`, equality or the repr; the reward server maps it to a status).
    """

    input: str
    scores: dict[str, float] | None = None
    reward: float | None = None
    error: str | None = None
    error_type: str | None = None
    duration_s: float | None = None
    signals: dict[str, float] | None = None
    flags: list[str] | None = None
    windows: list[dict[str, Any]] | None = None
    ood: float | None = None
    std: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    exception: BaseException | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able record: ``{"path", "scores", "reward", "ood"}`` (with ``"signals"`` and
        ``"flags"`` unless the guard was off, ``"std"`` for ensembles) or
        ``{"path", "error", "error_type"}``."""
        if self.ok:
            d: dict[str, Any] = {"path": self.input, "scores": self.scores, "reward": self.reward}
            if self.signals is not None:
                d["signals"], d["flags"] = self.signals, self.flags
            if self.windows is not None:
                d["windows"] = self.windows
            d["ood"] = self.ood
            if self.std is not None:
                d["std"] = self.std
        else:
            d = {"path": self.input, "error": self.error, "error_type": self.error_type}
        d.update(self.extra)
        return d


@dataclass
class _Item:
    index: int
    name: str
    wav: torch.Tensor | None = None
    sample_rate: int = 0
    error: BaseException | None = None
    #: the guard's ``(signals, flags)`` measured by the caller, or None
    checks: tuple[dict[str, float], list[str]] | None = None


def _bare(e: BaseException) -> BaseException:
    """``e`` without its traceback: a result kept for long must not keep the frames (and the
    audio tensors in them) of the call that failed."""
    return e.with_traceback(None)


def describe_error(e: BaseException) -> tuple[str, str]:
    """``(reason, error type name)`` of a per-item failure, as score records report it."""
    reason = getattr(e, "reason", None) or str(e) or type(e).__name__
    return reason, type(e).__name__


def _normalise_inputs(inputs: Any, sample_rate: Any) -> list[tuple[str, Any, int | None]]:
    """-> [(name, path-or-array, rate)]"""
    if isinstance(inputs, (str, Path, np.ndarray, torch.Tensor)):
        if (
            isinstance(inputs, (np.ndarray, torch.Tensor))
            and inputs.ndim >= 2
            and not isinstance(sample_rate, (list, tuple))
        ):
            # a batch tensor [B, T] / [B, C, T]
            items: Sequence[Any] = as_waveform_list(inputs)
        else:
            items = [inputs]
    else:
        items = list(inputs)
    rates = (
        list(sample_rate) if isinstance(sample_rate, (list, tuple)) else [sample_rate] * len(items)
    )
    if len(rates) != len(items):
        raise AudioShapeError(
            f"got {len(rates)} sample rates for {len(items)} inputs", "sample_rate"
        )
    out = []
    for i, (item, rate) in enumerate(zip(items, rates)):
        if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], (str, Path)):
            item, rate = item
        name = str(item) if isinstance(item, (str, Path)) else f"array[{i}]"
        out.append((name, item, rate))
    return out


def _load(model: ApexRewardModel, index: int, name: str, item: Any, rate: int | None) -> _Item:
    fe = model.frontend
    try:
        if isinstance(item, (str, Path)):
            wav, sr = load_audio(item, max_duration_s=fe.config.max_duration_s)
        else:
            if rate is None:
                raise AudioShapeError("arrays need a sample_rate", name)
            (wav,) = as_waveform_list([item])
            sr = check_sample_rate(rate, name)
        fe.check(wav, sr, name)
        return _Item(index, name, wav, sr)
    except ApexError as e:
        return _Item(index, name, error=e)
    except Exception as e:  # unexpected decoder failure: record it, keep going
        logger.debug("unexpected error loading %s", name, exc_info=True)
        return _Item(index, name, error=e)


def _decoded(
    model: ApexRewardModel,
    entries: list[tuple[str, Any, int | None]],
    num_workers: int,
    window: int,
) -> Iterator[_Item]:
    if num_workers <= 0:
        for i, (name, item, rate) in enumerate(entries):
            yield _load(model, i, name, item, rate)
        return
    with ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="apex-decode") as pool:
        pending: deque = deque()
        it = iter(enumerate(entries))

        def submit() -> None:
            nxt = next(it, None)
            if nxt is not None:
                i, (name, item, rate) = nxt
                pending.append(pool.submit(_load, model, i, name, item, rate))

        for _ in range(max(1, window)):
            submit()
        while pending:
            item = pending.popleft().result()
            submit()
            yield item


def _num_segments(model: ApexRewardModel, item: _Item) -> int:
    fe = model.frontend.config
    n = item.wav.shape[-1] * fe.sample_rate / item.sample_rate
    return max(1, math.ceil(n / fe.segment_samples))


def _run_batch(
    model: ApexRewardModel,
    batch: list[_Item],
    batch_size: int,
    results: list[ScoreResult | None],
    check: bool,
    guard: str | None,
    robust: tuple[int, int | None] = (0, None),
    windows: bool | WindowSpec | None = None,
    conditions: Sequence[str | None] | None = None,
) -> None:
    checks = [it.checks for it in batch]
    try:
        with torch.inference_mode():
            out = model(
                [it.wav for it in batch],
                [it.sample_rate for it in batch],
                segment_batch_size=batch_size,
                check=check,
                guard=guard,
                robust=robust[0],
                seed=robust[1],
                return_windows=windows or False,
                condition=None if conditions is None else [conditions[it.index] for it in batch],
                checks=None if any(c is None for c in checks) else checks,  # type: ignore[arg-type]
            )
        records = out.to_records()
        per_window = None if out.windows is None else out.windows.to_records()
    except Exception as e:
        if len(batch) > 1:
            # isolate the failing song: score the batch members one by one
            logger.debug("batch failed (%s); retrying items one by one", e)
            for it in batch:
                _run_batch(
                    model, [it], batch_size, results, check, guard, robust, windows, conditions
                )
            return
        reason, kind = describe_error(e)
        it = batch[0]
        results[it.index] = ScoreResult(it.name, error=reason, error_type=kind, exception=_bare(e))
        return
    for i, (it, rec) in enumerate(zip(batch, records)):
        reward = rec.pop("reward")
        if not all(math.isfinite(v) for v in (reward, *rec.values())):
            # never hand NaN to a caller as a score (an RL loop would train on it)
            results[it.index] = ScoreResult(
                it.name,
                error="the model produced non-finite scores (NaN or inf) for this input",
                error_type="NonFiniteOutput",
            )
            continue
        results[it.index] = ScoreResult(
            it.name,
            scores=rec,
            reward=reward,
            duration_s=it.wav.shape[-1] / it.sample_rate,
            signals=None
            if out.signals is None
            else {k: float(v[i]) for k, v in out.signals.items()},
            flags=None if out.flags is None else list(out.flags[i]),
            windows=None if per_window is None else per_window[i],
            ood=None if out.ood is None else float(out.ood[i]),
            std=None if out.std is None else {k: float(v[i]) for k, v in out.std.items()},
        )


def iter_decoded(
    model: ApexRewardModel, paths: Sequence[str | Path], num_workers: int = 2
) -> Iterator[tuple[str, torch.Tensor | None, int, BaseException | None]]:
    """Decode and check audio files in order, ``num_workers`` threads ahead (what
    :meth:`~apex_reward.model.ApexRewardModel.score` does before scoring).

    Yields:
        ``(path, waveform [C, T] float32 or None, sample_rate Hz, error or None)`` per file: a
        file that cannot be read or fails ``frontend.check`` comes with its error, never raises.
    """
    entries = [(str(p), p, None) for p in paths]
    for it in _decoded(model, entries, num_workers, window=max(2, 2 * num_workers)):
        yield it.name, it.wav, it.sample_rate, it.error


def score_waveforms(
    model: ApexRewardModel,
    items: Sequence[tuple[str, torch.Tensor, int]],
    *,
    segment_batch_size: int = 8,
    checked: bool = False,
    guard: str | None = None,
    robust: int = 0,
    seed: int | None = None,
    windows: bool | WindowSpec | None = None,
    condition: ConditionArg = None,
    checks: Sequence[tuple[dict[str, float], list[str]] | None] | None = None,
) -> list[ScoreResult]:
    """Score already decoded and validated waveforms in one forward pass (the reward server's batch).

    Args:
        items: ``(name, waveform [T] or [C, T] float32, sample_rate Hz)`` per song.
        segment_batch_size: encoder segments per encoder call.
        checked: every item already passed ``model.frontend.check`` (the server checks in its
            decode threads): skip that full pass over the samples here.
        guard: the guard policy (:mod:`apex_reward.guard`); None: the checkpoint's.
        robust, seed: the robust reward (:mod:`apex_reward.robust`; 0: off).
        windows: also score time windows (``ScoreResult.windows``): ``True`` the segments, a
            :class:`~apex_reward.windows.WindowSpec` windows of its length and hop.
        condition: a conditioned checkpoint's condition: one value for all items, one (or
            None) per item, or None (the learned average).
        checks: per item, the guard's ``(signals, flags)`` already measured (the server measures
            them on the audio as sent, before resampling), or None to measure them here.

    Returns:
        One :class:`ScoreResult` per item, in order. If the batched forward raises, the items are
        scored one by one, so only the song that fails gets an error.
    """
    batch = [
        _Item(i, name, wav, int(sr), checks=None if checks is None else checks[i])
        for i, (name, wav, sr) in enumerate(items)
    ]
    conditions = per_input_conditions(model.config.head.condition, condition, len(batch))
    results: list[ScoreResult | None] = [None] * len(batch)
    if batch:
        _run_batch(
            model,
            batch,
            max(1, int(segment_batch_size)),
            results,
            not checked,
            guard,
            (robust, seed),
            windows,
            conditions,
        )
    return [r for r in results if r is not None]


def score_inputs(
    model: ApexRewardModel,
    inputs: Any,
    *,
    sample_rate: int | Sequence[int] | None = None,
    batch_size: int = 8,
    num_workers: int = 2,
    progress: bool = False,
    guard: str | None = None,
    robust: int = 0,
    seed: int | None = None,
    windows: bool | WindowSpec | None = None,
    condition: ConditionArg = None,
) -> list[ScoreResult]:
    """See :meth:`apex_reward.ApexRewardModel.score`."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    entries = _normalise_inputs(inputs, sample_rate)
    # checked here, not per item: a wrong condition is the caller's error, not the audio's
    conditions = per_input_conditions(model.config.head.condition, condition, len(entries))
    results: list[ScoreResult | None] = [None] * len(entries)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), unit="file", desc="scoring", dynamic_ncols=True)
    batch: list[_Item] = []
    segs = 0

    def flush() -> None:
        nonlocal batch, segs
        if batch:
            # _load checked each item
            _run_batch(
                model,
                batch,
                batch_size,
                results,
                False,
                guard,
                (robust, seed),
                windows,
                conditions,
            )
            if bar is not None:
                bar.update(len(batch))
        batch, segs = [], 0

    try:
        # decode a bounded number of files ahead of the encoder (long files are large in memory)
        for item in _decoded(model, entries, num_workers, window=max(2, 2 * num_workers)):
            if item.error is not None:
                reason, kind = describe_error(item.error)
                results[item.index] = ScoreResult(
                    item.name, error=reason, error_type=kind, exception=_bare(item.error)
                )
                if bar is not None:
                    bar.update(1)
                continue
            n = _num_segments(model, item)
            if batch and segs + n > batch_size:
                flush()
            batch.append(item)
            segs += n
            if segs >= batch_size:
                flush()
        flush()
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]
