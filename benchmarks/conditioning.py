"""Conditioned vs unconditioned popularity on a corpus whose platforms prefer different qualities.

A synthetic embedding corpus (``synthetic_embedding_corpus(platform_tastes=True)``: half the
songs on ``suno``, whose streams follow the clarity target, half on ``udio``, whose streams follow
the memorability target) is trained by ``apex-reward grid`` three times per grid condition:
unconditioned, conditioned with a platform token and with a platform embedding
(``--conditioning none token embedding``). Prints the grid's per-platform table (table3) and the
noise ceiling of streams Pearson per platform.

``--corpus audio`` runs the same comparison through the whole pipeline instead: ``synth
--platform-tastes`` renders the songs (streams and likes rise with clarity on suno and with
memorability on udio), ``prepare`` filters, balances and splits them, a ``tiny`` model with a
random encoder (6 s segments) extracts their embeddings, and the grid trains on those.

    python benchmarks/conditioning.py --songs 4000 --epochs 40
    python benchmarks/conditioning.py --corpus audio --songs 800 --epochs 60
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
    p.add_argument("--corpus", choices=["embeddings", "audio"], default="embeddings")
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
        if args.corpus == "audio":
            data = _audio_corpus(root, args.songs, args.seed)
        else:
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
                model=data.get("model", ""),
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
                    "ceiling_streams_pearson_by_platform": data.get(
                        "ceiling_pearson_by_platform", {}
                    ).get("streams"),
                    "corpus": args.corpus,
                    "seconds": round(seconds, 1),
                    "machine": platform.processor() or platform.machine(),
                    "threads": args.threads,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


def _audio_corpus(root: Path, songs: int, seed: int) -> dict[str, str]:
    """synth --platform-tastes -> prepare -> tiny random-encoder model -> extract."""
    from apex_reward import ApexConfig, ApexRewardModel
    from apex_reward.loading import ModelOptions
    from apex_reward.training.extract import ExtractConfig, run_extraction
    from apex_reward.training.prepare import PrepareConfig, prepare_corpus
    from apex_reward.training.synthetic import SynthConfig, generate_corpus

    synth = SynthConfig(
        out=str(root / "corpus"),
        num_songs=songs,
        min_seconds=4.0,
        max_seconds=6.0,
        sample_rates=[22050, 24000],
        formats=["wav"],
        seed=seed,
        suno_fraction=0.5,
        platform_tastes=True,
    )
    corpus = generate_corpus(synth)
    prepare_corpus(
        PrepareConfig(
            manifest=corpus["manifest"],
            out=str(root / "prepared"),
            snapshot_date=synth.snapshot_date,
            split=[0.7, 0.15, 0.15],
            seed=seed,
            workers=2,
        )
    )
    torch.manual_seed(seed)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend.segment_seconds = 6.0
    ApexRewardModel.from_config(cfg, encoder="random").save_pretrained(root / "base_model")
    run_extraction(
        ExtractConfig(
            manifest=str(root / "prepared" / "prepared.parquet"),
            model=ModelOptions(model=str(root / "base_model"), device="cpu"),
            out=str(root / "embeddings"),
            num_workers=1,
            batch_size=8,
        )
    )
    return {
        "embeddings": str(root / "embeddings"),
        "prepared": str(root / "prepared" / "prepared.parquet"),
        "model": str(root / "base_model"),
    }


if __name__ == "__main__":
    raise SystemExit(main())
