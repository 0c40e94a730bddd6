"""Gradient ascent on a synthesiser's parameters through the differentiable APEX reward.

APEX's forward pass is differentiable with respect to the waveform (front end, resampler and
frozen MERT are all torch ops), so a differentiable sound generator can be optimised directly
against it: here an additive synthesiser (the amplitudes of 8 harmonics and a decay rate are
learnable; the pitch too with ``--learn-pitch``) plays a 1 s note, and Adam maximises
``model(waveform, sr).reward``. The gradient with respect to pitch passes through ``sin`` of a
phase that grows with time, so it oscillates: learning the pitch makes the ascent jumpy.

    python examples/differentiable_synth.py --steps 30

The default reward model is the tiny demo checkpoint (random encoder; what it rewards is
deterministic but not musical; see note_lm.py). Pass ``--model DIR`` for a trained one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import note_lm  # noqa: E402


class AdditiveSynth(nn.Module):
    """``f0 * k`` harmonics with learnable amplitudes and an exponential decay -> ``[T]``."""

    def __init__(
        self, harmonics: int = 8, f0: float = 220.0, seed: int = 0, learn_pitch: bool = False
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.log_f0 = nn.Parameter(torch.tensor(math.log(f0)), requires_grad=learn_pitch)
        self.amp_logits = nn.Parameter(torch.randn(harmonics, generator=g))
        self.log_decay = nn.Parameter(torch.tensor(math.log(3.0)))

    def forward(self, seconds: float = 1.0, sample_rate: int = note_lm.SAMPLE_RATE) -> torch.Tensor:
        t = torch.arange(int(seconds * sample_rate)) / sample_rate
        k = torch.arange(1, self.amp_logits.numel() + 1, dtype=torch.float32)
        phases = 2 * math.pi * self.log_f0.exp() * k[:, None] * t[None, :]
        amps = torch.softmax(self.amp_logits, dim=0)
        envelope = torch.exp(-self.log_decay.exp() * t) * (1 - torch.exp(-200.0 * t))
        return 0.5 * envelope * (amps[:, None] * torch.sin(phases)).sum(0)


def main(argv: list[str] | None = None) -> dict:
    note_lm.offline()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="APEX checkpoint (default: the tiny demo model)")
    p.add_argument("--out", default=None, help="output directory (default: a temporary one)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--learn-pitch", action="store_true", help="also optimise the pitch")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    from apex_reward import ApexRewardModel

    out = Path(args.out or tempfile.mkdtemp(prefix="diff_synth_"))
    model_dir = args.model or note_lm.build_demo_reward_model(out / "apex-demo", seed=args.seed)
    model = ApexRewardModel.from_pretrained(model_dir, device="cpu")  # frozen, eval mode
    synth = AdditiveSynth(seed=args.seed, learn_pitch=args.learn_pitch)
    opt = torch.optim.Adam([p for p in synth.parameters() if p.requires_grad], lr=args.lr)
    rewards = []
    for _ in range(args.steps):
        reward = model(synth()[None], note_lm.SAMPLE_RATE).reward[0]
        opt.zero_grad()
        (-reward).backward()  # gradient ascent: the gradient flows through MERT to the synth
        opt.step()
        rewards.append(float(reward.detach()))
    with torch.no_grad():
        final = float(model(synth()[None], note_lm.SAMPLE_RATE).reward[0])
    result = {
        "reward_start": rewards[0],
        "reward_end": final,
        "rewards": rewards,
        "f0_hz": float(synth.log_f0.exp()),
        "harmonic_amplitudes": torch.softmax(synth.amp_logits, 0).tolist(),
    }
    (out / "synth_result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rewards"}, indent=2))
    return result


if __name__ == "__main__":
    main()
