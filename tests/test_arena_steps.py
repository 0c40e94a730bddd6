"""``apex-reward arena`` step by step (open, load, score, evaluate, fit, export, summary) on a
small synthetic audio arena, and its flags: ``--dtype``, the removed ``--encoder-dtype``, and
config files that give the model flat or nested."""

from __future__ import annotations

import json

import pytest
import torch

from apex_reward import ApexRewardModel
from apex_reward.cli import build_parser, main
from apex_reward.errors import ConfigError
from apex_reward.loading import ModelOptions
from apex_reward.training.arena.job import (
    ArenaConfig,
    evaluate_classifiers,
    export_preference,
    fit_preference,
    load_battle_set,
    open_job,
    score_battles,
    write_summary,
)
from apex_reward.training.arena.synthetic import write_synthetic_arena
from apex_reward.training.flags import ENCODER_DTYPE, config_from_args

SYSTEMS = {"synth-alpha", "synth-beta", "synth-gamma", "synth-delta"}


@pytest.fixture(scope="module")
def small_arena(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("arena_steps") / "dataset"
    return write_synthetic_arena(
        root, n_songs=10, n_battles=80, seconds=1.0, seed=5, model=tiny_model
    )


def _config(checkpoint, battles, out, **overrides) -> ArenaConfig:
    options = dict(
        model=ModelOptions(model=str(checkpoint), dtype="fp32"),
        battles=str(battles),
        out=str(out),
        use_cache=False,
        folds=5,
        classifiers=["logreg"],
        progress=False,
    )
    return ArenaConfig(**{**options, **overrides})


def test_arena_steps_one_at_a_time(small_arena, tiny_checkpoint, tmp_path):
    exported = tmp_path / "exported"
    cfg = _config(
        tiny_checkpoint,
        small_arena.battles,
        tmp_path / "out",
        export_head=True,
        export_to=str(exported),
    )
    job = open_job(cfg)
    try:
        # load: the model at the requested precision (fp32: the exact path, fast path off)
        assert job.model.fast_path is False and job.model.encoder_dtype == torch.float32
        assert job.cache is None and len(job.fingerprint) == 64 and job.out.is_dir()
        battle_set = load_battle_set(job)
        n_ab = sum(1 for t in small_arena.truth.values() if t["preference"] in ("A", "B"))
        assert len(battle_set.battles) == battle_set.report.kept == n_ab > 0
        assert battle_set.synthetic is None and battle_set.source == str(small_arena.battles)

        # score: every distinct content once (two clips are byte-identical copies)
        scored = score_battles(job, battle_set)
        assert scored.stats.scored == scored.stats.contents == 8 and scored.stats.failed == 0
        assert len(scored.data) == n_ab and scored.data.X.shape == (n_ab, 31)
        report = json.loads((tmp_path / "out" / "battles_report.json").read_text())
        assert report["kept"] == n_ab

        # evaluate: the rule and the logistic model under 5-fold CV, with calibration
        evaluation = evaluate_classifiers(job, scored)
        assert [r.key for r in evaluation.main_rows] == ["rule_all", "logreg"]
        assert sorted(set(evaluation.cv.fold_of.tolist())) == [0, 1, 2, 3, 4]
        assert evaluation.logreg.n == n_ab and 0 <= evaluation.calibration.ece <= 1
        for name in ("results.csv", "roc.png", "predictions.csv", "calibration.json"):
            assert (tmp_path / "out" / name).stat().st_size > 0

        # fit: the torch head reproduces scikit-learn; offsets for the four systems
        fitted = fit_preference(job, scored, evaluation)
        assert fitted.head_summary["max_abs_diff_torch_vs_sklearn"] < 1e-9
        assert len(fitted.head.features) == 31 and fitted.sklearn_logits.shape == (n_ab,)
        assert fitted.head.fitted_on["cv_auc"] == pytest.approx(evaluation.logreg.auc)
        assert set(fitted.offsets) == SYSTEMS
        assert fitted.offsets_summary["base"] == "exported head (out-of-fold logits)"

        # export: a copy of the checkpoint with the head, read back and checked
        export = export_preference(job, scored, fitted)
        assert export["checkpoint"] == str(exported) and export["max_abs_diff_vs_sklearn"] < 1e-9
        assert "system_offsets" not in export  # not asked for
        model = ApexRewardModel.from_pretrained(exported)
        assert model.preference_head is not None and not model.config.preference.system_offsets

        summary = write_summary(job, scored, evaluation, fitted, export, seconds=1.0)
    finally:
        job.close()
    assert summary["config"]["model"] == {
        "model": str(tiny_checkpoint),
        "encoder": None,
        "revision": None,
        "device": None,
        "dtype": "fp32",
        "cache_dir": None,
        "local_files_only": False,
    }
    assert summary["export"] == export and summary["seconds"] == 1.0
    on_disk = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert on_disk["head"] == summary["head"]
    assert "## Export" in (tmp_path / "out" / "report.md").read_text()


def test_export_in_place_needs_a_local_checkpoint(small_arena, tmp_path):
    cfg = _config("org/not-a-dir", small_arena.battles, tmp_path / "out", export_head=True)
    with pytest.raises(ConfigError, match="pass --export-to DIR"):
        open_job(cfg)


def test_arena_dtype_fp32_on_the_command_line(small_arena, tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["arena", "--model", str(tiny_checkpoint), "--battles", str(small_arena.battles)]
    argv += ["--out", str(out), "--dtype", "fp32", "--device", "cpu", "--folds", "3"]
    assert main([*argv, "--classifiers", "logreg", "--no-use-cache", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["model"]["dtype"] == "fp32"
    assert summary["config"]["model"]["device"] == "cpu"
    assert "| Logistic regression |" in capsys.readouterr().out


def test_encoder_dtype_is_refused_naming_dtype(tiny_checkpoint, tmp_path, capsys):
    argv = ["arena", "--model", str(tiny_checkpoint), "--synthetic", "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--encoder-dtype", "fp32"])
    assert e.value.code == 2
    assert "--encoder-dtype was renamed: use --dtype" in capsys.readouterr().err
    # and not shown as an option
    sub = next(a for a in build_parser("arena")._actions if a.dest == "command").choices["arena"]
    assert "--encoder-dtype" not in sub.format_help()
    # a config file with the old key names the new one too
    old = tmp_path / "old.yaml"
    old.write_text("encoder_dtype: fp32\n")
    assert main([*argv, "--config", str(old)]) == 1
    assert "encoder_dtype was renamed: use dtype" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "model: {ckpt}\ndevice: cpu\ndtype: fp32\n",  # the old flat form
        "model:\n  model: {ckpt}\n  device: cpu\n  dtype: fp32\n",  # nested
    ],
)
def test_config_file_gives_the_model_flat_or_nested(text, tiny_checkpoint, tmp_path):
    path = tmp_path / "arena.yaml"
    path.write_text(text.format(ckpt=tiny_checkpoint) + "synthetic: true\nfolds: 4\n")
    args = build_parser("arena").parse_args(["arena", "--config", str(path), "--seed", "3"])
    cfg = config_from_args(ArenaConfig, args, [ENCODER_DTYPE])
    assert cfg.model == ModelOptions(model=str(tiny_checkpoint), device="cpu", dtype="fp32")
    assert (cfg.synthetic, cfg.folds, cfg.seed) == (True, 4, 3)
    # flags override the file's model options
    args = build_parser("arena").parse_args(["arena", "--config", str(path), "--dtype", "auto"])
    assert config_from_args(ArenaConfig, args, [ENCODER_DTYPE]).model.dtype == "auto"


def test_arena_needs_a_model():
    with pytest.raises(ConfigError, match="--model is required"):
        ArenaConfig(synthetic=True)
    assert ArenaConfig(model=ModelOptions(model="x"), synthetic=True).model.dtype == "auto"
