"""Music Arena battle loading: formats, field mapping, the §5 filters and their report."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from apex_reward.training.arena.data import ArenaDataError, load_battles, parse_datetime


def _touch_audio(root: Path, *names: str) -> None:
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"RIFF-not-really-audio-" + n.encode())


def _rec(i: int, pref: str | None = "A", **kw) -> dict:
    r = {
        "battle_uuid": f"b{i}",
        "date": f"2025-09-{1 + i % 28:02d}T12:00:00-04:00",
        "prompt": f"prompt {i}",
        "is_instrumental": i % 2 == 0,
        "audio_a": f"audio_files/01/a{i}.mp3",
        "system_a": "sys-x",
        "audio_b": f"audio_files/01/b{i}.mp3",
        "system_b": "sys-y",
        "preference": pref,
    }
    r.update(kw)
    return r


def test_released_directory_layout_resolves_audio_against_the_dataset_root(tmp_path):
    """battle_data/<period>/<uuid>.json + audio_files/<period>/..., as the HF dataset ships it."""
    root = tmp_path / "music-arena-dataset"
    for i, pref in enumerate(["A", "B", "TIE", "A"]):
        d = root / "battle_data" / "01-2025JULAUG"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"b{i}.json").write_text(json.dumps(_rec(i, pref)))
        _touch_audio(root, f"audio_files/01/a{i}.mp3", f"audio_files/01/b{i}.mp3")
    (root / "metadata").mkdir()
    (root / "metadata" / "01-2025JULAUG.md").write_text("# not battles\n")
    battles, report = load_battles(root)
    assert sorted(b.battle_id for b in battles) == ["b0", "b1", "b3"]
    b1 = next(b for b in battles if b.battle_id == "b1")
    assert b1.audio_a == root / "audio_files/01/a1.mp3" and b1.audio_a.is_file()
    assert b1.preference == "B" and b1.label == 0 and not b1.is_instrumental
    assert b1.system_a == "sys-x" and b1.prompt == "prompt 1"
    assert b1.date == parse_datetime("2025-09-02T16:00:00Z")
    assert report.records == 4 and report.kept == 3
    assert report.removed["not_a_or_b"] == 1
    assert report.preference_counts == {"A": 2, "B": 1, "TIE": 1}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet", "json-list"])
def test_flat_formats_give_the_same_battles(tmp_path, fmt):
    recs = [_rec(i, "AB"[i % 2]) for i in range(6)]
    recs[3]["is_instrumental"] = None  # missing -> vocal, counted
    for r in recs:
        _touch_audio(tmp_path, r["audio_a"], r["audio_b"])
    if fmt == "jsonl":
        path = tmp_path / "battles.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    elif fmt == "json-list":
        path = tmp_path / "battles.json"
        path.write_text(json.dumps(recs))
    elif fmt == "csv":
        path = tmp_path / "battles.csv"
        pd.DataFrame(recs).to_csv(path, index=False)
    else:
        path = tmp_path / "battles.parquet"
        pd.DataFrame(recs).to_parquet(path, index=False)
    battles, report = load_battles(path)
    assert [b.battle_id for b in battles] == [f"b{i}" for i in range(6)]
    assert [b.label for b in battles] == [1, 0, 1, 0, 1, 0]
    assert [b.is_instrumental for b in battles] == [True, False, True, False, True, False]
    assert report.instrumental_unknown == 1
    assert all(b.audio_b == tmp_path / r["audio_b"] for b, r in zip(battles, recs))


def test_every_filter_is_counted_and_bad_records_are_reported_with_line_numbers(tmp_path):
    lines = [
        json.dumps(_rec(0, "A")),  # 1 kept
        json.dumps(_rec(1, "B")),  # 2 kept
        json.dumps(_rec(2, "TIE")),  # 3 not A/B
        json.dumps(_rec(3, "BOTH_BAD")),  # 4 not A/B
        json.dumps(_rec(4, None)),  # 5 no vote -> not A/B
        '{"battle_uuid": "b5", "preference": "A", ',  # 6 malformed JSON line
        json.dumps(_rec(6, "C")),  # 7 unknown preference value
        json.dumps(_rec(0, "B")),  # 8 duplicate id of line 1
        json.dumps(_rec(8, "A", date="2024-01-01T00:00:00Z")),  # 9 outside the window
        json.dumps(_rec(9, "A", audio_b="")),  # 10 audio not released
        json.dumps(_rec(10, "model_b", audio_a="audio_files/01/gone.mp3")),  # 11 missing file
        "",  # blank lines are skipped
        json.dumps(_rec(12, "a", is_instrumental="maybe")),  # 13 bad is_instrumental
        json.dumps(_rec(13, "b", is_instrumental="false")),  # 14 kept
    ]
    path = tmp_path / "battles.jsonl"
    path.write_text("\n".join(lines) + "\n")
    for r in (_rec(i) for i in range(14)):
        _touch_audio(tmp_path, r["audio_a"], r["audio_b"])
    battles, report = load_battles(path, date_from="2025-06-01", date_to="2025-12-31")
    assert [b.battle_id for b in battles] == ["b0", "b1", "b13"]
    assert battles[2].label == 0 and not battles[2].is_instrumental
    assert report.records == 13
    assert report.removed == {
        "bad_record": 3,
        "duplicate_id": 1,
        "not_a_or_b": 3,
        "outside_date_window": 1,
        "audio_not_released": 1,
        "audio_missing": 1,
        "audio_unreadable": 0,
    }
    assert report.kept == 3
    by_line = {i.line: i.problem for i in report.issues}
    assert "malformed JSON line" in by_line[6]
    assert "unknown preference value 'C'" in by_line[7]
    assert "audio file missing" in by_line[11] and "gone.mp3" in by_line[11]
    assert "is_instrumental" in by_line[13]
    assert len(report.issues) == 4
    md = report.to_markdown()
    assert "| **kept** | **3** |" in md and f"{path}:6" in md


def test_field_map_reads_nested_raw_logs_and_rejects_unknown_fields(tmp_path):
    _touch_audio(tmp_path, "x/a.wav", "x/b.wav")
    raw = {
        "uuid": "raw-1",
        "vote": {"preference": "B", "preference_time": 1756700000},
        "a_metadata": {"system_key": {"system_tag": "musicgen-small"}},
        "b_metadata": {"system_key": {"system_tag": "lyria-3-30s"}},
        "prompt_detailed": {"instrumental": "true"},
        "clip_a": "x/a.wav",
        "clip_b": "x/b.wav",
    }
    path = tmp_path / "raw.json"
    path.write_text(json.dumps(raw))
    fmap = {"audio_a": "clip_a", "audio_b": "clip_b", "date": "vote.preference_time"}
    (b,), report = load_battles(path, field_map=fmap)
    assert (b.battle_id, b.preference, b.system_a, b.system_b) == (
        "raw-1",
        "B",
        "musicgen-small",
        "lyria-3-30s",
    )
    assert b.is_instrumental and b.date.year == 2025
    with pytest.raises(ArenaDataError, match="unknown field"):
        load_battles(path, field_map={"winner_side": "x"})


def test_last_days_window_and_audio_root(tmp_path):
    audio = tmp_path / "elsewhere"
    recs = [_rec(i, date=f"2025-{m:02d}-15T00:00:00Z") for i, m in enumerate([3, 6, 8, 9])]
    for r in recs:
        _touch_audio(audio, r["audio_a"], r["audio_b"])
    path = tmp_path / "battles.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    battles, report = load_battles(path, audio_root=audio, last_days=122)
    assert [b.battle_id for b in battles] == ["b1", "b2", "b3"]
    assert report.removed["outside_date_window"] == 1
    assert report.date_window["from"].startswith("2025-05-16")


def test_unreadable_inputs_raise_typed_errors(tmp_path):
    with pytest.raises(ArenaDataError, match="do not exist"):
        load_battles(tmp_path / "nope.jsonl")
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(ArenaDataError, match="unknown battle file type"):
        load_battles(tmp_path / "b.txt")
    with pytest.raises(ArenaDataError, match="not an ISO date"):
        (tmp_path / "c.jsonl").write_text(json.dumps(_rec(0)) + "\n")
        load_battles(tmp_path / "c.jsonl", date_from="last tuesday")
