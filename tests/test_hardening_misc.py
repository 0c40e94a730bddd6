"""Small rough edges: removed.csv names the id of an invalid row that has one; a required
option's help does not also say "(default: unset)"."""

from __future__ import annotations

import pandas as pd
from fault_files import write_tone

from apex_reward.cli import build_parser


def test_removed_csv_keeps_the_id_of_invalid_rows(tmp_path):
    from apex_reward.training.prepare import PrepareConfig, prepare_corpus

    rows = []
    for i in range(12):
        write_tone(tmp_path / f"s{i}.wav", 1.5, 16000, freq=220 + 20 * i)
        platform = "suno" if i % 2 else "udio"
        rows.append(
            {
                "id": f"s{i}",
                "platform": platform,
                "audio_path": f"s{i}.wav",
                "streams": 10 + i,
                "likes": i,
                "created_at": "2024-01-01",
            }
        )
    rows[3]["streams"] = -1  # invalid, has an id
    rows[5]["id"] = ""  # invalid, no id
    pd.DataFrame(rows).to_csv(tmp_path / "m.csv", index=False)
    prepare_corpus(
        PrepareConfig(
            manifest=str(tmp_path / "m.csv"),
            out=str(tmp_path / "prep"),
            snapshot_date="2025-01-01",
            audio_check="header",
            workers=1,
            balance=False,
        )
    )
    removed = pd.read_csv(tmp_path / "prep" / "removed.csv", keep_default_na=False)
    invalid = removed[removed["filter"] == "invalid_row"].set_index("row")
    assert invalid.loc[5, "id"] == "s3"  # csv row 5 = data row 4 (header is row 1)
    assert invalid.loc[7, "id"] == ""


def test_required_option_help_has_no_unset_default():
    parser = build_parser("pairs")
    sub = next(a for a in parser._actions if a.dest == "command").choices["pairs"]
    text = sub.format_help()
    assert "(required)" in text and "(required) (default: unset)" not in " ".join(text.split())
