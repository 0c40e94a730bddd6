"""A small, dependency-free Prometheus metrics registry for the reward server.

Counters, gauges and histograms with labels, rendered in the Prometheus text exposition format
(version 0.0.4). Thread-safe: the server's event loop, its decode threads and its batch worker
thread all record into the same registry. Label values come from a fixed vocabulary chosen by the
server (route templates, status codes, error class names), never from raw request input, so the
number of series stays bounded.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

__all__ = ["MetricsRegistry", "Counter", "Gauge", "Histogram", "CONTENT_TYPE"]

#: Content type of :meth:`MetricsRegistry.render`.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LabelKey = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], lock: threading.Lock):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._lock = lock

    def _key(self, labels: dict[str, str]) -> LabelKey:
        if set(labels) != set(self.labelnames):
            raise ValueError(
                f"{self.name}: expected labels {self.labelnames}, got {sorted(labels)}"
            )
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class _Value(_Metric):
    """One float per label set (the state Counter and Gauge share)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._values: dict[LabelKey, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        lines = self.header()
        items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        for key, v in items:
            lines.append(f"{self.name}{_labels(self.labelnames, key)} {_fmt(v)}")
        return lines


class Counter(_Value):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def total(self) -> float:
        with self._lock:
            return sum(self._values.values())


class Gauge(_Value):
    """A value that goes up and down (no labels needed for the server's gauges)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def dec(self, amount: float = 1.0, **labels: str) -> None:
        self.inc(-amount, **labels)


class Histogram(_Metric):
    """Cumulative-bucket histogram (``_bucket{le=...}``, ``_sum``, ``_count``) per label set."""

    kind = "histogram"

    def __init__(self, *args, buckets: Sequence[float], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._values: dict[LabelKey, tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            counts, acc = self._values.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
                    break
            else:
                counts[-1] += 1
            acc[0] += value

    def snapshot(self, **labels: str) -> dict[str, float]:
        """``{"count", "sum", "max_bucket"}``; ``max_bucket`` is the upper bound of the highest
        non-empty bucket (``inf`` for the overflow bucket, 0 when empty)."""
        with self._lock:
            counts, acc = self._values.get(
                self._key(labels), ([0] * (len(self.buckets) + 1), [0.0])
            )
            top = 0.0
            for i, c in enumerate(counts):
                if c:
                    top = self.buckets[i] if i < len(self.buckets) else math.inf
            return {"count": float(sum(counts)), "sum": acc[0], "max_bucket": top}

    def render(self) -> list[str]:
        lines = self.header()
        for key, (counts, acc) in sorted(self._values.items()):
            running = 0
            for b, c in zip(self.buckets + (math.inf,), counts):
                running += c
                le = f'le="{_fmt(b)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {running}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_fmt(acc[0])}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {running}")
        return lines


class MetricsRegistry:
    """Holds metrics and renders them all. Metric names must be unique."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames, self._lock))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames, self._lock))  # type: ignore[return-value]

    def histogram(
        self, name: str, help: str, buckets: Sequence[float], labelnames: Sequence[str] = ()
    ) -> Histogram:
        return self._add(  # type: ignore[return-value]
            Histogram(name, help, labelnames, self._lock, buckets=buckets)
        )

    def render(self) -> str:
        """All metrics in the Prometheus text format, ending with a newline."""
        with self._lock:
            lines: list[str] = []
            for metric in self._metrics.values():
                lines.extend(metric.render())
        return "\n".join(lines) + "\n"
