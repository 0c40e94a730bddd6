"""Typed configs: strict JSON/YAML round trips and CLI flags generated from dataclasses."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from typing import Literal

import pytest

from apex_reward import ApexConfig, ConfigError
from apex_reward.dataclass_io import (
    add_dataclass_arguments,
    dataclass_from_args,
    from_dict,
    to_dict,
)


@dataclass
class JobConfig:
    name: str = field(default="run", metadata={"help": "run name"})
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    epochs: int = field(default=10, metadata={"help": "epochs"})
    layers: tuple[int, ...] = field(default=(2,), metadata={"help": "layers"})
    mode: Literal["song", "segment"] = field(default="song", metadata={"help": "mode"})
    fp16: bool = field(default=True, metadata={"help": "mixed precision"})
    out: str | None = field(default=None, metadata={"help": "output"})
    weights: dict[str, float] = field(default_factory=dict, metadata={"help": "weights"})


def test_apex_config_json_round_trip():
    cfg = ApexConfig.from_preset("mert-v1-330m", trunk_layers=3, tasks="popularity", mode="segment")
    data = json.loads(json.dumps(cfg.to_dict()))
    again = ApexConfig.from_dict(data)
    assert again == cfg
    assert again.encoder.layers == (3, 6, 9, -1) and isinstance(again.encoder.layers, tuple)
    assert again.score_names == ("streams", "likes", "popularity", "overall")


def test_strict_parsing_names_the_field():
    with pytest.raises(ConfigError, match=r"JobConfig.epochs: expected an integer, got 'ten'"):
        from_dict(JobConfig, {"epochs": "ten"})
    with pytest.raises(ConfigError, match=r"JobConfig.layers\[1\]: expected an integer"):
        from_dict(JobConfig, {"layers": [1, "x"]})
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['lrr'\]"):
        from_dict(JobConfig, {"lrr": 1})
    assert from_dict(JobConfig, {"lr": 1}).lr == 1.0  # ints are valid floats
    with pytest.raises(ConfigError, match="expected true/false"):
        from_dict(JobConfig, {"fp16": 1})


def test_cli_flags_layer_over_config_file(tmp_path):
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, JobConfig)
    help_text = parser.format_help()
    assert "--lr LR" in help_text and "learning rate (default: 0.001)" in help_text
    assert "--no-fp16" in help_text
    yaml_file = tmp_path / "job.yaml"
    yaml_file.write_text("name: from-file\nepochs: 3\nmode: segment\n")
    args = parser.parse_args(
        [
            "--config",
            str(yaml_file),
            "--epochs",
            "5",
            "--layers",
            "1",
            "2",
            "--no-fp16",
            "--weights",
            '{"a": 0.5}',
        ]
    )
    cfg = dataclass_from_args(JobConfig, args)
    assert cfg == JobConfig(
        name="from-file", epochs=5, layers=(1, 2), mode="segment", fp16=False, weights={"a": 0.5}
    )
    assert to_dict(cfg)["layers"] == [1, 2]
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "bars"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        dataclass_from_args(JobConfig, parser.parse_args(["--config", str(bad)]))
