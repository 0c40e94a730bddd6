"""Short clips at their own cost: ``segment_padding="none"`` vs ``"full"`` on the same clips.

Scores ``--clips`` procedural clips of ``--seconds`` s at ``--rate`` Hz with ``model.score`` under
both settings of one random-weight model of ``--preset`` (same weights, same run, interleaved
repeats), and reports the median time per clip of each (wall clock, and this process's CPU time,
which shared cores disturb less), their ratios, and how far the two settings'
rewards are apart (``none`` encodes a 10 s clip as 10 s; ``full`` pads it to a 30 s segment, which
the encoder sees, so scores differ: a model is trained in one setting and scored in it).

    python benchmarks/segment_padding.py --preset tiny --clips 8 --seconds 10 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import synth_music  # noqa: E402

from apex_reward import ApexConfig, ApexRewardModel  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rate", type=int, default=24000, help="sample rate of the clips, Hz")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8, help="segments per encoder call")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guard", default="off", choices=["off", "flag", "penalize"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full = ApexRewardModel.from_config(ApexConfig.from_preset(args.preset), encoder="random")
    full.to(args.device).set_precision("fp32")
    none = copy.deepcopy(full)
    none.config.frontend.segment_padding = "none"
    assert full.config.frontend.segment_padding == "full"
    clips = [
        (torch.from_numpy(synth_music(args.seconds, args.rate, seed=i)[0]), args.rate)
        for i in range(args.clips)
    ]
    models = {"full": full, "none": none}
    times: dict[str, list[float]] = {k: [] for k in models}
    cpu: dict[str, list[float]] = {k: [] for k in models}
    rewards: dict[str, list[float]] = {}
    for name, m in models.items():  # warm-up (kernel caches, resampler filters)
        rewards[name] = [
            r.reward for r in m.score(clips, batch_size=args.batch_size, guard=args.guard)
        ]
    for _ in range(args.repeats):
        for name, m in models.items():
            t0, c0 = time.perf_counter(), time.process_time()
            out = m.score(clips, batch_size=args.batch_size, num_workers=0, guard=args.guard)
            times[name].append((time.perf_counter() - t0) / len(clips))
            cpu[name].append((time.process_time() - c0) / len(clips))
            assert all(r.ok for r in out)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    result = {
        "preset": args.preset,
        "clips": args.clips,
        "seconds": args.seconds,
        "rate": args.rate,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "guard": args.guard,
        "ms_per_clip": {k: round(1000 * v, 1) for k, v in med.items()},
        "speedup_none_over_full": round(med["full"] / med["none"], 2),
        # CPU time of this process: less disturbed than wall time when the cores are shared
        "cpu_ms_per_clip": {k: round(1000 * v, 1) for k, v in med_cpu.items()},
        "cpu_speedup_none_over_full": round(med_cpu["full"] / med_cpu["none"], 2),
        "max_abs_reward_diff_none_vs_full": max(
            abs(a - b) for a, b in zip(rewards["none"], rewards["full"])
        ),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
        "load_1min": os.getloadavg()[0],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
