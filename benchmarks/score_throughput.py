"""Scoring throughput: audio-seconds scored per second, end to end from waveform tensors.

Builds an APEX model with a *randomly initialised* encoder of the chosen preset (same compute as
the real weights, nothing to download) and times ``model(waveforms, sample_rate)`` under
``inference_mode`` on 30 s songs at 24 kHz. Reports the median over repeats.

    python benchmarks/score_throughput.py --preset tiny --batch-size 8 --dtype fp32 --device cpu
    python benchmarks/score_throughput.py --preset mert-v1-95m --batch-size 32 --dtype bf16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from contextlib import nullcontext

import torch

from apex_reward import ApexConfig, ApexRewardModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(preset: str, device: str) -> ApexRewardModel:
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset(preset, encoder_source=None)
    return ApexRewardModel.from_config(cfg, encoder="random").to(device).eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(model, device, dtype, batch_size, seconds, songs, repeats, warmup) -> dict:
    sr = 24000
    x = torch.randn(songs, int(seconds * sr), device=device) * 0.1
    amp = (
        torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype])
        if dtype != "fp32"
        else nullcontext()
    )
    times = []
    with torch.inference_mode(), amp:
        for i in range(warmup + repeats):
            sync(device)
            t0 = time.perf_counter()
            for start in range(0, songs, batch_size):
                model(
                    x[start : start + batch_size], sr, segment_batch_size=batch_size
                ).reward.sum().item()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "audio_seconds": songs * seconds,
        "median_s": med,
        "audio_seconds_per_s": songs * seconds / med,
        "times_s": times,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "mert-v1-95m", "mert-v1-330m"])
    p.add_argument("--batch-size", type=int, default=8, help="songs (= 30 s segments) per call")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seconds", type=float, default=30.0, help="song length")
    p.add_argument("--songs", type=int, default=16, help="songs per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.preset, args.device)
    res = measure(
        model,
        args.device,
        args.dtype,
        args.batch_size,
        args.seconds,
        args.songs,
        args.repeats,
        args.warmup,
    )
    res.update(
        preset=args.preset,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        machine=platform.processor() or platform.machine(),
        gpu=torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    )
    print(json.dumps(res))
    print(
        f"{args.preset} {args.dtype} batch {args.batch_size} on {args.device}: "
        f"{res['audio_seconds_per_s']:.1f} audio-s/s (median of {args.repeats})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
