"""The reward server's Prometheus metrics, through ``prometheus_client``.

Each app gets its own :class:`prometheus_client.CollectorRegistry` (never the global one), so
several apps in one process (tests, an embedding service) keep separate counts. Label values
come from a fixed vocabulary the server chooses (route templates, status codes, error types),
never from raw request input, so the number of series stays bounded.

Series: ``apex_requests_total{endpoint,status}``, ``apex_request_duration_seconds{endpoint}``,
``apex_errors_total{type}``, ``apex_clips_total{outcome}``, ``apex_audio_seconds_total``,
``apex_batch_size``, ``apex_batch_duration_seconds``, ``apex_batch_wait_seconds`` (histograms),
and the gauges ``apex_queue_clips``, ``apex_queue_audio_seconds``, ``apex_inflight_requests``,
``apex_ready``.
"""

from __future__ import annotations

from collections.abc import Callable

from apex_reward.errors import require

__all__ = ["ServerMetrics", "CONTENT_TYPE", "ROUTES"]

#: Content type of :meth:`ServerMetrics.render` (the Prometheus text format 0.0.4).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

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


class ServerMetrics:
    """The metrics of one app, in their own registry.

    Args:
        queue_clips: returns the clips waiting for the model (read at each scrape).
        queue_audio_s: returns the decoded audio waiting, in channel-seconds.
        ready: returns whether the server accepts scoring requests.

    Raises:
        MissingDependencyError: prometheus-client is not installed.
    """

    def __init__(
        self,
        queue_clips: Callable[[], float],
        queue_audio_s: Callable[[], float],
        ready: Callable[[], bool],
    ) -> None:
        prom = require("prometheus_client", "serve", "the reward server's metrics")
        self.registry = reg = prom.CollectorRegistry()
        self.requests = prom.Counter(
            "apex_requests_total",
            "HTTP requests by route and status",
            ("endpoint", "status"),
            registry=reg,
        )
        self.latency = prom.Histogram(
            "apex_request_duration_seconds",
            "HTTP request latency by route",
            ("endpoint",),
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=reg,
        )
        self.errors = prom.Counter(
            "apex_errors_total",
            "errors answered, by type (request and per clip)",
            ("type",),
            registry=reg,
        )
        self.clips = prom.Counter(
            "apex_clips_total", "clips handled, by outcome", ("outcome",), registry=reg
        )
        self.audio = prom.Counter(
            "apex_audio_seconds_total", "seconds of audio scored", registry=reg
        )
        self.batch_size = prom.Histogram(
            "apex_batch_size",
            "clips per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=reg,
        )
        self.batch_time = prom.Histogram(
            "apex_batch_duration_seconds",
            "forward-pass time per batch",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=reg,
        )
        self.batch_wait = prom.Histogram(
            "apex_batch_wait_seconds",
            "time the oldest clip of a batch waited in the queue",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=reg,
        )
        self.inflight = prom.Gauge("apex_inflight_requests", "requests being handled", registry=reg)
        prom.Gauge("apex_queue_clips", "clips waiting for the model", registry=reg).set_function(
            queue_clips
        )
        prom.Gauge(
            "apex_queue_audio_seconds",
            "decoded audio waiting for the model, channel-seconds",
            registry=reg,
        ).set_function(queue_audio_s)
        prom.Gauge(
            "apex_ready", "1 when the server accepts scoring requests", registry=reg
        ).set_function(lambda: 1.0 if ready() else 0.0)
        self._generate = prom.generate_latest

    def count_error(self, type: str) -> None:
        """Count one error answered (a request's or a clip's), by its JSON type."""
        self.errors.labels(type=type).inc()

    def on_batch(self, clips: int, seconds: float, waited: float) -> None:
        """Record one forward pass (the batcher's ``on_batch`` callback)."""
        self.batch_size.observe(clips)
        self.batch_time.observe(seconds)
        self.batch_wait.observe(waited)

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        """Record one answered request (``path`` outside :data:`ROUTES` counts as ``other``)."""
        endpoint = path if path in ROUTES else "other"
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        self.latency.labels(endpoint=endpoint).observe(seconds)

    def render(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return self._generate(self.registry)
