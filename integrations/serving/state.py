"""What the endpoints share: model, options, decoder, batcher, metrics; and the scoring of clips.

:class:`ServerState` is built by :func:`~apex_reward.integrations.serving.create_app` and
reachable as ``app.state.apex``. It imports no web framework: handlers hand it clips, it decodes
them on a small thread pool, queues them for the
:class:`~apex_reward.integrations.serving.batcher.DynamicBatcher`, and gives back, per clip, a
:class:`~apex_reward.scoring.ScoreResult` or a typed
:class:`~apex_reward.integrations.serving.errors.ClipError`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from apex_reward._version import __version__
from apex_reward.conditioning import per_input_conditions
from apex_reward.errors import ConfigError
from apex_reward.scoring import ScoreResult

from ..decoders import import_decoder
from ..reward_logs import FailureLog, RewardLogs
from .batcher import DynamicBatcher, OverloadedError
from .config import ServeConfig
from .decoding import ClipDecoder
from .errors import ClientGone, ClipError, ModelOutputError, ScoringTimeout, result_error
from .limits import DecodeBudget
from .metrics import ServerMetrics
from .prepare import InferencePrep, Prepared

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["ServerState", "Clip", "preference_logit", "sigmoid"]

T = TypeVar("T")


@dataclass
class Clip:
    """One clip of a request: decoded (``wav``, ``sample_rate``) or failed (``error``);
    ``prepared`` is what the decode pool made of it for the batch worker."""

    name: str
    wav: torch.Tensor | None = None
    sample_rate: int = 0
    error: ClipError | None = None
    #: gives the clip's share of the decoded-size budget back (idempotent); None: nothing held
    release: Callable[[], None] | None = field(default=None, repr=False, compare=False)
    #: what the decode threads already did for the batch thread (:class:`InferencePrep`)
    prepared: Prepared | None = None
    #: a conditioned checkpoint's audience for this clip (None: the server's ``--condition``)
    condition: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


async def _disconnected(receive: Callable[[], Awaitable[dict]]) -> None:
    """Return when ``receive`` reports that the client disconnected (or cannot be read)."""
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # the connection is unusable: nobody will read the answer
        return


class ServerState:
    """Everything the endpoints share: model, options, decoder, batcher, metrics.

    Raises:
        ConfigError: invalid options for this model (unknown ``--openrlhf-score``, a missing
            ``--allow-dir``).
    """

    def __init__(self, model: ApexRewardModel, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        self.decoder = ClipDecoder(model, config)
        self.prep = InferencePrep(model, config)
        if config.openrlhf_score != "reward" and config.openrlhf_score not in model.score_names:
            raise ConfigError(
                f"serve: --openrlhf-score {config.openrlhf_score!r} is not 'reward' or one of "
                f"this model's scores {list(model.score_names)}"
            )
        if config.decoder is not None:
            import_decoder(config.decoder)  # fail at start-up, not on every sample
        # an unknown --condition fails at start-up (UnknownConditionError names the known ones)
        per_input_conditions(model.config.head.condition, config.condition, 1)
        self.warmed_up = not config.warmup
        # a small dedicated pool, not anyio's 40 threads: it bounds decode memory, and fewer
        # threads mean fewer glibc malloc arenas (RSS otherwise creeps up with each new thread)
        self.pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="apex-decode")
        self._queued_audio_s = 0.0
        self.budget = DecodeBudget(
            config.max_clip_samples, config.max_request_samples, config.max_queue_samples
        )
        self.batcher = DynamicBatcher(
            model,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            segment_batch_size=config.max_batch,
            guard=self.prep.batcher_guard,
            robust=config.robust,
            robust_seed=config.robust_seed,
            windows=config.window_spec(),
            condition=config.condition,
        )
        self.metrics = ServerMetrics(
            queue_clips=lambda: self.batcher.pending,
            queue_audio_s=lambda: self._queued_audio_s,
            ready=lambda: self.ready,
        )
        self.batcher.on_batch = self.metrics.on_batch
        #: /get_reward's per-sample logs and failure log (OpenRLHF)
        self.reward_logs = RewardLogs(model.score_names, failure_log=FailureLog(config.failure_log))

    # -- readiness ------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Warmed up and the batch worker running."""
        return self.warmed_up and self.batcher.alive

    def warmup(self) -> None:
        """One forward pass on a short noise clip, so the first request is not slow and a broken
        configuration (e.g. a dtype the device cannot run) fails at startup, not per request.

        Raises:
            ConfigError: the model cannot run on its device in the configured dtype.
        """
        from apex_reward.scoring import score_waveforms

        fe = self.model.config.frontend
        seconds = min(max(2.0, fe.min_duration_s), self.decoder.max_audio_s)
        g = torch.Generator().manual_seed(0)
        wav = 0.1 * torch.randn(int(seconds * fe.sample_rate), generator=g)
        (r,) = score_waveforms(self.model, [("warmup", wav, fe.sample_rate)], segment_batch_size=1)
        if not r.ok:
            raise ConfigError(
                f"serve: the model cannot run on {self.model.device} with --dtype "
                f"{self.config.model.dtype}: {r.error_type}: {r.error}"
            )
        self.warmed_up = True

    # -- decoding --------------------------------------------------------------------------------

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the decode pool (keeps the event loop free)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    # -- scoring ---------------------------------------------------------------------------------

    def _submit(self, clip: Clip) -> asyncio.Future | ClipError:
        if clip.error is not None or clip.wav is None:
            return clip.error or ClipError(clip.name, ModelOutputError("no audio decoded"))
        fut = self._enqueue(clip)
        if isinstance(fut, ClipError):
            if clip.release is not None:
                clip.release()
        elif clip.release is not None:
            fut.add_done_callback(lambda _f, release=clip.release: release())
        return fut

    def _enqueue(self, clip: Clip) -> asyncio.Future | ClipError:
        assert clip.wav is not None
        seconds = clip.wav.numel() / clip.sample_rate
        limit = self.config.max_queue_audio_s
        if self._queued_audio_s > 0 and self._queued_audio_s + seconds > limit:
            overloaded = OverloadedError(
                f"{clip.name}: {self._queued_audio_s:.0f} channel-seconds of audio are waiting "
                f"(the limit is {limit:g}); retry later"
            )
            return ClipError(clip.name, overloaded)
        try:
            checks = None if clip.prepared is None else clip.prepared.checks
            fut = self.batcher.submit(clip.name, clip.wav, clip.sample_rate, checks, clip.condition)
        except Exception as e:
            return ClipError(clip.name, e)
        self._queued_audio_s += seconds
        fut.add_done_callback(lambda _f, s=seconds: self._release_audio(s))
        return fut

    def _outcome(
        self, clip: Clip, f: asyncio.Future | ClipError, gone: bool = False
    ) -> ScoreResult | ClipError:
        if isinstance(f, ClipError):
            return f
        if f.cancelled() and gone:
            return ClipError(
                clip.name, ClientGone(f"{clip.name}: the client went away; dropped unscored")
            )
        if f.cancelled():
            timeout = self.config.request_timeout_s
            return ClipError(
                clip.name, ScoringTimeout(f"{clip.name}: not scored within {timeout:g} s")
            )
        if f.exception() is not None:
            return ClipError(clip.name, f.exception())  # type: ignore[arg-type]
        r: ScoreResult = f.result()
        if clip.prepared is not None:
            r = self.prep.finish(r, clip.prepared)
        return r if r.ok else result_error(r)

    async def score_clips(
        self,
        clips: Sequence[Clip],
        *,
        count_errors: bool = True,
        receive: Callable[[], Awaitable[dict]] | None = None,
    ) -> list[ScoreResult | ClipError]:
        """Queue the decoded clips for the batcher; each gets a ScoreResult or a ClipError.

        Every clip is counted in ``apex_clips_total``; its error in ``apex_errors_total`` too
        unless ``count_errors`` is False (the caller answers the error, which counts it).

        Args:
            receive: the request's ASGI ``receive``, its body already read: when it reports
                ``http.disconnect`` before the clips are scored, the clips still waiting are
                dropped from the queue (:class:`~.errors.ClientGone`) instead of scored.
        """
        futures = [self._submit(c) for c in clips]
        pending = [f for f in futures if isinstance(f, asyncio.Future)]
        gone = False
        if pending:
            gone = await self._wait(pending, receive)
        out = [self._outcome(c, f, gone) for c, f in zip(clips, futures)]
        for o in out:
            if isinstance(o, ScoreResult):
                self.metrics.clips.labels(outcome="ok").inc()
                self.metrics.audio.inc(o.duration_s or 0.0)
            else:
                self.metrics.clips.labels(outcome="error").inc()
                if count_errors:
                    self.metrics.count_error(o.type)
        return out

    async def _wait(
        self, pending: list[asyncio.Future], receive: Callable[[], Awaitable[dict]] | None
    ) -> bool:
        """Wait for the futures (at most ``--request-timeout-s``), cancelling those not done;
        True when the client disconnected first."""
        everything = asyncio.ensure_future(asyncio.wait(pending))
        watch = asyncio.ensure_future(_disconnected(receive)) if receive is not None else None
        waits = {everything} if watch is None else {everything, watch}
        try:
            await asyncio.wait(
                waits, timeout=self.config.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for w in waits:
                w.cancel()
            for f in pending:
                f.cancel()  # no-op for those done: the batcher skips the rest
        return watch is not None and watch.done() and not watch.cancelled()

    async def score_one(
        self, clip: Clip, receive: Callable[[], Awaitable[dict]] | None = None
    ) -> ScoreResult:
        """Score one clip; raises its :class:`ClipError` (for the caller to answer) when it
        cannot be scored."""
        (res,) = await self.score_clips([clip], count_errors=False, receive=receive)
        if isinstance(res, ClipError):
            raise res
        return res

    def _release_audio(self, seconds: float) -> None:
        self._queued_audio_s = max(0.0, self._queued_audio_s - seconds)

    # -- answers ---------------------------------------------------------------------------------

    def result_json(self, r: ScoreResult, name: str) -> dict[str, Any]:
        """One scored clip's JSON: name, scores, reward, duration_s, ood; signals and flags
        unless the guard is off; std (ensembles); windows (``--windows``)."""
        out = {"name": name, "scores": r.scores, "reward": r.reward, "duration_s": r.duration_s}
        if r.signals is not None:
            out["signals"], out["flags"] = r.signals, r.flags
        out["ood"] = r.ood
        if r.std is not None:
            out["std"] = r.std
        if r.windows is not None:
            out["windows"] = r.windows
        return out

    def info(self, auth_required: bool) -> dict[str, Any]:
        """``GET /v1/info``: the model, its limits and the server's options."""
        cfg = self.config
        fe = self.model.config.frontend
        return {
            "apex_reward_version": __version__,
            "model": cfg.model.model or None,
            "untrained": self.model.untrained,
            "score_names": list(self.model.score_names),
            "reward_weights": dict(self.model.config.reward_weights),
            "preference": self.preference_method,
            "device": str(self.model.device),
            "dtype": cfg.model.dtype,
            "limits": {
                "max_body_bytes": cfg.max_body_bytes,
                "max_clips_per_request": cfg.max_clips_per_request,
                "min_audio_s": fe.min_duration_s,
                "max_audio_s": self.decoder.max_audio_s,
                "max_channels": cfg.max_channels,
                "sample_rates": sorted(self.decoder.sample_rates),
            },
            "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms},
            "paths_allowed": self.decoder.allow_dir is not None,
            "auth_required": auth_required,
        }

    @property
    def preference_method(self) -> str:
        """``"preference_head"`` when the model has a fitted one, else ``"bradley_terry"``."""
        return "preference_head" if self.model.preference_head is not None else "bradley_terry"


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large ``|x|``."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def preference_logit(
    model: ApexRewardModel, a: ScoreResult, b: ScoreResult, instrumental: float
) -> float:
    """``logit P(a > b)`` from two scored clips, via ``model.preference_logits_from_outputs``
    (the fitted preference head, or Bradley–Terry on the rewards): the number the model gives
    for the pair in one forward pass, up to float32 rounding."""
    from apex_reward.model import ApexOutput

    head = model.preference_head
    device = next(head.buffers()).device if head is not None else torch.device("cpu")

    def out(r: ScoreResult) -> ApexOutput:
        f32 = torch.float32
        scores = {k: torch.tensor([v], dtype=f32, device=device) for k, v in r.scores.items()}
        return ApexOutput(scores=scores, reward=torch.tensor([r.reward], dtype=f32, device=device))

    with torch.inference_mode():
        inst = torch.tensor([instrumental], dtype=torch.float64, device=device)
        logit = model.preference_logits_from_outputs(out(a), out(b), is_instrumental=inst)
    return float(logit[0])
