"""Peak memory of `apex-reward score` on a 10-minute 48 kHz stereo file.

Writes the file (PCM16 WAV, 115 MB), then runs `apex-reward score` on it in a fresh process per
batch size and reports that process's peak RSS (ru_maxrss). Segments are encoded in batches of
--batch-size, so peak memory grows with the batch size, not with the song's length.

    python benchmarks/long_file_memory.py --model runs/tiny --batch-sizes 1 4 8 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf


def write_long_file(path: Path, seconds: int, sr: int) -> None:
    t = np.arange(sr * seconds, dtype=np.float32) / sr
    left = 0.3 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
    sf.write(path, np.stack([left, 0.8 * left], axis=1), sr, subtype="PCM_16")


def peak_rss_of(cmd: list[str]) -> tuple[float, float, int]:
    """Run cmd in a child process; return (peak RSS MiB, wall seconds, exit code)."""
    code = (
        "import resource, subprocess, sys, time, json;"
        "t=time.perf_counter();"
        "r=subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL);"
        "print(json.dumps([resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss/1024,"
        " time.perf_counter()-t, r.returncode]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True
    )
    rss, wall, rc = json.loads(out.stdout)
    return rss, wall, rc


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--seconds", type=int, default=600)
    p.add_argument("--sample-rate", type=int, default=48000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 20])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.wav"
        write_long_file(path, args.seconds, args.sample_rate)
        size_mb = path.stat().st_size / 2**20
        baseline, _, _ = peak_rss_of([sys.executable, "-c", "import apex_reward, transformers"])
        rows = []
        for bs in args.batch_sizes:
            rss, wall, rc = peak_rss_of(
                [
                    "apex-reward",
                    "score",
                    "--model",
                    args.model,
                    "--device",
                    args.device,
                    "--batch-size",
                    str(bs),
                    str(path),
                ]
            )
            rows.append(
                {
                    "batch_size": bs,
                    "peak_rss_mib": round(rss, 1),
                    "wall_s": round(wall, 2),
                    "exit": rc,
                }
            )
    result = {
        "file_mib": round(size_mb, 1),
        "seconds": args.seconds,
        "sample_rate": args.sample_rate,
        "channels": 2,
        "import_only_peak_rss_mib": round(baseline, 1),
        "runs": rows,
    }
    print(json.dumps(result, indent=2))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
