"""Calibrated preferences: the maximum-likelihood Bradley–Terry temperature
(apex_reward.calibration) and ``apex-reward calibrate``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import make_tiny_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.calibration import (
    calibrate_temperature,
    fit_temperature,
    ordered_pairs,
    reliability,
)
from apex_reward.cli import main
from apex_reward.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def _logistic_pairs(n: int, temperature: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 0.2, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-d / temperature))).astype(float)
    return d, y


def test_fit_recovers_a_known_temperature_and_calibrates():
    d, y = _logistic_pairs(20000, 0.05, seed=0)
    t = fit_temperature(d, y)
    assert abs(t / 0.05 - 1) < 0.05, t
    hd, hy = _logistic_pairs(20000, 0.05, seed=1)
    t2, cal = calibrate_temperature(d, y, data="synthetic", held_out=(hd, hy))
    assert t2 == t and cal.pairs == 20000 and cal.data == "synthetic"
    # temperature 1 on differences of a few tenths says ~0.5 for everything: badly calibrated
    assert cal.held_out["ece"] <= 0.02 < 0.2 < cal.held_out["ece_before"]
    assert cal.held_out["brier"] < cal.held_out["brier_before"]
    assert cal.held_out["max_probability"] > 0.99
    # the fitted probabilities are what reliability() measures
    p = 1 / (1 + np.exp(-hd / t))
    assert reliability(p, hy).ece == pytest.approx(cal.held_out["ece"])


def test_pairs_ordered_by_targets():
    pred = np.array([0.1, 0.2, 0.3, 0.3])
    true = np.array([1.0, 2.0, 3.0, 3.0])  # the tie (songs 2, 3) is not a pair
    d, y = ordered_pairs(pred, true, seed=0)
    assert d.size == 5 and set(y) == {0.0, 1.0}
    assert np.all((d > 0) == (y == 1))  # this predictor orders every pair right


@pytest.mark.parametrize(
    "diff, labels, match",
    [
        ([], [], "no labelled pairs"),
        ([0.1, 0.2], [1.0], "2 reward differences but 1 labels"),
        ([0.1, np.nan], [1.0, 0.0], "finite"),
        ([0.1, 0.2], [1.0, 2.0], r"\[0, 1\]"),
        ([0.0, 0.0], [1.0, 0.0], "equal rewards"),
        ([0.1, 0.2, -0.1], [0.0, 0.0, 1.0], "against their labels"),
    ],
)
def test_fit_errors_name_the_problem(diff, labels, match):
    with pytest.raises(ConfigError, match=match):
        fit_temperature(diff, labels)


@pytest.fixture(scope="module")
def scored_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("calibrate")
    model = make_tiny_model(seed=5)
    model.save_pretrained(root / "model")
    files = []
    for i in range(10):
        f = root / "audio" / f"song{i}.wav"
        f.parent.mkdir(exist_ok=True)
        sf.write(f, synth_music(2.0 + 0.2 * i, 24000, seed=40 + i)[0], 24000)
        files.append(f)
    with torch.inference_mode():
        rewards = [r.reward for r in model.score(files, guard="flag")]
    return root, files, np.array(rewards)


def test_calibrate_recovers_the_temperature_of_a_logistic_pairs_file(scored_files, capsys):
    root, files, rewards = scored_files
    spread = float(np.std(rewards[:, None] - rewards[None, :]))
    assert spread > 0
    true_t = spread / 3
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(4000):
        a, b = rng.choice(len(files), size=2, replace=False)
        p = 1 / (1 + np.exp(-(rewards[a] - rewards[b]) / true_t))
        label = int(rng.random() < p)
        # paths relative to the pairs file
        lines.append(
            json.dumps(
                {"a": f"audio/{files[a].name}", "b": f"audio/{files[b].name}", "label": label}
            )
        )
    lines.append(json.dumps({"a": "audio/missing.wav", "b": "audio/song0.wav", "label": 1}))
    (root / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "calibrated"
    status = main(
        [
            "calibrate",
            "--model",
            str(root / "model"),
            "--pairs",
            str(root / "pairs.jsonl"),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert status == 0
    summary = json.loads(capsys.readouterr().out)
    assert abs(summary["temperature"] / true_t - 1) < 0.10, (summary["temperature"], true_t)
    assert summary["pairs"] == 4000 and summary["pairs_skipped"] == 1
    assert list(summary["failed_files"]) == [str(root / "audio" / "missing.wav")]
    assert summary["in_use"]["calibration"] == "fitted_temperature"
    model = ApexRewardModel.from_pretrained(out)
    assert model.config.preference.temperature == pytest.approx(summary["temperature"])
    assert model.preference_calibration["calibration"] == "fitted_temperature"
    assert "pairs.jsonl" in model.config.preference.calibration.data
    # the original checkpoint is untouched
    assert ApexRewardModel.from_pretrained(root / "model").preference_calibration == {
        "method": "bradley_terry",
        "temperature": 1.0,
        "calibration": "fixed_temperature",
    }


def test_calibrate_rejects_a_bad_pairs_file(scored_files, capsys):
    root, _, _ = scored_files
    bad = root / "bad.jsonl"
    bad.write_text('{"a": "audio/song0.wav", "b": "audio/song1.wav", "label": 3}\n')
    assert main(["calibrate", "--model", str(root / "model"), "--pairs", str(bad)]) == 1
    assert "bad.jsonl:1: label must be in [0, 1]" in capsys.readouterr().err
