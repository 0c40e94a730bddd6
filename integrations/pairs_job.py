"""The ``apex-reward pairs`` job: read a candidates file, score every candidate, write pairs.

The file format is :func:`read_candidates`'s; scoring goes through the TRL reward function
(:class:`~apex_reward.integrations.trl_rewards.ApexRewardFunction`), pair selection through
:func:`~apex_reward.integrations.pairs.build_preference_pairs`. :func:`run_pairs_job` writes every
output under a temporary name first, so a failed run leaves the previous outputs as they were.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from apex_reward.cli import Command
from apex_reward.dataclass_io import finite_or_none
from apex_reward.errors import ApexError, ConfigError, require
from apex_reward.files import atomic_path
from apex_reward.loading import ModelOptions, load_model

from .pairs import (
    PAIR_COLUMNS,
    STRATEGIES,
    Strategy,
    decode_token_ids,
    is_token_ids,
    pair_records,
    to_dataset,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CandidateGroup",
    "PairsConfig",
    "read_candidates",
    "add_pairs_arguments",
    "run_pairs_job",
    "run_pairs",
    "COMMAND",
]

# ----------------------------------------------------------------------------------------------
# the candidates file


@dataclass
class CandidateGroup:
    """One prompt and its candidates, from one line of the candidates file.

    Attributes:
        line: 1-based line number in the file.
        prompt: the prompt (any JSON value: text, or a list of chat messages).
        audio: candidate audio paths (resolved against the file's directory).
        completions: what goes in ``chosen``/``rejected`` for each candidate (the completion text
            or token ids when given, else the audio path).
        id: the line's optional ``"id"``.
    """

    line: int
    prompt: Any
    audio: list[str]
    completions: list[Any]
    id: Any = None


def _parse_line(obj: Any, base: Path, line: int) -> CandidateGroup:
    if not isinstance(obj, dict):
        raise ConfigError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"prompt", "candidates", "id"})
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; expected prompt, candidates and optional id")
    if "prompt" not in obj:
        raise ConfigError("missing 'prompt'")
    if obj["prompt"] is None or obj["prompt"] == "":
        raise ConfigError("'prompt' is empty")
    cands = obj.get("candidates")
    if not isinstance(cands, list) or len(cands) < 2:
        raise ConfigError("'candidates' must be a list of at least 2 entries")
    audio: list[str] = []
    completions: list[Any] = []
    with_completion = 0
    for j, c in enumerate(cands):
        if isinstance(c, str):
            path, completion = c, None
        elif isinstance(c, dict):
            extra = sorted(set(c) - {"audio", "completion"})
            if extra:
                raise ConfigError(
                    f"candidates[{j}]: unknown key(s) {extra}; expected 'audio' and optional "
                    "'completion'"
                )
            path, completion = c.get("audio"), c.get("completion")
            if completion is not None:
                with_completion += 1
        else:
            raise ConfigError(
                f"candidates[{j}]: expected an audio path or an object "
                f'{{"audio": ..., "completion": ...}}, got {type(c).__name__}'
            )
        if not isinstance(path, str) or not path:
            raise ConfigError(f"candidates[{j}]: 'audio' must be a non-empty path string")
        p = Path(path).expanduser()
        resolved = str(p if p.is_absolute() else base / p)
        audio.append(resolved)
        completions.append(resolved if completion is None else completion)
    if 0 < with_completion < len(cands):
        raise ConfigError(
            f"{with_completion} of {len(cands)} candidates have a 'completion'; give it for all "
            "candidates of a line or for none"
        )
    return CandidateGroup(line, obj["prompt"], audio, completions, obj.get("id"))


def read_candidates(path: str | Path) -> tuple[list[CandidateGroup], list[dict[str, Any]]]:
    """Read a candidates JSONL file.

    One JSON object per line::

        {"prompt": "calm piano", "candidates": ["a.wav", "b.wav", "c.wav"]}
        {"prompt": "fast drums", "id": 7,
         "candidates": [{"audio": "d.wav", "completion": "C4 E4 G4"},
                        {"audio": "e.wav", "completion": "C4 C4 C4"}]}

    ``prompt`` is any JSON value (text, or a list of chat messages); ``candidates`` lists at least
    two audio paths, or objects with ``audio`` and ``completion`` (text or a list of token ids:
    what ``chosen``/``rejected`` will hold instead of the path; all candidates of a line or none).
    Relative audio paths are resolved against the directory of the JSONL file. Blank lines are
    skipped.

    Returns:
        ``(groups, bad_lines)``: the valid lines, and ``{"line", "error"}`` for each invalid one.

    Raises:
        ConfigError: the file cannot be read.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read candidates file {str(p)!r}: {e}") from e
    groups, bad = [], []
    base = p.resolve().parent
    for n, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            bad.append({"line": n, "error": f"invalid JSON: {e.msg} (column {e.colno})"})
            continue
        try:
            groups.append(_parse_line(obj, base, n))
        except ConfigError as e:
            bad.append({"line": n, "error": str(e)})
    return groups, bad


# ----------------------------------------------------------------------------------------------
# the `apex-reward pairs` job


@dataclass
class PairsConfig:
    """Options of ``apex-reward pairs``: score candidate audio, build preference pairs."""

    model: ModelOptions = field(
        default_factory=ModelOptions,
        metadata={"flatten": True, "help": "the APEX checkpoint that scores the candidates"},
    )
    candidates: str | None = field(
        default=None,
        metadata={"help": "JSONL file: one {prompt, candidates} object per line (required)"},
    )
    out: str | None = field(default=None, metadata={"help": "output directory (required)"})
    strategy: Strategy = field(
        default="best_vs_worst",
        metadata={
            "help": "best_vs_worst: one pair per prompt; all_pairs: every pair with margin >= "
            "min_margin; top_k: the k best against the k worst"
        },
    )
    min_margin: float = field(
        default=0.0, metadata={"help": "keep pairs with score_chosen - score_rejected >= this"}
    )
    top_k: int = field(default=1, metadata={"help": "k for --strategy top_k"})
    tie_tolerance: float = field(
        default=1e-6, metadata={"help": "scores closer than this are a tie (never paired)"}
    )
    max_pairs_per_prompt: int | None = field(
        default=None, metadata={"help": "keep at most this many pairs per prompt (largest margins)"}
    )
    score: str = field(
        default="reward",
        metadata={"help": "which score ranks candidates: 'reward' or a score name (e.g. overall)"},
    )
    weights: dict[str, float] | None = field(
        default=None,
        metadata={
            "help": 'rank by a weighted sum of scores instead, e.g. \'{"overall": 1, '
            '"clarity": 0.1}\' (overrides --score)'
        },
    )
    margin_scale: float = field(
        default=1.0, metadata={"help": "margin column = margin_scale * (score difference)"}
    )
    guard: Literal["off", "flag", "penalize"] = field(
        default="penalize",
        metadata={
            "help": "reward guards: penalize = a candidate flagged by the signal checks "
            "(silence, noise, held tone, loop, DC, clipping) ranks at the bottom of the score's "
            "range; flag = report flags in scores.jsonl only; off = no checks"
        },
    )
    batch_size: int = field(default=8, metadata={"help": "30 s segments per encoder call"})
    num_workers: int = field(default=2, metadata={"help": "audio decoding threads"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an existing dataset in --out"}
    )
    strict: bool = field(
        default=False,
        metadata={"help": "exit with status 1 if any line is invalid or any candidate fails"},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "tokenizer (directory or hub id) that decodes completions given as token "
            "ids to the text TRL's DPOTrainer/RewardTrainer read (required for token ids)"
        },
    )
    allow_audio_paths: bool = field(
        default=False,
        metadata={
            "help": "allow lines without completions: chosen/rejected then hold audio paths, "
            "which only a trainer that reads audio can use (refused otherwise)"
        },
    )

    def __post_init__(self) -> None:
        self.model = ModelOptions.coerce(self.model)
        self.model.require_model()
        for name in ("candidates", "out"):
            if not getattr(self, name):
                raise ConfigError(f"--{name} is required")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"strategy: {self.strategy!r} is not one of {list(STRATEGIES)}")


def add_pairs_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward pairs`` (generated from :class:`PairsConfig`)."""
    from apex_reward.dataclass_io import add_dataclass_arguments

    parser.epilog = (
        "candidates file (JSONL), one prompt per line, at least 2 candidates each:\n"
        '  {"prompt": "calm piano", "candidates": ["a.wav", "b.wav", "c.wav"]}\n'
        '  {"prompt": "fast drums", "id": 7, "candidates": [{"audio": "d.wav", "completion": '
        '"C4 E4"}, {"audio": "e.wav", "completion": "G4 G4"}]}\n'
        "completion (text or token ids) goes in chosen/rejected instead of the path; relative\n"
        "paths are resolved against the file's directory; invalid lines are reported and skipped.\n"
        "writes OUT/dataset (datasets.load_from_disk), OUT/pairs.jsonl, OUT/scores.jsonl and\n"
        "OUT/stats.json"
    )
    add_dataclass_arguments(parser, PairsConfig)
    metavars = {"model": "DIR", "candidates": "FILE", "out": "DIR", "device": "DEVICE"}
    for action in parser._actions:
        if action.dest in metavars:
            action.metavar = metavars[action.dest]
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _replace_dir(new: Path, dst: Path) -> None:
    """Move the complete directory ``new`` to ``dst``, replacing whatever ``dst`` holds.

    A directory cannot be renamed over a non-empty one, so the old ``dst`` is first renamed aside
    and deleted only once ``new`` is in place (it is put back if that rename fails): at no point
    is the old output deleted before the new one is complete.
    """
    old = None
    if dst.exists():
        old = dst.with_name(f"{dst.name}.old{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def run_pairs_job(cfg: PairsConfig, *, progress: bool = False) -> dict[str, Any]:
    """Run the pairs job; returns the summary also written to ``OUT/stats.json``.

    Outputs in ``cfg.out``: ``dataset/`` (``datasets.Dataset.save_to_disk``), ``pairs.jsonl``
    (the same rows), ``scores.jsonl`` (every candidate's scores or error, with its line number)
    and ``stats.json`` (:class:`PairStats`, bad lines, failed candidates, the options used).
    All four are written in full under temporary names first and then moved into place, so a
    failed run (``--overwrite`` included) leaves the previous outputs as they were.
    """
    from .score_spec import spec_label
    from .trl_rewards import ApexRewardFunction

    require("datasets", "trl", "apex-reward pairs")
    out = Path(cfg.out)  # type: ignore[arg-type]
    if (out / "dataset").exists() and not cfg.overwrite:
        raise ApexError(f"{out / 'dataset'} already exists; pass --overwrite to replace it")
    groups, bad_lines = read_candidates(cfg.candidates)  # type: ignore[arg-type]
    for b in bad_lines:
        logger.warning("%s line %d skipped: %s", cfg.candidates, b["line"], b["error"])
    if not groups:
        raise ApexError(f"{cfg.candidates}: no valid lines ({len(bad_lines)} invalid)")
    bare = [g.line for g in groups if g.completions == g.audio]
    if bare and not cfg.allow_audio_paths:
        shown = ", ".join(map(str, bare[:10])) + (", ..." if len(bare) > 10 else "")
        raise ConfigError(
            f"{cfg.candidates}: {len(bare)} line(s) give candidates without a 'completion' "
            f"(lines {shown}): chosen/rejected would be audio paths, which TRL's DPOTrainer and "
            "RewardTrainer read as text and train on nothing. Give each candidate's "
            "completion, or pass --allow-audio-paths if you train on the audio yourself"
        )
    tokenizer = None
    if any(is_token_ids(v) for g in groups for v in (g.prompt, *g.completions)):
        if not cfg.tokenizer:
            raise ConfigError(
                f"{cfg.candidates}: completions (or prompts) given as token ids need --tokenizer "
                "(the policy's tokenizer) to become the text TRL's DPOTrainer and RewardTrainer "
                "read; or give text completions"
            )
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)

    model = load_model(cfg.model)
    spec: Any = cfg.weights if cfg.weights else cfg.score
    fn = ApexRewardFunction(
        model,
        score=spec,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        guard=cfg.guard,
    )
    unique = sorted({a for g in groups for a in g.audio})
    results = model.score(
        unique,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        progress=progress,
        guard=cfg.guard,
    )
    by_path = dict(zip(unique, results))
    values = [[fn.values([by_path[a]])[0] for a in g.audio] for g in groups]
    # chosen_audio/rejected_audio columns when chosen/rejected hold completions, not the paths
    with_completions = any(g.completions != g.audio for g in groups)

    records, stats = pair_records(
        [g.prompt for g in groups],
        [g.completions for g in groups],
        values,
        strategy=cfg.strategy,
        min_margin=cfg.min_margin,
        top_k=cfg.top_k,
        tie_tolerance=cfg.tie_tolerance,
        max_pairs_per_prompt=cfg.max_pairs_per_prompt,
        margin_scale=cfg.margin_scale,
        extra=[{"audio": g.audio} for g in groups] if with_completions else None,
    )
    decode_token_ids(records, tokenizer, "pass --tokenizer (the policy's tokenizer)")
    dataset = to_dataset(records, PAIR_COLUMNS)

    # one `failed` entry per candidate counted in stats.failed_candidates: those that could not
    # be scored, and those whose selected score is NaN or infinite (left out of the pairs too)
    score_rows, failed = [], []
    for g, vals in zip(groups, values):
        for j, a in enumerate(g.audio):
            r = finite_or_none(by_path[a].to_dict())
            r.update({"line": g.line, "candidate": j, "value": vals[j]})
            score_rows.append(r)
            if "error" in r:
                failed.append(
                    {"line": g.line, "audio": a, "error_type": r["error_type"], "error": r["error"]}
                )
            elif vals[j] is None:
                failed.append(
                    {
                        "line": g.line,
                        "audio": a,
                        "error_type": "NonFiniteScore",
                        "error": f"the {spec_label(fn.score)!r} score is NaN or infinite",
                    }
                )
    summary = {
        **stats.to_dict(),
        "bad_lines": bad_lines,
        "failed": failed,
        "untrained_model": bool(model.untrained),
        "options": {k: v for k, v in asdict(cfg).items()},
    }

    # Every output is written in full under a temporary name in `out` first, and only then moved
    # over the previous one (--overwrite): if writing fails (disk full, ...), the previous outputs
    # are left as they were.
    out.mkdir(parents=True, exist_ok=True)
    staged_dataset = out / f"dataset.tmp{os.getpid()}"
    try:
        with ExitStack() as files:  # the files move into place when the block ends, not before
            staged = {
                name: files.enter_context(atomic_path(out / name))
                for name in ("stats.json", "scores.jsonl", "pairs.jsonl")
            }
            if staged_dataset.exists():
                shutil.rmtree(staged_dataset)
            dataset.save_to_disk(str(staged_dataset))
            _write_jsonl(staged["pairs.jsonl"], records)
            _write_jsonl(staged["scores.jsonl"], score_rows)
            staged["stats.json"].write_text(json.dumps(summary, indent=2) + "\n")
            _replace_dir(staged_dataset, out / "dataset")
    finally:
        shutil.rmtree(staged_dataset, ignore_errors=True)
    return summary


def run_pairs(args: argparse.Namespace) -> int:
    """``apex-reward pairs``: exit 0 when a dataset was written (1 with ``--strict`` if any line
    or candidate failed, or when no pair could be built)."""
    from apex_reward.dataclass_io import dataclass_from_args

    cfg = dataclass_from_args(PairsConfig, args)
    summary = run_pairs_job(cfg, progress=True)
    err = sys.stderr
    err.write(
        f"{summary['pairs']} pairs from {summary['prompts_with_pairs']} of {summary['prompts']} "
        f"prompts ({summary['candidates']} candidates, {summary['failed_candidates']} failed, "
        f"{summary['ties']} ties, {summary['below_margin']} below margin, "
        f"{len(summary['bad_lines'])} invalid lines) -> {cfg.out}\n"
    )
    for b in summary["bad_lines"]:
        err.write(f"  line {b['line']}: {b['error']}\n")
    for f in summary["failed"]:
        err.write(f"  line {f['line']}: {f['audio']}: {f['error_type']}: {f['error']}\n")
    if summary["pairs"] == 0:
        err.write("no pairs could be built\n")
        return 1
    if cfg.strict and (summary["bad_lines"] or summary["failed"]):
        return 1
    return 0


COMMAND = Command(
    "pairs",
    "build DPO preference pairs from scored candidates",
    add_pairs_arguments,
    run_pairs,
)
