"""LoRA adapters in PEFT's own layout (``adapter_config.json`` + ``adapter_model.safetensors``):
PEFT reads what APEX writes, and APEX reloads it with equal outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import fast_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.integrations.lora import (
    add_lora,
    has_lora,
    load_adapter,
    lora_parameters,
    save_adapter,
)
from apex_reward.lora import PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

pytestmark = pytest.mark.usefixtures("one_thread")

SR = 24000


def clips() -> list[torch.Tensor]:
    return [torch.from_numpy(synth_music(1.5, SR, seed=s)[0]) for s in (1, 2)]


@pytest.fixture(scope="module")
def adapted():
    """A model with a LoRA adapter whose weights are not the identity (random lora_B), the
    plain HubertModel it was built on, and a checkpoint saved from it."""
    model = fast_model(seed=0)
    base = copy.deepcopy(model.encoder.model)
    add_lora(model, r=4, alpha=8, target_modules=("q_proj", "v_proj", "out_proj"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.encoder.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval(), base


def test_save_pretrained_writes_peft_layout_that_peft_reads(adapted, tmp_path):
    import peft

    model, base = adapted
    model.save_pretrained(tmp_path)
    assert (tmp_path / PEFT_CONFIG_NAME).is_file() and (tmp_path / PEFT_WEIGHTS_NAME).is_file()
    cfg = peft.PeftConfig.from_pretrained(str(tmp_path))
    assert cfg.peft_type == peft.PeftType.LORA
    assert (cfg.r, cfg.lora_alpha) == (4, 8)
    assert set(cfg.target_modules) == {"q_proj", "v_proj", "out_proj"}
    # PEFT's own loader rebuilds the adapter on the plain encoder: the same hidden states
    peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    x = torch.randn(2, 16000)
    with torch.no_grad():
        ours = model.encoder.model(x).last_hidden_state
        theirs = peft_model(x).last_hidden_state
        plain = base(x).last_hidden_state
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (plain - ours).abs().max() > 1e-3  # the adapter changes the output


def test_apex_reloads_a_peft_adapter_with_equal_outputs(adapted, tmp_path):
    model, _ = adapted
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        PEFT_CONFIG_NAME,
        PEFT_WEIGHTS_NAME,
    ]
    fresh = fast_model(seed=0)  # the same base weights, no adapter
    load_adapter(fresh, tmp_path / "adapter")
    got, want = fresh.config.encoder.lora, model.config.encoder.lora
    assert has_lora(fresh.encoder) and (got.r, got.alpha) == (want.r, want.alpha)
    assert set(got.target_modules) == set(want.target_modules)  # PEFT stores a set
    assert lora_parameters(fresh) and not any(p.requires_grad for p in lora_parameters(fresh))
    audio = clips()
    with torch.no_grad():
        torch.testing.assert_close(fresh(audio, SR).reward, model(audio, SR).reward)
    # it is then an ordinary adapted model: its checkpoint reloads through from_pretrained
    fresh.save_pretrained(tmp_path / "ckpt")
    again = ApexRewardModel.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(again(audio, SR).reward, model(audio, SR).reward)


def test_bad_peft_adapters_are_reported(adapted, tmp_path):
    model, _ = adapted
    with pytest.raises(CheckpointError, match="adapter_config.json is missing"):
        load_adapter(fast_model(), tmp_path)
    with pytest.raises(ConfigError, match="already has a LoRA adapter"):
        load_adapter(model, tmp_path)
    d = save_adapter(model, tmp_path / "dora")
    cfg = json.loads((d / PEFT_CONFIG_NAME).read_text())
    (d / PEFT_CONFIG_NAME).write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(CheckpointError, match="use_dora"):
        load_adapter(fast_model(), d)
    d = save_adapter(model, tmp_path / "rank")
    cfg = json.loads((d / PEFT_CONFIG_NAME).read_text())
    (d / PEFT_CONFIG_NAME).write_text(json.dumps(dict(cfg, r=8)))
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_adapter(fast_model(), d)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        save_adapter(fast_model(), tmp_path / "none")
