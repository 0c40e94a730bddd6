"""The encoder's precision and the GPU fast path of :class:`~apex_reward.ApexRewardModel`.

:class:`PrecisionMixin` gives the model its precision switches: the encoder's weight dtype
(:meth:`~PrecisionMixin.set_encoder_dtype`), the GPU fast path (fp16 weights, SDPA, the encoder
kernels of :mod:`apex_reward.fast_kernels`, optional ``torch.compile``, fixed segment-batch
buckets: :meth:`~PrecisionMixin.set_fast_path`) and the one switch the CLIs and the server use
(:meth:`~PrecisionMixin.set_precision`). The front end always runs in float32 and the head in
float64. The mixin reads and writes the model's ``encoder``, ``device``, ``fast_path``,
``bucket_batches`` and the exact float32 weights it keeps while the fast path is on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from .errors import ConfigError

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)

__all__ = ["PrecisionMixin", "resolve_dtype", "bucket_size"]


class PrecisionMixin:
    """Precision and fast-path methods of :class:`~apex_reward.ApexRewardModel` (see the
    module docstring)."""

    fast_path: bool | None
    bucket_batches: bool
    _fast_applied: bool
    _fp32_encoder_state: dict[str, torch.Tensor] | None

    @property
    def encoder_dtype(self) -> torch.dtype:
        """Dtype of the encoder weights (the front end runs in float32, the head in float64)."""
        return next(self.encoder.model.parameters()).dtype

    def set_encoder_dtype(self, dtype: torch.dtype | str) -> Self:
        """Cast the encoder weights to ``dtype`` (``"fp32"``, ``"bf16"``, ``"fp16"`` or a torch
        dtype); inputs are cast to it and pooled features come back as float32. Returns self."""
        self.encoder.model.to(resolve_dtype(dtype))
        return self

    def set_fast_path(
        self,
        enabled: bool = True,
        *,
        dtype: torch.dtype | str = "fp16",
        compile: bool = False,
        bucket: bool = True,
        kernels: bool = True,
    ) -> Self:
        """Turn the GPU fast path on or off (default on for CUDA models; see ``fast_path``).

        On: encoder weights in ``dtype`` (no autocast; the front end stays float32, the head
        float64; fp16 keeps 3 more mantissa bits than bf16, which the 1e-2 score parity needs),
        SDPA attention (flash kernels), the GEMM/FFT encoder kernels of
        :mod:`apex_reward.fast_kernels` (``kernels``), optionally ``torch.compile`` of the
        encoder (``compile``; measured no faster on an H100, see BENCHMARKS.md), and segment
        batches padded to fixed bucket sizes (powers of two up to ``segment_batch_size``) so that
        a song's score does not depend on the rest of its batch and compiled shapes repeat. Off
        restores the exact float32 weights and the stock forwards. Returns self.
        """
        if enabled:
            if self._fp32_encoder_state is None and self.encoder_dtype == torch.float32:
                self._fp32_encoder_state = {
                    k: v.detach().to("cpu", copy=True)
                    for k, v in self.encoder.model.state_dict().items()
                }
            self.set_encoder_dtype(dtype)
            self.encoder.set_fast_kernels(kernels)
            self.encoder.set_compiled(compile)
            self.bucket_batches = bucket
        else:
            self.encoder.set_compiled(False)
            self.encoder.set_fast_kernels(False)
            self.bucket_batches = False
            if self._fp32_encoder_state is not None:
                self.set_encoder_dtype(torch.float32)
                self.encoder.model.load_state_dict(self._fp32_encoder_state)
                self._fp32_encoder_state = None
        self.fast_path = enabled
        self._fast_applied = enabled
        return self

    def set_precision(self, dtype: str = "auto") -> Self:
        """The one precision switch used by the CLIs (``--dtype``) and the server.

        * ``"auto"``: the fast path (fp16) on CUDA, the exact float32 path elsewhere.
        * ``"fp32"``: the exact float32 path everywhere (the fast path off).
        * ``"fp16"`` / ``"bf16"``: the fast path in that dtype (on most CPUs slower than fp32;
          useful there to preview GPU numerics). ``"fp32"`` afterwards restores the exact
          float32 weights.

        Call it after moving the model to its device. Returns self."""
        if dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of auto, fp32, fp16, bf16")
        if dtype == "fp32" or (dtype == "auto" and self.device.type != "cuda"):
            self.set_fast_path(False)
        else:
            if dtype != "auto" and self.device.type == "cpu":
                logger.warning(
                    "dtype %s on the CPU: slower than fp32 on most CPUs, and scores differ from "
                    "the exact float32 path by rounding (use it to preview GPU numerics)",
                    dtype,
                )
            self.set_fast_path(True, dtype="fp16" if dtype == "auto" else dtype)
        return self

    def _maybe_fast_path(self) -> None:
        if self.fast_path is None and not self._fast_applied and self.device.type == "cuda":
            # the first call may run under inference_mode: weights cast there would be
            # inference tensors, unusable by a later differentiable call
            with torch.inference_mode(False):
                self.set_fast_path(True)
            self.fast_path = None  # still "automatic": follows the device


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def bucket_size(n: int, cap: int) -> int:
    """Smallest power of two >= ``n``, capped at ``cap`` (the segment batch size)."""
    size = 1
    while size < n:
        size *= 2
    return min(size, cap)


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of fp32, bf16, fp16") from None
