"""The one model loader: ModelOptions, load_model, device resolution, flattened option flags."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass, field

import pytest
import torch

from apex_reward import ConfigError, ModelOptions, load_model
from apex_reward.cli import main
from apex_reward.dataclass_io import (
    add_dataclass_arguments,
    dataclass_from_args,
    from_dict,
    to_dict,
)
from apex_reward.loading import resolve_device


@dataclass
class _Job:
    """A job config embedding the model options, as every command's config does."""

    model: ModelOptions = field(
        default_factory=ModelOptions, metadata={"flatten": True, "help": "the model"}
    )
    batch_size: int = field(default=8, metadata={"help": "segments per call"})


def _parse(argv: list[str], config_file: str | None = None) -> _Job:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, _Job)
    args = parser.parse_args(argv + (["--config", config_file] if config_file else []))
    return dataclass_from_args(_Job, args)


def test_flattened_options_are_top_level_flags():
    job = _parse(["--model", "ckpt", "--device", "cpu", "--dtype", "fp32", "--batch-size", "4"])
    assert job.model == ModelOptions(model="ckpt", device="cpu", dtype="fp32")
    assert job.batch_size == 4


def test_flattened_options_in_config_files_flat_nested_or_a_path(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"model": "ckpt", "device": "cpu", "encoder": "/m"}))
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"model": {"model": "ckpt", "device": "cpu", "encoder": "/m"}}))
    expected = ModelOptions(model="ckpt", device="cpu", encoder="/m")
    assert _parse([], str(flat)).model == expected
    assert _parse([], str(nested)).model == expected
    # a flag overrides the file field by field
    assert _parse(["--dtype", "bf16"], str(flat)).model.dtype == "bf16"
    assert _parse(["--dtype", "bf16"], str(flat)).model.encoder == "/m"
    # to_dict -> from_dict round trip
    job = _parse([], str(flat))
    assert from_dict(_Job, to_dict(job)) == job


def test_flattened_options_are_validated():
    with pytest.raises(ConfigError, match="dtype"):
        from_dict(_Job, {"model": "ckpt", "dtype": "int8"})
    with pytest.raises(ConfigError, match="unknown field"):
        from_dict(_Job, {"model": {"model": "ckpt", "colour": "red"}})
    with pytest.raises(ConfigError, match="model"):
        from_dict(_Job, {"model": 3})


def test_coerce_and_require_model():
    assert ModelOptions.coerce("ckpt") == ModelOptions(model="ckpt")
    opts = ModelOptions(model="x", dtype="fp16")
    assert ModelOptions.coerce(opts) is opts
    with pytest.raises(ConfigError, match="--model is required"):
        ModelOptions().require_model()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a torch device"):
        resolve_device("gpu0")
    with pytest.raises(ConfigError, match="unsupported device type"):
        resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_one_line(tiny_checkpoint, tmp_path, capsys):
    with pytest.raises(ConfigError, match="use --device cpu"):
        resolve_device("cuda")
    wav = tmp_path / "a.wav"
    import soundfile as sf

    sf.write(wav, torch.zeros(24000).numpy() + 0.1, 24000)
    code = main(["score", str(wav), "--model", str(tiny_checkpoint), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.strip().count("\n") == 0, err  # one line, no traceback
    assert "--device cuda" in err and "--device cpu" in err


def test_load_model_device_dtype_and_one_untrained_warning(tiny_checkpoint, caplog):
    with caplog.at_level(logging.WARNING, logger="apex_reward"):
        model = load_model(ModelOptions(model=str(tiny_checkpoint), device="cpu", dtype="bf16"))
    assert model.device.type == "cpu"
    assert model.encoder_dtype == torch.bfloat16 and model.fast_path is True
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    untrained = [r for r in caplog.records if "UNTRAINED" in r.getMessage()]
    assert len(untrained) == 1 and str(tiny_checkpoint) in untrained[0].getMessage()
    exact = load_model(ModelOptions(model=str(tiny_checkpoint), device="cpu", dtype="fp32"))
    assert exact.encoder_dtype == torch.float32 and exact.fast_path is False


# ----------------------------------------------------------------------------------------------
# every entry point loads through the one loader


class _Loaded(BaseException):
    """Stops a command right after its model is loaded (not an Exception: no handler eats it)."""


@pytest.fixture
def loads(monkeypatch):
    """Records (device type, encoder dtype, fast path, name) of each model a job loads."""
    import apex_reward.loading as loading

    seen: list[tuple] = []
    original = loading.warn_if_untrained

    def record(model, name, *, heads=True):
        original(model, name, heads=heads)
        seen.append((model.device.type, model.encoder_dtype, model.fast_path, name, heads))
        raise _Loaded

    monkeypatch.setattr(loading, "warn_if_untrained", record)
    return seen


def _job_inputs(tmp_path, checkpoint) -> dict[str, list[str]]:
    """The arguments (besides the model options) each command needs to reach its model."""
    import soundfile as sf
    from conftest import synth_music

    wav = tmp_path / "a.wav"
    sf.write(wav, synth_music(2.0, 24000)[0], 24000)
    candidates = tmp_path / "candidates.jsonl"
    candidates.write_text(json.dumps({"prompt": "p", "candidates": [str(wav), str(wav)]}) + "\n")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"id,audio_path\nsong-1,{wav}\n")
    (tmp_path / "battles").mkdir()
    return {
        "score": ["score", str(wav)],
        "compare": ["compare", str(wav), str(wav)],
        "pairs": [
            "pairs",
            "--candidates",
            str(candidates),
            "--out",
            str(tmp_path / "pairs"),
            "--allow-audio-paths",  # the candidates are the audio itself
        ],
        "serve": ["serve", "--no-warmup"],
        "arena": ["arena", "--battles", str(tmp_path / "battles"), "--out", str(tmp_path / "a")],
        "extract": ["extract", "--manifest", str(manifest), "--out", str(tmp_path / "emb")],
    }


def test_every_command_loads_through_the_same_options(tiny_checkpoint, tmp_path, loads, caplog):
    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    options = ["--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "bf16"]
    jobs = _job_inputs(tmp_path, tiny_checkpoint)
    with caplog.at_level(logging.WARNING, logger="apex_reward"):
        for args in jobs.values():
            with pytest.raises(_Loaded):
                main(args + options)
        with pytest.raises(_Loaded):
            ApexRewardFunction(
                ModelOptions(model=str(tiny_checkpoint), device="cpu", dtype="bf16")
            ).load()
    loaded = ("cpu", torch.bfloat16, True, str(tiny_checkpoint))
    # extraction runs only the encoder: an untrained base checkpoint is its normal input
    expected = [(*loaded, name != "extract") for name in jobs] + [(*loaded, True)]
    assert loads == expected
    untrained = [r for r in caplog.records if "UNTRAINED" in r.getMessage()]
    assert len(untrained) == len(jobs)  # the same one warning, once per job that scores
    assert len({r.getMessage() for r in untrained}) == 1
