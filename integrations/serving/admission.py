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
from .prepare import Prepared
from .state import Clip

if TYPE_CHECKING:
    import torch

    from .state import ServerState

__all__ = ["admit_decoded", "decode_clip", "decode_pcm_request", "decode_request"]


def _decode_prepared(state: ServerState, source: Source, name: str, *args) -> Prepared:
    """Decode one clip (:meth:`ClipDecoder.decode` with ``args``) and prepare it for the batch
    thread (:class:`~.prepare.InferencePrep`); blocking, runs on the decode pool."""
    wav, sr = state.decoder.decode(source, name, *args)
    return state.prep(wav, sr)


def _decode_pcm_prepared(state: ServerState, data: bytes, name: str, **pcm) -> Prepared:
    """:meth:`ClipDecoder.decode_pcm` then the inference prep; blocking."""
    wav, sr = state.decoder.decode_pcm(data, name=name, **pcm)
    return state.prep(wav, sr)


async def decode_clip(state: ServerState, name: str, source: Source) -> Clip:
    """Decode, check and prepare one clip on the decode pool; a failure is kept in the clip. The
    clip is a request of its own for the decoded-size budget (see :func:`decode_request`, whose
    errors it raises)."""
    (clip,) = await decode_request(state, [(name, source)])
    return clip


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
                _decode_prepared, state, source, name, h, budget.max_frames(h)
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
            functools.partial(_decode_pcm_prepared, state, data, name, **pcm)
        )
    except BaseException as e:
        reservation.release_all()
        if not isinstance(e, Exception):
            raise
        return Clip(name, error=ClipError(name, e))
    return _held_clip(name, prepared, reservation)


def _held_clip(name: str, prepared: Prepared, reservation: Reservation) -> Clip:
    """The clip of a one-clip ``reservation``, holding its prepared size until released."""
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


def admit_decoded(state: ServerState, name: str, wav: torch.Tensor, sample_rate: int) -> Clip:
    """A clip decoded without a header to read first (a ``--decoder``'s audio, ``[C, T]`` or
    ``[T]``): prepared on the decode pool's terms and charged to the decoded-size budget now,
    like every other clip. Blocking (prepares); call on the decode pool."""
    frames = int(wav.shape[-1])
    channels = int(wav.shape[0]) if wav.ndim > 1 else 1
    cost = state.budget.cost(ClipHeader(sample_rate, channels, frames), name)
    reservation = state.budget.admit([cost])
    try:
        prepared = state.prep(wav, sample_rate)
    except BaseException:
        reservation.release_all()
        raise
    return _held_clip(name, prepared, reservation)
