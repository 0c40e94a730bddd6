"""`apex-reward demo`, README command 1. Its wall time is recorded in
BENCHMARKS.md (timed tests are not used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import torch

from apex_reward import ApexRewardModel
from apex_reward.audio import load_audio
from apex_reward.config import AESTHETIC_TASKS
from apex_reward.training.audit.probes import (
    PROBE_RATE,
    clip_probes,
    signal_probes,
    synthetic_reference_clips,
    to_probe_rate,
)


def test_demo_end_to_end(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "apex_reward", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for task in AESTHETIC_TASKS:  # held-out synthetic songs the model did not train on
        assert report["test_metrics"][task]["pearson"] >= 0.5, (task, report["test_metrics"][task])
    assert report["prepare"]["unreadable"] > 0 and report["prepare"]["final"] >= 400
    assert report["scored"] and all("scores" in r for r in report["scored"])
    # the checkpoint's Bradley-Terry temperature was fitted on its validation pairs: calibrated on
    # the held-out test pairs, and able to state a confident preference
    cal = report["calibration"]
    assert cal["calibration"] == "fitted_temperature" and "validation" in cal["fitted_on"]
    held = cal["held_out"]
    assert held["ece"] <= 0.05 and held["ece"] < held["ece_before"], held
    assert held["max_probability"] > 0.9, held
    md = (out / "report.md").read_text()
    assert "randomly initialised" in md and "![predicted vs true](demo_test_predictions.png)" in md
    assert (out / "demo_test_predictions.png").stat().st_size > 10_000
    model = ApexRewardModel.from_pretrained(out / "train" / "model")
    assert not model.untrained and model.config.frontend.segment_seconds == 10.0
    assert "untrained (random weights)" in proc.stdout and "| file |" in proc.stdout
    _check_ood_flag(model, out)


def _ood_flags(model: ApexRewardModel, waves: list[torch.Tensor], rates: list[int]) -> list[bool]:
    flags = []
    with torch.inference_mode():
        for i in range(0, len(waves), 8):
            out = model(waves[i : i + 8], rates[i : i + 8], guard="flag")
            flags += ["ood" in f for f in out.flags]
    return flags


def _check_ood_flag(model: ApexRewardModel, out) -> None:
    """The demo model's OOD flag: on the audit's counted static probes (non-music signals and
    2 s loops of its best reference songs, as `apex-reward audit` builds them) and on the
    held-out test songs of the demo corpus."""
    assert model.ood_stats is not None and model.config.ood.features == "moments"
    refs = synthetic_reference_clips(8, seed=0)
    with torch.inference_mode():
        ref_reward = model([c.waveform for c in refs], PROBE_RATE, guard="off").reward
    best = np.argsort(-ref_reward.numpy(), kind="stable")[:4]
    loops = clip_probes(
        [(refs[i].name, to_probe_rate(refs[i])) for i in best],
        probe_seconds=20.0,
        loop_seconds=2.0,
        seed=0,
    )
    probes = signal_probes(20.0, seed=0) + [q for q in loops if q.counts]
    probe_flags = _ood_flags(model, [q.waveform for q in probes], [PROBE_RATE] * len(probes))
    assert np.mean(probe_flags) >= 0.9, [q.name for q, f in zip(probes, probe_flags) if not f]
    prepared = pd.read_parquet(out / "prepared" / "prepared.parquet")
    test = prepared[prepared["split"] == "test"]
    waves, rates = zip(*(load_audio(p) for p in test["audio_path"]))
    song_flags = _ood_flags(model, list(waves), [int(r) for r in rates])
    assert len(song_flags) >= 50 and np.mean(song_flags) <= 0.05, sum(song_flags)
