"""A decoder for the plain-verl path of tests/test_verl.py, importable as
``verl_text_decoder:decode`` (tests/ is on ``sys.path`` under pytest)."""

from __future__ import annotations

import numpy as np
from conftest import synth_music

SR = 16000


def decode(text: str) -> tuple[np.ndarray, int]:
    """``"song <seed> [<seconds>]"`` -> ``(waveform [T], 16000)``; anything else raises."""
    parts = text.split()
    if len(parts) < 2 or parts[0] != "song":
        raise ValueError(f"not a song: {text!r}")
    seconds = float(parts[2]) if len(parts) > 2 else 1.5
    return synth_music(seconds, SR, seed=int(parts[1]))[0].astype(np.float32), SR
