"""The GPU fast path (issue 8): its CPU-testable parts here, its GPU parity tests marked `gpu`."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.model import _bucket


def _songs(seconds=(3.0, 7.0, 40.0), sr=24000):
    return [torch.from_numpy(synth_music(s, sr, seed=i)[0]) for i, s in enumerate(seconds)]


def test_bucket_sizes():
    assert [_bucket(n, 32) for n in (1, 2, 3, 5, 9, 17, 32)] == [1, 2, 4, 8, 16, 32, 32]
    assert _bucket(7, 6) == 6


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


@gpu
def test_gpu_fast_path_is_default_and_matches_fp32(cuda_models):
    ref, fast = cuda_models
    x = [s.cuda() for s in _songs((5.0, 12.0, 35.0, 61.0))]
    with torch.inference_mode():
        a = ref(x, 24000).scores
        b = fast(x, 24000).scores
    assert fast.fast_path is None and fast._fast_applied and fast.encoder.compiled
    assert fast.encoder_dtype == torch.bfloat16 and ref.encoder_dtype == torch.float32
    for name in a:
        assert torch.allclose(b[name], a[name], rtol=1e-2), (name, a[name], b[name])


@gpu
def test_gpu_fast_path_batch_invariance(cuda_models):
    _, fast = cuda_models
    x = [s.cuda() for s in _songs((5.0, 6.0, 7.0, 8.0))]
    with torch.inference_mode():
        together = fast(x, 24000, segment_batch_size=4).reward
        alone = torch.cat([fast([s], 24000, segment_batch_size=4).reward for s in x])
    # alone: bucket of 1; together: bucket of 4 -> different kernels, bf16 rounding at most
    assert torch.allclose(together, alone, rtol=2e-3)


@gpu
def test_gpu_fast_path_gradient(cuda_models):
    _, fast = cuda_models
    wav = torch.from_numpy(synth_music(4.0, 44100, 2, seed=3))[None].cuda().requires_grad_(True)
    fast(wav, 44100).reward.sum().backward()
    assert torch.isfinite(wav.grad).all() and wav.grad.abs().sum() > 0
