"""What ``apex-reward score`` reads and where its results go.

* :func:`expand_inputs`: the command's FILE arguments as a list of audio paths -- directories
  searched recursively for audio files, glob patterns expanded, and JSONL lists (one
  ``{"path": ...}`` object per line, as audiobox-aesthetics' CLI reads them) read.
* :func:`check_output` / :func:`write_output`: an output file is checked before any work (and
  refused when it is one of the inputs), written atomically with the mode of the file it
  replaces and through a symlink, and when writing fails the results go to stdout instead of
  being lost.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import ConfigError

__all__ = ["AUDIO_SUFFIXES", "expand_inputs", "check_output", "write_output"]

#: File name endings a directory search picks up (compared in lower case).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
#: An input ending in this is a list of inputs, one JSON object per line.
LIST_SUFFIX = ".jsonl"


def expand_inputs(items: Sequence[str]) -> list[str]:
    """Audio paths from ``score``'s arguments, in order.

    * a directory: every file below it (recursively) whose name ends in one of
      :data:`AUDIO_SUFFIXES`, sorted; a directory without any stays itself (its record then says
      it is a directory);
    * an existing ``*.jsonl`` file: the ``"path"`` of each line's object, relative paths taken
      from the list's folder; blank lines are skipped;
    * a glob pattern (``*``, ``?``, ``[...]``; ``**`` matches folders recursively) that is not
      itself a file: the matching files, sorted; no match leaves the pattern (its record then
      says the file is not found);
    * anything else: as given (missing files get an error record when scored).

    Raises:
        ConfigError: a JSONL line that is not an object with a string ``"path"``.
    """
    out: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                str(q) for q in p.rglob("*") if q.suffix.lower() in AUDIO_SUFFIXES and q.is_file()
            )
            out.extend(found or [item])
        elif p.suffix.lower() == LIST_SUFFIX and p.is_file():
            out.extend(_read_list(p))
        elif glob.has_magic(item) and not p.exists():
            matches = sorted(m for m in glob.glob(item, recursive=True) if Path(m).is_file())
            out.extend(matches or [item])
        else:
            out.append(item)
    return out


def _read_list(path: Path) -> list[str]:
    paths = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the input list ({e})") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{n}: not a JSON object ({e.msg})") from e
        entry = record.get("path") if isinstance(record, dict) else None
        if not isinstance(entry, str) or not entry:
            raise ConfigError(f'{path}:{n}: expected an object with a "path" string, got {line!r}')
        q = Path(entry).expanduser()
        paths.append(str(q if q.is_absolute() else path.parent / q))
    return paths


def check_output(path: str, inputs: Sequence[str]) -> Path:
    """``--output`` checked before any work: a writable file in an existing folder, and not one
    of ``inputs`` (writing results over an audio file would destroy it).

    Raises:
        ConfigError: naming the problem.
    """
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--output {path}: is a directory")
    target = Path(os.path.realpath(p))  # a symlink is written through: check its target
    if not target.parent.is_dir():
        raise ConfigError(f"--output {path}: directory {target.parent} does not exist")
    if not os.access(target.parent, os.W_OK) or (
        target.exists() and not os.access(target, os.W_OK)
    ):
        raise ConfigError(f"--output {path}: not writable")
    if target.exists():
        for item in inputs:
            try:
                same = os.path.samefile(item, target)
            except OSError:
                continue
            if same:
                raise ConfigError(
                    f"--output {path} is also an input ({item}); writing the results there "
                    "would overwrite it. Choose another output file"
                )
    return p


def write_output(path: Path, text: str) -> bool:
    """Write ``text`` to ``path`` atomically (UTF-8; undecodable file names written back as
    their bytes); returns True.

    If writing fails (disk full, quota, I/O error), the text goes to stdout instead, a line on
    stderr says so, and False is returned: the results are never lost.
    """
    from .files import atomic_write_text

    try:
        atomic_write_text(path, text, errors="surrogateescape")
        return True
    except OSError as e:
        sys.stderr.write(
            f"apex-reward score: could not write {path} ({e.strerror or e}); "
            "the results follow on stdout instead\n"
        )
        write_stdout(text)
        return False


def write_stdout(text: str) -> None:
    """``text`` on stdout, file names that are not valid UTF-8 written back as their bytes."""
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    sys.stdout.write(text)
    sys.stdout.flush()
