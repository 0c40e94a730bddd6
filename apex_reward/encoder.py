"""The frozen MERT encoder (docs/model.md#encoder), built on stock ``transformers.HubertModel``.

MERT-v1 checkpoints load into ``HubertModel`` with a ``HubertConfig`` we build ourselves (no
``trust_remote_code``): the official MERT code subclasses HubertModel and is numerically identical
with the released configs. :class:`MertEncoder` returns, per segment, the mean over time of the
selected hidden states (default layers 3, 6, 9 and the last): ``[N, 4, hidden]``.

Freezing uses ``requires_grad_(False)`` and ``eval()`` only; the forward never enters ``no_grad`` or
``inference_mode``, so gradients still reach the input waveform.
"""

from __future__ import annotations

import functools
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from . import fast_kernels
from .config import EncoderConfig
from .errors import CheckpointError
from .frame_moments import frame_moments

logger = logging.getLogger(__name__)

__all__ = [
    "FrozenEncoder",
    "MertEncoder",
    "build_hubert",
    "load_hubert_weights",
    "load_stock_weights",
]


def _hubert_config(config: EncoderConfig):
    from transformers import HubertConfig

    return HubertConfig(**config.hubert)


def build_hubert(config: EncoderConfig, *, attn_implementation: str = "sdpa"):
    """A randomly initialised ``HubertModel`` with the architecture in ``config.hubert``."""
    from transformers import HubertModel

    hcfg = _hubert_config(config)
    hcfg._attn_implementation = attn_implementation
    return HubertModel(hcfg)


def looks_like_path(source: str) -> bool:
    """True for a source that can only be a local directory (not an ``org/name`` hub id)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _resolve_source(
    source: str, revision: str | None, hub: Mapping[str, Any] | None = None
) -> tuple[Path, str | None]:
    """A local directory holding the weights of ``source`` and the commit it resolved to;
    ``hub`` holds ``snapshot_download`` keyword arguments (``token``, ``cache_dir``,
    ``local_files_only``) for a hub id."""
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"encoder source {source!r} is a file; expected a directory")
        return local, revision
    if looks_like_path(source):
        raise CheckpointError(f"encoder source {source!r}: no such directory")
    from huggingface_hub import snapshot_download

    try:
        path = None
        for patterns in (["*.safetensors", "*.json"], ["pytorch_model*.bin", "*.json"]):
            path = Path(
                snapshot_download(
                    source, revision=revision, allow_patterns=patterns, **dict(hub or {})
                )
            )
            if any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")):
                break
    except Exception as e:  # hub errors have many types (offline, 404, auth)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise CheckpointError(
            f"cannot fetch encoder weights {source!r} at revision {revision or 'main'!r}{hint}: "
            f"{type(e).__name__}: {e}. Pass a local directory with the MERT weights instead "
            "(--encoder PATH)."
        ) from e
    commit = path.name if path.parent.name == "snapshots" else revision
    return path, commit


def load_hubert_weights(
    config: EncoderConfig,
    *,
    attn_implementation: str = "sdpa",
    hub: Mapping[str, Any] | None = None,
) -> tuple[Any, str | None]:
    """Load MERT weights from ``config.source`` (hub id or local dir) into a stock HubertModel.

    Accepts the official MERT checkpoint layout (top-level HubertModel keys, including legacy
    ``weight_g``/``weight_v`` of the positional convolution, which transformers maps), as
    ``model.safetensors`` or legacy ``pytorch_model.bin`` (read with ``weights_only=True``).

    Returns:
        ``(model, commit)``: the model in eval mode, and the hub commit the revision resolved to
        (``None`` for a local directory without one).

    Raises:
        CheckpointError: the source is unreachable, or any key is missing, unexpected or of the
            wrong shape.
    """
    from transformers import HubertModel

    return load_stock_weights(
        config,
        HubertModel,
        _hubert_config(config),
        attn_implementation=attn_implementation,
        hub=hub,
    )


def load_stock_weights(
    config: EncoderConfig,
    model_class: Any,
    model_config: Any,
    *,
    ignore_unexpected: tuple[str, ...] = (),
    attn_implementation: str = "sdpa",
    hub: Mapping[str, Any] | None = None,
) -> tuple[Any, str | None]:
    """Load ``config.source`` (hub id or local dir) into the stock transformers ``model_class``
    built from ``model_config``; keys starting with ``ignore_unexpected`` may be left over (a
    task head the encoder does not use); ``hub``: ``snapshot_download`` keyword arguments for a
    hub id (``token``, ``cache_dir``, ``local_files_only``). Returns ``(model in eval mode,
    resolved commit)``.

    Raises:
        CheckpointError: unreachable source, pickled objects, or any key missing, unexpected or
            of the wrong shape.
    """
    if not config.source:
        raise CheckpointError(
            "encoder has no source (hub id or local path) and its weights are not stored in the "
            "checkpoint; pass an encoder source"
        )
    path, commit = _resolve_source(config.source, config.revision, hub)
    if not (any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))):
        raise CheckpointError(
            f"encoder source {config.source!r}: no model.safetensors or pytorch_model.bin in {path}"
        )
    try:
        model, info = model_class.from_pretrained(
            str(path),
            config=model_config,
            output_loading_info=True,
            attn_implementation=attn_implementation,
        )
    except pickle.UnpicklingError:  # its message advises weights_only=False: not here
        raise CheckpointError(
            f"encoder weights in {str(path)!r}: pytorch_model.bin holds objects other than "
            "tensors, and apex-reward never unpickles them; convert the weights to "
            "model.safetensors from a trusted copy"
        ) from None
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load encoder weights from {str(path)!r}: {e}") from e
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind, ()))
        if kind == "unexpected_keys":
            keys = [k for k in keys if not k.startswith(ignore_unexpected)]
        if keys:
            problems.append(
                f"{kind.replace('_', ' ')}: {keys[:8]}{' ...' if len(keys) > 8 else ''}"
            )
    if problems:
        raise CheckpointError(
            f"encoder weights in {str(path)!r} do not match the {config.preset!r} architecture; "
            + "; ".join(problems)
        )
    return model.eval(), commit


class FrozenEncoder(torch.nn.Module):
    """What every encoder family shares: a stock transformers model in ``self.model``, frozen
    (no parameter gradients, eval mode) unless ``trainable`` (LoRA), and weights loaded by the
    family's ``_load_weights(config, hub) -> (model, commit)``."""

    def __init__(self, config: EncoderConfig, model: Any) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.layers = tuple(config.layers)
        self.trainable = False
        self._compiled: Any = None
        self.activation_checkpointing = False
        self.fast_kernels = False

    @staticmethod
    def _load_weights(
        config: EncoderConfig, hub: Mapping[str, Any] | None
    ) -> tuple[Any, str | None]:
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, config: EncoderConfig, hub: Mapping[str, Any] | None = None) -> Any:
        """Load the weights named by ``config.source``/``config.revision``; the resolved hub
        commit is written to ``config.revision``. ``hub``: ``snapshot_download`` keyword
        arguments (``token``, ``cache_dir``, ``local_files_only``) for a hub id."""
        model, commit = cls._load_weights(config, hub)
        if commit and commit != config.revision:
            logger.info("encoder %s resolved to revision %s", config.source, commit)
            config.revision = commit
        return cls(config, model)

    def freeze(self) -> Any:
        """Frozen: no parameter gradients, eval mode (no dropout, no SpecAugment masking)."""
        self.model.requires_grad_(False)
        self.trainable = False
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> Any:
        """Keeps the frozen encoder in eval mode whatever the parent module's mode is."""
        super().train(mode)
        if not self.trainable:
            self.model.eval()
        return self

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def compiled(self) -> bool:
        return self._compiled is not None


class MertEncoder(FrozenEncoder):
    """Frozen MERT: ``[N, S]`` segments -> ``[N, len(layers), hidden]`` time-pooled layer features.

    Args:
        config: architecture, weight source and pooled layers.
        model: a ``HubertModel`` to wrap; built randomly from ``config`` when omitted.
    """

    def __init__(self, config: EncoderConfig, model: Any | None = None) -> None:
        super().__init__(config, model if model is not None else build_hubert(config))
        # LayerDrop (active only in training mode, e.g. LoRA fine-tuning) skips whole layers and
        # leaves them out of `hidden_states`, which the layer pooling indexes: keep every layer.
        self.model.config.layerdrop = 0.0
        self.freeze()

    @staticmethod
    def _load_weights(
        config: EncoderConfig, hub: Mapping[str, Any] | None
    ) -> tuple[Any, str | None]:
        return load_hubert_weights(config, hub=hub)

    def frame_lengths(self, valid: torch.Tensor) -> torch.Tensor:
        """Number of encoder frames (75 Hz) covering ``valid`` samples, at least 1. ``[N]``."""
        n = self.model._get_feat_extract_output_lengths(valid)
        return torch.clamp(n, min=1)

    # ------------------------------------------------------------------------------------------
    # speed and memory options (the GPU fast path, see ApexRewardModel.set_fast_path)

    def set_compiled(self, enabled: bool = True, *, mode: str | None = None) -> MertEncoder:
        """Run the HubertModel through ``torch.compile`` (static shapes; one compilation per
        segment-batch size, so pair it with bucketed batches). ``False`` goes back to eager.

        Compiled, attention goes through :func:`_sdpa_attention` (plain
        ``scaled_dot_product_attention``): traced by dynamo, the transformers SDPA wrapper ran
        3x slower than eager on an H100 (BENCHMARKS.md)."""
        if enabled:
            _register_attention()
            self.model.config._attn_implementation = _ATTENTION_NAME
        elif self.model.config._attn_implementation == _ATTENTION_NAME:
            self.model.config._attn_implementation = "sdpa"
        self._compiled = torch.compile(self.model, dynamic=False, mode=mode) if enabled else None
        return self

    def set_fast_kernels(self, enabled: bool = True) -> MertEncoder:
        """Replace the forwards of the feature extractor and the positional convolution by the
        GEMM / FFT formulations of :mod:`apex_reward.fast_kernels` (same weights, same maths up
        to rounding; much faster on GPUs). Configs they do not implement keep the stock forwards
        (logged). Returns self."""
        if enabled:
            reason = fast_kernels.unsupported_reason(self.model)
            if reason is not None:
                logger.info("fast encoder kernels not used: %s", reason)
                enabled = False
        self.fast_kernels = enabled
        self._install_forwards()
        return self

    def set_activation_checkpointing(self, enabled: bool = True) -> MertEncoder:
        """Recompute activations during backward instead of storing them: the feature extractor
        (each convolution block, or the whole fast extractor) and each transformer layer run
        under ``torch.utils.checkpoint``. About a third more compute for the differentiable
        path, a fraction of its memory (long songs, large batches). No effect without
        gradients."""
        self.activation_checkpointing = enabled
        self._install_forwards()
        return self

    def _install_forwards(self) -> None:
        """Instance-level ``forward`` overrides on stock submodules (parameters, state dict and
        the class untouched): fast kernels first, checkpointing wrapped around them."""
        m = self.model
        extractor, pos = m.feature_extractor, m.encoder.pos_conv_embed
        for module in (extractor, pos, *extractor.conv_layers, *m.encoder.layers):
            module.__dict__.pop("forward", None)
        if self.fast_kernels:
            extractor.forward = functools.partial(fast_kernels.feature_encoder_forward, extractor)
            pos.forward = functools.partial(fast_kernels.positional_conv_forward, pos)
        if self.activation_checkpointing:
            blocks = [extractor] if self.fast_kernels else list(extractor.conv_layers)
            for block in (*blocks, *m.encoder.layers):
                block.forward = _checkpointed(block.forward)

    #: ``forward(..., dynamics=True)`` is supported (the OOD ``moments`` feature)
    supports_dynamics = True

    def forward(
        self, audio: torch.Tensor, valid: torch.Tensor | None = None, *, dynamics: bool = False
    ) -> torch.Tensor:
        """Encode segments and mean-pool the selected hidden states over time.

        Args:
            audio: ``[N, S]`` float segments at 24 kHz (normalised by the front end).
            valid: ``[N]`` unpadded samples per segment; pooling covers only the frames computed
                from those samples. ``None`` pools every frame.
            dynamics: also return the frames' standard deviation and difference RMS per layer
                (:func:`~apex_reward.frame_moments.frame_moments`).

        Returns:
            ``[N, L, H]`` float32, L = ``len(config.layers)``, H = hidden size; with
            ``dynamics`` ``[N, 3L, H]``: the means, then the L standard deviations, then the L
            difference RMS.
        """
        param = next(self.model.parameters())
        x = audio.to(dtype=param.dtype)
        run = self._compiled if self._compiled is not None else self.model
        out = run(x, output_hidden_states=True, return_dict=True)
        hidden = out.hidden_states
        frames = hidden[-1].shape[1]
        mask = None
        if valid is None:
            pooled = [hidden[i].float().mean(dim=1) for i in self.layers]
        else:
            n = torch.clamp(self.frame_lengths(valid), max=frames).to(audio.device)
            mask = (torch.arange(frames, device=audio.device)[None, :] < n[:, None]).float()
            denom = n.float()[:, None]
            pooled = [
                torch.einsum("nf,nfh->nh", mask, hidden[i].float()) / denom for i in self.layers
            ]
        if dynamics:
            moments = frame_moments(hidden, self.layers, mask).flatten(1, 2)
            return torch.cat([torch.stack(pooled, dim=1), moments], dim=1)
        return torch.stack(pooled, dim=1)


_ATTENTION_NAME = "apex_sdpa"


def _sdpa_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Bidirectional attention for ``HubertAttention``: ``[B, H, T, D]`` q/k/v ->
    ``([B, T, H, D], None)``, as the transformers attention interface expects."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION_NAME, _sdpa_attention)


def _checkpointed(forward):
    """Wrap a module's bound ``forward`` so that, when gradients are needed, it runs under
    non-reentrant activation checkpointing (the module's parameters and state dict are unchanged)."""

    def run(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() and any(
            isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values())
        ):
            from torch.utils.checkpoint import checkpoint

            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run
