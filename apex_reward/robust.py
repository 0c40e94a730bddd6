"""The robust reward: an expectation over random, differentiable transforms of the input.

``model(x, sample_rate=sr, robust=K, seed=s)`` scores every song K times, each time after an
independent draw of four transforms a listener would not hear as a different song, and returns
the mean of every per-song output (scores, reward, and any other ``[B]`` output) over the K
draws. An optimiser ascending this reward must raise it under all of them at once, so a
perturbation tuned to one exact sample grid, level or phase of the segmentation gains little.

Each draw applies, in this order (docs/model.md#robust-reward):

1. **resampling jitter**: the song is resampled by a factor ``(400 + j) / 400``, ``j`` uniform in
   ``-4..4`` (up to ±1 % in steps of 0.25 %; julius' windowed sinc, so differentiable) and played
   at its original rate, i.e. slightly faster or slower and higher or lower;
2. **segmentation offset**: the segmentation grid starts at a random offset within the first
   segment (a circular shift of the song by ``0 .. segment length`` samples, so no audio is
   dropped);
3. **gain**: uniform within ±6 dB;
4. **noise**: white Gaussian noise at −50 dBFS RMS.

Draws are made on the CPU by a ``torch.Generator`` seeded from ``(seed, position of the song in
the call)``, so a call is deterministic for a given seed and a song's draws do not depend on
the other songs of its batch. ``seed=None`` draws a seed from torch's global generator (follows
``torch.manual_seed``). The signal checks of the guard policy always run on the songs as given,
never on the transformed copies (noise at −50 dBFS would otherwise hide silence).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .audio import WaveformInput, as_waveform_list, per_song_rates
from .errors import ConfigError

if TYPE_CHECKING:
    from .model import ApexRewardModel
    from .outputs import ApexOutput

__all__ = [
    "GAIN_DB",
    "NOISE_DBFS",
    "STRETCH_DENOMINATOR",
    "STRETCH_STEPS",
    "RobustDraw",
    "check_robust",
    "draw_transforms",
    "apply_transform",
    "robust_predict",
]

#: Gain range, ± dB.
GAIN_DB = 6.0
#: RMS level of the added white noise, dBFS.
NOISE_DBFS = -50.0
#: Resampling jitter: factor ``(STRETCH_DENOMINATOR + j) / STRETCH_DENOMINATOR``,
#: ``j`` in ``-STRETCH_STEPS .. STRETCH_STEPS`` (±1 %).
STRETCH_DENOMINATOR = 400
STRETCH_STEPS = 4


@dataclasses.dataclass(frozen=True)
class RobustDraw:
    """One random transform of one song.

    Attributes:
        stretch: ``j``: the song is resampled by ``(400 + j) / 400``.
        offset: circular shift in samples (after the stretch), ``0 <= offset < segment length``.
        gain_db: gain in dB.
        noise_seed: seed of the noise samples.
    """

    stretch: int
    offset: int
    gain_db: float
    noise_seed: int


def check_robust(robust: Any) -> int:
    """``robust`` as a number of draws (0 = off), or a ConfigError naming the bad value."""
    if robust is None or robust is False:
        return 0
    if isinstance(robust, bool) or not isinstance(robust, int) or robust < 0:
        raise ConfigError(f"robust: expected a number of transforms >= 0, got {robust!r}")
    return int(robust)


def _song_generator(seed: int, position: int) -> torch.Generator:
    # one independent stream per (seed, song position): a song's draws do not depend on its batch
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + position) % (2**63 - 1))


def draw_transforms(
    k: int, num_samples: Sequence[int], segment_samples: Sequence[int], seed: int
) -> list[list[RobustDraw]]:
    """``k`` draws per song: ``result[i][d]`` is draw ``d`` of song ``i``.

    Args:
        k: draws per song.
        num_samples: each song's length in samples at its own rate (before the stretch).
        segment_samples: each song's segment length in samples at its own rate.
        seed: the call's seed.
    """
    out = []
    for i, (n, seg) in enumerate(zip(num_samples, segment_samples)):
        g = _song_generator(seed, i)
        draws = []
        for _ in range(k):
            j = int(torch.randint(-STRETCH_STEPS, STRETCH_STEPS + 1, (1,), generator=g))
            stretched = (n * (STRETCH_DENOMINATOR + j)) // STRETCH_DENOMINATOR
            offset = int(torch.randint(0, max(1, min(seg, stretched)), (1,), generator=g))
            gain = float((torch.rand(1, generator=g) * 2 - 1) * GAIN_DB)
            noise_seed = int(torch.randint(0, 2**62, (1,), generator=g))
            draws.append(RobustDraw(j, offset, gain, noise_seed))
        out.append(draws)
    return out


def _stretch(wav: torch.Tensor, j: int) -> torch.Tensor:
    if j == 0:
        return wav
    import julius

    return julius.resample_frac(wav, STRETCH_DENOMINATOR, STRETCH_DENOMINATOR + j)


def apply_transform(wav: torch.Tensor, draw: RobustDraw) -> torch.Tensor:
    """One song ``[T]`` or ``[C, T]`` (float) transformed by ``draw``; differentiable.

    Returns ``[T']`` / ``[C, T']`` with ``T' = T * (400 + stretch) // 400`` samples, at the
    song's own sample rate.
    """
    x = _stretch(wav, draw.stretch)
    if draw.offset:
        x = torch.roll(x, draw.offset, dims=-1)
    x = x * (10.0 ** (draw.gain_db / 20.0))
    g = torch.Generator().manual_seed(draw.noise_seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float32)
    return x + (10.0 ** (NOISE_DBFS / 20.0)) * noise.to(device=x.device, dtype=x.dtype)


def _mean_over_draws(value: Any, k: int, b: int) -> Any:
    """``[K*B, ...]`` tensors (draw-major) -> ``[B, ...]`` means; dicts of them likewise."""
    if isinstance(value, torch.Tensor) and value.ndim >= 1 and value.shape[0] == k * b:
        return value.reshape(k, b, *value.shape[1:]).mean(0)
    if (
        isinstance(value, dict)
        and value
        and all(
            isinstance(v, torch.Tensor) and v.ndim >= 1 and v.shape[0] == k * b
            for v in value.values()
        )
    ):
        return {name: _mean_over_draws(v, k, b) for name, v in value.items()}
    return None


def robust_predict(
    model: ApexRewardModel,
    waveforms: WaveformInput,
    sample_rate: int | Sequence[int],
    *,
    robust: int,
    seed: int | None = None,
    return_embeddings: bool = False,
    segment_batch_size: int | None = None,
    check: bool = True,
    condition: torch.Tensor | None = None,
) -> ApexOutput:
    """Front end, encoder and head on ``robust`` transformed copies of every song, averaged.

    Args:
        model: the reward model.
        waveforms: B songs, as :meth:`ApexRewardModel.forward` takes them.
        sample_rate: Hz, one for all songs or one per song.
        robust: K >= 1, draws per song.
        seed: the draws' seed (None: one drawn from torch's global generator).
        return_embeddings: also average the song embeddings ``[B, H]`` over the draws.
        segment_batch_size: segments per encoder call.
        check: validate each song as given with ``frontend.check`` first.
        condition: ``[B]`` condition indices of a conditioned head (None: its average).

    Returns:
        An :class:`~apex_reward.model.ApexOutput` whose ``scores`` (each ``[B]``), ``reward``
        ``[B]`` and every other per-song tensor output are means over the K draws; no
        per-segment ``features``. Differentiable with respect to ``waveforms``.
    """
    k = check_robust(robust)
    if k == 0:
        raise ConfigError("robust_predict needs robust >= 1")
    songs = as_waveform_list(waveforms)
    rates = per_song_rates(sample_rate, len(songs))
    if check:
        for i, (wav, sr) in enumerate(zip(songs, rates)):
            model.frontend.check(wav, sr, f"waveforms[{i}]")
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    seg_s = model.config.frontend.segment_seconds
    draws = draw_transforms(
        k,
        [int(w.shape[-1]) for w in songs],
        [max(1, int(math.floor(seg_s * sr))) for sr in rates],
        int(seed),
    )
    b = len(songs)
    transformed = [
        apply_transform(songs[i].to(torch.float32), draws[i][d]) for d in range(k) for i in range(b)
    ]
    features = model.encode(
        transformed, rates * k, segment_batch_size=segment_batch_size, check=False
    )
    if condition is not None:  # the draws are ordered draw-major: song i of draw d is d * b + i
        condition = condition.repeat(k)
    out = model.predict_from_features(
        features, return_embeddings=return_embeddings, condition=condition
    )
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(out):
        if f.name == "features":
            fields[f.name] = None
            continue
        fields[f.name] = _mean_over_draws(getattr(out, f.name), k, b)
    return type(out)(**fields)
