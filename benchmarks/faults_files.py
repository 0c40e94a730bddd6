"""Fault injection for everything but the server: odd and broken audio files, a flipped byte in
a training shard, checkpoint mutations, an extraction killed with SIGKILL and malformed shard
records, and ``score -o`` failures, all through the real command line and API.

    python benchmarks/faults_files.py [--workdir DIR]

Each audio file is one "request" (decoded by ``load_audio`` and scored in one ``apex-reward
score`` batch): *right* when the outcome is the expected one (scores, or the expected typed
error), *wrong* for another typed outcome, a *crash* for an untyped exception or a traceback.
Each injected fault is *survived* when the code reports it as the expected typed error (or
recovers from it) without a crash; *data lost* counts songs or results that went missing.
``run_cases`` is also imported by the server's fault-injection script.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fault_files import cut, negative_granule_ogg, streamed_flac, write_tone  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
KEYS = (
    "tried",
    "right",
    "wrong",
    "errors_5xx",
    "crashes",
    "faults_injected",
    "faults_survived",
    "data_lost",
)


def _cli(*args: str, timeout: float = 600, preexec=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "apex_reward", *args],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=timeout,
        preexec_fn=preexec,
    )


def _tiny_checkpoint(path: Path) -> Path:
    import torch

    from apex_reward import ApexConfig, ApexRewardModel, FrontendConfig

    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend = FrontendConfig(segment_seconds=2.0, min_duration_s=0.5)
    ApexRewardModel.from_config(cfg, encoder="random").save_pretrained(path)
    return path


class Tally:
    def __init__(self) -> None:
        self.c: Counter[str] = Counter({k: 0 for k in KEYS})
        self.notes: list[str] = []

    def request(self, name: str, expected: str, got: str, crashed: bool = False) -> None:
        self.c["tried"] += 1
        if crashed:
            self.c["crashes"] += 1
            self.notes.append(f"CRASH {name}: {got}")
        elif got == expected:
            self.c["right"] += 1
        else:
            self.c["wrong"] += 1
            self.notes.append(f"WRONG {name}: expected {expected}, got {got}")

    def fault(self, name: str, survived: bool, lost: int = 0, detail: str = "") -> None:
        self.c["faults_injected"] += 1
        self.c["faults_survived"] += int(survived)
        self.c["data_lost"] += lost
        if not survived or lost:
            self.notes.append(f"FAULT {name}: survived={survived} lost={lost} {detail}")


# ----------------------------------------------------------------------------------------------
# audio


def _audio_cases(d: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected outcome: "ok" or an error class name)."""
    d.mkdir(parents=True, exist_ok=True)
    good_ogg = write_tone(d / "whole.ogg", 6.0, format="OGG", subtype="VORBIS")
    flac = write_tone(d / "whole.flac", 3.0)
    wav = write_tone(d / "whole.wav", 3.0)
    stream = streamed_flac(d / "stream.flac", 3.0)
    (d / "not_audio.mp3").write_text("this is not audio\n")
    (d / "empty.wav").write_bytes(b"")
    (d / "garbage.flac").write_bytes(os.urandom(4096))
    cases = {
        "wav": (wav, "ok"),
        "flac": (flac, "ok"),
        "ogg": (good_ogg, "ok"),
        "ogg_negative_granule": (negative_granule_ogg(d / "neg.ogg", 6.0), "ok"),
        "flac_streamed_total_0": (stream, "ok"),
        "mono_opus": (write_tone(d / "a.opus", 2.0, 48000, format="OGG", subtype="OPUS"), "ok"),
        "ogg_cut_half": (cut(good_ogg, d / "cut_half.ogg", 0.5), "AudioDecodeError"),
        "ogg_cut_tail": (cut(good_ogg, d / "cut_tail.ogg", 0.97), "AudioDecodeError"),
        "flac_cut": (cut(flac, d / "cut.flac", 0.5), "AudioDecodeError"),
        "flac_streamed_cut": (cut(stream, d / "cut_stream.flac", 0.5), "AudioDecodeError"),
        "wav_cut": (cut(wav, d / "cut.wav", 0.5), "AudioDecodeError"),
        "not_audio_mp3": (d / "not_audio.mp3", "AudioDecodeError"),
        "empty": (d / "empty.wav", "EmptyAudioError"),
        "random_bytes": (d / "garbage.flac", "AudioDecodeError"),
        "too_short": (write_tone(d / "short.wav", 0.1), "AudioTooShortError"),
        "missing": (d / "missing.wav", "AudioDecodeError"),
    }
    return cases


def run_audio(d: Path, ckpt: Path, t: Tally) -> None:
    from apex_reward import ApexRewardModel
    from apex_reward.audio import load_audio
    from apex_reward.errors import ApexError

    cases = _audio_cases(d)
    model = ApexRewardModel.from_pretrained(ckpt)
    # 1. the decoder and front-end checks, file by file
    for name, (path, expected) in cases.items():
        try:
            wav, sr = load_audio(path, max_duration_s=model.config.frontend.max_duration_s)
            model.frontend.check(wav, sr, str(path))
            got = "ok"
        except ApexError as e:
            got = type(e).__name__
        except Exception as e:  # noqa: BLE001 - counted as a crash
            t.request(f"load_audio {name}", expected, f"{type(e).__name__}: {e}", crashed=True)
            continue
        t.request(f"load_audio {name}", expected, got)
    # 2. all of them in one `apex-reward score` batch: bad files never poison the good ones
    proc = _cli(
        "score", "--model", str(ckpt), "--num-workers", "0", *[str(p) for p, _ in cases.values()]
    )
    crashed = "Traceback" in proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    by_path = {r["path"]: r for r in records}
    for name, (path, expected) in cases.items():
        r = by_path.get(str(path))
        got = "missing record" if r is None else ("ok" if "scores" in r else r["error_type"])
        t.request(f"score {name}", expected, got, crashed=crashed)


# ----------------------------------------------------------------------------------------------
# training data


def run_shard_flip(d: Path, t: Tally) -> None:
    from apex_reward import ApexConfig, ApexRewardModel
    from apex_reward.errors import ApexError, DataIntegrityError
    from apex_reward.training.embeddings import EmbeddingStore
    from apex_reward.training.synthetic import synthetic_embedding_corpus

    corpus = synthetic_embedding_corpus(d / "store", num_songs=48, shard_size=16, seed=3)
    shard = Path(corpus["embeddings"]) / "shards" / "shard-000001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-64] ^= 0xFF
    shard.write_bytes(bytes(data))
    try:
        EmbeddingStore(corpus["embeddings"]).songs()
        t.fault("shard byte flipped: EmbeddingStore", False, detail="read without an error")
    except DataIntegrityError:
        t.fault("shard byte flipped: EmbeddingStore", True)
    except ApexError as e:
        t.fault("shard byte flipped: EmbeddingStore", False, detail=type(e).__name__)
    base = d / "base"
    ApexRewardModel.from_config(ApexConfig.from_preset("tiny"), encoder="random").save_pretrained(
        base
    )
    proc = _cli(
        "train", "--embeddings", corpus["embeddings"], "--prepared", corpus["prepared"],
        "--model", str(base), "--device", "cpu", "--epochs", "1", "--log-with", "none",
        "--no-export", "--out", str(d / "run"),
    )  # fmt: skip
    ok = (
        proc.returncode == 1
        and "checksum mismatch" in proc.stderr
        and "Traceback" not in proc.stderr
    )
    t.fault("shard byte flipped: train", ok, detail=proc.stderr[-300:])


# ----------------------------------------------------------------------------------------------
# checkpoints


def _mutations(ckpt: Path) -> dict[str, tuple]:
    """name -> (change applied to a copy of the checkpoint, expected error class name)."""
    raw = json.loads((ckpt / "config.json").read_text())

    def edit(change):
        def apply(d: Path) -> None:
            cfg = json.loads(json.dumps(raw))
            change(cfg)
            (d / "config.json").write_text(json.dumps(cfg))

        return apply

    def write(data: bytes):
        return lambda d: (d / "config.json").write_bytes(data)

    def token(section, key, value):
        text = json.dumps({**raw, section: {**raw[section], key: "@@"}})
        return write(text.replace('"@@"', value).encode())

    def weights(change):
        def apply(d: Path) -> None:
            p = d / "model.safetensors"
            p.write_bytes(change(p.read_bytes()))

        return apply

    def flip(b: bytes) -> bytes:
        b = bytearray(b)
        b[-100] ^= 0xFF
        return bytes(b)

    def referenced(source, pickled=False):
        def apply(d: Path) -> None:
            from safetensors.torch import load_file, save_file

            tensors = load_file(str(d / "model.safetensors"))
            heads = {k: v for k, v in tensors.items() if not k.startswith("encoder.")}
            enc = {k[len("encoder.") :]: v for k, v in tensors.items() if k.startswith("encoder.")}
            (d / "encoder").mkdir()
            if pickled:
                (d / "encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
            else:
                save_file(enc, str(d / "encoder" / "model.safetensors"))
            save_file(heads, str(d / "model.safetensors"), metadata={"format": "pt"})
            from apex_reward.files import file_sha256

            cfg = json.loads(json.dumps(raw))
            cfg["encoder"].update(stored=False, source=source)
            cfg.pop("encoder_sha256", None)
            cfg["weights_sha256"] = file_sha256(d / "model.safetensors")
            (d / "config.json").write_text(json.dumps(cfg))

        return apply

    return {
        "no weights_sha256": (edit(lambda c: c.pop("weights_sha256")), "CheckpointError"),
        "config not UTF-8": (write(b'{"frontend": "\xff\xfe"}'), "CheckpointError"),
        "config nested 100k deep": (write(b"[" * 100_000 + b"]" * 100_000), "CheckpointError"),
        "config invalid JSON": (write(b'{"frontend": '), "CheckpointError"),
        "config a list": (write(b"[]"), "ConfigError"),
        "head_hidden -1": (edit(lambda c: c["head"].update(head_hidden=-1)), "ConfigError"),
        "head_hidden 1e12": (edit(lambda c: c["head"].update(head_hidden=10**12)), "ConfigError"),
        "segment_seconds NaN": (token("frontend", "segment_seconds", "NaN"), "ConfigError"),
        "segment_seconds 1e-9": (
            edit(lambda c: c["frontend"].update(segment_seconds=1e-9)),
            "ConfigError",
        ),
        "unknown field": (edit(lambda c: c.update(surprise=1)), "ConfigError"),
        "weights byte flipped": (weights(flip), "CheckpointError"),
        "weights truncated": (weights(lambda b: b[: len(b) // 2]), "CheckpointError"),
        "weights missing": (lambda d: (d / "model.safetensors").unlink(), "CheckpointError"),
        "encoder source pickled": (referenced("./encoder", pickled=True), "CheckpointError"),
        "encoder source escapes folder": (referenced("../../elsewhere"), "CheckpointError"),
        "encoder source relative (valid)": (referenced("./encoder"), "ok"),
    }


def run_checkpoints(d: Path, ckpt: Path, t: Tally) -> None:
    from apex_reward import ApexRewardModel
    from apex_reward.errors import ApexError

    for name, (mutate, expected) in _mutations(ckpt).items():
        m = d / name.replace(" ", "_")
        shutil.copytree(ckpt, m)
        mutate(m)
        try:
            ApexRewardModel.from_pretrained(m)
            got = "ok"
        except ApexError as e:
            got = type(e).__name__
        except Exception as e:  # noqa: BLE001 - an untyped exception is what this looks for
            got = f"untyped {type(e).__name__}"
        t.fault(f"checkpoint: {name}", got == expected, detail=f"expected {expected}, got {got}")


# ----------------------------------------------------------------------------------------------
# extraction


def run_extraction_faults(d: Path, ckpt: Path, t: Tally) -> None:
    import pandas as pd

    from apex_reward.training.embeddings import EmbeddingStore

    rows = []
    for i in range(24):
        write_tone(d / f"s{i:02d}.wav", 1.0 + 0.05 * i, 16000, freq=200 + 20 * i)
        rows.append({"id": f"s{i:02d}", "audio_path": f"s{i:02d}.wav"})
    pd.DataFrame(rows).to_csv(d / "manifest.csv", index=False)
    out = d / "emb"
    args = [
        "extract", "--manifest", str(d / "manifest.csv"), "--model", str(ckpt), "--out", str(out),
        "--shard-size", "2", "--batch-size", "4", "--num-workers", "0", "--device", "cpu",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "apex_reward", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "shards" / "shard-000003.json").exists():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # a killed writer's temporary, and malformed records of finished shards
    (out / "shards" / "shard-000001.safetensors.tmp4194999").write_bytes(b"half")
    (out / "shards" / "shard-000000.json").write_bytes(b"[]")
    if (out / "shards" / "shard-000002.json").exists():
        (out / "shards" / "shard-000002.json").write_bytes(b"\xff\xfe not utf-8")
    rerun = _cli(*args)
    ids = []
    if rerun.returncode == 0:
        ids = EmbeddingStore(out).song_ids
        EmbeddingStore(out).songs()  # every shard verified against its record
    lost = len({r["id"] for r in rows} - set(ids))
    once = len(ids) == len(set(ids))
    clean = not list((out / "shards").glob("*.tmp*"))
    t.fault(
        "extract: SIGKILL mid-run, then malformed records and a stale temporary",
        rerun.returncode == 0 and once and clean and "Traceback" not in rerun.stderr,
        lost=lost,
        detail=rerun.stderr[-300:],
    )


# ----------------------------------------------------------------------------------------------
# score -o


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (200, resource.RLIM_INFINITY))


def run_score_output(d: Path, ckpt: Path, t: Tally) -> None:
    import stat

    songs = [write_tone(d / f"o{i}.wav", 1.0, 16000, freq=300 + 40 * i) for i in range(3)]
    files = [str(p) for p in songs]
    base = ["score", "--model", str(ckpt), "--num-workers", "0", *files]
    # 1. disk full (a file-size limit makes every write past 200 bytes fail with EFBIG)
    out = d / "full.jsonl"
    proc = _cli(*base, "-o", str(out), preexec=_limit_file_size)
    recs = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    lost = len(files) - sum("scores" in r for r in recs)
    t.fault(
        "score -o: write fails (file size limit)",
        proc.returncode == 1
        and "on stdout instead" in proc.stderr
        and "Traceback" not in proc.stderr,
        lost=lost,
        detail=proc.stderr[-300:],
    )
    # 2. output is one of the inputs
    before = songs[0].read_bytes()
    proc = _cli(*base, "-o", files[0])
    t.fault(
        "score -o: an input as the output",
        proc.returncode == 1 and songs[0].read_bytes() == before,
        lost=int(songs[0].read_bytes() != before),
    )
    # 3. an existing 0600 file keeps its mode
    private = d / "private.jsonl"
    private.write_text("old\n")
    private.chmod(0o600)
    proc = _cli(*base, "-o", str(private))
    t.fault(
        "score -o: replaces a 0600 file",
        proc.returncode == 0 and stat.S_IMODE(private.stat().st_mode) == 0o600,
        lost=len(files) - len(private.read_text().splitlines()),
    )
    # 4. a symlink is written through
    target, link = d / "target.jsonl", d / "link.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    proc = _cli(*base, "-o", str(link))
    t.fault(
        "score -o: a symlink",
        proc.returncode == 0 and link.is_symlink() and len(target.read_text().splitlines()) == 3,
        lost=len(files) - len(target.read_text().splitlines()),
    )


def run_cases(workdir: Path) -> dict[str, int]:
    """Run every non-server fault case under ``workdir``; returns the counts in :data:`KEYS`
    (``errors_5xx`` is always 0 here: no HTTP is involved) plus nothing else. Details of any
    wrong answer, crash or unsurvived fault are logged on stderr."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt = _tiny_checkpoint(workdir / "model")
    t = Tally()
    run_audio(workdir / "audio", ckpt, t)
    run_shard_flip(workdir / "shards", t)
    run_checkpoints(workdir / "checkpoints", ckpt, t)
    (workdir / "extract").mkdir()
    run_extraction_faults(workdir / "extract", ckpt, t)
    (workdir / "output").mkdir()
    run_score_output(workdir / "output", ckpt, t)
    for note in t.notes:
        sys.stderr.write(note + "\n")
    return {k: int(t.c[k]) for k in KEYS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None, help="keep the files here (default: a temp dir)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.workdir:
        counts = run_cases(Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            counts = run_cases(Path(tmp))
    print(f"# {platform.platform()}, python {platform.python_version()}, {os.cpu_count()} CPUs")
    print(f"# load average {os.getloadavg()}, {time.perf_counter() - t0:.0f} s")
    print(
        f"requests: tried {counts['tried']}, answered right {counts['right']}, wrong "
        f"{counts['wrong']}, 5xx {counts['errors_5xx']}, crashes {counts['crashes']}"
    )
    print(
        f"faults: injected {counts['faults_injected']}, survived {counts['faults_survived']}, "
        f"data lost {counts['data_lost']}"
    )
    return 0 if counts["wrong"] == counts["crashes"] == counts["data_lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
