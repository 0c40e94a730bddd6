"""Turning what a request carries into a checked waveform: base64, server-side paths, decoding.

:class:`ClipDecoder` holds the server's input policy: accepted sample rates, the channel and
length limits (checked from the file header by :meth:`ClipDecoder.probe` before any audio is
decoded; the decoded-size budget of :mod:`.limits` is charged from the same header), and the
directory requests may name files in (``--allow-dir``; paths never resolve outside it, symlinks
included). Its methods block (run them on the decode pool); they raise typed errors: an
:class:`~apex_reward.errors.AudioError` for audio that cannot be scored, a
:class:`~apex_reward.integrations.serving.errors.RequestError` for a refused reference.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from apex_reward.audio import as_waveform_list, decode_audio_bytes, load_audio
from apex_reward.errors import (
    AudioDecodeError,
    AudioShapeError,
    AudioTooLongError,
    ConfigError,
    EmptyAudioError,
    UnsupportedSampleRateError,
)

from .config import ServeConfig
from .errors import InvalidBase64, InvalidRequest, PathNotAllowed
from .limits import ClipHeader

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

    from .schemas import ClipRef

__all__ = ["ClipDecoder", "Source", "PCM_ENCODINGS", "is_utf8"]

#: Where a clip's audio comes from: the bytes of a whole file, or a file under ``--allow-dir``.
Source = bytes | Path

#: Raw PCM sample encodings the server reads (:meth:`ClipDecoder.decode_pcm`), as numpy dtypes:
#: little-endian 32-bit float and 16-bit signed integer, channels interleaved.
PCM_ENCODINGS: dict[str, str] = {"f32le": "<f4", "s16le": "<i2"}


def is_utf8(text: str) -> bool:
    """False for strings JSON lets through that cannot be encoded (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ClipDecoder:
    """Decodes and checks clips under the server's limits.

    Args:
        model: the served model (its front end's limits and checks apply too).
        config: the server options (sample rates, channels, length, ``--allow-dir``).

    Raises:
        ConfigError: ``--allow-dir`` is not a directory.
    """

    def __init__(self, model: ApexRewardModel, config: ServeConfig) -> None:
        self.model = model
        self.max_channels = int(config.max_channels)
        self.max_audio_s = min(
            float(config.max_audio_s), float(model.config.frontend.max_duration_s)
        )
        self.sample_rates = frozenset(int(r) for r in config.sample_rates)
        self.allow_dir: Path | None = None
        if config.allow_dir is not None:
            d = Path(config.allow_dir).expanduser()
            if not d.is_dir():
                raise ConfigError(f"serve: --allow-dir {config.allow_dir!r} is not a directory")
            self.allow_dir = d.resolve()

    # -- checks -----------------------------------------------------------------------------------

    def precheck(self, sample_rate: int, channels: int, frames: int, name: str) -> None:
        """Refuse a clip from its header: rate not accepted, too many channels, too long."""
        if sample_rate not in self.sample_rates:
            raise UnsupportedSampleRateError(
                f"sample rate {sample_rate} Hz is not accepted; the server takes "
                f"{sorted(self.sample_rates)}",
                name,
            )
        if channels > self.max_channels:
            raise AudioShapeError(
                f"{channels} channels; the server accepts at most {self.max_channels}", name
            )
        if frames > 0 and frames / sample_rate > self.max_audio_s:
            raise AudioTooLongError(
                f"audio is {frames / sample_rate:.1f} s long; the limit is {self.max_audio_s:g} s",
                name,
            )

    def check(self, wav: torch.Tensor, sample_rate: int, name: str) -> None:
        """The limits again on the decoded samples, then the model's own input checks."""
        channels = wav.shape[0] if wav.ndim == 2 else 1
        self.precheck(sample_rate, channels, wav.shape[-1], name)
        as_waveform_list([wav])  # shape checks of the model's input path
        self.model.frontend.check(wav, sample_rate, name)

    # -- decoding ---------------------------------------------------------------------------------

    def probe(self, source: Source, name: str) -> ClipHeader:
        """Read a clip's header and refuse it on rate, channels or length (blocking, cheap: no
        audio is decoded).

        Returns:
            the :class:`~.limits.ClipHeader` (``frames <= 0`` when the header does not say).

        Raises:
            AudioError: a typed error naming the clip and the problem (not a readable audio
                file, a refused rate, too many channels, too long).
        """
        import soundfile as sf

        if isinstance(source, (bytes, bytearray)):
            if not source:
                raise EmptyAudioError("no audio data (0 bytes)", name)
            opened: object = io.BytesIO(source)
        else:
            opened = source
        try:
            info = sf.info(opened if not isinstance(opened, Path) else str(opened))
        except Exception:
            info = None
        if info is None or info.samplerate <= 0:
            # the decoder names the problem (missing file, not audio ...) and fails before it
            # decodes anything: it reads the same header first
            self._decode_unchecked(source, name)
            raise AudioDecodeError("not a readable audio file", name)
        header = ClipHeader(int(info.samplerate), int(info.channels), int(info.frames))
        self.precheck(
            header.sample_rate, header.channels, header.frames if header.known else 0, name
        )
        return header

    def _decode_unchecked(
        self, source: Source, name: str, max_s: float | None = None
    ) -> tuple[torch.Tensor, int]:
        limit = self.max_audio_s if max_s is None else min(max_s, self.max_audio_s)
        if isinstance(source, (bytes, bytearray)):
            return decode_audio_bytes(source, name=name, max_duration_s=limit)
        return load_audio(source, max_duration_s=limit)

    def decode(
        self, source: Source, name: str, header: ClipHeader | None = None, max_frames: int = 0
    ) -> tuple[torch.Tensor, int]:
        """Decode and check one clip (blocking; run it on the decode pool).

        Args:
            source: the file's bytes or an allowed path.
            name: how errors name the clip.
            header: its :meth:`probe` result (read here when None).
            max_frames: when the header does not give the length, the clip is refused past
                this many frames (as a duration limit on the decoder; 0: no extra limit).

        Returns:
            ``(waveform [C, T] float32, sample_rate)``.

        Raises:
            AudioError: a typed error naming the clip and the problem.
        """
        if header is None:
            header = self.probe(source, name)
        cap = None
        if not header.known and max_frames > 0:
            cap = max_frames / header.sample_rate
        wav, sr = self._decode_unchecked(source, name, cap)
        self.check(wav, sr, name)
        return wav, sr

    def decode_pcm(
        self,
        data: bytes,
        *,
        encoding: str,
        sample_rate: int,
        channels: int,
        name: str,
        num_samples: int | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Read and check raw PCM samples: no container, no header (blocking, but cheap).

        Args:
            data: the samples, channels interleaved (frame after frame).
            encoding: a key of :data:`PCM_ENCODINGS` (``"f32le"`` or ``"s16le"``; 16-bit
                integers are scaled by 1/32768).
            sample_rate: Hz.
            channels: interleaved channels.
            name: how errors name the clip.
            num_samples: when given, the frames the sender says it sent; must match the data.

        Returns:
            ``(waveform [C, T] float32, sample_rate)``.

        Raises:
            AudioError: empty data, a length that is not a whole number of frames or not
                ``num_samples``, a rate or channel count the server does not accept, too long,
                non-finite samples, too short for the model.
        """
        dtype = PCM_ENCODINGS.get(encoding)
        if dtype is None:
            raise AudioDecodeError(
                f"PCM encoding {encoding!r} is not supported; use one of {sorted(PCM_ENCODINGS)}",
                name,
            )
        if not data:
            raise EmptyAudioError("no audio data (0 bytes)", name)
        if channels < 1:
            raise AudioShapeError(f"channels must be >= 1, got {channels}", name)
        frame = np.dtype(dtype).itemsize * channels
        if len(data) % frame:
            raise AudioShapeError(
                f"{len(data)} bytes is not a whole number of {encoding} frames of {channels} "
                f"channel(s) ({frame} bytes each)",
                name,
            )
        frames = len(data) // frame
        if num_samples is not None and num_samples != frames:
            raise AudioShapeError(
                f"num_samples is {num_samples} but the data holds {frames} samples", name
            )
        self.precheck(sample_rate, channels, frames, name)
        samples = np.frombuffer(data, dtype=dtype)
        if encoding == "s16le":
            samples = samples.astype(np.float32) * np.float32(1.0 / 32768.0)
        else:
            samples = samples.astype(np.float32)  # native order, and a writable copy
        wav = torch.from_numpy(samples.reshape(frames, channels).T)
        self.check(wav, sample_rate, name)
        return wav, sample_rate

    # -- references -------------------------------------------------------------------------------

    def resolve_path(self, raw: str, name: str) -> Path:
        """A path a request names, if it lies inside ``--allow-dir``.

        Raises:
            PathNotAllowed: paths are off, or the path resolves outside the directory.
            InvalidRequest: an empty or unusable path.
        """
        if self.allow_dir is None:
            raise PathNotAllowed(
                f"{name}: server-side paths are disabled on this server (start it with "
                "--allow-dir DIR), upload the audio instead"
            )
        if not raw or "\x00" in raw or not is_utf8(raw):
            raise InvalidRequest(f"{name}: 'path' must be a non-empty string")
        p = Path(raw)
        try:
            candidate = (p if p.is_absolute() else self.allow_dir / p).resolve()
        except OSError as e:  # name too long, symlink loop ...
            raise InvalidRequest(f"{name}: bad path ({e.strerror})") from None
        if not candidate.is_relative_to(self.allow_dir):
            raise PathNotAllowed(
                f"{name}: path {raw!r} is outside the directory this server allows"
            )
        return candidate

    @staticmethod
    def b64decode(value: str, name: str) -> bytes:
        """Strict standard base64 (a ``data:...;base64,`` prefix and whitespace are allowed).

        Raises:
            InvalidBase64: not a string, not base64, or a data URI that is not ``;base64,``.
        """
        if not isinstance(value, str):
            raise InvalidBase64(f"{name}: 'base64' must be a string")
        if value.startswith("data:"):
            head, sep, value = value.partition(",")
            if not sep or not head.endswith(";base64"):
                raise InvalidBase64(f"{name}: data URI is not ';base64,'")
        if any(c.isspace() for c in value[:64]) or any(c.isspace() for c in value[-64:]):
            value = "".join(value.split())
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise InvalidBase64(f"{name}: invalid base64 ({e})") from None

    def source_of(self, clip: ClipRef, name: str) -> Source:
        """The audio a validated JSON clip names: decoded base64 bytes or an allowed path."""
        if clip.base64 is not None:
            return self.b64decode(clip.base64, name)
        return self.resolve_path(clip.path or "", name)
