"""Small helpers for jobs run under ``accelerate launch`` (extraction, training)."""

from __future__ import annotations

import os
import sys

import torch


def finish_distributed(code: int) -> int:
    """End a (possibly) multi-process job cleanly and return ``code``.

    With a live process group at interpreter exit, gloo/NCCL jobs sometimes abort after finishing
    ("terminate called without an active exception"); destroying the group and leaving with
    ``os._exit`` avoids it. Single-process runs just return ``code``.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
