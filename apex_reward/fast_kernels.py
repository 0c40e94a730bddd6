"""Faster forwards for two submodules of the stock ``HubertModel`` (the GPU fast path, docs/model.md).

Profiling MERT-v1-95M on an H100 (bf16, batch 32 x 30 s, BENCHMARKS.md) showed two convolutions
taking two thirds of the encoder's time while holding a quarter of its FLOPs: cuDNN runs the
grouped positional convolution (kernel 128, 16 groups) and the strided 1-D convolutions of the
feature extractor with slow generic kernels plus layout transposes. Both are rewritten here as
the same mathematics on faster primitives, reading the stock modules' own weights:

* :func:`feature_encoder_forward` -- each strided convolution of the feature extractor as one or
  two plain GEMMs over a ``[rows, channels]`` layout in which the whole batch is one long
  sequence (the taps of a stride-``s`` kernel are row-strided views, so nothing is copied), the
  first layer's GroupNorm with float32 statistics.
* :func:`positional_conv_forward` -- the grouped positional convolution as an FFT convolution in
  float32 (per-frequency channel mixing is a small batched complex matmul).

Both are differentiable (used by the differentiable reward) and equal the stock forwards up to
floating-point rounding (``tests/test_fast_path.py``). :func:`unsupported_reason` says when a
config falls outside what they implement; the stock forwards are used then.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def unsupported_reason(model: Any) -> str | None:
    """Why the fast kernels cannot replace ``model``'s (a ``HubertModel``) forwards, or None."""
    cfg = model.config
    if getattr(cfg, "feat_extract_norm", "group") != "group":
        return f"feat_extract_norm={cfg.feat_extract_norm!r} (only 'group' is implemented)"
    first = model.feature_extractor.conv_layers[0]
    norm = getattr(first, "layer_norm", None)
    if not isinstance(norm, torch.nn.GroupNorm) or norm.num_groups != norm.num_channels:
        return "the first feature-extractor layer has no per-channel GroupNorm"
    convs = [layer.conv for layer in model.feature_extractor.conv_layers]
    if not all(isinstance(c, torch.nn.Conv1d) for c in (*convs, model.encoder.pos_conv_embed.conv)):
        return "a convolution is wrapped (e.g. a LoRA adapter on it)"
    for conv in convs:
        if conv.groups != 1 or conv.padding[0] != 0 or conv.dilation[0] != 1:
            return "a feature-extractor convolution is grouped, padded or dilated"
    pos = model.encoder.pos_conv_embed
    if getattr(pos, "batch_norm", None) is not None:
        return "conv_pos_batch_norm is not implemented"
    return None


def feature_encoder_forward(extractor: Any, input_values: torch.Tensor) -> torch.Tensor:
    """``HubertFeatureEncoder.forward`` as GEMMs: ``[N, S]`` samples -> ``[N, C, F]`` features.

    The first layer (``C_in = 1``, GroupNorm) folds its normalisation into per-segment weights
    (:func:`_conv_group_norm_act`): one batched GEMM and the activation, no pass for statistics.

    Layout: activations are ``[N * P, C]`` (rows = time steps of all segments back to back, P a
    per-segment row count divisible by every later stride). Row ``t`` of a stride-``s``,
    kernel-``k`` convolution reads rows ``s*t .. s*t+k-1``: with ``k == s`` that is a plain
    ``[N*P/s, s*C]`` view, otherwise one view for the first ``s`` taps plus one per extra tap
    (row stride ``s*C``). Rows past a segment's valid length hold garbage that never reaches a
    valid row and is cut at the end. Returns a ``[N, C, F]`` view like the stock module.
    """
    layers = list(extractor.conv_layers)
    n, samples = input_values.shape
    total_stride = 1
    for layer in layers:
        total_stride *= layer.conv.stride[0]
    padded = -(-samples // total_stride) * total_stride
    first = layers[0]
    k0, s0 = first.conv.kernel_size[0], first.conv.stride[0]
    flat = F.pad(input_values, (0, padded - samples)).reshape(-1)
    flat = F.pad(flat, (0, k0))  # the last segment's last windows read past its end
    per = padded // s0
    patches = flat.unfold(0, k0, s0)[: n * per].view(n, per, k0)  # overlapping view, no copy
    valid = (samples - k0) // s0 + 1
    h = _conv_group_norm_act(patches, valid, first)
    for layer in layers[1:]:
        conv = layer.conv
        k, s = conv.kernel_size[0], conv.stride[0]
        c = h.shape[1]
        per_out = per // s
        rows = n * per_out
        weight = conv.weight.permute(2, 1, 0)  # [k, C_in, C_out]
        head = min(k, s)
        base = h.reshape(rows, s * c)[:, : head * c]  # taps 0..head-1 of every output row
        out = _gemm(base, weight[:head].reshape(head * c, -1), conv.bias)
        for j in range(head, k):  # taps beyond the stride (k=3, s=2: tap 2)
            tap = h[j::s]
            m = min(rows, tap.shape[0])
            # rows the tap cannot reach are the last segment's padding rows (asserted)
            assert rows - m <= per_out - ((valid - k) // s + 1)
            out[:m].addmm_(tap[:m], weight[j])
        valid = (valid - k) // s + 1
        per = per_out
        h = layer.activation(out)
    return h.view(n, per, -1)[:, :valid].transpose(1, 2)


def positional_conv_forward(pos: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    """``HubertPositionalConvEmbedding.forward`` as a float32 FFT convolution.

    ``hidden_states``: ``[N, T, C]``; returns ``[N, T, C]`` in its dtype. The grouped
    cross-correlation (kernel K, padding p, G groups) is a full convolution with the reversed
    kernel evaluated through a real FFT of length >= T + K - 1; channels mix per frequency as
    ``[G, F, N, C/G] @ [G, F, C/G, C/G]`` complex matmuls.
    """
    conv = pos.conv
    weight = conv.weight  # weight-normed [C, C/G, K]
    groups = conv.groups
    kernel = conv.kernel_size[0]
    pad = conv.padding[0]
    n, t, c = hidden_states.shape
    cg = c // groups
    keep = t + 2 * pad - kernel + 1 - pos.padding.num_pad_remove
    size = _fft_size(t + kernel - 1)
    acc = torch.promote_types(hidden_states.dtype, torch.float32)
    x = hidden_states.to(acc).transpose(1, 2).reshape(n, groups, cg, t)
    xf = torch.fft.rfft(x, n=size)  # [N, G, Ci, F]
    w = weight.to(acc).flip(-1).reshape(groups, cg, cg, kernel)  # [G, Co, Ci, K]
    wf = torch.fft.rfft(w, n=size)  # [G, Co, Ci, F]
    yf = torch.matmul(xf.permute(1, 3, 0, 2), wf.permute(0, 3, 2, 1))  # [G, F, N, Co]
    y = torch.fft.irfft(yf.permute(2, 0, 3, 1), n=size)  # [N, G, Co, size]
    start = kernel - 1 - pad
    y = y[..., start : start + keep].reshape(n, c, keep)
    if conv.bias is not None:
        y = y + conv.bias.to(acc)[:, None]
    y = pos.activation(y.to(hidden_states.dtype))
    return y.transpose(1, 2)


def _gemm(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, x, w) if bias is not None else x @ w


def _conv_group_norm_act(patches: torch.Tensor, valid: int, layer: Any) -> torch.Tensor:
    """First feature-extractor layer: conv (``C_in = 1``) -> per-channel GroupNorm -> act.

    ``patches``: ``[N, P, k]`` windows of the waveform (first ``valid`` rows real). The conv is
    linear in the windows, so each segment's channel statistics follow from the windows' mean
    ``m`` ``[N, k]`` and Gram matrix ``G`` ``[N, k, k]`` (float32): ``mean = W m + b`` and
    ``E[y^2] = w^T G w + 2 b w.m + b^2``. Normalisation is then folded into per-segment weights
    and a shift (an extra all-ones input column): one ``[N, P, k+1] @ [N, k+1, C]`` GEMM. Returns
    ``[N * P, C]``.
    """
    conv, norm = layer.conv, layer.layer_norm
    n, per, k = patches.shape
    acc = torch.promote_types(patches.dtype, torch.float32)
    real = patches[:, :valid].to(acc)
    m = real.mean(dim=1)  # [N, k]
    # Gram as a sum of chunk Grams: one [k, T] @ [T, k] product per segment (T ~ 1e5) runs at a
    # few TFLOP/s on cuBLAS; chunks of 2048 rows (zero rows added: they change no sum) do not
    chunk = 2048
    rows = -(-valid // chunk) * chunk
    parts = F.pad(real, (0, 0, 0, rows - valid)).view(n * (rows // chunk), chunk, k)
    gram = (parts.transpose(1, 2) @ parts).view(n, -1, k, k).sum(dim=1) / valid  # [N, k, k]
    w = conv.weight.reshape(conv.out_channels, k).to(acc)  # [C, k]
    wm = m @ w.t()  # [N, C]
    ey2 = torch.einsum("ck,nkj,cj->nc", w, gram, w)
    if conv.bias is not None:
        b = conv.bias.to(acc)
        mean, ey2 = wm + b, ey2 + 2 * b * wm + b.square()
    else:
        b, mean = None, wm
    var = (ey2 - mean.square()).clamp_min(0)
    scale = torch.rsqrt(var + norm.eps) * norm.weight.to(acc)  # [N, C]
    shift = norm.bias.to(acc) - mean * scale
    if b is not None:
        shift = shift + b * scale
    weights = torch.cat([w.t()[None] * scale[:, None], shift[:, None]], dim=1)  # [N, k+1, C]
    ones = patches.new_ones(n, per, 1)
    out = torch.bmm(torch.cat([patches, ones], dim=2), weights.to(patches.dtype))
    return layer.activation(out).view(n * per, -1)


def _fft_size(length: int) -> int:
    """Smallest 2-3-5-smooth integer >= ``length`` (fast cuFFT/pocketfft sizes)."""
    best = 1 << (length - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            v = p35
            while v < length:
                v *= 2
            best = min(best, v)
            p35 *= 3
        p5 *= 5
    return best
