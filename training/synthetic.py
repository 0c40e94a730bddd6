"""A synthetic corpus of procedural songs with known quality, for tests and the offline demo.

Each song is rendered from a chord progression, a melody, a bass line and drums. Five quality
parameters in [0, 1] degrade it in audible ways — ``noise`` (added hiss), ``clipping`` (overdriven
hard clipping), ``detune`` (random pitch errors per note), ``jitter`` (timing errors) and
``dynamics`` (erratic level jumps) — and drive

* synthetic SongEval-style labels (coherence, musicality, memorability, clarity, naturalness in
  1–5), each a known logistic function of the parameters plus noise, and
* log-normal stream counts and like counts that rise with the overall quality,

written as real audio files (WAV/FLAC/Ogg at several sample rates) plus a manifest in the
documented schema (:mod:`apex_reward.training.manifest`). Optional defects exercise every filter
of ``apex-reward prepare``: zero-stream songs, duplicate ids, duplicate audio content under a new
id, unreadable files, releases inside the recency window, and invalid manifest rows. Output is
deterministic given the seed.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np

from apex_reward.cli import Command
from apex_reward.config import AESTHETIC_TASKS
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args, to_dict

logger = logging.getLogger(__name__)

QUALITY_PARAMS: tuple[str, ...] = ("noise", "clipping", "detune", "jitter", "dynamics")

#: How much each quality parameter degrades each aesthetic label (rows: labels). As in real
#: SongEval ratings the dimensions are correlated: production problems (noise, clipping, erratic
#: levels) lower all of them, and tuning and timing errors add to some. (The demo's random tiny
#: encoder exposes noise, level jumps and clipping in its pooled features, but not tuning or
#: timing; a real MERT encoder would be needed for those.)
LABEL_WEIGHTS: dict[str, dict[str, float]] = {
    "coherence": {"dynamics": 0.5, "noise": 0.3, "jitter": 0.3},
    "musicality": {"noise": 0.3, "dynamics": 0.3, "clipping": 0.3, "detune": 0.3},
    "memorability": {"dynamics": 0.6, "noise": 0.2, "jitter": 0.2},
    "clarity": {"noise": 0.6, "clipping": 0.4},
    "naturalness": {"noise": 0.4, "clipping": 0.4, "dynamics": 0.2, "detune": 0.2},
}

#: Platform tastes (``synth --platform-tastes``, ``synthetic_embedding_corpus(platform_tastes=True)``):
#: which quality each platform's audience streams. Suno's listeners reward clean production
#: (clarity: no noise, no clipping), Udio's a memorable, steady song (memorability: even levels).
PLATFORM_TASTES: dict[str, str] = {"suno": "clarity", "udio": "memorability"}

_PROGRESSIONS = [(0, 7, 9, 5), (0, 5, 7, 0), (9, 5, 0, 7), (0, 9, 5, 7), (2, 7, 0, 0)]
_MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])


@dataclass
class SynthConfig:
    """Options of ``apex-reward synth``."""

    out: str = field(default="runs/synthetic", metadata={"help": "output directory"})
    num_songs: int = field(default=200, metadata={"help": "number of distinct songs"})
    min_seconds: float = field(default=6.0, metadata={"help": "shortest song, seconds"})
    max_seconds: float = field(default=12.0, metadata={"help": "longest song, seconds"})
    long_fraction: float = field(
        default=0.0, metadata={"help": "fraction of songs between max_seconds and long_seconds"}
    )
    long_seconds: float = field(default=70.0, metadata={"help": "longest 'long' song, seconds"})
    sample_rates: list[int] = field(
        default_factory=lambda: [22050, 24000, 44100],
        metadata={"help": "sample rates to draw from"},
    )
    formats: list[str] = field(
        default_factory=lambda: ["wav", "flac", "ogg"],
        metadata={"help": "audio formats to draw from"},
    )
    manifest_format: Literal["csv", "parquet", "jsonl"] = field(
        default="csv", metadata={"help": "manifest file format"}
    )
    seed: int = field(
        default=0, metadata={"help": "random seed (output is deterministic given it)"}
    )
    suno_fraction: float = field(
        default=0.6, metadata={"help": "fraction of songs from 'suno' (rest 'udio')"}
    )
    snapshot_date: str = field(
        default="2025-06-01", metadata={"help": "dataset snapshot date (UTC)"}
    )
    label_noise: float = field(default=0.15, metadata={"help": "std of the noise on label logits"})
    zero_stream_fraction: float = field(default=0.03, metadata={"help": "songs with 0 streams"})
    recent_fraction: float = field(
        default=0.03, metadata={"help": "songs released within 14 days of the snapshot"}
    )
    duplicate_id_fraction: float = field(
        default=0.02, metadata={"help": "extra rows repeating an id"}
    )
    duplicate_audio_fraction: float = field(
        default=0.02, metadata={"help": "extra rows with a copy of a song's audio under a new id"}
    )
    unreadable_fraction: float = field(
        default=0.02, metadata={"help": "extra rows whose audio is corrupt"}
    )
    invalid_row_fraction: float = field(
        default=0.01, metadata={"help": "extra rows with invalid fields"}
    )
    stereo_fraction: float = field(default=0.5, metadata={"help": "fraction of stereo files"})
    platform_tastes: bool = field(
        default=False,
        metadata={
            "help": "platforms prefer different qualities: streams rise with clarity on suno "
            "and with memorability on udio (instead of the mean quality, the same for both)"
        },
    )


@functools.lru_cache(maxsize=256)
def _adsr(n: int, sr: int, attack: float = 0.01, release: float = 0.08) -> np.ndarray:
    """Envelope of a note of ``n`` samples (cached: note lengths repeat within a song)."""
    env = np.ones(n)
    a = max(1, min(n, int(attack * sr)))
    r = max(1, min(n - a, int(release * sr))) if n > a else 0
    env[:a] = np.linspace(0.0, 1.0, a)
    if r:
        env[n - r :] *= np.linspace(1.0, 0.0, r)
    decay = np.exp(-np.arange(n) / (0.6 * sr))
    out = env * (0.6 + 0.4 * decay)
    out.flags.writeable = False
    return out


_TABLE = 4096


def _wavetable(harmonics: int, rng: np.random.Generator) -> np.ndarray:
    """One period of a tone with ``harmonics`` partials (1/h^1.3 amplitudes, random phases)."""
    phase = np.arange(_TABLE) / _TABLE * 2 * np.pi
    table = np.zeros(_TABLE)
    for h in range(1, harmonics + 1):
        table += np.sin(h * phase + rng.uniform(0, 2 * np.pi)) / h**1.3
    return table


def _tone(freq: float, n: int, sr: int, table: np.ndarray, layer_cents: float = 0.0) -> np.ndarray:
    """A note from ``table`` at ``freq`` Hz; with ``layer_cents`` a second, detuned unison layer
    is mixed in (an out-of-tune double that beats against the note)."""
    idx = (np.arange(n) * (freq * _TABLE / sr)).astype(np.int64) % _TABLE
    out = table[idx]
    if layer_cents:
        f2 = freq * 2 ** (layer_cents / 1200.0)
        idx2 = (np.arange(n) * (f2 * _TABLE / sr)).astype(np.int64) % _TABLE
        out = 0.6 * out + 0.6 * table[idx2]
    return out


def _add(buf: np.ndarray, start: int, sig: np.ndarray) -> None:
    if start >= len(buf) or start + len(sig) <= 0:
        return
    s0 = max(0, start)
    s1 = min(len(buf), start + len(sig))
    buf[s0:s1] += sig[s0 - start : s1 - start]


def render_song(
    params: dict[str, float], seconds: float, sr: int, rng: np.random.Generator
) -> np.ndarray:
    """Render one song with the given quality parameters; returns ``[samples]`` float64 in [-1, 1]."""
    n = int(round(seconds * sr))
    mix = np.zeros(n)
    bpm = rng.uniform(85, 145)
    beat = 60.0 / bpm
    root = 48 + int(rng.integers(0, 12))  # MIDI note of the key
    prog = _PROGRESSIONS[int(rng.integers(0, len(_PROGRESSIONS)))]
    lead = _wavetable(int(rng.integers(2, 6)), rng)
    bass_table = _wavetable(2, rng)
    detune_cents = 45.0 * params["detune"]
    jitter_s = 0.045 * params["jitter"]

    def hz(midi: float) -> float:
        cents = rng.normal(0.0, detune_cents) if detune_cents else 0.0
        return 440.0 * 2 ** ((midi - 69 + cents / 100.0) / 12)

    def layer() -> float:
        # detuning: each note is pitched off by a random error and doubled by a layer that is
        # further out of tune (audible as beating), as in a badly tuned ensemble
        return float(rng.normal(0.0, 1.5 * detune_cents)) if detune_cents else 0.0

    def onset(t: float) -> int:
        return int(round((t + (rng.normal(0.0, jitter_s) if jitter_s else 0.0)) * sr))

    bar = 4 * beat
    # a motif repeated every two bars makes the melody "memorable"
    motif = rng.choice(len(_MAJOR), size=8)
    for b in range(int(np.ceil(seconds / bar))):
        chord_root = root + prog[b % len(prog)]
        t0 = b * bar
        for interval in (0, 4, 7):
            length = int(bar * sr * 0.95)
            sig = (
                0.12
                * _tone(hz(chord_root + interval), length, sr, lead, layer())
                * _adsr(length, sr, 0.05, 0.3)
            )
            _add(mix, onset(t0), sig)
        bass_len = int(beat * sr * 0.9)
        for k in range(4):
            sig = (
                0.25
                * _tone(hz(chord_root - 12), bass_len, sr, bass_table, layer())
                * _adsr(bass_len, sr)
            )
            _add(mix, onset(t0 + k * beat), sig)
        for k in range(8):
            degree = motif[(k + 8 * (b % 2 == 1 and rng.random() < 0.3)) % 8]
            note = root + 12 + _MAJOR[degree]
            length = int(beat * sr * 0.45)
            sig = 0.18 * _tone(hz(note), length, sr, lead, layer()) * _adsr(length, sr)
            _add(mix, onset(t0 + k * beat / 2), sig)
        for k in range(4):  # drums
            kl = int(0.15 * sr)
            tk = np.arange(kl) / sr
            if k % 2 == 0:
                kick = np.sin(2 * np.pi * (50 + 80 * np.exp(-tk * 30)) * tk) * np.exp(-tk * 18)
                _add(mix, onset(t0 + k * beat), 0.5 * kick)
            else:
                snare = rng.standard_normal(kl) * np.exp(-tk * 25)
                _add(mix, onset(t0 + k * beat), 0.2 * snare)
            hl = int(0.04 * sr)
            for half in (0, 1):
                hat = np.diff(rng.standard_normal(hl + 1)) * np.exp(-np.arange(hl) / (0.008 * sr))
                _add(mix, onset(t0 + (k + 0.5 * half) * beat), 0.05 * hat)
    # dynamics: erratic level jumps per beat (a well-mixed song keeps a steady level)
    if params["dynamics"] > 0:
        beats = int(np.ceil(seconds / beat)) + 1
        gains_db = rng.normal(0.0, 10.0 * params["dynamics"], size=beats)
        idx = np.minimum((np.arange(n) / (beat * sr)).astype(int), beats - 1)
        mix *= 10 ** (gains_db[idx] / 20)
    mix /= max(1e-9, np.abs(mix).max()) / 0.5
    if params["noise"] > 0:
        mix += rng.standard_normal(n) * 0.12 * params["noise"]
    gain = 1.0 + 7.0 * params["clipping"]
    mix = np.clip(mix * gain, -1.0, 1.0) / max(1.0, gain**0.5)
    fade = min(n // 4, int(0.02 * sr))
    if fade:
        mix[:fade] *= np.linspace(0, 1, fade)
        mix[-fade:] *= np.linspace(1, 0, fade)
    return np.clip(mix, -1.0, 1.0)


def true_labels(
    params: dict[str, float], rng: np.random.Generator, noise: float
) -> dict[str, float]:
    """The synthetic aesthetic labels of a song (1–5): ``1 + 4 sigmoid(2 - 5 * badness + eps)``."""
    out = {}
    for task, weights in LABEL_WEIGHTS.items():
        badness = sum(w * params[p] for p, w in weights.items()) / sum(weights.values())
        z = 2.0 - 5.0 * badness + rng.normal(0.0, noise)
        out[task] = float(1.0 + 4.0 / (1.0 + np.exp(-z)))
    return out


def _write_audio(path: Path, audio: np.ndarray, sr: int, fmt: str) -> None:
    import soundfile as sf

    kwargs: dict[str, Any] = {}
    if fmt == "ogg":
        kwargs = {"format": "OGG", "subtype": "VORBIS"}
    elif fmt == "flac":
        kwargs = {"format": "FLAC"}
    sf.write(str(path), audio.T.astype(np.float32), sr, **kwargs)


def generate_corpus(config: SynthConfig, *, progress: bool = False) -> dict[str, Any]:
    """Write ``config.num_songs`` songs and a manifest to ``config.out``.

    Returns a summary: paths, counts of each injected defect (so tests can check that every filter
    removes exactly what was injected), and the quality parameters and true labels per song id
    (also written to ``truth.jsonl``).
    """
    pd = __import__("pandas")
    out = Path(config.out)
    audio_dir = out / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    master = np.random.default_rng(config.seed)
    snapshot = datetime.fromisoformat(config.snapshot_date).replace(tzinfo=timezone.utc)
    rows: list[dict[str, Any]] = []
    truth: list[dict[str, Any]] = []
    iterator = range(config.num_songs)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="synthesising", unit="song")
    for i in iterator:
        rng = np.random.default_rng([config.seed, i])
        params = {p: float(rng.beta(1.1, 1.6)) for p in QUALITY_PARAMS}
        if rng.random() < config.long_fraction:
            seconds = float(rng.uniform(config.max_seconds, config.long_seconds))
        else:
            seconds = float(rng.uniform(config.min_seconds, config.max_seconds))
        sr = int(rng.choice(config.sample_rates))
        fmt = str(rng.choice(config.formats))
        mono = render_song(params, seconds, sr, rng)
        if rng.random() < config.stereo_fraction:
            pan = rng.uniform(0.7, 1.0)
            audio = np.stack([mono * pan, mono * (1.7 - pan)]) / 1.1
        else:
            audio = mono[None]
        sid = f"song{i:05d}"
        path = audio_dir / f"{sid}.{fmt}"
        _write_audio(path, audio, sr, fmt)
        labels = true_labels(params, rng, config.label_noise)
        quality = (np.mean(list(labels.values())) - 1.0) / 4.0
        platform = "suno" if rng.random() < config.suno_fraction else "udio"
        if config.platform_tastes:  # what this platform's audience streams (no extra draws)
            quality = (labels[PLATFORM_TASTES[platform]] - 1.0) / 4.0
        mu = 3.0 + 4.0 * quality + (0.5 if platform == "suno" else 0.0)
        streams = max(1, int(np.round(rng.lognormal(mu, 1.0))))
        defect = rng.random()  # at most one of: zero streams, recent release
        if defect < config.zero_stream_fraction:
            streams = 0
        like_rate = 0.02 + 0.10 * quality
        likes = int(rng.binomial(max(streams, 0), min(1.0, like_rate * rng.lognormal(0.0, 0.3))))
        recent = (
            config.zero_stream_fraction
            <= defect
            < config.zero_stream_fraction + config.recent_fraction
        )
        days = rng.uniform(0.0, 14.0) if recent else rng.uniform(15.0, 400.0)
        created = snapshot - timedelta(days=float(days))
        rows.append(
            {
                "id": sid,
                "platform": platform,
                "audio_path": f"audio/{path.name}",
                "streams": streams,
                "likes": likes,
                "created_at": created.isoformat(),
                **{k: round(v, 4) for k, v in labels.items()},
            }
        )
        truth.append(
            {
                "id": sid,
                "seconds": seconds,
                "sample_rate": sr,
                "format": fmt,
                "channels": int(audio.shape[0]),
                **params,
                **labels,
            }
        )
    defects = {
        "zero_streams": sum(r["streams"] == 0 for r in rows),
        "recent": sum((snapshot - datetime.fromisoformat(r["created_at"])).days < 14 for r in rows),
        "duplicate_ids": 0,
        "duplicate_audio": 0,
        "unreadable": 0,
        "invalid_rows": 0,
    }
    extra: list[dict[str, Any]] = []
    duplicate_of: dict[str, str] = {}
    base = [r for r in rows if r["streams"] > 0 and not _is_recent(r, snapshot)]

    def pick() -> dict[str, Any]:
        return base[int(master.integers(0, len(base)))]

    for _ in range(int(round(config.duplicate_id_fraction * config.num_songs))):
        extra.append(dict(pick()))  # the same id again
        defects["duplicate_ids"] += 1
    for k in range(int(round(config.duplicate_audio_fraction * config.num_songs))):
        src = pick()
        dup_path = audio_dir / f"dup{k:04d}{Path(src['audio_path']).suffix}"
        shutil.copyfile(out / src["audio_path"], dup_path)
        extra.append({**src, "id": f"dup{k:04d}", "audio_path": f"audio/{dup_path.name}"})
        defects["duplicate_audio"] += 1
        duplicate_of[f"dup{k:04d}"] = src["id"]
    for k in range(int(round(config.unreadable_fraction * config.num_songs))):
        src = pick()
        bad = audio_dir / f"bad{k:04d}{Path(src['audio_path']).suffix}"
        data = (out / src["audio_path"]).read_bytes()
        # a file cut after its header, or text that is not audio at all
        bad.write_bytes(data[:200] if k % 2 == 0 else b"not audio at all\n" * 50)
        extra.append({**src, "id": f"bad{k:04d}", "audio_path": f"audio/{bad.name}"})
        defects["unreadable"] += 1
    for k in range(int(round(config.invalid_row_fraction * config.num_songs))):
        src = pick()
        broken = {**src, "id": f"inv{k:04d}"}
        broken["streams" if k % 2 == 0 else "created_at"] = "n/a"
        extra.append(broken)
        defects["invalid_rows"] += 1
    # interleave the extra rows deterministically so they are not all at the end
    for r in extra:
        rows.insert(int(master.integers(0, len(rows) + 1)), r)
    df = pd.DataFrame(rows)
    manifest = out / f"manifest.{config.manifest_format}"
    if config.manifest_format == "csv":
        df.to_csv(manifest, index=False)
    elif config.manifest_format == "parquet":
        df.astype({"streams": str, "created_at": str}).to_parquet(manifest, index=False)
    else:
        with open(manifest, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    with open(out / "truth.jsonl", "w") as f:
        for t in truth:
            f.write(json.dumps(t) + "\n")
    summary = {
        "manifest": str(manifest),
        "audio_dir": str(audio_dir),
        "songs": config.num_songs,
        "rows": len(rows),
        "defects": defects,
        "duplicate_audio_of": duplicate_of,
        "config": to_dict(config),
    }
    (out / "synth_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _is_recent(row: dict[str, Any], snapshot: datetime) -> bool:
    return (snapshot - datetime.fromisoformat(row["created_at"])).days < 14


def load_truth(directory: str | Path) -> dict[str, dict[str, Any]]:
    """The quality parameters and true labels per song id written by :func:`generate_corpus`."""
    out = {}
    with open(Path(directory) / "truth.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            out[rec["id"]] = rec
    return out


# ----------------------------------------------------------------------------------------------
# CLI


def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, SynthConfig)


def run_synth(args: argparse.Namespace) -> int:
    config = dataclass_from_args(SynthConfig, args)
    summary = generate_corpus(config, progress=True)
    keys = ("manifest", "songs", "rows", "defects")
    sys.stdout.write(json.dumps({k: summary[k] for k in keys}, indent=2) + "\n")
    return 0


COMMAND = Command(
    "synth",
    "generate a synthetic corpus of songs + manifest",
    add_synth_arguments,
    run_synth,
)


__all__ = [
    "SynthConfig",
    "QUALITY_PARAMS",
    "LABEL_WEIGHTS",
    "PLATFORM_TASTES",
    "AESTHETIC_TASKS",
    "render_song",
    "true_labels",
    "generate_corpus",
    "load_truth",
    "synthetic_embedding_corpus",
]


# ----------------------------------------------------------------------------------------------
# synthetic embeddings with known targets (trainer tests, grid tests, throughput benchmark)


def synthetic_embedding_corpus(
    out: str | Path,
    *,
    num_songs: int,
    model_config: Any = None,
    max_segments: int = 3,
    noise_std: Sequence[float] = (0.10, 0.14, 0.08, 0.12, 0.15, 0.09, 0.11),
    split: Sequence[float] = (0.85, 0.10, 0.05),
    seed: int = 0,
    shard_size: int = 4096,
    platform_tastes: bool = False,
) -> dict[str, Any]:
    """Write an extraction directory and a prepared manifest whose targets are a known function of
    the embeddings plus Gaussian noise of known variance.

    Segment features ``x ~ N(0, 1)`` ``[L, H]``; a song's feature is the duration-weighted mean of
    its segments (as :meth:`EmbeddingStore.songs` computes it), and its targets in unit range are
    ``f = sigmoid(tanh((a . x) W1) W2)`` — representable by the APEX head, whose first step is a
    learned combination ``a`` of the layers — plus noise with std ``noise_std[t]`` (unit range);
    stored in native units (popularity x100, aesthetics 1 + 4x).

    Args:
        out: directory; gets ``embeddings/`` (the ``apex-reward extract`` format) and
            ``prepared/prepared.parquet`` (+ ``popularity_reference.json``).
        model_config: the :class:`~apex_reward.ApexConfig` the embeddings pretend to come from
            (hidden size, layers, front end); default the ``tiny`` preset.
        platform_tastes: songs are split between the platforms ``suno`` and ``udio`` (half
            each, independently of their features) whose audiences prefer different qualities:
            a song's noiseless streams target is its noiseless clarity target on suno and its
            memorability target on udio (:data:`PLATFORM_TASTES`). Off (the default): one
            platform, ``synthetic``, and the targets above, unchanged.

    Returns:
        paths, the noise variances (unit range) and the noise ceilings (best achievable Pearson
        per task, from the noiseless targets of the test split; with ``platform_tastes`` also
        per platform, ``ceiling_pearson_by_platform``).
    """
    import pandas as pd
    import torch

    from apex_reward.config import ALL_TASKS, SCORE_RANGES, ApexConfig
    from apex_reward.files import atomic_write_text
    from apex_reward.popularity import PopularityReference

    from .embeddings import ShardWriter, write_index
    from .prepare import SPLITS, stratified_split

    cfg = model_config or ApexConfig.from_preset("tiny")
    L, H = len(cfg.encoder.layers), cfg.encoder.hidden_size
    out = Path(out)
    emb_dir, prep_dir = out / "embeddings", out / "prepared"
    (emb_dir / "shards").mkdir(parents=True, exist_ok=True)
    prep_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([0.5, 1.0, -0.7, 0.3] * ((L + 3) // 4))[:L]
    w1 = torch.randn(H, 16, generator=g) / H**0.5
    w2 = torch.randn(16, len(ALL_TASKS), generator=g) * 0.4
    sigma = torch.tensor(list(noise_std), dtype=torch.float32)
    seg_s = cfg.frontend.segment_seconds
    ids = [f"emb{i:07d}" for i in range(num_songs)]
    song_feats = torch.empty(num_songs, L, H)
    n_shards = (num_songs + shard_size - 1) // shard_size
    for k in range(n_shards):
        writer = ShardWriter(emb_dir / "shards", k)
        for i in range(k * shard_size, min(num_songs, (k + 1) * shard_size)):
            n_seg = int(torch.randint(1, max_segments + 1, (1,), generator=g))
            last = float(torch.empty(1).uniform_(1.0, seg_s, generator=g))
            durs = [seg_s] * (n_seg - 1) + [last]
            x = torch.randn(n_seg, L, H, generator=g)
            w = torch.tensor(durs)
            song_feats[i] = (x * w[:, None, None]).sum(0) / w.sum()
            writer.add_song(ids[i], f"synthetic://{ids[i]}", x, durs, sum(durs))
        writer.write()
    clean = torch.sigmoid(torch.tanh(torch.einsum("l,nlh->nh", a, song_feats) @ w1) @ w2)
    platforms = np.array(["synthetic"] * num_songs, dtype=object)
    if platform_tastes:  # a generator of its own: the draws above and below stay the same
        pg = torch.Generator().manual_seed(seed + 7919)
        on_udio = torch.rand(num_songs, generator=pg) < 0.5
        platforms = np.where(on_udio.numpy(), "udio", "suno").astype(object)
        taste = {p: ALL_TASKS.index(t) for p, t in PLATFORM_TASTES.items()}
        clean[:, 0] = torch.where(on_udio, clean[:, taste["udio"]], clean[:, taste["suno"]])
    noisy = (clean + sigma * torch.randn(num_songs, len(ALL_TASKS), generator=g)).clamp(0.0, 1.0)
    lo = torch.tensor([SCORE_RANGES[t][0] for t in ALL_TASKS])
    span = torch.tensor([SCORE_RANGES[t][1] - SCORE_RANGES[t][0] for t in ALL_TASKS])
    native = noisy * span + lo
    fingerprint = {
        "format_version": 1,
        "frontend": to_dict(cfg.frontend),
        "encoder": {
            "preset": cfg.encoder.preset,
            "hubert": cfg.encoder.hubert,
            "layers": list(cfg.encoder.layers),
            "source": cfg.encoder.source,
            "revision": cfg.encoder.revision,
            "stored": cfg.encoder.stored,
        },
        "encoder_weights_sha256": None,
        "synthetic": True,
    }
    atomic_write_text(emb_dir / "extraction.json", json.dumps(fingerprint, indent=2) + "\n")
    write_index(emb_dir, n_shards, num_songs)
    split_idx = stratified_split(native[:, 0].numpy(), list(split), 10, np.random.default_rng(seed))
    df = pd.DataFrame(
        {
            "id": ids,
            "platform": platforms,
            "split": [SPLITS[j] for j in split_idx],
            "streams_score": native[:, 0].numpy(),
            "likes_score": native[:, 1].numpy(),
            **{t: native[:, j].numpy() for j, t in enumerate(ALL_TASKS) if j >= 2},
        }
    )
    df.to_parquet(prep_dir / "prepared.parquet", index=False)
    fake_counts = {
        "streams": np.exp(native[:, 0].numpy() / 10),
        "likes": np.exp(native[:, 1].numpy() / 12),
    }
    ref = PopularityReference.from_counts(fake_counts, num_levels=101)
    (prep_dir / "popularity_reference.json").write_text(json.dumps(to_dict(ref.to_config())) + "\n")
    test = torch.as_tensor(split_idx == SPLITS.index("test"))
    vc = clean[test].var(dim=0)
    ceiling = torch.sqrt(vc / (vc + sigma**2))
    by_platform = {}
    for p in sorted(set(platforms.tolist())) if platform_tastes else ():
        rows = test & torch.as_tensor(platforms == p)
        if int(rows.sum()) < 2:  # too few test songs to measure
            by_platform[p] = float("nan")
            continue
        v = clean[rows, 0].var()
        by_platform[p] = float(torch.sqrt(v / (v + sigma[0] ** 2)))
    return {
        "embeddings": str(emb_dir),
        "prepared": str(prep_dir / "prepared.parquet"),
        "noise_var_unit": dict(zip(ALL_TASKS, (sigma**2).tolist())),
        "ceiling_pearson": dict(zip(ALL_TASKS, ceiling.tolist())),
        **({"ceiling_pearson_by_platform": {"streams": by_platform}} if platform_tastes else {}),
    }
