"""Multi-task training: recovery of a known function, DDP against one process, the exported
checkpoint, the steps one at a time, and the resumable state."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import accelerate_launch, write_good_files

from apex_reward import ApexRewardModel
from apex_reward.config import ALL_TASKS, SCORE_RANGES
from apex_reward.training.embeddings import EmbeddingStore
from apex_reward.training.synthetic import synthetic_embedding_corpus
from apex_reward.training.trainer import TrainConfig, TrainingData, combine_losses, train
from apex_reward.training.trainer.export import export_run
from apex_reward.training.trainer.steps import (
    evaluate_best,
    resume,
    run_epoch,
    setup,
    validation_loss,
)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny matmuls: one thread is faster and avoids OpenMP spinning on a busy 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _function_data(n_train: int, seed: int = 1):
    """Song-mode tensors whose unit-range targets are f(x) + N(0, sigma_t^2), f representable."""
    L, H = 4, 32
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([0.5, 1.0, -0.7, 0.3])
    w1 = torch.randn(H, 16, generator=g) / H**0.5
    w2 = torch.randn(16, 7, generator=g) * 0.8 / 2
    sigma = torch.tensor([0.10, 0.14, 0.08, 0.12, 0.15, 0.09, 0.11])
    lo = torch.tensor([SCORE_RANGES[t][0] for t in ALL_TASKS])
    span = torch.tensor([SCORE_RANGES[t][1] - SCORE_RANGES[t][0] for t in ALL_TASKS])
    feats, targets, clean = {}, {}, {}
    for split, n in (("train", n_train), ("val", n_train // 8), ("test", n_train // 4)):
        x = torch.randn(n, L, H, generator=g)
        f = torch.sigmoid(torch.tanh(torch.einsum("l,nlh->nh", a, x) @ w1) @ w2)
        feats[split] = x.half()
        targets[split] = (f + sigma * torch.randn(n, 7, generator=g)) * span + lo
        clean[split] = f
    vc = clean["test"].var(dim=0)
    ceiling = torch.sqrt(vc / (vc + sigma**2))
    return TrainingData.from_arrays(feats, targets, ALL_TASKS), sigma**2, ceiling


def test_training_recovers_a_known_function_and_its_noise(tmp_path):
    """Test Pearson within 0.05 of the noise ceiling for every task; with uncertainty
    weighting each learned exp(s_t) within a factor 2 of the task's noise variance (unit range)."""
    data, noise_var, ceiling = _function_data(6000)
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        epochs=60,
        patience=12,
        batch_size=256,
        log_with="none",
        export=False,
    )
    result = train(cfg, data, progress=False)
    assert result.finished
    sigma2 = np.exp(result.log_vars)
    for j, task in enumerate(ALL_TASKS):
        pearson = result.metrics["test"][task]["pearson"]
        assert pearson >= ceiling[j].item() - 0.05, (task, pearson, ceiling[j].item())
        ratio = sigma2[j] / noise_var[j].item()
        assert 0.5 <= ratio <= 2.0, (task, sigma2[j], noise_var[j].item())
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["params_in_sync"] is True and set(metrics["metrics"]) == {"train", "val", "test"}


def test_training_steps_one_at_a_time(tmp_path):
    """setup -> resume -> one epoch -> evaluate -> export, each step called on its own."""
    data, _, _ = _function_data(512, seed=4)
    cfg = TrainConfig(
        out=str(tmp_path / "run"),
        epochs=3,
        patience=2,
        batch_size=128,
        lr=3e-3,
        log_with="none",
        export=False,
        device="cpu",
    )
    run = setup(cfg, data)
    assert (run.steps_per_epoch, run.global_batch, run.world) == (4, 128, 1)
    # optimizer groups: weight matrices decay, biases/norms do not, s_t has its own rate
    groups = run.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [cfg.weight_decay, 0.0, 0.0]
    assert groups[2]["lr"] == 10 * cfg.lr and groups[2]["params"] == [run.module.log_vars]
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and groups[1]["params"]
    state = resume(run)  # nothing saved yet: a fresh start
    assert (state.next_epoch, state.best_epoch, state.history, state.finished) == (0, -1, [], False)
    assert run.model is not None and (run.module.log_vars < 0).all()  # s_t = log(initial MSE)

    before = [p.detach().clone() for p in run.module.parameters()]
    record = run_epoch(run, state)
    assert record["epoch"] == 0 and np.isfinite(record["train_loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, run.module.parameters()))
    assert (state.next_epoch, state.best_epoch, state.bad_epochs) == (1, 0, 0)
    assert state.history == [record] and not state.finished
    assert state.best_val == record["val_loss"] and (tmp_path / "run" / "best").is_dir()
    # the validation criterion is reproducible from the step itself
    val, per_task = validation_loss(run, data.splits["val"])
    assert val == pytest.approx(record["val_loss"]) and len(per_task) == len(ALL_TASKS)

    best = evaluate_best(run)
    assert set(best.metrics) == {"train", "val", "test"}
    assert set(best.metrics["test"]) == set(ALL_TASKS)
    assert best.metrics["test"]["streams"]["n"] == len(data.splits["test"]) == len(best.predictions)
    assert {"id", "pred_streams", "true_clarity"} <= set(best.predictions.columns)
    checkpoint = export_run(run, state, best, seconds=1.0, params_in_sync=True)
    assert checkpoint is None  # export=False: results only
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["best_epoch"] == 0 and metrics["config"]["device"] == "cpu"
    assert json.loads((tmp_path / "run" / "history.json").read_text())[0]["epoch"] == 0
    run.accelerator.end_training()


def test_loss_strategies():
    per_task = torch.tensor([0.04, 0.01, 0.02])
    w = torch.tensor([1.0, 1.0, 0.5])
    s = torch.log(torch.tensor([0.04, 0.02, 0.01]))
    assert torch.isclose(combine_losses(per_task, "equal", torch.ones(3), s), per_task.sum())
    assert torch.isclose(combine_losses(per_task, "manual", w, s), torch.tensor(0.04 + 0.01 + 0.01))
    expected = (0.5 * torch.exp(-s) * per_task + 0.5 * s).sum()
    assert torch.isclose(combine_losses(per_task, "uncertainty", w, s), expected)
    # d/ds of the uncertainty loss vanishes at s = log L
    s_opt = torch.log(per_task).requires_grad_(True)
    combine_losses(per_task, "uncertainty", w, s_opt).backward()
    assert s_opt.grad.abs().max() < 1e-6


def test_early_stopping_and_resume_give_the_same_run(tmp_path):
    data, _, _ = _function_data(1024, seed=3)
    base = dict(epochs=12, patience=3, batch_size=128, log_with="none", export=False, lr=3e-3)
    straight = train(TrainConfig(out=str(tmp_path / "a"), **base), data, progress=False)
    first = train(
        TrainConfig(out=str(tmp_path / "b"), max_epochs_this_run=4, **base), data, progress=False
    )
    assert not first.finished and len(first.history) == 4
    second = train(TrainConfig(out=str(tmp_path / "b"), **base), data, progress=False)
    assert second.finished
    assert [h["val_loss"] for h in second.history] == [h["val_loss"] for h in straight.history]
    assert second.best_epoch == straight.best_epoch
    assert second.metrics["test"] == straight.metrics["test"]
    # early stopping: the run ends `patience` epochs after the best one, or at `epochs`
    last = straight.history[-1]["epoch"]
    assert last == min(base["epochs"] - 1, straight.best_epoch + base["patience"])
    # a different configuration refuses to resume into the same directory
    with pytest.raises(Exception, match="different configuration"):
        train(TrainConfig(out=str(tmp_path / "b"), **{**base, "lr": 1e-2}), data, progress=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic_store")
    # low noise and a large test split: both runs converge near the ceiling, so the comparison
    # measures DDP, not run-to-run noise
    return synthetic_embedding_corpus(
        out, num_songs=4000, seed=0, split=(0.7, 0.15, 0.15), noise_std=[0.05] * 7
    )


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    from conftest import make_tiny_model

    d = tmp_path_factory.mktemp("base") / "tiny"
    make_tiny_model(seed=0).save_pretrained(d)
    return d


def test_ddp_four_processes_match_one_process(store, base_model, tmp_path):
    """accelerate launch --multi_gpu --num_processes 4 (CPU, gloo) vs 1 process with
    the same global batch: parameters stay in sync, test Pearson within 0.02."""
    common = [
        "--embeddings",
        store["embeddings"],
        "--prepared",
        store["prepared"],
        "--model",
        str(base_model),
        "--device",
        "cpu",
        "--epochs",
        "40",
        "--patience",
        "40",
        "--log-with",
        "none",
        "--no-export",
        "--lr",
        "3e-3",
    ]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "apex_reward",
            "train",
            *common,
            "--out",
            str(tmp_path / "one"),
            "--batch-size",
            "256",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    four = subprocess.run(
        [
            *accelerate_launch(4),
            "train",
            *common,
            "--out",
            str(tmp_path / "four"),
            "--batch-size",
            "64",
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=900,
    )
    assert four.returncode == 0, four.stderr[-2000:]
    m1 = json.loads((tmp_path / "one" / "metrics.json").read_text())
    m4 = json.loads((tmp_path / "four" / "metrics.json").read_text())
    assert m1["world_size"] == 1 and m4["world_size"] == 4
    assert m4["params_in_sync"] is True
    for task in ALL_TASKS:
        p1, p4 = m1["metrics"]["test"][task]["pearson"], m4["metrics"]["test"][task]["pearson"]
        assert abs(p1 - p4) <= 0.02, (task, p1, p4)


def test_exported_checkpoint_matches_trainer_and_scores_audio(store, base_model, tmp_path):
    """The export loads with from_pretrained, scores audio through `apex-reward
    score`, and its predictions on the test split equal the trainer's."""
    out = tmp_path / "run"
    cfg = TrainConfig(
        embeddings=store["embeddings"],
        prepared=store["prepared"],
        model=str(base_model),
        out=str(out),
        epochs=8,
        batch_size=256,
        log_with="none",
        device="cpu",
    )
    result = train(cfg, progress=False)
    model = ApexRewardModel.from_pretrained(result.checkpoint)
    assert not model.untrained and model.config.popularity_reference is not None
    assert model.config.training["best_epoch"] == result.best_epoch
    # the Bradley-Terry temperature was fitted on the validation songs at export
    cal = model.config.preference.calibration
    assert cal is not None and "validation split" in cal.data and cal.pairs > 0
    assert model.preference_calibration["calibration"] == "fitted_temperature"
    assert 0 < model.config.preference.temperature != 1.0
    preds = pd.read_parquet(out / "test_predictions.parquet")
    feats = EmbeddingStore(store["embeddings"]).segments(preds["id"].tolist())
    with torch.inference_mode():
        scores = model.predict_from_features(feats).scores
    for task in ALL_TASKS:
        np.testing.assert_allclose(
            scores[task].numpy(), preds[f"pred_{task}"].to_numpy(), rtol=0, atol=1e-3
        )
    audio = write_good_files(tmp_path / "audio")[:2]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "apex_reward",
            "score",
            "--model",
            str(result.checkpoint),
            *map(str, audio),
        ],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(rows) == 2 and all("scores" in r and "untrained" not in r for r in rows)
    assert "UNTRAINED" not in proc.stderr


def test_segment_mode_and_popularity_only(store, tmp_path):
    for tasks, mode in (("popularity", "segment"), ("full", "segment")):
        cfg = TrainConfig(
            embeddings=store["embeddings"],
            prepared=store["prepared"],
            out=str(tmp_path / f"{tasks}-{mode}"),
            tasks=tasks,
            mode=mode,
            epochs=3,
            batch_size=512,
            log_with="none",
            export=False,
            device="cpu",
        )
        result = train(cfg, progress=False)
        assert set(result.metrics["test"]) == (
            {"streams", "likes"} if tasks == "popularity" else set(ALL_TASKS)
        )
        n_test = (pd.read_parquet(store["prepared"])["split"] == "test").sum()
        assert result.metrics["test"]["streams"]["n"] == n_test  # per song, not per segment
