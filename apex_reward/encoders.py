"""Which encoder class a config builds: MERT (``HubertModel``) or AST (``ASTModel``).

``EncoderConfig.family`` selects it (docs/model.md#encoders); both classes share one interface,
so everything downstream of :func:`build_encoder` / :func:`load_encoder` is encoder-agnostic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .ast_encoder import AstEncoder
from .config import EncoderConfig
from .encoder import MertEncoder

__all__ = ["ENCODER_CLASSES", "Encoder", "build_encoder", "load_encoder"]

Encoder = MertEncoder | AstEncoder

ENCODER_CLASSES: dict[str, type[MertEncoder] | type[AstEncoder]] = {
    "mert": MertEncoder,
    "ast": AstEncoder,
}


def build_encoder(config: EncoderConfig, model: Any | None = None) -> Encoder:
    """The encoder of ``config.family`` around ``model`` (random weights when omitted)."""
    return ENCODER_CLASSES[config.family](config, model)


def load_encoder(config: EncoderConfig, hub: Mapping[str, Any] | None = None) -> Encoder:
    """The encoder of ``config.family`` with the weights named by ``config.source``/``revision``;
    ``hub``: ``huggingface_hub.snapshot_download`` keyword arguments (``token``, ``cache_dir``,
    ``local_files_only``) when the source is a hub id.

    Raises:
        CheckpointError: unreachable source, or weights that do not fit the architecture.
    """
    return ENCODER_CLASSES[config.family].from_pretrained(config, hub)
