"""Length buckets for ``segment_padding="none"``: segments of equal encoded length share an encoder
call, so no segment is ever padded to fit another and a song's score does not depend on the rest of
its batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .audio import Segments

__all__ = ["encode_by_length", "length_groups"]


def length_groups(lengths: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """``[(length, indices [k] int64)]`` of the segments with each distinct encoded length,
    longest first; indices keep the segments' order. ``lengths``: ``[N]`` samples."""
    values = lengths.detach().cpu()
    return [
        (int(v), torch.nonzero(values == v).flatten())
        for v in torch.unique(values).flip(0).tolist()
    ]


def encode_by_length(
    encode: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    segments: Segments,
    lengths: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """Encode each segment at its own length, in batches of equal-length segments.

    Args:
        encode: ``(audio [n, S'], valid [n], batch_size) -> [n, L, H]``, one encoder call.
        segments: the front end's segments; ``audio`` ``[N, W]`` with ``W >= lengths.max()``.
        lengths: ``[N]`` samples the encoder sees per segment (``AudioFrontEnd.encoded_lengths``).
        batch_size: at most this many segments per encoder call.

    Returns:
        ``[N, L, H]`` features in the segments' order.
    """
    out: torch.Tensor | None = None
    for length, idx in length_groups(lengths):
        idx = idx.to(segments.audio.device)
        for start in range(0, idx.numel(), batch_size):
            rows = idx[start : start + batch_size]
            feats = encode(segments.audio[rows, :length], segments.valid[rows], batch_size)
            if out is None:
                out = feats.new_zeros((segments.audio.shape[0], *feats.shape[1:]))
            out = out.index_copy(0, rows, feats)
    assert out is not None  # the front end yields at least one segment
    return out
