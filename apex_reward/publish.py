"""``apex-reward push``: write a checkpoint's model card, or publish it on the Hub.

``apex-reward push --model DIR --write-card`` writes ``DIR/README.md`` (the card
:func:`apex_reward.hub.model_card` generates from ``config.json`` and, with ``--audit``, the audit's
report); ``apex-reward push --model DIR --repo-id org/name`` uploads the checkpoint with that card
(:func:`apex_reward.hub.push_to_hub`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .cli import Command
from .dataclass_io import add_dataclass_arguments, dataclass_from_args
from .errors import ConfigError
from .files import atomic_write_text

__all__ = ["PushConfig", "run_push", "COMMAND"]


@dataclass
class PushConfig:
    """Options of ``apex-reward push``."""

    model: str = field(default="", metadata={"help": "the checkpoint directory to publish"})
    repo_id: str | None = field(
        default=None, metadata={"help": "Hub repo org/name to upload to (created if missing)"}
    )
    write_card: bool = field(
        default=False,
        metadata={"help": "only write the model card to MODEL/README.md; upload nothing"},
    )
    audit: str | None = field(
        default=None,
        metadata={"help": "an apex-reward audit output directory: its verdict goes in the card"},
    )
    license: str | None = field(
        default=None,
        metadata={"help": "licence id of the weights for the card (e.g. cc-by-nc-4.0)"},
    )
    private: bool = field(default=False, metadata={"help": "create the repo private"})
    revision: str | None = field(default=None, metadata={"help": "branch to commit to"})


def run_push(config: PushConfig) -> str:
    """Write the card (``write_card``) or upload; returns the card path or the commit URL.

    Raises:
        ConfigError: no ``--model``, neither ``--repo-id`` nor ``--write-card``, a bad audit dir.
        CheckpointError: an unreadable checkpoint, or the Hub refused the upload.
    """
    from .hub import model_card, read_audit
    from .model import ApexRewardModel

    if not config.model:
        raise ConfigError("push: --model is required")
    if not config.write_card and not config.repo_id:
        raise ConfigError("push: give --repo-id org/name to upload, or --write-card")
    directory = Path(config.model)
    if config.write_card:
        cfg_path = directory / "config.json"
        if not cfg_path.is_file():
            raise ConfigError(f"push: {cfg_path} not found (is --model a checkpoint directory?)")
        summary = read_audit(config.audit)[0] if config.audit else None
        card = model_card(
            json.loads(cfg_path.read_text()),
            repo_id=config.repo_id,
            license=config.license,
            audit=summary,
        )
        atomic_write_text(directory / "README.md", card)
        return str(directory / "README.md")
    model = ApexRewardModel.from_pretrained(directory)
    return model.push_to_hub(
        config.repo_id,
        private=config.private,
        revision=config.revision,
        license=config.license,
        audit=config.audit,
    )


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, PushConfig)


def _run(args: argparse.Namespace) -> int:
    sys.stdout.write(run_push(dataclass_from_args(PushConfig, args)) + "\n")
    return 0


COMMAND = Command(
    "push",
    "write a checkpoint's model card, or upload it with its card to the Hub",
    _add_arguments,
    _run,
)
