"""Loading and saving LoRA adapters on the MERT encoder (PEFT), as checkpoints record them.

The core needs this to rebuild an adapter that ``config.json`` records (``encoder.lora``) when
:meth:`~apex_reward.ApexRewardModel.from_pretrained` loads a checkpoint, and to split an
adapted encoder's weights when saving one. Adding, training and merging adapters is the PEFT
integration's job (:mod:`apex_reward.integrations.lora`). ``peft`` is imported only when an adapter
is actually built (:func:`~apex_reward.errors.require` names the extra that provides it).

The adapter is injected with ``peft.functional.inject_adapter_in_model`` (PEFT's API for models
that are not a ``PeftModel``), so the encoder keeps its module structure and ``MertEncoder``'s
forward is unchanged. Checkpoints stay safetensors: the base encoder under ``encoder.`` (plain
HubertModel names, only when stored) and the adapter under ``encoder_lora.`` (PEFT's
adapter-name-free keys, e.g. ``encoder.layers.0.attention.q_proj.lora_A.weight``).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint import state_mismatch
from .config import LoraAdapterConfig
from .errors import CheckpointError, ConfigError, require

if TYPE_CHECKING:
    from .encoder import MertEncoder
    from .model import ApexRewardModel

__all__ = [
    "attach_lora",
    "inject_lora",
    "has_lora",
    "lora_parameters",
    "split_lora_state_dict",
    "save_peft_adapter",
    "load_peft_adapter",
    "PEFT_CONFIG_NAME",
    "PEFT_WEIGHTS_NAME",
]

#: PEFT's own adapter layout (what ``PeftModel.save_pretrained`` writes)
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
#: key prefix of a ``PeftModel`` wrapping the encoder's HubertModel
_PEFT_PREFIX = "base_model.model."

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


def inject_lora(encoder: MertEncoder, cfg: LoraAdapterConfig) -> None:
    """Inject a fresh (untrained) adapter described by ``cfg`` into ``encoder``, in place."""
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
    inject_lora(encoder, cfg)
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
            :func:`~apex_reward.integrations.lora.add_lora`, or ``encoder.lora`` set on an encoder without one).
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


def lora_parameters(model: ApexRewardModel | MertEncoder) -> list[nn.Parameter]:
    """The adapter's parameters (``lora_A``/``lora_B`` of every adapted layer)."""
    encoder = model.encoder if hasattr(model, "head") else model
    return [
        p
        for n, p in encoder.model.named_parameters()  # type: ignore[union-attr]
        if any(part.startswith("lora_") for part in n.split("."))
    ]


def save_peft_adapter(encoder: MertEncoder, directory: str | Path) -> Path:
    """Write ``encoder``'s adapter in PEFT's own layout: ``adapter_config.json`` +
    ``adapter_model.safetensors``, keyed as ``PeftModel.save_pretrained`` keys a LoRA on the
    encoder's HubertModel (``base_model.model.<module>.lora_A.weight``). ``ApexRewardModel.
    save_pretrained`` writes these next to its own files for a model with an adapter.

    The adapter config names the encoder's weight source as ``base_model_name_or_path``, so
    ``peft.PeftConfig.from_pretrained(directory)`` describes the adapter and
    ``peft.PeftModel.from_pretrained(HubertModel, directory)`` rebuilds it on a plain encoder.

    Raises:
        ConfigError: the encoder has no adapter.
    """
    cfg = encoder.config.lora
    if cfg is None or not has_lora(encoder):
        raise ConfigError("the encoder has no LoRA adapter to save")
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    peft_cfg = _peft_config(cfg)
    peft_cfg.base_model_name_or_path = encoder.config.source
    peft_cfg.revision = encoder.config.revision
    peft_cfg.inference_mode = True
    peft_cfg.save_pretrained(str(out))
    state = {
        _PEFT_PREFIX + k: v.detach().to("cpu").contiguous().clone()
        for k, v in _adapter_keys(encoder).items()
    }
    tmp = out / (PEFT_WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / PEFT_WEIGHTS_NAME)
    return out


def load_peft_adapter(encoder: MertEncoder, directory: str | Path) -> LoraAdapterConfig:
    """Attach an adapter saved in PEFT's layout (by :func:`save_peft_adapter` or by PEFT for
    this encoder) to ``encoder``, frozen; returns the :class:`LoraAdapterConfig` it describes
    (record it as ``config.encoder.lora`` so that ``save_pretrained`` keeps it).

    Raises:
        CheckpointError: missing files, an adapter type other than LoRA, options APEX's adapter
            does not rebuild, or tensors that do not fit the encoder.
    """
    peft = require("peft", "trl", "LoRA adapters")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    src = Path(directory)
    for name in (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME):
        if not (src / name).is_file():
            raise CheckpointError(f"{src}: not a PEFT adapter directory, {name} is missing")
    try:
        pc = peft.PeftConfig.from_pretrained(str(src))
    except Exception as e:  # PEFT raises ValueError/TypeError/JSON errors for bad files
        raise CheckpointError(f"{src / PEFT_CONFIG_NAME}: {type(e).__name__}: {e}") from e
    if str(getattr(pc, "peft_type", "")).upper().rsplit(".", 1)[-1] != "LORA":
        raise CheckpointError(f"{src}: a {pc.peft_type} adapter; only LoRA adapters are supported")
    unsupported = [
        k
        for k, default in (("use_dora", False), ("use_rslora", False), ("bias", "none"))
        if getattr(pc, k, default) != default
    ]
    if getattr(pc, "rank_pattern", None) or getattr(pc, "alpha_pattern", None):
        unsupported.append("rank_pattern/alpha_pattern")
    if unsupported:
        raise CheckpointError(f"{src}: LoRA options APEX does not rebuild: {unsupported}")
    targets = pc.target_modules
    if isinstance(targets, str):
        raise CheckpointError(f"{src}: target_modules as a regex ({targets!r}) is not supported")
    try:
        cfg = LoraAdapterConfig(
            r=int(pc.r),
            alpha=float(pc.lora_alpha),
            dropout=float(pc.lora_dropout),
            target_modules=tuple(sorted(targets)),
        )
    except ConfigError as e:
        raise CheckpointError(f"{src / PEFT_CONFIG_NAME}: {e}") from e
    try:
        raw = load_file(str(src / PEFT_WEIGHTS_NAME))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{src / PEFT_WEIGHTS_NAME}: corrupt safetensors file ({e})") from e
    state = {k[len(_PEFT_PREFIX) :] if k.startswith(_PEFT_PREFIX) else k: v for k, v in raw.items()}
    attach_lora(encoder, cfg, state, where=src)
    return cfg
