"""One flag vocabulary for the training jobs: ``--device`` (``extract``, ``train``, ``grid``) and
``--dtype``; the removed ``--cpu`` is refused with an error naming ``--device cpu``."""

from __future__ import annotations

import pytest

from apex_reward.cli import build_parser, main
from apex_reward.errors import ConfigError
from apex_reward.training.distributed import accelerator_cpu


def _flags(command: str) -> set[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {opt for a in sub._actions for opt in a.option_strings if a.help != "==SUPPRESS=="}


@pytest.mark.parametrize("command", ["extract", "train", "grid"])
def test_cpu_is_refused_naming_device_cpu(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--out", str(tmp_path / "out"), "--cpu"])
    assert e.value.code == 2
    assert "--cpu was renamed: use --device cpu" in capsys.readouterr().err
    flags = _flags(command)
    assert "--device" in flags and "--cpu" not in flags and "--no-cpu" not in flags
    # in a config file too
    old = tmp_path / "old.yaml"
    old.write_text("cpu: true\n")
    assert main([command, "--config", str(old), "--out", str(tmp_path / "out")]) == 1
    assert "cpu was renamed: use device: cpu (--device cpu" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_extract_takes_the_model_options():
    flags = _flags("extract")
    assert {"--model", "--encoder", "--revision", "--device", "--dtype"} <= flags


def test_device_for_accelerate():
    assert accelerator_cpu("cpu") is True
    assert accelerator_cpu(None) is False
    with pytest.raises(ConfigError, match="--device toaster: not a torch device"):
        accelerator_cpu("toaster")
    with pytest.raises(ConfigError, match="--device cuda:1"):
        accelerator_cpu("cuda:1")  # no such GPU here, or: accelerate assigns the GPUs


def test_bad_device_fails_before_training(tmp_path, capsys):
    argv = ["train", "--device", "toaster", "--out", str(tmp_path / "out")]
    assert main([*argv, "--embeddings", str(tmp_path), "--prepared", str(tmp_path / "p")]) == 1
    assert "--device toaster: not a torch device" in capsys.readouterr().err
