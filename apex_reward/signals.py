"""Signal checks: named measurements of a waveform that say when a reward should not be trusted.

A reward model is optimised against. A generator finds whatever scores well for the wrong
reason — silence, near-silence, noise, held tones, loops, DC, clipping — so these checks measure
the waveform itself, before the model's front end, and flag audio that is not music as the
reward model was trained on it (docs/model.md#signal-checks).

API
---

``measure_signals(waveform, sample_rate) -> dict[str, float]``
    One finite float per name in :data:`SIGNAL_NAMES` (JSON-safe: never NaN or inf):

    ============================  ==================================================================
    ``loudness_lufs``             integrated loudness, ITU-R BS.1770 (``pyloudnorm``), LUFS; audio
                                  the BS.1770 gates remove entirely gets its ungated loudness,
                                  digital silence :data:`SILENCE_LUFS` (-200)
    ``silent_fraction``           fraction of 50 ms frames whose RMS is below -60 dBFS, 0–1
    ``dc_offset``                 ``|mean(x)|`` in full-scale units, 0–1
    ``clipped_fraction``          fraction of samples (native rate) in runs of >= 3 consecutive
                                  samples within 0.1 % of the clip's peak, 0–1
    ``spectral_flatness``         median over non-silent frames of the power spectrum's
                                  geometric / arithmetic mean (100 Hz–7.6 kHz), 0–1; noise ≈ 0.5
    ``tonal_dominance``           fraction of the clip's long-term power (30 Hz–7.6 kHz) within
                                  ±6 Hz of its strongest spectral peak, 0–1; a sine ≈ 1
    ``repetition``                largest mean correlation of the (z-scored, log band energy)
                                  spectrogram with itself shifted by 1–4 s, -1–1; an exact loop ≈ 1
    ============================  ==================================================================

``guard_flags(signals, config) -> list[str]``
    The names of the flags (:data:`FLAGS`) whose check fails under ``config``
    (:class:`~apex_reward.config.GuardConfig`), in :data:`FLAGS` order; empty when nothing is
    wrong or ``config.policy == "off"``.

Everything runs in numpy float64 without gradient, on the CPU, in bounded memory (the clip is
downmixed to mono, resampled to :data:`ANALYSIS_RATE` for all checks except clipping, and
analysed in blocks): a 30-minute file takes a few seconds. Thresholds and their measurement are
in docs/model.md#signal-checks (``benchmarks/signal_thresholds.py`` re-measures them).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping

import numpy as np
import torch

from .errors import AudioShapeError, EmptyAudioError, NonFiniteAudioError

__all__ = [
    "ANALYSIS_RATE",
    "FLAGS",
    "SIGNAL_NAMES",
    "SILENCE_LUFS",
    "guard_flags",
    "measure_signals",
]

#: Every check's name, in output order (a public contract: keys of ``measure_signals``).
SIGNAL_NAMES: tuple[str, ...] = (
    "loudness_lufs",
    "silent_fraction",
    "dc_offset",
    "clipped_fraction",
    "spectral_flatness",
    "tonal_dominance",
    "repetition",
)

#: Flag name -> (signal it tests, ``GuardConfig`` threshold field, direction). ``"below"`` flags
#: values under the threshold, ``"above"`` values over it.
FLAGS: dict[str, tuple[str, str, str]] = {
    "too_quiet": ("loudness_lufs", "min_loudness_lufs", "below"),
    "mostly_silent": ("silent_fraction", "max_silent_fraction", "above"),
    "dc_offset": ("dc_offset", "max_dc_offset", "above"),
    "clipped": ("clipped_fraction", "max_clipped_fraction", "above"),
    "noise_like": ("spectral_flatness", "max_spectral_flatness", "above"),
    "held_tone": ("tonal_dominance", "max_tonal_dominance", "above"),
    "looped": ("repetition", "max_repetition", "above"),
}

#: Rate (Hz) every check but ``clipped_fraction`` runs at, so thresholds do not depend on the
#: file's rate.
ANALYSIS_RATE = 16_000
#: ``loudness_lufs`` of digital silence (a finite stand-in for -inf).
SILENCE_LUFS = -200.0

_FRAME_S = 0.05  # silent_fraction frames
_SILENT_DBFS = -60.0
_CLIP_RUN = 3
_CLIP_TOL = 1e-3
_N_FFT = 1024  # 64 ms at 16 kHz: flatness and repetition frames
_HOP = 512
_FLAT_BAND = (100.0, 7600.0)
_TONAL_N_FFT = 8192  # ~2 Hz bins for the long-term spectrum
_TONAL_BAND = (30.0, 7600.0)
_TONAL_HALF_WIDTH_HZ = 6.0
_REP_LAGS_S = (1.0, 4.0)
_REP_BANDS = 64
_BLOCK_FRAMES = 4096  # STFT frames per block (bounds memory on long files)


def measure_signals(waveform: torch.Tensor | np.ndarray, sample_rate: int) -> dict[str, float]:
    """Measure every signal check on one clip.

    Args:
        waveform: ``[T]`` or ``[C, T]`` samples (float, expected in [-1, 1]; integer PCM arrays
            are scaled by their dtype's maximum), torch tensor (any device; no gradient is
            taken) or numpy array.
        sample_rate: Hz.

    Returns:
        ``{name: value}`` for every name in :data:`SIGNAL_NAMES`: finite Python floats (units in
        the module docstring).

    Raises:
        AudioShapeError: not 1-D/2-D, or a bad sample rate.
        EmptyAudioError: no samples.
        NonFiniteAudioError: NaN or infinite samples.
    """
    from .audio import check_sample_rate

    sr = check_sample_rate(sample_rate, "waveform")
    mono = _mono(waveform)
    native = mono  # float32 [T] at the native rate
    x = _resample(mono, sr, ANALYSIS_RATE).astype(np.float64)
    peak = float(np.abs(native).max())
    out = {
        "loudness_lufs": _loudness(x, ANALYSIS_RATE),
        "silent_fraction": _silent_fraction(x, ANALYSIS_RATE),
        "dc_offset": abs(float(native.astype(np.float64).mean())),
        "clipped_fraction": _clipped_fraction(native, peak),
    }
    frames_db, band_db, flatness, bands = _frame_features(x, ANALYSIS_RATE)
    out["spectral_flatness"] = _median_flatness(flatness, band_db)
    out["tonal_dominance"] = _tonal_dominance(x, ANALYSIS_RATE)
    out["repetition"] = _repetition(bands, frames_db, ANALYSIS_RATE / _HOP)
    return {k: _finite(out[k]) for k in SIGNAL_NAMES}


def guard_flags(signals: Mapping[str, float], config) -> list[str]:
    """Flags raised by ``signals`` (from :func:`measure_signals`) under ``config``.

    Args:
        signals: ``{name: value}``; every signal a flag needs must be present.
        config: a :class:`~apex_reward.config.GuardConfig` (thresholds; ``policy="off"``
            raises nothing). A threshold set to None disables its flag.

    Returns:
        Flag names from :data:`FLAGS`, in that order.
    """
    if config.policy == "off":
        return []
    flags = []
    for flag, (signal, field_name, direction) in FLAGS.items():
        limit = getattr(config, field_name)
        if limit is None:
            continue
        if signal not in signals:
            raise KeyError(f"guard_flags: signal {signal!r} (for flag {flag!r}) was not measured")
        value = float(signals[signal])
        if (value < limit) if direction == "below" else (value > limit):
            flags.append(flag)
    return flags


# ----------------------------------------------------------------------------------------------
# preparation


def _mono(waveform: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(waveform, torch.Tensor):
        x = waveform.detach()
        if not x.is_floating_point():
            x = x.to(torch.float32) / float(torch.iinfo(x.dtype).max)
        a = x.to("cpu", torch.float32).numpy()
    elif isinstance(waveform, np.ndarray):
        if waveform.dtype.kind in "iu":
            a = waveform.astype(np.float32) / float(np.iinfo(waveform.dtype).max)
        elif waveform.dtype.kind == "f":
            a = waveform.astype(np.float32, copy=False)
        else:
            raise AudioShapeError(
                f"expected a numeric array, got dtype {waveform.dtype}", "waveform"
            )
    else:
        raise AudioShapeError(
            f"expected a torch.Tensor or numpy array, got {type(waveform).__name__}", "waveform"
        )
    if a.ndim == 2:
        if a.shape[0] == 0:
            raise EmptyAudioError("audio has no channels", "waveform")
        a = a.mean(axis=0, dtype=np.float32) if a.shape[0] > 1 else a[0]
    elif a.ndim != 1:
        raise AudioShapeError(f"expected [T] or [C, T], got shape {tuple(a.shape)}", "waveform")
    if a.size == 0:
        raise EmptyAudioError("audio has no samples", "waveform")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).sum())
        raise NonFiniteAudioError(f"audio contains {bad} NaN or infinite samples", "waveform")
    return np.ascontiguousarray(a)


def _resample(x: np.ndarray, old: int, new: int) -> np.ndarray:
    """Blockwise julius resampling (the front end's resampler), float32 ``[T] -> [T']``."""
    if old == new:
        return x
    from .audio import AudioFrontEnd
    from .config import FrontendConfig

    fe = _RESAMPLERS.get(new)
    if fe is None:
        fe = _RESAMPLERS[new] = AudioFrontEnd(FrontendConfig(sample_rate=new))
    with torch.no_grad():
        return fe.resample(torch.from_numpy(x), old).numpy()


_RESAMPLERS: dict[int, object] = {}


def _finite(v: float) -> float:
    v = float(v)
    if math.isnan(v):
        return 0.0
    return max(-1e300, min(1e300, v))


# ----------------------------------------------------------------------------------------------
# level checks


def _loudness(x: np.ndarray, sr: int) -> float:
    """BS.1770 integrated loudness in LUFS; ungated when the gates leave no block."""
    if not np.any(x):
        return SILENCE_LUFS
    import pyloudnorm

    meter = pyloudnorm.Meter(sr)
    value = -math.inf
    if x.shape[0] >= int(0.4 * sr):  # one 400 ms gating block
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = float(meter.integrated_loudness(x))
    if not math.isfinite(value):
        # everything below the -70 LUFS absolute gate: the ungated mean square of the
        # K-weighted signal, same formula
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            filtered = x
            for f in meter._filters.values():
                filtered = f.apply_filter(filtered)
        ms = float(np.mean(filtered * filtered))
        value = -0.691 + 10.0 * math.log10(ms) if ms > 0 else SILENCE_LUFS
    return max(SILENCE_LUFS, value)


def _silent_fraction(x: np.ndarray, sr: int) -> float:
    frame = int(round(_FRAME_S * sr))
    n = max(1, x.shape[0] // frame)
    head = x[: n * frame] if x.shape[0] >= frame else np.pad(x, (0, frame - x.shape[0]))
    ms = np.einsum("ij,ij->i", head.reshape(n, frame), head.reshape(n, frame)) / frame
    limit = 10.0 ** (_SILENT_DBFS / 10.0)
    return float(np.mean(ms < limit))


def _clipped_fraction(x: np.ndarray, peak: float) -> float:
    """Samples in runs of >= ``_CLIP_RUN`` at ``|x| >= (1 - _CLIP_TOL) * peak``, same sign."""
    if peak < 1e-3:  # near-silence is not clipped
        return 0.0
    level = (1.0 - _CLIP_TOL) * peak
    counted = 0
    block = 1 << 22
    carry = np.zeros(0, dtype=np.int8)
    for start in range(0, x.shape[0], block):
        piece = x[start : start + block]
        s = np.where(piece >= level, 1, np.where(piece <= -level, -1, 0)).astype(np.int8)
        s = np.concatenate([carry, s])
        counted_here, tail = _count_runs(s)
        counted += counted_here
        carry = s[len(s) - tail :] if tail else np.zeros(0, dtype=np.int8)
    if carry.size >= _CLIP_RUN and carry[0] != 0:
        counted += carry.size
    return counted / x.shape[0]


def _count_runs(s: np.ndarray) -> tuple[int, int]:
    """Samples in closed runs of equal non-zero sign of length >= ``_CLIP_RUN``, and the length
    of the run still open at the end (carried to the next block)."""
    if s.size == 0:
        return 0, 0
    change = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [s.size]]))
    signs = s[starts]
    last_open = int(lengths[-1]) if signs[-1] != 0 else 0
    closed = slice(0, len(lengths) - 1) if last_open else slice(0, len(lengths))
    ok = (signs[closed] != 0) & (lengths[closed] >= _CLIP_RUN)
    return int(lengths[closed][ok].sum()), last_open


# ----------------------------------------------------------------------------------------------
# spectral checks


def _stft_power_blocks(x: np.ndarray):
    """Yields ``[frames, _N_FFT // 2 + 1]`` power spectra (Hann, hop ``_HOP``) block by block."""
    window = np.hanning(_N_FFT + 1)[:-1]
    if x.shape[0] < _N_FFT:
        x = np.pad(x, (0, _N_FFT - x.shape[0]))
    n_frames = 1 + (x.shape[0] - _N_FFT) // _HOP
    view = np.lib.stride_tricks.sliding_window_view(x, _N_FFT)[::_HOP]
    for f0 in range(0, n_frames, _BLOCK_FRAMES):
        frames = view[f0 : f0 + _BLOCK_FRAMES] * window
        spec = np.fft.rfft(frames, axis=-1)
        yield spec.real**2 + spec.imag**2


def _frame_features(
    x: np.ndarray, sr: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per STFT frame: level (dBFS), level within the flatness band (dBFS), spectral flatness,
    and log energy in ``_REP_BANDS`` log-spaced bands (for ``repetition``)."""
    freqs = np.fft.rfftfreq(_N_FFT, 1.0 / sr)
    flat_bins = (freqs >= _FLAT_BAND[0]) & (freqs <= _FLAT_BAND[1])
    edges = np.geomspace(60.0, _FLAT_BAND[1], _REP_BANDS + 1)
    band_of = np.digitize(freqs, edges) - 1
    valid = (band_of >= 0) & (band_of < _REP_BANDS)
    pooling = np.zeros((freqs.size, _REP_BANDS))
    pooling[np.flatnonzero(valid), band_of[valid]] = 1.0
    win_power = float(np.sum(np.hanning(_N_FFT + 1)[:-1] ** 2))
    levels, band_levels, flats, bands = [], [], [], []
    scale = 1.0 / (win_power * _N_FFT / 2)  # power sum -> ≈ mean square of the frame
    for p in _stft_power_blocks(x):
        levels.append(10.0 * np.log10(p.sum(axis=-1) * scale + 1e-20))
        band_levels.append(10.0 * np.log10(p[:, flat_bins].sum(axis=-1) * scale + 1e-20))
        pb = p[:, flat_bins] + 1e-20
        flats.append(np.exp(np.mean(np.log(pb), axis=-1)) / np.mean(pb, axis=-1))
        bands.append(np.log(p @ pooling + 1e-10))
    return (
        np.concatenate(levels),
        np.concatenate(band_levels),
        np.concatenate(flats),
        np.concatenate(bands),
    )


def _median_flatness(flatness: np.ndarray, frames_db: np.ndarray) -> float:
    """Median flatness over frames whose level within the flatness band is above -60 dBFS (0 if
    there are none: silence and pure DC are not noise)."""
    loud = frames_db > _SILENT_DBFS
    return float(np.median(flatness[loud])) if loud.any() else 0.0


def _tonal_dominance(x: np.ndarray, sr: int) -> float:
    """Share of the long-term power spectrum within ±6 Hz of its strongest peak."""
    n = _TONAL_N_FFT
    if x.shape[0] < n:
        x = np.pad(x, (0, n - x.shape[0]))
    window = np.hanning(n + 1)[:-1]
    view = np.lib.stride_tricks.sliding_window_view(x, n)[:: n // 2]
    total = np.zeros(n // 2 + 1)
    for f0 in range(0, view.shape[0], 256):
        spec = np.fft.rfft(view[f0 : f0 + 256] * window, axis=-1)
        total += (spec.real**2 + spec.imag**2).sum(axis=0)
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    band = (freqs >= _TONAL_BAND[0]) & (freqs <= _TONAL_BAND[1])
    p = np.where(band, total, 0.0)
    energy = p.sum()
    if energy == 0 or energy <= 1e-10 * float(total.sum()):  # silence; DC (outside the band)
        return 0.0
    k = int(np.argmax(p))
    half = max(1, int(round(_TONAL_HALF_WIDTH_HZ / (sr / n))))
    return float(p[max(0, k - half) : k + half + 1].sum() / energy)


def _repetition(bands: np.ndarray, frames_db: np.ndarray, frame_rate: float) -> float:
    """Largest mean Pearson correlation between the band-energy spectrogram and itself shifted by
    1–4 s, over non-silent frames (0 for clips too short or without variation)."""
    lo = int(math.ceil(_REP_LAGS_S[0] * frame_rate))
    hi = int(math.floor(_REP_LAGS_S[1] * frame_rate))
    n = bands.shape[0]
    if n <= lo + 1:
        return 0.0
    z = bands - bands.mean(axis=0, keepdims=True)
    sd = z.std(axis=0, keepdims=True)
    z = np.where(sd > 1e-6, z / np.maximum(sd, 1e-12), 0.0)
    frame_norm = np.sqrt((z * z).sum(axis=1))
    loud = (frames_db > _SILENT_DBFS) & (frame_norm > 1e-9)
    best = 0.0
    for lag in range(lo, min(hi, n - 1) + 1):
        a, b = z[:-lag], z[lag:]
        ok = loud[:-lag] & loud[lag:]
        if ok.sum() < max(8, 0.25 * (n - lag)):
            continue
        num = np.einsum("ij,ij->i", a[ok], b[ok])
        den = frame_norm[:-lag][ok] * frame_norm[lag:][ok]
        best = max(best, float(np.mean(num / den)))
    return best
