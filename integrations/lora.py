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

How adapters are injected, saved and rebuilt on load lives in the core (:mod:`apex_reward.lora`),
so that a checkpoint with an adapter loads without importing this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from apex_reward.config import LoraAdapterConfig
from apex_reward.dataclass_io import to_dict
from apex_reward.errors import ConfigError
from apex_reward.lora import (
    has_lora,
    inject_lora,
    load_peft_adapter,
    lora_parameters,
    save_peft_adapter,
)

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = ["add_lora", "merge_lora", "load_adapter", "save_adapter", "lora_parameters", "has_lora"]


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
    inject_lora(model.encoder, cfg)
    model.config.encoder.lora = cfg  # the same object as encoder.config unless built apart
    for p in lora_parameters(model):
        p.requires_grad_(True)
    if train_head:
        model.head.requires_grad_(True)
    model.encoder.trainable = True
    n = sum(p.numel() for p in lora_parameters(model))
    logger.info("LoRA r=%d on %s: %d trainable encoder parameters", r, list(target_modules), n)
    return model


def save_adapter(model: ApexRewardModel, directory: str | Path) -> Path:
    """Write only the adapter, in PEFT's layout (``adapter_config.json`` +
    ``adapter_model.safetensors``), to ``directory`` (``save_pretrained`` writes the same files
    next to the checkpoint). Returns the directory."""
    return save_peft_adapter(model.encoder, directory)


def load_adapter(
    model: ApexRewardModel, directory: str | Path, *, trainable: bool = False
) -> ApexRewardModel:
    """Attach a LoRA adapter saved in PEFT's layout to ``model``'s encoder, in place.

    ``directory`` holds ``adapter_config.json`` + ``adapter_model.safetensors`` (from
    :func:`save_adapter`, ``save_pretrained``, or PEFT's ``PeftModel.save_pretrained`` on this
    encoder). The model must not have an adapter yet, and its base encoder must be the one the
    adapter was trained on. ``config.encoder.lora`` records the adapter, so ``save_pretrained``
    keeps it. With ``trainable=True`` the adapter's parameters require gradients and the encoder
    follows ``train()``, as after :func:`add_lora`.

    Raises:
        ConfigError: the model already has an adapter.
        CheckpointError: missing or unusable adapter files.
    """
    if has_lora(model.encoder):
        raise ConfigError("this model already has a LoRA adapter (merge_lora it first)")
    model.config.encoder.lora = load_peft_adapter(model.encoder, directory)
    if trainable:
        for p in lora_parameters(model):
            p.requires_grad_(True)
        model.encoder.trainable = True
    return model


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
