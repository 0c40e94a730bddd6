"""What the reward guards cost: ``model.score`` with ``guard="off"`` against ``guard="flag"``.

The signal checks run on the CPU over each input waveform (numpy, no gradient), next to the model's
forward. This measures both policies side by side on the same clips, interleaved, and prints the
median seconds per clip and the ratio. CPU times only compare runs made together on one machine.

    python benchmarks/guard_overhead.py --preset tiny --clips 8 --seconds 20 --repeats 5
    python benchmarks/guard_overhead.py --preset mert-v1-95m --clips 4 --seconds 30 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from apex_reward import ApexConfig, ApexRewardModel


def _clips(n: int, seconds: float, rate: int, seed: int) -> list[tuple[np.ndarray, int]]:
    """Procedural music-like clips: a few partials with vibrato and noise, ``[T]`` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for _ in range(n):
        x = sum(
            rng.uniform(0.05, 0.2)
            * np.sin(2 * np.pi * rng.uniform(80, 2000) * t + rng.uniform(0, 3) * np.sin(3 * t))
            for _ in range(6)
        )
        x = x + 0.01 * rng.standard_normal(t.shape)
        out.append((x.astype(np.float32), rate))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=int, default=44100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ApexRewardModel.from_config(
        ApexConfig.from_preset(args.preset, encoder_source=None), encoder="random"
    ).eval()
    clips = _clips(args.clips, args.seconds, args.rate, seed=1)
    model.score(clips[:1], guard="flag", num_workers=0)  # warm-up (kernels, pyloudnorm import)
    times: dict[str, list[float]] = {"off": [], "flag": []}
    for _ in range(args.repeats):
        for policy in ("off", "flag"):
            t0 = time.perf_counter()
            results = model.score(clips, guard=policy, num_workers=0)
            times[policy].append((time.perf_counter() - t0) / len(clips))
            assert all(r.ok for r in results)
    off, flag = statistics.median(times["off"]), statistics.median(times["flag"])
    print(
        f"preset={args.preset} clips={args.clips}x{args.seconds:g}s@{args.rate}Hz "
        f"threads={args.threads} repeats={args.repeats}"
    )
    print(f"guard=off : {off * 1000:.1f} ms/clip (median)")
    print(f"guard=flag: {flag * 1000:.1f} ms/clip (median)")
    print(f"ratio flag/off: {flag / off:.2f}  (signal checks {1000 * (flag - off):.1f} ms/clip)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
