"""Pairwise preference features and the fitted, differentiable preference head (docs/model.md#preference).

For each score dimension ``s`` present in both songs' outputs (up to 10: the seven predicted tasks
plus popularity, songeval and overall) the features are ``s_diff = a - b``,
``s_ratio = a / (b + eps)`` and ``s_diff_x_instrumental = (a - b) * is_instrumental``, plus
``is_instrumental`` itself: 31 features for a full model. The same function computes them for
scikit-learn (numpy in, numpy out, via torch) and inside the model, so a fitted logistic model
gives the same logit in both places and stays differentiable with respect to the waveforms.

:class:`PreferenceMixin` gives :class:`~apex_reward.ApexRewardModel` its preference methods:
``logit P(A > B)`` from two outputs (the fitted head, or Bradley–Terry on the reward with the
calibrated temperature, plus per-system offsets) and from two batches of waveforms.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .audio import WaveformInput, as_waveform_list, per_song_rates
from .calibration import describe_preference
from .conditioning import ConditionArg
from .config import PreferenceHeadConfig
from .errors import ConfigError, UnknownConditionError
from .outputs import ApexOutput

if TYPE_CHECKING:
    from .config import ApexConfig

__all__ = [
    "PAIR_SCORE_DIMS",
    "pairwise_feature_names",
    "pairwise_features",
    "PreferenceHead",
    "system_offsets_tensor",
    "PreferenceMixin",
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


class PreferenceMixin:
    """Pairwise preference methods of :class:`~apex_reward.ApexRewardModel` (they read its
    ``config`` and ``preference_head`` and call the model on waveforms)."""

    config: ApexConfig
    preference_head: nn.Module | None

    @property
    def preference_calibration(self) -> dict[str, Any]:
        """Which preference model and calibration :meth:`preference_logits` uses: a fitted
        preference head, a fitted Bradley–Terry temperature (with the data it came from) or the
        fixed one (:func:`apex_reward.calibration.describe_preference`)."""
        return describe_preference(self.config)

    def preference_logits_from_outputs(
        self,
        out_a: ApexOutput,
        out_b: ApexOutput,
        *,
        is_instrumental: torch.Tensor | float | None = None,
        systems_a: str | Sequence[str | None] | None = None,
        systems_b: str | Sequence[str | None] | None = None,
    ) -> torch.Tensor:
        """``logit P(A > B)`` from two outputs of the same batch size. ``[B]``.

        With a fitted preference head (docs/model.md#preference-head) it is the head's logistic model over the
        pairwise features; otherwise Bradley–Terry on the reward,
        ``(r_A - r_B) / preference.temperature`` (fitted by maximum likelihood at the end of
        training or by ``apex-reward calibrate``; :attr:`preference_calibration` says which is in
        use). When ``systems_a``/``systems_b`` name the
        generators of A and B (one name or one per pair), the per-system offsets in
        ``preference.system_offsets`` are added: ``+ offset[system_a] - offset[system_b]``
        (unknown systems: 0).
        """
        if self.preference_head is not None:
            logit = self.preference_head(
                out_a.scores, out_b.scores, is_instrumental=is_instrumental
            )
        else:
            logit = (out_a.reward - out_b.reward) / self.config.preference.temperature
        if systems_a is not None or systems_b is not None:
            offsets = self.config.preference.system_offsets
            n = logit.shape[0]
            shift = system_offsets_tensor(
                offsets, systems_a, n, device=logit.device
            ) - system_offsets_tensor(offsets, systems_b, n, device=logit.device)
            logit = logit + shift.to(logit.dtype)
        return logit

    def preference_logits(
        self,
        a: WaveformInput,
        b: WaveformInput,
        sample_rate: int | Sequence[int],
        *,
        sample_rate_b: int | Sequence[int] | None = None,
        is_instrumental: torch.Tensor | float | None = None,
        systems_a: str | Sequence[str | None] | None = None,
        systems_b: str | Sequence[str | None] | None = None,
        condition: ConditionArg = None,
    ) -> torch.Tensor:
        """``logit P(A_i > B_i)`` for paired batches ``a`` and ``b``; differentiable. ``[B]``.

        Both batches go through the encoder in one pass. ``sample_rate_b`` defaults to
        ``sample_rate``. ``is_instrumental`` (``[B]`` or scalar 0/1) is used by a fitted
        preference head whose features include it (default 0). ``systems_a``/``systems_b``
        (generator names) add the per-system offsets, see
        :meth:`preference_logits_from_outputs`. ``condition``: a conditioned checkpoint's
        audience, one value for every pair or one (or None) per pair; both songs of a pair are
        scored for it.
        """
        la, lb = as_waveform_list(a), as_waveform_list(b)
        if len(la) != len(lb):
            raise ConfigError(f"preference_logits: {len(la)} songs in a but {len(lb)} in b")
        ra = per_song_rates(sample_rate, len(la), "sample_rate (of a)")
        if sample_rate_b is None:
            rb = per_song_rates(sample_rate, len(lb), "sample_rate (of b)")
        else:
            rb = per_song_rates(sample_rate_b, len(lb), "sample_rate_b")
        n = len(la)
        if condition is not None and not isinstance(condition, str):
            condition = list(condition)
            if len(condition) != n:
                raise UnknownConditionError(
                    f"preference_logits: {len(condition)} conditions for {n} pairs (give one "
                    "value, or one per pair)"
                )
            condition = condition + condition
        out = self(la + lb, ra + rb, condition=condition)
        out_a = ApexOutput(scores={k: v[:n] for k, v in out.scores.items()}, reward=out.reward[:n])
        out_b = ApexOutput(scores={k: v[n:] for k, v in out.scores.items()}, reward=out.reward[n:])
        return self.preference_logits_from_outputs(
            out_a, out_b, is_instrumental=is_instrumental, systems_a=systems_a, systems_b=systems_b
        )
