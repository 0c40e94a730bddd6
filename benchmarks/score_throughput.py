"""Scoring throughput, end to end from waveform tensors, side by side with plain Hugging Face usage.

Every variant scores 30 s procedural songs at 24 kHz (random-weight encoder of --preset: the same compute as
the released weights) and reports audio-seconds per second (median of --repeats, after warm-up,
which includes torch.compile) and, on CUDA, the fraction of a bf16 matmul ceiling measured in the
same run (``ceiling = matmul FLOP/s / FLOPs per 30 s segment x 30 s``).

Variants (``--variants``, default: all that apply to the device):

* ``hf-fp32-b1``    plain ``HubertModel`` in fp32, one song at a time, 4 layers mean-pooled
* ``hf-bf16-amp``   plain ``HubertModel`` under bf16 autocast, SDPA, batch ``--batch-size``
* ``ours-fp32``     ``ApexRewardModel`` exact path (front end + encoder + heads), fp32
* ``ours-fast``     ``ApexRewardModel`` fast path (``--fast-modes``: fp16/bf16 weights, GEMM/FFT
  encoder kernels, SDPA, buckets, optionally torch.compile); each mode also reports ``parity``
* ``hf-fp16-amp-grad``  differentiable baseline: fp16 autocast forward + backward to the waveform,
  batch ``--grad-batch-size``
* ``ours-fast-grad``    our differentiable path: ``model(x).reward.sum().backward()``, fast path
* ``long-grad``     a ``--long-seconds`` song's gradient, batch ``--grad-batch-size``, activation
  checkpointing: peak GPU memory and time

``parity`` compares each fast mode with ``ours-fp32`` scores on the same songs (max relative diff).

    python benchmarks/score_throughput.py --preset tiny --device cpu --variants ours-fp32 --batch-size 8
    python benchmarks/score_throughput.py --preset mert-v1-95m --device cuda --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager

import torch

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.encoder import build_hubert

SR = 24000
ALL = [
    "hf-fp32-b1",
    "hf-bf16-amp",
    "ours-fp32",
    "ours-fast",
    "hf-fp16-amp-grad",
    "ours-fast-grad",
    "long-grad",
]


def segment_flops(cfg: ApexConfig) -> float:
    """Forward FLOPs of the encoder on one segment (2 x multiply-adds)."""
    h = cfg.encoder.hubert
    n = cfg.frontend.segment_samples
    macs, c_in = 0.0, 1
    for dim, k, s in zip(h["conv_dim"], h["conv_kernel"], h["conv_stride"]):
        n = (n - k) // s + 1
        macs += n * dim * c_in * k
        c_in = dim
    d, layers, inter = h["hidden_size"], h["num_hidden_layers"], h["intermediate_size"]
    macs += n * c_in * d  # feature projection
    macs += n * d * (d // h["num_conv_pos_embedding_groups"]) * h["num_conv_pos_embeddings"]
    macs += layers * n * (4 * d * d + 2 * d * inter)  # qkv/out projections + FFN
    macs += layers * 2 * n * n * d  # attention scores and weighted sum
    return 2 * macs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_tflops(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = timed(lambda: a @ b, device, 20, 5)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def music(n: int, device: str, seconds: float = 30.0) -> torch.Tensor:
    """``[n, seconds * 24 kHz]`` procedural songs of varied quality (apex_reward.training.synthetic):
    real-music-like inputs, so that parity is measured where scores actually differ."""
    import numpy as np

    from apex_reward.training.synthetic import QUALITY_PARAMS, render_song

    out = []
    for i in range(min(n, 16)):  # 16 distinct songs, repeated: rendering is CPU work
        rng = np.random.default_rng(i)
        params = {p: float(rng.beta(1.1, 1.6)) for p in QUALITY_PARAMS}
        out.append(torch.from_numpy(render_song(params, seconds, SR, rng)).float())
    x = torch.stack([out[i % len(out)] for i in range(n)])
    return x.to(device)


def pooled_hf(model, x, layers):
    hs = model(x, output_hidden_states=True).hidden_states
    return torch.stack([hs[i].float().mean(1) for i in layers], 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "mert-v1-95m", "mert-v1-330m"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--variants", nargs="+", default=None, choices=ALL)
    p.add_argument(
        "--batch-size", type=int, default=32, help="songs (= segments) per call when scoring"
    )
    p.add_argument("--grad-batch-size", type=int, default=8)
    p.add_argument(
        "--songs", type=int, default=None, help="songs per timed repeat (default: 2 batches)"
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--fast-modes",
        nargs="+",
        default=["fp16:eager"],
        choices=[f"{d}:{c}" for d in ("fp16", "bf16") for c in ("eager", "compile")],
        help="fast-path settings to time side by side (dtype:compile-or-eager); the first is "
        "reported as ours-fast and used by the gradient variants",
    )
    p.add_argument("--long-seconds", type=float, default=240.0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument(
        "--profile",
        default=None,
        help="write a torch.profiler kernel table of one fast-path call here (and of one "
        "gradient call to PROFILE.grad.txt)",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    cuda = dev.startswith("cuda")
    variants = args.variants or (ALL if cuda else ["hf-fp32-b1", "ours-fp32"])
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset(args.preset, encoder_source=None)
    flops = segment_flops(cfg)
    ceiling = matmul_tflops(dev)
    ceiling_aps = ceiling * 1e12 / flops * 30 if ceiling else None
    bs = args.batch_size
    songs = args.songs or 2 * bs
    x = music(songs, dev)
    results: dict[str, dict] = {}

    def record(name: str, times: list[float], audio_s: float, **extra) -> None:
        med = statistics.median(times)
        aps = audio_s / med
        results[name] = {
            "audio_seconds_per_s": aps,
            "median_s": med,
            "times_s": times,
            "fraction_of_ceiling": aps / ceiling_aps if ceiling_aps else None,
            **extra,
        }
        frac = f" ({aps / ceiling_aps:.1%} of ceiling)" if ceiling_aps else ""
        print(f"{name:18s} {aps:10.1f} audio-s/s{frac}", file=sys.stderr, flush=True)

    @contextmanager
    def guard(name: str):
        """A failing variant is recorded with its error; the others still run."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - a benchmark reports, it does not stop
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name:18s} FAILED: {type(e).__name__}: {e}", file=sys.stderr, flush=True)

    layers = cfg.encoder.layers
    if any(v.startswith("hf-") for v in variants):
        hf = build_hubert(cfg.encoder).to(dev).eval().requires_grad_(False)
        norm = (x - x.mean(1, keepdim=True)) / torch.sqrt(
            x.var(1, keepdim=True, unbiased=False) + 1e-7
        )
        if "hf-fp32-b1" in variants:
            n1 = min(songs, 8 if cuda else 2)

            def hf_single():
                with torch.inference_mode():
                    for i in range(n1):
                        pooled_hf(hf, norm[i : i + 1], layers).sum().item()

            with guard("hf-fp32-b1"):
                record("hf-fp32-b1", timed(hf_single, dev, args.repeats, 1), n1 * 30.0)
        if "hf-bf16-amp" in variants and cuda:

            def hf_amp():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    for i in range(0, songs, bs):
                        pooled_hf(hf, norm[i : i + bs], layers).sum().item()

            with guard("hf-bf16-amp"):
                record("hf-bf16-amp", timed(hf_amp, dev, args.repeats, args.warmup), songs * 30.0)
        if "hf-fp16-amp-grad" in variants and cuda:
            gb = args.grad_batch_size

            def hf_grad():
                for i in range(0, songs, gb):
                    xi = x[i : i + gb].clone().requires_grad_(True)
                    ni = (xi - xi.mean(1, keepdim=True)) / torch.sqrt(
                        xi.var(1, keepdim=True, unbiased=False) + 1e-7
                    )
                    with torch.autocast("cuda", dtype=torch.float16):
                        out = pooled_hf(hf, ni, layers)
                    out.float().sum().backward()

            with guard("hf-fp16-amp-grad"):
                record(
                    "hf-fp16-amp-grad", timed(hf_grad, dev, args.repeats, args.warmup), songs * 30.0
                )
        del hf
        if cuda:
            torch.cuda.empty_cache()

    model = ApexRewardModel.from_config(cfg, encoder="random").to(dev).eval().requires_grad_(False)
    model.fast_path = False
    ref_scores = None
    if "ours-fp32" in variants:

        def ours_exact():
            with torch.inference_mode():
                for i in range(0, songs, bs):
                    model(x[i : i + bs], SR, segment_batch_size=bs).reward.sum().item()

        with guard("ours-fp32"):
            record("ours-fp32", timed(ours_exact, dev, args.repeats, args.warmup), songs * 30.0)
    fast_needed = [v for v in variants if v in ("ours-fast", "ours-fast-grad", "long-grad")]
    if fast_needed:
        # a random head is nearly constant; calibrate its BatchNorm statistics on these songs (as
        # training would) so that scores spread over their ranges and parity is a real test
        with torch.inference_mode():
            ref_feats = model.encode(x[:bs], SR, segment_batch_size=bs)
        with torch.no_grad():
            for m in model.head.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.reset_running_stats()
                    m.momentum = None
            model.head.train()
            model.head.predict(model.head.embed(ref_feats.layer_features.clone()))
            model.head.eval()
        with torch.inference_mode():
            ref_scores = model.predict_from_features(ref_feats).scores
        for mode in args.fast_modes:
            fdtype, how = mode.split(":")
            label = "ours-fast" if mode == args.fast_modes[0] else f"ours-fast[{mode}]"
            model.set_fast_path(False)
            if cuda:
                torch._dynamo.reset()
            t0 = time.perf_counter()
            model.set_fast_path(True, dtype=fdtype, compile=how == "compile")
            if "ours-fast" not in variants:
                continue

            def ours_fast():
                with torch.inference_mode():
                    for i in range(0, songs, bs):
                        model(x[i : i + bs], SR, segment_batch_size=bs).reward.sum().item()

            with guard(label):
                ours_fast()  # compile
                compile_s = time.perf_counter() - t0
                record(
                    label,
                    timed(ours_fast, dev, args.repeats, args.warmup),
                    songs * 30.0,
                    dtype=fdtype,
                    compiled=how == "compile",
                    first_call_s=compile_s,
                )
                with torch.inference_mode():
                    fast_feats = model.encode(x[:bs], SR, segment_batch_size=bs)
                    fast_scores = model.predict_from_features(fast_feats).scores
                rel = {}
                for k in ref_scores:
                    diff = (fast_scores[k] - ref_scores[k]).abs() / ref_scores[k].abs().clamp_min(
                        1e-6
                    )
                    rel[k] = float(diff.max())
                a, b = fast_feats.layer_features, ref_feats.layer_features
                feat_err = float((a - b).norm() / b.norm())
                spread = {k: float(v.std()) for k, v in ref_scores.items()}
                results[label]["parity"] = {
                    "max_relative_diff": rel,
                    "worst": max(rel.values()),
                    "embedding_relative_l2": feat_err,
                    "score_std_across_songs": spread,
                }
                print(
                    f"{label} parity: worst relative score diff vs fp32 {max(rel.values()):.2e}; "
                    f"embedding relative L2 {feat_err:.2e}",
                    file=sys.stderr,
                )
        # the gradient variants and the profile use the first (default) mode
        model.set_fast_path(False)
        if cuda:
            torch._dynamo.reset()
        fdtype, how = args.fast_modes[0].split(":")
        model.set_fast_path(True, dtype=fdtype, compile=how == "compile")
        if args.profile and cuda:
            with guard("profile"):
                from torch.profiler import ProfilerActivity, profile

                with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model(x[:bs], SR, segment_batch_size=bs).reward.sum().item()
                table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
                with open(args.profile, "w") as f:
                    f.write(table)
                print(table[-6000:], file=sys.stderr)
        if "ours-fast-grad" in variants:
            gb = args.grad_batch_size

            def ours_grad():
                for i in range(0, songs, gb):
                    xi = x[i : i + gb].clone().requires_grad_(True)
                    model(xi, SR, segment_batch_size=gb).reward.sum().backward()

            with guard("ours-fast-grad"):
                times = timed(ours_grad, dev, args.repeats, args.warmup)
                record("ours-fast-grad", times, songs * 30.0, batch=gb)
            if args.profile and cuda:
                with guard("profile-grad"):
                    from torch.profiler import ProfilerActivity, profile

                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        xi = x[:gb].clone().requires_grad_(True)
                        model(xi, SR, segment_batch_size=gb).reward.sum().backward()
                        torch.cuda.synchronize()
                    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
                    with open(args.profile + ".grad.txt", "w") as f:
                        f.write(table)
        if "long-grad" in variants and cuda:
            gb = args.grad_batch_size
            model.encoder.set_activation_checkpointing(True)
            xl = music(gb, dev, args.long_seconds)
            torch.cuda.reset_peak_memory_stats()

            def long_grad():
                xi = xl.clone().requires_grad_(True)
                model(xi, SR, segment_batch_size=16).reward.sum().backward()
                assert torch.isfinite(xi.grad).all()

            with guard("long-grad"):
                times = timed(long_grad, dev, max(1, args.repeats // 2), 1)
                peak = torch.cuda.max_memory_allocated() / 2**30
                record(
                    "long-grad",
                    times,
                    gb * args.long_seconds,
                    peak_gib=peak,
                    batch=gb,
                    song_seconds=args.long_seconds,
                    activation_checkpointing=True,
                )
                print(f"long-grad peak memory {peak:.1f} GiB", file=sys.stderr)
            model.encoder.set_activation_checkpointing(False)

    summary = {
        "preset": args.preset,
        "device": dev,
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "batch_size": bs,
        "grad_batch_size": args.grad_batch_size,
        "gflop_per_segment": flops / 1e9,
        "matmul_tflops": ceiling,
        "ceiling_audio_seconds_per_s": ceiling_aps,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "results": results,
    }
    print(json.dumps(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    if results:
        print(f"\n{'variant':18s} {'audio-s/s':>10s} {'of ceiling':>10s}", file=sys.stderr)
        for k, v in results.items():
            if "audio_seconds_per_s" in v:
                frac = f"{v['fraction_of_ceiling']:.1%}" if v["fraction_of_ceiling"] else "-"
                print(f"{k:18s} {v['audio_seconds_per_s']:10.1f} {frac:>10s}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
