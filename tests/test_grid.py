"""The 24-condition grid: the paper's condition names, tables, plots, best model, and resuming."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from apex_reward import ApexRewardModel
from apex_reward.training.grid import GridConfig, conditions, run_grid_experiment
from apex_reward.training.synthetic import synthetic_embedding_corpus


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_condition_names_follow_the_paper():
    names = [c["name"] for c in conditions(GridConfig())]
    assert len(names) == len(set(names)) == 24
    assert names[:4] == [
        "A-song-popularity",
        "A-song-full",
        "A-segment-popularity",
        "A-segment-full",
    ]
    c = next(c for c in conditions(GridConfig()) if c["name"] == "C-song-full")
    assert (c["loss"], c["trunk_layers"], c["mode"], c["tasks"]) == (
        "uncertainty",
        2,
        "song",
        "full",
    )


def test_grid_runs_all_conditions_and_resumes(tmp_path):
    from conftest import make_tiny_model

    data = synthetic_embedding_corpus(tmp_path / "data", num_songs=400, seed=1, max_segments=2)
    base = tmp_path / "base"
    make_tiny_model(seed=0).save_pretrained(base)
    cfg = dict(
        embeddings=data["embeddings"],
        prepared=data["prepared"],
        model=str(base),
        out=str(tmp_path / "grid"),
        epochs=2,
        batch_size=128,
        device="cpu",
        log_with="none",
    )
    first = ["A-song-full", "C-song-full", "F-segment-popularity"]
    interrupted = run_grid_experiment(GridConfig(**cfg, only=first), progress=False)
    assert sorted(interrupted["ran"]) == sorted(first)
    stamps = {
        n: (tmp_path / "grid" / "conditions" / n / "metrics.json").stat().st_mtime_ns for n in first
    }
    full = run_grid_experiment(GridConfig(**cfg), progress=False)
    assert sorted(full["skipped"]) == sorted(first) and len(full["ran"]) == 21
    for n in first:  # finished conditions were not redone
        assert (tmp_path / "grid" / "conditions" / n / "metrics.json").stat().st_mtime_ns == stamps[
            n
        ]
    out = tmp_path / "grid"
    t1, t2 = pd.read_csv(out / "table1.csv"), pd.read_csv(out / "table2.csv")
    assert len(t1) == len(t2) == 24 and t1["condition"].is_unique
    assert t1[["streams_mse", "streams_pearson", "likes_spearman"]].notna().all().all()
    full_rows = t2["tasks"] == "full"
    assert (
        t2.loc[full_rows, "clarity_pearson"].notna().all()
        and t2.loc[~full_rows, "clarity_pearson"].isna().all()
    )
    md = (out / "table1.md").read_text()
    assert md.count("\n| ") == 25 and "streams Pearson" in md  # header + 24 rows
    for png in ("learning_curves.png", "pred_vs_true.png"):
        assert (out / png).stat().st_size > 10_000
    summary = json.loads((out / "grid_summary.json").read_text())
    best = ApexRewardModel.from_pretrained(out / "best_model")
    assert not best.untrained and best.config.training["config"]["out"].endswith(summary["best"])
    assert summary["best"].endswith("-full") and "clarity" in best.score_names  # a reward model
