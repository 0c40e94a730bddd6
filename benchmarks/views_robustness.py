"""Heads trained with augmented views vs without: test metrics and score spread under the audit's
gain and time-shift probes.

On a synthetic corpus (``training/synthetic.py``, songs longer than a segment so that the preview
clips differ), one tiny random-encoder model, one ``extract --views N`` store, and heads trained
side by side on it: ``--no-sample-views`` (view 0 only, as without views), with views, with
views plus feature masking, and with views plus the view-consistency penalty (one arm per
``--consistency`` weight). Then every test-split song is scored clean and under

* the audit's gain ladder (``training/audit/probes.py``: -40 .. +6 dB, clipped to ±1; the mean
  change of the reward at each level is reported too);
* time shifts: the audit's 1 s leading / trailing silence, and circular rolls by 1/4, 1/2 and
  3/4 of the song;

and the spread of each song's reward across its variants (population std, reward units) is
averaged over the songs; the between-song std of the clean rewards is reported next to it, since
a head whose rewards vary less overall would also spread less under the probes.

    python benchmarks/views_robustness.py --songs 300 --views 4 --out runs/views_bench
    python benchmarks/views_robustness.py --preset ast-tiny --raw-level --out runs/views_ast

``--preset`` picks the encoder family (``tiny``: MERT-shaped, whose front end normalises each
segment, so gain reaches it only by clipping; ``ast-tiny``: a log-mel filterbank, which reads
absolute level unless the front end fixes it, see ``--raw-level``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.audio import load_audio
from apex_reward.loading import ModelOptions, load_model
from apex_reward.training.audit.probes import GAIN_LADDER_DB, PROBE_RATE, clip_probes
from apex_reward.training.extract import ExtractConfig, run_extraction
from apex_reward.training.prepare import PrepareConfig, prepare_corpus
from apex_reward.training.synthetic import SynthConfig, generate_corpus
from apex_reward.training.trainer import TrainConfig, train
from apex_reward.training.views import ViewConfig

ARMS = {
    "no views": {"sample_views": False},
    "views": {"sample_views": True, "view_consistency": 0.0},
    "views + masking": {
        "sample_views": True,
        "view_consistency": 0.0,
        "mask_features": 0.1,
        "mask_layers": 1,
    },
}


def variants(x: torch.Tensor, seed: int) -> dict[str, list[torch.Tensor]]:
    """The clean song ``[T]`` at the probe rate, and its gain and time-shift variants."""
    probes = clip_probes([("song", x)], probe_seconds=10.0, loop_seconds=2.0, seed=seed)
    by_kind: dict[str, list[torch.Tensor]] = {}
    for p in probes:
        by_kind.setdefault(p.kind, []).append(p.waveform)
    n = x.shape[-1]
    rolls = [x.roll(int(n * k / 4)) for k in (1, 2, 3)]
    return {
        "gain": [x, *by_kind["gain"]],
        "shift": [x, *by_kind["pad_lead"], *by_kind["pad_trail"], *rolls],
    }


@torch.inference_mode()
def encode(encoder: ApexRewardModel, clips: list[torch.Tensor]):
    """The clips' encoder features, computed once and shared by every arm (the arms' checkpoints
    carry the same front end and encoder; only their heads differ)."""
    return encoder.encode(clips, PROBE_RATE)


@torch.inference_mode()
def rewards(model: ApexRewardModel, features) -> np.ndarray:
    """The raw reward (no guard) of each clip."""
    return model.predict_from_features(features).reward.float().numpy()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--songs", type=int, default=300)
    p.add_argument("--min-seconds", type=float, default=12.0)
    p.add_argument("--max-seconds", type=float, default=24.0)
    p.add_argument("--preset", default="tiny", help="model preset (its encoder is random)")
    p.add_argument(
        "--raw-level",
        action="store_true",
        help="feed the encoder the waveform as it is (frontend.normalize off): gain then reaches "
        "it, as in AST checkpoints written before frontend.normalize_level_db",
    )
    p.add_argument(
        "--segment-seconds", type=float, default=6.0, help="0: the preset's segment length"
    )
    p.add_argument("--views", type=int, default=4)
    p.add_argument(
        "--view-min-gain-db", type=float, default=ViewConfig.view_min_gain_db, help="extract's"
    )
    p.add_argument(
        "--view-max-gain-db", type=float, default=ViewConfig.view_max_gain_db, help="extract's"
    )
    p.add_argument(
        "--consistency",
        type=float,
        nargs="*",
        default=[TrainConfig.view_consistency],
        help="view-consistency weights: one 'views + consistency W' arm each (train's "
        "--view-consistency)",
    )
    p.add_argument(
        "--arms", nargs="*", default=None, help="run only these arms (names as in the report)"
    )
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--patience", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1, help="training seeds per arm")
    p.add_argument("--out", default="runs/views_bench")
    args = p.parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    load_before = os.getloadavg()
    synth = SynthConfig(
        out=str(out / "corpus"),
        num_songs=args.songs,
        min_seconds=args.min_seconds,
        max_seconds=args.max_seconds,
        sample_rates=[PROBE_RATE],
        seed=args.seed,
        suno_fraction=0.5,
        long_fraction=0.0,
    )
    generate_corpus(synth, progress=False)
    prep = prepare_corpus(
        PrepareConfig(
            manifest=str(out / "corpus" / "manifest.csv"),
            out=str(out / "prepared"),
            snapshot_date=synth.snapshot_date,
            workers=1,
            split=[0.7, 0.15, 0.15],
            seed=args.seed,
        ),
        progress=False,
    )
    torch.manual_seed(args.seed)
    cfg = ApexConfig.from_preset(args.preset)
    if args.segment_seconds:
        cfg.frontend.segment_seconds = args.segment_seconds
    if args.raw_level:
        cfg.frontend.normalize, cfg.frontend.normalize_level_db = False, None
    ApexRewardModel.from_config(cfg, encoder="random").save_pretrained(out / "base_model")
    t_ext = time.perf_counter()
    ext = run_extraction(
        ExtractConfig(
            manifest=str(out / "prepared" / "prepared.parquet"),
            model=ModelOptions(model=str(out / "base_model"), device="cpu"),
            out=str(out / "embeddings"),
            num_workers=1,
            batch_size=8,
            augment=ViewConfig(
                views=args.views,
                view_seed=args.seed,
                view_min_gain_db=args.view_min_gain_db,
                view_max_gain_db=args.view_max_gain_db,
            ),
        ),
        progress=False,
    )
    ext_s = time.perf_counter() - t_ext
    import pandas as pd

    prepared = pd.read_parquet(out / "prepared" / "prepared.parquet")
    test = prepared[prepared["split"] == "test"]
    encoder = load_model(ModelOptions(model=str(out / "base_model"), device="cpu"), heads=False)
    t_enc = time.perf_counter()
    songs = []  # per test song: {kind: features of its variants}
    for path in test["audio_path"]:
        wav, sr = load_audio(out / "prepared" / path if not Path(path).is_absolute() else path)
        assert sr == PROBE_RATE
        songs.append({k: encode(encoder, v) for k, v in variants(wav.mean(0), args.seed).items()})
    enc_s = time.perf_counter() - t_enc

    torch.set_num_threads(1)  # the heads are tiny
    base = TrainConfig(
        embeddings=str(out / "embeddings"),
        prepared=str(out / "prepared" / "prepared.parquet"),
        model=str(out / "base_model"),
        tasks="full",
        epochs=args.epochs,
        patience=args.patience,
        batch_size=64,
        device="cpu",
        log_with="none",
        resume=False,
    )
    arms = {
        **ARMS,
        **{
            f"views + consistency {w:g}": {"sample_views": True, "view_consistency": w}
            for w in args.consistency
        },
    }
    if args.arms is not None:
        unknown = sorted(set(args.arms) - set(arms))
        if unknown:
            p.error(f"--arms: unknown {unknown}; known: {sorted(arms)}")
        arms = {k: v for k, v in arms.items() if k in args.arms}
    rows = []
    for seed in range(args.seed, args.seed + args.seeds):
        for arm, opts in arms.items():
            run_out = out / "train" / f"{arm.replace(' ', '_').replace('+', 'and')}-seed{seed}"
            result = train(
                dataclasses.replace(base, out=str(run_out), seed=seed, **opts), progress=False
            )
            model = load_model(ModelOptions(model=str(result.checkpoint), device="cpu"))
            test_m = result.metrics["test"]
            spread = {}
            clean = []
            gain_deltas = []  # per song: |reward at each ladder level - clean reward|
            for kind in ("gain", "shift"):
                stds = []
                for v in songs:
                    r = rewards(model, v[kind])
                    stds.append(float(r.std()))
                    if kind == "gain":
                        clean.append(float(r[0]))
                        gain_deltas.append(np.abs(r[1:] - r[0]))
                spread[kind] = float(np.mean(stds))
            levels = [db for db in GAIN_LADDER_DB if db != 0.0]
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "best_epoch": result.best_epoch,
                    "test_mean_pearson": float(np.mean([m["pearson"] for m in test_m.values()])),
                    "test_streams_pearson": test_m["streams"]["pearson"],
                    "test_mean_mse_unit": float(
                        np.mean(
                            [
                                m["mse"] / (100.0**2 if t in ("streams", "likes") else 4.0**2)
                                for t, m in test_m.items()
                            ]
                        )
                    ),
                    "gain_spread": spread["gain"],
                    "gain_delta_by_db": {
                        f"{db:+g}": float(d) for db, d in zip(levels, np.mean(gain_deltas, 0))
                    },
                    "shift_spread": spread["shift"],
                    "between_song_std": float(np.std(clean)),
                }
            )
            sys.stderr.write(f"{arm} seed {seed}: {json.dumps(rows[-1])}\n")
    report = {
        "command": "python benchmarks/views_robustness.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "load_before": load_before,
        "songs": prep["counts"],
        "test_songs": len(test),
        "extraction": {**ext, "seconds": ext_s},
        "probe_encoding_seconds": enc_s,
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "load_after": os.getloadavg(),
    }
    (out / "views_bench.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    sys.stdout.write(json.dumps(report, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
