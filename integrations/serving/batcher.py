"""Dynamic batching for the reward server: many concurrent requests, one forward pass per batch.

Request handlers decode and validate their clips, then :meth:`DynamicBatcher.submit` each one and
``await`` its result. A single worker thread (so the asyncio event loop never runs the model)
collects waiting clips into a batch of at most ``max_batch`` clips, waiting at most ``max_wait_s``
after the oldest clip arrived, runs the model once through
:func:`apex_reward.scoring.score_waveforms` (which falls back to one-by-one scoring if the batched
forward raises, so one bad clip never fails the others), and hands each request its own result.

The module imports no web framework; it needs only torch and the model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from apex_reward.conditioning import per_input_conditions
from apex_reward.errors import ApexError
from apex_reward.robust import check_robust
from apex_reward.scoring import ScoreResult, score_waveforms
from apex_reward.windows import WindowSpec

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = ["DynamicBatcher", "OverloadedError", "BatcherStoppedError"]


class OverloadedError(ApexError):
    """More clips are waiting than the server's queue allows; retry later."""


class BatcherStoppedError(ApexError):
    """The batch worker is not running (server starting up or shutting down)."""


@dataclass
class _Job:
    name: str
    wav: torch.Tensor
    sample_rate: int
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    counted: bool = True  # still counted in ``pending`` (not taken, not cancelled)
    checks: tuple[dict[str, float], list[str]] | None = None  # guard signals measured already
    condition: str | None = None  # this clip's audience (None: the batcher's)


def _resolve(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():  # cancelled by a timeout or a client that went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class DynamicBatcher:
    """Groups concurrently submitted clips into model batches on one worker thread.

    Args:
        model: the reward model (eval mode, on its device).
        max_batch: most clips per forward pass.
        max_wait_s: longest time the oldest waiting clip waits for others to join its batch.
        max_queue: most clips waiting at once; :meth:`submit` raises :class:`OverloadedError`
            beyond it.
        segment_batch_size: 30 s segments per encoder call inside a batch (bounds memory when
            clips are long); defaults to ``max_batch``.
        on_batch: optional callback ``(clips, forward_seconds, oldest_wait_seconds)`` run on the
            worker thread after each batch (metrics).
    """

    def __init__(
        self,
        model: ApexRewardModel,
        *,
        max_batch: int = 16,
        max_wait_s: float = 0.01,
        max_queue: int = 512,
        segment_batch_size: int | None = None,
        on_batch: Any = None,
        guard: str | None = None,
        robust: int = 0,
        robust_seed: int | None = None,
        windows: WindowSpec | None = None,
        condition: str | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.model = model
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self.segment_batch_size = int(segment_batch_size or max_batch)
        self.on_batch = on_batch
        self.guard = guard
        self.robust = check_robust(robust)  # robust reward (apex_reward.robust); 0: off
        self.robust_seed = robust_seed
        self.windows = windows  # per-window scores with every result (apex_reward.windows)
        self.condition = condition  # a conditioned checkpoint's audience (None: the average)
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="apex-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in progress, then stop; clips still queued get
        :class:`BatcherStoppedError`."""
        self._stopping = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        while True:
            try:
                job = self._take(block=False)
            except queue.Empty:
                break
            if job is not None:
                self._fail(job, BatcherStoppedError("the server is shutting down"))

    @property
    def alive(self) -> bool:
        """Whether the worker thread is running."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def pending(self) -> int:
        """Clips submitted, not cancelled, and not yet taken into a batch."""
        return self._pending

    # -- submitting -----------------------------------------------------------------------------

    def submit(
        self,
        name: str,
        wav: torch.Tensor,
        sample_rate: int,
        checks: tuple[dict[str, float], list[str]] | None = None,
        condition: str | None = None,
    ) -> asyncio.Future:
        """Queue one decoded, validated clip; returns an asyncio future for its
        :class:`~apex_reward.scoring.ScoreResult`. Call from the event loop.

        Args:
            name: how the clip is named in its result and errors.
            wav: ``[T]`` or ``[C, T]`` float32 waveform.
            sample_rate: Hz.
            checks: the guard's ``(signals, flags)`` for this clip when already measured (on
                the audio as sent); the model then applies the OOD flag and the policy to them.
            condition: a conditioned checkpoint's audience for this clip (None: the
                batcher's ``condition``); clips with different conditions share batches.

        Raises:
            OverloadedError: ``max_queue`` clips are already waiting.
            BatcherStoppedError: the worker is not running.
            UnknownConditionError: ``condition`` is not one the checkpoint knows (checked here,
                so that it fails this clip only, never its batch).
        """
        if condition is not None:
            per_input_conditions(self.model.config.head.condition, condition, 1)
        if not self.alive:
            raise BatcherStoppedError("the batch worker is not running")
        with self._lock:
            if self._pending >= self.max_queue:
                raise OverloadedError(
                    f"{self._pending} clips are waiting (the limit is {self.max_queue}); retry later"
                )
            self._pending += 1
        loop = asyncio.get_running_loop()
        job = _Job(
            name,
            wav,
            int(sample_rate),
            loop.create_future(),
            loop,
            checks=checks,
            condition=condition,
        )
        # a clip whose request gave up (client gone, timeout) stops counting at once
        job.future.add_done_callback(lambda f, j=job: self._uncount(j) if f.cancelled() else None)
        self._queue.put(job)
        return job.future

    def _uncount(self, job: _Job) -> None:
        with self._lock:
            if job.counted:
                job.counted = False
                self._pending -= 1

    async def score(
        self, name: str, wav: torch.Tensor, sample_rate: int, condition: str | None = None
    ) -> ScoreResult:
        """``await`` the result of one clip (see :meth:`submit`)."""
        return await self.submit(name, wav, sample_rate, condition=condition)

    # -- worker ---------------------------------------------------------------------------------

    def _take(self, block: bool, timeout: float | None = None) -> _Job | None:
        job = self._queue.get(block=block, timeout=timeout)
        if job is not None:
            self._uncount(job)
        return job

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        """Fill a batch behind ``first``; returns (batch, stop requested)."""
        batch = [first]
        deadline = first.enqueued + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                job = self._take(block=remaining > 0, timeout=remaining if remaining > 0 else None)
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        while True:
            first = self._take(block=True)
            if first is None:
                return
            batch, stop = self._collect(first)
            live = [j for j in batch if not j.future.done()]
            if live:
                self._process(live)
            if stop:
                return

    def _process(self, batch: list[_Job]) -> None:
        waited = time.monotonic() - min(j.enqueued for j in batch)
        t0 = time.perf_counter()
        try:
            results = score_waveforms(
                self.model,
                [(j.name, j.wav, j.sample_rate) for j in batch],
                segment_batch_size=self.segment_batch_size,
                checked=True,  # submit() takes validated clips: no second pass on this thread
                guard=self.guard,
                robust=self.robust,
                seed=self.robust_seed,
                windows=self.windows,
                condition=self._conditions(batch),
                checks=[j.checks for j in batch],
            )
        except BaseException as e:  # never let the worker die: fail this batch, keep serving
            logger.exception("batch of %d clips failed unexpectedly", len(batch))
            for j in batch:
                self._fail(j, e if isinstance(e, Exception) else RuntimeError(str(e)))
            return
        elapsed = time.perf_counter() - t0
        for j, r in zip(batch, results):
            self._deliver(j, r, None)
        if self.on_batch is not None:
            try:
                self.on_batch(len(batch), elapsed, waited)
            except Exception:  # metrics must never break scoring
                logger.exception("on_batch callback failed")

    def _conditions(self, batch: list[_Job]) -> str | list[str | None] | None:
        """The batch's ``condition=``: the batcher's, unless some clip brought its own."""
        if all(j.condition is None for j in batch):
            return self.condition
        return [self.condition if j.condition is None else j.condition for j in batch]

    def _deliver(self, job: _Job, result: Any, error: BaseException | None) -> None:
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, result, error)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is waiting
            pass

    def _fail(self, job: _Job, error: BaseException) -> None:
        self._deliver(job, None, error)
