"""``apex-reward arena`` on the command line: flags from :class:`~.job.ArenaConfig`, a short
report on stderr/stdout, and the :data:`COMMAND` listed in :data:`apex_reward.cli.COMMANDS`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments

from ..flags import ENCODER_DTYPE, add_renamed_flags, config_from_args
from .config import ArenaConfig
from .job import run_arena_evaluation
from .report import format_number

__all__ = ["add_arena_arguments", "run_arena", "COMMAND"]


def add_arena_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward arena`` (generated from :class:`ArenaConfig`)."""
    add_dataclass_arguments(parser, ArenaConfig)
    add_renamed_flags(parser, [ENCODER_DTYPE])


def run_arena(args: argparse.Namespace) -> int:
    """``apex-reward arena``: run the evaluation; print the results table and where files went."""
    cfg = config_from_args(ArenaConfig, args, [ENCODER_DTYPE])
    summary = run_arena_evaluation(cfg)
    out = Path(cfg.out)
    b = summary["battles"]
    s = summary["scoring"]
    err = sys.stderr
    err.write(
        f"battles: {b['records']} records, {b['kept']} kept; removed: "
        + ", ".join(f"{k} {v}" for k, v in b["removed"].items() if v)
        + "\n"
    )
    report = json.loads((out / "battles_report.json").read_text())
    if report["issues"]:
        err.write(f"{len(report['issues'])} battle record issue(s):\n")
        for i in report["issues"][:20]:
            where = f"{i['source']}:{i['line']}" if i["line"] is not None else i["source"]
            err.write(f"  {where}: {i['problem']}\n")
        if len(report["issues"]) > 20:
            err.write(f"  ... see {out / 'battles_report.json'}\n")
    err.write(
        f"audio: {s['files']} files, {s['contents']} distinct contents: {s['cache_hits']} cache "
        f"hits, {s['scored']} scored, {s['failed']} failed\n"
    )
    sys.stdout.write((out / "results.md").read_text())
    if "synthetic" in summary:
        sys.stdout.write(
            f"\nAUC of the hidden true function: {format_number(summary['synthetic']['true_auc'])}\n"
        )
    sys.stdout.write(
        f"\ncalibration (logistic, out-of-fold): ECE {summary['calibration']['ece']:.3f}\n"
    )
    if "export" in summary:
        sys.stdout.write(f"preference model written to {summary['export']['checkpoint']}\n")
    sys.stdout.write(f"report: {out / 'report.md'}\n")
    return 0


COMMAND = Command(
    "arena",
    "Music Arena preference evaluation and preference head",
    add_arena_arguments,
    run_arena,
)
