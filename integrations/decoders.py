"""User decoders: ``"module:function"`` plugins that turn a generator's response into audio.

A text or codec-token policy emits a response (text, or the text of its codec tokens); the
reward needs audio. Every integration that takes a decoder by name (verl's ``reward_kwargs``,
``apex-reward serve --decoder``, the OpenRLHF reward-function file) resolves and runs it here:

* :func:`import_decoder`: ``"package.module:function"`` -> the callable (any importable callable,
  e.g. a module-level function or an instance with ``__call__``);
* :func:`decode_response`: run it on one response and check what it returned.

A decoder takes the response (one ``str``) and returns ``(waveform, sample_rate)`` (``waveform``
a float array or tensor ``[T]`` or ``[C, T]``, ``sample_rate`` an int in Hz), a bare waveform when
the caller knows the rate, or the path of an audio file it wrote. It raises on a response that is
not music; the caller turns that into a typed error for that one sample.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apex_reward.audio import load_audio
from apex_reward.errors import ApexError, AudioDecodeError, ConfigError

__all__ = ["as_audio", "check_target", "import_decoder", "decode_response"]


def as_audio(obj: Any, sample_rate: int | None, where: str) -> Any:
    """Decoder output / raw completion -> what ``model.score`` accepts (a path or (wave, sr)):
    the output contract of every decoder (TRL reward functions, verl, OpenRLHF, the server)."""
    if obj is None:
        raise AudioDecodeError("the decoder returned None", where)
    if isinstance(obj, (str, Path)):
        return str(obj)
    if isinstance(obj, tuple) and len(obj) == 2 and not isinstance(obj[0], (str, Path)):
        wav, sr = obj
        if isinstance(sr, bool) or not isinstance(sr, (int, np.integer)):
            raise AudioDecodeError(
                f"expected (waveform, sample_rate) with an integer rate, got rate {sr!r}", where
            )
        return (_as_waveform(wav, where), int(sr))
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        if sample_rate is None:
            raise AudioDecodeError(
                "got a bare waveform; return (waveform, sample_rate) from the decoder or pass "
                "sample_rate= to the reward function",
                where,
            )
        return (_as_waveform(obj, where), int(sample_rate))
    raise AudioDecodeError(
        f"cannot use {type(obj).__name__} as audio; expected a path, (waveform, sample_rate) "
        "or a waveform",
        where,
    )


def _as_waveform(wav: Any, where: str) -> torch.Tensor:
    if isinstance(wav, np.ndarray):
        wav = torch.from_numpy(np.ascontiguousarray(wav))
    if not isinstance(wav, torch.Tensor):
        raise AudioDecodeError(
            f"waveform must be a tensor or array, got {type(wav).__name__}", where
        )
    # rewards never need gradients; keep the caller's graph (and device memory) out of scoring
    return wav.detach().to("cpu")


def check_target(target: Any, what: str = "decoder") -> str:
    """``target`` if it looks like ``"module:function"``.

    Raises:
        ConfigError: it is not a string with a module and an attribute around one ``:``.
    """
    module, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not sep or not module or not attr:
        raise ConfigError(f"{what}: expected 'module:function', got {target!r}")
    return target


@lru_cache(maxsize=32)
def import_decoder(target: str) -> Callable[[Any], Any]:
    """``"package.module:function"`` -> the function (imported once per process).

    Raises:
        ConfigError: a malformed name, a module or attribute that cannot be imported, or an
            attribute that is not callable.
    """
    module_name, _, attr = check_target(target).partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"decoder {target!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise ConfigError(f"decoder {target!r} is not callable")
    return fn


def decode_response(
    target: str, response: Any, *, sample_rate: int | None = None, where: str = "response"
) -> tuple[torch.Tensor, int]:
    """Run decoder ``target`` on one response and return its audio.

    Args:
        target: ``"module:function"`` (:func:`import_decoder`).
        response: what the framework hands over for one sample (response text, usually).
        sample_rate: Hz of a bare waveform the decoder returns (None: it must return a rate).
        where: names the sample in error messages.

    Returns:
        ``(waveform [T] or [C, T] float, CPU, sample_rate in Hz)``; a path the decoder returned
        is loaded (``[C, T]``).

    Raises:
        ConfigError: the decoder cannot be imported.
        AudioDecodeError: the decoder raised, or returned something that is not audio.
        AudioError: a returned file that cannot be read.
    """
    decoder = import_decoder(target)
    try:
        decoded = decoder(response)
    except ApexError:
        raise
    except Exception as e:
        raise AudioDecodeError(f"the decoder raised {type(e).__name__}: {e}", where) from e
    audio = as_audio(decoded, sample_rate, where)
    if isinstance(audio, str):
        return load_audio(Path(audio))
    wav, sr = audio
    return wav.to(torch.float32), sr
