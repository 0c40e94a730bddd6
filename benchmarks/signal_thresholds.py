"""Measure the signal checks (apex_reward.signals) on real clips, clean synthetic songs and
degenerate probes, and report how the GuardConfig thresholds separate them.

    python benchmarks/signal_thresholds.py [--audio /work/shared/audio] [--synthetic 200]
        [--json out.json]

Prints, per group, min / median / max of every signal and how many clips each flag catches. The
thresholds in GuardConfig (docs/model.md#signal-checks) were picked from this table: no real clip
and at most 2 % of the synthetic songs flagged, every static probe flagged by some check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from apex_reward.audio import load_audio
from apex_reward.config import GuardConfig
from apex_reward.signals import FLAGS, SIGNAL_NAMES, guard_flags, measure_signals

SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")
SR = 24000


def clean_synthetic(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, int]]:
    """``n`` clean procedural songs (training/synthetic.py, quality parameters 0), 10–30 s."""
    from apex_reward.training.synthetic import QUALITY_PARAMS, render_song

    rng = np.random.default_rng(seed)
    params = dict.fromkeys(QUALITY_PARAMS, 0.0)
    out = []
    for i in range(n):
        seconds = float(rng.uniform(10, 30))
        sr = int(rng.choice([22050, 24000, 44100]))
        song_rng = np.random.default_rng(seed * 100_003 + i)
        audio = render_song(params, seconds, sr, song_rng).astype(np.float32)
        out.append((f"synth{i:03d}", audio, sr))
    return out


def probes(real: list[tuple[str, np.ndarray, int]]) -> dict[str, list[tuple[str, np.ndarray, int]]]:
    """Degenerate inputs a generator could find, 30 s at 24 kHz (loops/reversals of real clips)."""
    rng = np.random.default_rng(0)
    n = 30 * SR
    t = np.arange(n) / SR
    white = rng.standard_normal(n)
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.fft.rfftfreq(n, 1 / SR)
    spec[1:] /= np.sqrt(f[1:])
    spec[0] = 0
    pink = np.fft.irfft(spec, n)

    def at(x: np.ndarray, rms_dbfs: float) -> np.ndarray:
        return (x / np.sqrt(np.mean(x**2)) * 10 ** (rms_dbfs / 20)).astype(np.float32)

    static = {
        "silence": np.zeros(n, np.float32),
        "noise_-80dBFS": at(white, -80),
        "white_noise": at(white, -15),
        "pink_noise": at(pink, -15),
        "sine_220": (0.5 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        "sine_440": (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32),
        "sine_1000": (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32),
        "clipped_square": np.clip(3 * np.sin(2 * np.pi * 110 * t), -1, 1).astype(np.float32),
        "dc": np.full(n, 0.512, np.float32),
    }
    groups = {"probe:" + k: [(k, v, SR)] for k, v in static.items()}
    loops, reversed_ = [], []
    for name, wav, sr in real:
        start = wav.shape[-1] // 3
        piece = wav[start : start + 2 * sr]
        loops.append((name, np.tile(piece, int(np.ceil(30 * sr / piece.shape[-1])))[: 30 * sr], sr))
        reversed_.append((name, wav[::-1].copy(), sr))
    groups["probe:loop_2s"] = loops
    groups["reversed (need not flag)"] = reversed_
    return groups


def measure(
    items: list[tuple[str, np.ndarray, int]], config: GuardConfig
) -> tuple[dict, list[dict]]:
    rows = []
    for name, wav, sr in items:
        s = measure_signals(wav, sr)
        rows.append({"name": name, **s, "flags": guard_flags(s, config)})
    stats = {
        k: (
            float(np.min([r[k] for r in rows])),
            float(np.median([r[k] for r in rows])),
            float(np.max([r[k] for r in rows])),
        )
        for k in SIGNAL_NAMES
    }
    return stats, rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--audio", default="/work/shared/audio", help="directory of real clips")
    ap.add_argument("--synthetic", type=int, default=200, help="clean synthetic songs")
    ap.add_argument("--json", default=None, help="write every measurement here")
    args = ap.parse_args(argv)
    config = GuardConfig()
    real = []
    audio_dir = Path(args.audio)
    for p in sorted(audio_dir.iterdir()) if audio_dir.is_dir() else []:
        if p.suffix.lower() in SUFFIXES:
            wav, sr = load_audio(p)
            real.append((p.name, wav.numpy().mean(axis=0), sr))
    if not real:
        print(f"no real clips in {audio_dir}", file=sys.stderr)
    groups: dict[str, list] = {}
    if real:
        groups[f"real clips ({len(real)})"] = real
    groups[f"synthetic clean ({args.synthetic})"] = clean_synthetic(args.synthetic)
    groups.update(probes(real))
    t0 = time.perf_counter()
    report = {}
    short = {
        "loudness_lufs": "LUFS",
        "silent_fraction": "silent",
        "dc_offset": "dc",
        "clipped_fraction": "clipped",
        "spectral_flatness": "flatness",
        "tonal_dominance": "tonal",
        "repetition": "repetition",
    }
    print("| group | n | " + " | ".join(short[k] for k in SIGNAL_NAMES) + " | flagged (by flag) |")
    print("|---" * (len(SIGNAL_NAMES) + 3) + "|")
    for group, items in groups.items():
        stats, rows = measure(items, config)
        report[group] = {"stats": stats, "rows": rows}
        flagged = sum(1 for r in rows if r["flags"])
        by_flag = {f: sum(f in r["flags"] for r in rows) for f in FLAGS}
        by_flag_s = ", ".join(f"{f} {c}" for f, c in by_flag.items() if c)
        cells = []
        for k in SIGNAL_NAMES:
            lo, med, hi = stats[k]
            cells.append(f"{med:.3g}" if len(items) == 1 else f"{lo:.3g} / {med:.3g} / {hi:.3g}")
        print(
            f"| {group} | {len(items)} | "
            + " | ".join(cells)
            + f" | {flagged}/{len(items)} ({by_flag_s or '-'}) |"
        )
    print(f"\nthresholds: {config}")
    print(f"measured in {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
