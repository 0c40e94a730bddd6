"""What a head ensemble costs: scoring with K heads against one head, side by side.

Both models share the same (random-weight) encoder of the preset's shape; the ensemble adds K-1
heads that run on the encoder's features (the encoder runs once). Two measurements, interleaved
on the same clips in one run, medians over the repeats:

* ``model.score`` (files/arrays path, ``inference_mode``), seconds per clip;
* the differentiable forward + backward to the waveform (what an RL trainer pays), seconds per
  batch.

    python benchmarks/ensemble_cost.py --preset mert-v1-95m --heads 5 --clips 2 --seconds 30 --repeats 3
    python benchmarks/ensemble_cost.py --preset tiny --heads 5 --clips 8 --seconds 20 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import numpy as np
import torch

from apex_reward import ApexConfig, ApexRewardModel


def _clips(n: int, seconds: float, rate: int, seed: int) -> list[np.ndarray]:
    """Procedural music-like clips, ``[T]`` float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    out = []
    for _ in range(n):
        x = sum(
            rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(80, 2000) * t) for _ in range(6)
        )
        out.append((x + 0.01 * rng.standard_normal(t.shape)).astype(np.float32))
    return out


def build(preset: str, heads: int) -> tuple[ApexRewardModel, ApexRewardModel]:
    """A single-head model and a ``heads``-member ensemble sharing one encoder."""
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset(preset, encoder_source=None)
    single = ApexRewardModel.from_config(cfg, encoder="random").eval()
    ens_cfg = copy.deepcopy(cfg)
    ens_cfg.ensemble_size = heads
    ensemble = ApexRewardModel(ens_cfg, single.encoder).eval()
    ensemble.head.load_state_dict(single.head.state_dict())
    return single.requires_grad_(False), ensemble.requires_grad_(False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--heads", type=int, default=5)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--rate", type=int, default=24000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    single, ensemble = build(args.preset, args.heads)
    clips = _clips(args.clips, args.seconds, args.rate, seed=1)
    items = [(c, args.rate) for c in clips]
    batch = torch.from_numpy(np.stack(clips))
    models = {"1 head": single, f"{args.heads} heads": ensemble}
    for m in models.values():  # warm-up
        m.score(items[:1], guard="off", num_workers=0)
    score_t: dict[str, list[float]] = {k: [] for k in models}
    grad_t: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, m in models.items():
            t0 = time.perf_counter()
            results = m.score(items, guard="off", num_workers=0)
            score_t[name].append((time.perf_counter() - t0) / len(items))
            assert all(r.ok for r in results)
            x = batch.clone().requires_grad_(True)
            t0 = time.perf_counter()
            m(x, args.rate, guard="off").reward.sum().backward()
            grad_t[name].append(time.perf_counter() - t0)
    one, many = models
    print(
        f"preset={args.preset} clips={args.clips}x{args.seconds:g}s@{args.rate}Hz "
        f"threads={args.threads} repeats={args.repeats}"
    )
    for label, table, unit in (
        ("score", score_t, "s/clip"),
        ("forward+backward", grad_t, "s/batch"),
    ):
        a, b = statistics.median(table[one]), statistics.median(table[many])
        print(f"{label:17s} {one}: {a:.4f} {unit}  {many}: {b:.4f} {unit}  ratio {b / a:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
