"""Checkpoint files: a directory with ``config.json`` + ``model.safetensors``. No pickle.

``config.json`` holds the :class:`~apex_reward.config.ApexConfig` plus ``weights_sha256``, the
SHA-256 of ``model.safetensors``; loading verifies it, so a truncated or tampered weights file is
reported instead of silently changing scores. The same tensors always give the same file (and
checksum). When the encoder is stored, ``encoder_sha256`` (:func:`~apex_reward.files.tensors_digest` of the encoder
and adapter tensors) identifies the weights that cached embeddings depend on, whatever the heads. Files are written to a temporary name and renamed,
so an interrupted save never leaves a half-written checkpoint behind under the final names.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError
from .files import file_sha256, tensors_digest

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_DIGEST_KEY = "weights_sha256"
ENCODER_DIGEST_KEY = "encoder_sha256"

__all__ = [
    "save_checkpoint",
    "read_checkpoint",
    "resolve_checkpoint_dir",
    "resolve_encoder_source",
    "read_config_json",
    "split_digests",
    "state_mismatch",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_DIGEST_KEY",
    "ENCODER_DIGEST_KEY",
]


def state_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any]) -> str | None:
    """How ``state`` (name -> tensor) fails to match ``expected`` -- missing, unexpected and
    wrong-shape keys, a few of each -- or None when it matches."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}"
        for k in set(state) & set(expected)
        if state[k].shape != expected[k].shape
    )
    parts = [
        f"{what} {keys[:6]}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    return "; ".join(parts) or None


def split_digests(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A ``config.json`` dict -> ``(ApexConfig fields, the digests save_checkpoint added)``."""
    keys = (WEIGHTS_DIGEST_KEY, ENCODER_DIGEST_KEY)
    return (
        {k: v for k, v in raw.items() if k not in keys},
        {k: raw[k] for k in keys if k in raw},
    )


def save_checkpoint(
    directory: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
) -> Path:
    """Write ``config`` (JSON-able dict) and ``tensors`` to ``directory``; returns the directory."""
    from safetensors.torch import save_file

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    weights_tmp = out / (WEIGHTS_NAME + ".tmp")
    config_tmp = out / (CONFIG_NAME + ".tmp")
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    # one metadata key: safetensors writes several in a per-process random order, which made the
    # bytes (and the checksum) of identical weights differ from one save to the next
    save_file(flat, str(weights_tmp), metadata={"format": "pt"})
    data = dict(config)
    data[WEIGHTS_DIGEST_KEY] = file_sha256(weights_tmp)
    encoder = {k: v for k, v in flat.items() if k.startswith(("encoder.", "encoder_lora."))}
    if encoder:
        data[ENCODER_DIGEST_KEY] = tensors_digest(encoder)
    config_tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    umask = os.umask(0)
    os.umask(umask)
    for f in (weights_tmp, config_tmp):
        os.chmod(f, 0o666 & ~umask)
    os.replace(weights_tmp, out / WEIGHTS_NAME)
    os.replace(config_tmp, out / CONFIG_NAME)
    return out


def resolve_checkpoint_dir(
    path_or_id: str | Path,
    revision: str | None = None,
    *,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """A local checkpoint directory, downloading a hub repo id if ``path_or_id`` is not a path.

    ``revision``, ``token``, ``cache_dir`` and ``local_files_only`` go to
    ``huggingface_hub.snapshot_download`` (hub ids only)."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(
                f"{str(path_or_id)!r} is a file; a checkpoint is a directory with "
                f"{CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        return p
    s = str(path_or_id)
    if s.startswith("hf-hub:"):
        s = s[len("hf-hub:") :]
    elif s.startswith((".", "/", "~")) or s.count("/") != 1:
        raise CheckpointError(f"checkpoint directory {s!r} does not exist")
    elif Path(s.split("/")[0]).is_dir():  # "runs/typo" next to a local runs/: not a hub id
        raise CheckpointError(
            f"checkpoint directory {s!r} does not exist (for a hub repo of that name, write "
            f"hf-hub:{s})"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                s,
                revision=revision,
                allow_patterns=[CONFIG_NAME, WEIGHTS_NAME],
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        )
    except Exception as e:
        raise CheckpointError(
            f"no local directory {s!r}, and fetching it as a hub repo id failed: "
            f"{type(e).__name__}: {e}"
        ) from e


def read_checkpoint(
    path_or_id: str | Path,
    *,
    revision: str | None = None,
    verify: bool = True,
    trust_unverified: bool = False,
    **hub: Any,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    """Read a checkpoint (``hub``: ``token``/``cache_dir``/``local_files_only`` for hub ids,
    see :func:`resolve_checkpoint_dir`).

    Args:
        verify: check ``model.safetensors`` against ``weights_sha256`` in ``config.json``.
        trust_unverified: with ``verify``, accept a ``config.json`` that has no
            ``weights_sha256`` (the weights are then read unchecked); without it such a
            checkpoint is refused.

    Returns:
        ``(config_dict, tensors, directory)``.

    Raises:
        CheckpointError: missing directory or files, unreadable or invalid JSON, no checksum
            (unless ``trust_unverified``), truncated or corrupt safetensors, or a checksum
            mismatch (the weights file was modified).
        ConfigError: ``config.json`` is not a JSON object or holds a non-finite number.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = resolve_checkpoint_dir(path_or_id, revision, **hub)
    cfg_path = directory / CONFIG_NAME
    w_path = directory / WEIGHTS_NAME
    for f in (cfg_path, w_path):
        if not f.is_file():
            raise CheckpointError(f"{str(directory)!r} is not a checkpoint: {f.name} is missing")
    config = read_config_json(cfg_path)
    config, digests = split_digests(config)
    expected = digests.get(WEIGHTS_DIGEST_KEY)
    if verify and expected is None and not trust_unverified:
        raise CheckpointError(
            f"{cfg_path} has no {WEIGHTS_DIGEST_KEY}, so {WEIGHTS_NAME} cannot be verified; "
            "re-save the checkpoint with save_pretrained, or pass trust_unverified=True if you "
            "trust where it came from"
        )
    if verify and expected is not None:
        actual = file_sha256(w_path)
        if actual != expected:
            raise CheckpointError(
                f"{w_path}: checksum mismatch (file is truncated or was modified): "
                f"sha256 {actual[:12]}..., config.json expects {str(expected)[:12]}..."
            )
    try:
        tensors = load_file(str(w_path))
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{w_path}: corrupt or truncated safetensors file ({e})") from e
    return config, tensors, directory


def _reject_constant(name: str) -> float:
    raise ConfigError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def read_config_json(path: Path) -> dict[str, Any]:
    """``config.json`` as a dict: UTF-8 JSON, an object, finite numbers only.

    Raises:
        CheckpointError: unreadable, not UTF-8, invalid or too deeply nested JSON.
        ConfigError: not a JSON object, or a ``NaN``/``Infinity`` value.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        config = json.loads(text, parse_constant=_reject_constant)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e
    except RecursionError as e:
        raise CheckpointError(f"{path}: invalid JSON (nested too deeply to be a config)") from e
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def resolve_encoder_source(directory: Path, source: str | None) -> str | None:
    """The encoder ``source`` recorded in ``directory/config.json``, with a relative local path
    resolved against the checkpoint folder (not the working directory).

    Absolute paths and hub ids (``org/name`` with no such folder in the checkpoint) come back as
    they are.

    Raises:
        CheckpointError: a relative path that leads outside the checkpoint folder.
    """
    from .encoder import looks_like_path

    if not source or source.startswith("~") or Path(source).is_absolute():
        return source
    target = directory / source
    if not (looks_like_path(source) or target.exists()):
        return source  # a hub id
    root = directory.resolve()
    resolved = target.resolve()
    if resolved != root and root not in resolved.parents:
        raise CheckpointError(
            f"{directory / CONFIG_NAME}: encoder source {source!r} leads outside the checkpoint "
            f"folder (to {resolved}); a relative source must stay inside it"
        )
    return str(resolved)
