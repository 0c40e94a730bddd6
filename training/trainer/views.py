"""Training-time augmentation of the head's inputs: augmented views and feature masking.

* **Views** (a store extracted with ``apex-reward extract --views N``, song mode,
  ``--sample-views``): every epoch each training song is represented by one of its N views,
  drawn uniformly (view 0, the song itself, included) with a generator seeded by
  ``(seed, epoch)``; validation, test, calibration and OOD statistics use view 0.
* **View consistency** (``--view-consistency w``, default 10, whenever views are sampled): each
  training song is also scored on a second view, drawn uniformly from its other views, and
  ``w`` times the squared difference of the two unit-range predictions (weighted per task like
  the regression error) is added to the loss. Sampling alone shows the head each view with the song's label; the penalty
  asks it outright to give a song the same score whatever its preview clip, gain (clipping
  included) or roll. Both passes keep their dropout, so the penalty also damps dropout's
  variance (as R-Drop does).
* **SpecAugment-style masking** of the pooled features ``[L, H]`` of each training sample (a
  song in song mode, a segment in segment mode): ``--mask-features p`` replaces ``round(p * H)``
  hidden dimensions, drawn per sample, in every layer (SpecAugment's frequency mask: the hidden
  axis stands for the channel axis, but MERT's dimensions have no order, so they are drawn
  singly rather than as a band); ``--mask-layers k`` replaces ``k`` whole encoder layers, drawn
  per sample (the time mask's counterpart: the layer axis is the only other axis left after
  pooling over time and segments). Masked entries take the training split's mean of that
  (layer, dimension), the neutral value, rather than 0 (MERT features are not zero-mean). The
  draws are seeded by ``(seed, epoch, step)`` over the global batch, so they do not depend on
  the number of processes.

Both are recorded in the exported checkpoint's ``training`` provenance
(:func:`augmentation_provenance`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from apex_reward.errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig
    from .data import SplitData, TrainingData

__all__ = ["InputAugment", "augmentation_provenance"]


def _generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by the integers ``key`` (hashed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([k % 2**63 for k in key]).generate_state(2, np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class InputAugment:
    """Builds each training batch's inputs: the drawn views, then the masks.

    Args:
        split: the training split (``features`` ``[M, L, H]`` is view 0; ``extra_views``
            ``[V-1, M, L, H]`` or None).
        config: ``seed``, ``sample_views``, ``view_consistency``, ``mask_features``,
            ``mask_layers``.
    """

    def __init__(self, split: SplitData, config: TrainConfig) -> None:
        self.split = split
        self.seed = config.seed
        self.extra = split.extra_views if config.sample_views else None
        self.num_views = 1 + (0 if self.extra is None else int(self.extra.shape[0]))
        self.consistency = float(config.view_consistency) if self.num_views > 1 else 0.0
        _, layers, hidden = split.features.shape
        if config.mask_layers >= layers:
            raise ConfigError(
                f"mask_layers: {config.mask_layers} of the features' {layers} layers would leave "
                "none unmasked"
            )
        self.layers_masked = config.mask_layers
        self.dims_masked = int(round(config.mask_features * hidden))
        self.fill = None
        if self.layers_masked or self.dims_masked:
            self.fill = split.features.float().mean(dim=0)  # [L, H]
        self._epoch: tuple[int, torch.Tensor] | None = None

    @classmethod
    def for_run(cls, split: SplitData, config: TrainConfig) -> InputAugment | None:
        """The augmentation of a run, or None when it has none (no views, no masks)."""
        aug = cls(split, config)
        return aug if aug.num_views > 1 or aug.fill is not None else None

    def epoch_views(self, epoch: int) -> torch.Tensor:
        """``[M]`` int64: the view each training sample uses in ``epoch``."""
        if self._epoch is None or self._epoch[0] != epoch:
            g = _generator(self.seed, epoch, 1)
            self._epoch = (epoch, torch.randint(self.num_views, (len(self.split),), generator=g))
        return self._epoch[1]

    def batch(self, idx: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """``[len(idx), L, H]`` inputs of the training samples ``idx`` (the global batch) in
        ``epoch``, ``step``: each sample's drawn view, then the masks."""
        if self.extra is None:
            x = self.split.features[idx].float()
        else:
            x = self._gather(idx, self.epoch_views(epoch)[idx])
        return self._mask(x, _generator(self.seed, epoch, step, 2))

    def partner_batch(self, idx: torch.Tensor, epoch: int, step: int) -> torch.Tensor:
        """``[len(idx), L, H]``: for view consistency, another view of each sample of
        :meth:`batch` (uniform over the views other than the drawn one, seeded by ``(seed,
        epoch, step)``), with masks of its own.

        Raises:
            ConfigError: the run samples no views.
        """
        if self.extra is None:
            raise ConfigError(
                "view consistency needs sampled views: a store extracted with --views N "
                "(N >= 2) and --sample-views"
            )
        g = _generator(self.seed, epoch, step, 3)
        step_by = torch.randint(1, self.num_views, (len(idx),), generator=g)
        other = (self.epoch_views(epoch)[idx] + step_by) % self.num_views
        return self._mask(self._gather(idx, other), _generator(self.seed, epoch, step, 4))

    def _gather(self, idx: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """``[len(idx), L, H]`` float32: sample ``idx[i]`` from view ``chosen[i]``."""
        x = self.split.features[idx].float()
        for v in range(1, self.num_views):
            sel = chosen == v
            if bool(sel.any()):
                x[sel] = self.extra[v - 1, idx[sel]].float()
        return x

    def _mask(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """``x`` ``[n, L, H]`` with the masked entries at the training mean (as is without
        masking)."""
        if self.fill is None:
            return x
        n, layers, hidden = x.shape
        masked = torch.zeros(n, layers, hidden, dtype=torch.bool)
        if self.dims_masked:
            dims = torch.rand(n, hidden, generator=g).argsort(dim=1)[:, : self.dims_masked]
            masked |= torch.zeros(n, hidden, dtype=torch.bool).scatter_(1, dims, True)[:, None]
        if self.layers_masked:
            lay = torch.rand(n, layers, generator=g).argsort(dim=1)[:, : self.layers_masked]
            masked |= torch.zeros(n, layers, dtype=torch.bool).scatter_(1, lay, True)[..., None]
        return torch.where(masked, self.fill, x)


def augmentation_provenance(config: TrainConfig, data: TrainingData) -> dict[str, Any]:
    """What the checkpoint's ``training`` record says about views and masks (empty when the
    run used neither)."""
    out: dict[str, Any] = {}
    extra = data.splits["train"].extra_views
    if config.sample_views and extra is not None:
        out["views"] = {
            "recipe": data.views,
            "num_views": 1 + int(extra.shape[0]),
            "sampling": "one view per training song per epoch, uniform over views 0..N-1, "
            "seeded by (seed, epoch); evaluation, calibration and OOD statistics on view 0",
        }
        if config.view_consistency:  # active: views are sampled
            out["views"]["consistency"] = {
                "weight": config.view_consistency,
                "penalty": "squared difference of the unit-range predictions of the drawn view "
                "and a second, different view of the same song (seeded by (seed, epoch, step)), "
                "weighted per task like the regression error",
            }
    if config.mask_features or config.mask_layers:
        out["feature_masking"] = {
            "mask_features": config.mask_features,
            "mask_layers": config.mask_layers,
            "axes": "hidden dimensions (the same in every layer) and whole layers, per sample",
            "fill": "the training split's mean of each (layer, hidden) feature",
            "seeded_by": "(seed, epoch, step)",
        }
    return out
