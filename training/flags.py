"""The training jobs' flag vocabulary, and the flags it replaced.

Every job says where it runs with ``--device`` and the encoder precision with ``--dtype``, the
vocabulary of :class:`apex_reward.loading.ModelOptions`. Older flags that meant the same thing
(``--cpu``, ``--encoder-dtype``) are refused with a one-line error naming their replacement, both
on the command line and as keys of a ``--config`` file: a silent alias would keep two spellings
alive.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from apex_reward.dataclass_io import dataclass_from_args, load_config_file
from apex_reward.errors import ConfigError

T = TypeVar("T")

__all__ = ["Renamed", "CPU", "ENCODER_DTYPE", "add_renamed_flags", "config_from_args"]


@dataclass(frozen=True)
class Renamed:
    """A removed option: its old field name and what to write instead."""

    old: str
    flag: str
    key: str

    @property
    def old_flag(self) -> str:
        """The removed command-line flag (``--encoder-dtype``)."""
        return "--" + self.old.replace("_", "-")

    def flag_message(self) -> str:
        """The error for the removed flag."""
        return f"{self.old_flag} was renamed: use {self.flag}"


#: ``--cpu`` became ``--device cpu``.
CPU = Renamed("cpu", flag="--device cpu", key="device: cpu")
#: ``--encoder-dtype`` became ``--dtype``.
ENCODER_DTYPE = Renamed("encoder_dtype", flag="--dtype", key="dtype")


class _RenamedFlag(argparse.Action):
    """A hidden flag whose use stops the parser with the message naming its replacement."""

    def __init__(self, option_strings: list[str], dest: str, *, renamed: Renamed, **kwargs: Any):
        self.renamed = renamed
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(self.renamed.flag_message())


def add_renamed_flags(parser: argparse.ArgumentParser, renamed: Sequence[Renamed]) -> None:
    """Register each removed flag, hidden from ``--help``, so that using it fails clearly."""
    for r in renamed:
        parser.add_argument(
            r.old_flag,
            action=_RenamedFlag,
            renamed=r,
            nargs="?",
            dest=f"_renamed_{r.old}",
            default=argparse.SUPPRESS,
            help=argparse.SUPPRESS,
        )


def config_from_args(cls: type[T], args: argparse.Namespace, renamed: Sequence[Renamed]) -> T:
    """:func:`~apex_reward.dataclass_io.dataclass_from_args`, refusing removed keys in the
    ``--config`` file with an error naming their replacement.

    Raises:
        ConfigError: a removed key in the config file, or any invalid option.
    """
    config_file = getattr(args, "_config_file", None)
    if config_file:
        keys = load_config_file(config_file)
        for r in renamed:
            if r.old in keys:
                raise ConfigError(
                    f"{config_file}: {r.old} was renamed: use {r.key} ({r.flag} on the command line)"
                )
    return dataclass_from_args(cls, args)
