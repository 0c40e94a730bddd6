"""``apex-reward`` with a null encoder: what the reward server costs without the model.

    python benchmarks/null_serve.py serve --model CKPT [serve flags]

runs the real ``apex-reward serve`` (same flags, same code path: body reading, decoding, checks,
guard signals, resampling, queueing, batching, the front end, the heads, the JSON answer), except
that the encoder returns zeros of its output shape instead of running. The serving path's own
ceiling is then measured on any machine (``benchmarks/server_load.py --null-model``). Scores are
meaningless. Benchmark code, not part of the package.
"""

from __future__ import annotations

import sys

import torch

import apex_reward.loading as loading
from apex_reward.cli import main
from apex_reward.model import ApexRewardModel


def null_encoder(model: ApexRewardModel) -> ApexRewardModel:
    """Replace ``model``'s encoder forward by zeros ``[N, L, H]`` (its output shape)."""
    layers = len(model.encoder.layers)
    hidden = int(model.encoder.model.config.hidden_size)

    def forward(audio: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        return torch.zeros(audio.shape[0], layers, hidden, device=audio.device)

    model.encoder.forward = forward
    return model


_load_model = loading.load_model


def _load_null(*args, **kwargs) -> ApexRewardModel:
    return null_encoder(_load_model(*args, **kwargs))


if __name__ == "__main__":
    loading.load_model = _load_null  # serve() imports load_model from apex_reward.loading
    sys.exit(main(sys.argv[1:]))
