"""Checkpoint faults: every malformed config.json is a ConfigError or CheckpointError, a
checkpoint without a checksum needs ``trust_unverified``, and a relative encoder source is
resolved against (and kept inside) the checkpoint folder."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
from conftest import fast_model

from apex_reward import ApexRewardModel
from apex_reward.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint storing its encoder, and one referencing ``./encoder`` inside itself."""
    root = tmp_path_factory.mktemp("ckpts")
    model = fast_model()
    model.save_pretrained(root / "stored")
    ref = root / "referenced"
    model.encoder.model.save_pretrained(ref / "encoder")  # config.json + model.safetensors
    model.config.encoder.source = "./encoder"
    model.config.encoder.stored = False
    model.save_pretrained(ref, include_encoder=False)
    return root


def _copy(saved, tmp_path, which="stored"):
    d = tmp_path / which
    shutil.copytree(saved / which, d)
    return d


def _edit(d, change):
    cfg = json.loads((d / "config.json").read_text())
    change(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def test_missing_checksum_needs_trust_unverified(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit(d, lambda c: c.pop("weights_sha256"))
    with pytest.raises(CheckpointError, match="has no weights_sha256.*trust_unverified=True"):
        ApexRewardModel.from_pretrained(d)
    model = ApexRewardModel.from_pretrained(d, trust_unverified=True)
    assert model.config.frontend.segment_seconds == 2.0


@pytest.mark.parametrize(
    "name, raw, error, match",
    [
        ("not utf-8", b'{"frontend": "\xff\xfe"}', CheckpointError, "not UTF-8"),
        ("deep nesting", b"[" * 100_000 + b"]" * 100_000, CheckpointError, "nested too deeply"),
        ("a list", b"[1, 2]", ConfigError, "expected a JSON object"),
    ],
)
def test_unreadable_config_json_is_typed(saved, tmp_path, name, raw, error, match):
    d = _copy(saved, tmp_path)
    (d / "config.json").write_bytes(raw)
    with pytest.raises(error, match=match):
        ApexRewardModel.from_pretrained(d)


@pytest.mark.parametrize(
    "section, key, value, match",
    [
        ("head", "head_hidden", -1, "head_hidden"),
        ("head", "head_hidden", 10**12, "head_hidden"),
        ("head", "trunk_dropout", 1.5, "trunk_dropout"),
        ("frontend", "segment_seconds", 1e-9, "segment_seconds"),
        ("frontend", "segment_seconds", "NaN", "non-finite number NaN"),
        ("frontend", "segment_seconds", "Infinity", "non-finite number Infinity"),
    ],
)
def test_invalid_config_values_are_config_errors(saved, tmp_path, section, key, value, match):
    d = _copy(saved, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg[section][key] = "@@" if isinstance(value, str) else value
    text = json.dumps(cfg)
    if isinstance(value, str):  # a bare NaN/Infinity token, as Python's json writes it
        text = text.replace('"@@"', value)
    (d / "config.json").write_text(text)
    with pytest.raises(ConfigError, match=match):
        ApexRewardModel.from_pretrained(d)


def test_relative_encoder_source_resolves_against_the_checkpoint(saved, tmp_path, monkeypatch):
    d = _copy(saved, tmp_path, "referenced")
    monkeypatch.chdir(tmp_path.parent)  # not the checkpoint folder
    model = ApexRewardModel.from_pretrained(d)
    assert model.config.encoder.source == str((d / "encoder").resolve())


def test_relative_encoder_source_must_stay_inside(saved, tmp_path):
    d = _copy(saved, tmp_path, "referenced")
    shutil.copytree(d / "encoder", tmp_path / "outside")
    _edit(d, lambda c: c["encoder"].__setitem__("source", "../outside"))
    with pytest.raises(CheckpointError, match="leads outside the checkpoint folder"):
        ApexRewardModel.from_pretrained(d)


def test_pickled_encoder_weights_are_refused_without_unpickling(saved, tmp_path):
    d = _copy(saved, tmp_path, "referenced")
    (d / "encoder" / "model.safetensors").unlink()
    (d / "encoder" / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    with pytest.raises(CheckpointError) as info:
        ApexRewardModel.from_pretrained(d)
    assert "weights_only=False" not in str(info.value)
    assert "pytorch_model.bin" in str(info.value) or "encoder" in str(info.value)
