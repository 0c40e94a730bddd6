"""Killing an extraction part-way (the resumption tests of ``extract``)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_after_shards(cmd: list[str], out: Path, shards: int, env: dict[str, str]) -> int:
    """Start ``cmd`` (an ``extract`` writing to ``out``), SIGKILL it once ``shards`` shard
    records exist (or after 300 s), and return how many records it left; asserts that it was
    killed before it wrote the index."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            done = list((out / "shards").glob("*.json")) if (out / "shards").is_dir() else []
            if len(done) >= shards:
                break
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "index.parquet").exists(), "the job finished before it could be killed"
    return len(list((out / "shards").glob("*.json")))
