"""A fast, non-differentiable resampler for inference: soxr's polyphase filters.

The model's front end resamples with julius' windowed-sinc filters
(:meth:`apex_reward.audio.AudioFrontEnd.resample`): differentiable, so the reward's gradient can
reach the waveform, but on a CPU it costs several milliseconds per 10 s clip and runs wherever
the forward pass runs. Where no gradient is needed (the reward server), a clip can be brought to
the encoder rate before it is queued, on any thread, with soxr (libsoxr, which releases the GIL).
The two resamplers differ slightly in their filters; the effect on scores is measured in
BENCHMARKS.md ("Inference resampler parity").

soxr comes with ``pip install 'apex-reward[serve]'``.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import require

__all__ = ["SOXR_QUALITY", "resample_fast", "to_encoder_rate"]

#: libsoxr quality preset: "HQ" (20-bit, ~-120 dB stop band) is transparent for scoring and
#: within a few percent of "VHQ" in cost.
SOXR_QUALITY = "HQ"


def resample_fast(wav: torch.Tensor | np.ndarray, old: int, new: int) -> torch.Tensor:
    """Resample ``[T]`` or ``[C, T]`` float audio from ``old`` to ``new`` Hz with soxr.

    Args:
        wav: ``[T]`` or ``[C, T]`` samples (float32; no gradient is kept).
        old: input rate, Hz.
        new: output rate, Hz.

    Returns:
        float32 CPU tensor ``[T']`` or ``[C, T']`` with ``T' = ceil(T * new / old)`` (``wav``
        itself, as a tensor, when the rates are equal).

    Raises:
        MissingDependencyError: soxr is not installed.
    """
    if isinstance(wav, torch.Tensor):
        x = wav.detach().to("cpu", torch.float32).numpy()
    else:
        x = np.asarray(wav, dtype=np.float32)
    if old == new:
        return torch.from_numpy(np.ascontiguousarray(x))
    soxr = require("soxr", "serve", "the fast inference resampler")
    # soxr takes [frames, channels]
    y = soxr.resample(x.T if x.ndim == 2 else x, int(old), int(new), quality=SOXR_QUALITY)
    y = np.ascontiguousarray(y.T if x.ndim == 2 else y, dtype=np.float32)
    return torch.from_numpy(y)


def to_encoder_rate(wav: torch.Tensor, sample_rate: int, target: int) -> torch.Tensor:
    """What the front end's downmix and resample steps give, for inference: ``[C, T]`` or ``[T]``
    at ``sample_rate`` -> mono ``[T']`` at ``target`` Hz (channel mean, then soxr).

    Silence trimming is left to the front end (it trims at the rate it is given), so a clip
    prepared here and then scored follows the same steps as one scored directly, up to the
    resampler's filter.
    """
    mono = wav.mean(dim=0) if wav.ndim == 2 else wav
    return resample_fast(mono, sample_rate, target)
