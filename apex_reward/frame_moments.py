"""Within-segment frame statistics of the encoder's hidden states (the OOD ``moments`` feature).

A time-pooled mean hides how a segment's frames move: stationary noise and music can share a mean
embedding while their frames vary differently. :func:`frame_moments` summarises each selected
layer's frames ``[N, F, H]`` by two more statistics over the valid frames, both ``[N, H]``:

* the standard deviation over frames (the spread of the frame features around their mean);
* the root mean square of the frame-to-frame difference ``h[t+1] - h[t]`` (how fast they move).

Both are differentiable torch expressions of the hidden states (a small ``eps`` under the square
roots keeps the gradient finite for constant input such as digital silence).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["frame_moments"]

#: added under the square roots (feature units squared)
EPS = 1e-12


def frame_moments(
    hidden: Sequence[torch.Tensor], layers: Sequence[int], mask: torch.Tensor | None
) -> torch.Tensor:
    """Frame standard deviation and difference RMS of the selected layers.

    Args:
        hidden: the encoder's hidden states, each ``[N, F, H]`` (frames ``F``).
        layers: indices into ``hidden`` (the pooled layers, ``L`` of them).
        mask: ``[N, F]`` 1.0 for valid frames, 0.0 for padding (None: every frame is valid).

    Returns:
        ``[N, 2, L, H]`` float32: ``[:, 0]`` the standard deviation over the valid frames,
        ``[:, 1]`` the RMS of the difference between consecutive valid frames (0 when a segment
        has a single valid frame).
    """
    first = hidden[layers[0]]
    n_seg, frames = first.shape[0], first.shape[1]
    if mask is None:
        mask = torch.ones(n_seg, frames, device=first.device)
    mask = mask.float()
    count = mask.sum(dim=1).clamp_min(1.0)[:, None]
    pairs = mask[:, 1:] * mask[:, :-1]
    pair_count = pairs.sum(dim=1).clamp_min(1.0)[:, None]
    stds, diffs = [], []
    for i in layers:
        h = hidden[i].float()
        mean = torch.einsum("nf,nfh->nh", mask, h) / count
        var = torch.einsum("nf,nfh->nh", mask, (h - mean[:, None]) ** 2) / count
        step = torch.einsum("nf,nfh->nh", pairs, (h[:, 1:] - h[:, :-1]) ** 2) / pair_count
        stds.append((var + EPS).sqrt())
        diffs.append((step + EPS).sqrt())
    return torch.stack([torch.stack(stds, dim=1), torch.stack(diffs, dim=1)], dim=1)
