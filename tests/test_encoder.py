"""The MERT encoder on stock HubertModel (docs/model.md#encoder)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from apex_reward import CheckpointError, EncoderConfig
from apex_reward.encoder import MertEncoder, build_hubert


def _official_layout_state_dict(model) -> dict[str, torch.Tensor]:
    """Rewrite a HubertModel state dict the way MERT's released checkpoints store it:
    top-level HubertModel keys, positional-conv weight norm as legacy weight_g / weight_v."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    prefix = "encoder.pos_conv_embed.conv."
    sd[prefix + "weight_g"] = sd.pop(prefix + "parametrizations.weight.original0")
    sd[prefix + "weight_v"] = sd.pop(prefix + "parametrizations.weight.original1")
    return sd


def _write_mert_dir(directory: Path, sd: dict[str, torch.Tensor], fmt: str) -> Path:
    directory.mkdir(parents=True)
    # the released config names the remote-code class; it must not be needed
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mert_model",
                "architectures": ["MERTModel"],
                "auto_map": {"AutoModel": "modeling_MERT.MERTModel"},
            }
        )
    )
    if fmt == "safetensors":
        save_file(sd, str(directory / "model.safetensors"))
    else:
        torch.save(sd, directory / "pytorch_model.bin")
    return directory


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_official_mert_layout_loads_into_tiny_encoder(tmp_path, fmt):
    cfg = EncoderConfig.from_preset("tiny")
    torch.manual_seed(1)
    source = build_hubert(cfg).eval()
    sd = _official_layout_state_dict(source)
    assert "encoder.pos_conv_embed.conv.weight_g" in sd
    mert_dir = _write_mert_dir(tmp_path / "mert", sd, fmt)

    cfg_loaded = EncoderConfig.from_preset("tiny", source=str(mert_dir))
    enc = MertEncoder.from_pretrained(cfg_loaded)  # raises on any missing/unexpected key
    x = torch.randn(2, 24000 * 3)
    with torch.no_grad():
        ref = source(x, output_hidden_states=True)
        got = enc.model(x, output_hidden_states=True)
    for a, b in zip(ref.hidden_states, got.hidden_states):
        assert torch.equal(a, b)
    for name, p in source.state_dict().items():
        assert torch.equal(p, enc.model.state_dict()[name]), name


def test_mismatched_weights_are_reported(tmp_path):
    torch.manual_seed(0)
    sd = build_hubert(EncoderConfig.from_preset("tiny")).state_dict()
    sd.pop("encoder.layers.1.final_layer_norm.weight")
    sd["extra.weight"] = torch.zeros(3)
    mert_dir = _write_mert_dir(tmp_path / "bad", sd, "safetensors")
    with pytest.raises(CheckpointError) as exc:
        MertEncoder.from_pretrained(EncoderConfig.from_preset("tiny", source=str(mert_dir)))
    msg = str(exc.value)
    assert "missing keys" in msg and "final_layer_norm" in msg
    assert "unexpected keys" in msg and "extra.weight" in msg


def test_hub_source_offline_gives_clear_error():
    cfg = EncoderConfig.from_preset("mert-v1-95m")
    assert cfg.source == "m-a-p/MERT-v1-95M"
    with pytest.raises(
        CheckpointError, match="cannot fetch encoder weights 'm-a-p/MERT-v1-95M'.*--encoder PATH"
    ):
        MertEncoder.from_pretrained(cfg)


def test_missing_local_source(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        MertEncoder.from_pretrained(
            EncoderConfig.from_preset("tiny", source=str(tmp_path / "nope"))
        )


def test_hub_snapshot_records_resolved_commit(tmp_path, monkeypatch):
    """A hub id resolves through snapshot_download; the commit it resolved to is recorded."""
    torch.manual_seed(0)
    sd = build_hubert(EncoderConfig.from_preset("tiny")).state_dict()
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = _write_mert_dir(tmp_path / "models--org--mert" / "snapshots" / commit, sd, "safetensors")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(snap)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    cfg = EncoderConfig.from_preset("tiny", source="org/mert", revision="v1")
    MertEncoder.from_pretrained(cfg)
    assert calls[0][:2] == ("org/mert", "v1") and "*.safetensors" in calls[0][2]
    assert cfg.revision == commit


def test_released_presets_pin_their_hub_commit(tmp_path, monkeypatch):
    """The MERT presets fetch a fixed commit unless told otherwise (docs/model.md#weights-and-revisions: pin a
    revision); a checkpoint config without a revision gets the pin, another source does not."""
    import re

    from apex_reward.presets import ENCODER_PRESETS

    for name in ("mert-v1-95m", "mert-v1-330m"):
        cfg = EncoderConfig.from_preset(name)
        assert re.fullmatch(r"[0-9a-f]{40}", cfg.revision), name
        assert cfg.revision == ENCODER_PRESETS[name]["revision"]
        assert EncoderConfig.from_preset(name, revision="main").revision == "main"
        assert EncoderConfig.from_preset(name, source="/models/mert").revision is None
        # an older config.json that recorded no revision loads with the pin
        assert EncoderConfig(preset=name, source=ENCODER_PRESETS[name]["source"]).revision == (
            cfg.revision
        )
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision))
        raise OSError("offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError):
        MertEncoder.from_pretrained(EncoderConfig.from_preset("mert-v1-95m"))
    assert calls[0] == ("m-a-p/MERT-v1-95M", ENCODER_PRESETS["mert-v1-95m"]["revision"])


def test_encoder_is_frozen_but_passes_gradient_to_input():
    enc = MertEncoder(EncoderConfig.from_preset("tiny"))
    assert not any(p.requires_grad for p in enc.parameters())
    enc.train()  # a parent's .train() must not switch on dropout / SpecAugment masking
    assert not enc.model.training
    x = torch.randn(2, 24000 * 2, requires_grad=True)
    out = enc(x, torch.tensor([48000, 30000]))
    assert out.shape == (2, 4, 64)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pooling_selects_layers_and_valid_frames():
    torch.manual_seed(0)
    enc = MertEncoder(EncoderConfig.from_preset("tiny"))
    x = torch.randn(1, 24000 * 2)
    with torch.no_grad():
        hs = enc.model(x, output_hidden_states=True).hidden_states
        pooled = enc(x, torch.tensor([24000]))
    n = int(enc.frame_lengths(torch.tensor([24000]))[0])
    assert n == 74
    for j, layer in enumerate(enc.config.layers):
        assert torch.allclose(pooled[0, j], hs[layer][0, :n].mean(0), atol=1e-6)


def test_mert_presets_build_the_documented_architecture():
    for preset, hidden, layers in [("mert-v1-95m", 768, 12), ("mert-v1-330m", 1024, 24)]:
        cfg = EncoderConfig.from_preset(preset)
        with torch.device("meta"):
            model = build_hubert(cfg)
        assert model.config.hidden_size == hidden and model.config.num_hidden_layers == layers
        assert model.config.feat_extract_norm == "group" and model.config.conv_bias is False
        assert cfg.layers == (3, 6, 9, -1)
    assert EncoderConfig.from_preset("mert-v1-330m").hubert["do_stable_layer_norm"] is True
