"""Odd and broken files for the hardening tests and ``benchmarks/faults_files.py``.

Test code, not part of the package: ``tests/`` imports it as ``fault_files``; the benchmark puts
``tests/`` on ``sys.path`` and imports it the same way. Every file is made here, from a tone, so
nothing is downloaded.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from apex_reward.containers import _ogg_crc

#: frames the crafted Ogg file's first page claims fewer than it decodes (its pre-roll)
OGG_PREROLL = 104


def tone(seconds: float = 3.0, sr: int = 44100, freq: float = 440.0) -> np.ndarray:
    """A mono sine ``[samples]`` float32 at 0.3 amplitude."""
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_tone(
    path: Path, seconds: float = 3.0, sr: int = 44100, freq: float = 440.0, **kw
) -> Path:
    """``tone`` written with soundfile (format from the suffix, or ``format=``/``subtype=``)."""
    sf.write(str(path), tone(seconds, sr, freq), sr, **kw)
    return path


def _ogg_pages(data: bytes) -> list[tuple[int, int]]:
    """``(offset, length)`` of each page of a well-formed Ogg file."""
    pages, i = [], 0
    while i < len(data):
        assert data[i : i + 4] == b"OggS", f"no Ogg page at byte {i}"
        nseg = data[i + 26]
        n = 27 + nseg + sum(data[i + 27 : i + 27 + nseg])
        pages.append((i, n))
        i += n
    return pages


def negative_granule_ogg(path: Path, seconds: float = 20.0, sr: int = 44100) -> Path:
    """An Ogg Vorbis file whose first audio page has a granule position ``OGG_PREROLL`` frames
    below what it decodes to (a negative start granule, as some encoders write), with its page
    checksum recomputed. libsndfile announces ``OGG_PREROLL`` more frames than it decodes."""
    write_tone(path, seconds, sr, format="OGG", subtype="VORBIS")
    data = bytearray(path.read_bytes())
    first_audio = next(
        (i, n) for i, n in _ogg_pages(bytes(data)) if struct.unpack_from("<q", data, i + 6)[0] > 0
    )
    i, n = first_audio
    granule = struct.unpack_from("<q", data, i + 6)[0]
    struct.pack_into("<q", data, i + 6, granule - OGG_PREROLL)
    struct.pack_into("<I", data, i + 22, 0)
    struct.pack_into("<I", data, i + 22, _ogg_crc(bytes(data[i : i + n])))
    path.write_bytes(bytes(data))
    return path


def streamed_flac(path: Path, seconds: float = 3.0, sr: int = 44100) -> Path:
    """A FLAC file whose STREAMINFO says ``total_samples = 0`` (length unknown, as a streaming
    encoder writes it)."""
    write_tone(path, seconds, sr, format="FLAC")
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0, "STREAMINFO must come first"
    # STREAMINFO starts at byte 8; total_samples is the low 36 bits of its bytes 10..17
    field = int.from_bytes(data[18:26], "big") & ~((1 << 36) - 1)
    data[18:26] = field.to_bytes(8, "big")
    path.write_bytes(bytes(data))
    return path


def cut(path: Path, out: Path, fraction: float = 0.5) -> Path:
    """The first ``fraction`` of ``path``'s bytes, written to ``out`` (a cut-off download)."""
    data = path.read_bytes()
    out.write_bytes(data[: int(len(data) * fraction)])
    return out
