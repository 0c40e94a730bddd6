"""The audit's inputs: reference clips and the static probes built from nothing or from them.

Every probe is a mono float32 waveform ``[T]`` at :data:`PROBE_RATE` (24 kHz). Two groups:

* **non-music probes** (``counts=True``: the exit status depends on them): digital silence,
  white noise at -80 dBFS, white and pink noise at -15 dBFS, sines at 220/440/1000 Hz, a clipped
  110 Hz square, DC 0.5, and 2 s loops of reference clips repeated to the probe length. None of
  them is music a generator should be rewarded for; a guard should flag each one.
* **transforms of reference clips** (``counts=False``: reported, with the change against the
  clean clip): reversal, a gain ladder, an SNR ladder (white noise), low-pass 4/2 kHz, 8-bit
  quantisation, 1 s of leading/trailing silence. These are still the music; what matters is
  whether the reward moves the right way (a degradation should not raise it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from apex_reward.errors import ApexError, ConfigError
from apex_reward.inputs import AUDIO_SUFFIXES

__all__ = [
    "AUDIO_SUFFIXES",
    "GAIN_LADDER_DB",
    "NOISE_RMS",
    "PROBE_RATE",
    "SNR_LADDER_DB",
    "Clip",
    "Probe",
    "clip_probes",
    "load_reference_clips",
    "reference_files",
    "signal_probes",
    "synthetic_reference_clips",
    "to_probe_rate",
]

logger = logging.getLogger(__name__)

#: Sample rate (Hz) of every probe.
PROBE_RATE = 24_000
#: Gain ladder (dB) applied to one reference clip (0 dB is the clean clip).
GAIN_LADDER_DB: tuple[float, ...] = (-40.0, -30.0, -20.0, -10.0, -6.0, 0.0, 6.0)
#: SNR ladder (dB): white noise added to each probe clip, from mild to strong.
SNR_LADDER_DB: tuple[float, ...] = (30.0, 20.0, 10.0, 0.0)
#: Low-pass cutoffs (Hz).
LOWPASS_HZ: tuple[float, ...] = (4000.0, 2000.0)
#: RMS of the noise probes and of the attack's noise start (-15 dBFS).
NOISE_RMS = 10.0 ** (-15.0 / 20.0)
_NEAR_SILENCE_RMS = 10.0 ** (-80.0 / 20.0)  # -80 dBFS


@dataclass
class Clip:
    """A reference clip.

    Attributes:
        name: short name (the file name, or ``synthetic_03``).
        waveform: ``[C, T]`` float32 as decoded (cut to the maximum length).
        sample_rate: Hz.
        source: the file path, or ``"synthetic"``.
        cut_from_s: the original duration in seconds when the clip was cut, else None.
    """

    name: str
    waveform: torch.Tensor
    sample_rate: int
    source: str
    cut_from_s: float | None = None

    @property
    def duration_s(self) -> float:
        return self.waveform.shape[-1] / self.sample_rate


@dataclass
class Probe:
    """A static probe.

    Attributes:
        name: unique name, e.g. ``sine_440hz`` or ``snr_10db[p01.wav]``.
        kind: ``signal``, ``loop``, ``clean``, ``reversed``, ``gain``, ``snr``, ``lowpass``,
            ``quantize_8bit``, ``pad_lead`` or ``pad_trail``.
        waveform: ``[T]`` float32 at :data:`PROBE_RATE`.
        counts: a non-music probe: an unflagged one above the reference median fails the audit.
        source: the reference clip it was made from, else None.
        param: the ladder value (dB gain, dB SNR, cutoff Hz), else None.
    """

    name: str
    kind: str
    waveform: torch.Tensor
    counts: bool
    source: str | None = None
    param: float | None = None


# ----------------------------------------------------------------------------------------------
# reference clips


def reference_files(entries: Sequence[str]) -> list[tuple[Path, bool]]:
    """``(path, named)`` of every audio file: named files as given, directories' audio files
    (recursively, sorted). Raises :class:`ConfigError` for a missing path or an empty directory."""
    files: list[tuple[Path, bool]] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.is_file() and q.suffix.lower() in AUDIO_SUFFIXES
            )
            if not found:
                raise ConfigError(
                    f"--reference {entry}: no audio files ({', '.join(AUDIO_SUFFIXES)}) in "
                    "this directory"
                )
            files.extend((q, False) for q in found)
        elif p.is_file():
            files.append((p, True))
        else:
            raise ConfigError(f"--reference {entry}: no such file or directory")
    return files


def load_reference_clips(
    entries: Sequence[str], *, max_seconds: float, min_seconds: float = 1.0
) -> tuple[list[Clip], list[dict[str, str]]]:
    """Decode the reference audio named by ``entries`` (files and/or directories).

    Clips longer than ``max_seconds`` are cut to their first ``max_seconds``. A file named
    explicitly must decode; in a directory, files that fail (or are shorter than
    ``min_seconds``) are skipped and reported.

    Returns:
        ``(clips, skipped)`` with ``skipped`` = ``[{"path", "error"}]``.

    Raises:
        ConfigError: a missing path, a directory without audio, a named file that does not
            decode, or no usable clip at all.
    """
    from apex_reward.audio import load_audio

    clips: list[Clip] = []
    skipped: list[dict[str, str]] = []
    names: set[str] = set()
    for path, named in reference_files(entries):
        try:
            wav, sr = load_audio(path)
            if wav.shape[-1] < min_seconds * sr:
                raise ConfigError(f"shorter than {min_seconds:g} s")
            if not torch.isfinite(wav).all():
                raise ConfigError("contains NaN or infinite samples")
        except ApexError as e:
            reason = getattr(e, "reason", None) or str(e)
            if named:
                raise ConfigError(f"--reference {path}: cannot use it: {reason}") from e
            logger.warning("reference %s skipped: %s", path, reason)
            skipped.append({"path": str(path), "error": reason})
            continue
        limit = int(round(max_seconds * sr))
        cut = wav.shape[-1] / sr if wav.shape[-1] > limit else None
        name = path.name if path.name not in names else str(path)
        names.add(name)
        clips.append(Clip(name, wav[..., :limit].contiguous(), int(sr), str(path), cut))
    if not clips:
        raise ConfigError(
            f"--reference {' '.join(entries)}: no usable audio ({len(skipped)} file(s) failed)"
        )
    return clips, skipped


def synthetic_reference_clips(count: int, *, seed: int) -> list[Clip]:
    """``count`` clean procedural songs (:func:`apex_reward.training.synthetic.render_song`,
    10–15 s at 24 kHz), for an audit without ``--reference``."""
    from ..synthetic import QUALITY_PARAMS, render_song

    rng = np.random.default_rng(seed)
    clean = {p: 0.0 for p in QUALITY_PARAMS}
    clips = []
    for i in range(count):
        seconds = float(rng.uniform(10.0, 15.0))
        audio = render_song(clean, seconds, PROBE_RATE, rng).astype(np.float32)
        clips.append(
            Clip(f"synthetic_{i:02d}", torch.from_numpy(audio)[None], PROBE_RATE, "synthetic")
        )
    return clips


def to_probe_rate(clip: Clip) -> torch.Tensor:
    """The clip as a mono ``[T]`` float32 waveform at :data:`PROBE_RATE` (channel mean, the
    front end's julius resampler)."""
    from apex_reward.audio import AudioFrontEnd
    from apex_reward.config import FrontendConfig

    mono = clip.waveform.to(torch.float32).mean(dim=0)
    if clip.sample_rate == PROBE_RATE:
        return mono.contiguous()
    with torch.no_grad():
        fe = AudioFrontEnd(FrontendConfig(sample_rate=PROBE_RATE))
        return fe.resample(mono, clip.sample_rate).contiguous()


# ----------------------------------------------------------------------------------------------
# probes


def _pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """Pink (1/f power) noise ``[n]``, zero mean, unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1.0 / PROBE_RATE)
    spectrum[1:] /= np.sqrt(f[1:])
    spectrum[0] = 0.0
    x = np.fft.irfft(spectrum, n)
    return x / np.sqrt(np.mean(x * x))


def signal_probes(seconds: float, *, seed: int) -> list[Probe]:
    """The synthetic non-music probes, ``seconds`` long at :data:`PROBE_RATE`."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * PROBE_RATE))
    t = np.arange(n) / PROBE_RATE
    waves: dict[str, np.ndarray] = {
        "digital_silence": np.zeros(n),
        "near_silence_-80dBFS": _NEAR_SILENCE_RMS * rng.standard_normal(n),
        "white_noise_-15dBFS": NOISE_RMS * rng.standard_normal(n),
        "pink_noise_-15dBFS": NOISE_RMS * _pink_noise(n, rng),
    }
    for hz in (220, 440, 1000):
        waves[f"sine_{hz}hz"] = 0.5 * np.sin(2 * np.pi * hz * t)
    waves["clipped_square_110hz"] = 0.9 * np.clip(8.0 * np.sin(2 * np.pi * 110 * t), -1.0, 1.0)
    waves["dc_0.5"] = np.full(n, 0.5)
    return [
        Probe(name, "signal", torch.from_numpy(w.astype(np.float32)), counts=True)
        for name, w in waves.items()
    ]


def _lowpass(x: torch.Tensor, cutoff_hz: float) -> torch.Tensor:
    import julius

    with torch.no_grad():
        return julius.lowpass_filter(x, cutoff_hz / PROBE_RATE)


def clip_probes(
    clips: Sequence[tuple[str, torch.Tensor]],
    *,
    probe_seconds: float,
    loop_seconds: float,
    seed: int,
) -> list[Probe]:
    """Probes made from reference clips (mono ``[T]`` at :data:`PROBE_RATE`, with names).

    Per clip: the clean clip (``clean``, the baseline of the ladders), its first
    ``loop_seconds`` repeated to ``probe_seconds`` (``loop``, counts), the reversed clip, the
    SNR ladder (:data:`SNR_LADDER_DB`, white noise scaled to the clip's RMS; not clipped),
    low-pass at :data:`LOWPASS_HZ`, 8-bit quantisation (``round(x * 127) / 127``), and 1 s of
    digital silence before / after. The gain ladder (:data:`GAIN_LADDER_DB`, hard-clipped to
    ±1 as a PCM file would store it) is built from the first clip only.
    """
    rng = np.random.default_rng(seed + 1)
    probes: list[Probe] = []
    pad = torch.zeros(PROBE_RATE)
    n_probe = int(round(probe_seconds * PROBE_RATE))
    for index, (name, x) in enumerate(clips):
        x = x.to(torch.float32)
        made: list[tuple[str, str, torch.Tensor, float | None]] = [("clean", "clean", x, None)]
        excerpt = x[: int(round(loop_seconds * PROBE_RATE))]
        reps = -(-n_probe // excerpt.shape[0])
        made.append(
            ("loop", f"loop_{loop_seconds:g}s", excerpt.repeat(reps)[:n_probe], loop_seconds)
        )
        made.append(("reversed", "reversed", x.flip(0), None))
        if index == 0:
            for db in GAIN_LADDER_DB:
                if db != 0.0:
                    gained = (x * 10.0 ** (db / 20.0)).clamp(-1.0, 1.0)
                    made.append(("gain", f"gain_{db:+g}dB", gained, db))
        rms = float(x.double().pow(2).mean().sqrt())
        noise = torch.from_numpy(rng.standard_normal(x.shape[0]).astype(np.float32))
        for snr in SNR_LADDER_DB:
            noisy = x + noise * (rms / 10.0 ** (snr / 20.0))
            made.append(("snr", f"snr_{snr:g}dB", noisy, snr))
        for hz in LOWPASS_HZ:
            made.append(("lowpass", f"lowpass_{hz / 1000:g}kHz", _lowpass(x, hz), hz))
        quantized = torch.round(x.clamp(-1.0, 1.0) * 127.0) / 127.0
        made.append(("quantize_8bit", "quantize_8bit", quantized, None))
        made.append(("pad_lead", "pad_lead_1s", torch.cat([pad, x]), 1.0))
        made.append(("pad_trail", "pad_trail_1s", torch.cat([x, pad]), 1.0))
        probes.extend(
            Probe(f"{label}[{name}]", kind, w.contiguous(), kind == "loop", name, param)
            for kind, label, w, param in made
        )
    return probes
