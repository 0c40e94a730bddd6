"""The gradient attack under each defence: how fast Adam on the waveform beats real music.

Adam (lr 1e-3, full scale = 1) ascends the reward of a 10 s, 24 kHz waveform directly, starting
from -15 dBFS white noise and from a real clip (the shared clip with the median plain reward,
its first 10 s). Each defence (``training/audit/defences.py``) changes the objective:

* ``plain``: the model's reward, no checks (guard ``off``);
* ``guards``: guard ``penalize`` (a flagged waveform gets the floor, zero gradient);
* ``guards_ood``: (b) guards + the smooth OOD penalty (needs OOD statistics);
* ``robust_guards``: the robust reward (K transforms, fresh each step) + guards;
* ``robust_guards_ood_pessimistic``: (c) robust K + guards + OOD + pessimistic (mean - k*std over a
  head ensemble; needs one).

For each defence the target is the best reward of the real clips (cut to ``--clip-seconds``)
under that same defence; the result is the first step whose reward beats it (``steps_to_beat``,
None = never within ``--steps``) and the reward after the last step. A defence the checkpoint
cannot provide is recorded as unavailable with the reason. Every attack stops at
``--time-limit-s`` (the table says at which step), so the run time is bounded by about
``defences x time limit`` plus scoring the clips.

    python benchmarks/gradient_attack.py --model runs/demo/train/model \\
        --audio ../shared/audio --defences plain,guards,guards_ood,robust_guards,\\
robust_guards_ood_pessimistic --steps 100 --robust 8 --out runs/gradient_attack.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apex_reward.loading import ModelOptions, load_model
from apex_reward.training.audit.defence_attack import attack_under_defences, defences_table
from apex_reward.training.audit.defences import DEFENCES, availability
from apex_reward.training.audit.guarded import guarded_forward
from apex_reward.training.audit.probes import (
    NOISE_RMS,
    PROBE_RATE,
    load_reference_clips,
    to_probe_rate,
)


def _report(results: list[dict], args, loaded, available, total: float) -> str:
    table = defences_table(results)
    summary = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": args.model,
        "clips": [c.name for c in loaded],
        "available": available,
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "seconds_total": total,
        "median_seconds_per_defence": statistics.median(
            [r["seconds"] for r in results if "seconds" in r] or [0.0]
        ),
        "load_average": os.getloadavg(),
        "results": results,
        "table": table,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="runs/demo/train/model", help="checkpoint directory")
    p.add_argument("--audio", default="../shared/audio", help="real clips (file or directory)")
    p.add_argument("--defences", default=",".join(DEFENCES), help="comma-separated names")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seconds", type=float, default=10.0, help="attacked waveform length")
    p.add_argument("--clip-seconds", type=float, default=30.0, help="real clips cut to this")
    p.add_argument("--robust", type=int, default=8, help="K of the robust defences")
    p.add_argument("--ood-penalty-weight", type=float, default=None, help="unset: checkpoint's")
    p.add_argument("--pessimism-k", type=float, default=None, help="unset: checkpoint's")
    p.add_argument("--time-limit-s", type=float, default=600.0, help="per defence and start")
    p.add_argument(
        "--starts", default="noise,clip", help="attack starts: noise and/or clip (comma-separated)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.defences.split(",") if n.strip()]
    unknown = [n for n in names if n not in DEFENCES]
    if unknown:
        p.error(f"unknown defences {unknown}; known: {', '.join(DEFENCES)}")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model = load_model(ModelOptions(model=args.model, device=args.device, dtype="fp32"))
    loaded, _ = load_reference_clips(
        [args.audio],
        max_seconds=args.clip_seconds,
        min_seconds=model.config.frontend.min_duration_s,
    )
    clips = [to_probe_rate(c) for c in loaded]
    available = availability(model, PROBE_RATE)
    with torch.inference_mode():
        plain = guarded_forward(model, clips, PROBE_RATE, "off").raw_reward.tolist()
    median_clip = int(np.argsort(plain)[len(plain) // 2])
    n = int(round(args.seconds * PROBE_RATE))
    rng = np.random.default_rng(args.seed + 2)
    starts = {
        "white_noise": torch.from_numpy((NOISE_RMS * rng.standard_normal(n)).astype(np.float32)),
        f"clip:{loaded[median_clip].name}": clips[median_clip][:n],
    }
    wanted = {w.strip() for w in args.starts.split(",") if w.strip()}
    if not wanted or not wanted <= {"noise", "clip"}:
        p.error(f"--starts: expected noise and/or clip, got {args.starts!r}")
    starts = {
        k: v for k, v in starts.items() if ("noise" if k == "white_noise" else "clip") in wanted
    }
    results: list[dict] = []
    for name in names:  # one at a time: partial results are written after each
        results += attack_under_defences(
            model,
            [name],
            [(c.name, w) for c, w in zip(loaded, clips)],
            starts,
            steps=args.steps,
            lr=args.lr,
            robust=args.robust,
            seed=args.seed,
            time_limit_s=args.time_limit_s,
            ood_penalty_weight=args.ood_penalty_weight,
            pessimism_k=args.pessimism_k,
        )
        print(f"{name}: {results[-1].get('unavailable', 'done')}", file=sys.stderr)
        _report(results, args, loaded, available, time.perf_counter() - t_start)  # partial
    table = _report(results, args, loaded, available, time.perf_counter() - t_start)
    print(table)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
