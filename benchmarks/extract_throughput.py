"""Extraction throughput, end to end: decode + resample + encode + write, from real audio files.

Loops the clips in --audio-dir (default ../shared/audio) to --songs songs, writes a manifest and
runs `apex-reward extract`'s code path in this process with a random-weight encoder of --preset
(the same compute as the released weights). Reports audio-seconds extracted per wall second
(model loading excluded) and, with --target-hours/--gpus, the implied time for a corpus.

    python benchmarks/extract_throughput.py --preset tiny --songs 48 --num-workers 2
    python benchmarks/extract_throughput.py --preset mert-v1-95m --dtype fp16 --songs 600 --num-workers 12 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.loading import ModelOptions
from apex_reward.training.extract import ExtractConfig, run_extraction

AUDIO = (".wav", ".flac", ".ogg", ".opus", ".mp3")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--audio-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "audio")
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "mert-v1-95m", "mert-v1-330m"])
    p.add_argument("--songs", type=int, default=48, help="songs to extract (the clips, looped)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader decode workers")
    p.add_argument("--batch-size", type=int, default=16, help="segments per encoder call")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument(
        "--device", default=None, help="cpu forces the CPU (default: accelerate's choice)"
    )
    p.add_argument(
        "--target-hours", type=float, default=10_000.0, help="corpus size for the implied time"
    )
    p.add_argument(
        "--gpus", type=int, default=4, help="processes for the implied time (linear scaling)"
    )
    args = p.parse_args(argv)
    audio_dir = Path(args.audio_dir).resolve()  # the manifest lives elsewhere: absolute paths
    clips = sorted(f for f in audio_dir.iterdir() if f.suffix.lower() in AUDIO)
    if not clips:
        sys.exit(f"no audio files in {args.audio_dir}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [
            {"id": f"s{i:06d}", "audio_path": str(clips[i % len(clips)])} for i in range(args.songs)
        ]
        pd.DataFrame(rows).to_csv(tmp / "manifest.csv", index=False)
        torch.manual_seed(0)
        model = ApexRewardModel.from_config(
            ApexConfig.from_preset(args.preset, encoder_source=None), encoder="random"
        )
        model.save_pretrained(tmp / "model")
        cfg = ExtractConfig(
            manifest=str(tmp / "manifest.csv"),
            model=ModelOptions(model=str(tmp / "model"), device=args.device, dtype=args.dtype),
            out=str(tmp / "emb"),
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            shard_size=64,
        )
        summary = run_extraction(cfg, progress=False)
    audio_s = summary["audio_hours"] * 3600
    if audio_s <= 0:
        sys.exit(f"nothing was extracted: {json.dumps(summary)[:2000]}")
    rate = audio_s / summary["wall_s_this_run"]
    implied_h = args.target_hours * 3600 / (rate * args.gpus) / 3600
    result = {
        "preset": args.preset,
        "songs": args.songs,
        "clips": len(clips),
        "audio_seconds": audio_s,
        "segments": summary["segments"],
        "wall_s": summary["wall_s_this_run"],
        "audio_seconds_per_s": rate,
        "num_workers": args.num_workers,
        "batch_size": args.batch_size,
        "dtype": summary["dtype"],
        "device": summary["device"],
        "gpu": torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        f"implied_hours_for_{args.target_hours:g}h_on_{args.gpus}": implied_h,
    }
    print(json.dumps(result))
    print(
        f"{rate:.1f} audio-s/s; {args.target_hours:g} h of audio on {args.gpus} such processes: "
        f"{implied_h:.1f} h",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
