"""Shared fixtures: a tiny random MERT-shaped model, synthetic music, the shared real clips.

Tests need no network, no GPU and no downloaded weights (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import io
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from apex_reward import ApexConfig, ApexRewardModel, FrontendConfig  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_AUDIO = Path(os.environ.get("APEX_SHARED_AUDIO", REPO.parent / "shared" / "audio"))
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus", ".mp3")


@pytest.fixture
def one_thread():
    """One intra-op thread for modules of tiny models (``pytestmark =
    pytest.mark.usefixtures("one_thread")``): at 32-64 wide, threads only add synchronisation,
    which on shared CPU cores costs up to 40x (measured: 8-token generation 1.9 s with 2 threads,
    0.05 s with 1). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def accelerate_launch(num_processes: int) -> list[str]:
    """``accelerate launch`` on CPU with ``num_processes`` gloo processes, running
    ``python -m apex_reward``: append the subcommand and its arguments."""
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "apex_reward",
    ]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def synth_music(
    seconds: float, sample_rate: int = 24000, channels: int = 1, seed: int = 0
) -> np.ndarray:
    """A short procedural piece (chords + melody + percussive noise), ``[channels, samples]``."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    out = np.zeros(n)
    beat = 60.0 / rng.uniform(80, 140)
    for k in range(int(seconds / beat) + 1):
        start = int(k * beat * sample_rate)
        if start >= n:
            break
        end = min(n, start + int(beat * sample_rate))
        tt = t[start:end] - t[start]
        f0 = 220.0 * 2 ** (rng.integers(0, 12) / 12)
        env = np.exp(-3.0 * tt)
        out[start:end] += 0.3 * env * np.sin(2 * np.pi * f0 * tt)
        out[start:end] += 0.15 * env * np.sin(2 * np.pi * f0 * 1.5 * tt)
        hit = min(end, start + int(0.03 * sample_rate))
        out[start:hit] += 0.2 * rng.standard_normal(hit - start)
    out = np.tanh(out)
    chans = [out * (1.0 - 0.1 * c) for c in range(channels)]
    return np.stack(chans).astype(np.float32)


@pytest.fixture(scope="session")
def tiny_config() -> ApexConfig:
    return ApexConfig.from_preset("tiny")


def make_tiny_model(seed: int = 0, **head) -> ApexRewardModel:
    """A tiny random model whose BatchNorm statistics are calibrated on synthetic music, so that
    (like a trained model) its scores spread over their ranges instead of sitting at the midpoint."""
    torch.manual_seed(seed)
    model = ApexRewardModel.from_config(ApexConfig.from_preset("tiny", **head), encoder="random")
    songs = [
        torch.from_numpy(synth_music(2.0 + (i % 3), 24000, seed=100 + i)[0]) for i in range(16)
    ]
    with torch.no_grad():
        feats = model.encode(songs, 24000)
        emb = model.head.embed(feats.layer_features)
        for m in model.head.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.momentum = None  # cumulative average over the calibration pass
        model.head.train()
        model.head.predict(emb)
    return model.eval()


def fast_model(seed: int = 0) -> ApexRewardModel:
    """Tiny random model with 2 s segments (each clip costs one 2 s encoder segment)."""
    torch.manual_seed(seed)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend = FrontendConfig(segment_seconds=2.0, min_duration_s=0.5)
    return ApexRewardModel.from_config(cfg, encoder="random")


@pytest.fixture(scope="session")
def tiny_model() -> ApexRewardModel:
    return make_tiny_model()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model) -> Path:
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    tiny_model.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def shared_audio() -> list[Path]:
    if not SHARED_AUDIO.is_dir():
        pytest.skip(f"shared real audio clips not found at {SHARED_AUDIO} (set APEX_SHARED_AUDIO)")
    files = sorted(p for p in SHARED_AUDIO.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES)
    if not files:
        pytest.skip(f"no audio files in {SHARED_AUDIO}")
    return files


def write_bad_files(directory: Path) -> dict[str, Path]:
    """Bad inputs: empty, truncated FLAC and WAV, text named .mp3, NaN WAV, 0.1 s, peak 3e38,
    7 Hz."""
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    files["empty"] = directory / "empty.wav"
    files["empty"].write_bytes(b"")

    def first_third(name: str, rate: int, **fmt) -> Path:
        """A file cut off at a third of its bytes (an interrupted download)."""
        buf = io.BytesIO()
        sf.write(buf, synth_music(4.0, rate).T, rate, **fmt)
        data = buf.getvalue()
        (directory / name).write_bytes(data[: len(data) // 3])
        return directory / name

    files["truncated"] = first_third("truncated.flac", 44100, format="FLAC")
    files["text"] = directory / "notes.mp3"
    files["text"].write_text("these are not the droids you are looking for\n" * 20)
    nan = synth_music(3.0, 22050)
    nan[0, 1000:1010] = np.nan
    files["nan"] = directory / "nan.wav"
    sf.write(files["nan"], nan.T, 22050, subtype="FLOAT")
    files["short"] = directory / "short.wav"
    sf.write(files["short"], synth_music(0.1, 16000).T, 16000)
    # libsndfile decodes the part of a cut-off WAV that is there without a word
    files["cut_wav"] = first_third("cut.wav", 16000, format="WAV", subtype="PCM_16")
    # finite but absurd: float32 statistics of the normalisation overflow (NaN scores before)
    files["loud"] = directory / "loud.wav"
    sf.write(files["loud"], np.full((32000, 2), 3e38, np.float32), 16000, subtype="FLOAT")
    files["low_rate"] = directory / "low_rate.wav"  # 7 Hz: no ratio to 24 kHz
    sf.write(files["low_rate"], np.zeros(70, np.float32), 7, subtype="FLOAT")
    return files


def write_good_files(directory: Path) -> list[Path]:
    """Synthetic music in several formats and rates."""
    import soundfile as sf

    directory.mkdir(parents=True, exist_ok=True)
    specs = [
        ("a.wav", 44100, 2, {}),
        ("b.flac", 48000, 1, {"format": "FLAC"}),
        ("c.ogg", 22050, 2, {"format": "OGG", "subtype": "VORBIS"}),
        ("d.mp3", 44100, 2, {"format": "MP3"}),
        ("e.opus", 48000, 1, {"format": "OGG", "subtype": "OPUS"}),
    ]
    out = []
    for i, (name, sr, ch, kw) in enumerate(specs):
        p = directory / name
        sf.write(p, synth_music(3.0 + i, sr, ch, seed=i).T, sr, **kw)
        out.append(p)
    return out
