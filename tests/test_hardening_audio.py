"""Odd but valid files decode; genuinely broken ones are an AudioDecodeError with an honest reason.

Covers the Ogg stream whose first page has a negative start granule, a FLAC written while
streaming (``total_samples = 0``), cut-off Ogg/FLAC/WAV files, and a text file named ``.mp3``.
"""

from __future__ import annotations

import pytest
from fault_files import OGG_PREROLL, cut, negative_granule_ogg, streamed_flac, write_tone

from apex_reward.audio import decode_audio_bytes, load_audio
from apex_reward.errors import AudioDecodeError, AudioTooLongError


def test_negative_start_granule_ogg_decodes(tmp_path):
    import soundfile as sf

    path = negative_granule_ogg(tmp_path / "neg.ogg", seconds=20.0)
    announced = sf.info(str(path)).frames
    wav, sr = load_audio(path)
    assert sr == 44100 and wav.shape[0] == 1
    # the decoder's frames are kept, the header's extra pre-roll is not an error
    assert wav.shape[1] == announced - OGG_PREROLL
    wav_b, _ = decode_audio_bytes(path.read_bytes(), name="neg.ogg")
    assert wav_b.shape == wav.shape


@pytest.mark.parametrize("fraction", [0.5, 0.97])
def test_cut_off_ogg_is_a_decode_error(tmp_path, fraction):
    whole = negative_granule_ogg(tmp_path / "whole.ogg", seconds=20.0)
    part = cut(whole, tmp_path / "part.ogg", fraction)
    with pytest.raises(AudioDecodeError, match="part.ogg: cut off"):
        load_audio(part)
    with pytest.raises(AudioDecodeError, match="cut off"):
        decode_audio_bytes(part.read_bytes(), name="part.ogg")


def test_ogg_cut_at_a_page_boundary_is_a_decode_error(tmp_path):
    from fault_files import _ogg_pages

    whole = write_tone(tmp_path / "whole.ogg", 20.0, format="OGG", subtype="VORBIS")
    data = whole.read_bytes()
    offset, length = _ogg_pages(data)[-2]
    (tmp_path / "pages.ogg").write_bytes(data[: offset + length])  # no end-of-stream page
    with pytest.raises(AudioDecodeError, match="end-of-stream"):
        load_audio(tmp_path / "pages.ogg")


def test_streamed_flac_with_unknown_length_decodes(tmp_path):
    path = streamed_flac(tmp_path / "stream.flac", seconds=3.0)
    wav, sr = load_audio(path, max_duration_s=600)
    assert (sr, wav.shape) == (44100, (1, 132300))
    with pytest.raises(AudioTooLongError, match="longer than the limit of 1 s"):
        load_audio(path, max_duration_s=1.0)


def test_cut_off_flac_and_wav_are_decode_errors(tmp_path):
    flac = write_tone(tmp_path / "a.flac", 3.0)
    with pytest.raises(AudioDecodeError, match="cut.flac"):
        load_audio(cut(flac, tmp_path / "cut.flac"))
    streamed = streamed_flac(tmp_path / "s.flac", 3.0)
    with pytest.raises(AudioDecodeError, match="truncated"):
        load_audio(cut(streamed, tmp_path / "cut_stream.flac"))
    wav = write_tone(tmp_path / "a.wav", 3.0)
    with pytest.raises(AudioDecodeError, match="truncated"):
        load_audio(cut(wav, tmp_path / "cut.wav"))


def test_text_named_mp3_gets_an_honest_message(tmp_path):
    path = tmp_path / "not_audio.mp3"
    path.write_text("this is not audio\n")
    with pytest.raises(AudioDecodeError) as info:
        load_audio(path)
    message = str(info.value)
    assert "no audio found" in message
    assert "does not exist" not in message and "pipe" not in message
    with pytest.raises(AudioDecodeError, match="not_audio.mp3: not a readable audio file") as info:
        decode_audio_bytes(path.read_bytes(), name="not_audio.mp3")
    assert "does not exist" not in str(info.value)
