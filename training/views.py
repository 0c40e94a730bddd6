"""Augmented views of a song, made at extraction (``apex-reward extract --views N``).

A store extracted with ``--views N`` holds, for every song, view 0 (the song exactly as
``extract`` without views stores it) and ``N - 1`` augmented views. Each augmented view is made
from the song's mono waveform at the encoder rate (after decoding, downmixing, resampling and
silence trimming) by, in this order:

1. a **preview clip**: a random ``view_clip_seconds`` stretch of the song (default: one
   segment of the front end, 30 s for MERT models), at an offset drawn uniformly from every
   position that fits; a song no longer than the clip is kept whole;
2. a **random gain**, uniform in ``[view_min_gain_db, view_max_gain_db]`` dB, then hard-clipped
   to ±1 as a PCM file would store it;
3. a **time shift**: a circular roll of the clip by a uniform number of samples in
   ``[-s, s]``, ``s = view_max_shift_seconds`` (default: anywhere in the clip).

The random numbers of view ``v`` of song ``id`` come from a generator seeded with
``(view_seed, v, sha256(id))`` alone, so a view does not depend on the process, the shard layout
or whether the run was interrupted: a resumed extraction writes the same store as an
uninterrupted one. Training samples one view per song per epoch
(:mod:`apex_reward.training.trainer.views`); evaluation, calibration and OOD statistics use view 0.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from apex_reward.errors import ConfigError

__all__ = ["ViewConfig", "View", "view_rng", "make_view", "make_views"]


@dataclass
class ViewConfig:
    """How ``apex-reward extract`` makes augmented views (flattened into its flags)."""

    views: int = field(
        default=1,
        metadata={
            "help": "views stored per song: view 0 is the song itself, views 1..N-1 are random "
            "preview clips with random gain and time shift (1 = no augmentation)"
        },
    )
    view_seed: int = field(
        default=0, metadata={"help": "seed of the views' random offsets, gains and shifts"}
    )
    view_clip_seconds: float | None = field(
        default=None,
        metadata={
            "help": "length of an augmented view's preview clip, seconds (default: the front "
            "end's segment length)"
        },
    )
    view_min_gain_db: float = field(
        default=-20.0, metadata={"help": "lowest random gain of an augmented view, dB"}
    )
    view_max_gain_db: float = field(
        default=6.0,
        metadata={"help": "highest random gain of an augmented view, dB (then clipped to ±1)"},
    )
    view_max_shift_seconds: float | None = field(
        default=None,
        metadata={
            "help": "largest circular time shift (roll) of an augmented view, seconds "
            "(default: anywhere in the clip)"
        },
    )

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ConfigError(f"views: must be >= 1, got {self.views}")
        if self.view_clip_seconds is not None and not self.view_clip_seconds > 0:
            raise ConfigError(f"view_clip_seconds: must be > 0, got {self.view_clip_seconds}")
        if not self.view_min_gain_db <= self.view_max_gain_db:
            raise ConfigError(
                f"view_min_gain_db ({self.view_min_gain_db}) must not exceed view_max_gain_db "
                f"({self.view_max_gain_db})"
            )
        if self.view_max_shift_seconds is not None and self.view_max_shift_seconds < 0:
            raise ConfigError(
                f"view_max_shift_seconds: must be >= 0, got {self.view_max_shift_seconds}"
            )


@dataclass
class View:
    """One augmented view: ``audio`` mono ``[T']`` float32 at the encoder rate, and what was
    drawn: the clip's offset into the song (s), the gain (dB) and the roll (s, signed)."""

    view: int
    audio: torch.Tensor
    offset_s: float
    gain_db: float
    shift_s: float

    def record(self) -> dict[str, Any]:
        """The draws, as stored in the shard record next to the view's rows."""
        return {"offset_s": self.offset_s, "gain_db": self.gain_db, "shift_s": self.shift_s}


def view_rng(song_id: str, view: int, seed: int) -> np.random.Generator:
    """The generator of view ``view`` of ``song_id``: a function of the three values only."""
    digest = int.from_bytes(hashlib.sha256(song_id.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, view, digest])


def make_view(
    mono: torch.Tensor,
    sample_rate: int,
    song_id: str,
    view: int,
    config: ViewConfig,
    *,
    segment_seconds: float,
) -> View:
    """Augmented view ``view`` (>= 1) of a song: ``mono`` ``[T]`` float32 at ``sample_rate`` Hz
    (the encoder rate). ``segment_seconds`` is the default clip length."""
    if view < 1:
        raise ConfigError(f"view 0 is the song itself; augmented views start at 1, got {view}")
    rng = view_rng(song_id, view, config.view_seed)
    n = int(mono.shape[-1])
    clip_s = config.view_clip_seconds or segment_seconds
    clip = max(1, int(round(clip_s * sample_rate)))
    start = int(rng.integers(0, n - clip + 1)) if n > clip else 0
    x = mono[start : start + clip]
    gain_db = float(rng.uniform(config.view_min_gain_db, config.view_max_gain_db))
    x = (x * 10.0 ** (gain_db / 20.0)).clamp(-1.0, 1.0)
    m = int(x.shape[-1])
    limit = m - 1
    if config.view_max_shift_seconds is not None:
        limit = min(limit, int(round(config.view_max_shift_seconds * sample_rate)))
    shift = int(rng.integers(-limit, limit + 1)) if limit > 0 else 0
    x = torch.roll(x, shift, dims=-1).contiguous()
    return View(view, x, start / sample_rate, gain_db, shift / sample_rate)


def make_views(
    mono: torch.Tensor,
    sample_rate: int,
    song_id: str,
    config: ViewConfig,
    *,
    segment_seconds: float,
) -> list[View]:
    """Views ``1 .. config.views - 1`` of a song (empty for ``views=1``); see :func:`make_view`."""
    return [
        make_view(mono, sample_rate, song_id, v, config, segment_seconds=segment_seconds)
        for v in range(1, config.views)
    ]
