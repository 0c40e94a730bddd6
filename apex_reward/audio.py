"""Waveform inputs and the differentiable front end (docs/model.md#front-end).

* :func:`load_audio` / :func:`decode_audio_bytes` (:mod:`apex_reward.audio_files`, imported here)
  decode WAV/FLAC/Ogg Vorbis/Opus/MP3 (libsndfile via ``soundfile``) to a float32 tensor
  ``[channels, samples]`` and its sample rate, raising typed errors that name the file.
* :class:`AudioFrontEnd` turns waveforms at any rate and channel count into normalised fixed-length
  segments for the encoder: downmix (channel mean) -> resample to 24 kHz -> (optionally) trim
  leading/trailing digital silence -> cut into 30 s segments, zero-padding only the last ->
  per-segment normalisation over the unpadded samples. Every step is a torch op, so gradients flow
  from the segments back to the input waveform. :meth:`AudioFrontEnd.segment_weights` gives each
  segment's weight in its song's average (duration or uniform; near-silent segments 0 when
  ``silent_segment_db`` is set).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from .audio_files import decode_audio_bytes, load_audio
from .config import FrontendConfig
from .errors import (
    AudioRangeError,
    AudioShapeError,
    AudioTooLongError,
    AudioTooShortError,
    EmptyAudioError,
    MissingDependencyError,
    NonFiniteAudioError,
    UnsupportedSampleRateError,
)
from .segment_rows import cut_rows

__all__ = [
    "load_audio",
    "decode_audio_bytes",
    "AudioFrontEnd",
    "Segments",
    "WaveformInput",
    "as_waveform_list",
]

#: What the model's forward accepts: a tensor ``[B, T]`` / ``[B, C, T]`` or a list of ``[T]`` /
#: ``[C, T]`` tensors or numpy arrays (songs of different lengths).
WaveformInput = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]

_MAX_CHANNELS = 64

#: Sample rates the front end resamples from (Hz). Below 1 kHz there is no music to score; above
#: 768 kHz (the highest PCM rate in use) the resampling ratio is no longer representable.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1_000, 768_000

#: Largest accepted |sample|. Float audio is expected in [-1, 1]; integer-scaled floats (up to
#: 2^31) are fine since each segment is normalised. Beyond this the float32 statistics of the
#: normalisation overflow and a song would score as NaN or as silence.
MAX_ABS_SAMPLE = 1e12


def _as_tensor(x: torch.Tensor | np.ndarray, where: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiu":
            raise AudioShapeError(f"expected a numeric array, got dtype {x.dtype}", where)
        t = torch.from_numpy(np.ascontiguousarray(x))
        if x.dtype.kind in "iu":
            # integer PCM: scale to [-1, 1]
            t = t.to(torch.float32) / float(np.iinfo(x.dtype).max)
        return t
    if isinstance(x, torch.Tensor):
        if not (x.is_floating_point() or x.dtype in (torch.int16, torch.int32)):
            raise AudioShapeError(f"expected a float tensor, got {x.dtype}", where)
        if not x.is_floating_point():
            return x.to(torch.float32) / float(torch.iinfo(x.dtype).max)
        return x
    raise AudioShapeError(f"expected a torch.Tensor or numpy array, got {type(x).__name__}", where)


def _check_channels_first(x: torch.Tensor, where: str) -> None:
    if x.ndim == 2 and x.shape[0] > x.shape[1] and x.shape[1] <= 8:
        raise AudioShapeError(
            f"shape {tuple(x.shape)} looks like [samples, channels]; pass [channels, samples] "
            "(transpose it)",
            where,
        )
    if x.ndim == 2 and x.shape[0] > _MAX_CHANNELS:
        raise AudioShapeError(
            f"shape {tuple(x.shape)}: {x.shape[0]} channels is more than {_MAX_CHANNELS}; "
            "a batch must be a 2-D tensor [B, T], a 3-D tensor [B, C, T] or a list",
            where,
        )


def as_waveform_list(waveforms: WaveformInput) -> list[torch.Tensor]:
    """Split model input into one tensor per song (``[T]`` or ``[C, T]``), without copying.

    Accepts a tensor ``[B, T]`` (B mono songs), ``[B, C, T]`` (B songs with C channels), a 1-D
    tensor ``[T]`` (one song), or a list/tuple of ``[T]`` / ``[C, T]`` tensors or numpy arrays.
    """
    if isinstance(waveforms, (torch.Tensor, np.ndarray)):
        x = _as_tensor(waveforms, "waveforms")
        if x.ndim == 1:
            return [x]
        if x.ndim == 2:
            return list(x.unbind(0))
        if x.ndim == 3:
            return list(x.unbind(0))
        raise AudioShapeError(
            f"expected [T], [B, T] or [B, C, T], got shape {tuple(x.shape)}", "waveforms"
        )
    if isinstance(waveforms, (str, Path)):
        raise AudioShapeError(
            "got a path; the forward pass takes waveforms. Use model.score(paths) for files",
            str(waveforms),
        )
    if not isinstance(waveforms, Sequence) or len(waveforms) == 0:
        raise AudioShapeError(
            f"expected a tensor or a non-empty list of tensors, got {type(waveforms).__name__}",
            "waveforms",
        )
    out = []
    for i, w in enumerate(waveforms):
        t = _as_tensor(w, f"waveforms[{i}]")
        if t.ndim not in (1, 2):
            raise AudioShapeError(
                f"each song must be [T] or [C, T], got shape {tuple(t.shape)}", f"waveforms[{i}]"
            )
        _check_channels_first(t, f"waveforms[{i}]")
        out.append(t)
    return out


@dataclass
class Segments:
    """Fixed-length encoder inputs cut from a batch of songs.

    Attributes:
        audio: ``[N, S]`` float32 segments at the encoder rate (S = 720,000 for 30 s at 24 kHz);
            the tail of each song's last segment is zero.
        valid: ``[N]`` int64 number of unpadded samples in each segment.
        song_index: ``[N]`` int64 index of the song each segment belongs to.
        num_songs: number of songs B.
        level_db: ``[N]`` float32 RMS level of each segment's unpadded samples with the mean
            removed, before normalisation, in dBFS (digital silence and pure DC: -200); no
            gradient. None for segments built by hand.
    """

    audio: torch.Tensor
    valid: torch.Tensor
    song_index: torch.Tensor
    num_songs: int
    level_db: torch.Tensor | None = None

    @property
    def durations(self) -> torch.Tensor:
        """``[B]`` duration of each song at the encoder rate, in samples."""
        out = torch.zeros(self.num_songs, dtype=torch.int64, device=self.valid.device)
        return out.index_add_(0, self.song_index, self.valid)


class AudioFrontEnd(torch.nn.Module):
    """Differentiable waveform -> segments transform (no parameters).

    ``forward(waveforms, sample_rate) -> Segments``; see :func:`as_waveform_list` for the accepted
    input shapes. ``sample_rate`` is one int for all songs or a sequence with one per song.
    """

    def __init__(self, config: FrontendConfig) -> None:
        super().__init__()
        self.config = config
        if config.resampler == "torchaudio":
            try:
                import torchaudio.functional  # noqa: F401
            except Exception as e:  # torchaudio may be a CUDA build that fails to import
                raise MissingDependencyError(
                    f"resampler='torchaudio' but torchaudio does not import here ({e}); "
                    "use resampler='julius'"
                ) from e

    # -- validation ------------------------------------------------------------------------

    def check(self, wav: torch.Tensor, sample_rate: int, where: str) -> None:
        """Raise a typed :class:`~apex_reward.errors.AudioError` if ``wav`` cannot be scored.

        ``wav`` is ``[T]`` or ``[C, T]`` at ``sample_rate`` Hz.
        """
        cfg = self.config
        check_sample_rate(sample_rate, where)
        if wav.ndim == 2 and wav.shape[0] == 0:
            raise EmptyAudioError("audio has no channels", where)
        if wav.ndim == 2 and wav.shape[0] > _MAX_CHANNELS:
            raise AudioShapeError(
                f"{wav.shape[0]} channels; at most {_MAX_CHANNELS} are accepted", where
            )
        n = wav.shape[-1]
        if n == 0:
            raise EmptyAudioError("audio has no samples", where)
        duration = n / sample_rate
        if duration < cfg.min_duration_s:
            raise AudioTooShortError(
                f"audio is {duration:.3g} s long; the minimum is {cfg.min_duration_s:g} s", where
            )
        if duration > cfg.max_duration_s:
            raise AudioTooLongError(
                f"audio is {duration:.1f} s long; the limit is {cfg.max_duration_s:g} s", where
            )
        # one reduction for both checks: the peak is NaN/inf if any sample is
        peak = float(wav.detach().abs().amax())
        if not math.isfinite(peak):
            bad = int((~torch.isfinite(wav.detach())).sum())
            raise NonFiniteAudioError(f"audio contains {bad} NaN or infinite samples", where)
        if peak > MAX_ABS_SAMPLE:
            raise AudioRangeError(
                f"peak |sample| is {peak:.3g}, above the {MAX_ABS_SAMPLE:g} this front end "
                "can normalise (float audio is expected in [-1, 1])",
                where,
            )

    # -- steps -------------------------------------------------------------------------------

    @staticmethod
    def downmix(wav: torch.Tensor) -> torch.Tensor:
        """``[C, T]`` or ``[T]`` -> ``[T]`` (mean of channels)."""
        return wav.mean(dim=0) if wav.ndim == 2 else wav

    def resample(self, wav: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Resample ``[..., T]`` from ``sample_rate`` to the encoder rate (differentiable).

        With ``trim_silence``, a mono song ``[T]`` is first :meth:`trim`-med at its own rate (so
        that a padded song resamples to exactly the same samples as the unpadded one); batches
        ``[B, T]`` are resampled as they are (trim each song first).
        """
        if self.config.trim_silence and wav.ndim == 1:
            wav = self.trim(wav, sample_rate)
        target = self.config.sample_rate
        if sample_rate == target:
            return wav
        if self.config.resampler == "torchaudio":
            import torchaudio.functional as AF

            return AF.resample(wav, sample_rate, target)
        return self._resample_julius(wav, sample_rate, target)

    #: output frames per block of the chunked resampler (bounds memory on long songs)
    _RESAMPLE_BLOCK = 1 << 18

    def _resample_julius(self, wav: torch.Tensor, old: int, new: int) -> torch.Tensor:
        """julius' windowed-sinc resampler, applied block by block.

        Computes exactly the dot products of ``julius.resample_frac`` (same kernel, same
        replicate padding), but on slices of the input, so a 30-minute song does not materialise
        the convolution of the whole signal at once.
        """
        import julius

        frac = _bounded_ratio(Fraction(old, new))
        key = (frac.numerator, frac.denominator, wav.device, wav.dtype)
        cache = self.__dict__.setdefault("_resamplers", {})
        if key not in cache:
            # a normal (not inference-mode) tensor, so the cached kernel also serves autograd calls
            with torch.inference_mode(False):
                cache[key] = julius.ResampleFrac(frac.numerator, frac.denominator).to(
                    wav.device, wav.dtype
                )
        rs = cache[key]
        shape, length = wav.shape, wav.shape[-1]
        x = wav.reshape(-1, 1, length)
        x = torch.nn.functional.pad(x, (rs._width, rs._width + rs.old_sr), mode="replicate")
        frames = (x.shape[-1] - rs.kernel.shape[-1]) // rs.old_sr + 1
        klen = rs.kernel.shape[-1]
        blocks = []
        for j0 in range(0, frames, self._RESAMPLE_BLOCK):
            j1 = min(frames, j0 + self._RESAMPLE_BLOCK)
            piece = x[..., j0 * rs.old_sr : (j1 - 1) * rs.old_sr + klen]
            blocks.append(torch.nn.functional.conv1d(piece, rs.kernel, stride=rs.old_sr))
        ys = torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]
        y = ys.transpose(1, 2).reshape(list(shape[:-1]) + [-1])
        out_len = (rs.new_sr * length) // rs.old_sr
        return y[..., :out_len]

    def trim(self, x: torch.Tensor, sample_rate: int) -> torch.Tensor:
        """Leading and trailing digital silence removed from a mono song ``[T]`` at
        ``sample_rate`` Hz (a slice of ``x``: differentiable, the trimmed samples get zero
        gradient).

        A sample is silent when ``|x| <= 10 ** (trim_threshold_db / 20)``. The kept stretch is
        extended (centred, within the song) to at least ``min_duration_s``, so trimming never
        makes a song shorter than the front end accepts; a song that is silent throughout is
        returned whole (it still gets a score, and the signal checks flag it).
        """
        start, stop = self.trim_span(x, sample_rate)
        if start == 0 and stop == x.shape[-1]:
            return x
        return x[start:stop]

    def trim_span(self, x: torch.Tensor, sample_rate: int) -> tuple[int, int]:
        """``(start, stop)``: the sample range of mono ``x`` ``[T]`` that :meth:`trim` keeps."""
        n = x.shape[-1]
        loud = x.detach().abs() > 10.0 ** (self.config.trim_threshold_db / 20.0)
        if n == 0 or not bool(loud.any()):
            return 0, n
        start = int(loud.to(torch.uint8).argmax())
        stop = n - int(loud.flip(0).to(torch.uint8).argmax())
        keep = min(n, int(round(self.config.min_duration_s * sample_rate)))
        if stop - start < keep:
            centre = (start + stop) // 2
            start = min(max(0, centre - keep // 2), n - keep)
            stop = start + keep
        return start, stop

    def segment(self, songs: Sequence[torch.Tensor]) -> Segments:
        """Cut mono songs at the encoder rate (``[T_b]`` each) into ``[N, S]`` segments.

        Songs are cut into ``ceil(T / S)`` non-overlapping segments; only the last segment of a
        song is zero-padded (to ``S``; with ``segment_padding="none"`` the rows are only as wide
        as the longest segment's :meth:`encoded_lengths`). Normalisation (if configured) uses the
        unpadded samples only and leaves the padding at zero. (Silence trimming happens before, in :meth:`resample`.)
        """
        S = self.config.segment_samples
        # row width: S, or under segment_padding="none" the longest segment the encoder will see
        # (see encoded_lengths): S as soon as one song spans more than one segment
        W = S
        if self.config.segment_padding == "none":
            W = max(self.config.encoded_samples(min(x.shape[-1], S)) for x in songs)
        spans, index = [], []
        for b, x in enumerate(songs):
            n = x.shape[-1]
            k = max(1, math.ceil(n / S))
            spans.extend((x, j * S, min(S, n - j * S)) for j in range(k))
            index.extend([b] * k)
        # one pass over each segment's real samples: copy, level and normalisation together
        audio, level_db = cut_rows(
            spans,
            W,
            normalize=self.config.normalize,
            floor=self.config.normalize_floor,
            target_db=self.config.normalize_level_db,
        )
        device = audio.device
        valid_t = torch.tensor([n for _, _, n in spans], dtype=torch.int64, device=device)
        index_t = torch.tensor(index, dtype=torch.int64, device=device)
        if self.config.gradient_gate_db is not None:
            audio = gate_gradient(audio, level_db, self.config.gradient_gate_db)
        return Segments(
            audio=audio,
            valid=valid_t,
            song_index=index_t,
            num_songs=len(songs),
            level_db=level_db,
        )

    def encoded_lengths(self, valid: torch.Tensor) -> torch.Tensor:
        """``[N]`` int64 samples the encoder sees per segment, from ``valid`` ``[N]``: the full
        segment under ``segment_padding="full"``; under ``"none"`` the unpadded length, at least
        ``min_segment_seconds``. The model encodes segments of equal length together, so a
        segment's features never depend on the other segments of its batch."""
        return torch.tensor(
            [self.config.encoded_samples(v) for v in valid.tolist()],
            dtype=torch.int64,
            device=valid.device,
        )

    def segment_weights(self, segments: Segments) -> torch.Tensor:
        """``[N]`` float32 weight of each segment in its song's average.

        ``segment_weighting="duration"``: the unpadded sample count; ``"uniform"``: 1. With
        ``silent_segment_db`` set, segments whose ``level_db`` is below it get weight 0, except
        in a song whose segments are all below it (its weights stay as they were, so the song
        still has a score). Extraction must record these weights (or ``level_db``) per segment
        for cached embeddings to score like audio.
        """
        if self.config.segment_weighting == "uniform":
            w = torch.ones_like(segments.valid, dtype=torch.float32)
        else:
            w = segments.valid.to(torch.float32)
        limit = self.config.silent_segment_db
        if limit is None:
            return w
        if segments.level_db is None:
            raise AudioShapeError(
                "frontend.silent_segment_db is set but the segments carry no level_db "
                "(build them with AudioFrontEnd.segment)",
                "segments",
            )
        loud = (segments.level_db >= limit).to(torch.float32)
        loud_per_song = torch.zeros(
            segments.num_songs, dtype=torch.float32, device=w.device
        ).index_add_(0, segments.song_index, loud)
        keep_all = loud_per_song[segments.song_index] == 0
        return torch.where(keep_all, w, w * loud)

    def forward(
        self,
        waveforms: WaveformInput,
        sample_rate: int | Sequence[int],
        *,
        device: torch.device | None = None,
        check: bool = True,
    ) -> Segments:
        """Waveforms at ``sample_rate`` Hz -> :class:`Segments` (float32, on ``device``).

        Raises an :class:`~apex_reward.errors.AudioError` subclass naming ``waveforms[i]`` for empty,
        non-finite, too-short or too-long input (skipped with ``check=False``).
        """
        songs = as_waveform_list(waveforms)
        rates = per_song_rates(sample_rate, len(songs))
        batched = (
            isinstance(waveforms, (torch.Tensor, np.ndarray))
            and len(set(rates)) == 1
            and not self.config.trim_silence  # trimmed songs differ in length
        )
        prepared: list[torch.Tensor] = []
        for i, (wav, sr) in enumerate(zip(songs, rates)):
            if check:
                self.check(wav, sr, f"waveforms[{i}]")
            wav = wav.to(device=device, dtype=torch.float32)
            prepared.append(self.downmix(wav))
        if batched and len(prepared) > 1:
            # one resampling call for an equal-length batch
            mono = self.resample(torch.stack(prepared), rates[0]).unbind(0)
        else:
            mono = [self.resample(w, sr) for w, sr in zip(prepared, rates)]
        return self.segment(mono)


#: Width of the gradient gate's ramp (dB): full gradient this far above ``gradient_gate_db``.
GATE_RAMP_DB = 10.0


def gate_gradient(audio: torch.Tensor, level_db: torch.Tensor, gate_db: float) -> torch.Tensor:
    """``audio`` ``[N, S]`` unchanged in value; its gradient scaled per row by
    ``clamp((level_db - gate_db) / GATE_RAMP_DB, 0, 1)``.

    Rows at or below ``gate_db`` pass exactly zero gradient (``torch.where``, so even a non-finite
    upstream gradient, as the encoder gives on all-zero input, becomes 0, not NaN). The forward
    value is exactly ``audio``: ``audio.detach() + g * (audio - audio.detach())`` adds an exact 0.

    Why a gate and not only a variance floor: the encoder's first GroupNorm re-normalises its
    input, so the model stays scale-invariant far below the front end's normaliser and its
    waveform gradient grows like 1 / level whatever the floor (docs/model.md#silence-and-level).
    """
    if not audio.requires_grad:
        return audio
    g = ((level_db.to(audio.dtype) - gate_db) / GATE_RAMP_DB).clamp(0.0, 1.0)[:, None]
    fixed = audio.detach()
    return torch.where(g > 0, fixed + g * (audio - fixed), fixed)


#: Largest numerator/denominator of the resampling ratio. julius builds a filter bank of
#: ``new x (old + ~100)`` taps for ``old/new`` in lowest terms: fine for the usual rates (44.1 kHz ->
#: 24 kHz is 147/80) but gigabytes for an odd rate such as 44,101 Hz (44101/24000).
_MAX_RATIO_TERM = 1000


def _bounded_ratio(frac: Fraction) -> Fraction:
    """``frac`` itself, or the closest ratio whose terms are at most ``_MAX_RATIO_TERM``.

    The approximation changes the effective rate by at most about 1 part in 10^4 (e.g. 8,001 Hz
    is treated as 8,000 Hz: 0.2 cents of pitch, inaudible), and only for rates that are not
    simple ratios of 24 kHz.
    """
    if max(frac.numerator, frac.denominator) <= _MAX_RATIO_TERM:
        return frac
    if frac >= 1:
        approx = 1 / (1 / frac).limit_denominator(_MAX_RATIO_TERM)
    else:
        approx = frac.limit_denominator(_MAX_RATIO_TERM)
    return approx


def per_song_rates(
    sample_rate: int | Sequence[int], n: int, where: str = "sample_rate"
) -> list[int]:
    """One checked sample rate per song: ``sample_rate`` repeated, or its ``n`` entries."""
    if isinstance(sample_rate, (list, tuple)):
        if len(sample_rate) != n:
            raise AudioShapeError(f"got {len(sample_rate)} sample rates for {n} songs", where)
        rates = list(sample_rate)
    else:
        rates = [sample_rate] * n
    return [check_sample_rate(r, where) for r in rates]


def check_sample_rate(rate: object, where: str) -> int:
    """``rate`` as an int number of Hz, or a typed error naming ``where``.

    Raises:
        AudioShapeError: not a positive integer (``0``, ``-1``, ``24000.7``, ``nan``, ``"x"``).
        UnsupportedSampleRateError: outside ``MIN_SAMPLE_RATE`` .. ``MAX_SAMPLE_RATE``.
    """
    r = rate
    if isinstance(r, float) and r.is_integer():
        r = int(r)
    if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
        raise AudioShapeError(
            f"sample rate must be a positive integer number of Hz, got {rate!r}", where
        )
    if not MIN_SAMPLE_RATE <= r <= MAX_SAMPLE_RATE:
        raise UnsupportedSampleRateError(
            f"sample rate {int(r)} Hz is outside the supported {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE} Hz",
            where,
        )
    return int(r)
