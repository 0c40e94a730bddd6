"""Inference-resampler parity: scores through the server's decode-thread preparation
(``--resampler exact`` and ``soxr``) vs the model's own (differentiable, julius) front end, on
real audio.

For each file of ``--audio-dir`` (default ``/work/shared/audio``, or ``$APEX_SHARED_AUDIO``), the
decoded clip is scored with the same model:

* ``model``: in-process ``model.score`` (the front end downmixes, trims and resamples with
  julius), what ``apex-reward serve --resampler model`` computes;
* each of ``--resamplers``: what ``apex-reward serve --resampler R`` computes: the server's
  :class:`~apex_reward.integrations.serving.prepare.InferencePrep` (guard signals on the clip as
  sent, downmix, then the model's own trim and julius resampler for ``exact`` or soxr for
  ``soxr``) on a decode thread, then the model with its guard off, then the guard policy applied
  from the signals measured earlier.

Prints, per resampler, the max absolute difference of the reward and of each score (JSON, then a
table), and the time each preparation takes per clip.

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
    p.add_argument("--resamplers", nargs="+", default=["exact", "soxr"], choices=["exact", "soxr"])
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
    preps = {
        name: InferencePrep(model, ServeConfig(resampler=name, guard=args.guard))
        for name in args.resamplers
    }
    rows = {name: [] for name in preps}
    seconds = {name: 0.0 for name in ["model", *preps]}
    for f in files:
        wav, sr = load_audio(f)
        wav = wav[:, : int(args.max_seconds * sr)]
        (ref,) = model.score([(wav, sr)], num_workers=0, guard=args.guard)
        t = time.perf_counter()
        model.frontend.resample(model.frontend.downmix(wav), sr)
        seconds["model"] += time.perf_counter() - t
        for name, prep in preps.items():
            t = time.perf_counter()
            prepared = prep(wav, sr)
            seconds[name] += time.perf_counter() - t
            (got,) = score_waveforms(
                model, [(f.name, prepared.wav, prepared.sample_rate)], guard=prep.batcher_guard
            )
            got = prep.finish(got, prepared)
            assert ref.ok and got.ok, (ref.error, got.error)
            diff = {"reward": abs(got.reward - ref.reward)}
            diff.update({k: abs(got.scores[k] - v) for k, v in ref.scores.items()})
            rows[name].append(
                {
                    "file": f.name,
                    "rate": sr,
                    "channels": wav.shape[0],
                    "flags_equal": got.flags == ref.flags,
                    **diff,
                }
            )
    skip = ("file", "rate", "channels", "flags_equal")
    worst = {
        name: {k: max(r[k] for r in rs) for k in rs[0] if k not in skip}
        for name, rs in rows.items()
    }
    print(
        json.dumps(
            {"preset": args.preset, "files": len(files), "max_abs_diff": worst, "rows": rows}
        )
    )
    print(
        f"\n{len(files)} files, first {args.max_seconds:g} s each, preset {args.preset}, "
        f"guard {args.guard}",
        file=sys.stderr,
    )
    names = list(preps)
    print("| quantity | " + " | ".join(f"max abs diff, {n} - model" for n in names) + " |",
          file=sys.stderr)  # fmt: skip
    print("|---|" + "---|" * len(names), file=sys.stderr)
    for k in worst[names[0]]:
        print(f"| {k} | " + " | ".join(f"{worst[n][k]:.2e}" for n in names) + " |", file=sys.stderr)
    for n in names:
        flags = all(r["flags_equal"] for r in rows[n])
        print(f"{n}: flags equal on every file: {flags}", file=sys.stderr)
    print(
        "per file, preparation time (one thread): "
        + ", ".join(f"{n} {seconds[n] / len(files) * 1000:.1f} ms" for n in seconds)
        + " (model = downmix + julius only; exact/soxr include the guard signals)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
