"""Beyond one server: the client's round-robin with failover over several servers, and the HTTP
API on Ray Serve replicas (skipped without ray)."""

from __future__ import annotations

import copy
import importlib.util
import io
import threading
import time
from collections import Counter

import pytest
import soundfile as sf
from conftest import synth_music
from server_harness import ServerProcess, ThreadServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from apex_reward.integrations.serving import (  # noqa: E402
    ApexRewardClient,
    ServeConfig,
    create_app,
)

SR = 24000


@pytest.fixture(scope="module")
def fast_model(tiny_model):
    """Tiny model with 1 s segments (short clips cost a 1 s encoder pass)."""
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    return model


def _counting(app, counts: Counter, key: str):
    """``app`` counting the score requests it answers under ``counts[key]``."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/score"):
            counts[key] += 1
        await app(scope, receive, send)

    return wrapped


def test_client_round_robin_fails_over_when_a_server_stops_mid_run(fast_model):
    clips = [(synth_music(1.0 + 0.1 * (i % 4), SR, seed=i)[0], SR) for i in range(24)]
    config = ServeConfig(max_wait_ms=1.0)
    expected = [r.reward for r in fast_model.score(clips, batch_size=4, guard=config.guard)]
    counts: Counter = Counter()
    server_a = ThreadServer(_counting(create_app(fast_model, config), counts, "a"))
    server_b = ThreadServer(_counting(create_app(copy.deepcopy(fast_model), config), counts, "b"))
    with server_a as url_a:
        url_b = server_b.__enter__()
        stopped = False
        try:
            # retries=0: no request may be saved by a backed-off retry, only by failover
            client = ApexRewardClient(
                [url_a, url_b], retries=0, max_clips_per_request=1, concurrency=1, timeout=60
            )
            out: list = []
            worker = threading.Thread(target=lambda: out.extend(client.score(clips)))
            worker.start()
            deadline = time.monotonic() + 120
            while counts["b"] < 4 and time.monotonic() < deadline:
                time.sleep(0.01)
            server_b.__exit__(None, None, None)  # stop one server mid-run
            stopped = True
            served_by_b = counts["b"]
            worker.join(180)
        finally:
            if not stopped:
                server_b.__exit__(None, None, None)
    assert not worker.is_alive()
    assert len(out) == len(clips) and all(r.ok for r in out), [r.error for r in out]
    assert [r.reward for r in out] == pytest.approx(expected, abs=1e-5)
    # both served before the stop; after it, every remaining clip went to server a
    assert 4 <= served_by_b < len(clips) and counts["a"] >= len(clips) - served_by_b
    assert counts["b"] == served_by_b


def test_client_takes_a_list_of_urls_and_names_a_bad_one():
    client = ApexRewardClient(["http://127.0.0.1:1/", "http://127.0.0.1:2"])
    assert client.urls == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert client.url == "http://127.0.0.1:1"
    # round-robin: each request starts at the next server
    assert client._rotation.order()[0] != client._rotation.order()[0]
    with pytest.raises(ValueError, match="server URL"):
        ApexRewardClient([])


# ----------------------------------------------------------------------------------------------
# Ray Serve

ray_missing = importlib.util.find_spec("ray") is None


@pytest.mark.skipif(ray_missing, reason="ray is not installed (pip install 'apex-reward[ray]')")
def test_ray_serve_two_cpu_replicas_score_like_in_process(fast_model, tmp_path):
    ckpt = tmp_path / "model"
    fast_model.save_pretrained(ckpt)
    waves = [synth_music(1.0 + 0.05 * (i % 8), SR, seed=200 + i)[0] for i in range(64)]
    expected = [
        r.reward
        for r in fast_model.score([(w, SR) for w in waves], batch_size=8, guard=ServeConfig().guard)
    ]
    bodies = []
    for w in waves:
        buf = io.BytesIO()
        sf.write(buf, w, SR, format="WAV", subtype="FLOAT")
        bodies.append(buf.getvalue())
    args = ["--ray", "--replicas", "2", "--threads", "1", "--device", "cpu", "--max-wait-ms", "5"]
    # Ray starts a local instance: GCS, raylet, the Serve controller and proxy, two replicas
    with ServerProcess(ckpt, args, env={"RAY_USAGE_STATS_ENABLED": "0"}, ready_timeout=300) as srv:
        replicas: Counter = Counter()
        rewards: list = [None] * len(bodies)

        def send(i: int, http: httpx.Client) -> None:
            files = {"file": (f"clip{i}.wav", bodies[i], "audio/wav")}
            resp = http.post(f"{srv.url}/v1/score", files=files)
            assert resp.status_code == 200, resp.text
            replicas[resp.headers["x-apex-replica"]] += 1
            rewards[i] = resp.json()["reward"]

        def burst(http: httpx.Client) -> None:
            threads = [
                threading.Thread(target=lambda k=k: [send(i, http) for i in range(k, 64, 8)])
                for k in range(8)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(300)

        with httpx.Client(timeout=120) as http:
            burst(http)
            # Ray's router may keep a short burst on one replica (it picks by queue length and a
            # replica that answers fast stays empty): send the same requests again, a bounded
            # number of times, until the other replica has answered too
            for _ in range(3):
                if len(replicas) == 2:
                    break
                burst(http)
        # SIGTERM: the server shuts the deployment and its local Ray instance down
        t0 = time.monotonic()
        srv.stop(timeout=120)
        assert srv.process.returncode == 0 and time.monotonic() - t0 < 120
    assert sum(replicas.values()) % 64 == 0
    assert len(replicas) == 2, replicas  # both replicas served
    assert rewards == pytest.approx(expected, abs=1e-4)
