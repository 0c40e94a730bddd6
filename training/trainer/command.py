"""``apex-reward train`` on the command line: flags from :class:`~.config.TrainConfig`, the test
metrics table on stdout, and the :data:`COMMAND` listed in :data:`apex_reward.cli.COMMANDS`."""

from __future__ import annotations

import argparse
import sys

from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments

from ..distributed import finish_distributed
from ..flags import CPU, add_renamed_flags, config_from_args
from .config import TrainConfig
from .entry import train

__all__ = ["add_train_arguments", "run_train", "format_metrics", "COMMAND"]


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``apex-reward train`` (generated from :class:`TrainConfig`)."""
    add_dataclass_arguments(parser, TrainConfig)
    add_renamed_flags(parser, [CPU])


def run_train(args: argparse.Namespace) -> int:
    """``apex-reward train``: train, print the test metrics and where the model went."""
    config = config_from_args(TrainConfig, args, [CPU])
    result = train(config)
    code = 0
    if result.finished and result.metrics:
        import accelerate.state

        if accelerate.state.PartialState().is_main_process:
            sys.stdout.write(format_metrics(result.metrics["test"]) + "\n")
            if result.checkpoint:
                sys.stderr.write(f"exported {result.checkpoint} (best epoch {result.best_epoch})\n")
    elif not result.finished:
        sys.stderr.write(
            f"stopped after epoch {result.history[-1]['epoch'] if result.history else '-'}; rerun to continue\n"
        )
    return finish_distributed(code)


COMMAND = Command(
    "train",
    "train APEX heads on extracted embeddings",
    add_train_arguments,
    run_train,
)


def format_metrics(test: dict[str, dict[str, float]]) -> str:
    """A Markdown table of per-task test metrics."""
    lines = ["| task | MSE | MAE | Pearson | Spearman |", "|---|---|---|---|---|"]
    for t, m in test.items():
        lines.append(
            f"| {t} | {m['mse']:.4g} | {m['mae']:.4g} | {m['pearson']:.3f} | {m['spearman']:.3f} |"
        )
    return "\n".join(lines)
