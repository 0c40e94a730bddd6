"""Process-wide settings of a reward-server process (``apex-reward serve``, or one Ray Serve
replica): malloc arenas, oneDNN's kernel cache and torch threads, applied before the server
starts its threads."""

from __future__ import annotations

import os

from .config import ServeConfig

__all__ = ["limit_malloc_arenas", "tune_process"]


def tune_process(config: ServeConfig, default_threads: int | None = None) -> None:
    """Apply ``config``'s process settings: ``--malloc-arena-max``, the oneDNN primitive cache
    capacity (read when oneDNN creates its first kernel, so call this before the model runs) and
    ``--threads`` (``default_threads`` when unset; None: torch's default)."""
    import torch

    if config.malloc_arena_max:
        limit_malloc_arenas(config.malloc_arena_max)
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(config.onednn_cache_capacity))
    threads = config.threads or default_threads
    if threads:
        torch.set_num_threads(threads)


def limit_malloc_arenas(n: int) -> bool:
    """Cap glibc's malloc arenas at ``n`` (``mallopt(M_ARENA_MAX, n)``); False where unsupported.

    glibc gives each thread that allocates its own arena (up to 8 per core); freed blocks of
    varying sizes then fragment across many arenas and resident memory creeps up for a long time.
    Same effect as ``MALLOC_ARENA_MAX=n`` in the environment; affects arenas created afterwards.
    """
    import ctypes
    import ctypes.util
    import sys

    if n <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-8, int(n)))  # M_ARENA_MAX = -8
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
