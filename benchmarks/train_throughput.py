"""Training throughput: samples/s for one epoch on 211k song embeddings (synthetic, real shapes).

Random song-mode features ``[N, 4, 768]`` (fp16, like extracted embeddings) and random targets,
the full task set, uncertainty loss, 2 shared layers; batch 512 per process. Reports the second
epoch (the first includes warm-up) as measured by the trainer itself (``samples_per_s`` in its
history: the optimisation steps of one epoch, without validation or checkpointing).

    python benchmarks/train_throughput.py --device cpu
    python benchmarks/train_throughput.py --mixed-precision fp16          # on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile

import torch

from apex_reward.config import ALL_TASKS, SCORE_RANGES
from apex_reward.training.trainer import TrainConfig, TrainingData, train


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--songs", type=int, default=211_000, help="training songs")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"])
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"]
    )
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    lo = torch.tensor([SCORE_RANGES[t][0] for t in ALL_TASKS])
    span = torch.tensor([SCORE_RANGES[t][1] - SCORE_RANGES[t][0] for t in ALL_TASKS])
    sizes = {"train": args.songs, "val": 2048, "test": 2048}
    feats = {
        k: torch.randn(n, args.layers, args.hidden, generator=g).half() for k, n in sizes.items()
    }
    targets = {k: torch.rand(n, len(ALL_TASKS), generator=g) * span + lo for k, n in sizes.items()}
    data = TrainingData.from_arrays(feats, targets, ALL_TASKS)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(
            out=tmp,
            epochs=2,
            patience=5,
            batch_size=args.batch_size,
            export=False,
            log_with="none",
            mixed_precision=args.mixed_precision,
            device=args.device,
            save_interval_s=1e9,
        )
        result = train(cfg, data, progress=False)
    epoch = result.history[-1]
    out = {
        "songs": args.songs,
        "shape": [args.layers, args.hidden],
        "batch_size": args.batch_size,
        "samples_per_s": epoch["samples_per_s"],
        "epoch_seconds": epoch["epoch_seconds"],
        "first_epoch_seconds": result.history[0]["epoch_seconds"],
        "mixed_precision": args.mixed_precision,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    print(json.dumps(out))
    print(
        f"{epoch['samples_per_s']:.0f} samples/s ({epoch['epoch_seconds']:.2f} s per epoch of {args.songs})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
