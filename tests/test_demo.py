"""`apex-reward demo`, README command 1. Its wall time is recorded in
BENCHMARKS.md (timed tests are not used)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from apex_reward import ApexRewardModel
from apex_reward.config import AESTHETIC_TASKS


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
