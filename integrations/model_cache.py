"""One loaded model per checkpoint and process, shared by every reward adapter.

TRL reward functions, verl's reward function and OpenRLHF's remote reward are all built from a
checkpoint *path* (so that they pickle and travel to worker processes); the first call in a
process loads the model and later calls, from any adapter with the same options, reuse it. A
checkpoint rewritten in place (its weights checksum changed) is loaded again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from dataclasses import astuple
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from apex_reward.checkpoint import CONFIG_NAME, WEIGHTS_DIGEST_KEY, split_digests
from apex_reward.loading import ModelOptions, load_model

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

__all__ = ["clear_model_cache", "load_cached_model"]

_CACHE: dict[tuple, tuple[ApexRewardModel, threading.Lock]] = {}
_CACHE_LOCK = threading.Lock()


def _checkpoint_key(path: str | Path) -> tuple[str, str | None]:
    """``(resolved path, weights checksum)``: a checkpoint rewritten in place is a new model."""
    p = Path(path).expanduser()
    if not p.exists():
        return str(path), None
    try:
        _, digests = split_digests(json.loads((p / CONFIG_NAME).read_text()))
    except (OSError, ValueError, AttributeError):
        return str(p.resolve()), None
    return str(p.resolve()), digests.get(WEIGHTS_DIGEST_KEY)


def load_cached_model(options: ModelOptions) -> tuple[ApexRewardModel, threading.Lock]:
    """The model ``options`` names, loaded once per process (:func:`~apex_reward.load_model`)
    and then reused.

    Without a device, a process uses its current CUDA device (under accelerate/torchrun each
    process has already selected its own GPU), else the CPU. Returns ``(model, lock)``: the model
    is frozen and in eval mode; hold ``lock`` while running it from several threads (the async
    reward function does).
    """
    if options.device is None and torch.cuda.is_available():
        options = dataclasses.replace(options, device=f"cuda:{torch.cuda.current_device()}")
    key = (os.getpid(), _checkpoint_key(options.require_model()), *astuple(options)[1:])
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None:
            return hit
        _CACHE[key] = (load_model(options), threading.Lock())
        return _CACHE[key]


def clear_model_cache() -> None:
    """Drop every model this process has loaded for reward functions."""
    with _CACHE_LOCK:
        _CACHE.clear()
