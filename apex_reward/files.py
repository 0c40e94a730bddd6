"""File helpers shared by the library, the training jobs and the integrations.

* :func:`atomic_path` / :func:`atomic_write_text`: write under a temporary sibling name and
  rename over the target, so a reader (or an interrupted job) sees the old file or the complete
  new one, never a partial write. The new file keeps the permission bits of the file it replaces,
  and a symlink is written through (its target is replaced, the link kept).
  :func:`remove_stale_temporaries` deletes what a killed writer left behind.
* :func:`file_sha256`, :func:`tensors_digest`, :func:`update_with_tensor`: content digests of
  files and of named tensors (independent of how the tensors are stored).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_path",
    "atomic_write_text",
    "file_sha256",
    "remove_stale_temporaries",
    "tensors_digest",
    "update_with_tensor",
]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of ``path`` to write to, renamed over ``path`` when the block ends.

    On a normal exit the temporary file replaces ``path`` with :func:`os.replace` (atomic on
    POSIX: ``path`` holds its previous content or the complete new one, never a partial write);
    if the block raises, the temporary file is deleted and ``path`` is left as it was. Enter
    several with :class:`contextlib.ExitStack` to move a set of files into place only once all
    of them are written::

        with atomic_path(out / "table.parquet") as tmp:
            df.to_parquet(tmp)
    """
    path = Path(path)
    if path.is_symlink():  # write through the link: the link stays, its target is replaced
        path = Path(os.path.realpath(path))
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    try:
        yield tmp
        # the new file gets the old one's permission bits, or the umask's for a new file
        # (writers such as safetensors create their files 0600)
        mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


#: What :func:`atomic_path` puts between a file's name and the writing process's id.
TMP_MARK = ".tmp"


def _umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_path` left in ``directory`` when its process was
    killed (``NAME.tmpPID`` whose process no longer runs); returns the deleted paths. Files of
    processes still running (another rank of the same job) are kept."""
    removed = []
    for f in Path(directory).glob(f"*{TMP_MARK}*"):
        pid_text = f.name.rsplit(TMP_MARK, 1)[1]
        if not pid_text.isdigit() or not f.is_file() or _process_alive(int(pid_text)):
            continue
        f.unlink(missing_ok=True)
        removed.append(f)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def atomic_write_text(path: str | Path, text: str, *, errors: str | None = None) -> None:
    """Write ``text`` (UTF-8; ``errors`` as for :func:`open`) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def file_sha256(path: str | Path) -> str:
    """SHA-256 hex digest of a file's bytes (read in 4 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def update_with_tensor(h: Any, name: str, t: torch.Tensor) -> None:
    """Feed a named tensor (name, dtype, shape and values) into the hashlib object ``h``."""
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of named tensors in name order: the same weights give the same digest wherever
    and however they are stored."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        update_with_tensor(h, name, tensors[name])
    return h.hexdigest()
