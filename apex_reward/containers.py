"""Container-level checks that libsndfile does not make, used by :mod:`apex_reward.audio`.

* :func:`ogg_stream_end`: whether an Ogg file ends with a complete end-of-stream page. libsndfile
  decodes a cut-off Ogg file without complaint (it stops at the last complete page and reports
  that page's granule position as the length), and it announces more frames than it decodes for
  a valid stream whose first page has a negative start granule (the encoder's pre-roll is
  trimmed when decoding). The decoder's output is trusted exactly when the stream ends properly.
* :func:`read_unknown_length`: decode a file whose header does not say how long it is (a FLAC
  written while streaming has ``total_samples = 0``), block by block, up to a frame limit.
"""

from __future__ import annotations

import io
import os
import struct
from typing import Any

import numpy as np

__all__ = ["UNKNOWN_FRAMES", "ogg_stream_end", "read_unknown_length"]

#: libsndfile reports ``SF_COUNT_MAX`` (2^63 - 1) frames for a stream of unknown length; any count
#: this large cannot be a real file.
UNKNOWN_FRAMES = 1 << 62

#: Largest Ogg page: 27-byte header + 255 lacing values + 255 segments of 255 bytes.
_MAX_OGG_PAGE = 27 + 255 + 255 * 255
_EOS_FLAG = 0x04


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        r = i << 24
        for _ in range(8):
            r = ((r << 1) ^ 0x04C11DB7) if r & 0x80000000 else (r << 1)
        table.append(r & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def _ogg_crc(page: bytes) -> int:
    """Ogg's page checksum (CRC-32, polynomial 0x04C11DB7, not reflected, initial value 0)."""
    crc = 0
    table = _CRC_TABLE
    for byte in page:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ table[((crc >> 24) & 0xFF) ^ byte]
    return crc


def _tail(source: Any, size: int) -> bytes:
    """The last ``size`` bytes of a path (``str``/``bytes``) or a seekable binary stream."""
    if isinstance(source, (str, bytes, os.PathLike)):
        with open(source, "rb") as f:
            f.seek(0, io.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read()
    pos = source.tell()
    try:
        source.seek(0, io.SEEK_END)
        source.seek(max(0, source.tell() - size))
        return source.read()
    finally:
        source.seek(pos)


def ogg_stream_end(source: Any) -> str | None:
    """None when the Ogg file ``source`` (path or seekable binary stream) ends with a complete,
    checksum-valid page flagged end-of-stream; otherwise why not (a sentence for an error)."""
    tail = _tail(source, 2 * _MAX_OGG_PAGE)
    end = len(tail)
    p = tail.rfind(b"OggS")
    while p >= 0:
        if end - p >= 27:
            nseg = tail[p + 26]
            lacing = tail[p + 27 : p + 27 + nseg]
            length = 27 + nseg + sum(lacing)
            if len(lacing) == nseg and p + length == end:
                page = bytearray(tail[p:end])
                (stored,) = struct.unpack_from("<I", page, 22)
                struct.pack_into("<I", page, 22, 0)
                if _ogg_crc(bytes(page)) == stored:
                    if tail[p + 5] & _EOS_FLAG:
                        return None
                    return "cut off: the Ogg stream ends without its end-of-stream page"
        p = tail.rfind(b"OggS", 0, p)
    return "cut off: the last Ogg page is incomplete"


def read_unknown_length(sound_file: Any, max_frames: int | None, block: int = 1 << 18):
    """Decode an open ``soundfile.SoundFile`` whose length is unknown, block by block.

    Reads through libsndfile's C call directly: ``SoundFile.read`` seeks to its computed position
    after each block, which fails for a stream whose length libsndfile does not know.

    Returns:
        ``(data, error, too_long)``: float32 ``[frames, channels]``; libsndfile's error string
        when decoding stopped on an error (a cut-off file), else None; True when more than
        ``max_frames`` frames were found (decoding stops there).
    """
    import soundfile as sf

    channels = sound_file.channels
    chunks: list[np.ndarray] = []
    total = 0
    while True:
        buf = np.empty((block, channels), dtype=np.float32)
        n = int(
            sf._snd.sf_readf_float(
                sound_file._file, sf._ffi.cast("float *", buf.ctypes.data), block
            )
        )
        if n > 0:
            chunks.append(buf[:n])
            total += n
        if max_frames is not None and total > max_frames:
            return np.zeros((0, channels), np.float32), None, True
        if n < block:
            break
    code = sf._snd.sf_error(sound_file._file)
    error = (
        sf._ffi.string(sf._snd.sf_error_number(code)).decode("utf-8", "replace") if code else None
    )
    data = np.concatenate(chunks) if chunks else np.zeros((0, channels), np.float32)
    return data, error, False
