"""The GPU fast path: its CPU-testable parts here, its GPU parity tests marked `gpu`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, synth_music

from apex_reward import ApexRewardModel, fast_kernels
from apex_reward.config import EncoderConfig
from apex_reward.encoder import MertEncoder
from apex_reward.precision import bucket_size


def _songs(seconds=(3.0, 7.0, 40.0), sr=24000):
    return [torch.from_numpy(synth_music(s, sr, seed=i)[0]) for i, s in enumerate(seconds)]


def test_bucket_sizes():
    assert [bucket_size(n, 32) for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert bucket_size(7, 6) == 6


def test_fast_path_off_restores_exact_float32(tmp_path):
    model = make_tiny_model(seed=4)
    x = _songs()
    with torch.inference_mode():
        ref = model(x, 24000).reward
        model.set_fast_path(True, dtype="bf16", compile=False)
        assert model.encoder_dtype == torch.bfloat16 and model.bucket_batches
        fast = model(x, 24000).reward
        # saving while the fast path is on writes the exact float32 encoder weights
        model.save_pretrained(tmp_path / "ckpt")
        model.set_fast_path(False)
        assert model.encoder_dtype == torch.float32 and not model.bucket_batches
        back = model(x, 24000).reward
    assert torch.equal(back, ref)
    assert torch.allclose(fast, ref, rtol=5e-2)
    loaded = ApexRewardModel.from_pretrained(tmp_path / "ckpt", fast=False)
    with torch.inference_mode():
        assert torch.equal(loaded(x, 24000).reward, ref)


def test_fast_path_is_automatic_only_on_cuda():
    model = make_tiny_model(seed=5)
    with torch.inference_mode():
        model(_songs((2.0,)), 24000)
    assert model.fast_path is None and model.encoder_dtype == torch.float32  # CPU: untouched


def test_bucketed_batches_keep_a_song_independent_of_its_batch():
    """Padding segment batches to fixed sizes: a song scores the same alone or with others."""
    model = make_tiny_model(seed=6)
    model.set_fast_path(True, dtype="fp32", compile=False)
    x = _songs((2.0, 3.0, 4.0))
    with torch.inference_mode():
        together = model(x, 24000, segment_batch_size=4).reward
        alone = torch.cat([model([s], 24000, segment_batch_size=4).reward for s in x])
    assert torch.allclose(together, alone, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradient():
    model = make_tiny_model(seed=7)
    wav = torch.from_numpy(synth_music(3.0, 44100, 2, seed=1))[None]
    grads = []
    for enabled in (False, True):
        model.encoder.set_activation_checkpointing(enabled)
        x = wav.clone().requires_grad_(True)
        model(x, 44100).reward.sum().backward()
        grads.append(x.grad)
    model.encoder.set_activation_checkpointing(False)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-9)
    assert "forward" not in model.encoder.model.encoder.layers[0].__dict__
    assert set(model.encoder.model.state_dict()) == set(
        make_tiny_model(seed=7).encoder.model.state_dict()
    )


@pytest.mark.parametrize("samples", [24000, 24007, 9600])
def test_fast_kernels_equal_the_stock_forwards_in_float64(samples):
    """GEMM feature extractor and FFT positional convolution: same values and gradients as the
    stock HubertModel submodules (float64, so any difference is a bug, not rounding); segment
    lengths that are not a multiple of the total stride (320) included."""
    torch.manual_seed(samples)
    model = MertEncoder(EncoderConfig.from_preset("tiny")).double().model
    assert fast_kernels.unsupported_reason(model) is None
    x = torch.randn(3, samples, dtype=torch.float64, requires_grad=True)
    stock = model.feature_extractor(x)
    fast = fast_kernels.feature_encoder_forward(model.feature_extractor, x)
    assert fast.shape == stock.shape
    torch.testing.assert_close(fast, stock, rtol=1e-10, atol=1e-10)
    probe = torch.randn_like(stock)
    (g_stock,) = torch.autograd.grad((stock * probe).sum(), x)
    (g_fast,) = torch.autograd.grad((fast * probe).sum(), x)
    torch.testing.assert_close(g_fast, g_stock, rtol=1e-9, atol=1e-12)

    pos = model.encoder.pos_conv_embed
    h = torch.randn(2, 41, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    stock, fast = pos(h), fast_kernels.positional_conv_forward(pos, h)
    torch.testing.assert_close(fast, stock, rtol=1e-9, atol=1e-9)
    probe = torch.randn_like(stock)
    (g_stock,) = torch.autograd.grad((stock * probe).sum(), h)
    (g_fast,) = torch.autograd.grad((fast * probe).sum(), h)
    torch.testing.assert_close(g_fast, g_stock, rtol=1e-9, atol=1e-9)


def test_fast_kernels_in_the_encoder_and_with_checkpointing():
    enc = MertEncoder(EncoderConfig.from_preset("tiny"))
    x = torch.randn(3, 48000)
    valid = torch.tensor([48000, 20000, 3000])
    probe = torch.randn(len(enc.layers), enc.hidden_size)

    def run():
        xg = x.clone().requires_grad_(True)
        out = enc(xg, valid)
        (out * probe).sum().backward()
        return out.detach(), xg.grad

    ref_out, ref_grad = run()
    enc.set_fast_kernels(True)
    assert "forward" in enc.model.feature_extractor.__dict__
    for checkpointing in (False, True):
        enc.set_activation_checkpointing(checkpointing)
        out, grad = run()
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            grad, ref_grad, rtol=1e-3, atol=1e-4 * ref_grad.abs().max().item()
        )
    enc.set_activation_checkpointing(False)
    enc.set_fast_kernels(False)
    assert "forward" not in enc.model.feature_extractor.__dict__
    assert "forward" not in enc.model.encoder.pos_conv_embed.__dict__


def test_fast_kernels_fall_back_for_configs_they_do_not_implement(caplog):
    cfg = EncoderConfig.from_preset("tiny")
    cfg.hubert["feat_extract_norm"] = "layer"
    enc = MertEncoder(cfg)
    assert "feat_extract_norm" in fast_kernels.unsupported_reason(enc.model)
    with caplog.at_level("INFO"):
        enc.set_fast_kernels(True)
    assert not enc.fast_kernels and "forward" not in enc.model.feature_extractor.__dict__
    assert "fast encoder kernels not used" in caplog.text

    class Wrapped(torch.nn.Module):  # e.g. an adapter around a convolution
        def __init__(self, conv):
            super().__init__()
            self.base = conv

    enc = MertEncoder(EncoderConfig.from_preset("tiny"))
    layer = enc.model.feature_extractor.conv_layers[2]
    layer.conv = Wrapped(layer.conv)
    assert "wrapped" in fast_kernels.unsupported_reason(enc.model)


# ----------------------------------------------------------------------------------------------
# GPU parity (run on the device machine: pytest -m gpu)

gpu = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_models():
    torch.manual_seed(0)
    ref = make_tiny_model(seed=8).to("cuda")
    ref.fast_path = False
    fast = make_tiny_model(seed=8).to("cuda")  # fast path turns itself on at the first call
    return ref, fast


def _close(a, b, rtol):
    """Elementwise |a - b| <= rtol * |b| (plus a hair of the score's spread for values at 0)."""
    return torch.allclose(a, b, rtol=rtol, atol=1e-3 * rtol * float(b.abs().max()))


@gpu
def test_gpu_fast_path_is_default_and_matches_fp32(cuda_models):
    ref, fast = cuda_models
    x = [s.cuda() for s in _songs((5.0, 12.0, 35.0, 61.0))]
    with torch.inference_mode():
        a = ref(x, 24000).scores
        b = fast(x, 24000).scores
    assert fast.fast_path is None and fast._fast_applied and fast.encoder.fast_kernels
    assert fast.encoder_dtype == torch.float16 and ref.encoder_dtype == torch.float32
    for name in a:
        assert _close(b[name], a[name], 1e-2), (name, a[name], b[name])


@gpu
@pytest.mark.parametrize("dtype,compiled,rtol", [("bf16", False, 5e-2), ("fp16", True, 1e-2)])
def test_gpu_fast_path_other_modes(dtype, compiled, rtol):
    ref = make_tiny_model(seed=9).to("cuda")
    ref.fast_path = False
    fast = make_tiny_model(seed=9).to("cuda").set_fast_path(True, dtype=dtype, compile=compiled)
    x = [s.cuda() for s in _songs((5.0, 33.0))]
    with torch.inference_mode():
        a, b = ref(x, 24000).scores, fast(x, 24000).scores
    assert fast.encoder.compiled == compiled
    for name in a:
        assert _close(b[name], a[name], rtol), (name, a[name], b[name])


@gpu
def test_gpu_fast_path_batch_invariance(cuda_models):
    _, fast = cuda_models
    x = [s.cuda() for s in _songs((5.0, 6.0, 7.0, 8.0))]
    with torch.inference_mode():
        together = fast(x, 24000, segment_batch_size=4).reward
        alone = torch.cat([fast([s], 24000, segment_batch_size=4).reward for s in x])
    # alone: bucket of 1; together: bucket of 4 -> different GEMM tilings, fp16 rounding at most
    assert torch.allclose(together, alone, rtol=2e-3)


@gpu
def test_gpu_fast_path_gradient(cuda_models):
    """After inference-mode calls (which switched the fast path on), the differentiable reward
    still works and its waveform gradient points where the float32 one does."""
    ref, fast = cuda_models
    wav = torch.from_numpy(synth_music(4.0, 44100, 2, seed=3))[None].cuda()
    grads = []
    for model in (ref, fast):
        x = wav.clone().requires_grad_(True)
        model(x, 44100).reward.sum().backward()
        grads.append(x.grad.flatten())
    assert torch.isfinite(grads[1]).all() and grads[1].abs().sum() > 0
    cos = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert cos > 0.99, cos


def test_set_precision_is_the_one_switch(caplog):
    """`--dtype` of the CLIs and the server: auto/fp32 exact on CPU, fp16/bf16 cast (with a
    warning on the CPU), bad names rejected; fp32 switches the fast path off for good (no
    automatic switch-on later)."""
    from apex_reward.errors import ConfigError

    model = make_tiny_model(seed=10)
    model.set_precision("auto")
    assert model.fast_path is False and model.encoder_dtype == torch.float32
    assert not caplog.records
    model.set_precision("bf16")
    assert model.encoder_dtype == torch.bfloat16 and model.encoder.fast_kernels
    assert "dtype bf16 on the CPU" in caplog.text
    model.set_precision("fp32")
    assert model.encoder_dtype == torch.float32 and model.fast_path is False
    assert not model.encoder.fast_kernels
    with pytest.raises(ConfigError, match="unknown dtype 'fp8'"):
        model.set_precision("fp8")
