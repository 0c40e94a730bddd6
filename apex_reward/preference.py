"""Pairwise preference features and the fitted, differentiable preference head (docs/model.md#preference).

For each score dimension ``s`` present in both songs' outputs (up to 10: the seven predicted tasks
plus popularity, songeval and overall) the features are ``s_diff = a - b``,
``s_ratio = a / (b + eps)`` and ``s_diff_x_instrumental = (a - b) * is_instrumental``, plus
``is_instrumental`` itself: 31 features for a full model. The same function computes them for
scikit-learn (numpy in, numpy out, via torch) and inside the model, so a fitted logistic model
gives the same logit in both places and stays differentiable with respect to the waveforms.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .config import PreferenceHeadConfig
from .errors import ConfigError

__all__ = [
    "PAIR_SCORE_DIMS",
    "pairwise_feature_names",
    "pairwise_features",
    "PreferenceHead",
    "system_offsets_tensor",
]

#: Score dimensions used for pairwise features, in feature order.
PAIR_SCORE_DIMS: tuple[str, ...] = (
    "streams",
    "likes",
    "coherence",
    "musicality",
    "memorability",
    "clarity",
    "naturalness",
    "popularity",
    "songeval",
    "overall",
)


def pairwise_feature_names(score_names: Sequence[str]) -> list[str]:
    """Feature names for a model whose outputs include ``score_names``."""
    dims = [d for d in PAIR_SCORE_DIMS if d in score_names]
    names = [f"{d}_diff" for d in dims]
    names += [f"{d}_ratio" for d in dims]
    names += [f"{d}_diff_x_instrumental" for d in dims]
    return names + ["is_instrumental"]


def pairwise_features(
    scores_a: Mapping[str, torch.Tensor],
    scores_b: Mapping[str, torch.Tensor],
    is_instrumental: torch.Tensor | float | None,
    names: Sequence[str],
    *,
    ratio_eps: float = 1e-6,
) -> torch.Tensor:
    """Compute the named pairwise features. Scores are ``{name: [B]}``; returns ``[B, F]`` float64.

    ``is_instrumental`` is ``[B]`` (0/1) or a scalar; ``None`` means 0.
    """
    ref = next(iter(scores_a.values()))
    batch = ref.shape[0]
    if is_instrumental is None:
        inst = torch.zeros(batch, dtype=torch.float64, device=ref.device)
    else:
        inst = torch.as_tensor(is_instrumental, dtype=torch.float64, device=ref.device)
        inst = inst.expand(batch) if inst.ndim == 0 else inst
    cols = []
    for name in names:
        if name == "is_instrumental":
            cols.append(inst)
            continue
        dim, _, kind = name.partition("_")
        if dim not in scores_a or dim not in scores_b:
            raise KeyError(f"preference feature {name!r} needs score {dim!r}, which is missing")
        a = scores_a[dim].to(torch.float64)
        b = scores_b[dim].to(torch.float64)
        if kind == "diff":
            cols.append(a - b)
        elif kind == "ratio":
            cols.append(a / (b + ratio_eps))
        elif kind == "diff_x_instrumental":
            cols.append((a - b) * inst)
        else:
            raise KeyError(f"unknown preference feature {name!r}")
    return torch.stack(cols, dim=1)


class PreferenceHead(nn.Module):
    """Logistic preference model in torch: ``logit = ((x - mean) / scale) @ coef + intercept``.

    Its parameters live in ``config.json`` (``preference.head``) as plain numbers; the module's
    buffers are rebuilt from them (float64, not saved in ``model.safetensors``).
    """

    def __init__(self, config: PreferenceHeadConfig) -> None:
        super().__init__()
        self.config = config
        self.names = list(config.features)
        n = len(self.names)
        f64 = torch.float64
        self.register_buffer("coef", torch.tensor(config.coef, dtype=f64), persistent=False)
        self.register_buffer(
            "intercept", torch.tensor(config.intercept, dtype=f64), persistent=False
        )
        mean = config.mean if config.mean is not None else [0.0] * n
        scale = config.scale if config.scale is not None else [1.0] * n
        self.register_buffer("mean", torch.tensor(mean, dtype=f64), persistent=False)
        self.register_buffer("scale", torch.tensor(scale, dtype=f64), persistent=False)

    def forward(
        self,
        scores_a: Mapping[str, torch.Tensor],
        scores_b: Mapping[str, torch.Tensor],
        *,
        is_instrumental: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``{name: [B]}`` x 2 -> ``[B]`` logit P(A > B) (dtype of the scores)."""
        x = pairwise_features(
            scores_a, scores_b, is_instrumental, self.names, ratio_eps=self.config.ratio_eps
        )
        f64 = torch.float64  # buffers stay float64 even after model.half()/.to(dtype)
        logit = ((x - self.mean.to(f64)) / self.scale.to(f64)) @ self.coef.to(f64)
        logit = logit + self.intercept.to(f64)
        return logit.to(next(iter(scores_a.values())).dtype)


def system_offsets_tensor(
    offsets: Mapping[str, float],
    systems: str | Sequence[str | None] | None,
    batch: int,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Per-generator Bradley–Terry offsets (``preference.system_offsets``) of a batch. ``[B]``.

    ``systems`` is one name for the whole batch, ``B`` names (None for unknown), or None (all 0).
    Systems without an offset get 0 (with a warning naming them, when offsets exist at all).
    """
    out = torch.zeros(batch, dtype=torch.float64, device=device)
    if systems is None:
        return out
    if isinstance(systems, str):
        names = [systems] * batch
    elif isinstance(systems, Sequence) and all(n is None or isinstance(n, str) for n in systems):
        names = list(systems)
    else:
        raise ConfigError(f"system names: expected a string or a list of strings, got {systems!r}")
    if len(names) != batch:
        raise ConfigError(f"system names: got {len(names)} for a batch of {batch}")
    values = []
    for name in names:
        if name is not None and name not in offsets and offsets:
            warnings.warn(
                f"no preference offset for system {name!r}; using 0 (known: {sorted(offsets)})",
                stacklevel=3,
            )
        values.append(float(offsets.get(name, 0.0)) if name is not None else 0.0)
    return torch.tensor(values, dtype=torch.float64, device=device)
