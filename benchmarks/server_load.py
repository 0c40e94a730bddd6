"""Reward-server load test: throughput and p50/p99 latency at 1, 8 and 64 concurrent clients,
side by side with in-process batched scoring of the same clips in the same run.

Builds an APEX model with a *randomly initialised* encoder of the preset (same compute as the real
weights; nothing to download), saves it to a temporary checkpoint, then

1. in-process: ``model.score`` on the decoded clips in batches of 1 and of ``--max-batch`` (the
   model's own speed without HTTP, decoding or queueing), timed per batch;
2. server: starts ``apex-reward serve`` on loopback and, for each concurrency level C, runs C
   closed-loop clients that each POST one clip (a WAV upload) to ``/v1/score`` and wait for the
   answer before sending the next. Latency is per request, client side; throughput is
   requests / wall time. The server's ``apex_batch_size`` metric gives the mean batch it formed.

    python benchmarks/server_load.py --preset tiny --device cpu --clip-seconds 10
    python benchmarks/server_load.py --preset mert-v1-95m --device cuda --clip-seconds 10

Every clip of up to 30 s costs one 30 s encoder segment (shorter clips are zero-padded).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.audio import decode_audio_bytes


def build_checkpoint(preset: str, directory: Path) -> Path:
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset(preset, encoder_source=None)
    model = ApexRewardModel.from_config(cfg, encoder="random")
    return model.save_pretrained(directory / preset)


def make_clips(n: int, seconds: float, sr: int, channels: int) -> list[bytes]:
    """``n`` distinct PCM16 WAV files of noise-modulated tones (content does not change cost)."""
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * sr)) / sr
    out = []
    for i in range(n):
        f = 110.0 * 2 ** (i % 24 / 12)
        x = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal((channels, t.size))
        buf = io.BytesIO()
        sf.write(buf, x.T.astype(np.float32), sr, format="WAV", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def in_process(args, ckpt: Path, clips: list[bytes], batch_sizes: list[int]) -> list[dict]:
    """``model.score`` on decoded clips, ``bs`` clips (= 30 s segments) per call."""
    model = ApexRewardModel.from_pretrained(ckpt, device=args.device)
    model.set_precision(args.dtype)
    decoded = [decode_audio_bytes(c) for c in clips]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
    rows = []
    for bs in batch_sizes:
        model.score(decoded[:bs], batch_size=bs, num_workers=0)  # warm-up
        n = max(bs * 3, min(len(decoded), args.requests))
        n -= n % bs
        times = []
        t0 = time.perf_counter()
        for start in range(0, n, bs):
            sync()
            t = time.perf_counter()
            res = model.score(decoded[start : start + bs], batch_size=bs, num_workers=0)
            sync()
            times.append(time.perf_counter() - t)
            assert all(r.ok for r in res)
        wall = time.perf_counter() - t0
        rows.append(
            {
                "mode": f"in-process batch={bs}",
                "clips": n,
                "clips_per_s": n / wall,
                "batch": bs,
                "batch_p50_s": pct(times, 50),
                "batch_p99_s": pct(times, 99),
            }
        )
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else 0.0


async def closed_loop(url: str, clips: list[bytes], concurrency: int, total: int) -> dict:
    import httpx

    latencies: list[float] = []
    counter = iter(range(total))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            for i in counter:
                data = clips[i % len(clips)]
                t = time.perf_counter()
                r = await client.post(
                    "/v1/score", content=data, headers={"Content-Type": "audio/wav"}
                )
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "requests": total,
        "clips_per_s": total / wall,
        "p50_s": pct(latencies, 50),
        "p99_s": pct(latencies, 99),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "mert-v1-95m"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--clip-seconds", type=float, default=10.0, help="length of each clip")
    p.add_argument("--sample-rate", type=int, default=44100, help="clip sample rate (Hz)")
    p.add_argument("--channels", type=int, default=2, help="clip channels")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument(
        "--requests", type=int, default=32, help="requests per level (at least 3 per client)"
    )
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="server --max-wait-ms")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (both sides)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # the test harness lives with the tests, not in the package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from server_harness import ServerProcess

    n_clips = max(args.requests, 3 * max(args.concurrency), args.max_batch)
    clips = make_clips(min(n_clips, 256), args.clip_seconds, args.sample_rate, args.channels)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.preset, Path(tmp))
        sizes = sorted({1, args.max_batch})
        rows.extend(in_process(args, ckpt, clips, sizes))
        server_args = [
            "--device", args.device,
            "--dtype", args.dtype,
            "--max-batch", str(args.max_batch),
            "--max-wait-ms", str(args.max_wait_ms),
            "--no-access-log",
            "--log-level", "warning",
        ]  # fmt: skip
        if args.threads:
            server_args += ["--threads", str(args.threads)]
        with ServerProcess(ckpt, server_args, env={"HF_HUB_OFFLINE": "1"}) as server:
            import httpx

            for c in args.concurrency:
                total = max(args.requests, 3 * c)
                asyncio.run(closed_loop(server.url, clips, c, min(total, c)))  # warm the path
                before = httpx.get(f"{server.url}/metrics").text
                res = asyncio.run(closed_loop(server.url, clips, c, total))
                after = httpx.get(f"{server.url}/metrics").text
                batches = _metric(after, "apex_batch_size_count") - _metric(
                    before, "apex_batch_size_count"
                )
                scored = _metric(after, "apex_batch_size_sum") - _metric(
                    before, "apex_batch_size_sum"
                )
                rows.append(
                    {
                        "mode": f"server c={c}",
                        **res,
                        "mean_batch": scored / batches if batches else 0.0,
                    }
                )
    meta = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "clip_seconds": args.clip_seconds,
        "sample_rate": args.sample_rate,
        "channels": args.channels,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    print(json.dumps({"meta": meta, "rows": rows}))
    print(
        f"\n{args.preset} {args.dtype} on {args.device}, {args.clip_seconds:g} s clips "
        f"({args.sample_rate} Hz, {args.channels} ch), max batch {args.max_batch}",
        file=sys.stderr,
    )
    print("| mode | clips/s | p50 latency | p99 latency | mean batch |", file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for r in rows:
        if r["mode"].startswith("in-process"):
            print(
                f"| in-process `model.score`, batches of {r['batch']} | "
                f"{r['clips_per_s']:.1f} | {r['batch_p50_s'] * 1000:.0f} ms / batch | "
                f"{r['batch_p99_s'] * 1000:.0f} ms / batch | {r['batch']} |",
                file=sys.stderr,
            )
        else:
            print(
                f"| {r['mode']} | {r['clips_per_s']:.1f} | {r['p50_s'] * 1000:.0f} ms | "
                f"{r['p99_s'] * 1000:.0f} ms | {r['mean_batch']:.1f} |",
                file=sys.stderr,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
