"""Conditioned vs unconditioned popularity on a corpus whose platforms prefer different qualities.

A synthetic embedding corpus (``synthetic_embedding_corpus(platform_tastes=True)``: half the
songs on ``suno``, whose streams follow the clarity target, half on ``udio``, whose streams follow
the memorability target) is trained by ``apex-reward grid`` three times per grid condition:
unconditioned, conditioned with a platform token and with a platform embedding
(``--conditioning none token embedding``). Prints the grid's per-platform table (table3) and the
noise ceiling of streams Pearson per platform.

    python benchmarks/conditioning.py --songs 4000 --epochs 40
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from apex_reward.training.grid import GridConfig, run_grid_experiment
from apex_reward.training.synthetic import synthetic_embedding_corpus


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--songs", type=int, default=4000, help="songs in the corpus")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=1, help="corpus seed")
    p.add_argument(
        "--only", nargs="+", default=["C-song-full"], help="grid conditions (each in 3 variants)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="keep the grid here (default: a temporary dir)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out or tmp)
        data = synthetic_embedding_corpus(
            root / "data",
            num_songs=args.songs,
            seed=args.seed,
            max_segments=2,
            platform_tastes=True,
        )
        variants = ["none", "token", "embedding"]
        only = [f"{c}+platform-{v}" if v != "none" else c for c in args.only for v in variants]
        t0 = time.perf_counter()
        summary = run_grid_experiment(
            GridConfig(
                embeddings=data["embeddings"],
                prepared=data["prepared"],
                out=str(root / "grid"),
                only=only,
                conditioning=variants,
                condition_column="platform",
                epochs=args.epochs,
                patience=args.epochs,
                batch_size=args.batch_size,
                device="cpu",
                log_with="none",
            ),
            progress=False,
        )
        seconds = time.perf_counter() - t0
        sys.stdout.write((root / "grid" / "table3.md").read_text() + "\n")
        sys.stdout.write(
            json.dumps(
                {
                    "songs": args.songs,
                    "epochs": args.epochs,
                    "streams_pearson_by_platform": summary["by_condition_column"][
                        "streams_pearson"
                    ],
                    "ceiling_streams_pearson_by_platform": data["ceiling_pearson_by_platform"][
                        "streams"
                    ],
                    "seconds": round(seconds, 1),
                    "machine": platform.processor() or platform.machine(),
                    "threads": args.threads,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
