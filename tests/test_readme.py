"""README.md and the code agree: the quick-start commands, the Python example, the CLI usage."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

from conftest import REPO


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_command = blocks[1].strip()
    assert "pytest" in test_command
    ci = (REPO / ".ci" / "run").read_text()
    assert test_command in ci.splitlines()


def test_readme_python_example_runs(tmp_path, tiny_checkpoint):
    readme = (REPO / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    ckpt = tmp_path / "runs" / "demo" / "train" / "model"
    shutil.copytree(tiny_checkpoint, ckpt)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "'error_type': 'AudioDecodeError'" in proc.stdout  # missing.wav is reported, not raised


def test_readme_cli_usage_matches_parser():
    from apex_reward.cli import build_parser

    readme = (REPO / "README.md").read_text()
    for command in ("init", "score", "compare"):
        parser = build_parser(command)
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        flags = {opt for a in sub._actions for opt in a.option_strings}
        usage = [line for line in readme.splitlines() if line.startswith(f"apex-reward {command} ")]
        assert usage, command
        for flag in re.findall(r"--[a-z][a-z-]+", " ".join(usage)):
            assert flag in flags, (command, flag)


def test_quick_start_command_one_is_the_demo():
    """README command 1 sets up with the train extra and runs `apex-reward demo` (exercised end to
    end by tests/test_demo.py)."""
    readme = (REPO / "README.md").read_text()
    command = _bash_blocks(readme)[0].strip()
    assert "--find-links /opt/wheels torch==2.13.0" in command and '-e ".[train]"' in command
    assert command.endswith("apex-reward demo")
    from apex_reward.cli import build_parser

    args = build_parser("demo").parse_args(["demo"])
    assert args._run.__name__ == "run_demo"


def test_readme_model_options_example_runs(tmp_path, tiny_checkpoint):
    readme = (REPO / "README.md").read_text()
    code = next(
        c for c in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "load_model(" in c
    )
    shutil.copytree(tiny_checkpoint, tmp_path / "runs" / "untrained-tiny")
    code += "\nassert model.device.type == 'cpu' and model.fast_path is False\n"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "UNTRAINED" in proc.stderr  # the one warning, on stderr without any logging set-up


def test_readme_synopses_are_the_help_of_every_command():
    """The README's synopses block lists every flag of every command exactly as ``--help`` does
    (refresh it with ``python tests/readme_synopses.py``)."""
    from readme_synopses import readme_block, synopses

    expected = synopses()
    assert readme_block((REPO / "README.md").read_text()) == expected, (
        "README synopses differ from --help; run: python tests/readme_synopses.py"
    )
    for flag in ("--force", "--tie-tolerance", "--synthetic-battles", "--num-workers"):
        assert flag in expected
