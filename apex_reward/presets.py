"""Encoder presets: the named encoder configurations ``ApexConfig.from_preset`` and
``apex-reward init --preset`` accept (docs/model.md#presets).

Each MERT preset's ``hubert`` dict holds ``HubertConfig`` keyword arguments, each AST preset's
``ASTConfig`` ones; hub ids are pinned to a commit (``revision``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ENCODER_FAMILIES", "ENCODER_PRESETS", "list_presets"]


_MERT_BASE: dict[str, Any] = dict(
    conv_dim=[512] * 7,
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_bias=False,
    feat_extract_norm="group",
    feat_extract_activation="gelu",
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    feat_proj_layer_norm=True,
    apply_spec_augment=True,
)

#: The AST presets' front end: 16 kHz, 10.24 s segments (1024 filterbank frames), and each segment
#: scaled to -20 dBFS RMS before the filterbank, since a log-mel filterbank reads absolute level
#: and the gain of a clip should not move its reward (the floor, -100 dBFS, keeps a song turned
#: down by 40 dB at its level; near-silent gradients are bounded by gradient_gate_db).
_AST_FRONTEND: dict[str, Any] = dict(
    sample_rate=16000,
    segment_seconds=10.24,
    normalize=True,
    normalize_level_db=-20.0,
    normalize_floor=1e-10,
)

ENCODER_PRESETS: dict[str, dict[str, Any]] = {
    "mert-v1-95m": dict(
        source="m-a-p/MERT-v1-95M",
        revision="12af15fef9d0ac838c3f475bfbbf26d2060dd4f5",
        layers=(3, 6, 9, -1),
        hubert=dict(
            _MERT_BASE,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            do_stable_layer_norm=False,
            mask_time_prob=0.05,
        ),
    ),
    "mert-v1-330m": dict(
        source="m-a-p/MERT-v1-330M",
        revision="5240c2708a5acaee1007f43fb9735c7dcd0b78c9",
        layers=(3, 6, 9, -1),
        hubert=dict(
            _MERT_BASE,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            do_stable_layer_norm=True,
            mask_time_prob=0.075,
            tie_last_hidden_states=True,
        ),
    ),
    # Randomly initialised, MERT-shaped, for tests and the offline demo (no weights to download).
    # hidden_states has 3 entries (input of layer 1, output of layers 1 and 2).
    "tiny": dict(
        source=None,
        revision=None,
        layers=(0, 1, 2, -1),
        hubert=dict(
            _MERT_BASE,
            conv_dim=[32] * 7,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            do_stable_layer_norm=False,
            mask_time_prob=0.05,
        ),
    ),
    # Audio Spectrogram Transformer (apex_reward/ast_encoder.py): 16 kHz log-mel input, the
    # dicts are ASTConfig keyword arguments, the front end is the preset's own.
    "ast-audioset": dict(
        family="ast",
        source="MIT/ast-finetuned-audioset-10-10-0.4593",
        revision="f826b80d28226b62986cc218e5cec390b1096902",
        layers=(3, 6, 9, -1),
        frontend=_AST_FRONTEND,
        hubert=dict(
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            qkv_bias=True,
            patch_size=16,
            frequency_stride=10,
            time_stride=10,
            max_length=1024,
            num_mel_bins=128,
        ),
    ),
    # Randomly initialised, AST-shaped, for tests (weights stored in the checkpoint).
    "ast-tiny": dict(
        family="ast",
        source=None,
        revision=None,
        layers=(0, 1, 2, -1),
        frontend=_AST_FRONTEND,
        hubert=dict(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            patch_size=16,
            frequency_stride=10,
            time_stride=10,
            max_length=1024,
            num_mel_bins=128,
        ),
    ),
}

#: Encoder families (apex_reward/encoders.py); ``encoder.hubert`` holds that family's config.
ENCODER_FAMILIES: tuple[str, ...] = ("mert", "ast")


def list_presets() -> list[str]:
    """Names of the encoder presets ``ApexConfig.from_preset`` and ``apex-reward init`` accept."""
    return sorted(ENCODER_PRESETS)
