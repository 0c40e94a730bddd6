"""SongEval labelling: the re-implemented head equals a hand computation, the released checkpoint
layout loads strictly, and ``apex-reward label`` labels every song exactly once across a SIGKILL,
writing the manifest ``prepare`` reads."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from apex_reward import CheckpointError, ConfigError
from apex_reward.training.label import LabelConfig, run_labelling
from apex_reward.training.manifest import load_manifest
from apex_reward.training.songeval import (
    SONGEVAL_ORDER,
    SongEvalHeadConfig,
    feature_model,
    load_songeval_head,
)
from apex_reward.training.synthetic import SynthConfig, generate_corpus

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
TINY = SongEvalHeadConfig(in_features=32, ffd_hidden_size=48, num_classes=5, attn_layer_num=2)


def _released_state(cfg: SongEvalHeadConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the key names and shapes of SongEval's released model.safetensors."""
    g = torch.Generator().manual_seed(seed)
    d, f = cfg.in_features, cfg.ffd_hidden_size

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "ffd.0.weight": r(f, d),
        "ffd.0.bias": r(f),
        "ffd.2.weight": r(d, f),
        "ffd.2.bias": r(d),
        "fc.weight": r(cfg.num_classes, 2 * d),
        "fc.bias": r(cfg.num_classes),
    }
    for i in range(cfg.attn_layer_num):
        state[f"attn.{i}.in_proj_weight"] = r(3 * d, d)
        state[f"attn.{i}.in_proj_bias"] = r(3 * d)
        state[f"attn.{i}.out_proj.weight"] = r(d, d)
        state[f"attn.{i}.out_proj.bias"] = r(d)
    return state


def _write_release(root, cfg: SongEvalHeadConfig = TINY, seed: int = 0, state=None):
    """SongEval's repository layout: config.yaml at the top, ckpt/model.safetensors below."""
    (root / "ckpt").mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(
        "generator:\n  _target_: model.Generator\n"
        f"  in_features: {cfg.in_features}\n  ffd_hidden_size: {cfg.ffd_hidden_size}\n"
        f"  num_classes: {cfg.num_classes}\n  attn_layer_num: {cfg.attn_layer_num}\n"
        "trainer:\n  lr: 0.0001\n"
    )
    save_file(
        state if state is not None else _released_state(cfg, seed),
        str(root / "ckpt" / "model.safetensors"),
    )
    return root


def _label(manifest, release, out, **options):
    """Run the labelling job in this process with the tiny feature model on the CPU."""
    config = LabelConfig(
        manifest=str(manifest),
        songeval=str(release),
        features="tiny",
        out=str(out),
        device="cpu",
        num_workers=0,
        **options,
    )
    return run_labelling(config, progress=False)


def _reference(state: dict[str, torch.Tensor], x: torch.Tensor, layers: int, heads: int = 8):
    """SongEval's forward written out with plain tensor algebra (no nn modules)."""
    h = F.linear(
        F.relu(F.linear(x, state["ffd.0.weight"], state["ffd.0.bias"])),
        state["ffd.2.weight"],
        state["ffd.2.bias"],
    )
    a = h
    b, t, d = a.shape
    dh = d // heads
    for i in range(layers):
        w, bias = state[f"attn.{i}.in_proj_weight"], state[f"attn.{i}.in_proj_bias"]
        q, k, v = (a @ w[j * d : (j + 1) * d].T + bias[j * d : (j + 1) * d] for j in range(3))
        q, k, v = (z.reshape(b, t, heads, dh).transpose(1, 2) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1) @ v
        att = att.transpose(1, 2).reshape(b, t, d)
        a = att @ state[f"attn.{i}.out_proj.weight"].T + state[f"attn.{i}.out_proj.bias"]
    z = torch.cat([a.mean(dim=1), h.max(dim=1).values], dim=1)
    return 3 + 2 * torch.tanh(z @ state["fc.weight"].T + state["fc.bias"])


def test_head_equals_reference_computation(tmp_path):
    state = _released_state(TINY, seed=3)
    root = _write_release(tmp_path / "SongEval", state=state)
    head = load_songeval_head(root / "ckpt" / "model.safetensors")  # finds ../config.yaml
    assert head.config == TINY
    x = torch.randn(3, 17, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = head(x)
    want = _reference(state, x, TINY.attn_layer_num)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert ((got >= 1) & (got <= 5)).all()


def test_release_layout_is_loaded_strictly(tmp_path):
    state = _released_state(TINY, seed=0)
    extra = _write_release(
        tmp_path / "extra", state={**state, "judge_embed.weight": torch.zeros(2)}
    )
    with pytest.raises(CheckpointError, match="unexpected.*judge_embed"):
        load_songeval_head(extra / "ckpt" / "model.safetensors")
    short = dict(state)
    del short["fc.bias"]
    missing = _write_release(tmp_path / "missing", state=short)
    with pytest.raises(CheckpointError, match="missing.*fc.bias"):
        load_songeval_head(missing / "ckpt" / "model.safetensors")
    shaped = _write_release(tmp_path / "shape", state={**state, "fc.weight": torch.zeros(5, 10)})
    with pytest.raises(CheckpointError, match="fc.weight has shape"):
        load_songeval_head(shaped / "ckpt" / "model.safetensors")
    (tmp_path / "extra" / "config.yaml").write_text("trainer: {}\n")
    with pytest.raises(ConfigError, match="no 'generator' section"):
        load_songeval_head(extra / "ckpt" / "model.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_songeval_head(tmp_path / "junk.safetensors", TINY)


def test_unknown_feature_model_and_width_mismatch(tmp_path):
    with pytest.raises(ConfigError, match="unknown feature model 'mert'"):
        feature_model("mert")
    wide = SongEvalHeadConfig(in_features=64, ffd_hidden_size=8, attn_layer_num=1)
    root = _write_release(tmp_path / "wide", cfg=wide)
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,audio_path\na,a.wav\n")
    with pytest.raises(ConfigError, match="32-wide hidden states but the SongEval head expects 64"):
        _label(str(manifest), str(root), str(tmp_path / "o"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("label_corpus")
    summary = generate_corpus(
        SynthConfig(
            out=str(out),
            num_songs=14,
            min_seconds=1.5,
            max_seconds=3.0,
            seed=11,
            long_fraction=0.0,
            zero_stream_fraction=0.0,
            recent_fraction=0.0,
            duplicate_id_fraction=0.0,
            duplicate_audio_fraction=0.0,
            unreadable_fraction=0.15,
            invalid_row_fraction=0.0,
        )
    )
    manifest = pd.read_csv(summary["manifest"])
    # the synthetic corpus carries its own labels; SongEval's replace them here
    manifest = manifest.drop(columns=[c for c in SONGEVAL_ORDER if c in manifest.columns])
    path = out / "unlabelled.csv"
    manifest.to_csv(path, index=False)
    release = _write_release(tmp_path_factory.mktemp("songeval") / "SongEval", seed=7)
    return path, manifest, release


def _cmd(manifest, release, out, *extra):
    return [
        sys.executable,
        "-m",
        "apex_reward",
        "label",
        "--manifest",
        str(manifest),
        "--songeval",
        str(release),
        "--features",
        "tiny",
        "--out",
        str(out),
        "--device",
        "cpu",
        "--num-workers",
        "0",
        "--shard-size",
        "1",
        *extra,
    ]


def test_labels_every_song_once_across_a_kill(corpus, tmp_path):
    manifest, table, release = corpus
    ref = _label(str(manifest), str(release), str(tmp_path / "ref"), shard_size=3)
    bad = table["id"].str.startswith("bad").sum()
    assert bad >= 1
    assert ref["songs"] == len(table) and ref["songs_failed"] == bad
    assert ref["songs_labelled"] == len(table) - bad

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _cmd(manifest, release, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if (
                len(list((out / "shards").glob("labels-*.json"))) >= 2
                if (out / "shards").is_dir()
                else False
            ):
                break
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "labelled.parquet").exists(), "the job finished before it could be killed"
    before = len(list((out / "shards").glob("labels-*.json")))
    rerun = subprocess.run(
        _cmd(manifest, release, out), capture_output=True, text=True, env=ENV, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped_on_resume"] >= before

    # every song exactly once over the shard records, and the same labels as the uninterrupted run
    seen = []
    for p in sorted((out / "shards").glob("labels-*.json")):
        rec = json.loads(p.read_text())
        seen += [s["id"] for s in rec["songs"]] + [e["id"] for e in rec["errors"]]
    assert sorted(seen) == sorted(table["id"].astype(str))
    a = pd.read_parquet(tmp_path / "ref" / "labelled.parquet")
    b = pd.read_parquet(out / "labelled.parquet")
    # the same labels up to float noise: the reference ran in this process with its thread count
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-4)
    labels = b[list(SONGEVAL_ORDER)].dropna().to_numpy()
    assert ((labels > 1.05) & (labels < 4.95)).mean() > 0.9, "labels saturate: the test sees little"
    assert list(b.columns[: len(table.columns)]) == list(table.columns)

    # prepare's reader takes the labels; unreadable songs (empty labels) are listed as invalid
    df, report = load_manifest(out / "labelled.parquet")
    assert report.has_labels
    assert report.valid_rows == len(table) - bad
    assert all(f"bad {SONGEVAL_ORDER[0]}" in r for _, r in report.invalid)
    row = df.iloc[0]
    want = b.set_index("id").loc[row["id"]]
    assert [row[c] for c in SONGEVAL_ORDER] == pytest.approx([want[c] for c in SONGEVAL_ORDER])


def test_refuses_existing_labels_and_mixed_runs(corpus, tmp_path):
    manifest, table, release = corpus
    labelled = table.assign(**{c: 3.0 for c in SONGEVAL_ORDER})
    path = tmp_path / "has_labels.csv"
    labelled.to_csv(path, index=False)
    with pytest.raises(ConfigError, match="--replace-labels"):
        _label(str(path), str(release), str(tmp_path / "o"))
    out = tmp_path / "o2"
    assert _label(manifest, release, out, limit=2)["songs"] == 2
    other = _write_release(tmp_path / "other", seed=99)
    with pytest.raises(ConfigError, match="labels made differently.*songeval_weights_sha256"):
        _label(str(manifest), str(other), str(out), limit=2)
