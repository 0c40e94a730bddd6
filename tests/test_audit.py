"""``apex-reward audit``: the three outputs and their keys, the exit status under each guard
policy, percentiles consistent with the reference distribution, the attack's trajectory and the
guard applied to its objective, and a clear error for a bad ``--reference``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_music

from apex_reward.cli import main
from apex_reward.errors import ConfigError
from apex_reward.guard import reward_floor
from apex_reward.training.audit import AuditConfig, run_audit
from apex_reward.training.audit.attack import run_attack
from apex_reward.training.audit.job import open_audit
from apex_reward.training.audit.report import percentile_of, snr_ladder

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"
#: small sizes: 4 s probes built from 1 s loops, one probe clip, 2 s attacks
SMALL = [
    "--probe-seconds",
    "4",
    "--loop-seconds",
    "1",
    "--probe-clips",
    "1",
    "--attack-seconds",
    "2",
    "--steps",
    "3",
    "--no-progress",
]


@pytest.fixture(scope="module")
def looped_reference(tmp_path_factory):
    """Three 4 s clips, each a 1 s excerpt of procedural music repeated exactly: the audit's
    1 s loop of a clip is then the clip itself, so the loop of the best clip scores as the best
    clip does, above the median (a non-music probe above the median, by construction)."""
    d = tmp_path_factory.mktemp("reference")
    for i in range(3):
        one = synth_music(1.0, 24000, seed=20 + i)[0]
        sf.write(d / f"clip{i}.wav", np.tile(one, 4), 24000, subtype="FLOAT")
    return d


@pytest.fixture(scope="module")
def flag_run(tmp_path_factory, tiny_checkpoint, looped_reference):
    out = tmp_path_factory.mktemp("audit") / "flag"
    argv = ["audit", "--model", str(tiny_checkpoint), "--reference", str(looped_reference)]
    status = main([*argv, "--out", str(out), "--guard", "flag", *SMALL])
    return status, out, json.loads((out / "report.json").read_text())


def test_writes_report_json_md_and_plots(flag_run):
    status, out, report = flag_run
    assert set(report) >= {
        "model",
        "policy",
        "policy_source",
        "guard",
        "floor",
        "reference",
        "probes",
        "ladders",
        "attack",
        "verdict",
        "seconds",
    }
    assert report["policy"] == "flag" and report["policy_source"] == "--guard"
    assert report["reference"]["kind"] == "files" and report["reference"]["count"] == 3
    kinds = {p["kind"] for p in report["probes"]}
    assert kinds >= {
        "signal",
        "loop",
        "reversed",
        "gain",
        "snr",
        "lowpass",
        "quantize_8bit",
        "pad_lead",
        "pad_trail",
    }
    names = {p["name"] for p in report["probes"]}
    assert {"digital_silence", "sine_440hz", "dc_0.5", "pink_noise_-15dBFS"} <= names
    assert set(report["ladders"]) == {"snr", "gain"}
    assert report["ladders"]["snr"]["levels"] == ["clean", 30, 20, 10, 0]
    md = (out / "report.md").read_text()
    for heading in ("## Reference", "## Static probes", "## Ladders", "## Gradient attack"):
        assert heading in md
    assert "digital_silence" in md
    for png in ("probes.png", "snr_ladder.png", "attack.png"):
        assert (out / png).read_bytes()[:8] == PNG


def test_probe_table_matches_the_reference_distribution(flag_run):
    _, _, report = flag_run
    ref = [c["reward"] for c in report["reference"]["clips"]]
    median = float(np.median(ref))
    assert report["reference"]["median"] == pytest.approx(median)
    for p in report["probes"]:
        assert 0.0 <= p["percentile"] <= 100.0
        assert p["percentile"] == pytest.approx(percentile_of(p["reward"], ref))
        assert p["above_median"] == (p["reward"] > median)
        assert p["failing"] == (p["counts"] and p["above_median"] and not p["flagged"])


def test_flag_policy_flags_every_non_music_probe_and_passes(flag_run):
    status, _, report = flag_run
    counted = [p for p in report["probes"] if p["counts"]]
    assert counted and all(p["flagged"] and p["checks"] for p in counted)
    assert report["verdict"]["failing_probes"] == []
    assert status == 0 == report["verdict"]["exit_status"]


def test_exit_status_1_when_guards_are_off_and_a_probe_beats_the_median(
    tmp_path, tiny_checkpoint, looped_reference
):
    # a copy of the checkpoint whose config.json turns the guards off
    ckpt = tmp_path / "off"
    shutil.copytree(tiny_checkpoint, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config.setdefault("guard", {})["policy"] = "off"
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    argv = ["audit", "--model", str(ckpt), "--reference", str(looped_reference)]
    status = main([*argv, "--out", str(out), *SMALL])
    report = json.loads((out / "report.json").read_text())
    assert report["policy"] == "off" and report["policy_source"] == "checkpoint"
    assert not any(p["flagged"] for p in report["probes"])
    # the loop of the best clip is the best clip: above the median, unflagged
    loop = next(p for p in report["probes"] if p["kind"] == "loop")
    assert loop["reward"] == pytest.approx(report["reference"]["best"], abs=1e-4)
    assert loop["failing"] and loop["name"] in report["verdict"]["failing_probes"]
    assert loop["checks"]  # the checks would have flagged it ("looped")
    assert status == 1 == report["verdict"]["exit_status"]


def test_attack_records_the_requested_trajectory(tiny_model):
    rng = np.random.default_rng(0)
    music = torch.from_numpy(synth_music(2.0, 24000, seed=5)[0])
    noise = torch.from_numpy((0.18 * rng.standard_normal(48000)).astype(np.float32))
    runs = run_attack(
        tiny_model,
        {"white_noise": noise, "music": music},
        24000,
        policy="flag",
        target=1e9,
        steps=4,
        lr=1e-3,
    )
    assert [r.start for r in runs] == ["white_noise", "music"]
    for run in runs:
        assert [p.step for p in run.trajectory] == [0, 1, 2, 3, 4]
        assert run.steps_to_beat is None  # an unreachable target: "never"
        assert all(np.isfinite(p.raw_reward) for p in run.trajectory)
    # flag policy: the reward is the raw reward, and the ascent moves it
    music_run = runs[1]
    assert all(p.reward == p.raw_reward for p in music_run.trajectory)
    assert music_run.trajectory[-1].raw_reward != music_run.trajectory[0].raw_reward


def test_attack_under_penalize_gets_the_floor_and_no_gradient(tiny_model):
    rng = np.random.default_rng(1)
    noise = torch.from_numpy((0.18 * rng.standard_normal(48000)).astype(np.float32))
    (run,) = run_attack(
        tiny_model, {"white_noise": noise}, 24000, policy="penalize", target=0.0, steps=3
    )
    floor = reward_floor(tiny_model.config)
    assert all(p.flagged and "noise_like" in p.checks for p in run.trajectory)
    assert all(p.reward == pytest.approx(floor) for p in run.trajectory)
    # no gradient ever reached the waveform: its raw reward never moved
    assert len({p.raw_reward for p in run.trajectory}) == 1
    assert run.steps_to_beat is None


@pytest.mark.parametrize("kind", ["missing", "empty_dir"])
def test_bad_reference_is_a_config_error(tmp_path, tiny_checkpoint, kind):
    bad = tmp_path / "nowhere" if kind == "missing" else tmp_path / "empty"
    if kind == "empty_dir":
        bad.mkdir()
    cfg = AuditConfig(model=str(tiny_checkpoint), reference=[str(bad)], out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="--reference") as e:
        open_audit(cfg)
    assert str(bad) in str(e.value)
    with pytest.raises(ConfigError):
        run_audit(cfg)


def test_bad_reference_on_the_command_line(tmp_path, tiny_checkpoint, capsys):
    status = main(
        ["audit", "--model", str(tiny_checkpoint), "--reference", str(tmp_path / "gone.wav")]
        + ["--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert status == 1
    err = capsys.readouterr().err
    assert "no such file or directory" in err and "gone.wav" in err


def test_percentile_and_snr_ladder_helpers():
    ref = [0.1, 0.2, 0.3, 0.4]
    assert percentile_of(0.0, ref) == 0.0
    assert percentile_of(1.0, ref) == 100.0
    assert percentile_of(0.2, ref) == pytest.approx(37.5)  # one below, one tie
    ladder = snr_ladder(
        {"a": 0.5, "b": 0.5},
        {"a": {30: 0.4, 0: 0.1}, "b": {30: 0.6, 0: 0.2}},
        [30, 0],
    )
    assert ladder["monotone_per_clip"] == {"a": True, "b": False}
    assert ladder["monotone_all"] is False and ladder["monotone_mean"] is True
    assert ladder["largest_rise"] == pytest.approx(0.1)
    assert ladder["mean"] == pytest.approx([0.5, 0.5, 0.15])


def test_without_reference_the_report_says_synthetic(tmp_path, tiny_checkpoint):
    cfg = AuditConfig(
        model=str(tiny_checkpoint),
        out=str(tmp_path / "o"),
        reference_songs=2,
        probe_seconds=3.0,
        loop_seconds=1.0,
        probe_clips=1,
        attack_seconds=2.0,
        steps=1,
        progress=False,
    )
    report = run_audit(cfg)
    assert report["reference"]["kind"] == "synthetic" and report["reference"]["count"] == 2
    assert "SYNTHETIC" in (tmp_path / "o" / "report.md").read_text()
    assert [len(r["trajectory"]) for r in report["attack"]["runs"]] == [2, 2]


def test_long_reference_clips_are_cut(looped_reference):
    from apex_reward.training.audit.probes import load_reference_clips

    clips, skipped = load_reference_clips([str(looped_reference)], max_seconds=2.5)
    assert skipped == [] and len(clips) == 3
    assert all(c.duration_s == pytest.approx(2.5) and c.cut_from_s == 4.0 for c in clips)
