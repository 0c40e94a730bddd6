"""``apex-reward score`` inputs and outputs: directories, globs and JSONL lists; records with
``duration_s``; CSV ``untrained``; ``-o`` that keeps results when writing fails, keeps the mode
of the file it replaces, writes through symlinks and refuses to overwrite an input;
``--version`` without torch."""

from __future__ import annotations

import csv
import errno
import io
import json
import os
import stat
import subprocess
import sys

import pytest
from conftest import fast_model
from fault_files import write_tone

from apex_reward.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score_io")
    fast_model().save_pretrained(root / "model")
    songs = root / "songs"
    (songs / "deep" / "deeper").mkdir(parents=True)
    write_tone(songs / "a.wav", 1.0, 16000)
    write_tone(songs / "deep" / "b.FLAC", 1.5, 16000, format="FLAC")
    write_tone(songs / "deep" / "deeper" / "c.ogg", 2.0, 16000, format="OGG", subtype="VORBIS")
    (songs / "deep" / "notes.txt").write_text("not audio, not picked up")
    return root


def _score(setup, *args):
    return main(["score", "--model", str(setup / "model"), "--num-workers", "0", *args])


def _records(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_directory_glob_and_jsonl_inputs(setup, tmp_path, capsys):
    songs = setup / "songs"
    assert _score(setup, str(songs)) == 0
    recs = _records(capsys.readouterr().out)
    names = [os.path.relpath(r["path"], songs) for r in recs]
    assert names == ["a.wav", "deep/b.FLAC", "deep/deeper/c.ogg"]
    assert [round(r["duration_s"], 3) for r in recs] == [1.0, 1.5, 2.0]
    assert all(r["untrained"] is True for r in recs)

    assert _score(setup, str(songs / "**" / "*.ogg")) == 0
    assert [r["path"] for r in _records(capsys.readouterr().out)] == [
        str(songs / "deep" / "deeper" / "c.ogg")
    ]

    listing = tmp_path / "list.jsonl"
    rel = os.path.relpath(songs / "a.wav", tmp_path)
    listing.write_text(
        json.dumps({"path": rel}) + "\n\n" + json.dumps({"path": str(songs / "nope.wav")}) + "\n"
    )
    assert _score(setup, str(listing)) == 1  # one input is missing
    recs = _records(capsys.readouterr().out)
    assert recs[0]["path"] == str(tmp_path / rel) and "scores" in recs[0]
    assert recs[1]["error_type"] == "AudioDecodeError"

    listing.write_text('{"file": "a.wav"}\n')
    assert _score(setup, str(listing)) == 1
    assert 'list.jsonl:1: expected an object with a "path"' in capsys.readouterr().err


def test_csv_has_untrained_column(setup, capsys):
    assert _score(setup, str(setup / "songs" / "a.wav"), "--format", "csv") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows[0]["untrained"] == "true" and rows[0]["error"] == ""


def test_output_keeps_mode_and_writes_through_symlinks(setup, tmp_path, capsys):
    wav = str(setup / "songs" / "a.wav")
    private = tmp_path / "private.jsonl"
    private.write_text("old\n")
    private.chmod(0o600)
    assert _score(setup, wav, "-o", str(private)) == 0
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert _records(private.read_text())[0]["path"] == wav

    target = tmp_path / "real.jsonl"
    target.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    assert _score(setup, wav, "-o", str(link)) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert _records(target.read_text())[0]["path"] == wav


def test_output_that_is_an_input_is_refused(setup, tmp_path, capsys):
    wav = tmp_path / "x.wav"
    write_tone(wav, 1.0, 16000)
    before = wav.read_bytes()
    assert _score(setup, str(wav), "-o", str(wav)) == 1
    assert "is also an input" in capsys.readouterr().err
    assert wav.read_bytes() == before
    assert _score(setup, str(tmp_path), "-o", str(wav)) == 1  # found by a directory search
    assert wav.read_bytes() == before


def test_write_failure_keeps_results_on_stdout(setup, tmp_path, capsys, monkeypatch):
    import apex_reward.files

    def disk_full(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(apex_reward.files.os, "replace", disk_full)
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert _score(setup, str(setup / "songs" / "a.wav"), "-o", str(out)) == 1
    captured = capsys.readouterr()
    assert "could not write" in captured.err and "No space left on device" in captured.err
    assert "on stdout instead" in captured.err
    assert "scores" in _records(captured.out)[0]
    assert out.read_text() == "previous results\n"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temporary left


def test_version_does_not_import_torch():
    code = (
        "import sys\nfrom apex_reward.cli import main\nassert main(['--version']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("apex-reward ")
