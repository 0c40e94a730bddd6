"""``apex-reward audit`` on the command line: flags from :class:`~.config.AuditConfig`, a
one-paragraph summary on stderr, exit status 1 when the audit fails (see :mod:`.job`), and the
:data:`COMMAND` listed in :data:`apex_reward.cli.COMMANDS`."""

from __future__ import annotations

import argparse
import sys

from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments

from ..flags import ENCODER_DTYPE, add_renamed_flags, config_from_args
from .config import AuditConfig
from .job import run_audit
from .report import summary_paragraph

__all__ = ["add_audit_arguments", "run_audit_command", "COMMAND"]


def add_audit_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward audit`` (generated from :class:`AuditConfig`)."""
    add_dataclass_arguments(parser, AuditConfig)
    add_renamed_flags(parser, [ENCODER_DTYPE])


def run_audit_command(args: argparse.Namespace) -> int:
    """``apex-reward audit``: run the audit, write the summary paragraph on stderr; returns 1
    when a non-music probe beats the reference median without a flag, else 0."""
    cfg = config_from_args(AuditConfig, args, [ENCODER_DTYPE])
    summary = run_audit(cfg)
    sys.stderr.write(summary_paragraph(summary) + "\n")
    return int(summary["verdict"]["exit_status"])


COMMAND = Command(
    "audit",
    "reward-hacking audit: static probes, ladders and a gradient attack against the guards",
    add_audit_arguments,
    run_audit_command,
)
