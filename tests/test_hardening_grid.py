"""``grid`` reruns a condition whose training configuration changed (like ``train`` refuses a
changed one), prints no ``-0.000``, and labels the learning-curve axes."""

from __future__ import annotations

import json

import pytest

from apex_reward.training.grid import GridConfig, _fmt, run_grid_experiment
from apex_reward.training.synthetic import synthetic_embedding_corpus

pytestmark = pytest.mark.usefixtures("one_thread")


def test_changed_epochs_or_lr_retrain_and_same_config_is_reused(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to look at them
    data = synthetic_embedding_corpus(tmp_path / "data", num_songs=100, seed=2, max_segments=2)
    cfg = dict(
        embeddings=data["embeddings"],
        prepared=data["prepared"],
        out=str(tmp_path / "grid"),
        only=["A-song-popularity"],
        batch_size=64,
        device="cpu",
        log_with="none",
    )
    first = run_grid_experiment(GridConfig(**cfg, epochs=1), progress=False)
    assert first["ran"] == ["A-song-popularity"]
    metrics = tmp_path / "grid" / "conditions" / "A-song-popularity" / "metrics.json"
    again = run_grid_experiment(GridConfig(**cfg, epochs=1), progress=False)
    assert again["skipped"] == ["A-song-popularity"] and again["ran"] == []
    more = run_grid_experiment(GridConfig(**cfg, epochs=2, patience=5), progress=False)
    assert more["ran"] == ["A-song-popularity"]
    history = json.loads((metrics.parent / "history.json").read_text())
    assert [h["epoch"] for h in history][-1] == 1  # two epochs: 0 and 1
    lr = run_grid_experiment(GridConfig(**cfg, epochs=2, patience=5, lr=3e-3), progress=False)
    assert lr["ran"] == ["A-song-popularity"]
    curves = figures[0]
    assert (curves.axes[0].get_xlabel(), curves.axes[0].get_ylabel()) == (
        "epoch",
        "loss (unit range)",
    )


def test_tables_print_no_negative_zero():
    assert _fmt(-0.0001, 3) == "0.000" and _fmt(-0.0, 3) == "0.000"
    assert _fmt(-0.0016, 3) == "-0.002" and _fmt(float("nan"), 3) == "—"
