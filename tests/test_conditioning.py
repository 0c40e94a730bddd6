"""Conditioned popularity: a learned platform token or embedding in the head's trunk.

One tiny random encoder (2 s segments) serves every model of the module; conditioned heads are
built on it. The grid test trains a conditioned and an unconditioned head on a synthetic
embedding corpus whose platforms prefer different qualities.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import synth_music

from apex_reward import ApexRewardModel
from apex_reward.config import (
    AESTHETIC_TASKS,
    ApexConfig,
    ConditionConfig,
    FrontendConfig,
    HeadConfig,
)
from apex_reward.errors import ConfigError, UnknownConditionError
from apex_reward.heads import scale_task_output, weighted_song_mean

SR = 24000
VALUES = ["suno", "udio"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base() -> ApexRewardModel:
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny")
    cfg.frontend = FrontendConfig(segment_seconds=2.0, min_duration_s=0.5)
    return ApexRewardModel.from_config(cfg, encoder="random")


def conditioned(base: ApexRewardModel, mode: str, seed: int = 1) -> ApexRewardModel:
    """A head conditioned on ``platform`` over ``base``'s encoder (random head weights)."""
    cfg = copy.deepcopy(base.config)
    cfg.head = HeadConfig(condition=ConditionConfig(values=list(VALUES), mode=mode))
    torch.manual_seed(seed)
    return ApexRewardModel(cfg, encoder=base.encoder).eval()


@pytest.fixture(scope="module")
def songs() -> list[torch.Tensor]:
    # the last one is shorter than a segment: its one window is the whole song
    lengths = (2.5, 3.0, 1.5)
    return [torch.from_numpy(synth_music(s, SR, seed=40 + i)[0]) for i, s in enumerate(lengths)]


@pytest.fixture(scope="module")
def features(base, songs):
    with torch.no_grad():
        return base.encode(songs, SR)


def test_unconditioned_head_is_the_head_as_before(base, features, tmp_path):
    """Feature off: no new weights, the trunk's input is the song embedding, the head computes
    exactly trunk -> task heads, and a checkpoint written before conditioning existed (no
    ``head.condition`` in config.json) loads and scores bit for bit as the model in memory."""
    head = base.head
    assert head.condition is None and head.config.condition is None
    assert head.trunk[0].in_features == base.config.encoder.hidden_size
    assert not [k for k in head.state_dict() if "condition" in k]
    f = features
    with torch.no_grad():
        emb = weighted_song_mean(head.embed(f.layer_features), f.song_index, f.weights, f.num_songs)
        trunk = head.trunk(emb)
        plain = {t: scale_task_output(t, h(trunk).squeeze(-1)) for t, h in head.heads.items()}
        out = head(f.layer_features, f.song_index, f.weights, f.num_songs)
        assert all(torch.equal(out[t], plain[t]) for t in plain)
        before = base.predict_from_features(f)
    ckpt = base.save_pretrained(tmp_path / "ckpt")
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["head"].pop("condition") is None
    (ckpt / "config.json").write_text(json.dumps(raw))
    loaded = ApexRewardModel.from_pretrained(ckpt)
    with torch.no_grad():
        after = loaded.predict_from_features(f)
    assert torch.equal(after.reward, before.reward)
    assert all(torch.equal(after.scores[k], before.scores[k]) for k in before.scores)
    with pytest.raises(UnknownConditionError, match="no conditioning input"):
        base.predict_from_features(f, condition="suno")
    with pytest.raises(ConfigError, match="no conditioning input"):
        head.predict(emb, torch.zeros(f.num_songs, dtype=torch.long))


@pytest.mark.parametrize("mode", ["token", "embedding"])
def test_conditioned_head_scores_each_condition_differently(base, features, mode):
    model = conditioned(base, mode)
    head = model.head
    hidden = base.config.encoder.hidden_size
    if mode == "token":  # concatenated to the trunk's input
        assert head.trunk[0].in_features == hidden + head.config.condition.dim
    else:  # added to the hidden state after the first block
        assert head.trunk[0].in_features == hidden
        assert head.condition.table.weight.shape == (3, head.config.trunk_widths[0])
    with torch.no_grad():
        by = {c: model.predict_from_features(features, condition=c) for c in (*VALUES, None)}
        mixed = model.predict_from_features(features, condition=["udio", None, "suno"])
    suno, udio, avg = (by[c].scores["streams"] for c in (*VALUES, None))  # 0-100 points
    assert (suno - udio).abs().min() > 1e-3
    assert (avg - suno).abs().min() > 1e-3 and (avg - udio).abs().min() > 1e-3
    assert torch.equal(mixed.scores["streams"], torch.stack([udio[0], avg[1], suno[2]]))
    assert not torch.equal(by["suno"].reward, by["udio"].reward)
    with pytest.raises(UnknownConditionError, match=r"'spotify'.*\['suno', 'udio'\]"):
        model.predict_from_features(features, condition="spotify")
    with pytest.raises(UnknownConditionError, match="2 values for 3 songs"):
        model.predict_from_features(features, condition=["suno", "udio"])


def test_condition_in_forward_score_windows_robust_and_checkpoints(base, songs, tmp_path):
    model = conditioned(base, "token")
    audio = [(s.numpy(), SR) for s in songs]
    with torch.no_grad():
        feats = model.encode(songs, SR)
        expected = model.predict_from_features(feats, condition="udio").reward
        out = model(songs, SR, condition="udio", return_windows=True)
        robust_u = model(songs, SR, condition="udio", robust=2, seed=3).reward
        robust_s = model(songs, SR, condition="suno", robust=2, seed=3).reward
    assert torch.allclose(out.reward, expected, atol=1e-6)
    # the short song's only window is the song itself, scored under the same condition
    assert out.windows.reward[2, 0].item() == pytest.approx(out.reward[2].item(), abs=1e-5)
    assert (robust_u - robust_s).abs().min() > 1e-4
    scored = model.score(audio, condition="udio", num_workers=0)
    assert [r.reward for r in scored] == pytest.approx(expected.tolist(), abs=1e-5)
    per_input = model.score(audio, condition=["suno", "udio", None], num_workers=0)
    with torch.no_grad():
        one_by_one = [
            model.predict_from_features(model.encode([s], SR), condition=c).reward.item()
            for s, c in zip(songs, ["suno", "udio", None])
        ]
    assert [r.reward for r in per_input] == pytest.approx(one_by_one, abs=1e-5)
    with pytest.raises(UnknownConditionError, match="suno"):  # the call fails, not each input
        model.score(audio, condition="spotify", num_workers=0)
    ckpt = model.save_pretrained(tmp_path / "cond")
    loaded = ApexRewardModel.from_pretrained(ckpt)
    assert loaded.config.head.condition.values == VALUES
    with torch.no_grad():
        again = loaded.predict_from_features(feats, condition="udio").reward
    assert torch.equal(again, expected)


def test_synthetic_corpora_give_platforms_different_tastes(tmp_path):
    """Embedding corpus without noise: streams is exactly clarity on suno and memorability on
    udio, and nothing else moves; audio corpus: streams follow the platform's taste."""
    from apex_reward.training.synthetic import (
        PLATFORM_TASTES,
        SynthConfig,
        generate_corpus,
        load_truth,
        synthetic_embedding_corpus,
    )

    quiet = dict(num_songs=60, seed=3, max_segments=1, noise_std=(0.0,) * 7)
    plain = synthetic_embedding_corpus(tmp_path / "plain", **quiet)
    tastes = synthetic_embedding_corpus(tmp_path / "tastes", platform_tastes=True, **quiet)
    a, b = pd.read_parquet(plain["prepared"]), pd.read_parquet(tastes["prepared"])
    assert set(a["platform"]) == {"synthetic"} and set(b["platform"]) == set(VALUES)
    assert a.drop(columns=["platform", "streams_score", "split"]).equals(
        b.drop(columns=["platform", "streams_score", "split"])
    )
    for platform, quality in PLATFORM_TASTES.items():
        rows = b[b["platform"] == platform]
        unit = (rows[quality] - 1.0) / 4.0
        np.testing.assert_allclose(rows["streams_score"] / 100.0, unit, atol=1e-5)
    assert set(tastes["ceiling_pearson_by_platform"]["streams"]) == set(VALUES)

    cfg = dict(
        num_songs=16,
        min_seconds=0.5,
        max_seconds=0.6,
        sample_rates=[8000],
        formats=["wav"],
        zero_stream_fraction=0.0,
        recent_fraction=0.0,
        duplicate_id_fraction=0.0,
        duplicate_audio_fraction=0.0,
        unreadable_fraction=0.0,
        invalid_row_fraction=0.0,
        seed=5,
    )
    off = generate_corpus(SynthConfig(out=str(tmp_path / "off"), **cfg))
    on = generate_corpus(SynthConfig(out=str(tmp_path / "on"), platform_tastes=True, **cfg))
    m_off, m_on = pd.read_csv(off["manifest"]), pd.read_csv(on["manifest"])
    truth = load_truth(tmp_path / "on")
    assert m_off["platform"].tolist() == m_on["platform"].tolist()  # the same draws
    checked = 0
    for r_off, r_on in zip(m_off.itertuples(), m_on.itertuples()):
        t = truth[r_on.id]
        quality = np.mean([t[k] for k in AESTHETIC_TASKS])
        taste = t[PLATFORM_TASTES[r_on.platform]]
        # log streams moved by 4 * (taste quality - mean quality), the same noise draw
        shift = 4.0 * ((taste - 1.0) / 4.0 - (quality - 1.0) / 4.0)
        if min(r_off.streams, r_on.streams) >= 50:  # integer rounding is small
            assert np.log(r_on.streams / r_off.streams) == pytest.approx(shift, abs=0.03)
            checked += 1
    assert checked >= 8


def test_grid_conditioned_beats_unconditioned_per_platform(base, tmp_path):
    """The grid trains a condition unconditioned and with a platform token on a corpus whose
    platforms prefer different qualities; table3 reports streams Pearson per platform, and the
    conditioned model's is higher on both; its exported checkpoint scores each platform
    differently."""
    from apex_reward.training.grid import GridConfig, run_grid_experiment
    from apex_reward.training.synthetic import synthetic_embedding_corpus

    data = synthetic_embedding_corpus(
        tmp_path / "data",
        num_songs=1500,
        seed=1,
        max_segments=1,
        platform_tastes=True,
        model_config=base.config,
    )
    base_dir = base.save_pretrained(tmp_path / "base")
    only = ["C-song-popularity", "C-song-popularity+platform-token"]
    summary = run_grid_experiment(
        GridConfig(
            embeddings=data["embeddings"],
            prepared=data["prepared"],
            model=str(base_dir),
            out=str(tmp_path / "grid"),
            only=only,
            tasks=["popularity"],
            modes=["song"],
            conditioning=["none", "token"],
            epochs=12,
            patience=12,
            batch_size=128,
            device="cpu",
            log_with="none",
        ),
        progress=False,
    )
    assert sorted(summary["ran"]) == sorted(only)
    table = pd.read_csv(tmp_path / "grid" / "table3.csv").set_index("condition")
    assert table.loc[only[1], "conditioning"] == "token"
    for platform in VALUES:
        plain = table.loc[only[0], f"streams_pearson_{platform}"]
        cond = table.loc[only[1], f"streams_pearson_{platform}"]
        assert cond > plain + 0.05, (platform, plain, cond)
    md = (tmp_path / "grid" / "table3.md").read_text()
    assert "streams Pearson (suno)" in md and md.count("\n| ") == 3
    model = ApexRewardModel.from_pretrained(tmp_path / "grid" / "conditions" / only[1] / "model")
    assert model.config.head.condition.values == VALUES
    assert model.config.training["config"]["condition"] == "platform"
    from apex_reward.training.embeddings import EmbeddingStore

    store = EmbeddingStore(data["embeddings"])
    with torch.no_grad():
        feats = store.songs(store.song_ids[:8])
        f = type(base.encode([torch.zeros(SR)], SR))(
            layer_features=feats,
            song_index=torch.arange(8),
            weights=torch.ones(8),
            durations_s=torch.ones(8),
            num_songs=8,
        )
        s = model.predict_from_features(f, condition="suno").scores["streams"]
        u = model.predict_from_features(f, condition="udio").scores["streams"]
    assert (s - u).abs().mean() > 1.0  # points of streams score, 0-100


def test_cli_server_and_trl_take_a_condition(base, songs, tmp_path, capsys):
    from apex_reward.cli import main
    from apex_reward.integrations.serving.batcher import DynamicBatcher
    from apex_reward.integrations.serving.config import ServeConfig
    from apex_reward.integrations.serving.state import ServerState
    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    model = conditioned(base, "embedding", seed=2)
    ckpt = model.save_pretrained(tmp_path / "cond")
    wav = tmp_path / "a.wav"
    sf.write(str(wav), songs[0].numpy(), SR)
    with torch.no_grad():
        want = {c: model(songs[:1], SR, condition=c).reward.item() for c in VALUES}

    # apex-reward score --condition
    assert main(["score", "--model", str(ckpt), "--condition", "udio", str(wav)]) == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert record["reward"] == pytest.approx(want["udio"], abs=1e-5)
    assert main(["score", "--model", str(ckpt), "--condition", "spotify", str(wav)]) == 1
    assert "knows ['suno', 'udio']" in capsys.readouterr().err

    # the server: --condition for every clip, checked at start-up
    with pytest.raises(UnknownConditionError, match="suno"):
        ServerState(model, ServeConfig(warmup=False, condition="spotify"))
    batcher = DynamicBatcher(model, max_batch=4, max_wait_s=0.05, condition="suno")
    batcher.start()
    try:
        result = asyncio.run(batcher.score("c0", songs[0], SR))
    finally:
        batcher.stop()
    assert result.reward == pytest.approx(want["suno"], abs=1e-5)

    # TRL: a fixed condition, or one per completion from a dataset column (TRL's call)
    completions = [(songs[0].numpy(), SR), (songs[0].numpy(), SR)]
    fixed = ApexRewardFunction(str(ckpt), condition="udio", device="cpu")
    assert fixed(["p", "q"], completions) == pytest.approx([want["udio"]] * 2, abs=1e-5)
    column = ApexRewardFunction(model, condition_column="platform")
    values = column(
        prompts=["p", "q"],
        completions=completions,
        completion_ids=None,
        trainer_state=object(),
        log_metric=lambda name, value: None,
        platform=["suno", "udio"],
    )
    assert values == pytest.approx([want["suno"], want["udio"]], abs=1e-5)
    with pytest.raises(ConfigError, match="platform"):
        column(["p", "q"], completions)  # the trainer passed no such column
    with pytest.raises(UnknownConditionError, match="udio"):
        ApexRewardFunction(str(ckpt), condition="spotify")
    with pytest.raises(UnknownConditionError, match="no conditioning input"):
        ApexRewardFunction(base, condition_column="platform")


def test_batched_clips_and_verl_samples_each_get_their_own_condition(base, songs, tmp_path):
    """The dynamic batcher (server, verl async) scores clips with different conditions in one
    batch, each as the model scores it alone; verl reads a sample's condition from
    ``extra_info[condition_key]`` (its calling convention: keyword arguments per sample)."""
    from apex_reward.integrations import verl
    from apex_reward.integrations.model_cache import clear_model_cache
    from apex_reward.integrations.serving.batcher import DynamicBatcher

    model = conditioned(base, "token", seed=3)
    ckpt = model.save_pretrained(tmp_path / "cond")
    x = songs[0]
    with torch.no_grad():
        want = {c: model([x], SR, condition=c).reward.item() for c in [*VALUES, None]}
    assert len({round(v, 6) for v in want.values()}) == 3  # the conditions differ

    batcher = DynamicBatcher(model, max_batch=8, max_wait_s=0.2, condition="udio")

    async def clips():
        with pytest.raises(UnknownConditionError, match="suno"):
            batcher.submit("bad", x, SR, condition="spotify")  # this clip only
        futures = [batcher.submit(f"c{i}", x, SR, condition=c) for i, c in enumerate(VALUES)]
        futures.append(batcher.submit("default", x, SR))  # the batcher's condition
        return await asyncio.gather(*futures)

    batcher.start()
    try:
        suno, udio, default = asyncio.run(clips())
    finally:
        batcher.stop()
    assert suno.reward == pytest.approx(want["suno"], abs=1e-5)
    assert udio.reward == pytest.approx(want["udio"], abs=1e-5)
    assert default.reward == pytest.approx(want["udio"], abs=1e-5)

    clear_model_cache()
    kwargs = dict(model=str(ckpt), device="cpu", guard="off", condition_key="platform")
    sample = dict(data_source="music", solution_audio=(x.numpy(), SR), ground_truth=None)
    for platform in VALUES:
        out = verl.compute_score(**sample, extra_info={"platform": platform}, **kwargs)
        assert out["score"] == pytest.approx(want[platform], abs=1e-5)
    # a sample without the field gets `condition` (here none: the learned average)
    assert verl.compute_score(**sample, extra_info={}, **kwargs)["score"] == pytest.approx(
        want[None], abs=1e-5
    )

    async def async_samples():
        return await asyncio.gather(
            *(
                verl.compute_score_async(**sample, extra_info={"platform": p}, **kwargs)
                for p in VALUES
            )
        )

    try:
        outs = asyncio.run(async_samples())
    finally:
        verl.close_batchers()
    assert [o["score"] for o in outs] == pytest.approx([want[p] for p in VALUES], abs=1e-5)
    with pytest.raises(UnknownConditionError, match="udio"):
        verl.compute_score(**sample, extra_info={"platform": "spotify"}, **kwargs)
    base_ckpt = base.save_pretrained(tmp_path / "plain")
    with pytest.raises(ConfigError, match="no conditioning input"):
        verl.compute_score(**sample, extra_info={}, **{**kwargs, "model": str(base_ckpt)})
    clear_model_cache()


def test_server_requests_choose_their_condition(base, songs, tmp_path):
    """``POST /v1/score?condition=`` and ``/v1/score/batch?condition=`` score the request's
    clips for that audience; without it the server's ``--condition`` applies; an unknown one is
    a 422 naming the known values."""
    import httpx
    from server_harness import ThreadServer

    from apex_reward.integrations.serving.app import create_app
    from apex_reward.integrations.serving.config import ServeConfig

    model = conditioned(base, "embedding", seed=4)
    x = songs[1]
    with torch.no_grad():
        want = {c: model([x], SR, condition=c).reward.item() for c in VALUES}
    path = tmp_path / "x.wav"
    sf.write(str(path), x.numpy(), SR, subtype="FLOAT")
    body = path.read_bytes()
    headers = {"Content-Type": "audio/wav", "X-Audio-Name": "x.wav"}
    app = create_app(model, ServeConfig(warmup=False, guard="off", condition="suno"))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=120) as http:
        for query, expect in (("?condition=udio", "udio"), ("", "suno")):
            r = http.post(f"/v1/score{query}", content=body, headers=headers)
            assert r.status_code == 200, r.text
            assert r.json()["reward"] == pytest.approx(want[expect], abs=1e-5)
        clip = {"base64": base64.b64encode(body).decode(), "name": "x.wav"}
        r = http.post("/v1/score/batch?condition=udio", json={"clips": [clip, clip]})
        assert r.status_code == 200, r.text
        rewards = [row["reward"] for row in r.json()["results"]]
        assert rewards == pytest.approx([want["udio"]] * 2, abs=1e-5)
        r = http.post("/v1/score?condition=spotify", content=body, headers=headers)
        assert r.status_code == 422
        error = r.json()["error"]
        assert error["type"] == "UnknownConditionError" and "udio" in error["message"]
        # /v1/compare: both clips for the request's audience
        other = tmp_path / "y.wav"
        sf.write(str(other), songs[0].numpy(), SR, subtype="FLOAT")
        files = {"a": ("x.wav", body, "audio/wav"), "b": ("y.wav", other.read_bytes(), "audio/wav")}
        r = http.post("/v1/compare?condition=udio", files=files)
        assert r.status_code == 200, r.text
        with torch.no_grad():
            logit = model.preference_logits([x], [songs[0]], SR, condition="udio")
        assert r.json()["logit"] == pytest.approx(float(logit), abs=1e-4)


def test_openrlhf_in_process_reward_takes_a_condition(base, songs, tmp_path):
    """OpenRLHF's ``reward_func(queries, prompts, labels)`` (in-process) scores every sample for
    ``condition``; an unknown one, or a condition with a server URL, is a ConfigError."""
    import io

    from apex_reward.integrations.model_cache import clear_model_cache
    from apex_reward.integrations.openrlhf import OpenRLHFReward, OpenRLHFRewardConfig

    model = conditioned(base, "token", seed=5)
    ckpt = model.save_pretrained(tmp_path / "cond")
    buf = io.BytesIO()
    sf.write(buf, songs[0].numpy(), SR, format="FLAC")
    uri = "data:audio/flac;base64," + base64.b64encode(buf.getvalue()).decode()
    decoded = torch.from_numpy(sf.read(io.BytesIO(buf.getvalue()), dtype="float32")[0])
    with torch.no_grad():
        want = {c: model([decoded], SR, condition=c).reward.item() for c in VALUES}
    clear_model_cache()
    for c in VALUES:
        cfg = OpenRLHFRewardConfig(model=str(ckpt), score="reward", guard="off", condition=c)
        out = OpenRLHFReward(cfg)(["a song " + uri], ["a song"], [None])
        assert out["rewards"][0].item() == pytest.approx(want[c], abs=1e-5)
    bad = OpenRLHFReward(OpenRLHFRewardConfig(model=str(ckpt), condition="spotify"))
    with pytest.raises(UnknownConditionError, match="udio"):
        bad(["a song " + uri], ["a song"], [None])
    with pytest.raises(ConfigError, match="--condition"):
        OpenRLHFRewardConfig(url="http://127.0.0.1:1", condition="udio")
    clear_model_cache()


def test_preference_logits_score_both_songs_of_a_pair_for_its_condition(base, songs):
    model = conditioned(base, "token", seed=6)
    a, b = [songs[0], songs[1]], [songs[1], songs[2]]
    with torch.no_grad():
        logits = model.preference_logits(a, b, SR, condition=["suno", "udio"])
        for i, c in enumerate(["suno", "udio"]):
            ra = model([a[i]], SR, condition=c).reward
            rb = model([b[i]], SR, condition=c).reward
            want = (ra - rb) / model.config.preference.temperature
            assert float(logits[i]) == pytest.approx(float(want), abs=1e-5)
        same = model.preference_logits(a, b, SR, condition="udio")
        assert float(same[1]) == pytest.approx(float(logits[1]), abs=1e-5)
    with pytest.raises(UnknownConditionError, match="2 pairs"):
        model.preference_logits(a, b, SR, condition=["suno"])
