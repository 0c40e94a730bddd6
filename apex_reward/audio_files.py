"""Reading audio files and in-memory audio files: :func:`load_audio` and
:func:`decode_audio_bytes` decode WAV/FLAC/Ogg Vorbis/Opus/MP3 (libsndfile via ``soundfile``) to a
float32 tensor ``[channels, samples]`` and its sample rate. A file that is missing, unreadable,
truncated (checked against what its header announces, and an Ogg stream's end), empty or longer
than a limit read from its header raises a typed error naming it; nothing is decoded past the
limit.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import torch

from .containers import UNKNOWN_FRAMES, ogg_stream_end, read_unknown_length
from .errors import AudioDecodeError, AudioError, AudioTooLongError, EmptyAudioError

__all__ = ["decode_audio_bytes", "load_audio"]


def decode_audio_bytes(
    data: bytes, *, name: str = "<bytes>", max_duration_s: float | None = None
) -> tuple[torch.Tensor, int]:
    """Decode an in-memory audio file (e.g. an HTTP upload); like :func:`load_audio`.

    Returns ``(waveform [channels, samples] float32, sample_rate)``; raises the same typed errors,
    naming ``name``.
    """
    import io

    if not data:
        raise EmptyAudioError("no audio data (0 bytes)", name)
    return _decode(io.BytesIO(data), name, max_duration_s)


def load_audio(
    path: str | Path, *, max_duration_s: float | None = None
) -> tuple[torch.Tensor, int]:
    """Decode an audio file.

    Args:
        path: WAV, FLAC, Ogg (Vorbis/Opus), MP3 or anything else libsndfile reads.
        max_duration_s: reject files longer than this *before* decoding them (from the header).

    Returns:
        ``(waveform, sample_rate)``: float32 tensor ``[channels, samples]`` in [-1, 1] for integer
        formats (float files are returned as stored), and the file's sample rate in Hz.

    Raises:
        AudioDecodeError: missing, unreadable, truncated or non-audio file.
        EmptyAudioError: the file decodes to zero samples.
        AudioTooLongError: the header says the file exceeds ``max_duration_s``.
    """
    p = Path(path)
    name = str(path)
    try:
        if not p.exists():
            raise AudioDecodeError("file not found", name)
        if p.is_dir():
            raise AudioDecodeError("is a directory, not an audio file", name)
        if p.stat().st_size == 0:
            raise EmptyAudioError("file is empty (0 bytes)", name)
        with open(p, "rb"):  # permission problems get their own message, not libsndfile's
            pass
    except OSError as e:  # permission denied, name too long, I/O error ...
        raise AudioDecodeError(f"cannot open: {e.strerror or e}", name) from e
    # bytes, not str: libsndfile gets file names that are not valid UTF-8 as they are on disk
    return _decode(os.fsencode(p), name, max_duration_s)


def _decode(source, name: str, max_duration_s: float | None) -> tuple[torch.Tensor, int]:
    import soundfile as sf

    try:
        info = sf.info(source)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioDecodeError(f"not a readable audio file ({_sf_reason(e)})", name) from e
    if info.samplerate <= 0:
        raise AudioDecodeError(f"invalid sample rate {info.samplerate}", name)
    _check_complete(info.extra_info, name)
    unknown_length = info.frames >= UNKNOWN_FRAMES  # e.g. a FLAC written while streaming
    if max_duration_s is not None and 0 < info.frames and not unknown_length:
        duration = info.frames / info.samplerate
        if duration > max_duration_s:
            raise AudioTooLongError(
                f"audio is {duration:.1f} s long; the limit is {max_duration_s:g} s", name
            )
    is_ogg = info.format == "OGG"
    if is_ogg:  # libsndfile decodes a cut-off Ogg file silently: check the stream's end
        problem = ogg_stream_end(source)
        if problem is not None:
            raise AudioDecodeError(problem, name)
    if hasattr(source, "seek"):
        source.seek(0)
    try:
        if unknown_length:
            data, sr = _read_unknown_length(source, name, max_duration_s)
        else:
            data, sr = sf.read(source, dtype="float32", always_2d=True)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise AudioDecodeError(
            f"decoding failed, file may be truncated ({_sf_reason(e)})", name
        ) from e
    # an Ogg stream that ends properly was decoded whole: fewer frames than its granule positions
    # announce is the trimmed pre-roll of a negative start granule, not a cut
    if not unknown_length and not is_ogg and 0 < info.frames and data.shape[0] < info.frames:
        raise AudioDecodeError(
            f"truncated: decoded {data.shape[0]} of {info.frames} frames announced by the header",
            name,
        )
    if data.size == 0:
        raise EmptyAudioError("audio has no samples", name)
    # [T, C] -> [C, T] as a view: no copy of what can be a large decode
    return torch.from_numpy(data).T, int(sr)


def _read_unknown_length(source, name: str, max_duration_s: float | None) -> tuple[np.ndarray, int]:
    """Decode a file whose header gives no length, refusing it past ``max_duration_s``."""
    import soundfile as sf

    with sf.SoundFile(source) as f:
        sr = f.samplerate
        limit = None if max_duration_s is None else int(math.ceil(max_duration_s * sr))
        data, error, too_long = read_unknown_length(f, limit)
    if too_long:
        raise AudioTooLongError(
            f"audio is longer than the limit of {max_duration_s:g} s (its header gives no "
            "length; decoding stopped at the limit)",
            name,
        )
    if error is not None:
        raise AudioDecodeError(
            f"decoding failed, file may be truncated ({error.rstrip('.')})", name
        )
    return data, sr


#: libsndfile's note on a container whose audio chunk is shorter than its header says, e.g.
#: ``data : 640000 (should be 213304)`` (WAV) or ``SSND : 640008 (should be 213305)`` (AIFF).
_SHORT_CHUNK = re.compile(r"^\s*(data|SSND)\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
#: Chunk sizes that streaming writers put in a header they cannot rewrite (size unknown).
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0x7FFFFFFF}


def _check_complete(extra_info: str, name: str) -> None:
    """Raise if the header announces more audio data than the file holds (a cut-off download).

    libsndfile silently decodes what is there; its header dump says what was announced.
    Placeholder sizes of streamed files and a padding byte are not truncation.
    """
    m = _SHORT_CHUNK.search(extra_info or "")
    if m is None:
        return
    announced, present = int(m.group(2)), int(m.group(3))
    if announced not in _UNKNOWN_SIZES and present + 8 < announced:
        raise AudioDecodeError(
            f"truncated: the header announces {announced} bytes of audio, the file holds "
            f"{present} ({100 * present / announced:.0f} %)",
            name,
        )


#: libsndfile's error code whose text blames a missing file or a pipe; it also comes back when a
#: decoder (mpg123 for a ``.mp3`` name) finds no audio in a file that exists.
_SF_ERR_NOT_FOUND = 7


def _sf_reason(e: Exception) -> str:
    if getattr(e, "code", None) == _SF_ERR_NOT_FOUND:  # callers have checked the file exists
        return "no audio found: the contents are not in any format libsndfile decodes"
    msg = str(e).strip()
    # libsndfile messages start with the path; keep the reason only
    if "Error :" in msg:
        msg = msg.split("Error :", 1)[1].strip()
    elif ": " in msg and msg.startswith("Error opening"):
        msg = msg.rsplit(": ", 1)[-1]
    return msg or type(e).__name__
