"""Admitting a request's clips: headers first, then the decoded-size budget, then decoding.

:func:`decode_request` is the one way clips reach the decoder: it reads every clip's header on
the decode pool (no audio decoded), refuses clips the header already condemns (rate, channels,
length, ``--max-clip-samples``), admits the rest together under the
:class:`~.limits.DecodeBudget` (``--max-request-samples``, ``--max-queue-samples``), and only
then decodes them. A decoded clip holds its share of the budget until it is scored or dropped.
"""

from __future__ import annotations

import asyncio
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .decoding import Source
from .errors import ClipError
from .limits import ClipHeader, Reservation
from .state import Clip

if TYPE_CHECKING:
    from .state import ServerState

__all__ = ["decode_request"]


def _releaser(reservation: Reservation, index: int) -> Callable[[], None]:
    return lambda: reservation.release(index)


async def decode_request(
    state: ServerState, items: Sequence[tuple[str, Source | ClipError]]
) -> list[Clip]:
    """Decode the clips of one request under the decoded-size budget.

    Args:
        state: the server's state (decoder, budget, decode pool).
        items: ``(name, source)`` per clip; a source that is already a :class:`ClipError`
            (a malformed reference) passes through as that clip's error.

    Returns:
        one :class:`Clip` per item, in order: decoded (its ``release`` gives its share of the
        budget back; the batcher calls it once the clip is scored) or failed.

    Raises:
        RequestDecodedTooLarge: the clips together exceed ``--max-request-samples`` (413).
        OverloadedError: the decode/queue budget is full (503, retry later).
    """
    budget, decoder = state.budget, state.decoder
    clips: list[Clip | None] = [None] * len(items)
    headers: dict[int, ClipHeader] = {}

    async def probe(i: int, name: str, source: Source) -> None:
        try:
            headers[i] = await state.run_blocking(decoder.probe, source, name)
        except Exception as e:
            clips[i] = Clip(name, error=ClipError(name, e))

    await asyncio.gather(
        *(
            probe(i, name, src)
            for i, (name, src) in enumerate(items)
            if not isinstance(src, ClipError)
        )
    )
    for i, (name, src) in enumerate(items):
        if isinstance(src, ClipError):
            clips[i] = Clip(name, error=src)
    costs = [0] * len(items)
    for i, h in headers.items():
        try:
            costs[i] = budget.cost(h, items[i][0])
        except Exception as e:
            clips[i] = Clip(items[i][0], error=ClipError(items[i][0], e))
    admitted = [i for i in sorted(headers) if clips[i] is None]
    reservation = budget.admit(costs)  # raises for the whole request, before any decode

    async def decode(i: int) -> None:
        name, source = items[i]
        h = headers[i]
        try:
            prepared = await state.run_blocking(
                state.decode_prepared, source, name, h, budget.max_frames(h)
            )
        except Exception as e:
            reservation.release(i)
            clips[i] = Clip(name, error=ClipError(name, e))
            return
        reservation.shrink(i, prepared.wav.numel())
        clip = clips[i] = Clip(
            name,
            prepared.wav,
            prepared.sample_rate,
            prepared=prepared,
            release=_releaser(reservation, i),
        )
        # a clip dropped unscored (its request failed elsewhere) gives its share back too
        weakref.finalize(clip, reservation.release, i)

    try:
        await asyncio.gather(*(decode(i) for i in admitted))
    except BaseException:  # cancelled: nobody will score what was decoded
        reservation.release_all()
        raise
    return [c for c in clips if c is not None]


async def decode_pcm_request(
    state: ServerState,
    name: str,
    data: bytes,
    *,
    encoding: str,
    sample_rate: int,
    channels: int = 1,
    num_samples: int | None = None,
) -> Clip:
    """One raw-PCM clip under the decoded-size budget: its size is known from the byte count,
    so it is charged (and refused, or admitted) before a sample is read.

    Raises:
        RequestDecodedTooLarge: the clip exceeds ``--max-request-samples`` (413).
        OverloadedError: the queue budget is full (503, retry later).
    """
    import numpy as np

    from .decoding import PCM_ENCODINGS

    dtype = PCM_ENCODINGS.get(encoding)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 1
    header = ClipHeader(sample_rate, max(1, channels), len(data) // (itemsize * max(1, channels)))
    try:
        cost = state.budget.cost(header, name)
    except Exception as e:
        return Clip(name, error=ClipError(name, e))
    reservation = state.budget.admit([cost])
    pcm = dict(
        encoding=encoding, sample_rate=sample_rate, channels=channels, num_samples=num_samples
    )
    try:
        prepared = await state.run_blocking(
            functools.partial(state.decode_pcm_prepared, data, name, **pcm)
        )
    except BaseException as e:
        reservation.release_all()
        if not isinstance(e, Exception):
            raise
        return Clip(name, error=ClipError(name, e))
    reservation.shrink(0, prepared.wav.numel())
    clip = Clip(
        name,
        prepared.wav,
        prepared.sample_rate,
        prepared=prepared,
        release=_releaser(reservation, 0),
    )
    weakref.finalize(clip, reservation.release, 0)
    return clip
