"""Conditioned popularity: a categorical input (platform, region, ...) of the APEX head.

Audiences differ: what streams on one platform need not stream on another. A conditioned head
(``HeadConfig.condition``, :class:`~apex_reward.config.ConditionConfig`) learns one vector per
value of a manifest column, fixed at training time, plus one more, the *average* vector. Where
the vector enters the trunk is the configured ``mode`` (docs/model.md#conditioning):

* ``token``: a vector of width ``dim`` is concatenated to the trunk's input, the song embedding
  ``[H]`` (the trunk's first linear layer reads ``H + dim`` features);
* ``embedding``: a vector of the trunk's first width (512) is added to the trunk's hidden state
  after its first block (``Linear -> BatchNorm -> GELU -> Dropout``), before the second.

An unconditioned call uses the average vector. It is trained by *condition dropout*: during
training each song's condition is replaced by the average with probability ``dropout``, so the
average vector learns to predict a song's target without knowing its audience -- the average
over conditions in the proportions of the training data. (The plain mean of the learned vectors
would be an untrained point: the head is non-linear in the vector.)

A checkpoint without ``condition`` builds none of this: its weights and scores are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .config import ConditionConfig
from .errors import UnknownConditionError

__all__ = [
    "ConditionInput",
    "ConditionArg",
    "trunk_input_width",
    "condition_indices",
    "per_input_conditions",
    "column_indices",
    "column_vocabulary",
]

#: What a caller may pass as ``condition=``: None (the learned average), one value for every
#: song, or one value (or None) per song.
ConditionArg = str | Sequence[str | None] | None


def trunk_input_width(hidden_size: int, config: ConditionConfig | None) -> int:
    """Width of the trunk's input: ``H``, plus the token's width in mode ``token``."""
    if config is not None and config.mode == "token":
        return hidden_size + config.dim
    return hidden_size


class ConditionInput(nn.Module):
    """The learned condition vectors of a head and where they enter its trunk.

    Args:
        config: the vocabulary, mode, token width and condition dropout.
        trunk_widths: the trunk's output widths (the ``embedding`` vector has the first one).

    Attributes:
        table: ``nn.Embedding(V + 1, width)``; row ``V`` (``average_index``) is the average.
    """

    def __init__(self, config: ConditionConfig, trunk_widths: Sequence[int]) -> None:
        super().__init__()
        self.config = config
        width = config.dim if config.mode == "token" else int(trunk_widths[0])
        self.table = nn.Embedding(len(config.values) + 1, width)
        nn.init.normal_(self.table.weight, std=1.0 if config.mode == "token" else 0.1)

    @property
    def average_index(self) -> int:
        return len(self.config.values)

    def vectors(self, index: torch.Tensor | None, num: int) -> torch.Tensor:
        """``[M]`` condition indices (None: all average) -> ``[M, width]`` vectors. In training
        mode each index is replaced by the average with probability ``config.dropout``."""
        device = self.table.weight.device
        if index is None:
            index = torch.full((num,), self.average_index, dtype=torch.long, device=device)
        index = index.to(device=device, dtype=torch.long)
        if index.shape != (num,):
            raise UnknownConditionError(
                f"condition indices have shape {tuple(index.shape)}, expected ({num},)"
            )
        if self.training and self.config.dropout > 0:
            drop = torch.rand(num, device=device) < self.config.dropout
            index = torch.where(drop, torch.full_like(index, self.average_index), index)
        return self.table(index)

    def run_trunk(
        self, trunk: nn.Sequential, embeddings: torch.Tensor, index: torch.Tensor | None
    ) -> torch.Tensor:
        """``[M, H]`` embeddings and ``[M]`` condition indices -> ``[M, W]`` trunk output."""
        vec = self.vectors(index, embeddings.shape[0]).to(embeddings.dtype)
        if self.config.mode == "token":
            return trunk(torch.cat([embeddings, vec], dim=-1))
        h = embeddings
        for i, layer in enumerate(trunk):
            if i == 4:  # after Linear -> BatchNorm -> GELU -> Dropout of the first block
                h = h + vec
            h = layer(h)
        return h


def _unknown(config: ConditionConfig, value: Any) -> UnknownConditionError:
    return UnknownConditionError(
        f"unknown {config.column} {value!r}; this checkpoint knows {config.values} "
        "(or no condition: the learned average)"
    )


def condition_indices(
    config: ConditionConfig | None,
    condition: ConditionArg,
    num_songs: int,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Resolve a ``condition=`` argument to ``[B]`` int64 indices (None: the average for all).

    Raises:
        UnknownConditionError: a value outside the checkpoint's vocabulary (the message names
            the known values), a list of the wrong length, or a condition given to a
            checkpoint without conditioning.
    """
    if condition is None:
        return None
    if config is None:
        raise UnknownConditionError(
            f"condition={condition!r} given, but this checkpoint has no conditioning input "
            "(train it with --condition COLUMN)"
        )
    if isinstance(condition, str):
        values: list[str | None] = [condition] * num_songs
    else:
        values = list(condition)
        if len(values) != num_songs:
            raise UnknownConditionError(
                f"condition: {len(values)} values for {num_songs} songs (give one value, or "
                "one per song)"
            )
    lookup = {v: i for i, v in enumerate(config.values)}
    out = []
    for v in values:
        if v is None:
            out.append(len(config.values))
        elif not isinstance(v, str) or v not in lookup:
            raise _unknown(config, v)
        else:
            out.append(lookup[v])
    return torch.tensor(out, dtype=torch.long, device=device)


def per_input_conditions(
    config: ConditionConfig | None, condition: ConditionArg, num_inputs: int
) -> list[str | None] | None:
    """A ``condition=`` argument checked (:func:`condition_indices`'s errors) and spread to one
    value (or None) per input; None when no condition is given."""
    if condition is None:
        return None
    condition_indices(config, condition, num_inputs)
    return [condition] * num_inputs if isinstance(condition, str) else list(condition)


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def column_vocabulary(values: Sequence[Any]) -> list[str]:
    """The sorted distinct values of a manifest column (missing ones left out)."""
    return sorted({str(v) for v in values if not _is_missing(v)})


def column_indices(values: Sequence[Any], vocabulary: Sequence[str]) -> tuple[torch.Tensor, int]:
    """A manifest column -> ``[N]`` int64 indices into ``vocabulary``; missing values and values
    outside it map to the average index ``len(vocabulary)``. Returns the indices and how many
    values were outside the vocabulary (missing ones not counted)."""
    lookup = {v: i for i, v in enumerate(vocabulary)}
    avg = len(vocabulary)
    out, unseen = [], 0
    for v in values:
        if _is_missing(v):
            out.append(avg)
            continue
        i = lookup.get(str(v))
        if i is None:
            unseen += 1
            out.append(avg)
        else:
            out.append(i)
    return torch.tensor(out, dtype=torch.long), unseen
