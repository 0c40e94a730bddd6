"""SongEval's aesthetic head, re-implemented, and the feature models it reads.

SongEval (ASLP-lab) labels a song with five aesthetic scores in [1, 5] — coherence, musicality,
memorability, clarity, naturalness — from the hidden states of a MuQ music encoder. Its released
model is a small head over those hidden states; this module holds our own implementation of that
head, built from the ``generator`` section of SongEval's ``config.yaml`` and loaded from its released
``model.safetensors`` with exactly its key layout (``attn.{i}.in_proj_weight`` …, ``ffd.0.weight``,
``ffd.2.weight``, ``fc.weight``). A missing or unexpected key is a :class:`CheckpointError` (the
upstream evaluator loads non-strictly; we do not).

The head, for hidden states ``x`` ``[B, T, D]``:

1. ``h = ffd(x)`` — Linear(D, F) → ReLU → Linear(F, D);
2. ``a = attn_L(… attn_1(h) …)`` — L self-attention layers (8 heads each), chained without
   residual connections;
3. ``z = concat(mean_T(a), max_T(h))`` ``[B, 2D]``;
4. ``y = 3 + 2 · tanh(fc(z))`` ``[B, 5]``, in the order coherence, musicality, memorability,
   clarity, naturalness.

Licences: SongEval's code and weights are CC BY-NC-SA 4.0 (non-commercial); MuQ's weights carry
their own licence (see docs/data.md#licences). Labels made with them inherit those terms.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apex_reward.errors import CheckpointError, ConfigError, require

__all__ = [
    "SONGEVAL_ORDER",
    "SongEvalHeadConfig",
    "SongEvalHead",
    "read_songeval_config",
    "load_songeval_head",
    "FeatureModel",
    "MuqFeatures",
    "TinyFeatures",
    "feature_model",
]

#: the order of SongEval's five outputs (its evaluator's), as apex-reward's manifest columns
SONGEVAL_ORDER: tuple[str, ...] = (
    "coherence",
    "musicality",
    "memorability",
    "clarity",
    "naturalness",
)
#: attention heads per layer: fixed in SongEval's code, not in its config
SONGEVAL_ATTENTION_HEADS = 8


@dataclass(frozen=True)
class SongEvalHeadConfig:
    """The ``generator`` section of SongEval's ``config.yaml``.

    Attributes:
        in_features: width D of the feature model's hidden states (MuQ-large: 1024).
        ffd_hidden_size: width F of the feed-forward block.
        num_classes: outputs; SongEval has 5.
        attn_layer_num: self-attention layers L.
    """

    in_features: int = 1024
    ffd_hidden_size: int = 4096
    num_classes: int = 5
    attn_layer_num: int = 4

    def __post_init__(self) -> None:
        for name in ("in_features", "ffd_hidden_size", "num_classes", "attn_layer_num"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 1 << 16:
                raise ConfigError(
                    f"SongEval generator.{name}: expected an integer in [1, 65536], got {v!r}"
                )
        if self.in_features % SONGEVAL_ATTENTION_HEADS:
            raise ConfigError(
                f"SongEval generator.in_features: {self.in_features} is not divisible by the "
                f"{SONGEVAL_ATTENTION_HEADS} attention heads"
            )
        if self.num_classes != len(SONGEVAL_ORDER):
            raise ConfigError(
                f"SongEval generator.num_classes: {self.num_classes}; the labels need "
                f"{len(SONGEVAL_ORDER)} ({', '.join(SONGEVAL_ORDER)})"
            )


def read_songeval_config(path: str | Path) -> SongEvalHeadConfig:
    """The head's architecture from SongEval's ``config.yaml`` (its ``generator`` section).

    Only the four architecture numbers are read; the ``_target_`` entry (a Python import path that
    the upstream code instantiates through Hydra) is ignored — nothing in the file is executed.

    Raises:
        ConfigError: the file is missing, not YAML, or lacks a ``generator`` mapping.
    """
    yaml = require("yaml", "train", "reading SongEval's config.yaml")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"SongEval config {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"SongEval config {p}: not readable YAML ({e})") from e
    gen = data.get("generator") if isinstance(data, dict) else None
    if not isinstance(gen, dict):
        raise ConfigError(f"SongEval config {p}: no 'generator' section")
    fields = ("in_features", "ffd_hidden_size", "num_classes", "attn_layer_num")
    missing = [f for f in fields if f not in gen]
    if missing:
        raise ConfigError(f"SongEval config {p}: generator lacks {missing}")
    return SongEvalHeadConfig(**{f: gen[f] for f in fields})


class SongEvalHead(nn.Module):
    """SongEval's aesthetic head (see the module docstring for the computation).

    Module names follow the released checkpoint's keys so that its ``model.safetensors`` loads
    strictly. Dropout (0.2 in training) is inactive in eval mode, which is how labels are made.
    """

    def __init__(self, config: SongEvalHeadConfig) -> None:
        super().__init__()
        self.config = config
        d = config.in_features
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(d, SONGEVAL_ATTENTION_HEADS, dropout=0.2, batch_first=True)
            for _ in range(config.attn_layer_num)
        )
        self.ffd = nn.Sequential(
            nn.Linear(d, config.ffd_hidden_size), nn.ReLU(), nn.Linear(config.ffd_hidden_size, d)
        )
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(2 * d, config.num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` hidden states -> ``[B, 5]`` labels in [1, 5] (:data:`SONGEVAL_ORDER`)."""
        if features.ndim != 3 or features.shape[-1] != self.config.in_features:
            raise ConfigError(
                f"SongEval head: expected features [B, T, {self.config.in_features}], "
                f"got {list(features.shape)}"
            )
        h = self.ffd(features)
        a = h
        for layer in self.attn:
            a, _ = layer(a, a, a, need_weights=False)
        z = self.dropout(torch.cat([a.mean(dim=1), h.amax(dim=1)], dim=1))
        return 3.0 + 2.0 * torch.tanh(self.fc(z))


def load_songeval_head(
    checkpoint: str | Path, config: str | Path | SongEvalHeadConfig | None = None
) -> SongEvalHead:
    """Build the head from ``config`` and load the released ``model.safetensors`` strictly.

    Args:
        checkpoint: the released weights file (``ckpt/model.safetensors`` in SongEval's layout).
        config: SongEval's ``config.yaml`` (or a parsed config); None looks for ``config.yaml``
            in the checkpoint's folder and then its parent (the released layout).

    Raises:
        CheckpointError: the file is missing, unreadable, or its keys/shapes do not match.
        ConfigError: the config is missing or malformed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise CheckpointError(f"SongEval checkpoint {str(ckpt)!r} does not exist")
    if config is None:
        candidates = [ckpt.parent / "config.yaml", ckpt.parent.parent / "config.yaml"]
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise ConfigError(
                f"no SongEval config.yaml next to {ckpt} or in its parent; pass its path"
            )
        config = found
    cfg = config if isinstance(config, SongEvalHeadConfig) else read_songeval_config(config)
    try:
        state = load_file(str(ckpt), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"SongEval checkpoint {ckpt}: not a readable safetensors file ({e})"
        ) from e
    head = SongEvalHead(cfg)
    expected = head.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"SongEval checkpoint {ckpt} does not match the head built from its config: "
            f"missing {missing[:5]}{' …' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"SongEval checkpoint {ckpt}: {k} has shape {list(state[k].shape)}, the config "
            f"implies {list(expected[k].shape)}"
        )
    nonfinite = [
        k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if nonfinite:
        raise CheckpointError(f"SongEval checkpoint {ckpt}: non-finite values in {nonfinite[0]}")
    head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return head.eval()


# ----------------------------------------------------------------------------------------------
# feature models: waveform [T] at sample_rate -> hidden states [1, T', D]


class FeatureModel(nn.Module):
    """A frozen audio encoder whose hidden states SongEval's head reads.

    ``forward(wav)`` maps one mono waveform ``[T]`` at :attr:`sample_rate` Hz to ``[1, T', D]``.
    """

    sample_rate: int = 24_000
    dim: int = 0


class MuqFeatures(FeatureModel):
    """MuQ (``pip install muq``) hidden states of layer ``layer`` — SongEval's features.

    SongEval runs ``OpenMuQ/MuQ-large-msd-iter`` on the whole song at 24 kHz and reads
    ``hidden_states[6]``; those are the defaults.
    """

    def __init__(
        self,
        source: str = "OpenMuQ/MuQ-large-msd-iter",
        revision: str | None = None,
        layer: int = 6,
    ) -> None:
        super().__init__()
        muq = require("muq", "label", "apex-reward label --features muq")
        kwargs: dict[str, Any] = {"revision": revision} if revision else {}
        try:
            self.model = muq.MuQ.from_pretrained(source, **kwargs).eval()
        except Exception as e:  # network, missing files, an incompatible muq release
            raise CheckpointError(f"could not load MuQ {source!r}: {e}") from e
        self.layer = layer
        self.dim = int(getattr(getattr(self.model, "config", None), "encoder_dim", 1024) or 1024)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        out = self.model(wav.reshape(1, -1), output_hidden_states=True)
        return out["hidden_states"][self.layer]


class TinyFeatures(FeatureModel):
    """A small random-weight HuBERT (stock ``transformers.HubertModel``) as a stand-in for MuQ.

    For tests and the synthetic recipe only: its hidden states carry no aesthetic information, so
    labels made with it measure nothing. Deterministic for a given ``seed``.
    """

    def __init__(self, dim: int = 32, layer: int = 2, seed: int = 0) -> None:
        super().__init__()
        from transformers import HubertConfig, HubertModel

        cfg = HubertConfig(
            hidden_size=dim,
            num_hidden_layers=max(2, layer),
            num_attention_heads=4,
            intermediate_size=2 * dim,
            conv_dim=(16, 16, 16),
            conv_stride=(5, 4, 4),
            conv_kernel=(10, 4, 4),
            num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4,
        )
        gen = torch.random.fork_rng(devices=[])
        with gen:
            torch.manual_seed(seed)
            self.model = HubertModel(cfg).eval()
        self.layer = layer
        self.dim = dim

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        out = self.model(wav.reshape(1, -1), output_hidden_states=True)
        return out.hidden_states[self.layer]


def feature_model(
    kind: str, *, source: str | None = None, revision: str | None = None, layer: int | None = None
) -> FeatureModel:
    """The feature model named ``kind`` (``muq`` or ``tiny``), frozen, in eval mode.

    Raises:
        ConfigError: an unknown kind.
        MissingDependencyError: ``muq`` without the ``label`` extra installed.
    """
    if kind == "muq":
        m: FeatureModel = MuqFeatures(
            source or "OpenMuQ/MuQ-large-msd-iter", revision, 6 if layer is None else layer
        )
    elif kind == "tiny":
        m = TinyFeatures(layer=2 if layer is None else layer)
    else:
        raise ConfigError(f"features: unknown feature model {kind!r}; expected 'muq' or 'tiny'")
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def write_random_release(
    root: str | Path, config: SongEvalHeadConfig, *, seed: int = 0, scale: float = 0.05
) -> Path:
    """Write a random-weight SongEval release (``config.yaml`` + ``ckpt/model.safetensors``).

    The layout and key names of SongEval's repository, for tests and the synthetic recipe: its
    labels mean nothing. ``scale`` is the weights' standard deviation (small keeps the labels
    away from the ends of [1, 5]). Returns ``root``.
    """
    from safetensors.torch import save_file

    root = Path(root)
    (root / "ckpt").mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(
        "generator:\n  _target_: model.Generator\n"
        + "".join(f"  {k}: {v}\n" for k, v in dataclasses.asdict(config).items())
    )
    g = torch.Generator().manual_seed(seed)
    state = {
        k: torch.randn(v.shape, generator=g) * scale
        for k, v in SongEvalHead(config).state_dict().items()
    }
    save_file(state, str(root / "ckpt" / "model.safetensors"))
    return root


def _main(argv: list[str] | None = None) -> int:
    """``python -m apex_reward.training.songeval --write-random DIR``: a random release."""
    import argparse

    p = argparse.ArgumentParser(description=write_random_release.__doc__.splitlines()[0])
    p.add_argument("--write-random", metavar="DIR", required=True)
    p.add_argument("--in-features", type=int, default=32)
    p.add_argument("--ffd-hidden-size", type=int, default=48)
    p.add_argument("--attn-layer-num", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    cfg = SongEvalHeadConfig(a.in_features, a.ffd_hidden_size, 5, a.attn_layer_num)
    write_random_release(a.write_random, cfg, seed=a.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
