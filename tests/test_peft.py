"""LoRA adapters on the MERT encoder: only adapters train, they are saved
with the checkpoint and rebuilt by ``from_pretrained``, and merging gives a plain checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synth_music

from apex_reward import ApexConfig, ApexRewardModel, FrontendConfig
from apex_reward.checkpoint import read_checkpoint, save_checkpoint
from apex_reward.config import LoraAdapterConfig
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.integrations.lora import add_lora, has_lora, lora_parameters, merge_lora

SR = 16000


pytestmark = pytest.mark.usefixtures("one_thread")


def fast_model(seed: int = 0) -> ApexRewardModel:
    torch.manual_seed(seed)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend = FrontendConfig(segment_seconds=2.0, min_duration_s=0.5)
    return ApexRewardModel.from_config(cfg, encoder="random")


def clips(n: int = 3) -> list[torch.Tensor]:
    return [torch.from_numpy(synth_music(1.0 + 0.5 * i, SR, seed=i)[0]) for i in range(n)]


def rewards(model: ApexRewardModel, audio) -> torch.Tensor:
    with torch.no_grad():
        return model(audio, SR).reward


@pytest.fixture(scope="module")
def trained():
    """A model whose LoRA adapter took three optimiser steps (training mode) on the reward."""
    model = fast_model()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, r=4, alpha=8)
    opt = torch.optim.Adam(lora_parameters(model), lr=0.05)
    model.eval()
    model.encoder.train()  # LoRA / SpecAugment on; the frozen head keeps its BatchNorm stats
    audio = clips(2)
    for _ in range(3):
        loss = -model(audio, SR).reward.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), frozen


def test_only_adapter_parameters_train(trained):
    model, frozen = trained
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    assert len(lora_parameters(model)) == 2 * 2 * 2  # (q, v) x (A, B) x 2 layers
    # every base weight and buffer (head BatchNorm statistics included) is unchanged
    state = model.state_dict()
    for key, before in frozen.items():
        key_now = key.replace("q_proj.", "q_proj.base_layer.").replace(
            "v_proj.", "v_proj.base_layer."
        )
        assert torch.equal(state[key_now], before), key
    # the adapters moved (B starts at zero, so any change of the output comes from training)
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B." in n)
    fresh = fast_model()
    assert not torch.allclose(rewards(model, clips()), rewards(fresh, clips()))


def test_train_mode_follows_the_trainable_flag():
    model = fast_model()
    model.train()
    assert not model.encoder.model.training  # frozen encoder stays in eval mode
    add_lora(model, r=2, train_head=True)
    model.train()
    assert model.encoder.model.training and model.encoder.trainable
    assert all(p.requires_grad for p in model.head.parameters())
    model.encoder.freeze()
    model.train()
    assert not model.encoder.model.training
    assert not any(p.requires_grad for p in model.encoder.parameters())


def test_save_load_reproduces_scores(trained, tmp_path):
    model, _ = trained
    audio = clips()
    expected = rewards(model, audio)
    model.save_pretrained(tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "config.json").read_text())
    assert cfg["encoder"]["lora"] == {
        "r": 4,
        "alpha": 8.0,
        "dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"],
    }
    _, tensors, _ = read_checkpoint(tmp_path / "lora")
    adapter = [k for k in tensors if k.startswith("encoder_lora.")]
    assert len(adapter) == 8 and all(".lora_" in k for k in adapter)
    assert not any("base_layer" in k or ".default." in k for k in tensors)
    loaded = ApexRewardModel.from_pretrained(tmp_path / "lora")
    assert has_lora(loaded.encoder) and not loaded.encoder.trainable
    assert not any(p.requires_grad for p in loaded.parameters())
    assert torch.equal(rewards(loaded, audio), expected)
    # scores through the batched API agree too
    assert [r.reward for r in loaded.score([(a, SR) for a in audio])] == pytest.approx(
        expected.tolist(), abs=1e-6
    )
    resumed = ApexRewardModel.from_pretrained(tmp_path / "lora", freeze=False)
    assert resumed.encoder.trainable and all(p.requires_grad for p in lora_parameters(resumed))


def test_adapter_only_checkpoint_with_a_referenced_encoder(tmp_path):
    """With MERT weights from a source (hub id or dir), the checkpoint holds only head + adapter."""
    base = fast_model(seed=3)
    base.encoder.model.save_pretrained(tmp_path / "mert")  # stands in for m-a-p/MERT-v1-95M
    base.config.encoder.source = str(tmp_path / "mert")
    add_lora(base, r=2)
    with torch.no_grad():
        for p in lora_parameters(base):
            p.normal_(0, 0.05)
    base.save_pretrained(tmp_path / "ckpt", include_encoder=False)
    _, tensors, _ = read_checkpoint(tmp_path / "ckpt")
    assert not any(k.startswith("encoder.") for k in tensors)
    assert sum(k.startswith("encoder_lora.") for k in tensors) == 8
    loaded = ApexRewardModel.from_pretrained(tmp_path / "ckpt")
    audio = clips(2)
    assert torch.equal(rewards(loaded, audio), rewards(base.eval(), audio))


def test_merge_gives_a_plain_checkpoint(trained, tmp_path):
    model, _ = trained
    model.save_pretrained(tmp_path / "lora")
    lora = ApexRewardModel.from_pretrained(tmp_path / "lora")
    audio = clips()
    expected = rewards(lora, audio)
    merged = merge_lora(lora)
    assert not has_lora(merged.encoder) and merged.config.encoder.lora is None
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(rewards(merged, audio), expected, rtol=0, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    cfg = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert cfg["encoder"]["lora"] is None and cfg["encoder"]["stored"] is True
    assert cfg["encoder"]["source"] is None
    assert cfg["training"]["encoder_lora_merged"]["lora"]["r"] == 4
    _, tensors, _ = read_checkpoint(tmp_path / "merged")
    assert not any("lora" in k for k in tensors)
    again = ApexRewardModel.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(rewards(again, audio), expected, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="no source"):
        merged.save_pretrained(tmp_path / "ref", include_encoder=False)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        merge_lora(merged)


def test_bad_adapters_are_reported(trained, tmp_path):
    model = fast_model()
    with pytest.raises(ConfigError, match="not linear layers"):
        add_lora(model, target_modules=("query",))
    add_lora(model, r=2)
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        add_lora(model)
    with pytest.raises(ConfigError, match="lora.r"):
        add_lora(fast_model(), r=0)
    # an adapter the config does not record (or the reverse) is not saved half-way
    model.config.encoder.lora = None
    with pytest.raises(ConfigError, match="does not record"):
        model.save_pretrained(tmp_path / "unrecorded")
    plain = fast_model()
    plain.config.encoder.lora = LoraAdapterConfig()
    with pytest.raises(ConfigError, match="has no adapter"):
        plain.save_pretrained(tmp_path / "noadapter")
    # a checkpoint whose adapter tensors do not match its config
    trained[0].save_pretrained(tmp_path / "ok")
    raw, tensors, _ = read_checkpoint(tmp_path / "ok")
    dropped = sorted(k for k in tensors if k.startswith("encoder_lora."))[0]
    save_checkpoint(tmp_path / "bad", raw, {k: v for k, v in tensors.items() if k != dropped})
    with pytest.raises(CheckpointError, match="LoRA adapter weights do not match"):
        ApexRewardModel.from_pretrained(tmp_path / "bad")
    raw["encoder"]["lora"] = None
    save_checkpoint(tmp_path / "nocfg", raw, tensors)
    with pytest.raises(CheckpointError, match="LoRA weights without encoder.lora"):
        ApexRewardModel.from_pretrained(tmp_path / "nocfg")


def test_missing_peft_names_the_extra(monkeypatch):
    import sys

    from apex_reward.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'apex-reward\[trl\]'"):
        add_lora(fast_model(), r=2)
