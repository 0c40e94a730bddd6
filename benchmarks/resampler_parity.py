"""Inference-resampler parity: scores through the server's soxr path vs the model's own
(differentiable, julius) front end, on real audio.

For each file of ``--audio-dir`` (default ``/work/shared/audio``, or ``$APEX_SHARED_AUDIO``), the
decoded clip is scored twice with the same model:

* ``model``: in-process ``model.score`` (the front end downmixes, trims and resamples with
  julius), what ``apex-reward serve --resampler model`` computes;
* ``soxr``: what ``apex-reward serve --resampler soxr`` computes: the server's
  :class:`~apex_reward.integrations.serving.prepare.InferencePrep` (guard signals on the clip as
  sent, downmix, soxr to the encoder rate) on a decode thread, then the model with its guard off,
  then the guard policy applied from the signals measured earlier.

Prints the max absolute difference of the reward and of each score (JSON, then a table), and the
time each resampler takes per clip.

    python benchmarks/resampler_parity.py --preset tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from apex_reward import ApexConfig, ApexRewardModel
from apex_reward.audio import load_audio
from apex_reward.integrations.serving import ServeConfig
from apex_reward.integrations.serving.prepare import InferencePrep
from apex_reward.scoring import score_waveforms

SUFFIXES = {".wav", ".flac", ".ogg", ".mp3"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--preset", default="tiny", choices=["tiny", "mert-v1-95m"])
    p.add_argument("--audio-dir", default=os.environ.get("APEX_SHARED_AUDIO", "/work/shared/audio"))
    p.add_argument(
        "--max-seconds", type=float, default=60.0, help="score the first N s of each file"
    )
    p.add_argument("--guard", default="penalize", choices=["off", "flag", "penalize"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    files = sorted(f for f in Path(args.audio_dir).iterdir() if f.suffix.lower() in SUFFIXES)
    if not files:
        print(f"no audio in {args.audio_dir}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    model = ApexRewardModel.from_config(
        ApexConfig.from_preset(args.preset, encoder_source=None), encoder="random"
    ).eval()
    prep = InferencePrep(model, ServeConfig(resampler="soxr", guard=args.guard))
    rows, t_model, t_soxr = [], 0.0, 0.0
    for f in files:
        wav, sr = load_audio(f)
        wav = wav[:, : int(args.max_seconds * sr)]
        (ref,) = model.score([(wav, sr)], num_workers=0, guard=args.guard)
        t = time.perf_counter()
        model.frontend.resample(model.frontend.downmix(wav), sr)
        t_model += time.perf_counter() - t
        t = time.perf_counter()
        prepared = prep(wav, sr)
        t_soxr += time.perf_counter() - t
        (got,) = score_waveforms(
            model, [(f.name, prepared.wav, prepared.sample_rate)], guard=prep.batcher_guard
        )
        got = prep.finish(got, prepared)
        assert ref.ok and got.ok, (ref.error, got.error)
        diff = {"reward": abs(got.reward - ref.reward)}
        diff.update({k: abs(got.scores[k] - v) for k, v in ref.scores.items()})
        rows.append(
            {
                "file": f.name,
                "rate": sr,
                "channels": wav.shape[0],
                "flags_equal": got.flags == ref.flags,
                **diff,
            }
        )
    keys = [k for k in rows[0] if k not in ("file", "rate", "channels", "flags_equal")]
    worst = {k: max(r[k] for r in rows) for k in keys}
    print(
        json.dumps({"preset": args.preset, "files": len(rows), "max_abs_diff": worst, "rows": rows})
    )
    print(
        f"\n{len(rows)} files, first {args.max_seconds:g} s each, preset {args.preset}, guard {args.guard}",
        file=sys.stderr,
    )
    print("| quantity | max abs difference (soxr path - model path) |", file=sys.stderr)
    print("|---|---|", file=sys.stderr)
    for k, v in worst.items():
        print(f"| {k} | {v:.2e} |", file=sys.stderr)
    print(f"flags equal on every file: {all(r['flags_equal'] for r in rows)}", file=sys.stderr)
    print(
        f"front-end downmix+resample per file: julius {t_model / len(rows) * 1000:.1f} ms, "
        f"soxr path (signals + downmix + soxr) {t_soxr / len(rows) * 1000:.1f} ms",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
