"""Cutting encoder rows out of songs: copy, level and normalise each row in one pass over its
real samples.

The front end (:meth:`apex_reward.audio.AudioFrontEnd.segment`) and the dense-reward windows
(:mod:`apex_reward.windows`) both turn stretches of mono songs into zero-padded rows ``[N, W]``
for the encoder, each row with its RMS level and (optionally) normalised to zero mean and unit
variance (or a fixed RMS level) over its unpadded samples. The padded tail of a row contributes
nothing to either statistic and stays exactly zero, so nothing is computed over it: each row's
statistics come from two float64 passes over its real samples, and the normalised samples are
written straight into a zeroed output. A 10 s clip in a 30 s row costs a pass over 10 s of
audio, not several passes over 30 s (a masked normalisation of the padded row used to be most of
the reward server's per-clip cost without a model). Differentiable: gradients reach the songs
through the slices and the statistics.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Span", "cut_rows"]

#: One row: ``(song [T], start, length)``, the samples ``song[start : start + length]``.
Span = tuple[torch.Tensor, int, int]


def cut_rows(
    spans: Sequence[Span],
    width: int,
    *,
    normalize: bool,
    floor: float = 1e-7,
    target_db: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[N, width]`` float32 of the given stretches (zero past each stretch) and their
    levels.

    Args:
        spans: ``(song [T] float32, start, length)`` per row, ``0 < length <= width``.
        width: samples per row.
        normalize: write ``(x - mean) / sqrt(var + floor)`` of each stretch (population
            variance over the stretch, computed in float64) instead of ``x``.
        floor: the variance floor of the normalisation.
        target_db: with ``normalize``, the RMS level (dBFS) each normalised stretch is scaled
            to (``None``: unit variance, 0 dBFS).

    Returns:
        ``(rows [N, width] float32, level_db [N] float32)``: ``level_db`` is the RMS level of
        each stretch with its mean removed, in dBFS (-200 for digital silence or pure DC), with
        no gradient.
    """
    first = spans[0][0]
    rows = torch.zeros((len(spans), width), dtype=torch.float32, device=first.device)
    variances = []
    gain = 1.0 if target_db is None else 10.0 ** (target_db / 20.0)
    for i, (song, start, length) in enumerate(spans):
        x = song[start : start + length]
        # two passes in float64 (mean, then the centred sum of squares as a dot product): exact
        # to float64 rounding, and ~10x faster on a CPU than torch.var_mean's Welford loop
        centred = x.to(torch.float64)
        centred = centred - centred.mean()
        var = torch.dot(centred, centred) / length
        variances.append(var.detach())
        if normalize:
            x = centred * (torch.rsqrt(var + floor) * gain)
        rows[i, :length] = x
    var = torch.stack(variances)
    level_db = (10.0 * torch.log10(var + 1e-20)).to(torch.float32)
    return rows, level_db
