"""Loading an :class:`~apex_reward.model.ApexRewardModel` checkpoint: read and verify the files,
split the tensors by part (head, encoder, LoRA, preference head, ensemble members, OOD statistics),
rebuild or load the encoder, and load every part strictly (docs/checkpoints.md#loading)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import ensemble as ensemble_heads
from . import ood as ood_score
from .checkpoint import read_checkpoint, resolve_encoder_source, state_mismatch
from .config import ApexConfig
from .encoders import build_encoder, load_encoder
from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from .model import ApexRewardModel

__all__ = ["load_pretrained", "load_strict"]


def load_pretrained(
    cls: type[ApexRewardModel],
    path_or_id: str | Path,
    *,
    revision: str | None = None,
    encoder_source: str | None = None,
    device: str | torch.device | None = None,
    freeze: bool = True,
    verify: bool = True,
    fast: bool | None = None,
    trust_unverified: bool = False,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> ApexRewardModel:
    """The work of :meth:`ApexRewardModel.from_pretrained` (see it for the arguments): returns the
    model of class ``cls`` in eval mode.

    Raises:
        CheckpointError, ConfigError: missing/corrupt/tampered files or invalid config fields.
    """
    raw, tensors, directory = read_checkpoint(
        path_or_id,
        revision=revision,
        verify=verify,
        trust_unverified=trust_unverified,
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
    )
    try:
        config = ApexConfig.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{directory / 'config.json'}: {e}") from e
    groups: dict[str, dict[str, torch.Tensor]] = {
        "head": {},
        "encoder": {},
        "encoder_lora": {},
        "preference": {},
        "ensemble": {},
        "ood": {},
    }
    for key, value in tensors.items():
        prefix, _, rest = key.partition(".")
        if prefix not in groups:
            raise CheckpointError(f"{directory}: unexpected tensor {key!r} in model.safetensors")
        groups[prefix][rest] = value
    if config.encoder.stored:
        if encoder_source is not None:
            raise ConfigError(
                f"{directory} stores its encoder weights; an encoder source (--encoder "
                f"{encoder_source}) applies only to checkpoints that reference their encoder"
            )
        encoder = build_encoder(config.encoder)
        load_strict(encoder.model, groups["encoder"], "encoder", directory)
    else:
        if groups["encoder"]:
            raise CheckpointError(
                f"{directory}: config says the encoder is not stored, but model.safetensors "
                "holds encoder weights"
            )
        if encoder_source is not None and encoder_source != config.encoder.source:
            # the recorded revision belongs to the recorded source, not to this one
            config.encoder.source, config.encoder.revision = encoder_source, None
        else:
            config.encoder.source = resolve_encoder_source(directory, config.encoder.source)
        # the checkpoint's hub options reach the encoder download too (a referenced MERT/AST)
        hub = {"token": token, "cache_dir": cache_dir, "local_files_only": local_files_only}
        encoder = load_encoder(config.encoder, hub)
    if config.encoder.lora is not None:
        # LoRA hook: rebuild the adapter recorded in config.json (needs peft)
        from .lora import attach_lora

        attach_lora(encoder, config.encoder.lora, groups["encoder_lora"], where=directory)
    elif groups["encoder_lora"]:
        raise CheckpointError(f"{directory}: LoRA weights without encoder.lora in config.json")
    model = cls(config, encoder)
    load_strict(model.head, groups["head"], "head", directory)
    ensemble_heads.load_members(model, groups["ensemble"], directory)
    ood_score.load_statistics(model, groups["ood"], directory)
    if model.preference_head is not None:
        load_strict(model.preference_head, groups["preference"], "preference", directory)
    elif groups["preference"]:
        raise CheckpointError(f"{directory}: preference weights without a preference config")
    if freeze:
        model.requires_grad_(False)
    elif config.encoder.lora is not None:
        from .lora import lora_parameters

        for p in lora_parameters(model):
            p.requires_grad_(True)
        model.encoder.trainable = True
    if device is not None:
        model.to(device)
    model.fast_path = fast
    if fast:
        model.set_fast_path(True)
    return model.eval()


def load_strict(
    module: nn.Module, state: dict[str, torch.Tensor], name: str, directory: Path
) -> None:
    """Load ``state`` into ``module`` strictly, naming the part and what does not match.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped tensors.
    """
    problem = state_mismatch(module.state_dict(), state)
    if problem:
        raise CheckpointError(f"{directory}: {name} weights do not match config.json: {problem}")
    module.load_state_dict(state, strict=True)
