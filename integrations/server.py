"""``apex-reward serve``: a batching HTTP reward server for RL rollout workers (APEX_SPEC §6).

A FastAPI app served by uvicorn. Every clip a request carries is decoded and validated on its own
(a few decode threads), then queued for a :class:`~apex_reward.integrations.batcher.DynamicBatcher`
that scores concurrent requests' clips together in one forward pass on a single worker thread, so
the event loop keeps answering (health checks, metrics, uploads) while the model runs.

Endpoints (JSON in, JSON out; errors are ``{"error": {"type": ..., "message": ...}}`` with a 4xx or
5xx status):

* ``POST /v1/score``: one clip, as a multipart upload (one file part), a raw ``audio/*`` body, or
  JSON ``{"base64": "...", "name": "x.wav"}`` / ``{"path": "rel/x.wav"}`` (server-side paths only
  under ``--allow-dir``). -> ``{"name", "scores", "reward", "duration_s"}``; a clip that cannot be
  scored -> 422 naming the problem.
* ``POST /v1/score/batch``: many clips (multipart with several file parts, or JSON
  ``{"clips": [clip, ...]}``) -> ``{"results": [...]}``, one per clip in order, each a score or an
  error; one bad clip never fails the others.
* ``POST /v1/compare``: clips ``a`` and ``b`` -> ``logit P(a > b)``, its probability, both rewards.
* ``POST /get_reward``: OpenRLHF's remote reward protocol (see :func:`find_audio_reference`).
* ``GET /health`` (liveness), ``GET /ready`` (model warmed up and batch worker running),
  ``GET /metrics`` (Prometheus text), ``GET /v1/info`` (model and limits).

Security: binds 127.0.0.1 unless ``--host`` says otherwise; with ``--api-key-env VAR`` every
endpoint but ``/health`` and ``/ready`` needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``
(compared in constant time); server-side paths are off unless ``--allow-dir`` names a directory,
and never resolve outside it (symlinks included); request bodies, clip counts, audio length,
channels and sample rates are bounded before audio is decoded.

fastapi, uvicorn and python-multipart come with ``pip install 'apex-reward[serve]'``; they are
imported only when an app is built or served.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, unquote

import torch

from apex_reward import errors as apex_errors
from apex_reward._version import __version__
from apex_reward.audio import as_waveform_list, decode_audio_bytes, load_audio
from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args
from apex_reward.errors import (
    ApexError,
    AudioShapeError,
    AudioTooLongError,
    ConfigError,
    EmptyAudioError,
    UnsupportedSampleRateError,
    require,
)
from apex_reward.scoring import ScoreResult

from .batcher import BatcherStoppedError, DynamicBatcher, OverloadedError
from .prometheus import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .prometheus import MetricsRegistry

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "ServeConfig",
    "create_app",
    "serve",
    "load_server_model",
    "find_audio_reference",
    "preference_logit",
    "add_serve_arguments",
    "run_serve",
    "UnsupportedSampleRateError",
    "ServerProcess",
]

#: Sample rates accepted by default. The windowed-sinc resampler's filter grows with the reduced
#: ratio between the input rate and 24 kHz (44,101 Hz would need a 24000-phase filter of several
#: GB), and each distinct rate caches one filter, so the server accepts a fixed list.
STANDARD_SAMPLE_RATES: tuple[int, ...] = (
    8000,
    11025,
    12000,
    16000,
    22050,
    24000,
    32000,
    44100,
    48000,
    88200,
    96000,
    176400,
    192000,
)

#: Endpoints that answer without an API key (load balancer and orchestrator probes).
OPEN_PATHS = frozenset({"/health", "/ready"})

#: Route labels used in metrics (anything else is counted as "other").
ROUTES = (
    "/v1/score",
    "/v1/score/batch",
    "/v1/compare",
    "/get_reward",
    "/v1/info",
    "/health",
    "/ready",
    "/metrics",
)


@dataclass
class ServeConfig:
    """Options of ``apex-reward serve`` (each field is a ``--flag``; ``--config FILE.yaml`` too)."""

    model: str | None = field(
        default=None,
        metadata={"help": "checkpoint directory or hub id of the reward model (required)"},
    )
    encoder: str | None = field(
        default=None,
        metadata={"help": "override where the MERT weights come from (hub id or local directory)"},
    )
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "interface to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every "
            "network (set --api-key-env then)"
        },
    )
    port: int = field(default=8000, metadata={"help": "TCP port"})
    device: str | None = field(
        default=None, metadata={"help": "torch device; null picks cuda if available, else cpu"}
    )
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = field(
        default="auto",
        metadata={
            "help": "encoder precision: auto = the GPU fast path (fp16) on CUDA, fp32 on CPU; "
            "fp32 = exact (fast path off); bf16/fp16 = the fast path in that dtype (on CPU "
            "they run, slowly, with a warning)"
        },
    )
    threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads; null leaves torch's choice"}
    )
    max_batch: int = field(
        default=16,
        metadata={"help": "most clips per forward pass (also the encoder's segments per call)"},
    )
    max_wait_ms: float = field(
        default=10.0,
        metadata={
            "help": "longest time the oldest queued clip waits for others to join its batch, ms"
        },
    )
    max_queue: int = field(
        default=1024,
        metadata={"help": "most clips waiting for the model; beyond it requests get 503"},
    )
    max_queue_audio_s: float = field(
        default=7200.0,
        metadata={
            "help": "most decoded audio waiting for the model, in channel-seconds (bounds memory); "
            "beyond it requests get 503"
        },
    )
    request_timeout_s: float = field(
        default=300.0,
        metadata={"help": "a request whose clips are not scored within this time gets 503"},
    )
    api_key_env: str | None = field(
        default=None,
        metadata={
            "help": "name of an environment variable holding the API key; when set, requests "
            "need 'Authorization: Bearer KEY' or 'X-API-Key: KEY' (else 401)"
        },
    )
    allow_query_api_key: bool = field(
        default=False,
        metadata={
            "help": "also accept the key as ?api_key=KEY in the URL (for clients that cannot send "
            "headers, e.g. OpenRLHF's remote reward URL); it is redacted from access logs"
        },
    )
    max_body_mb: float = field(
        default=64.0, metadata={"help": "largest request body in MiB; larger ones get 413"}
    )
    max_clips_per_request: int = field(
        default=256, metadata={"help": "most clips in one batch or /get_reward request"}
    )
    max_audio_s: float = field(
        default=600.0,
        metadata={
            "help": "longest clip in seconds (checked from the header before decoding; also "
            "capped by the model's own limit)"
        },
    )
    max_channels: int = field(
        default=8, metadata={"help": "most audio channels per clip (checked before decoding)"}
    )
    sample_rates: list[int] = field(
        default_factory=lambda: list(STANDARD_SAMPLE_RATES),
        metadata={"help": "accepted input sample rates in Hz; others get 422"},
    )
    allow_dir: str | None = field(
        default=None,
        metadata={
            "help": "directory whose audio files requests may name by path (JSON 'path', "
            "file:// references); off by default; paths never resolve outside it"
        },
    )
    decode_workers: int = field(
        default=4, metadata={"help": "clips decoded at once (bounds decode memory)"}
    )
    failure_reward: float = field(
        default=0.0,
        metadata={
            "help": "reward /get_reward returns for a sample whose audio cannot be scored (its "
            "'errors' entry and extra_logs.apex_ok = 0 say which)"
        },
    )
    openrlhf_score: str = field(
        default="overall",
        metadata={
            "help": "score /get_reward returns as 'scores' (OpenRLHF uses it for dynamic "
            "filtering): a score name or 'reward'"
        },
    )
    malloc_arena_max: int = field(
        default=2,
        metadata={
            "help": "glibc only: most malloc arenas (0 = glibc's default of 8 per core); a low "
            "cap keeps a long-running server's memory flat when threads free and reuse "
            "buffers of varying size"
        },
    )
    onednn_cache_capacity: int = field(
        default=0,
        metadata={
            "help": "CPU only: oneDNN's kernel cache size (its default is 1024). A server sees a "
            "new tensor shape with almost every batch, and each cached shape keeps memory, so "
            "the default 0 keeps resident memory flat (kernels are rebuilt, ~0.2 ms each); an "
            "ONEDNN_PRIMITIVE_CACHE_CAPACITY already in the environment wins"
        },
    )
    warmup: bool = field(
        default=True,
        metadata={"help": "run one forward pass before accepting requests (/ready waits for it)"},
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = field(
        default="info", metadata={"help": "uvicorn log level"}
    )
    access_log: bool = field(default=True, metadata={"help": "log one line per request"})

    def __post_init__(self) -> None:
        def positive(name: str, value: float) -> None:
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"serve: --{name.replace('_', '-')} must be > 0, got {value!r}")

        if not 0 <= self.port <= 65535:
            raise ConfigError(f"serve: --port must be in 0..65535, got {self.port}")
        for name in (
            "max_batch",
            "max_queue",
            "max_queue_audio_s",
            "request_timeout_s",
            "max_body_mb",
            "max_clips_per_request",
            "max_audio_s",
            "max_channels",
            "decode_workers",
        ):
            positive(name, getattr(self, name))
        if not (self.max_wait_ms >= 0 and math.isfinite(self.max_wait_ms)):
            raise ConfigError(f"serve: --max-wait-ms must be >= 0, got {self.max_wait_ms!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"serve: --threads must be >= 1, got {self.threads}")
        if not self.sample_rates or any(r <= 0 for r in self.sample_rates):
            raise ConfigError(
                f"serve: --sample-rates must be positive integers, got {self.sample_rates!r}"
            )
        if not math.isfinite(self.failure_reward):
            raise ConfigError(f"serve: --failure-reward must be finite, got {self.failure_reward}")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


# ----------------------------------------------------------------------------------------------
# errors with an HTTP status


class HTTPError(Exception):
    """An error answered as ``{"error": {"type", "message"}}`` with ``status``."""

    def __init__(
        self, status: int, type: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers


class _BodyTooLarge(Exception):
    pass


def _is_apex_error_name(name: str | None) -> bool:
    cls = getattr(apex_errors, name or "", None)
    return isinstance(cls, type) and issubclass(cls, ApexError)


def classify(e: BaseException) -> tuple[int, str, str]:
    """``(status, type, message)`` for an exception raised while handling a clip or request."""
    if isinstance(e, HTTPError):
        return e.status, e.type, e.message
    if isinstance(e, OverloadedError):
        return 503, "Overloaded", str(e)
    if isinstance(e, BatcherStoppedError):
        return 503, "NotReady", str(e)
    if isinstance(e, ApexError):  # AudioError subclasses and friends: the input's fault
        return 422, type(e).__name__, str(e)
    return 500, "InternalError", f"{type(e).__name__}: {e}"


def _result_error(r: ScoreResult) -> tuple[int, str, str]:
    message = f"{r.input}: {r.error}" if r.error and r.input else (r.error or "failed")
    if _is_apex_error_name(r.error_type):
        return 422, r.error_type or "AudioError", message
    return 500, "InternalError", f"{r.error_type}: {message}"


# ----------------------------------------------------------------------------------------------
# audio references inside OpenRLHF queries

_DATA_URI = re.compile(
    r"data:(?:audio/[A-Za-z0-9.+-]+|application/octet-stream)(?:;[A-Za-z0-9.+-]+=[A-Za-z0-9.+-]+)*"
    r";base64,([A-Za-z0-9+/]*={0,2})"
)
_FILE_URI = re.compile(r"file://(/[^\s\"'<>]*)")


def find_audio_reference(text: str) -> tuple[Literal["base64", "path"], str] | None:
    """The last audio reference in ``text``: ``("base64", payload)`` or ``("path", path)``.

    Two forms are recognised anywhere in the text (the convention of ``/get_reward``):

    * a data URI ``data:audio/<type>;base64,<payload>`` (or ``application/octet-stream``) whose
      payload is a whole audio file (WAV, FLAC, Ogg, MP3) in standard base64 without line breaks;
    * a file URI ``file:///absolute/path.wav`` (percent-encoded, e.g. ``%20`` for a space); it
      ends at whitespace, a quote, ``<`` or ``>``, and trailing ``.,;:!?)]}`` are dropped. It is
      honoured only when the server allows paths (``--allow-dir``) and the file lies inside it.

    Returns None when the text holds neither.
    """
    best: tuple[int, Literal["base64", "path"], str] | None = None
    for m in _DATA_URI.finditer(text):
        best = (m.start(), "base64", m.group(1))
    for m in _FILE_URI.finditer(text):
        if best is None or m.start() > best[0]:
            best = (m.start(), "path", unquote(m.group(1).rstrip(".,;:!?)]}")))
    return None if best is None else (best[1], best[2])


# ----------------------------------------------------------------------------------------------
# model loading


def load_server_model(config: ServeConfig) -> ApexRewardModel:
    """Load ``config.model`` for serving: frozen, eval mode, on the device, encoder in ``dtype``.

    Raises:
        ConfigError: no ``--model`` given.
        CheckpointError, ConfigError: the checkpoint cannot be loaded.
    """
    from apex_reward.model import ApexRewardModel

    if not config.model:
        raise ConfigError("serve: --model DIR is required (a checkpoint directory or hub id)")
    if config.threads:
        torch.set_num_threads(config.threads)
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ApexRewardModel.from_pretrained(
        config.model, device=device, encoder_source=config.encoder
    )
    if config.dtype in ("fp16", "bf16") and model.device.type == "cpu":
        logger.warning(
            "--dtype %s on CPU: the encoder runs in %s, which on CPU is usually several times "
            "slower than fp32 and shifts scores by ~1e-3; use it to try a GPU configuration",
            config.dtype,
            config.dtype,
        )
    model.set_precision(config.dtype)
    if model.untrained:
        logger.warning(
            "%s is an UNTRAINED model (random heads): its scores show the pipeline works, they "
            "say nothing about the music",
            config.model,
        )
    return model


# ----------------------------------------------------------------------------------------------
# the server state: limits, decoding, batching, metrics (no web framework here)


@dataclass
class _Clip:
    name: str
    wav: torch.Tensor | None = None
    sample_rate: int = 0
    error: tuple[int, str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_utf8(text: str) -> bool:
    """False for strings JSON lets through that cannot be encoded (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ServerState:
    """Everything the endpoints share: model, config, batcher, metrics, limits.

    Built by :func:`create_app`; reachable as ``app.state.apex``.
    """

    def __init__(self, model: ApexRewardModel, config: ServeConfig) -> None:
        self.model = model
        self.config = config
        fe = model.config.frontend
        self.max_audio_s = min(float(config.max_audio_s), float(fe.max_duration_s))
        self.sample_rates = frozenset(int(r) for r in config.sample_rates)
        self.allow_dir: Path | None = None
        if config.allow_dir is not None:
            d = Path(config.allow_dir).expanduser()
            if not d.is_dir():
                raise ConfigError(f"serve: --allow-dir {config.allow_dir!r} is not a directory")
            self.allow_dir = d.resolve()
        self._key_digest: bytes | None = None
        if config.api_key_env:
            key = os.environ.get(config.api_key_env, "")
            if not key:
                raise ConfigError(
                    f"serve: --api-key-env {config.api_key_env}: that environment variable is "
                    "not set or empty"
                )
            self._key_digest = _digest(key)
        if config.openrlhf_score != "reward" and config.openrlhf_score not in model.score_names:
            raise ConfigError(
                f"serve: --openrlhf-score {config.openrlhf_score!r} is not 'reward' or one of "
                f"this model's scores {list(model.score_names)}"
            )
        self.warmed_up = not config.warmup
        # a small dedicated pool, not anyio's 40 threads: it bounds decode memory, and fewer
        # threads mean fewer glibc malloc arenas (RSS otherwise creeps up with each new thread)
        self.pool = ThreadPoolExecutor(config.decode_workers, thread_name_prefix="apex-decode")
        self._queued_audio_s = 0.0
        self._setup_metrics()
        self.batcher = DynamicBatcher(
            model,
            max_batch=config.max_batch,
            max_wait_s=config.max_wait_ms / 1000.0,
            max_queue=config.max_queue,
            segment_batch_size=config.max_batch,
            on_batch=self._on_batch,
        )

    # -- metrics --------------------------------------------------------------------------------

    def _setup_metrics(self) -> None:
        m = self.metrics = MetricsRegistry()
        self.m_requests = m.counter(
            "apex_requests_total", "HTTP requests by route and status", ("endpoint", "status")
        )
        self.m_latency = m.histogram(
            "apex_request_duration_seconds",
            "HTTP request latency by route",
            (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            ("endpoint",),
        )
        self.m_errors = m.counter(
            "apex_errors_total", "errors answered, by type (request and per clip)", ("type",)
        )
        self.m_clips = m.counter("apex_clips_total", "clips handled, by outcome", ("outcome",))
        self.m_audio = m.counter("apex_audio_seconds_total", "seconds of audio scored")
        self.m_batch = m.histogram(
            "apex_batch_size", "clips per forward pass", (1, 2, 4, 8, 16, 32, 64, 128, 256)
        )
        self.m_batch_time = m.histogram(
            "apex_batch_duration_seconds",
            "forward-pass time per batch",
            (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.m_batch_wait = m.histogram(
            "apex_batch_wait_seconds",
            "time the oldest clip of a batch waited in the queue",
            (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.m_queue = m.gauge("apex_queue_clips", "clips waiting for the model")
        self.m_queue_audio = m.gauge(
            "apex_queue_audio_seconds", "decoded audio waiting for the model, channel-seconds"
        )
        self.m_inflight = m.gauge("apex_inflight_requests", "requests being handled")
        self.m_ready = m.gauge("apex_ready", "1 when the server accepts scoring requests")

    def _on_batch(self, clips: int, seconds: float, waited: float) -> None:
        self.m_batch.observe(clips)
        self.m_batch_time.observe(seconds)
        self.m_batch_wait.observe(waited)

    def count_error(self, type: str) -> None:
        self.m_errors.inc(type=type)

    def render_metrics(self) -> str:
        self.m_queue.set(self.batcher.pending)
        self.m_queue_audio.set(self._queued_audio_s)
        self.m_ready.set(1.0 if self.ready else 0.0)
        return self.metrics.render()

    # -- readiness, auth --------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self.warmed_up and self.batcher.alive

    def warmup(self) -> None:
        """One forward pass on a short noise clip, so the first request is not slow and a broken
        configuration (e.g. a dtype the device cannot run) fails at startup, not per request."""
        from apex_reward.scoring import score_waveforms

        fe = self.model.config.frontend
        seconds = min(max(2.0, fe.min_duration_s), self.max_audio_s)
        g = torch.Generator().manual_seed(0)
        wav = 0.1 * torch.randn(int(seconds * fe.sample_rate), generator=g)
        (r,) = score_waveforms(self.model, [("warmup", wav, fe.sample_rate)], segment_batch_size=1)
        if not r.ok:
            raise ConfigError(
                f"serve: the model cannot run on {self.model.device} with --dtype "
                f"{self.config.dtype}: {r.error_type}: {r.error}"
            )
        self.warmed_up = True

    @property
    def auth_required(self) -> bool:
        return self._key_digest is not None

    def authorized(self, headers: dict[str, str], query_string: str) -> bool:
        """Whether the request carries the API key (constant-time comparison)."""
        if self._key_digest is None:
            return True
        candidates = []
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            candidates.append(auth[7:].strip())
        if "x-api-key" in headers:
            candidates.append(headers["x-api-key"].strip())
        if self.config.allow_query_api_key and query_string:
            candidates.extend(parse_qs(query_string).get("api_key", [])[:1])
        ok = False
        for c in candidates:
            ok |= hmac.compare_digest(_digest(c), self._key_digest)
        return ok

    # -- decoding ---------------------------------------------------------------------------------

    def _precheck(self, sample_rate: int, channels: int, frames: int, name: str) -> None:
        if sample_rate not in self.sample_rates:
            raise UnsupportedSampleRateError(
                f"sample rate {sample_rate} Hz is not accepted; the server takes "
                f"{sorted(self.sample_rates)}",
                name,
            )
        if channels > self.config.max_channels:
            raise AudioShapeError(
                f"{channels} channels; the server accepts at most {self.config.max_channels}",
                name,
            )
        if frames > 0 and frames / sample_rate > self.max_audio_s:
            raise AudioTooLongError(
                f"audio is {frames / sample_rate:.1f} s long; the limit is {self.max_audio_s:g} s",
                name,
            )

    def _validate(self, wav: torch.Tensor, sample_rate: int, name: str) -> None:
        channels = wav.shape[0] if wav.ndim == 2 else 1
        self._precheck(sample_rate, channels, wav.shape[-1], name)
        as_waveform_list([wav])  # shape checks of the model's input path
        self.model.frontend.check(wav, sample_rate, name)

    def decode(self, source: bytes | Path, name: str) -> tuple[torch.Tensor, int]:
        """Decode and validate one clip (blocking; run in a thread).

        Returns ``(waveform [C, T] float32, sample_rate)``; raises a typed AudioError.
        """
        import soundfile as sf

        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise EmptyAudioError("no audio data (0 bytes)", name)
            try:
                info = sf.info(io.BytesIO(source))
            except Exception:  # decode_audio_bytes raises the typed error below
                info = None
            if info is not None:
                self._precheck(info.samplerate, info.channels, info.frames, name)
            wav, sr = decode_audio_bytes(source, name=name, max_duration_s=self.max_audio_s)
        else:
            try:
                info = sf.info(str(source)) if source.is_file() else None
            except Exception:
                info = None
            if info is not None:
                self._precheck(info.samplerate, info.channels, info.frames, name)
            wav, sr = load_audio(source, max_duration_s=self.max_audio_s)
        self._validate(wav, sr, name)
        return wav, sr

    def resolve_path(self, raw: Any, name: str) -> Path:
        """A path a request names, if it lies inside ``--allow-dir`` (else 403)."""
        if self.allow_dir is None:
            raise HTTPError(
                403,
                "PathNotAllowed",
                f"{name}: server-side paths are disabled on this server (start it with "
                "--allow-dir DIR), upload the audio instead",
            )
        if not isinstance(raw, str) or not raw or "\x00" in raw or not _is_utf8(raw):
            raise HTTPError(400, "InvalidRequest", f"{name}: 'path' must be a non-empty string")
        p = Path(raw)
        try:
            candidate = (p if p.is_absolute() else self.allow_dir / p).resolve()
        except OSError as e:  # name too long, symlink loop ...
            raise HTTPError(400, "InvalidRequest", f"{name}: bad path ({e.strerror})") from None
        if not candidate.is_relative_to(self.allow_dir):
            raise HTTPError(
                403,
                "PathNotAllowed",
                f"{name}: path {raw!r} is outside the directory this server allows",
            )
        return candidate

    @staticmethod
    def b64decode(value: Any, name: str) -> bytes:
        """Strict standard base64 (a ``data:...;base64,`` prefix and whitespace are allowed)."""
        if not isinstance(value, str):
            raise HTTPError(400, "InvalidBase64", f"{name}: 'base64' must be a string")
        if value.startswith("data:"):
            head, sep, value = value.partition(",")
            if not sep or not head.endswith(";base64"):
                raise HTTPError(400, "InvalidBase64", f"{name}: data URI is not ';base64,'")
        if any(c.isspace() for c in value[:64]) or any(c.isspace() for c in value[-64:]):
            value = "".join(value.split())
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise HTTPError(400, "InvalidBase64", f"{name}: invalid base64 ({e})") from None

    def clip_from_json(self, obj: Any, default_name: str) -> tuple[str, bytes | Path]:
        """``{"base64": ..., "name": ...}`` or ``{"path": ..., "name": ...}`` -> (name, source)."""
        if not isinstance(obj, dict):
            raise HTTPError(
                400,
                "InvalidRequest",
                f"{default_name}: expected an object with 'base64' or 'path', got "
                f"{type(obj).__name__}",
            )
        unknown = sorted(set(obj) - {"base64", "path", "name"})
        if unknown:
            raise HTTPError(
                400,
                "InvalidRequest",
                f"{default_name}: unknown field(s) {unknown}; expected 'base64' or 'path', "
                "and optionally 'name'",
            )
        name = obj.get("name", default_name)
        if not isinstance(name, str) or not name or not _is_utf8(name):
            raise HTTPError(
                400, "InvalidRequest", f"{default_name}: 'name' must be a non-empty UTF-8 string"
            )
        name = name[:200]
        if ("base64" in obj) == ("path" in obj):
            raise HTTPError(
                400, "InvalidRequest", f"{name}: give exactly one of 'base64' and 'path'"
            )
        if "base64" in obj:
            return name, self.b64decode(obj["base64"], name)
        return name, self.resolve_path(obj["path"], name)

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """Run ``fn(*args)`` on the decode pool (keeps the event loop free)."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def decode_async(self, name: str, source: bytes | Path) -> _Clip:
        """Decode on the decode pool (``decode_workers`` threads); errors are kept."""
        try:
            wav, sr = await self.run_blocking(self.decode, source, name)
            return _Clip(name, wav, sr)
        except Exception as e:
            return _Clip(name, error=classify(e))

    # -- scoring ---------------------------------------------------------------------------------

    async def score_clips(self, clips: Sequence[_Clip]) -> list[ScoreResult | tuple[int, str, str]]:
        """Queue the decoded clips for the batcher; each gets a ScoreResult or an error tuple."""
        futures: list[asyncio.Future | tuple[int, str, str]] = []
        for c in clips:
            if not c.ok:
                futures.append(c.error)  # type: ignore[arg-type]
                continue
            seconds = c.wav.numel() / c.sample_rate  # type: ignore[union-attr]
            queued = self._queued_audio_s
            if queued > 0 and queued + seconds > self.config.max_queue_audio_s:
                futures.append(
                    (
                        503,
                        "Overloaded",
                        f"{c.name}: {self._queued_audio_s:.0f} channel-seconds of audio are "
                        f"waiting (the limit is {self.config.max_queue_audio_s:g}); retry later",
                    )
                )
                continue
            try:
                fut = self.batcher.submit(c.name, c.wav, c.sample_rate)  # type: ignore[arg-type]
            except Exception as e:
                futures.append(classify(e))
                continue
            self._queued_audio_s += seconds
            fut.add_done_callback(lambda _f, s=seconds: self._release_audio(s))
            futures.append(fut)
        pending = [f for f in futures if isinstance(f, asyncio.Future)]
        if pending:
            done, not_done = await asyncio.wait(pending, timeout=self.config.request_timeout_s)
            for f in not_done:
                f.cancel()
        out: list[ScoreResult | tuple[int, str, str]] = []
        for c, f in zip(clips, futures):
            if not isinstance(f, asyncio.Future):
                out.append(f)
            elif f.cancelled():
                out.append(
                    (
                        503,
                        "Timeout",
                        f"{c.name}: not scored within {self.config.request_timeout_s:g} s",
                    )
                )
            elif f.exception() is not None:
                out.append(classify(f.exception()))  # type: ignore[arg-type]
            else:
                r: ScoreResult = f.result()
                out.append(r if r.ok else _result_error(r))
        for o in out:
            if isinstance(o, ScoreResult):
                self.m_clips.inc(outcome="ok")
                self.m_audio.inc(o.duration_s or 0.0)
            else:
                self.m_clips.inc(outcome="error")
                self.count_error(o[1])
        return out

    def _release_audio(self, seconds: float) -> None:
        self._queued_audio_s = max(0.0, self._queued_audio_s - seconds)

    def result_json(self, r: ScoreResult, name: str) -> dict[str, Any]:
        return {
            "name": name,
            "scores": r.scores,
            "reward": r.reward,
            "duration_s": r.duration_s,
        }

    def info(self) -> dict[str, Any]:
        cfg = self.config
        fe = self.model.config.frontend
        return {
            "apex_reward_version": __version__,
            "model": cfg.model,
            "untrained": self.model.untrained,
            "score_names": list(self.model.score_names),
            "reward_weights": dict(self.model.config.reward_weights),
            "preference": "preference_head"
            if self.model.preference_head is not None
            else "bradley_terry",
            "device": str(self.model.device),
            "dtype": cfg.dtype,
            "limits": {
                "max_body_bytes": cfg.max_body_bytes,
                "max_clips_per_request": cfg.max_clips_per_request,
                "min_audio_s": fe.min_duration_s,
                "max_audio_s": self.max_audio_s,
                "max_channels": cfg.max_channels,
                "sample_rates": sorted(self.sample_rates),
            },
            "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms},
            "paths_allowed": self.allow_dir is not None,
            "auth_required": self.auth_required,
        }


# ----------------------------------------------------------------------------------------------
# the ASGI app


def _media_type(headers: Any) -> str:
    return headers.get("content-type", "").split(";", 1)[0].strip().lower()


def create_app(model: ApexRewardModel, config: ServeConfig | None = None):
    """Build the FastAPI app serving ``model`` (batch worker starts with the app's lifespan).

    Args:
        model: a loaded :class:`~apex_reward.ApexRewardModel` (eval mode, on its device).
        config: server options (default :class:`ServeConfig`).

    Returns:
        A ``fastapi.FastAPI`` app; its :class:`ServerState` is ``app.state.apex``.

    Raises:
        MissingDependencyError: fastapi / python-multipart are not installed.
        ConfigError: invalid options (unset API key variable, missing --allow-dir, ...).
    """
    fastapi = require("fastapi", "serve", "the reward server")
    import importlib.util

    if importlib.util.find_spec("python_multipart") is None:  # python-multipart < 0.0.13
        require("multipart", "serve", "the reward server's file uploads")
    from contextlib import asynccontextmanager

    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response

    config = config or ServeConfig()
    state = ServerState(model, config)

    def error_response(
        status: int, type: str, message: str, headers: dict[str, str] | None = None
    ) -> JSONResponse:
        state.count_error(type)
        return JSONResponse(
            {"error": {"type": type, "message": message}}, status_code=status, headers=headers
        )

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        warmup = None
        if not state.warmed_up:  # serve() warms up before binding; an embedding app may not
            warmup = asyncio.get_running_loop().run_in_executor(state.pool, state.warmup)
        try:
            yield
        finally:
            if warmup is not None and warmup.done() and warmup.exception() is not None:
                logger.error("warm-up failed: %s", warmup.exception())
            state.batcher.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(
        title="apex-reward",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.apex = state

    # -- exception handlers --------------------------------------------------------------------

    async def on_http_error(request: Request, exc: HTTPError) -> Response:
        return error_response(exc.status, exc.type, exc.message, exc.headers)

    async def on_starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = {
            400: "InvalidRequest",
            404: "NotFound",
            405: "MethodNotAllowed",
        }.get(exc.status_code, "HTTPError")
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            detail = f"no endpoint {request.url.path!r}"
        elif exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, kind, detail, getattr(exc, "headers", None))

    async def on_too_large(request: Request, exc: _BodyTooLarge) -> Response:
        await _drain(request.receive, config.max_body_bytes * 4)
        return error_response(
            413,
            "PayloadTooLarge",
            f"request body exceeds {config.max_body_bytes} bytes (--max-body-mb "
            f"{config.max_body_mb:g})",
        )

    app.add_exception_handler(HTTPError, on_http_error)
    app.add_exception_handler(StarletteHTTPException, on_starlette_error)
    app.add_exception_handler(_BodyTooLarge, on_too_large)

    # -- request helpers -----------------------------------------------------------------------

    async def read_body(request: Request) -> bytes:
        body = await request.body()
        if not body:
            raise HTTPError(400, "EmptyBody", "the request body is empty")
        return body

    async def read_json(request: Request) -> Any:
        body = await read_body(request)
        try:
            return await state.run_blocking(json.loads, body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HTTPError(400, "InvalidJSON", f"the body is not valid JSON ({e})") from None
        except RecursionError:
            raise HTTPError(400, "InvalidJSON", "the body's JSON is nested too deeply") from None

    def require_body(request: Request) -> None:
        if request.headers.get("content-length") == "0":
            raise HTTPError(400, "EmptyBody", "the request body is empty")

    def unsupported(request: Request, accepted: str) -> HTTPError:
        got = request.headers.get("content-type")
        what = f"Content-Type {got!r} is not accepted" if got else "no Content-Type header"
        return HTTPError(415, "UnsupportedMediaType", f"{what}; send {accepted}")

    async def files_from_form(request: Request, max_files: int) -> list[tuple[str, bytes]]:
        from starlette.datastructures import UploadFile

        out = []
        async with request.form(max_files=max_files, max_fields=16) as form:
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    out.append(((value.filename or key)[:200], await value.read()))
        return out

    async def one_clip(request: Request) -> _Clip:
        require_body(request)
        media = _media_type(request.headers)
        if media == "multipart/form-data":
            files = await files_from_form(request, max_files=1)
            if len(files) != 1:
                raise HTTPError(
                    400,
                    "InvalidRequest",
                    "expected one file part in the multipart body, got none",
                )
            name, source = files[0]
            if not source:
                raise HTTPError(400, "EmptyBody", f"{name}: the uploaded file is empty")
            return await state.decode_async(name, source)
        if media == "application/json":
            obj = await read_json(request)
            name, src = state.clip_from_json(obj, "clip")
            return await state.decode_async(name, src)
        if media.startswith("audio/") or media == "application/octet-stream":
            body = await read_body(request)
            name = request.headers.get("x-audio-name", "upload")[:200]
            return await state.decode_async(name, body)
        raise unsupported(request, "multipart/form-data, application/json or an audio/* body")

    async def scored_one(clip: _Clip) -> ScoreResult:
        (res,) = await state.score_clips([clip])
        if isinstance(res, ScoreResult):
            return res
        status, kind, message = res
        headers = {"Retry-After": "1"} if status == 503 else None
        raise HTTPError(status, kind, message, headers)

    def with_untrained(payload: dict[str, Any]) -> dict[str, Any]:
        if model.untrained:
            payload["untrained"] = True
        return payload

    # -- endpoints ------------------------------------------------------------------------------

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        why = "warming up" if not state.warmed_up else "the batch worker is not running"
        return error_response(503, "NotReady", why, {"Retry-After": "1"})

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(state.render_metrics(), media_type=METRICS_CONTENT_TYPE)

    async def info(request: Request) -> Response:
        return JSONResponse(state.info())

    async def score(request: Request) -> Response:
        clip = await one_clip(request)
        if not clip.ok:
            raise HTTPError(*clip.error)  # type: ignore[misc]
        res = await scored_one(clip)
        return JSONResponse(with_untrained(state.result_json(res, clip.name)))

    async def score_batch(request: Request) -> Response:
        require_body(request)
        media = _media_type(request.headers)
        limit = config.max_clips_per_request
        if media == "multipart/form-data":
            files = await files_from_form(request, max_files=limit)
            if not files:
                raise HTTPError(400, "InvalidRequest", "no file parts in the multipart body")
            clips = await asyncio.gather(*(state.decode_async(n, b) for n, b in files))
        elif media == "application/json":
            obj = await read_json(request)
            items = obj.get("clips") if isinstance(obj, dict) else None
            if not isinstance(items, list) or not items:
                raise HTTPError(
                    400, "InvalidRequest", 'expected {"clips": [clip, ...]} with at least one clip'
                )
            if len(items) > limit:
                raise HTTPError(
                    400,
                    "TooManyClips",
                    f"{len(items)} clips in one request; the limit is {limit}",
                )

            async def one(i: int, item: Any) -> _Clip:
                try:
                    name, src = state.clip_from_json(item, f"clips[{i}]")
                except HTTPError as e:
                    return _Clip(f"clips[{i}]", error=classify(e))
                return await state.decode_async(name, src)

            clips = await asyncio.gather(*(one(i, it) for i, it in enumerate(items)))
        else:
            raise unsupported(request, "multipart/form-data or application/json")
        results = await state.score_clips(clips)
        rows = []
        for clip, res in zip(clips, results):
            if isinstance(res, ScoreResult):
                rows.append(state.result_json(res, clip.name))
            else:
                rows.append({"name": clip.name, "error": {"type": res[1], "message": res[2]}})
        return JSONResponse(with_untrained({"results": rows}))

    async def compare(request: Request) -> Response:
        require_body(request)
        media = _media_type(request.headers)
        instrumental: Any = False
        if media == "multipart/form-data":
            from starlette.datastructures import UploadFile

            parts: dict[str, tuple[str, bytes]] = {}
            async with request.form(max_files=2, max_fields=16) as form:
                for key in ("a", "b"):
                    v = form.get(key)
                    if isinstance(v, UploadFile):
                        parts[key] = ((v.filename or key)[:200], await v.read())
                flag = form.get("is_instrumental")
                if isinstance(flag, str):
                    if flag.lower() not in ("0", "1", "true", "false"):
                        raise HTTPError(
                            400, "InvalidRequest", "'is_instrumental' must be true/false/1/0"
                        )
                    instrumental = flag.lower() in ("1", "true")
            missing = [k for k in ("a", "b") if k not in parts]
            if missing:
                raise HTTPError(400, "InvalidRequest", f"missing file part(s) {missing}")
            sources = [parts["a"], parts["b"]]
        elif media == "application/json":
            obj = await read_json(request)
            if not isinstance(obj, dict) or "a" not in obj or "b" not in obj:
                raise HTTPError(
                    400, "InvalidRequest", 'expected {"a": clip, "b": clip[, "is_instrumental"]}'
                )
            unknown = sorted(set(obj) - {"a", "b", "is_instrumental"})
            if unknown:
                raise HTTPError(400, "InvalidRequest", f"unknown field(s) {unknown}")
            instrumental = obj.get("is_instrumental", False)
            if not isinstance(instrumental, bool):
                raise HTTPError(400, "InvalidRequest", "'is_instrumental' must be true or false")
            sources = [state.clip_from_json(obj[k], k) for k in ("a", "b")]
        else:
            raise unsupported(request, "multipart/form-data or application/json")
        clips = await asyncio.gather(*(state.decode_async(n, s) for n, s in sources))
        for which, clip in zip("ab", clips):
            if not clip.ok:
                status, kind, message = clip.error  # type: ignore[misc]
                raise HTTPError(status, kind, f"clip {which}: {message}")
        ra, rb = await asyncio.gather(scored_one(clips[0]), scored_one(clips[1]))
        # off the event loop: with the head on a GPU this waits for the device
        logit = await state.run_blocking(
            preference_logit, model, ra, rb, 1.0 if instrumental else 0.0
        )
        payload = {
            "a": clips[0].name,
            "b": clips[1].name,
            "logit": logit,
            "probability": _sigmoid(logit),
            "reward_a": ra.reward,
            "reward_b": rb.reward,
            "scores_a": ra.scores,
            "scores_b": rb.scores,
            "method": "preference_head" if model.preference_head is not None else "bradley_terry",
        }
        return JSONResponse(with_untrained(payload))

    async def get_reward(request: Request) -> Response:
        require_body(request)
        if _media_type(request.headers) != "application/json":
            raise unsupported(request, "application/json")
        obj = await read_json(request)
        if not isinstance(obj, dict):
            raise HTTPError(400, "InvalidRequest", "expected a JSON object with a 'query' list")
        queries = obj.get("query")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise HTTPError(400, "InvalidRequest", "'query' must be a list of strings")
        if len(queries) > config.max_clips_per_request:
            raise HTTPError(
                400,
                "TooManyClips",
                f"{len(queries)} queries in one request; the limit is "
                f"{config.max_clips_per_request}",
            )
        n = len(queries)
        extras = {}
        for key in ("prompts", "labels"):
            v = obj.get(key)
            if v is None:
                v = [None] * n
            if not isinstance(v, list) or len(v) != n:
                raise HTTPError(
                    400, "InvalidRequest", f"'{key}' must be a list as long as 'query' ({n})"
                )
            extras[key] = v

        async def one(i: int) -> _Clip:
            name = f"query[{i}]"
            try:
                ref = _reference_for(queries[i], extras["prompts"][i], extras["labels"][i])
                if ref is None:
                    raise HTTPError(
                        400,
                        "NoAudioReference",
                        f"{name}: no 'data:audio/...;base64,' or 'file://' reference in the "
                        "response part of the query or in the label",
                    )
                kind, value = ref
                src = (
                    state.b64decode(value, name)
                    if kind == "base64"
                    else state.resolve_path(value, name)
                )
            except HTTPError as e:
                return _Clip(name, error=classify(e))
            return await state.decode_async(name, src)

        clips = await asyncio.gather(*(one(i) for i in range(n)))
        results = await state.score_clips(clips)
        names = model.score_names
        rewards: list[float] = []
        scores: list[float] = []
        ok: list[float] = []
        per_score: dict[str, list[float]] = {s: [] for s in names}
        errs: list[dict[str, str] | None] = []
        for res in results:
            if isinstance(res, ScoreResult):
                rewards.append(float(res.reward))  # type: ignore[arg-type]
                key = config.openrlhf_score
                scores.append(float(res.reward if key == "reward" else res.scores[key]))  # type: ignore[index,arg-type]
                ok.append(1.0)
                for s in names:
                    per_score[s].append(float(res.scores[s]))  # type: ignore[index]
                errs.append(None)
            else:
                rewards.append(config.failure_reward)
                scores.append(config.failure_reward)
                ok.append(0.0)
                for s in names:
                    per_score[s].append(0.0)
                errs.append({"type": res[1], "message": res[2]})
        extra_logs = {"apex_ok": ok, **{f"apex_{s}": v for s, v in per_score.items()}}
        return JSONResponse(
            {"rewards": rewards, "scores": scores, "extra_logs": extra_logs, "errors": errs}
        )

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/ready", ready, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/v1/info", info, methods=["GET"])
    app.add_route("/v1/score", score, methods=["POST"])
    app.add_route("/v1/score/batch", score_batch, methods=["POST"])
    app.add_route("/v1/compare", compare, methods=["POST"])
    app.add_route("/get_reward", get_reward, methods=["POST"])

    # -- the guard: auth, body limit, metrics, last-resort errors -------------------------------

    app.add_middleware(
        _Guard, state=state, error_response=error_response, client_disconnect=ClientDisconnect
    )
    return app


def _reference_for(query: str, prompt: Any, label: Any) -> tuple[str, str] | None:
    """The audio reference of one OpenRLHF sample: in the response part of the query (the text
    after the prompt, when the query starts with it), else in the label."""
    text = query[len(prompt) :] if isinstance(prompt, str) and query.startswith(prompt) else query
    ref = find_audio_reference(text)
    if ref is None and isinstance(label, str):
        ref = find_audio_reference(label)
    return ref


def _sigmoid(x: float) -> float:
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


async def _drain(receive, limit: int) -> None:
    """Read and discard the rest of a request body (at most ``limit`` bytes), so the client can
    finish sending and read the error response instead of hitting a reset connection."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _Guard:
    """Outermost ASGI layer: API key, body-size limit, request metrics, last-resort 500s."""

    def __init__(
        self, app, *, state: ServerState, error_response, client_disconnect: type[Exception]
    ) -> None:
        self.app = app
        self.state = state
        self.error_response = error_response
        self.client_disconnect = client_disconnect

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        path = scope.get("path", "")
        endpoint = path if path in ROUTES else "other"
        status = [0]
        t0 = time.perf_counter()

        async def send_wrapper(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        limit = state.config.max_body_bytes
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        state.m_inflight.inc()
        try:
            if state.auth_required and path not in OPEN_PATHS:
                if not state.authorized(headers, scope.get("query_string", b"").decode("latin-1")):
                    await _drain(receive, limit)
                    which = (
                        "wrong API key"
                        if ("authorization" in headers or "x-api-key" in headers)
                        else "missing API key"
                    )
                    query = scope.get("query_string", b"").decode("latin-1")
                    if "api_key=" in query and not state.config.allow_query_api_key:
                        which += " (?api_key= is read only with --allow-query-api-key)"
                    resp = self.error_response(
                        401,
                        "Unauthorized",
                        f"{which}: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'",
                        {"WWW-Authenticate": "Bearer"},
                    )
                    await resp(scope, receive, send_wrapper)
                    return
            declared = headers.get("content-length")
            if declared is not None:
                try:
                    size = int(declared)
                except ValueError:
                    size = -1
                if size < 0:
                    resp = self.error_response(
                        400, "InvalidRequest", f"invalid Content-Length {declared!r}"
                    )
                    await resp(scope, receive, send_wrapper)
                    return
                if size > limit:
                    await _drain(receive, 4 * limit)
                    resp = self.error_response(
                        413,
                        "PayloadTooLarge",
                        f"request body is {size} bytes; the limit is {limit} (--max-body-mb "
                        f"{state.config.max_body_mb:g})",
                    )
                    await resp(scope, receive, send_wrapper)
                    return
            received = [0]
            over = [False]

            async def limited_receive():
                message = await receive()
                if over[0] or message["type"] != "http.request":
                    return message
                received[0] += len(message.get("body", b""))
                if received[0] > limit:
                    over[0] = True  # later reads (the drain) pass through
                    raise _BodyTooLarge()
                return message

            await self.app(scope, limited_receive, send_wrapper)
        except self.client_disconnect:
            status[0] = status[0] or 499
        except Exception:
            logger.exception("unhandled error on %s", path)
            if not status[0]:
                resp = self.error_response(500, "InternalError", "internal server error")
                try:
                    await resp(scope, receive, send_wrapper)
                except Exception:  # the connection is gone
                    status[0] = 500
        finally:
            state.m_inflight.dec()
            state.m_requests.inc(endpoint=endpoint, status=str(status[0] or 500))
            state.m_latency.observe(time.perf_counter() - t0, endpoint=endpoint)


# ----------------------------------------------------------------------------------------------
# running


class _RedactApiKey(logging.Filter):
    """Hide ``api_key=...`` query parameters in uvicorn's access log lines."""

    _pattern = re.compile(r"(api_key=)[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                self._pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


def limit_malloc_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas at ``n`` (``mallopt(M_ARENA_MAX, n)``); False where unsupported.

    glibc gives each thread that allocates its own arena (up to 8 per core); freed blocks of
    varying sizes then fragment across many arenas and resident memory creeps up for a long time.
    Same effect as ``MALLOC_ARENA_MAX=n`` in the environment; affects arenas created afterwards.
    """
    import ctypes
    import ctypes.util
    import sys

    if n <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, int(n)))  # M_ARENA_MAX = -8
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False


def serve(config: ServeConfig) -> None:
    """Load the model, warm it up, and serve until interrupted (blocking).

    Raises:
        MissingDependencyError: the ``serve`` extra is not installed.
        ConfigError, CheckpointError: bad options or checkpoint.
    """
    uvicorn = require("uvicorn", "serve", "the reward server")
    if config.malloc_arena_max:
        limit_malloc_arenas(config.malloc_arena_max)  # before the server starts its threads
    # read by oneDNN when it creates its first kernel, i.e. after this point
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(config.onednn_cache_capacity))
    model = load_server_model(config)
    app = create_app(model, config)
    state: ServerState = app.state.apex
    if config.host not in ("127.0.0.1", "localhost", "::1") and not state.auth_required:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key-env)",
            config.host,
        )
    if config.warmup:
        t0 = time.perf_counter()
        state.warmup()
        logger.info("warm-up forward pass took %.2f s", time.perf_counter() - t0)
    logging.getLogger("uvicorn.access").addFilter(_RedactApiKey())
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        timeout_graceful_shutdown=30,
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``apex-reward serve`` flags, generated from :class:`ServeConfig`."""
    add_dataclass_arguments(parser, ServeConfig)


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``apex-reward serve``."""
    config = dataclass_from_args(ServeConfig, args)
    serve(config)
    return 0


COMMAND = Command(
    "serve",
    "HTTP reward server for RL workers",
    add_serve_arguments,
    run_serve,
)


def config_fields() -> list[str]:
    """The ``--flag`` names of :class:`ServeConfig` (kept in sync with the README)."""
    return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(ServeConfig)]


class ServerProcess:
    """``apex-reward serve`` in a child process, for tests, benchmarks and training scripts.

    ::

        with ServerProcess("runs/apex", ["--max-batch", "32"]) as server:
            client = ApexRewardClient(server.url)

    Args:
        model: checkpoint directory or hub id.
        args: more ``apex-reward serve`` flags.
        port: TCP port (default: a free one).
        env: extra environment variables (e.g. the API key named by ``--api-key-env``).
        ready_timeout: seconds to wait for ``/ready``.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        pid: the server's process id.
    """

    def __init__(
        self,
        model: str | Path,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 180.0,
        log_path: str | Path | None = None,
    ) -> None:
        self.model = str(model)
        self.args = list(args)
        self.port = port
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self.process: Any = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def start(self) -> ServerProcess:
        """Start the server and wait until ``/ready`` answers 200.

        Raises:
            RuntimeError: the process exited or did not become ready (its log is in the message).
        """
        import socket
        import subprocess
        import sys
        import tempfile

        for attempt in range(3):
            if self.port is None or attempt > 0:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self.port = s.getsockname()[1]
            self._log = (
                open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
                if self.log_path
                else tempfile.TemporaryFile()
            )
            cmd = [sys.executable, "-m", "apex_reward", "serve", "--model", self.model]
            cmd += ["--port", str(self.port), *self.args]
            self.process = subprocess.Popen(
                cmd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
            if self._wait_ready():
                return self
            log = self.log_text()
            self.stop()
            if "address already in use" not in log.lower():
                raise RuntimeError(f"apex-reward serve did not become ready:\n{log[-4000:]}")
        raise RuntimeError("apex-reward serve: no free port after 3 attempts")

    def _wait_ready(self) -> bool:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        return False

    def log_text(self) -> str:
        """What the server has written to stdout/stderr so far."""
        if self._log is None:
            return ""
        fd = self._log.fileno()  # pread: the child shares this file offset, leave it alone
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux ``/proc/PID/status`` VmRSS), in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s)."""
        import subprocess

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
