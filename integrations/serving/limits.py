"""The decoded-size budget: how much audio the server agrees to decode, counted in samples.

A compressed upload can be tiny and decode to gigabytes (ten minutes of 4-channel 192 kHz
silence is under 1 MB of FLAC and 1.8 GB of float32), so the body limit does not bound memory.
:class:`DecodeBudget` does, with three limits on decoded *samples × channels* (one float32 value
each, 4 bytes):

* per clip (``--max-clip-samples``): a clip whose header announces more is refused (422,
  :class:`DecodedSizeTooLarge`) and never decoded;
* per request (``--max-request-samples``): the clips a request carries are summed from their
  headers before any of them is decoded; a request over the limit is refused whole (413,
  :class:`RequestDecodedTooLarge`);
* for the queue (``--max-queue-samples``): audio being decoded or waiting for the model, across
  all requests; a request that would pass it is answered 503 (back-pressure, retry later).

Every decoder path asks the same object: it reads a clip's :class:`ClipHeader` (rate, channels,
frames) from the file header, calls :meth:`DecodeBudget.admit` with the headers of all clips of
the request, and decodes only what was admitted; the :class:`Reservation` it gets back is
released clip by clip once a clip is scored, fails, or is dropped. A header that does not say
its length (a streamed file) is charged the whole per-clip limit, and its decode is cut off
there (:meth:`DecodeBudget.max_frames`).

The module imports no web framework and no torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from apex_reward.containers import UNKNOWN_FRAMES
from apex_reward.errors import AudioError

from .batcher import OverloadedError
from .errors import PayloadTooLarge

__all__ = [
    "ClipHeader",
    "UNKNOWN_FRAMES",
    "DecodeBudget",
    "Reservation",
    "DecodedSizeTooLarge",
    "RequestDecodedTooLarge",
]


class DecodedSizeTooLarge(AudioError):
    """A clip would decode to more samples × channels than ``--max-clip-samples`` (422)."""


class RequestDecodedTooLarge(PayloadTooLarge):
    """A request's clips would decode to more than ``--max-request-samples`` together (413)."""


@dataclass(frozen=True)
class ClipHeader:
    """What a clip's header says, read before decoding.

    Attributes:
        sample_rate: Hz.
        channels: audio channels.
        frames: samples per channel; 0 or less (or :data:`UNKNOWN_FRAMES` and more) when the
            header does not say (streamed files).
    """

    sample_rate: int
    channels: int
    frames: int

    @property
    def known(self) -> bool:
        """Whether the header gives the length."""
        return 0 < self.frames < UNKNOWN_FRAMES

    @property
    def samples(self) -> int:
        """Decoded values (frames × channels); 0 when the length is unknown."""
        return self.frames * max(self.channels, 1) if self.known else 0


def _mega(n: int) -> str:
    return f"{n:,} samples x channels ({n * 4 / 2**20:,.0f} MiB as float32)"


class Reservation:
    """The share of the queue budget admitted for one request's clips (index = clip).

    :meth:`release` gives a clip's share back (idempotent); :meth:`shrink` lowers it to the
    decoded size once known. Thread-safe: decode threads and the event loop both call it.
    """

    def __init__(self, budget: DecodeBudget, amounts: Sequence[int]) -> None:
        self._budget = budget
        self._amounts = list(amounts)

    @property
    def held(self) -> int:
        """Samples × channels still held by this request."""
        with self._budget._lock:
            return sum(self._amounts)

    def shrink(self, index: int, samples: int) -> None:
        """Lower clip ``index``'s share to ``samples`` (never raises it)."""
        with self._budget._lock:
            keep = min(self._amounts[index], max(int(samples), 0))
            self._budget._in_use -= self._amounts[index] - keep
            self._amounts[index] = keep

    def release(self, index: int) -> None:
        """Give clip ``index``'s share back."""
        self.shrink(index, 0)

    def release_all(self) -> None:
        """Give every clip's share back."""
        for i in range(len(self._amounts)):
            self.release(i)


class DecodeBudget:
    """Limits on decoded audio, in samples × channels, checked from headers before decoding.

    Args:
        clip_samples: most samples × channels one clip may decode to.
        request_samples: most for all clips of one request together.
        queue_samples: most being decoded or waiting for the model, over all requests.

    Raises:
        ValueError: a limit that is not a positive integer.
    """

    def __init__(self, clip_samples: int, request_samples: int, queue_samples: int) -> None:
        for what, n in (
            ("clip_samples", clip_samples),
            ("request_samples", request_samples),
            ("queue_samples", queue_samples),
        ):
            if int(n) != n or n <= 0:
                raise ValueError(f"DecodeBudget: {what} must be a positive integer, got {n!r}")
        self.clip_samples = int(clip_samples)
        self.request_samples = int(request_samples)
        self.queue_samples = int(queue_samples)
        self._lock = threading.Lock()
        self._in_use = 0

    @property
    def in_use(self) -> int:
        """Samples × channels admitted and not yet released (decoding or queued)."""
        return self._in_use

    def max_frames(self, header: ClipHeader) -> int:
        """Most frames a clip with this header may decode to (cut a streamed decode here)."""
        return self.clip_samples // max(header.channels, 1)

    def cost(self, header: ClipHeader, name: str) -> int:
        """What one clip is charged: its decoded size, or the whole clip limit if unknown.

        Raises:
            DecodedSizeTooLarge: the header announces more than ``--max-clip-samples``.
        """
        if not header.known:
            return self.clip_samples
        if header.samples > self.clip_samples:
            seconds = header.frames / max(header.sample_rate, 1)
            raise DecodedSizeTooLarge(
                f"would decode to {header.samples:,} samples x channels ({seconds:.1f} s x "
                f"{header.channels} ch at {header.sample_rate} Hz); the limit per clip is "
                f"{_mega(self.clip_samples)} (--max-clip-samples)",
                name,
            )
        return header.samples

    def admit(self, costs: Sequence[int]) -> Reservation:
        """Admit one request's clips (their :meth:`cost`), all or none.

        Raises:
            RequestDecodedTooLarge: together they exceed ``--max-request-samples``.
            OverloadedError: the queue budget cannot take them now (retry later).
        """
        total = sum(costs)
        if total > self.request_samples:
            raise RequestDecodedTooLarge(
                f"the request's {len(costs)} clip(s) would decode to {total:,} samples x "
                f"channels; the limit per request is {_mega(self.request_samples)} "
                "(--max-request-samples)"
            )
        with self._lock:
            # one request alone is always admitted into an empty queue, so nothing starves
            if self._in_use > 0 and self._in_use + total > self.queue_samples:
                raise OverloadedError(
                    f"{self._in_use:,} samples x channels of audio are being decoded or waiting; "
                    f"with this request's {total:,} that passes the limit of "
                    f"{_mega(self.queue_samples)} (--max-queue-samples); retry later"
                )
            self._in_use += total
        return Reservation(self, costs)
