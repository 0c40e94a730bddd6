"""The reward server's parts: config and CLI flags, audio references, the batcher, metrics text,
and an in-process app (uvicorn in a thread) with the default, locked-down options."""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import os
import pickle
import re
import threading
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import REPO, synth_music
from server_harness import ThreadServer

from apex_reward.errors import ConfigError
from apex_reward.loading import ModelOptions
from apex_reward.scoring import score_waveforms

httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from apex_reward.integrations.serving import (  # noqa: E402
    ApexRewardClient,
    DynamicBatcher,
    OverloadedError,
    ServeConfig,
    create_app,
    find_audio_reference,
)
from apex_reward.integrations.serving import batcher as batcher_mod  # noqa: E402
from apex_reward.integrations.serving.metrics import ServerMetrics  # noqa: E402


@pytest.fixture(scope="module")
def fast_model(tiny_model):
    """Tiny model with 1 s segments (short clips cost a 1 s encoder pass)."""
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    return model


def _wav(seconds: float, sr: int = 24000, seed: int = 0, channels: int = 1) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth_music(seconds, sr, channels, seed=seed).T, sr, format="WAV")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# config and CLI


def test_serve_config_rejects_bad_values_naming_the_flag():
    m = ModelOptions("m")
    with pytest.raises(ConfigError, match="--max-batch"):
        ServeConfig(model=m, max_batch=0)
    with pytest.raises(ConfigError, match="--port"):
        ServeConfig(model=m, port=70000)
    with pytest.raises(ConfigError, match="--max-wait-ms"):
        ServeConfig(model=m, max_wait_ms=-1)
    cfg = ServeConfig()
    assert cfg.host == "127.0.0.1" and cfg.api_key_env is None and cfg.allow_dir is None
    assert cfg.model == ModelOptions()  # the shared model options, embedded


def test_serve_flags_come_from_the_dataclass_and_match_the_readme():
    from apex_reward.cli import build_parser
    from apex_reward.dataclass_io import dataclass_from_args

    parser = build_parser("serve")
    sub = next(a for a in parser._actions if a.dest == "command").choices["serve"]
    flags = {opt for a in sub._actions for opt in a.option_strings}
    for name in (*ServeConfig.__dataclass_fields__, *ModelOptions.__dataclass_fields__):
        assert "--" + name.replace("_", "-") in flags, name
    args = parser.parse_args(
        ["serve", "--model", "m", "--max-batch", "4", "--dtype", "bf16", "--no-warmup"]
        + ["--revision", "v2"]
    )
    cfg = dataclass_from_args(ServeConfig, args)
    assert (cfg.model.model, cfg.max_batch, cfg.model.dtype, cfg.warmup, cfg.port) == (
        "m",
        4,
        "bf16",
        False,
        8000,
    )
    assert cfg.model.revision == "v2" and cfg.model.device is None
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reward server", 1)[1].split("\n## ", 1)[0]
    usage = [line for line in section.splitlines() if line.startswith("apex-reward serve ")]
    assert usage
    for flag in re.findall(r"--[a-z][a-z-]+", " ".join(usage)):
        assert flag in flags, flag
    for flag in flags - {"-h", "--help", "--config"}:  # every option is documented
        assert flag in section or flag.replace("--no-", "--") in section, flag


def test_find_audio_reference_takes_the_last_data_or_file_uri():
    a = "data:audio/wav;base64,UklGRg=="
    b = "file:///data/gen/take%201.flac"
    assert find_audio_reference(f"prompt {a} then {b}.") == ("path", "/data/gen/take 1.flac")
    assert find_audio_reference(f"{b} then {a}") == ("base64", "UklGRg==")
    assert find_audio_reference("data:audio/x-flac;codecs=flac;base64,AAAA") == ("base64", "AAAA")
    assert find_audio_reference("no audio here, data:text/plain;base64,AAAA") is None


# ----------------------------------------------------------------------------------------------
# batching


def test_score_waveforms_isolates_a_clip_that_fails_inside_a_batch(fast_model):
    good = [torch.from_numpy(synth_music(1.5, 24000, seed=s)) for s in range(3)]
    bad = good[1].clone()
    bad[0, 10] = float("nan")  # slips past a missing check: the batched forward raises
    items = [("a", good[0], 24000), ("bad", bad, 24000), ("c", good[2], 24000)]
    res = score_waveforms(fast_model, items, segment_batch_size=8)
    assert [r.ok for r in res] == [True, False, True]
    assert res[1].error_type == "NonFiniteAudioError"
    ref = fast_model.score([(good[0], 24000), (good[2], 24000)], num_workers=0)
    assert abs(res[0].reward - ref[0].reward) <= 1e-5 and abs(res[2].reward - ref[1].reward) <= 1e-5


def test_batcher_groups_concurrent_clips_and_bounds_its_queue(fast_model, monkeypatch):
    sizes = []
    batcher = DynamicBatcher(
        fast_model, max_batch=8, max_wait_s=0.5, on_batch=lambda n, t, w: sizes.append(n)
    )
    batcher.start()
    clips = [torch.from_numpy(synth_music(1.2, 24000, seed=10 + i)) for i in range(8)]

    async def submit_all():
        return await asyncio.gather(
            *(batcher.score(f"c{i}", c, 24000) for i, c in enumerate(clips))
        )

    try:
        results = asyncio.run(submit_all())
    finally:
        batcher.stop()
    assert sizes == [8] and all(r.ok for r in results)
    ref = fast_model.score([(c, 24000) for c in clips], num_workers=0)
    assert all(abs(a.reward - b.reward) <= 1e-5 for a, b in zip(results, ref))

    # a busy worker: clips queue up to max_queue, then submit refuses
    real = batcher_mod.score_waveforms
    gate = threading.Event()

    def slow(*args, **kwargs):
        gate.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(batcher_mod, "score_waveforms", slow)
    busy = DynamicBatcher(fast_model, max_batch=1, max_wait_s=0.0, max_queue=2)
    busy.start()

    async def overload():
        first = busy.submit("first", clips[0], 24000)
        while busy.pending:  # the worker has taken it and blocks in the forward
            await asyncio.sleep(0.01)
        queued = [busy.submit(f"q{i}", clips[i], 24000) for i in (1, 2)]
        with pytest.raises(OverloadedError, match="limit is 2"):
            busy.submit("one too many", clips[3], 24000)
        gate.set()
        return await asyncio.gather(first, *queued)

    try:
        assert all(r.ok for r in asyncio.run(overload()))
    finally:
        gate.set()
        busy.stop()


def test_metrics_keep_their_names_labels_and_a_registry_per_app():
    queue = [3]
    one = ServerMetrics(queue_clips=lambda: queue[0], queue_audio_s=lambda: 1.5, ready=lambda: True)
    two = ServerMetrics(queue_clips=lambda: 0, queue_audio_s=lambda: 0.0, ready=lambda: False)
    one.count_error('a"b')
    one.count_error("PathNotAllowed")
    one.count_error("PathNotAllowed")
    one.observe_request("/v1/score", 413, 0.02)
    one.observe_request("/not/a/route", 404, 0.001)
    one.on_batch(4, 0.3, 0.01)
    text = one.render().decode()
    assert "# TYPE apex_errors_total counter\n" in text
    assert 'apex_errors_total{type="PathNotAllowed"} 2.0\n' in text
    assert 'apex_errors_total{type="a\\"b"} 1.0\n' in text  # label values are escaped
    assert 'apex_requests_total{endpoint="/v1/score",status="413"} 1.0\n' in text
    assert 'apex_requests_total{endpoint="other",status="404"} 1.0\n' in text
    assert 'apex_batch_size_bucket{le="2.0"} 0.0\napex_batch_size_bucket{le="4.0"} 1.0\n' in text
    assert "apex_batch_size_sum 4.0\n" in text and "apex_batch_size_count 1.0\n" in text
    assert 'apex_request_duration_seconds_count{endpoint="/v1/score"} 1.0\n' in text
    assert "apex_queue_clips 3.0\n" in text and "apex_ready 1.0\n" in text
    assert "apex_queue_audio_seconds 1.5\n" in text
    queue[0] = 7  # gauges are read at each scrape
    assert "apex_queue_clips 7.0\n" in one.render().decode()
    for name in ("apex_clips_total", "apex_audio_seconds_total", "apex_inflight_requests"):
        assert f"# TYPE {name}" in text, name
    for name in ("apex_batch_duration_seconds", "apex_batch_wait_seconds"):
        assert f"# TYPE {name} histogram" in text, name
    # a second app in the same process has its own counts (no global registry)
    other = two.render().decode()
    assert "apex_errors_total{" not in other and "apex_ready 0.0\n" in other


# ----------------------------------------------------------------------------------------------
# an in-process app with the defaults: no key, no server-side paths


def test_default_app_refuses_paths_limits_chunked_bodies_and_isolates_bad_clips(
    fast_model, tmp_path
):
    (tmp_path / "x.wav").write_bytes(_wav(1.5))
    app = create_app(fast_model, ServeConfig(max_body_mb=0.5, max_batch=8))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        deadline = time.monotonic() + 60
        while http.get("/ready").status_code != 200:  # the lifespan warms the model up
            assert time.monotonic() < deadline
            time.sleep(0.1)
        info = http.get("/v1/info").json()  # no key configured: no 401
        assert info["paths_allowed"] is False and info["auth_required"] is False

        r = http.post("/v1/score", json={"path": str(tmp_path / "x.wav")})
        assert r.status_code == 403 and r.json()["error"]["type"] == "PathNotAllowed"
        assert "--allow-dir" in r.json()["error"]["message"]

        def chunks():  # no Content-Length: the limit is enforced while reading
            for _ in range(8):
                yield b"\0" * 100_000

        r = http.post("/v1/score", content=chunks(), headers={"Content-Type": "audio/wav"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "PayloadTooLarge"

        clips = [
            {"base64": base64.b64encode(_wav(1.2, seed=1)).decode(), "name": "one"},
            {"base64": base64.b64encode(b"not audio").decode(), "name": "junk"},
            {"path": "x.wav"},
            "not an object",
            {"base64": base64.b64encode(_wav(1.4, 22050, seed=2)).decode()},
        ]
        r = http.post("/v1/score/batch", json={"clips": clips})
        assert r.status_code == 200
        rows = r.json()["results"]
        assert [("error" in row) for row in rows] == [False, True, True, True, False]
        assert [row["error"]["type"] for row in rows if "error" in row] == [
            "AudioDecodeError",
            "PathNotAllowed",
            "InvalidRequest",
        ]
        ref = fast_model.score(
            [decode(_wav(1.2, seed=1)), decode(_wav(1.4, 22050, seed=2))], num_workers=0
        )
        assert abs(rows[0]["reward"] - ref[0].reward) <= 1e-5
        assert abs(rows[4]["reward"] - ref[1].reward) <= 1e-5

        query = f"make a song: file://{tmp_path / 'x.wav'}"
        r = http.post("/get_reward", json={"query": [query], "prompts": ["make a song:"]})
        body = r.json()
        assert r.status_code == 200 and body["rewards"] == [0.0]
        assert body["errors"][0]["type"] == "PathNotAllowed"

        metrics = http.get("/metrics").text
        assert 'apex_errors_total{type="PathNotAllowed"} 3' in metrics  # request, clip, sample
        assert 'apex_requests_total{endpoint="/v1/score",status="413"} 1' in metrics


def decode(data: bytes):
    from apex_reward.audio import decode_audio_bytes

    return decode_audio_bytes(data)


def test_client_pickles_without_connection_or_env_key(monkeypatch):
    monkeypatch.setenv("APEX_REWARD_API_KEY", "from-env")
    client = ApexRewardClient("http://127.0.0.1:1/", timeout=5)
    client._client()  # opens a pool
    blob = pickle.dumps(client)
    assert b"from-env" not in blob
    clone = pickle.loads(blob)
    assert clone._http is None and clone.url == "http://127.0.0.1:1"
    assert clone._headers() == {"Authorization": "Bearer from-env"}
    assert clone.__name__ == "apex_remote_reward"
    arr = np.zeros((2, 100), np.float32)
    with pytest.raises(Exception, match="samples, channels"):
        clone._part(0, arr.T, 24000)


def test_compare_logit_uses_the_fitted_preference_head(fast_model):
    from apex_reward.config import PreferenceHeadConfig
    from apex_reward.integrations.serving import preference_logit
    from apex_reward.preference import PreferenceHead, pairwise_feature_names

    names = pairwise_feature_names(fast_model.score_names)
    rng = np.random.default_rng(0)
    cfg = PreferenceHeadConfig(
        features=names,
        coef=rng.normal(size=len(names)).tolist(),
        intercept=0.2,
        mean=rng.normal(size=len(names)).tolist(),
        scale=rng.uniform(0.5, 2.0, size=len(names)).tolist(),
    )
    model = copy.deepcopy(fast_model)
    model.config.preference.head = cfg
    model.preference_head = PreferenceHead(cfg)
    a, b = (torch.from_numpy(synth_music(1.5, 24000, seed=s)) for s in (8, 9))
    ra, rb = score_waveforms(model, [("a", a, 24000), ("b", b, 24000)])
    with torch.inference_mode():
        direct = model.preference_logits([a], [b], 24000, is_instrumental=1.0)
    got = preference_logit(model, ra, rb, 1.0)
    assert abs(got - float(direct[0])) <= 1e-4
    assert abs(got - (ra.reward - rb.reward)) > 1e-3  # not Bradley-Terry


def test_missing_serve_extra_is_named(fast_model, monkeypatch):
    import sys

    from apex_reward.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingDependencyError, match=r"apex-reward\[serve\]"):
        create_app(fast_model)


def test_key_in_the_url_without_the_flag_gets_a_401_naming_the_flag(fast_model, monkeypatch):
    monkeypatch.setenv("APEX_TEST_KEY", "s3cret")
    app = create_app(fast_model, ServeConfig(api_key_env="APEX_TEST_KEY", warmup=False))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        r = http.get("/v1/info?api_key=s3cret")
        assert r.status_code == 401
        assert "--allow-query-api-key" in r.json()["error"]["message"]
        r = http.get("/v1/info", headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200


def test_each_clip_is_checked_once(fast_model, monkeypatch):
    """frontend.check is a full pass over the samples: model.score runs it once per input (when
    loading), and the server's batch worker not at all (clips were checked in decode threads)."""
    calls = []
    real = fast_model.frontend.check
    monkeypatch.setattr(
        fast_model.frontend,
        "check",
        lambda wav, sr, where: (calls.append(where), real(wav, sr, where)),
    )
    clips = [torch.from_numpy(synth_music(1.5, 24000, seed=s)) for s in range(3)]
    assert all(r.ok for r in fast_model.score([(c, 24000) for c in clips], num_workers=0))
    assert len(calls) == 3
    calls.clear()
    res = score_waveforms(
        fast_model, [(str(i), c, 24000) for i, c in enumerate(clips)], checked=True
    )
    assert all(r.ok for r in res) and calls == []
    score_waveforms(fast_model, [("x", clips[0], 24000)])
    assert calls == ["waveforms[0]"]


def test_process_settings_apply_to_the_server_and_each_ray_replica(monkeypatch):
    """``tune_process`` (``apex-reward serve`` and every Ray Serve replica): the oneDNN cache
    capacity in the environment (kept when already set), torch threads, glibc's arena cap."""
    import sys

    import torch

    from apex_reward.integrations.serving.process import limit_malloc_arenas, tune_process

    threads = torch.get_num_threads()
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    try:
        tune_process(ServeConfig(threads=1, onednn_cache_capacity=64, malloc_arena_max=2))
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
        assert torch.get_num_threads() == 1
        torch.set_num_threads(threads)
        # a replica without --threads gets the caller's default; a set variable is kept
        tune_process(ServeConfig(onednn_cache_capacity=8), default_threads=2)
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert limit_malloc_arenas(0) is False
    assert limit_malloc_arenas(4) is sys.platform.startswith("linux")
