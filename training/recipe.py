"""``apex-reward recipe``: a whole training run, stage by stage, from one YAML file.

A recipe (``recipes/apex_paper/recipe.yaml`` is the paper's) lists ``vars`` and ``stages``. Each
stage is one command line of this package — ``apex-reward …``, ``accelerate launch … -m
apex_reward …`` or ``python -m apex_reward.… `` (nothing else runs) — with ``{var}`` placeholders,
the files it ``outputs``, an optional ``when`` (the stage is skipped when it renders empty,
``null`` or ``false``) and an ``estimate`` of its cost on the real data (GPU hours, disk and
download GB, each with the basis it comes from).

Running a recipe runs its stages in order, each in its own process, logging to
``{workdir}/logs/<stage>.log``. A stage whose outputs all exist and whose command line is the one
recorded in ``{workdir}/recipe_state.json`` when it last succeeded is skipped: rerunning after a
crash or a kill continues where the run stopped, and a changed command reruns that stage (and the
commands themselves resume inside a stage: extraction and labelling by shard, training by
checkpoint). ``--dry-run`` prints every command with its status and estimate, and the totals.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args
from apex_reward.errors import ConfigError, require
from apex_reward.files import atomic_write_text

logger = logging.getLogger(__name__)

__all__ = ["RecipeConfig", "Stage", "Recipe", "load_recipe", "run_recipe", "COMMAND"]

ESTIMATE_KEYS = ("gpu_hours", "disk_gb", "download_gb")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class RecipeConfig:
    """Options of ``apex-reward recipe``."""

    recipe: str = field(
        default="recipes/apex_paper/recipe.yaml", metadata={"help": "the recipe's YAML file"}
    )
    vars: list[str] = field(
        default_factory=list,
        metadata={"help": "override recipe variables: name=value ... (e.g. workdir=runs/x)"},
    )
    dry_run: bool = field(
        default=False,
        metadata={"help": "print every stage's command, status and estimate; run nothing"},
    )
    force: list[str] = field(
        default_factory=list, metadata={"help": "rerun these stages even when complete"}
    )


@dataclass(frozen=True)
class Stage:
    """One stage after its variables were filled in.

    Attributes:
        name: unique within the recipe.
        argv: the command line as the user reads it (``apex-reward extract …``).
        outputs: files or folders that exist once the stage succeeded.
        skip_reason: why the stage does not run (its ``when`` is off), else None.
        estimate: ``gpu_hours``/``disk_gb``/``download_gb`` on the real data, and ``basis``.
    """

    name: str
    argv: tuple[str, ...]
    outputs: tuple[str, ...]
    skip_reason: str | None
    estimate: dict[str, Any]

    def process_argv(self) -> list[str]:
        """The argv that runs the stage with this interpreter.

        Raises:
            ConfigError: the command is not one of this package's.
        """
        a = list(self.argv)
        if a[:1] == ["apex-reward"]:
            return [sys.executable, "-m", "apex_reward", *a[1:]]
        if a[:2] == ["accelerate", "launch"] and "-m" in a and _is_ours(a[a.index("-m") + 1 :]):
            return [sys.executable, "-m", "accelerate.commands.launch", *a[2:]]
        if a[:2] == ["python", "-m"] and _is_ours(a[2:]):
            return [sys.executable, *a[1:]]
        raise ConfigError(
            f"recipe stage {self.name!r}: {shlex.join(a)!r} is not a command of this package "
            "(apex-reward …, accelerate launch … -m apex_reward …, python -m apex_reward.…)"
        )


def _is_ours(rest: list[str]) -> bool:
    return bool(rest) and (rest[0] == "apex_reward" or rest[0].startswith("apex_reward."))


@dataclass(frozen=True)
class Recipe:
    """A parsed recipe: its name, variables, stages and where its state lives."""

    name: str
    path: Path
    vars: dict[str, str]
    stages: tuple[Stage, ...]

    @property
    def workdir(self) -> Path:
        return Path(self.vars["workdir"])


def _render(template: Any, values: dict[str, str], where: str) -> str:
    if not isinstance(template, (str, int, float)):
        raise ConfigError(f"{where}: expected a string, got {template!r}")

    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise ConfigError(f"{where}: unknown variable {{{m.group(1)}}}")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, str(template))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Parse a recipe file, apply ``name=value`` overrides and fill in every stage.

    Raises:
        ConfigError: a missing file, malformed YAML, an unknown key or variable, a duplicate
            stage name, a command that is not this package's, or a bad override.
    """
    yaml = require("yaml", "train", "apex-reward recipe")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p}: not valid YAML ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("stages"), list):
        raise ConfigError(f"recipe {p}: expected a mapping with a 'stages' list")
    unknown = set(data) - {"name", "description", "vars", "stages"}
    if unknown:
        raise ConfigError(f"recipe {p}: unknown keys {sorted(unknown)}")
    values = {k: "" if v is None else str(v) for k, v in (data.get("vars") or {}).items()}
    for item in overrides or []:
        name, sep, value = item.partition("=")
        if not sep or name not in values:
            raise ConfigError(
                f"--vars {item!r}: expected name=value with a variable of the recipe "
                f"({', '.join(sorted(values))})"
            )
        values[name] = value
    if "workdir" not in values:
        raise ConfigError(f"recipe {p}: vars needs a 'workdir'")
    stages: list[Stage] = []
    for i, raw in enumerate(data["stages"]):
        where = f"recipe {p}, stage {i + 1}"
        if not isinstance(raw, dict) or "name" not in raw or "run" not in raw:
            raise ConfigError(f"{where}: expected a mapping with 'name' and 'run'")
        extra = set(raw) - {"name", "run", "outputs", "when", "estimate", "note"}
        if extra:
            raise ConfigError(f"{where}: unknown keys {sorted(extra)}")
        name = str(raw["name"])
        if any(s.name == name for s in stages):
            raise ConfigError(f"{where}: duplicate stage name {name!r}")
        argv = tuple(shlex.split(_render(raw["run"], values, f"{where} ({name}).run")))
        outputs = tuple(
            _render(o, values, f"{where} ({name}).outputs") for o in raw.get("outputs") or []
        )
        skip = None
        if "when" in raw:
            cond = _render(raw["when"], values, f"{where} ({name}).when").strip()
            if cond.lower() in ("", "null", "none", "false", "0"):
                skip = f"when: {raw['when']} is off"
        estimate = dict(raw.get("estimate") or {})
        for k in ESTIMATE_KEYS:
            v = estimate.get(k, 0)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{where} ({name}).estimate.{k}: expected a number >= 0")
        stage = Stage(name, argv, outputs, skip, estimate)
        stage.process_argv()  # refuse foreign commands at load time, not half-way through
        stages.append(stage)
    return Recipe(str(data.get("name") or p.stem), p, values, tuple(stages))


def _state_path(recipe: Recipe) -> Path:
    return recipe.workdir / "recipe_state.json"


def _read_state(recipe: Recipe) -> dict[str, Any]:
    try:
        state = json.loads(_state_path(recipe).read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def stage_status(recipe: Recipe, stage: Stage, state: dict[str, Any]) -> str:
    """``skipped``, ``done`` (outputs present, same command as its last success) or ``todo``."""
    if stage.skip_reason:
        return "skipped"
    rec = state.get(stage.name)
    same = isinstance(rec, dict) and rec.get("argv") == list(stage.argv)
    return "done" if same and all(Path(o).exists() for o in stage.outputs) else "todo"


def dry_run_text(recipe: Recipe) -> str:
    """Every stage's status, command and estimate, and the totals (what ``--dry-run`` prints)."""
    state = _read_state(recipe)
    lines = [f"recipe {recipe.name} ({recipe.path}), workdir {recipe.workdir}", ""]
    totals = dict.fromkeys(ESTIMATE_KEYS, 0.0)
    for i, s in enumerate(recipe.stages, 1):
        status = stage_status(recipe, s, state)
        lines.append(f"[{i}/{len(recipe.stages)}] {s.name}: {status}")
        lines.append(f"    {shlex.join(s.argv)}")
        if s.skip_reason:
            lines.append(f"    ({s.skip_reason})")
        est = s.estimate
        if any(est.get(k) for k in ESTIMATE_KEYS):
            lines.append(
                "    estimate: "
                + ", ".join(f"{k} {est.get(k, 0):g}" for k in ESTIMATE_KEYS)
                + (f" — {est['basis']}" if est.get("basis") else "")
            )
        if status != "skipped":
            for k in ESTIMATE_KEYS:
                totals[k] += float(est.get(k, 0))
    lines += ["", "total: " + ", ".join(f"{k} {v:g}" for k, v in totals.items())]
    return "\n".join(lines) + "\n"


def run_recipe(config: RecipeConfig, *, echo=None) -> dict[str, Any]:
    """Run (or resume) every stage; returns ``{"stages": [{name, status, seconds}], ...}``.

    ``echo`` receives one line per stage event (default: stderr).

    Raises:
        ConfigError: an invalid recipe or ``--force`` naming no stage.
        RecipeStageError: a stage failed; names it and its log.
    """
    recipe = load_recipe(config.recipe, config.vars)
    names = {s.name for s in recipe.stages}
    bad = [f for f in config.force if f not in names]
    if bad:
        raise ConfigError(f"--force {bad}: no such stage (stages: {', '.join(names)})")
    say = echo or (lambda line: sys.stderr.write(line + "\n"))
    workdir = recipe.workdir
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    results = []
    n = len(recipe.stages)
    for i, stage in enumerate(recipe.stages, 1):
        state = _read_state(recipe)
        status = stage_status(recipe, stage, state)
        if stage.name in config.force and status == "done":
            status = "todo"
        if status != "todo":
            say(
                f"[{i}/{n}] {stage.name}: {status}"
                + (" (outputs complete)" if status == "done" else "")
            )
            results.append({"name": stage.name, "status": status, "seconds": 0.0})
            continue
        log = workdir / "logs" / f"{stage.name}.log"
        say(f"[{i}/{n}] {stage.name}: running {shlex.join(stage.argv)}  (log: {log})")
        t0 = time.perf_counter()
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(stage.argv)}\n")
            fh.flush()
            proc = subprocess.run(stage.process_argv(), stdout=fh, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - t0
        missing = [o for o in stage.outputs if not Path(o).exists()]
        if proc.returncode != 0 or missing:
            tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            why = (
                f"exit status {proc.returncode}"
                if proc.returncode
                else f"missing outputs {missing}"
            )
            raise RecipeStageError(
                f"stage {stage.name!r} failed ({why}); see {log}; fix it and rerun the same "
                "command (finished stages are skipped)\n" + "\n".join(tail)
            )
        state[stage.name] = {
            "argv": list(stage.argv),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
        }
        atomic_write_text(_state_path(recipe), json.dumps(state, indent=2) + "\n")
        say(f"[{i}/{n}] {stage.name}: done in {seconds:.1f} s")
        results.append({"name": stage.name, "status": "ran", "seconds": round(seconds, 1)})
    summary = {"recipe": recipe.name, "workdir": str(workdir), "stages": results}
    atomic_write_text(workdir / "recipe_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


class RecipeStageError(ConfigError):
    """A recipe stage exited with an error or without its outputs."""


# ----------------------------------------------------------------------------------------------
# CLI


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, RecipeConfig)


def _run(args: argparse.Namespace) -> int:
    config = dataclass_from_args(RecipeConfig, args)
    if config.dry_run:
        sys.stdout.write(dry_run_text(load_recipe(config.recipe, config.vars)))
        return 0
    summary = run_recipe(config)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


COMMAND = Command(
    "recipe",
    "run a whole training recipe stage by stage (resumable; --dry-run shows the plan)",
    _add_arguments,
    _run,
)
