"""The gradient attack under each defence (training/audit/defence_attack.py), as the audit's
``--attack-defences`` and benchmarks/gradient_attack.py run it."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, synth_music

from apex_reward.errors import ConfigError
from apex_reward.training.audit.defence_attack import attack_under_defences, defences_table
from apex_reward.training.audit.guarded import guarded_forward

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000


def test_attack_under_defences():
    model = make_tiny_model(seed=7)
    clips = [(f"c{i}", torch.from_numpy(synth_music(2.0, SR, seed=60 + i)[0])) for i in range(3)]
    g = torch.Generator().manual_seed(0)
    starts = {"white_noise": 0.18 * torch.randn(2 * SR, generator=g), "clip": clips[0][1]}
    rows = attack_under_defences(
        model, ["plain", "robust_guards", "guards_ood"], clips, starts, steps=2, robust=2, seed=3
    )
    plain, robust, ood = rows
    with torch.inference_mode():
        rewards = guarded_forward(model, [w for _, w in clips], SR, "off").reward.tolist()
        robust_rewards = guarded_forward(
            model, [w for _, w in clips], SR, "penalize", robust=2, seed=3 + 10_000
        ).reward.tolist()
    # each defence's target is the best clip under that defence's own objective
    assert plain["target"] == pytest.approx(max(rewards), abs=1e-6)
    assert robust["target"] == pytest.approx(max(robust_rewards), abs=1e-6)
    assert robust["label"] == "robust K=2 + guards"
    for row in (plain, robust):
        assert [r["start"] for r in row["runs"]] == ["white_noise", "clip"]
        for r in row["runs"]:
            assert r["steps_run"] == 2
            beaten = r["steps_to_beat"]
            assert beaten is None or (0 <= beaten <= 2 and r["final_reward"] is not None)
    # Adam ascends the plain reward from the clip: it rises
    assert plain["runs"][1]["final_reward"] > plain["runs"][1]["start_reward"]
    # this checkpoint has no OOD statistics: reported, not run
    assert ood["unavailable"].startswith("unavailable: checkpoint has no OOD statistics")
    table = defences_table(rows)
    assert "(b) guards + OOD penalty" in table and "unavailable" in table
    with pytest.raises(ConfigError, match="unknown defences"):
        attack_under_defences(model, ["nope"], clips, starts, steps=1)
