"""``apex-reward recipe``: parsing and refusals, the dry-run plan, resumption (finished stages are
skipped, a changed command reruns its stage, a failure names the stage and its log), and the
paper's recipe end to end on the synthetic corpus (its CI variant)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apex_reward import ConfigError
from apex_reward.cli import main
from apex_reward.training.recipe import (
    RecipeConfig,
    RecipeStageError,
    dry_run_text,
    load_recipe,
    run_recipe,
)

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "recipes" / "apex_paper"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


SMALL = """
name: small
vars:
  workdir: {workdir}
  seed: 1
  extra: ""
stages:
  - name: head
    run: python -m apex_reward.training.songeval --write-random {{workdir}}/se --seed {{seed}}
    outputs: ["{{workdir}}/se/ckpt/model.safetensors"]
    estimate: {{gpu_hours: 1.5, disk_gb: 2, download_gb: 0, basis: "a guess"}}
  - name: optional
    when: "{{extra}}"
    run: apex-reward init --preset tiny --out {{workdir}}/never
    outputs: ["{{workdir}}/never/config.json"]
  - name: broken
    run: apex-reward init --preset no-such-preset --out {{workdir}}/x
    outputs: ["{{workdir}}/x/config.json"]
    estimate: {{gpu_hours: 0.5}}
"""


def test_plan_and_refusals(tmp_path):
    recipe = _write(tmp_path / "r.yaml", SMALL.format(workdir=tmp_path / "w"))
    plan = dry_run_text(load_recipe(recipe))
    assert "[1/3] head: todo" in plan and "[2/3] optional: skipped" in plan
    assert f"--write-random {tmp_path / 'w'}/se --seed 1" in plan
    assert "gpu_hours 1.5, disk_gb 2, download_gb 0 — a guess" in plan
    assert "total: gpu_hours 2, disk_gb 2, download_gb 0" in plan  # skipped stages not counted
    with pytest.raises(ConfigError, match="expected name=value with a variable"):
        load_recipe(recipe, ["nope=1"])
    bad = _write(
        tmp_path / "bad.yaml", "vars: {workdir: w}\nstages:\n  - {name: a, run: rm -rf /}\n"
    )
    with pytest.raises(ConfigError, match="'rm -rf /' is not a command of this package"):
        load_recipe(bad)
    unknown = _write(
        tmp_path / "u.yaml", "vars: {workdir: w}\nstages:\n  - {name: a, run: 'apex-reward {x}'}\n"
    )
    with pytest.raises(ConfigError, match="unknown variable {x}"):
        load_recipe(unknown)
    dup = _write(
        tmp_path / "d.yaml",
        "vars: {workdir: w}\nstages:\n  - {name: a, run: apex-reward init}\n"
        "  - {name: a, run: apex-reward init}\n",
    )
    with pytest.raises(ConfigError, match="duplicate stage name 'a'"):
        load_recipe(dup)


def test_resumes_reruns_changed_stages_and_names_failures(tmp_path):
    work = tmp_path / "w"
    recipe = _write(tmp_path / "r.yaml", SMALL.format(workdir=work))
    lines: list[str] = []
    with pytest.raises(RecipeStageError) as e:
        run_recipe(RecipeConfig(recipe=str(recipe)), echo=lines.append)
    assert "stage 'broken' failed (exit status" in str(e.value)
    assert str(work / "logs" / "broken.log") in str(e.value)
    assert "no-such-preset" in (work / "logs" / "broken.log").read_text()
    weights = work / "se" / "ckpt" / "model.safetensors"
    first = weights.stat().st_mtime_ns
    state = json.loads((work / "recipe_state.json").read_text())
    assert list(state) == ["head"]

    # fix the failing stage: the finished one is skipped, the fixed one runs
    fixed = recipe.read_text().replace("no-such-preset", "tiny")
    recipe.write_text(fixed)
    lines.clear()
    summary = run_recipe(RecipeConfig(recipe=str(recipe)), echo=lines.append)
    assert [s["status"] for s in summary["stages"]] == ["done", "skipped", "ran"]
    assert weights.stat().st_mtime_ns == first
    assert (work / "x" / "config.json").is_file()

    # a changed variable changes the head stage's command: it reruns; --force reruns too
    summary = run_recipe(RecipeConfig(recipe=str(recipe), vars=["seed=2"]), echo=lines.append)
    assert [s["status"] for s in summary["stages"]] == ["ran", "skipped", "done"]
    assert weights.stat().st_mtime_ns != first
    second = weights.stat().st_mtime_ns
    summary = run_recipe(
        RecipeConfig(recipe=str(recipe), vars=["seed=2"], force=["head"]), echo=lines.append
    )
    assert [s["status"] for s in summary["stages"]] == ["ran", "skipped", "done"]
    assert weights.stat().st_mtime_ns != second
    with pytest.raises(ConfigError, match="--force \\['nope'\\]: no such stage"):
        run_recipe(RecipeConfig(recipe=str(recipe), force=["nope"]))


def test_paper_recipe_dry_run_lists_every_stage_with_estimates(capsys):
    assert main(["recipe", "--recipe", str(PAPER / "recipe.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    stages = ("init", "prepare", "label", "extract", "grid", "arena", "calibrate", "audit", "card")
    for stage in (*stages, "push"):
        assert f"] {stage}: " in out
    assert "hf://sleeping-ai/Udio-126K --add-manifests hf://sleeping-ai/suno-307K" in out
    assert "accelerate launch --multi_gpu --num_processes 4 -m apex_reward extract" in out
    assert "total: gpu_hours " in out


def test_synthetic_recipe_end_to_end(tmp_path):
    """The paper's stages on synthetic data with the tiny encoder and a random SongEval head."""
    work = tmp_path / "run"
    cfg = RecipeConfig(recipe=str(PAPER / "synthetic.yaml"), vars=[f"workdir={work}"])
    summary = run_recipe(cfg, echo=lambda line: None)
    ran = {s["name"]: s["status"] for s in summary["stages"]}
    assert ran == {
        "synth": "ran",
        "songeval_random": "ran",
        "init": "ran",
        "prepare": "ran",
        "label": "ran",
        "extract": "ran",
        "grid": "ran",
        "arena": "ran",
        "calibrate": "skipped",
        "audit": "ran",
        "card": "ran",
        "push": "skipped",
    }
    labelled = pd.read_parquet(work / "labels" / "labelled.parquet")
    prepared = pd.read_parquet(work / "prepared" / "prepared.parquet")
    assert len(labelled) == len(prepared) and labelled["coherence"].between(1, 5).all()
    final = json.loads((work / "final" / "config.json").read_text())
    assert final["preference"]["head"]["features"][0] == "streams_diff"  # the arena's fitted head
    assert (work / "audit" / "report.md").is_file()
    card = (work / "final" / "README.md").read_text()  # the model card, with the audit's verdict
    assert card.startswith("---") and "audit" in card.lower()
    again = run_recipe(cfg, echo=lambda line: None)  # everything complete: nothing reruns
    assert {s["status"] for s in again["stages"]} == {"done", "skipped"}
