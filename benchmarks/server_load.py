"""Reward-server load test: throughput, latency and server CPU per clip, side by side with
in-process batched scoring of the same clips in the same run.

Builds an APEX model with a *randomly initialised* encoder of the preset (same compute as the real
weights; nothing to download), saves it to a temporary checkpoint, then

1. in-process: ``model.score`` on the decoded clips in batches of 1 and of ``--max-batch`` (the
   model's own speed without HTTP, decoding or queueing), timed per batch;
2. server: starts ``apex-reward serve`` on loopback once per ``--resampler`` (and, with
   ``--null-model``, once more per resampler with a null encoder: ``benchmarks/null_serve.py``,
   the serving path's own ceiling), and for each request kind (``--payloads``: ``wav`` = WAV
   uploads at ``--sample-rate``/``--channels``, ``pcm`` = raw float32 mono at the encoder rate
   as an ``audio/pcm`` body, ``verl`` = the same samples as verl-omni's JSON scorer request) and
   concurrency level C runs C closed-loop clients spread over ``--client-procs`` processes (one
   Python client process is itself a bottleneck) for ``--seconds``. Latency is per request,
   client side; throughput is requests / wall time; the server's CPU time over the window
   (``/proc/PID/stat``, all its threads) gives clips per server CPU-second, i.e. clips/s per
   core, which holds on a shared machine; ``apex_batch_size`` gives the mean batch it formed.

    python benchmarks/server_load.py --preset tiny --device cpu --null-model --seconds 8
    python benchmarks/server_load.py --preset mert-v1-95m --device cuda --clip-seconds 10

With ``--rounds R`` the in-process and server measurements alternate, R rounds of each
(``--seconds`` per side per round), so both see the same machine load; the ratios of each round
and their medians are printed (server clips per server CPU-second over in-process clips per CPU-
second of the benchmark process, and the same for wall-clock clips/s):

    python benchmarks/server_load.py --preset tiny --device cpu --threads 1 --rounds 3 \
        --resamplers exact --seconds 20

Every clip of up to 30 s costs one 30 s encoder segment (shorter clips are zero-padded).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import multiprocessing as mp
import os
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
        model.score(decoded[:bs], batch_size=bs, num_workers=0, guard=args.guard)  # warm-up
        n = max(bs * 3, min(len(decoded), args.requests))
        n -= n % bs
        times = []
        t0, cpu0 = time.perf_counter(), time.process_time()
        for start in range(0, n, bs):
            sync()
            t = time.perf_counter()
            res = model.score(
                decoded[start : start + bs], batch_size=bs, num_workers=0, guard=args.guard
            )
            sync()
            times.append(time.perf_counter() - t)
            assert all(r.ok for r in res)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rows.append(
            {
                "mode": f"in-process batch={bs}",
                "clips": n,
                "clips_per_s": n / wall,
                "cpu_s": cpu,
                "clips_per_cpu_s": n / cpu if cpu > 0 else float("nan"),
                "batch": bs,
                "batch_p50_s": pct(times, 50),
                "batch_p99_s": pct(times, 99),
            }
        )
    del model
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def in_process_round(model, decoded, bs: int, seconds: float, guard: str) -> dict:
    """``model.score`` on decoded clips in batches of ``bs`` for at least ``seconds`` (whole
    batches, at least one): clips/s and clips per CPU-second of this process."""
    n, times = 0, []
    # CPU time read as for the server (/proc/PID/stat), and the precise process clock beside it
    t0, cpu0, pt0 = time.perf_counter(), _cpu_seconds(os.getpid()), time.process_time()
    run0 = _runtime_seconds(os.getpid())
    while n == 0 or time.perf_counter() - t0 < seconds:
        start = n % max(1, len(decoded) - bs + 1)
        t = time.perf_counter()
        res = model.score(decoded[start : start + bs], batch_size=bs, num_workers=0, guard=guard)
        times.append(time.perf_counter() - t)
        assert all(r.ok for r in res)
        n += len(res)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(os.getpid()) - cpu0
    return {
        "clips": n,
        "clips_per_s": n / wall,
        "cpu_s": cpu,
        "process_time_s": time.process_time() - pt0,
        "runtime_s": _runtime_seconds(os.getpid()) - run0,
        "clips_per_cpu_s": n / cpu if cpu > 0 else float("nan"),
        "batch_p50_s": pct(times, 50),
    }


def interleaved(args, ckpt: Path, server, request, wav_clips: list[bytes]) -> list[dict]:
    """``--rounds`` rounds of (in-process ``model.score`` for ``--seconds``, then the server under
    load for ``--seconds``), alternating so that both see the same machine load; one row per
    side per round, and the per-round ratios server / in-process."""
    model = ApexRewardModel.from_pretrained(ckpt, device=args.device)
    model.set_precision(args.dtype)
    decoded = [decode_audio_bytes(c) for c in wav_clips]
    bs = args.max_batch
    model.score(decoded[:bs], batch_size=bs, num_workers=0, guard=args.guard)  # warm-up
    path, headers, bodies = request
    c = max(args.concurrency)
    rows = []
    for k in range(args.rounds):
        load = os.getloadavg()[0]
        ip = in_process_round(model, decoded, bs, args.seconds, args.guard)
        sv = load_level(server, path, headers, bodies, c, args.client_procs, args.seconds)
        rows.append(
            {
                "mode": f"round {k + 1}",
                "load_1min": load,
                "in_process": ip,
                "server": sv,
                "ratio_clips_per_s": sv["clips_per_s"] / ip["clips_per_s"],
                "ratio_clips_per_cpu_s": sv["clips_per_cpu_s"] / ip["clips_per_cpu_s"],
            }
        )
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    return rows


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, flags=re.M)
    return float(m.group(1)) if m else 0.0


def make_requests(kind: str, n: int, args) -> tuple[str, dict[str, str], list[bytes]]:
    """``(path, headers, bodies)`` of ``n`` distinct requests of one kind."""
    if kind == "wav":
        clips = make_clips(n, args.clip_seconds, args.sample_rate, args.channels)
        return "/v1/score", {"Content-Type": "audio/wav"}, clips
    rate = 24000
    rng = np.random.default_rng(1)
    t = np.arange(int(args.clip_seconds * rate)) / rate
    waves = [
        (
            0.3 * np.sin(2 * np.pi * 110 * 2 ** (i % 24 / 12) * t)
            + 0.05 * rng.standard_normal(t.size)
        ).astype("<f4")
        for i in range(n)
    ]
    if kind == "pcm":
        headers = {"Content-Type": f"audio/pcm; rate={rate}; format=f32le"}
        return "/v1/score", headers, [w.tobytes() for w in waves]
    if kind == "verl":
        bodies = [
            json.dumps(
                {
                    "protocol_version": "1",
                    "waveform_f32_base64": base64.b64encode(w.tobytes()).decode(),
                    "num_samples": int(w.size),
                    "sample_rate": rate,
                    "prompt": "",
                    "metadata": {"id": f"s{i}"},
                }
            ).encode()
            for i, w in enumerate(waves)
        ]
        return "/v1/verl/score", {"Content-Type": "application/json"}, bodies
    raise ValueError(f"unknown payload kind {kind!r}")


def _client_process(url, path, headers, bodies, concurrency, start_at, seconds, out) -> None:
    """One load-generator process: ``concurrency`` closed-loop clients from ``start_at`` (a
    ``time.time()``) for ``seconds``; puts ``(requests, errors, latencies)`` on ``out``."""
    import httpx

    async def run() -> tuple[int, list[str], list[float]]:
        latencies: list[float] = []
        errors: list[str] = []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            await asyncio.sleep(max(0.0, start_at - time.time()))
            stop = time.perf_counter() + seconds

            async def worker(k: int) -> None:
                i = k
                while time.perf_counter() < stop:
                    t = time.perf_counter()
                    r = await client.post(path, content=bodies[i % len(bodies)], headers=headers)
                    latencies.append(time.perf_counter() - t)
                    if r.status_code != 200:
                        errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                    i += concurrency

            await asyncio.gather(*(worker(k) for k in range(concurrency)))
        return len(latencies), errors, latencies

    out.put(asyncio.run(run()))


def _cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _runtime_seconds(pid: int) -> float:
    """The scheduler's precise run time (ns counters of ``/proc/PID/task/*/schedstat``) summed
    over the live threads of ``pid``, seconds: a cross-check of the tick-based
    :func:`_cpu_seconds` (threads that exited are missing here)."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(stat.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # the thread exited meanwhile
            pass
    return total / 1e9


def load_level(server, path, headers, bodies, concurrency: int, procs: int, seconds: float) -> dict:
    """``concurrency`` closed-loop clients over ``procs`` processes for ``seconds``."""
    import httpx

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = max(1, min(procs, concurrency))
    shares = [concurrency // procs + (1 if k < concurrency % procs else 0) for k in range(procs)]
    start_at = time.time() + 3.0  # every process started and connected
    workers = [
        ctx.Process(
            target=_client_process,
            args=(server.url, path, headers, bodies[k::procs] or bodies, c, start_at, seconds, out),
        )
        for k, c in enumerate(shares)
    ]
    for w in workers:
        w.start()
    time.sleep(max(0.0, start_at - time.time()))
    before = httpx.get(f"{server.url}/metrics").text
    cpu0, t0, run0 = _cpu_seconds(server.pid), time.perf_counter(), _runtime_seconds(server.pid)
    results = [out.get() for _ in workers]
    wall, cpu = time.perf_counter() - t0, _cpu_seconds(server.pid) - cpu0
    run = _runtime_seconds(server.pid) - run0
    after = httpx.get(f"{server.url}/metrics").text
    for w in workers:
        w.join()
    total = sum(r[0] for r in results)
    errors = [e for r in results for e in r[1]]
    latencies = [x for r in results for x in r[2]]
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    batches = _metric(after, "apex_batch_size_count") - _metric(before, "apex_batch_size_count")
    scored = _metric(after, "apex_batch_size_sum") - _metric(before, "apex_batch_size_sum")
    return {
        "requests": total,
        "clips_per_s": total / wall,
        "server_cpu_s": cpu,
        "server_runtime_s": run,
        "clips_per_cpu_s": total / cpu if cpu > 0 else float("nan"),
        "p50_s": pct(latencies, 50),
        "p99_s": pct(latencies, 99),
        "mean_batch": scored / batches if batches else 0.0,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "mert-v1-95m"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--clip-seconds", type=float, default=10.0, help="length of each clip")
    p.add_argument("--sample-rate", type=int, default=44100, help="WAV upload sample rate (Hz)")
    p.add_argument("--channels", type=int, default=2, help="WAV upload channels")
    p.add_argument("--concurrency", type=int, nargs="+", default=[32])
    p.add_argument("--client-procs", type=int, default=4, help="load-generator processes")
    p.add_argument("--seconds", type=float, default=8.0, help="measured time per level")
    p.add_argument("--payloads", nargs="+", default=["wav", "pcm"], choices=["wav", "pcm", "verl"])
    p.add_argument(
        "--resamplers", nargs="+", default=["model", "soxr"], choices=["model", "exact", "soxr"],
        help="server --resampler values to compare",
    )  # fmt: skip
    p.add_argument(
        "--null-model", action="store_true",
        help="also serve a null encoder (benchmarks/null_serve.py): the serving path's ceiling",
    )  # fmt: skip
    p.add_argument("--no-model", action="store_true", help="null-model servers only")
    p.add_argument("--guard", default="off", choices=["off", "flag", "penalize"])
    p.add_argument("--max-batch", type=int, default=16, help="server --max-batch")
    p.add_argument("--max-wait-ms", type=float, default=10.0, help="server --max-wait-ms")
    p.add_argument("--decode-workers", type=int, default=4, help="server --decode-workers")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (both sides)")
    p.add_argument(
        "--rounds", type=int, default=0,
        help="in-process vs server: this many alternating rounds (each side --seconds per round, "
        "WAV uploads, the first --resamplers value) instead of one in-process row first",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    # the test harness lives with the tests, not in the package
    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "tests"))
    from server_harness import ServerProcess

    n_bodies = min(64, max(2 * max(args.concurrency), args.max_batch))
    rows = []
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(args.preset, Path(tmp))
        if not args.no_model and not args.rounds:
            wav_clips = make_clips(
                args.max_batch * 3, args.clip_seconds, args.sample_rate, args.channels
            )
            args.requests = args.max_batch * 3
            rows.extend(in_process(args, ckpt, wav_clips, [args.max_batch]))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
        requests = {kind: make_requests(kind, n_bodies, args) for kind in args.payloads}
        servers = [(False, r) for r in args.resamplers] if not args.no_model else []
        if args.rounds:
            servers = [(False, args.resamplers[0])]
        if args.null_model or args.no_model:
            servers = [(True, r) for r in args.resamplers] + servers
        for null, resampler in servers:
            server_args = [
                "--device", args.device,
                "--dtype", args.dtype,
                "--max-batch", str(args.max_batch),
                "--max-wait-ms", str(args.max_wait_ms),
                "--decode-workers", str(args.decode_workers),
                "--resampler", resampler,
                "--guard", args.guard,
                "--no-access-log",
                "--log-level", "warning",
            ]  # fmt: skip
            if args.threads:
                server_args += ["--threads", str(args.threads)]
            program = [str(here / "null_serve.py")] if null else ["-m", "apex_reward"]
            env = {"HF_HUB_OFFLINE": "1"}
            with ServerProcess(ckpt, server_args, env=env, program=program) as server:
                if args.rounds and not null:
                    wav = make_requests("wav", n_bodies, args)
                    load_level(server, *wav, 4, 1, 1.0)  # warm up
                    clips = make_clips(args.max_batch * 2, args.clip_seconds, args.sample_rate,
                                       args.channels)  # fmt: skip
                    rows.extend(interleaved(args, ckpt, server, wav, clips))
                    continue
                for kind, (path, headers, bodies) in requests.items():
                    for c in args.concurrency:
                        load_level(server, path, headers, bodies, min(c, 4), 1, 1.0)  # warm up
                        res = load_level(
                            server, path, headers, bodies, c, args.client_procs, args.seconds
                        )
                        model = "null" if null else args.preset
                        rows.append(
                            {
                                "mode": f"server {model} resampler={resampler} {kind} c={c}",
                                **res,
                            }
                        )
                        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)  # progress
    meta = {
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "guard": args.guard,
        "clip_seconds": args.clip_seconds,
        "sample_rate": args.sample_rate,
        "channels": args.channels,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "client_procs": args.client_procs,
        "seconds": args.seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "loadavg_end": os.getloadavg(),
        "run_s": time.time() - t_start,
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
    }
    print(json.dumps({"meta": meta, "rows": rows}))
    print(
        f"\n{args.preset} {args.dtype} on {args.device}, guard {args.guard}, "
        f"{args.clip_seconds:g} s clips (wav: {args.sample_rate} Hz, {args.channels} ch; "
        f"pcm/verl: 24 kHz float32 mono), max batch {args.max_batch}, load avg at the end "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        file=sys.stderr,
    )
    print(
        "| mode | clips/s | server CPU-s | clips per server CPU-s | p50 | p99 | mean batch |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    rounds = [r for r in rows if r["mode"].startswith("round")]
    if rounds:
        print_rounds(rounds)
    for r in rows:
        if r["mode"].startswith("round"):
            continue
        if r["mode"].startswith("in-process"):
            print(
                f"| in-process `model.score`, batches of {r['batch']} | "
                f"{r['clips_per_s']:.1f} | {r['cpu_s']:.1f} | {r['clips_per_cpu_s']:.1f} | "
                f"{r['batch_p50_s'] * 1000:.0f} ms / batch | "
                f"{r['batch_p99_s'] * 1000:.0f} ms / batch | {r['batch']} |",
                file=sys.stderr,
            )
        else:
            print(
                f"| {r['mode']} | {r['clips_per_s']:.1f} | {r['server_cpu_s']:.1f} | "
                f"{r['clips_per_cpu_s']:.1f} | {r['p50_s'] * 1000:.0f} ms | "
                f"{r['p99_s'] * 1000:.0f} ms | {r['mean_batch']:.1f} |",
                file=sys.stderr,
            )
    return 0


def print_rounds(rounds: list[dict]) -> None:
    """The interleaved comparison as a markdown table, with the medians over the rounds."""
    print(
        "| round | load | in-process clips/s | in-process clips per CPU-s | server clips/s | "
        "server clips per CPU-s | server mean batch | ratio (wall) | ratio (CPU) |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in rounds:
        ip, sv = r["in_process"], r["server"]
        print(
            f"| {r['mode']} | {r['load_1min']:.1f} | {ip['clips_per_s']:.2f} | "
            f"{ip['clips_per_cpu_s']:.2f} | {sv['clips_per_s']:.2f} | {sv['clips_per_cpu_s']:.2f} "
            f"| {sv['mean_batch']:.1f} | {r['ratio_clips_per_s']:.2f} | "
            f"{r['ratio_clips_per_cpu_s']:.2f} |",
            file=sys.stderr,
        )
    med = {k: float(np.median([r[k] for r in rounds])) for k in rounds[0] if k.startswith("ratio")}
    print(
        f"median ratio server / in-process: wall {med['ratio_clips_per_s']:.2f}, "
        f"CPU {med['ratio_clips_per_cpu_s']:.2f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    sys.exit(main())
