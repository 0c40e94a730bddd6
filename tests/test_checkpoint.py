"""Checkpoints: config.json + model.safetensors round trips, and clear errors when they are damaged."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import synth_music

from apex_reward import ApexConfig, ApexRewardModel, CheckpointError, ConfigError
from apex_reward.encoder import build_hubert


def _audio():
    return [torch.from_numpy(synth_music(s, 44100, 2, seed=s)) for s in (2, 7, 33)]


def test_round_trip_gives_identical_outputs(tiny_model, tiny_checkpoint):
    """save_pretrained -> from_pretrained gives identical outputs."""
    loaded = ApexRewardModel.from_pretrained(tiny_checkpoint)
    with torch.inference_mode():
        a = tiny_model(_audio(), 44100)
        b = loaded(_audio(), 44100)
    for name in a.scores:
        assert torch.equal(a.scores[name], b.scores[name]), name
    assert loaded.config.to_dict() == {
        **tiny_model.config.to_dict(),
        "encoder": {**tiny_model.config.to_dict()["encoder"], "stored": True},
    }
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]


def test_config_records_what_reproduces_a_score(tiny_checkpoint):
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert cfg["format_version"] == 1 and cfg["untrained"] is True
    assert cfg["frontend"]["normalize"] is True and cfg["frontend"]["sample_rate"] == 24000
    assert cfg["encoder"]["layers"] == [0, 1, 2, -1]
    assert cfg["encoder"]["hubert"]["hidden_size"] == 64
    assert cfg["head"] == {
        "trunk_layers": 2,
        "tasks": "full",
        "mode": "song",
        "head_hidden": 64,
        "trunk_dropout": 0.3,
        "head_dropout": 0.1,
        "condition": None,
    }
    assert cfg["reward_weights"] == {"overall": 1.0}
    assert "popularity_reference" in cfg and len(cfg["weights_sha256"]) == 64


def test_hub_options_reach_the_download_of_a_referenced_encoder(tmp_path, tiny_model, monkeypatch):
    """``from_pretrained(..., token=, cache_dir=, local_files_only=)`` applies to the encoder a
    checkpoint references by hub id as well as to the checkpoint: an offline user's cache
    directory is the one searched for the MERT weights too."""
    import huggingface_hub

    snap = tmp_path / "models--org--mert" / "snapshots" / ("1" * 40)
    tiny_model.encoder.model.save_pretrained(snap)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **hub):
        calls.append((repo_id, hub))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg = ApexConfig.from_dict({**tiny_model.config.to_dict()})
    cfg.encoder.source, cfg.encoder.revision = "org/mert", "1" * 40
    model = ApexRewardModel(cfg, tiny_model.encoder)
    model.head.load_state_dict(tiny_model.head.state_dict())
    model.save_pretrained(tmp_path / "ref", include_encoder=False)
    loaded = ApexRewardModel.from_pretrained(
        tmp_path / "ref", cache_dir=tmp_path / "cache", local_files_only=True, token="t"
    )
    assert calls and all(repo == "org/mert" for repo, _ in calls)
    assert calls[0][1] == {
        "token": "t",
        "cache_dir": tmp_path / "cache",
        "local_files_only": True,
    }
    with torch.inference_mode():
        assert torch.equal(loaded(_audio(), 44100).reward, tiny_model(_audio(), 44100).reward)


def test_referenced_encoder_loads_from_its_source(tmp_path, tiny_model):
    """A checkpoint that references its encoder (not stored) loads it from source + revision."""
    src = tmp_path / "mert"
    tiny_model.encoder.model.save_pretrained(src)  # a local MERT directory
    cfg = ApexConfig.from_dict({**tiny_model.config.to_dict()})
    cfg.encoder.source, cfg.encoder.revision = str(src), "0" * 40
    model = ApexRewardModel(cfg, tiny_model.encoder)
    model.head.load_state_dict(tiny_model.head.state_dict())
    model.save_pretrained(tmp_path / "ref", include_encoder=False)
    saved = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert saved["encoder"]["stored"] is False and saved["encoder"]["source"] == str(src)
    loaded = ApexRewardModel.from_pretrained(tmp_path / "ref")
    with torch.inference_mode():
        assert torch.equal(loaded(_audio(), 44100).reward, tiny_model(_audio(), 44100).reward)
    # the source can be overridden (e.g. a local copy when offline)
    moved = tmp_path / "moved"
    shutil.move(src, moved)
    with pytest.raises(CheckpointError, match="no such directory"):
        ApexRewardModel.from_pretrained(tmp_path / "ref")
    reloaded = ApexRewardModel.from_pretrained(tmp_path / "ref", encoder_source=str(moved))
    # the recorded revision belonged to the recorded source; the override has none
    assert reloaded.config.encoder.source == str(moved)
    assert reloaded.config.encoder.revision is None


def test_random_encoder_cannot_be_saved_by_reference(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="include_encoder=True"):
        tiny_model.save_pretrained(tmp_path / "x", include_encoder=False)


def _copy(tiny_checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    return d


def test_truncated_weights(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="checksum mismatch .*truncated or was modified"):
        ApexRewardModel.from_pretrained(d)
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors"):
        ApexRewardModel.from_pretrained(d, verify=False)


def test_tampered_weights(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    w = d / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside a tensor: still a valid safetensors file
    w.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        ApexRewardModel.from_pretrained(d)


def test_weights_that_do_not_match_the_config(tiny_checkpoint, tmp_path):
    d = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["head"]["trunk_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="head weights do not match config.json"):
        ApexRewardModel.from_pretrained(d)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda c: c["head"].update(mode="bars"),
            r"config.head.mode: 'bars' is not one of \['song', 'segment'\]",
        ),
        (lambda c: c.update(colour="red"), r"config: unknown field\(s\) \['colour'\]"),
        (
            lambda c: c["frontend"].update(normalize="yes"),
            "config.frontend.normalize: expected true/false",
        ),
        (lambda c: c["encoder"].update(layers=[0, 99]), "layer 99 does not exist"),
        (lambda c: c.update(format_version=99), "newer than this apex-reward"),
        (
            lambda c: c["frontend"].update(sample_rate="24k"),
            "config.frontend.sample_rate: expected an integer",
        ),
    ],
)
def test_config_with_a_wrong_field(tiny_checkpoint, tmp_path, mutate, message):
    d = _copy(tiny_checkpoint, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    mutate(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message) as exc:
        ApexRewardModel.from_pretrained(d)
    assert "config.json" in str(exc.value)


def test_missing_files(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ApexRewardModel.from_pretrained(tmp_path / "nothing-here")
    d = _copy(tiny_checkpoint, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors is missing"):
        ApexRewardModel.from_pretrained(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError):
        ApexRewardModel.from_pretrained(d)


def test_no_pickle_in_checkpoints(tiny_checkpoint):
    data = (tiny_checkpoint / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    assert header["__metadata__"]["format"] == "pt"
    assert all(k.startswith(("head.", "encoder.")) for k in header if k != "__metadata__")
    assert all(v["dtype"] in ("F64", "I64") for k, v in header.items() if k.startswith("head."))


def test_stored_encoder_weights_are_exact(tiny_model, tiny_checkpoint):
    loaded = ApexRewardModel.from_pretrained(tiny_checkpoint)
    ref = tiny_model.encoder.model.state_dict()
    for k, v in loaded.encoder.model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert set(ref) == set(build_hubert(tiny_model.config.encoder).state_dict())


def test_saving_is_reproducible_across_processes(tmp_path, tiny_checkpoint):
    """The same weights saved by two processes give byte-identical files (safetensors used to
    write its metadata in a per-process random order, so checksums of equal models differed and
    cached embeddings were rejected at random); the encoder digest ignores the heads."""
    import subprocess
    import sys

    code = (
        "import sys; from apex_reward import ApexRewardModel; "
        "ApexRewardModel.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])"
    )
    for name in ("a", "b", "c"):
        subprocess.run(
            [sys.executable, "-c", code, str(tiny_checkpoint), str(tmp_path / name)],
            check=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    blobs = {(tmp_path / n / "model.safetensors").read_bytes() for n in "abc"}
    assert len(blobs) == 1
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert len(cfg["encoder_sha256"]) == 64
    # other heads, same encoder: the whole-file checksum changes, the encoder digest does not
    model = ApexRewardModel.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        next(model.head.parameters()).add_(1.0)
    model.save_pretrained(tmp_path / "d")
    other = json.loads((tmp_path / "d" / "config.json").read_text())
    assert other["weights_sha256"] != cfg["weights_sha256"]
    assert other["encoder_sha256"] == cfg["encoder_sha256"]


def test_load_time_mistakes_are_named(tmp_path, tiny_checkpoint, monkeypatch):
    """--encoder on a checkpoint that stores its encoder is an error, not silently ignored; a
    mistyped local path next to an existing folder is not sent to the hub."""
    with pytest.raises(ConfigError, match="stores its encoder weights"):
        ApexRewardModel.from_pretrained(tiny_checkpoint, encoder_source="/models/MERT-v1-95M")
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match="'runs/nothere' does not exist.*hf-hub:runs/nothere"):
        ApexRewardModel.from_pretrained("runs/nothere")
