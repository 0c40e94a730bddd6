"""The AST encoder option: torch filterbank parity, gradients to the waveform, official-layout
weights, and ``init --preset ast-tiny`` through scoring, extraction + training, the TRL reward
function and the server."""

from __future__ import annotations

import dataclasses
import io
import json
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_music

from apex_reward import ApexConfig, ApexRewardModel, load_audio
from apex_reward.ast_encoder import AstEncoder, build_ast
from apex_reward.cli import main
from apex_reward.config import EncoderConfig
from apex_reward.errors import CheckpointError, ConfigError
from apex_reward.filterbank import LogMelFilterbank
from apex_reward.loading import ModelOptions, load_model

#: Largest |torch filterbank - ASTFeatureExtractor| allowed, in normalised log-mel units (the
#: features have a spread of about 0.3 there); measured at most 2.3e-4 on the shared clips.
FILTERBANK_TOLERANCE = 1e-3


@pytest.mark.filterwarnings("ignore:At least one mel filter:UserWarning")
def test_filterbank_matches_the_ast_feature_extractor(shared_audio):
    import julius
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor()
    fbank = LogMelFilterbank()
    worst = 0.0
    for i, path in enumerate(shared_audio):
        sr = sf.info(str(path)).samplerate
        wave, _ = sf.read(str(path), frames=int(sr * 10.5), dtype="float32", always_2d=True)
        clip = julius.resample_frac(torch.from_numpy(wave.mean(1)), sr, 16000).numpy()
        # a whole 10.24 s segment (when the clip is that long); for two clips a shorter one too
        for n in (163840, 100000) if i < 2 else (163840,):
            seg = clip[:n].astype(np.float32)
            ref = extractor(seg, sampling_rate=16000, return_tensors="np")["input_values"][0]
            padded = torch.zeros(1, 163840)
            padded[0, : len(seg)] = torch.from_numpy(seg)
            ours = fbank(padded, torch.tensor([len(seg)]))[0].numpy()
            assert ours.shape == ref.shape == (1024, 128)
            worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < FILTERBANK_TOLERANCE, worst


@pytest.fixture(scope="module")
def ast_model() -> ApexRewardModel:
    torch.manual_seed(0)
    return ApexRewardModel.from_config(ApexConfig.from_preset("ast-tiny"), encoder="random")


def test_ast_tiny_config_and_gradient_reaches_the_waveform(ast_model):
    cfg = ast_model.config
    assert cfg.encoder.family == "ast" and cfg.frontend.sample_rate == 16000
    assert isinstance(ast_model.encoder, AstEncoder)
    wave = torch.from_numpy(synth_music(2.0, 16000, 1, seed=1)).requires_grad_(True)
    out = ast_model([wave], 16000)
    out.reward.sum().backward()
    assert wave.grad is not None and torch.isfinite(wave.grad).all()
    assert wave.grad.abs().sum() > 0
    # layer pooling follows encoder.layers: one feature row per selected hidden state
    feats = ast_model.encode([wave.detach()], 16000)
    assert feats.layer_features.shape[1:] == (4, 64)
    one = AstEncoder(dataclasses.replace(cfg.encoder, layers=(1,)))  # only hidden state 1
    one.model.load_state_dict(ast_model.encoder.model.state_dict())
    seg = torch.from_numpy(synth_music(2.0, 16000, 1, seed=2))[0][None]
    both = ast_model.encoder(seg, torch.tensor([seg.shape[1]]))
    assert torch.allclose(one(seg, torch.tensor([seg.shape[1]]))[:, 0], both[:, 1])
    # padding after the clip does not change its pooled features
    longer = torch.nn.functional.pad(seg, (0, 30000))
    assert torch.allclose(ast_model.encoder(longer, torch.tensor([seg.shape[1]])), both, atol=1e-5)
    # an AST encoder at another rate than 16 kHz is refused
    bad = cfg.to_dict()
    bad["frontend"]["sample_rate"] = 24000
    with pytest.raises(ConfigError, match="16 kHz"):
        ApexConfig.from_dict(bad)


def test_ast_presets_scale_segments_to_a_fixed_level_so_gain_does_not_reach_the_encoder(
    ast_model,
):
    """AST reads absolute levels (a log-mel filterbank), so the presets scale each segment to
    -20 dBFS first: turning the input down changes nothing but float rounding, while the same
    encoder fed the raw waveform (``normalize=False``) moves with the gain."""
    cfg = ast_model.config.frontend
    assert cfg.normalize and cfg.normalize_level_db == -20.0
    x = torch.from_numpy(synth_music(3.0, 16000, 1, seed=3))[0]
    quiet = x * 10.0 ** (-20.0 / 20.0)
    same = ast_model.encode([x, quiet], 16000).layer_features
    assert torch.allclose(same[0], same[1], atol=1e-4 * float(same.abs().max()))
    raw = ApexRewardModel.from_config(
        dataclasses.replace(ast_model.config, frontend=dataclasses.replace(cfg, normalize=False)),
        encoder=ast_model.encoder,
    )
    moved = raw.encode([x, quiet], 16000).layer_features
    assert (moved[0] - moved[1]).abs().max() > 100 * (same[0] - same[1]).abs().max()


_LEGACY_NAMES = [  # the key names the hub checkpoints store (ASTForAudioClassification)
    (r"^layers\.(\d+)\.attention\.q_proj", r"encoder.layer.\1.attention.attention.query"),
    (r"^layers\.(\d+)\.attention\.k_proj", r"encoder.layer.\1.attention.attention.key"),
    (r"^layers\.(\d+)\.attention\.v_proj", r"encoder.layer.\1.attention.attention.value"),
    (r"^layers\.(\d+)\.attention\.o_proj", r"encoder.layer.\1.attention.output.dense"),
    (r"^layers\.(\d+)\.mlp\.fc1", r"encoder.layer.\1.intermediate.dense"),
    (r"^layers\.(\d+)\.mlp\.fc2", r"encoder.layer.\1.output.dense"),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
]


def _write_official(model, directory, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Save ``model`` as the hub repository stores it: ``audio_spectrogram_transformer.``-prefixed
    legacy key names plus the 527-class AudioSet classifier, in model.safetensors."""
    from safetensors.torch import save_file

    tensors = {}
    for key, value in model.state_dict().items():
        for pattern, repl in _LEGACY_NAMES:
            key, n = re.subn(pattern, repl, key)
            if n:
                break
        tensors[f"audio_spectrogram_transformer.{key}"] = value.contiguous()
    h = model.config.hidden_size
    tensors.update(
        {
            "classifier.layernorm.weight": torch.ones(h),
            "classifier.layernorm.bias": torch.zeros(h),
            "classifier.dense.weight": torch.zeros(527, h),
            "classifier.dense.bias": torch.zeros(527),
        }
    )
    tensors.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict()))


def test_official_layout_checkpoint_loads_without_missing_or_unexpected_keys(tmp_path):
    cfg = EncoderConfig.from_preset("ast-audioset", source=str(tmp_path / "ast"))
    torch.manual_seed(0)
    source = build_ast(cfg)  # the official architecture (86M parameters), random weights
    _write_official(source, tmp_path / "ast")
    enc = AstEncoder.from_pretrained(cfg)  # raises on any missing/unexpected/mismatched key
    loaded, ref = enc.model.state_dict(), source.state_dict()
    assert loaded.keys() == ref.keys()
    assert all(torch.equal(loaded[k], ref[k]) for k in ref)
    del source, enc, loaded, ref

    tiny = EncoderConfig.from_preset("ast-tiny", source=str(tmp_path / "tiny"))
    _write_official(build_ast(tiny), tmp_path / "tiny", {"stray.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match="unexpected keys: \\['stray.weight'\\]"):
        AstEncoder.from_pretrained(tiny)


def test_init_full_ast_preset_references_the_pinned_hub_weights(tmp_path):
    out = tmp_path / "ast"
    assert main(["init", "--preset", "ast-audioset", "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    enc = cfg["encoder"]
    assert enc["source"] == "MIT/ast-finetuned-audioset-10-10-0.4593" and not enc["stored"]
    assert enc["revision"] == "f826b80d28226b62986cc218e5cec390b1096902"
    assert enc["family"] == "ast" and cfg["frontend"]["sample_rate"] == 16000


def _wav_bytes(seconds: float, sr: int, seed: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth_music(seconds, sr, 1, seed=seed).T, sr, format="WAV")
    return buf.getvalue()


def test_init_ast_tiny_scores_trains_and_serves(tmp_path, capsys):
    import httpx
    from server_harness import ThreadServer

    from apex_reward.integrations.serving.app import create_app
    from apex_reward.integrations.serving.config import ServeConfig
    from apex_reward.training.extract import ExtractConfig, run_extraction
    from apex_reward.training.prepare import PrepareConfig, prepare_corpus
    from apex_reward.training.synthetic import SynthConfig, generate_corpus
    from apex_reward.training.trainer import TrainConfig, train

    base = tmp_path / "base"
    assert main(["init", "--preset", "ast-tiny", "--out", str(base), "--seed", "1"]) == 0
    clip = tmp_path / "clip.wav"
    clip.write_bytes(_wav_bytes(2.5, 22050, seed=3))
    capsys.readouterr()
    assert main(["score", "--model", str(base), "--format", "jsonl", str(clip)]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[0])
    assert np.isfinite(scored["reward"]), scored

    synth = SynthConfig(
        out=str(tmp_path / "corpus"),
        num_songs=24,
        min_seconds=1.5,
        max_seconds=3.0,
        seed=4,
        sample_rates=[16000, 22050],
        suno_fraction=0.5,
        unreadable_fraction=0.0,
    )
    corpus = generate_corpus(synth, progress=False)
    prepare_corpus(
        PrepareConfig(
            manifest=corpus["manifest"],
            out=str(tmp_path / "prepared"),
            snapshot_date=synth.snapshot_date,
            workers=1,
            split=[0.7, 0.15, 0.15],
            seed=0,
        ),
        progress=False,
    )
    prepared = str(tmp_path / "prepared" / "prepared.parquet")
    ext = run_extraction(
        ExtractConfig(
            manifest=prepared,
            model=ModelOptions(model=str(base), device="cpu"),
            out=str(tmp_path / "emb"),
            num_workers=1,
            batch_size=8,
        ),
        progress=False,
    )
    assert ext["songs_failed"] == 0, ext
    result = train(
        TrainConfig(
            embeddings=str(tmp_path / "emb"),
            prepared=prepared,
            model=str(base),
            out=str(tmp_path / "train"),
            epochs=5,
            batch_size=64,
            device="cpu",
            log_with="none",
            resume=False,
        ),
        progress=False,
    )
    assert result.finished and len(result.history) == 5
    assert np.isfinite(result.metrics["test"]["streams"]["pearson"])
    trained = load_model(ModelOptions(model=str(result.checkpoint), device="cpu"))
    assert trained.config.encoder.family == "ast" and not trained.untrained
    wave, sr = load_audio(clip)
    with torch.no_grad():
        local = {k: v.item() for k, v in trained([wave], sr).scores.items()}
    assert all(np.isfinite(v) for v in local.values())

    # TRL calls its reward functions with keyword arguments, completions as the decoder gave them
    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    fn = ApexRewardFunction(trained, score="overall", guard="off")
    got = fn(
        prompts=["a song"], completions=[str(clip)], completion_ids=[[1, 2]], trainer_state=None
    )
    assert abs(got[0] - local["overall"]) <= 1e-5

    app = create_app(trained, ServeConfig(warmup=False))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        r = http.post(
            "/v1/score",
            content=clip.read_bytes(),
            headers={"Content-Type": "audio/wav", "X-Audio-Name": "clip.wav"},
        )
        assert r.status_code == 200, r.text
        served = r.json()["scores"]  # (its reward passes the server's guard: compare scores)
        assert served.keys() == local.keys()
        assert all(abs(served[k] - local[k]) <= 1e-5 * max(1.0, abs(local[k])) for k in local)
