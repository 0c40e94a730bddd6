"""``apex-reward arena`` end to end on a synthetic audio arena: bad records reported with their
lines, Table 3 and the exported head, and a re-run that scores nothing (the score cache)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from conftest import REPO

from apex_reward import ApexRewardModel
from apex_reward.cli import build_parser, main
from apex_reward.training.arena.synthetic import write_synthetic_arena

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def synthetic_arena(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("arena") / "dataset"
    files = write_synthetic_arena(
        root, n_songs=12, n_battles=90, seconds=1.2, seed=3, model=tiny_model
    )
    # bad records: a malformed JSON line, an unknown preference value, a missing audio file
    records = [json.loads(line) for line in files.battles.read_text().splitlines()]
    good = next(r for r in records if r["preference"] in ("A", "B"))
    bad_pref = dict(good, battle_uuid="bad-pref", preference="A_AND_B")
    missing = dict(good, battle_uuid="no-audio", audio_b="audio_files/synthetic/gone.wav")
    junk = root / "audio_files" / "synthetic" / "junk.wav"
    junk.write_text("this is not audio\n" * 50)
    unreadable = dict(good, battle_uuid="junk-audio", audio_b="audio_files/synthetic/junk.wav")
    with open(files.battles, "a") as f:
        f.write('{"battle_uuid": "broken", "preference": "A"\n')  # line 91
        f.write(json.dumps(bad_pref) + "\n")  # line 92
        f.write(json.dumps(missing) + "\n")  # line 93
        f.write(json.dumps(unreadable) + "\n")  # line 94
    return files


def test_arena_cli_end_to_end_with_bad_records_then_cached_rerun(
    synthetic_arena, tiny_checkpoint, tmp_path, capsys
):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    out = tmp_path / "out"
    cache = tmp_path / "scores.sqlite"
    opts = tmp_path / "opts.yaml"
    opts.write_text("svm_grid:\n  C: [0.5]\n  kernel: [linear]\nclassifiers: [logreg, svm]\n")
    argv = [
        "arena",
        "--model",
        str(ckpt),
        "--battles",
        str(synthetic_arena.battles),
        "--out",
        str(out),
        "--cache",
        str(cache),
        "--config",
        str(opts),
        "--export-head",
        "--export-system-offsets",
        "--no-progress",
    ]
    assert main(argv) == 0
    captured = capsys.readouterr()
    # the bad records are reported with their line numbers, and the run went on
    battles_file = str(synthetic_arena.battles)
    assert f"{battles_file}:91: malformed JSON line" in captured.err
    assert f"{battles_file}:92: unknown preference value 'A_AND_B'" in captured.err
    assert f"{battles_file}:93: audio file missing" in captured.err
    assert f"{battles_file}:94: audio unreadable" in captured.err and "junk.wav" in captured.err
    report = json.loads((out / "battles_report.json").read_text())
    assert report["records"] == 94
    assert report["removed"]["bad_record"] == 2 and report["removed"]["audio_missing"] == 1
    assert report["removed"]["audio_unreadable"] == 1
    assert report["kept"] == 90 - report["removed"]["not_a_or_b"]
    # Table 3 + outputs
    assert "| Logistic regression |" in captured.out and "| SVM |" in captured.out
    results = (out / "results.csv").read_text().splitlines()
    assert [r.split(",")[1] for r in results[1:]] == ["rule_all", "logreg", "svm"]
    for name in ("roc.png", "calibration.png"):
        assert (out / name).read_bytes()[:8] == PNG
    for name in ("rule_subsets.md", "report.md", "predictions.csv", "system_offsets.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    n_contents = summary["scoring"]["contents"]
    assert summary["scoring"]["scored"] == n_contents > 0  # first run: every content scored once
    assert summary["scoring"]["failed"] == 1  # junk.wav
    assert summary["scoring"]["contents"] < summary["scoring"]["files"]  # byte-identical copies
    lr = next(r for r in summary["results"] if r["key"] == "logreg")
    print(f"true AUC {summary.get('synthetic')}, logistic CV AUC {lr['auc']:.3f}")
    assert lr["n_vocal"] + lr["n_instrumental"] == lr["n"] == report["kept"]
    assert 0 <= summary["calibration"]["ece"] <= 1
    # the exported checkpoint: head + offsets, reproducing scikit-learn, loadable and usable
    assert summary["export"]["max_abs_diff_vs_sklearn"] < 1e-9
    cfg = json.loads((ckpt / "config.json").read_text())
    head = cfg["preference"]["head"]
    assert len(head["features"]) == len(head["coef"]) == 31
    assert head["fitted_on"]["num_battles"] == lr["n"]
    assert head["fitted_on"]["cv_auc"] == pytest.approx(lr["auc"])
    assert set(cfg["preference"]["system_offsets"]) == {
        "synth-alpha",
        "synth-beta",
        "synth-gamma",
        "synth-delta",
    }
    model = ApexRewardModel.from_pretrained(ckpt)
    a, b = (torch.randn(1, 30000) * 0.1 for _ in range(2))
    with torch.no_grad():
        logit = model.preference_logits(a, b, 24000, systems_a="synth-alpha")
    assert torch.isfinite(logit).all()

    # the re-run scores no audio (same cache; the checkpoint now has a head, which
    # does not change the scores or the model fingerprint)
    assert main([*argv[:-3], "--classifiers", "logreg", "--no-progress"]) == 0
    rerun = json.loads((out / "summary.json").read_text())["scoring"]
    assert rerun["fingerprint"] == summary["scoring"]["fingerprint"]
    assert (rerun["cache_hits"], rerun["scored"]) == (n_contents, 0)
    assert f"{n_contents} cache hits, 0 scored" in capsys.readouterr().err


def test_arena_cli_reports_expected_failures_in_one_line(tmp_path, tiny_checkpoint, capsys):
    assert main(["arena", "--model", str(tiny_checkpoint), "--out", str(tmp_path)]) == 1
    assert "battles: give a battles file/directory, or --synthetic" in capsys.readouterr().err
    empty = tmp_path / "none.jsonl"
    empty.write_text("")
    argv = ["arena", "--model", str(tiny_checkpoint), "--battles", str(empty)]
    assert main([*argv, "--out", str(tmp_path / "o"), "--no-use-cache", "--no-progress"]) == 1
    assert "no usable A/B battles" in capsys.readouterr().err
    assert main([*argv, "--classifiers", "knn"]) == 1
    assert "unknown ['knn']" in capsys.readouterr().err


def test_readme_arena_usage_matches_parser():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Preference evaluation (Music Arena)", 1)[1].split("\n## ", 1)[0]
    parser = build_parser("arena")
    sub = next(a for a in parser._actions if a.dest == "command").choices["arena"]
    flags = {opt for a in sub._actions for opt in a.option_strings}
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]+", section))
    assert used, "the README section shows no flags"
    assert used <= flags, sorted(used - flags)
