"""The frozen AST encoder (docs/model.md#encoders), built on stock ``transformers.ASTModel``.

The Audio Spectrogram Transformer reads a 16 kHz log-mel filterbank: :class:`AstEncoder` computes
it with :class:`~apex_reward.filterbank.LogMelFilterbank` (torch, differentiable) and then runs the
ViT-style transformer over 16x16 time-frequency patches. Like :class:`~apex_reward.encoder.
MertEncoder` it returns, per segment, the mean of the selected hidden states (``encoder.layers``;
0 = the patch embeddings, -1 = the last layer) over the patch tokens computed from real audio:
``[N, L, hidden]``. The [CLS] and distillation tokens are left out of the mean.

Weights load from a hub id or a local directory in the layout the official checkpoints use
(``ASTForAudioClassification``: ``audio_spectrogram_transformer.*`` plus the AudioSet
``classifier.*``, which is not used and therefore not loaded); transformers maps older key names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from .config import EncoderConfig
from .encoder import FrozenEncoder, _checkpointed, load_stock_weights
from .filterbank import LogMelFilterbank, fbank_frames

logger = logging.getLogger(__name__)

__all__ = ["AstEncoder", "build_ast", "load_ast_weights"]

#: Keys of the official checkpoints that the encoder does not use (the AudioSet classifier).
IGNORED_PREFIXES: tuple[str, ...] = ("classifier.",)


def _ast_config(config: EncoderConfig):
    from transformers import ASTConfig

    return ASTConfig(**config.hubert)


def build_ast(config: EncoderConfig, *, attn_implementation: str = "sdpa"):
    """A randomly initialised ``ASTModel`` with the architecture in ``config.hubert``."""
    from transformers import ASTModel

    acfg = _ast_config(config)
    acfg._attn_implementation = attn_implementation
    return ASTModel(acfg)


def load_ast_weights(
    config: EncoderConfig,
    *,
    attn_implementation: str = "sdpa",
    hub: Mapping[str, Any] | None = None,
) -> tuple[Any, str | None]:
    """Load AST weights from ``config.source`` (hub id or local dir) into a stock ``ASTModel``.

    Returns:
        ``(model, commit)``: the model in eval mode and the hub commit the revision resolved to
        (``None`` for a local directory without one).

    Raises:
        CheckpointError: the source is unreachable, or a key is missing, of the wrong shape, or
            unexpected (other than the AudioSet classifier's ``classifier.*``).
    """
    from transformers import ASTModel

    return load_stock_weights(
        config,
        ASTModel,
        _ast_config(config),
        ignore_unexpected=IGNORED_PREFIXES,
        attn_implementation=attn_implementation,
        hub=hub,
    )


class AstEncoder(FrozenEncoder):
    """Frozen AST: ``[N, S]`` 16 kHz segments -> ``[N, len(layers), hidden]`` pooled features.

    Same interface as :class:`~apex_reward.encoder.MertEncoder` (``model``, ``layers``,
    ``freeze``, ``frame_lengths``, the fast-path switches), so the model, training, scoring and
    the server use either.

    Args:
        config: architecture (``ASTConfig`` keyword arguments in ``config.hubert``), weight
            source and pooled layers.
        model: an ``ASTModel`` to wrap; built randomly from ``config`` when omitted.
    """

    def __init__(self, config: EncoderConfig, model: Any | None = None) -> None:
        super().__init__(config, model if model is not None else build_ast(config))
        c = self.model.config
        self.filterbank = LogMelFilterbank(c.num_mel_bins, c.max_length)
        self.freeze()

    @staticmethod
    def _load_weights(
        config: EncoderConfig, hub: Mapping[str, Any] | None
    ) -> tuple[Any, str | None]:
        return load_ast_weights(config, hub=hub)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(frequency, time)`` patches per segment (12 x 101 for 128 bins x 1024 frames)."""
        return self.model.embeddings.get_shape(self.model.config)

    def frame_lengths(self, valid: torch.Tensor) -> torch.Tensor:
        """Time patches holding at least one frame computed from ``valid`` samples, >= 1. ``[N]``."""
        c = self.model.config
        frames = torch.clamp(fbank_frames(valid), max=c.max_length)
        n = torch.div(frames - 1, c.time_stride, rounding_mode="floor") + 1
        return torch.clamp(n, min=1, max=self.patch_grid[1])

    # ------------------------------------------------------------------------------------------
    # speed and memory options (ApexRewardModel.set_fast_path)

    def set_compiled(self, enabled: bool = True, *, mode: str | None = None) -> AstEncoder:
        """Run the ASTModel through ``torch.compile`` (static shapes); ``False`` goes back to
        eager. Returns self."""
        self._compiled = torch.compile(self.model, dynamic=False, mode=mode) if enabled else None
        return self

    def set_fast_kernels(self, enabled: bool = True) -> AstEncoder:
        """The GEMM/FFT kernels replace MERT's convolutions; AST has none of them, so this only
        records that they are off. Returns self."""
        if enabled:
            logger.info("fast encoder kernels not used: the AST encoder has no convolution stack")
        self.fast_kernels = False
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> AstEncoder:
        """Recompute each transformer layer's activations during backward instead of storing
        them (only when gradients are needed). Returns self."""
        self.activation_checkpointing = enabled
        for layer in self.model.layers:
            layer.__dict__.pop("forward", None)
            if enabled:
                layer.forward = _checkpointed(layer.forward)
        return self

    def forward(self, audio: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Filterbank, AST, and the mean of the selected hidden states over the patch tokens.

        Args:
            audio: ``[N, S]`` float segments at 16 kHz.
            valid: ``[N]`` unpadded samples per segment; only patches whose first frame was
                computed from real samples are pooled (and the filterbank pads past them as the
                extractor does). ``None`` pools every patch.

        Returns:
            ``[N, L, H]`` float32, L = ``len(config.layers)``, H = hidden size.
        """
        param = next(self.model.parameters())
        feats = self.filterbank(audio, valid).to(dtype=param.dtype)  # [N, frames, mel]
        run = self._compiled if self._compiled is not None else self.model
        out = run(feats, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        n_freq, n_time = self.patch_grid
        extra = hidden[-1].shape[1] - n_freq * n_time  # [CLS] and distillation tokens first
        if valid is None:
            n = torch.full((audio.shape[0],), n_time, device=audio.device)
        else:
            n = self.frame_lengths(valid.to(audio.device))
        # patch tokens are frequency-major: token f * n_time + t covers frames t*stride...
        time_ok = torch.arange(n_time, device=audio.device)[None, :] < n[:, None]  # [N, T]
        mask = time_ok[:, None, :].expand(-1, n_freq, -1).reshape(audio.shape[0], -1).float()
        denom = mask.sum(dim=1, keepdim=True)
        pooled = [
            torch.einsum("np,nph->nh", mask, hidden[i][:, extra:].float()) / denom
            for i in self.layers
        ]
        return torch.stack(pooled, dim=1)
