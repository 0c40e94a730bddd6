"""The package's shape: a core that imports nothing optional, and one way in for commands.

These tests read the source (``ast``) and run fresh interpreters; they fail when a core module
starts importing the training or integration sub-packages, when ``import apex_reward`` starts
pulling a heavy optional dependency, or when a command is not reachable from ``--help``.
"""

from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import apex_reward
from apex_reward import cli

CORE = Path(apex_reward.__file__).resolve().parent
OPTIONAL_PACKAGES = ("apex_reward.training", "apex_reward.integrations")
HEAVY = ("trl", "peft", "fastapi", "accelerate", "pandas", "sklearn")


def _imports(path: Path) -> list[str]:
    """Every module an ``import`` statement in ``path`` names (at any depth, relative ones
    resolved against the core package)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ["apex_reward"]  # core modules sit directly in the package
                module = ".".join(base + ([node.module] if node.module else []))
                names += [module] + [f"{module}.{a.name}" for a in node.names]
            elif node.module:
                names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_core_modules_import_no_training_or_integrations():
    modules = sorted(CORE.glob("*.py"))
    assert len(modules) > 10  # the scan sees the real package
    offenders = {
        p.name: bad
        for p in modules
        if (bad := [m for m in _imports(p) if m.startswith(OPTIONAL_PACKAGES)])
    }
    assert offenders == {}


def test_the_scan_catches_an_optional_import(tmp_path):
    # the check above is only worth something if it sees imports inside functions too
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from apex_reward.integrations.lora import add_lora\n")
    assert "apex_reward.integrations.lora" in _imports(probe)


def test_import_apex_reward_pulls_no_heavy_optional_dependency():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        # the model class too: the package's own attributes load lazily
        [
            sys.executable,
            "-X",
            "importtime",
            "-c",
            "import apex_reward; apex_reward.ApexRewardModel",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "torch" in imported  # the log is the one we think it is
    assert sorted(imported & set(HEAVY)) == []


def test_every_command_is_one_object_listed_once():
    commands = cli.load_commands()
    names = [c.name for c in commands]
    assert len(names) == len(set(names)) == len(cli.COMMANDS)
    for target, command in zip(cli.COMMANDS, commands):
        assert isinstance(command, cli.Command)
        assert callable(command.add_arguments) and callable(command.run)
        module = target.partition(":")[0]
        # defined in the module it drives: its run function lives there
        assert command.run.__module__ == module, target
    for expected in ("score", "compare", "pairs", "extract", "train", "arena", "serve", "demo"):
        assert expected in names


@pytest.mark.parametrize("name", ["score", "pairs", "arena", "extract", "serve"])
def test_commands_that_run_the_encoder_share_the_model_flags(name):
    parser = cli.build_parser(name)
    sub = next(a for a in parser._actions if a.dest == "command").choices[name]
    shown = {s for a in sub._actions if a.help != argparse.SUPPRESS for s in a.option_strings}
    assert {"--model", "--encoder", "--revision", "--device", "--dtype"} <= shown
    # the old flags are gone from --help (a hidden flag may remain to name the replacement)
    assert "--cpu" not in shown and "--encoder-dtype" not in shown
