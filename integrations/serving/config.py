"""The options of ``apex-reward serve``: :class:`ServeConfig`.

Each field is a ``--flag`` (``--config FILE.yaml`` too). The model to serve is the shared
:class:`~apex_reward.loading.ModelOptions`, embedded as one ``flatten`` field, so the model flags
are the same as every other command's: ``--model``, ``--encoder``, ``--revision``, ``--device``
and ``--dtype``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from apex_reward.errors import ConfigError
from apex_reward.loading import ModelOptions
from apex_reward.windows import WindowSpec

from ..decoders import check_target

__all__ = ["ServeConfig", "STANDARD_SAMPLE_RATES"]

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


@dataclass
class ServeConfig:
    """Options of ``apex-reward serve`` (each field is a ``--flag``; ``--config FILE.yaml`` too)."""

    model: ModelOptions = field(
        default_factory=ModelOptions,
        metadata={
            "flatten": True,
            "help": "the reward model to serve: --model (required), --encoder, --revision, "
            "--device, --dtype (auto = the GPU fast path on CUDA, exact fp32 on CPU; fp16/bf16 "
            "on CPU run slowly, with a warning)",
        },
    )
    host: str = field(
        default="127.0.0.1",
        metadata={
            "help": "interface to bind; 127.0.0.1 serves this machine only, 0.0.0.0 every "
            "network (set --api-key-env then)"
        },
    )
    port: int = field(default=8000, metadata={"help": "TCP port"})
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
    max_clip_samples: int = field(
        default=64_000_000,
        metadata={
            "help": "most decoded samples x channels per clip (4 bytes each as float32; 600 s "
            "of 48 kHz stereo is 57.6 M), read from the header before decoding; more gets 422"
        },
    )
    max_request_samples: int = field(
        default=256_000_000,
        metadata={
            "help": "most decoded samples x channels for all clips of one request, summed from "
            "their headers before any is decoded; more gets 413"
        },
    )
    max_queue_samples: int = field(
        default=512_000_000,
        metadata={
            "help": "most decoded samples x channels being decoded or waiting for the model, "
            "over all requests (bounds memory); beyond it requests get 503"
        },
    )
    body_timeout_s: float = field(
        default=120.0,
        metadata={
            "help": "a request body must arrive within this many seconds of its headers, else "
            "408 and the connection is closed"
        },
    )
    idle_timeout_s: float = field(
        default=30.0,
        metadata={
            "help": "longest silence while a client sends a request (its headers or a body "
            "chunk), in seconds; then 408 and the connection is closed"
        },
    )
    allowed_hosts: list[str] = field(
        default_factory=lambda: ["127.0.0.1", "localhost", "::1"],
        metadata={
            "help": "Host header names the server answers (a guard against DNS rebinding); "
            "the --host address is added when it is a specific one; '*' allows any. Others "
            "get 400 (/health and /ready excepted)"
        },
    )
    allowed_origins: list[str] = field(
        default_factory=list,
        metadata={
            "help": "web origins (e.g. https://app.example.org) whose browser pages may POST "
            "to the server; a POST carrying any other Origin header gets 403 (requests "
            "without one, from scripts and trainers, are not affected)"
        },
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
    resampler: Literal["model", "exact", "soxr"] = field(
        default="model",
        metadata={
            "help": "model = clips are queued as decoded and the model's own front end resamples "
            "them on the batch worker (scores exactly as in-process model.score); exact = the "
            "decode threads measure each clip's guard signals and run the model's own downmix, "
            "trim and resampler on it, so the batch worker only runs the model (the same scores "
            "as 'model', faster serving); soxr = the same with soxr as the resampler (score "
            "differences to 'model' are in BENCHMARKS.md)"
        },
    )
    guard: Literal["off", "flag", "penalize"] = field(
        default="penalize",
        metadata={
            "help": "reward guards: penalize = a clip flagged by the signal checks (silence, "
            "noise, held tone, loop, DC, clipping) gets the floor reward; flag = report flags "
            "only; off = no checks. Responses carry 'signals' and 'flags' unless off"
        },
    )
    robust: int = field(
        default=0,
        metadata={
            "help": "robust reward: the mean over K random transforms of each clip (gain, "
            "segmentation offset, resampling jitter, noise) at K times the encoder cost; 0 = off"
        },
    )
    robust_seed: int | None = field(
        default=None,
        metadata={"help": "seed of the robust transforms (unset: fresh ones for every batch)"},
    )
    windows: bool = field(
        default=False,
        metadata={
            "help": "also score time windows: scored clips get 'windows', a list of "
            "{start_s, end_s, scores, reward} (the 30 s segments, or see --window-seconds)"
        },
    )
    window_seconds: float | None = field(
        default=None,
        metadata={"help": "with --windows: windows of this many seconds instead of the segments"},
    )
    window_hop: float | None = field(
        default=None,
        metadata={"help": "with --window-seconds: seconds between window starts (no overlap)"},
    )
    condition: str | None = field(
        default=None,
        metadata={
            "help": "a conditioned checkpoint's audience for every clip, one of the values it "
            "was trained on (e.g. a platform); unset: its learned average; a request's "
            "?condition= overrides it for its clips"
        },
    )
    failure_reward: float = field(
        default=0.0,
        metadata={
            "help": "reward /get_reward returns for a sample whose audio cannot be scored (its "
            "'errors' entry and extra_logs.apex_ok = 0 say which)"
        },
    )
    decoder: str | None = field(
        default=None,
        metadata={
            "help": "'module:function' (importable by the server) turning a /get_reward "
            "response (the query's text after the prompt: words, or codec tokens as text) into "
            "audio: (waveform, sample_rate) or a file path; used instead of audio references"
        },
    )
    failure_log: str | None = field(
        default=None,
        metadata={
            "help": "append one JSON line per /get_reward sample that could not be scored "
            "(time, sample, error type and message, response excerpt) to this file"
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
    ray: bool = field(
        default=False,
        metadata={
            "help": "serve through Ray Serve: --replicas copies of this server (each its own "
            "model and batcher) behind Ray's HTTP proxy on --host/--port; joins the cluster "
            "named by $RAY_ADDRESS, else starts a local one (needs the ray extra)"
        },
    )
    replicas: int = field(
        default=0,
        metadata={
            "help": "Ray Serve replicas (--ray); 0 = one per visible GPU for a CUDA device, "
            "else 1. A CUDA replica holds one GPU, a CPU replica --threads cores (default 1)"
        },
    )

    def window_spec(self) -> WindowSpec | None:
        """The windows every scored clip gets (None: no windows)."""
        if not self.windows:
            if self.window_seconds is not None or self.window_hop is not None:
                raise ConfigError("serve: --window-seconds and --window-hop need --windows")
            return None
        return WindowSpec(self.window_seconds, self.window_hop)

    def __post_init__(self) -> None:
        if self.robust < 0:
            raise ConfigError(f"robust: must be >= 0 transforms, got {self.robust}")
        if not isinstance(self.model, ModelOptions):
            raise ConfigError(
                f"serve: 'model' must be ModelOptions (flags --model, --encoder, ...), got "
                f"{type(self.model).__name__}"
            )

        def positive(name: str, value: float) -> None:
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                raise ConfigError(f"serve: --{name.replace('_', '-')} must be > 0, got {value!r}")

        self.window_spec()  # a bad window length or hop fails at startup
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
            "max_clip_samples",
            "max_request_samples",
            "max_queue_samples",
            "body_timeout_s",
            "idle_timeout_s",
            "decode_workers",
        ):
            positive(name, getattr(self, name))
        if not (self.max_wait_ms >= 0 and math.isfinite(self.max_wait_ms)):
            raise ConfigError(f"serve: --max-wait-ms must be >= 0, got {self.max_wait_ms!r}")
        if self.replicas < 0:
            raise ConfigError(f"serve: --replicas must be >= 0, got {self.replicas}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"serve: --threads must be >= 1, got {self.threads}")
        if not self.sample_rates or any(r <= 0 for r in self.sample_rates):
            raise ConfigError(
                f"serve: --sample-rates must be positive integers, got {self.sample_rates!r}"
            )
        if self.decoder is not None:
            check_target(self.decoder, "serve: --decoder")
        if not math.isfinite(self.failure_reward):
            raise ConfigError(f"serve: --failure-reward must be finite, got {self.failure_reward}")

    @property
    def max_body_bytes(self) -> int:
        """``--max-body-mb`` in bytes."""
        return int(self.max_body_mb * 1024 * 1024)
