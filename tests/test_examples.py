"""The TRL examples run end to end with small settings and improve what they optimise.
Seeds are fixed; the thresholds leave room below the measured gains (see each test)."""

from __future__ import annotations

import os
import sys

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "examples"))

pytest.importorskip("trl")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_grpo_example_raises_the_mean_reward(tmp_path):
    import grpo_notes

    r = grpo_notes.main(["--steps", "20", "--eval-samples", "16", "--out", str(tmp_path)])
    assert r["steps"] == 20
    # APEX reward of scorable phrases, 64 samples before vs after (measured: 0.505 -> 0.567,
    # sample std 0.044; seeds 1-3: +0.025 to +0.030); fewer phrases too short to score (0.22 ->
    # 0.06)
    assert r["reward_after"] > r["reward_before"] + 0.02
    assert r["failed_after"] < r["failed_before"]
    # TRL's logged training reward rose as well, and the per-score means reached its logs
    assert r["train_reward_last"] > r["train_reward_first"]
    assert {"apex_reward/overall", "apex_reward/clarity", "apex_reward/failed"} <= set(
        r["logged_scores"]
    )


def test_dpo_example_increases_the_held_out_margin(tmp_path):
    import dpo_notes

    r = dpo_notes.main(["--out", str(tmp_path), "--reward-model-steps", "2"])
    assert r["dpo_steps"] >= 2
    assert r["pairs_train"] == r["pair_stats_train"]["pairs"] >= 100
    assert r["pairs_held_out"] >= 36
    # log p(chosen) - log p(rejected) on pairs from prompts DPO never saw (measured: -3.14 ->
    # +5.49 nats, pairs ordered correctly 19% -> 75%; seeds 1-5: +2.1 to +22 nats)
    assert r["held_out_margin_after"] > r["held_out_margin_before"] + 0.5
    assert r["train_margin_after"] > r["train_margin_before"]
    assert r["reward_model_steps"] == 2 and r["reward_model_used_margin"]


def test_differentiable_synth_example_raises_the_reward(tmp_path):
    import differentiable_synth

    r = differentiable_synth.main(["--steps", "15", "--out", str(tmp_path)])
    assert len(r["rewards"]) == 15
    # measured: 0.633 -> 0.671, rising at almost every step (seeds 1, 2: +0.12)
    assert r["reward_end"] > r["reward_start"] + 0.01
    assert sum(b > a for a, b in zip(r["rewards"], r["rewards"][1:])) >= 10


def test_readme_trl_section_runs(tmp_path, tiny_checkpoint):
    """The Python snippets of README's "TRL, DPO pairs and LoRA" section, run as written."""
    import re
    import shutil
    import subprocess

    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## TRL, DPO pairs and LoRA") :]
    section = section[: section.index("\n## ", 1)]
    code = "\n".join(re.findall(r"```python\n(.*?)```", section, flags=re.S))
    assert "ApexRewardFunction" in code and "add_lora" in code and "build_preference_pairs" in code
    shutil.copytree(tiny_checkpoint, tmp_path / "runs" / "untrained-tiny")
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # tiny model: see one_thread()
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(", None]")  # one value per completion, None for "la la la"
    assert "'failed_candidates': 1" in lines[2] and "'pairs': 2" in lines[2]
    assert "'chosen': 'a', 'rejected': 'b'" in lines[3] and "'rejected': 'c'" not in lines[3]
    assert (tmp_path / "runs" / "tiny-lora" / "config.json").is_file()
    assert (tmp_path / "runs" / "tiny-merged" / "config.json").is_file()
