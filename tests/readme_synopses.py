"""The README's command synopses, generated from the parsers (what ``--help`` shows).

Test code, not part of the package: ``tests/test_readme.py`` checks that the README's block
between the markers below equals :func:`synopses`; after adding or changing a flag, refresh the
block with ``python tests/readme_synopses.py``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN = "<!-- synopses: generated from --help by tests/readme_synopses.py -->"
END = "<!-- end of synopses -->"
WIDTH = 100


def synopses() -> str:
    """One usage block per command, in ``apex-reward --help`` order, wrapped at ``WIDTH``."""
    from apex_reward.cli import build_parser, load_commands

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH + 2)  # argparse wraps at COLUMNS - 2
    try:
        blocks = []
        for cmd in load_commands():
            parser = build_parser(cmd.name)
            sub = next(a for a in parser._actions if a.dest == "command").choices[cmd.name]
            usage = sub.format_usage().strip()
            usage = usage.removeprefix("usage: ").replace(" [-h]", "", 1)
            blocks.append(
                "\n".join(
                    line[len("usage: ") :] if i else line
                    for i, line in enumerate(usage.splitlines())
                )
            )
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return "```\n" + "\n".join(blocks) + "\n```"


def readme_block(text: str) -> str:
    """The README's current synopses block (between the markers)."""
    start = text.index(BEGIN) + len(BEGIN)
    return text[start : text.index(END, start)].strip()


def main() -> int:
    text = README.read_text()
    start = text.index(BEGIN) + len(BEGIN)
    stop = text.index(END, start)
    README.write_text(text[:start] + "\n" + synopses() + "\n" + text[stop:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
