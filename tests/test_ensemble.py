"""Head ensembles: ``train --ensemble K`` (bootstrap members, one checkpoint sharing the
encoder), the members' mean and standard deviation on every output, the pessimistic reward,
and ``grid``/``demo`` accepting ``--ensemble``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from apex_reward import ApexRewardModel
from apex_reward.checkpoint import read_checkpoint
from apex_reward.heads import combine_scores
from apex_reward.training.synthetic import synthetic_embedding_corpus
from apex_reward.training.trainer import TrainConfig, train
from apex_reward.training.trainer.data import SplitData
from apex_reward.training.trainer.ensemble import bootstrap_split

pytestmark = pytest.mark.usefixtures("one_thread")

K = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from conftest import make_tiny_model

    torch.set_num_threads(1)  # a module fixture runs before the one_thread fixture
    root = tmp_path_factory.mktemp("ensemble")
    corpus = synthetic_embedding_corpus(
        root / "c", num_songs=500, seed=0, split=(0.6, 0.2, 0.2), noise_std=[0.05] * 7
    )
    base = root / "base"
    make_tiny_model(seed=0).save_pretrained(base)
    common = dict(
        embeddings=str(root / "c" / "embeddings"),
        prepared=str(root / "c" / "prepared" / "prepared.parquet"),
        model=str(base),
        epochs=25,
        patience=25,
        batch_size=64,
        lr=3e-3,
        device="cpu",
        log_with="none",
        save_interval_s=1e9,  # resumable state at the end only
    )
    single = train(TrainConfig(out=str(root / "single"), **common), progress=False)
    ensemble = train(TrainConfig(out=str(root / "ens"), ensemble=K, **common), progress=False)
    return single, ensemble, corpus


def _mean_pearson(metrics) -> float:
    return float(np.mean([m["pearson"] for m in metrics["test"].values()]))


def test_the_mean_is_no_worse_than_a_single_head(runs):
    single, ensemble, _ = runs
    assert ensemble.finished and len(ensemble.member_metrics) == K
    metrics = json.loads((ensemble.out / "metrics.json").read_text())
    assert metrics["ensemble"] == K and len(metrics["member_metrics"]) == K
    assert _mean_pearson(ensemble.metrics) >= _mean_pearson(single.metrics) - 0.01
    for member in ensemble.member_metrics:  # the mean beats its own members
        assert _mean_pearson(ensemble.metrics) >= _mean_pearson(member) - 1e-6


def test_checkpoint_holds_all_heads_one_encoder_and_statistics(runs):
    _, ensemble, _ = runs
    raw, tensors, _ = read_checkpoint(ensemble.checkpoint)
    assert raw["ensemble_size"] == K and raw["training"]["ensemble"] == K
    # every trained checkpoint carries a fitted Bradley-Terry temperature, ensembles included
    assert raw["preference"]["calibration"]["pairs"] > 0 and raw["preference"]["temperature"] != 1.0
    assert {k.split(".")[1] for k in tensors if k.startswith("ensemble.")} == {"0", "1"}
    assert any(k.startswith("ood.") for k in tensors) and raw["ood"]["fitted_on"]["songs"] > 0
    model = ApexRewardModel.from_pretrained(ensemble.checkpoint)
    heads = [model.head, *model.ensemble_heads]
    assert not torch.equal(heads[0].aggregate.weight, heads[1].aggregate.weight)


def test_outputs_carry_mean_std_and_the_pessimistic_reward(runs):
    _, ensemble, _ = runs
    model = ApexRewardModel.from_pretrained(ensemble.checkpoint)
    calls = []
    model.encoder.register_forward_hook(lambda *a: calls.append(1))
    g = torch.Generator().manual_seed(0)
    waves = [torch.randn(24000 * 3, generator=g) * 0.1 for _ in range(2)]
    with torch.inference_mode():
        out = model(waves, 24000, return_embeddings=True)
        feats = out.features
        per = [
            combine_scores(h(feats.layer_features, feats.song_index, feats.weights, 2))
            for h in [model.head, *model.ensemble_heads]
        ]
    assert len(calls) == 1  # one encoder pass for all heads
    for name, v in out.scores.items():
        stacked = torch.stack([p[name] for p in per]).float()
        torch.testing.assert_close(v, stacked.mean(0))
        torch.testing.assert_close(out.std[name], stacked.std(0))
    member_rewards = torch.stack([p["overall"] for p in per]).float()
    torch.testing.assert_close(out.reward, member_rewards.mean(0))
    assert float(out.std["reward"].min()) > 0

    model.config.reward_mode, model.config.pessimism_k = "pessimistic", 2.0
    with torch.inference_mode():
        pess = model(waves, 24000)
    torch.testing.assert_close(pess.reward, out.reward - 2.0 * out.std["reward"])
    record = model.score([(w.numpy(), 24000) for w in waves])[0].to_dict()
    assert set(record["std"]) == set(out.scores) | {"reward"}
    assert record["reward"] == pytest.approx(float(pess.reward[0]), abs=1e-5)


def test_bootstrap_resamples_whole_songs():
    feats = torch.arange(10, dtype=torch.float32)[:, None, None].expand(10, 1, 2).clone()
    song_index = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4, 5])
    split = SplitData(feats, feats[:, 0, :1], song_index, torch.ones(10), list("abcdef"))
    boot = bootstrap_split(split, seed=3)
    assert len(boot.song_ids) == 6
    for s, sid in enumerate(boot.song_ids):
        rows = boot.features[boot.song_index == s, 0, 0].tolist()
        original = feats[song_index == "abcdef".index(sid), 0, 0].tolist()
        assert rows == original
    assert boot.song_ids != list("abcdef")  # drawn with replacement


@pytest.mark.parametrize("command", ["train", "grid", "demo"])
def test_commands_accept_ensemble(command):
    from apex_reward.cli import build_parser

    parser = build_parser(command)
    args = parser.parse_args([command, "--ensemble", "5"])
    assert args.ensemble == 5


def test_windows_use_every_head_and_the_reward_mode(runs):
    """A window is scored like a one-segment song: the heads' mean (and the pessimistic reward),
    not the first head alone; a song shorter than one segment is its own single window."""
    _, ensemble, _ = runs
    model = ApexRewardModel.from_pretrained(ensemble.checkpoint)
    model.config.reward_mode, model.config.pessimism_k = "pessimistic", 1.0
    g = torch.Generator().manual_seed(1)
    waves = [torch.randn(24000 * 2, generator=g) * 0.1 for _ in range(2)]
    with torch.inference_mode():
        out = model(waves, 24000, return_windows=True)
    torch.testing.assert_close(out.windows.reward[:, 0], out.reward, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        out.windows.scores["overall"][:, 0], out.scores["overall"], rtol=1e-5, atol=1e-6
    )
