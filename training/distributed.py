"""Small helpers for jobs run under ``accelerate launch`` (extraction, training)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def check_launch(accelerator) -> None:
    """Raise if ``accelerate launch`` started more processes than joined the group.

    ``accelerate launch --multi_gpu --num_processes N`` on a machine without GPUs starts N
    processes that each fall back to a group of one: N copies of the job race on the same output
    and all exit 0. ``WORLD_SIZE`` (set by the launcher) tells that apart from a real group.
    """
    from apex_reward.errors import ConfigError

    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched > accelerator.num_processes:
        raise ConfigError(
            f"accelerate launched {launched} processes but they did not form a group "
            f"(each runs alone on {accelerator.device}): on a machine without GPUs pass --device "
            "cpu to the job (gloo group on the CPU), or launch one process"
        )


#: Help of the ``--device`` flag of the jobs that run under accelerate (``train``, ``grid``).
DEVICE_HELP = (
    "cpu: run on the CPU even if GPUs are present (gloo between processes); cuda: on the GPUs "
    "(unset: accelerate's choice, a GPU when there is one)"
)


def accelerator_cpu(device: str | None) -> bool:
    """``accelerate.Accelerator(cpu=...)`` for a job's ``--device``.

    * unset: accelerate's choice (under ``accelerate launch`` each process its own GPU, else
      the GPU when there is one, else the CPU);
    * ``cpu``: the CPU even where GPUs are present (gloo between processes);
    * ``cuda`` (or ``mps``): checked to exist (:func:`apex_reward.loading.resolve_device`);
      which GPU a process gets is accelerate's choice.

    Raises:
        ConfigError: a device this machine lacks, or a GPU index (accelerate assigns the GPUs:
            choose them with ``CUDA_VISIBLE_DEVICES``).
    """
    from apex_reward.errors import ConfigError
    from apex_reward.loading import resolve_device

    if device is None or device == "":
        return False
    dev = resolve_device(device)
    if dev.type == "cpu":
        return True
    if dev.index is not None:
        raise ConfigError(
            f"--device {device}: accelerate gives each process its GPU; pass --device {dev.type} "
            "and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    return False


def claim_output(
    path: Path,
    fingerprint: dict[str, Any],
    what: str,
    canonical: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> None:
    """Write ``fingerprint`` to ``path`` or check that the one there is equal (main process only).

    A resumable job's output folder may only be continued by the same job: ``what`` names its
    contents in the error ("embeddings from a different extraction"). ``canonical`` maps a
    fingerprint to the form compared (e.g. defaults filled in for fields an older version did not
    record); the file keeps what was written first.

    Raises:
        ConfigError: ``path`` holds another fingerprint; names the keys that differ.
    """
    from apex_reward.errors import ConfigError
    from apex_reward.files import atomic_write_text

    if path.is_file():
        old = json.loads(path.read_text())
        if canonical is not None:
            old, fingerprint = canonical(old), canonical(fingerprint)
        if old != fingerprint:
            changed = sorted(
                k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k)
            )
            raise ConfigError(
                f"{path.parent} holds {what} (differs in {changed}); use another --out or delete it"
            )
    else:
        atomic_write_text(path, json.dumps(fingerprint, indent=2) + "\n")
