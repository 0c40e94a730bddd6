"""LoRA adapters on the MERT encoder (PEFT), for fine-tuning APEX end to end from audio.

APEX normally keeps MERT frozen and trains only its heads on cached embeddings. Users who want to
adapt the encoder to their own audio domain can add low-rank adapters to its attention
projections (``q_proj`` and ``v_proj`` by default) and train only those (and, optionally, the
heads) through the full waveform -> score path::

    from apex_reward import ApexRewardModel
    from apex_reward.integrations.lora import add_lora, lora_parameters, merge_lora

    model = add_lora(ApexRewardModel.from_pretrained("ckpt"), r=8)   # base encoder + head frozen
    model.encoder.train()              # LoRA dropout / SpecAugment on; the head stays in eval
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    ...                                # loss from model(waveforms, sr).scores; backward; step
    model.save_pretrained("ckpt-lora")  # config.json records the adapter; weights: encoder_lora.*
    ApexRewardModel.from_pretrained("ckpt-lora")                   # rebuilds the adapter
    merge_lora(model).save_pretrained("ckpt-merged")               # plain checkpoint, encoder stored

The adapter is injected with ``peft.functional.inject_adapter_in_model`` (PEFT's API for models
that are not a ``PeftModel``), so the encoder keeps its module structure and ``MertEncoder``'s
forward is unchanged. Checkpoints stay safetensors: the base encoder under ``encoder.`` (plain
HubertModel names, only when stored) and the adapter under ``encoder_lora.`` (PEFT's
adapter-name-free keys, e.g. ``encoder.layers.0.attention.q_proj.lora_A.weight``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from apex_reward.checkpoint import state_mismatch
from apex_reward.config import LoraAdapterConfig
from apex_reward.dataclass_io import to_dict
from apex_reward.errors import CheckpointError, ConfigError, require

if TYPE_CHECKING:
    from apex_reward.encoder import MertEncoder
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "add_lora",
    "attach_lora",
    "merge_lora",
    "lora_parameters",
    "has_lora",
    "split_lora_state_dict",
]

_ADAPTER = "default"


def _peft_config(cfg: LoraAdapterConfig):
    peft = require("peft", "trl", "LoRA adapters")
    return peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
    )


def has_lora(encoder: MertEncoder) -> bool:
    """Whether the encoder's HubertModel carries PEFT adapter layers."""
    return hasattr(encoder.model, "peft_config")


def _inject(encoder: MertEncoder, cfg: LoraAdapterConfig) -> None:
    if has_lora(encoder):
        raise ConfigError("the encoder already has a LoRA adapter (merge_lora it first)")
    require("peft", "trl", "LoRA adapters")
    from peft.functional import inject_adapter_in_model

    names = {
        n.rsplit(".", 1)[-1] for n, m in encoder.model.named_modules() if isinstance(m, nn.Linear)
    }
    missing = sorted(set(cfg.target_modules) - names)
    if missing:
        raise ConfigError(
            f"encoder.lora.target_modules: {missing} are not linear layers of the encoder; "
            f"available: {sorted(names)}"
        )
    inject_adapter_in_model(_peft_config(cfg), encoder.model, adapter_name=_ADAPTER)
    encoder.config.lora = cfg


def _adapter_keys(encoder: MertEncoder) -> dict[str, torch.Tensor]:
    from peft.functional import get_peft_model_state_dict

    return get_peft_model_state_dict(encoder.model, adapter_name=_ADAPTER)


def attach_lora(
    encoder: MertEncoder,
    cfg: LoraAdapterConfig,
    state: dict[str, torch.Tensor] | None = None,
    *,
    where: str | Path = "checkpoint",
) -> None:
    """Rebuild a saved adapter on ``encoder`` (used by ``ApexRewardModel.from_pretrained``).

    ``state`` holds the adapter tensors (keys without the ``encoder_lora.`` prefix); they must
    match the adapter ``cfg`` builds exactly. The adapter starts frozen
    (``requires_grad=False``); ``from_pretrained(..., freeze=False)`` makes it trainable.

    Raises:
        CheckpointError: missing, unexpected or wrongly shaped adapter tensors.
        MissingDependencyError: peft is not installed.
    """
    _inject(encoder, cfg)
    if state is not None:
        from peft.functional import set_peft_model_state_dict

        problem = state_mismatch(_adapter_keys(encoder), state)
        if problem:
            raise CheckpointError(
                f"{where}: LoRA adapter weights do not match config.json encoder.lora: {problem}"
            )
        set_peft_model_state_dict(encoder.model, state, adapter_name=_ADAPTER)
    for p in encoder.model.parameters():
        p.requires_grad_(False)


def split_lora_state_dict(
    encoder: MertEncoder, config: LoraAdapterConfig | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(base, adapter)`` state dicts of an encoder with a LoRA adapter (used by
    ``ApexRewardModel.save_pretrained``).

    ``base`` uses plain ``HubertModel`` names (as without the adapter: ``...q_proj.weight``);
    ``adapter`` uses PEFT's adapter-name-free keys (``...q_proj.lora_A.weight``).

    Raises:
        ConfigError: the adapter and the config disagree (an adapter injected without
            :func:`add_lora`, or ``encoder.lora`` set on an encoder without one).
    """
    if config is None or not has_lora(encoder):
        raise ConfigError(
            "the encoder's LoRA adapter and config.encoder.lora disagree: "
            + (
                "the encoder has an adapter that the config does not record (use add_lora)"
                if config is None
                else "config.encoder.lora is set but the encoder has no adapter"
            )
        )
    base = {}
    for key, value in encoder.model.state_dict().items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        base[".".join(p for p in parts if p != "base_layer")] = value
    return base, _adapter_keys(encoder)


def add_lora(
    model: ApexRewardModel,
    *,
    r: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    train_head: bool = False,
) -> ApexRewardModel:
    """Add a LoRA adapter to ``model``'s encoder, in place, ready to train.

    Only the adapter's parameters require gradients (plus the head's with ``train_head=True``);
    the base encoder stays frozen. ``model.encoder.trainable`` becomes ``True``, so
    ``model.encoder.train()`` (or ``model.train()``) puts the encoder in training mode (LoRA
    dropout, SpecAugment masking, layer drop). ``model.train()`` also puts the head's BatchNorm in
    training mode; with a frozen head call ``model.encoder.train()`` only.

    Returns:
        ``model`` (for chaining). ``save_pretrained`` then stores the adapter.
    """
    cfg = LoraAdapterConfig(
        r=r, alpha=float(alpha), dropout=float(dropout), target_modules=tuple(target_modules)
    )
    model.requires_grad_(False)
    _inject(model.encoder, cfg)
    model.config.encoder.lora = cfg  # the same object as encoder.config unless built apart
    for p in lora_parameters(model):
        p.requires_grad_(True)
    if train_head:
        model.head.requires_grad_(True)
    model.encoder.trainable = True
    n = sum(p.numel() for p in lora_parameters(model))
    logger.info("LoRA r=%d on %s: %d trainable encoder parameters", r, list(target_modules), n)
    return model


def lora_parameters(model: ApexRewardModel | MertEncoder) -> list[nn.Parameter]:
    """The adapter's parameters (``lora_A``/``lora_B`` of every adapted layer)."""
    encoder = model.encoder if hasattr(model, "head") else model
    return [
        p
        for n, p in encoder.model.named_parameters()  # type: ignore[union-attr]
        if any(part.startswith("lora_") for part in n.split("."))
    ]


def merge_lora(model: ApexRewardModel) -> ApexRewardModel:
    """Fold the adapter into the encoder's weights (``W + alpha/r * B A``), in place.

    The result is a plain model: ``config.encoder.lora`` is ``None``; as its encoder no longer
    matches the published weights, ``config.encoder.source`` is cleared (so ``save_pretrained``
    stores the encoder) and the base source, revision and adapter are recorded under
    ``config.training["encoder_lora_merged"]``. The merged encoder is frozen.
    """
    encoder = model.encoder
    if not has_lora(encoder):
        raise ConfigError("this model has no LoRA adapter to merge")
    from peft.tuners.tuners_utils import BaseTunerLayer

    hubert = encoder.model
    layers = [(n, m) for n, m in hubert.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = hubert.get_submodule(parent_name) if parent_name else hubert
        setattr(parent, child, layer.get_base_layer())
    del hubert.peft_config
    lora_cfg = encoder.config.lora
    model.config.training["encoder_lora_merged"] = {
        "base_source": encoder.config.source,
        "base_revision": encoder.config.revision,
        "lora": None if lora_cfg is None else to_dict(lora_cfg),
    }
    for enc_cfg in {id(c): c for c in (encoder.config, model.config.encoder)}.values():
        enc_cfg.lora = None
        enc_cfg.source = None
        enc_cfg.revision = None
        enc_cfg.stored = True
    encoder.freeze()
    return model
