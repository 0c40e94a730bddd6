"""The apex-reward command line: init, score, compare."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_bad_files, write_good_files

from apex_reward import ApexRewardModel
from apex_reward.cli import main
from apex_reward.encoder import MertEncoder


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "apex_reward", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_score_mix_of_good_and_bad_files(tmp_path, tiny_checkpoint):
    """Every good file scored, each bad one reported by name and reason, exit 1,
    no traceback."""
    good = write_good_files(tmp_path / "good")
    bad = write_bad_files(tmp_path / "bad")
    order = [
        good[0],
        bad["empty"],
        good[1],
        bad["truncated"],
        bad["text"],
        good[2],
        bad["nan"],
        good[3],
        bad["short"],
        good[4],
        bad["cut_wav"],
        bad["loud"],
        bad["low_rate"],
    ]
    proc = _run_cli("score", "--model", str(tiny_checkpoint), *map(str, order))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in order]  # one per input, in order
    by_path = {r["path"]: r for r in rows}
    for g in good:
        r = by_path[str(g)]
        assert "error" not in r and set(r) >= {"path", "scores", "reward"}, r
        assert len(r["scores"]) == 10 and r["untrained"] is True
    expected = {
        "empty": ("EmptyAudioError", "empty"),
        "truncated": ("AudioDecodeError", "truncated"),
        "text": ("AudioDecodeError", "not a readable audio file"),
        "nan": ("NonFiniteAudioError", "NaN"),
        "short": ("AudioTooShortError", "minimum is 1 s"),
        "cut_wav": ("AudioDecodeError", "truncated"),
        "loud": ("AudioRangeError", "peak |sample|"),
        "low_rate": ("UnsupportedSampleRateError", "7 Hz"),
    }
    for kind, (etype, fragment) in expected.items():
        r = by_path[str(bad[kind])]
        assert r["error_type"] == etype and fragment in r["error"], r
        assert f"{bad[kind]}: {etype}" in proc.stderr  # summary on stderr names file and problem
    assert "8 of 13 inputs failed" in proc.stderr
    assert "UNTRAINED" in proc.stderr


def test_score_formats(tmp_path, tiny_checkpoint, capsys):
    good = write_good_files(tmp_path)
    assert (
        main(["score", "--model", str(tiny_checkpoint), "--format", "csv", *map(str, good[:2])])
        == 0
    )
    out = capsys.readouterr().out
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["path"] for r in table] == [str(p) for p in good[:2]]
    assert 0 <= float(table[0]["streams"]) <= 100 and 1 <= float(table[0]["clarity"]) <= 5
    assert main(["score", "--model", str(tiny_checkpoint), "--format", "table", str(good[0])]) == 0
    out = capsys.readouterr().out
    assert "UNTRAINED" in out and "a.wav" in out and "reward" in out
    # --output writes the file; scores equal the Python API
    dest = tmp_path / "out.jsonl"
    assert main(["score", "--model", str(tiny_checkpoint), "-o", str(dest), str(good[0])]) == 0
    row = json.loads(dest.read_text())
    api = ApexRewardModel.from_pretrained(tiny_checkpoint).score([good[0]])[0]
    assert row["reward"] == pytest.approx(api.reward, abs=1e-6)


def test_score_output_is_checked_first_and_written_whole(tmp_path, tiny_checkpoint, capsys):
    """A bad --output fails before any scoring; file names that are not UTF-8 are scored and
    written back byte for byte; an existing output is replaced only by a complete one."""
    good = write_good_files(tmp_path / "audio")
    odd = tmp_path / "audio" / os.fsdecode(b"caf\xe9.wav")  # latin-1 name, not UTF-8
    os.link(good[0], os.fsencode(odd))
    model = str(tiny_checkpoint)
    for bad_out, message in [
        (tmp_path / "audio", "is a directory"),
        (tmp_path / "missing" / "out.csv", "does not exist"),
    ]:
        assert main(["score", "--model", model, "-o", str(bad_out), str(good[0])]) == 1
        assert message in capsys.readouterr().err
    dest = tmp_path / "out.csv"
    dest.write_text("previous results\n")
    files = [str(good[0]), str(odd), str(good[1])]
    assert main(["score", "--model", model, "--format", "csv", "-o", str(dest), *files]) == 0
    raw = dest.read_bytes()
    assert b"caf\xe9.wav" in raw and b"previous" not in raw
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8", "surrogateescape"))))
    assert [r[0] for r in rows[1:]] == files and all(
        r[-2] == "" for r in rows[1:]
    )  # error, untrained
    assert not list(tmp_path.glob(".out.csv*"))  # no temporary file left behind
    with pytest.raises(SystemExit):
        main(["score", "--model", model, "--batch-size", "0", str(good[0])])
    assert "--batch-size: must be at least 1" in capsys.readouterr().err


def test_init_and_compare(tmp_path, capsys):
    out = tmp_path / "m"
    assert (
        main(["init", "--preset", "tiny", "--out", str(out), "--seed", "3", "--mode", "segment"])
        == 0
    )
    model = ApexRewardModel.from_pretrained(out)
    assert model.untrained and model.config.head.mode == "segment" and model.config.encoder.stored
    # refuses to overwrite
    assert main(["init", "--preset", "tiny", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    # deterministic given the seed
    assert (
        main(
            [
                "init",
                "--preset",
                "tiny",
                "--out",
                str(tmp_path / "m2"),
                "--seed",
                "3",
                "--mode",
                "segment",
            ]
        )
        == 0
    )
    from safetensors.torch import load_file

    w1, w2 = load_file(out / "model.safetensors"), load_file(tmp_path / "m2" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)

    good = write_good_files(tmp_path / "audio")
    capsys.readouterr()
    assert main(["compare", "--model", str(out), str(good[0]), str(good[1])]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["method"] == "bradley_terry"
    assert res["logit"] == pytest.approx(res["reward_a"] - res["reward_b"], abs=1e-6)
    assert res["probability"] == pytest.approx(1 / (1 + np.exp(-res["logit"])), abs=1e-6)
    assert main(["compare", "--model", str(out), str(good[0]), str(tmp_path / "missing.wav")]) == 1
    assert "missing.wav: file not found" in capsys.readouterr().err
    short = tmp_path / "short.wav"
    sf.write(short, np.zeros(150, np.float32), 24000)
    assert main(["compare", "--model", str(out), str(good[0]), str(short)]) == 1
    err = capsys.readouterr().err
    assert f"{short}: audio is 0.00625 s long" in err and "waveforms[" not in err


def test_init_mert_preset_references_encoder_without_download(tmp_path):
    out = tmp_path / "m95"
    assert main(["init", "--preset", "mert-v1-95m", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["encoder"]["source"] == "m-a-p/MERT-v1-95M" and cfg["encoder"]["stored"] is False
    assert cfg["encoder"]["hubert"]["hidden_size"] == 768
    assert (out / "model.safetensors").stat().st_size < 10_000_000  # heads only
    # scoring offline fails with one clear line, not a traceback
    proc = _run_cli("score", "--model", str(out), str(tmp_path / "x.wav"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "cannot fetch encoder weights 'm-a-p/MERT-v1-95M'" in proc.stderr
    assert cfg["encoder"]["revision"] == "12af15fef9d0ac838c3f475bfbbf26d2060dd4f5"  # pinned
    # a local encoder path that does not exist is refused at init, not recorded as a hub id
    missing = tmp_path / "models" / "MERT-v1-95M"
    assert (
        main(
            [
                "init",
                "--preset",
                "mert-v1-95m",
                "--out",
                str(tmp_path / "m2"),
                "--encoder",
                str(missing),
            ]
        )
        == 1
    )
    assert not (tmp_path / "m2").exists()


def test_help_lists_commands():
    proc = _run_cli("--help")
    assert proc.returncode == 0
    for cmd in ("init", "score", "compare"):
        assert cmd in proc.stdout
    proc = _run_cli("score", "--help")
    assert "--batch-size" in proc.stdout and "--format" in proc.stdout


def test_long_file_is_encoded_in_bounded_batches(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    """A 10-minute 48 kHz stereo file is scored with the encoder
    seeing at most --batch-size segments at a time. Peak RSS is measured by
    benchmarks/long_file_memory.py and recorded in BENCHMARKS.md."""
    sr, seconds = 48000, 600
    t = np.arange(sr * seconds, dtype=np.float32) / sr
    left = 0.3 * np.sin(2 * np.pi * 220.0 * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.5 * t))
    path = tmp_path / "long.wav"
    sf.write(path, np.stack([left, 0.8 * left], axis=1), sr, subtype="PCM_16")
    del t, left
    seen = []
    original = MertEncoder.forward

    def spy(self, audio, valid=None):
        seen.append(audio.shape[0])
        return original(self, audio, valid)

    monkeypatch.setattr(MertEncoder, "forward", spy)
    assert main(["score", "--model", str(tiny_checkpoint), "--batch-size", "4", str(path)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["path"] == str(path) and "scores" in row
    assert sum(seen) == 20 and max(seen) <= 4


def test_import_is_light():
    code = (
        "import sys, apex_reward; "
        "heavy = [m for m in ('transformers', 'trl', 'fastapi', 'uvicorn', 'accelerate', 'pandas', "
        "'sklearn', 'xgboost', 'peft', 'datasets', 'matplotlib') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
