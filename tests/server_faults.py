"""Faults to throw at a reward server: decompression bombs, stalled and slow connections, raw
malformed HTTP, and a resident-memory sampler.

Test code, not part of the package: ``tests/test_server_hardening.py`` and
``benchmarks/fault_injection.py`` import it (the benchmark puts ``tests/`` on ``sys.path``).
Everything talks to ``127.0.0.1`` only and every wait is bounded.
"""

from __future__ import annotations

import io
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import numpy as np
import soundfile as sf

__all__ = [
    "flac_bomb",
    "wav_bytes",
    "address",
    "open_stalled",
    "read_until_closed",
    "raw_exchange",
    "status_of_response",
    "json_of_response",
    "PeakSampler",
]


def flac_bomb(seconds: float, channels: int = 4, sample_rate: int = 192000) -> bytes:
    """Digital silence as 16-bit FLAC: a few hundred kB that decode to ``seconds * channels *
    sample_rate`` float32 values (120 s of 4-channel 192 kHz: 0.37 GB). Written in 1 s blocks, so
    building it needs little memory."""
    buf = io.BytesIO()
    block = np.zeros((sample_rate, channels), dtype=np.int16)
    with sf.SoundFile(
        buf, "w", samplerate=sample_rate, channels=channels, format="FLAC", subtype="PCM_16"
    ) as f:
        whole, rest = divmod(int(seconds * sample_rate), sample_rate)
        for _ in range(whole):
            f.write(block)
        if rest:
            f.write(block[:rest])
    return buf.getvalue()


def wav_bytes(wav: np.ndarray, sample_rate: int) -> bytes:
    """``[C, T]`` or ``[T]`` float audio as a 16-bit WAV file."""
    buf = io.BytesIO()
    sf.write(buf, np.asarray(wav).T, sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def address(url: str) -> tuple[str, int]:
    """``(host, port)`` of an ``http://`` URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", int(parts.port or 80)


def open_stalled(
    url: str, n: int, head: bytes, body: bytes = b"", timeout: float = 10.0
) -> list[socket.socket]:
    """``n`` connections that each send ``head`` (request line and headers, possibly cut off) and
    ``body``, then nothing more."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(address(url), timeout=timeout)
        s.sendall(head + body)
        socks.append(s)
    return socks


def read_until_closed(socks: Sequence[socket.socket], timeout: float) -> list[bytes | None]:
    """What each socket received until the server closed it; None for those still open after
    ``timeout`` seconds (all sockets are closed on return)."""
    got: dict[int, bytearray] = {i: bytearray() for i in range(len(socks))}
    open_ = {s.fileno(): i for i, s in enumerate(socks)}
    closed: set[int] = set()
    deadline = time.monotonic() + timeout
    try:
        while open_ and time.monotonic() < deadline:
            ready, _, _ = select.select(list(open_), [], [], min(0.5, deadline - time.monotonic()))
            for fd in ready:
                i = open_[fd]
                try:
                    chunk = socks[i].recv(65536)
                except (ConnectionResetError, TimeoutError, OSError):
                    chunk = b""
                if chunk:
                    got[i] += chunk
                else:
                    closed.add(i)
                    del open_[fd]
    finally:
        for s in socks:
            s.close()
    return [bytes(got[i]) if i in closed else None for i in range(len(socks))]


def raw_exchange(url: str, data: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes (or
    ``timeout``)."""
    (s,) = open_stalled(url, 1, data, timeout=timeout)
    s.shutdown(socket.SHUT_WR)
    (got,) = read_until_closed([s], timeout)
    return got or b""


def status_of_response(raw: bytes | None) -> int:
    """The status code of a raw HTTP response (0 when there is none)."""
    if not raw or not raw.startswith(b"HTTP/"):
        return 0
    return int(raw.split(b" ", 2)[1])


def json_of_response(raw: bytes) -> dict:
    """The JSON body of a raw HTTP response (headers and ``Content-Length`` body)."""
    head, _, body = raw.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            body = body[: int(value)]
    return json.loads(body)


class PeakSampler:
    """Samples ``measure()`` every ``interval`` s on a thread; ``peak`` is the largest value.

    ``with PeakSampler(server.rss_bytes) as rss: ...`` then ``rss.peak``.
    """

    def __init__(self, measure: Callable[[], int], interval: float = 0.05) -> None:
        self.measure = measure
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.measure())
            except (OSError, RuntimeError):  # the process is gone
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakSampler:
        self.peak = self.measure()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, self.measure())
