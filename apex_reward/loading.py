"""One way to load a reward model for a job: :class:`ModelOptions` and :func:`load_model`.

Every entry point that runs the model (the ``score``/``compare``/``extract``/``pairs``/``arena``/
``serve`` commands, the TRL reward functions) describes the model it wants with the same typed
options and loads it through :func:`load_model`. That makes the device choice, the precision
switch, the error for an unusable device and the warning for an untrained model the same
everywhere. Job configs embed the options as a field ``model: ModelOptions`` marked
``flatten``, so their flags stay ``--model``, ``--encoder``, ``--revision``, ``--device`` and
``--dtype``, ``--cache-dir`` and ``--local-files-only`` (see :mod:`apex_reward.dataclass_io`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

    from .model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "ModelOptions", "load_model", "resolve_device", "warn_if_untrained"]

#: The values of ``--dtype`` (see :meth:`ApexRewardModel.set_precision`).
DTYPES: tuple[str, ...] = ("auto", "fp32", "fp16", "bf16")

Dtype = Literal["auto", "fp32", "fp16", "bf16"]


@dataclass
class ModelOptions:
    """Which checkpoint to load, and where and how to run it.

    The precision switch is also the GPU fast-path switch: ``auto`` runs the fast path (fp16
    encoder weights, fused kernels) on CUDA and exact float32 on the CPU; ``fp32`` turns the fast
    path off everywhere; ``fp16``/``bf16`` force it in that dtype.
    """

    model: str = field(
        default="", metadata={"help": "checkpoint directory or hub id", "metavar": "DIR_OR_ID"}
    )
    encoder: str | None = field(
        default=None,
        metadata={
            "help": "override where the MERT weights come from (hub id or local directory)",
            "metavar": "ID_OR_PATH",
        },
    )
    revision: str | None = field(
        default=None, metadata={"help": "hub revision of the checkpoint (hub ids only)"}
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (unset: cuda if available, else cpu)"}
    )
    dtype: Dtype = field(
        default="auto",
        metadata={
            "help": "encoder precision: auto = the GPU fast path (fp16 weights, fast kernels) on "
            "CUDA and exact float32 on CPU; fp32 = exact float32 (turns the fast path off); "
            "fp16/bf16 = the fast path in that dtype"
        },
    )

    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "where hub downloads are cached (unset: the Hugging Face default cache)",
            "metavar": "DIR",
        },
    )
    local_files_only: bool = field(
        default=False,
        metadata={
            "help": "never reach the network: load a hub id only from the local cache (like "
            "HF_HUB_OFFLINE=1 for this model)"
        },
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device is not None:
            self.device = str(self.device)

    @classmethod
    def coerce(cls, value: ModelOptions | str | os.PathLike) -> ModelOptions:
        """``value`` as options: a checkpoint path or hub id stands for ``ModelOptions(model=...)``
        (so a job config may be built as ``Config(model="ckpt", ...)``)."""
        if isinstance(value, cls):
            return value
        if isinstance(value, (str, os.PathLike)):
            return cls(model=os.fspath(value))
        raise ConfigError(f"model: expected a checkpoint path or ModelOptions, got {value!r}")

    def require_model(self) -> str:
        """The checkpoint path or hub id; a :class:`ConfigError` when none was given."""
        if not self.model:
            raise ConfigError("--model is required: a checkpoint directory or hub id")
        return self.model


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device a job runs on: ``device``, or CUDA when available, else the CPU.

    Raises:
        ConfigError: ``device`` is not a device name, or names an accelerator this torch build
            or machine does not have (one line naming what to pass instead).
    """
    import torch

    if device is None or str(device) == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ConfigError(f"--device {device}: not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.backends.cuda.is_built():
            raise ConfigError(
                f"--device {device}: this torch build has no CUDA support; use --device cpu"
            )
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {device}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"--device {device}: unsupported device type {dev.type!r}")
    return dev


def warn_if_untrained(model: ApexRewardModel, name: str, *, heads: bool = True) -> None:
    """Log the one warning every job gives for a model whose heads were never trained.

    ``heads=False`` is for jobs that run only the front end and encoder (embedding extraction),
    for which an untrained checkpoint is the normal input: nothing is logged.
    """
    if model.untrained and heads:
        logger.warning(
            "%s is an UNTRAINED model (random heads): its scores show the pipeline works, they "
            "say nothing about the music",
            name,
        )


def load_model(
    options: ModelOptions, *, freeze: bool = True, heads: bool = True
) -> ApexRewardModel:
    """Load the checkpoint ``options`` names for a job: on its device, at its precision.

    The model comes back in eval mode, frozen unless ``freeze=False`` (gradients still reach the
    input waveform either way). An untrained checkpoint is loaded with one logged warning, unless
    ``heads=False`` says the job uses only the front end and encoder (embedding extraction).

    Raises:
        ConfigError: no model given, a bad ``device`` or ``dtype``, invalid ``config.json``.
        CheckpointError: missing, corrupt or tampered checkpoint files.
    """
    from .model import ApexRewardModel

    path = options.require_model()
    device = resolve_device(options.device)
    model = ApexRewardModel.from_pretrained(
        path,
        revision=options.revision,
        encoder_source=options.encoder,
        device=device,
        freeze=freeze,
        cache_dir=options.cache_dir,
        local_files_only=options.local_files_only,
    ).set_precision(options.dtype)
    warn_if_untrained(model, path, heads=heads)
    return model
