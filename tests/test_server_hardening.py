"""The reward server under hostile clients: decompression bombs, slow and stalled connections,
foreign Host/Origin headers, malformed HTTP, disconnecting clients, keys in the access log, and
the README's server example.

One real ``apex-reward serve`` (child process, loopback, API key, short timeouts) serves the
end-to-end tests; the cancellation test runs an app in a thread so the model can be slowed down.
"""

from __future__ import annotations

import concurrent.futures
import copy
import logging
import re
import subprocess
import time

import numpy as np
import pytest
from conftest import REPO, synth_music
from server_faults import (
    PeakSampler,
    flac_bomb,
    json_of_response,
    open_stalled,
    raw_exchange,
    read_until_closed,
    status_of_response,
    wav_bytes,
)
from server_harness import ServerProcess, ThreadServer

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from apex_reward.integrations.serving import ServeConfig, create_app  # noqa: E402
from apex_reward.integrations.serving import batcher as batcher_mod  # noqa: E402
from apex_reward.integrations.serving.batcher import OverloadedError  # noqa: E402
from apex_reward.integrations.serving.hosts import HostPolicy, host_name  # noqa: E402
from apex_reward.integrations.serving.limits import (  # noqa: E402
    ClipHeader,
    DecodeBudget,
    DecodedSizeTooLarge,
    RequestDecodedTooLarge,
)
from apex_reward.integrations.serving.transport import RedactApiKey, redact_query  # noqa: E402

KEY = "hardening-key-0123456789"
AUTH = {"X-API-Key": KEY}
IDLE_S, BODY_S = 3.0, 8.0
REQUEST_SAMPLES = 2_000_000


def _clip(seconds: float = 1.0, sr: int = 24000, seed: int = 0) -> bytes:
    return wav_bytes(synth_music(seconds, sr, 1, seed=seed), sr)


# ----------------------------------------------------------------------------------------------
# the parts, without a server


def test_decode_budget_counts_samples_per_clip_request_and_queue():
    budget = DecodeBudget(clip_samples=1000, request_samples=1500, queue_samples=2000)
    assert budget.cost(ClipHeader(48000, 2, 400), "a") == 800
    assert budget.cost(ClipHeader(48000, 2, 0), "streamed") == 1000  # unknown: the whole limit
    assert budget.cost(ClipHeader(48000, 2, 2**63 - 1), "streamed FLAC") == 1000
    assert budget.max_frames(ClipHeader(48000, 4, 0)) == 250
    with pytest.raises(DecodedSizeTooLarge, match="--max-clip-samples") as e:
        budget.cost(ClipHeader(192000, 4, 300), "bomb")
    assert e.value.source == "bomb" and "1,200 samples x channels" in str(e.value)
    with pytest.raises(RequestDecodedTooLarge, match="--max-request-samples"):
        budget.admit([800, 800])
    first = budget.admit([800, 600])
    assert budget.in_use == 1400
    with pytest.raises(OverloadedError, match="--max-queue-samples"):
        budget.admit([700])
    first.shrink(0, 300)  # decoded smaller than announced
    assert budget.in_use == 900
    second = budget.admit([700])
    first.release(0)
    first.release(0)  # idempotent
    first.release_all()
    second.release_all()
    assert budget.in_use == 0
    assert budget.admit([1500]).held == 1500  # an empty queue admits any allowed request


def test_redaction_decodes_the_parameter_name():
    for target in (
        "/get_reward?api_key=SECRET",
        "/get_reward?api%5Fkey=SECRET",
        "/get_reward?%61pi_key=SECRET&x=1",
        "/get_reward?x=1&api%5fkey=SECRET",
    ):
        assert "SECRET" not in redact_query(target), target
    assert redact_query("/v1/score?x=1&apikey=v") == "/v1/score?x=1&apikey=v"
    # uvicorn's access-log record, re-typed: (client, method, full path, HTTP version, status)
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/get_reward?api%5Fkey=SECRET", "1.1", 200),
        None,
    )
    assert RedactApiKey().filter(record)
    assert "SECRET" not in record.getMessage() and "api%5Fkey=***" in record.getMessage()


def test_host_policy():
    assert host_name("[::1]:8000") == "::1" and host_name("LocalHost.:80") == "localhost"
    policy = HostPolicy(["127.0.0.1", "localhost", "::1"], [], bind_host="0.0.0.0")
    assert policy.refusal("GET", {"host": "127.0.0.1:8000"}, False) is None
    assert policy.refusal("GET", {"host": "[::1]:8000"}, False) is None
    assert type(policy.refusal("GET", {"host": "evil.example"}, False)).__name__ == (
        "HostNotAllowed"
    )
    assert policy.refusal("GET", {"host": "evil.example"}, True) is None  # probes
    assert (
        HostPolicy(["localhost"], bind_host="10.1.2.3").refusal(
            "GET", {"host": "10.1.2.3:80"}, False
        )
        is None
    )
    local = {"host": "localhost"}
    assert policy.refusal("GET", {**local, "origin": "http://evil.example"}, False) is None
    refused = policy.refusal("POST", {**local, "origin": "http://evil.example"}, False)
    assert type(refused).__name__ == "OriginNotAllowed"
    assert policy.refusal("POST", {**local, "origin": "null"}, False) is not None
    ok = HostPolicy(["localhost"], ["https://app.example.org"])
    assert ok.refusal("POST", {**local, "origin": "https://app.example.org/"}, False) is None


# ----------------------------------------------------------------------------------------------
# one real server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tiny_model):
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    ckpt = tmp_path_factory.mktemp("hard") / "tiny-1s"
    model.save_pretrained(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def server(checkpoint):
    args = [
        "--threads",
        "1",
        "--api-key-env",
        "APEX_HARD_KEY",
        "--allow-query-api-key",
        "--max-batch",
        "8",
        "--max-request-samples",
        str(REQUEST_SAMPLES),
        "--idle-timeout-s",
        str(IDLE_S),
        "--body-timeout-s",
        str(BODY_S),
        "--log-level",
        "info",
    ]
    log_path = checkpoint.parent / "server.log"
    env = {"APEX_HARD_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    with ServerProcess(checkpoint, args, env=env, log_path=log_path) as proc:
        yield proc
    log = log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert KEY not in log  # redacted from the access log, however the query spelled it


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as client:
        yield client


def test_bomb_is_refused_before_decoding_and_memory_stays_flat(server, http):
    """20 decompression bombs (120 s of 4-channel 192 kHz FLAC silence: 0.4 MB that decode to
    92 M float32 values, 0.37 GB) interleaved with 200 good requests: each bomb gets 422 naming
    the limit, each good clip its scores, and the server's RSS stays within 200 MB of idle."""
    bomb = flac_bomb(120.0)
    assert len(bomb) < 1_000_000
    good = [_clip(1.0, seed=i) for i in range(8)]
    audio = {"Content-Type": "audio/flac"}

    def post_good(i: int) -> tuple[str, int, dict]:
        r = http.post("/v1/score", files={"file": (f"g{i}.wav", good[i % len(good)])})
        return "good", r.status_code, r.json()

    def post(i: int) -> tuple[str, int, dict]:
        if i % 11 == 5:
            r = http.post("/v1/score", content=bomb, headers={**audio, "X-Audio-Name": "bomb"})
            return "bomb", r.status_code, r.json()
        return post_good(i)

    for i in range(16):  # warm up: allocator pools, kernels, thread stacks
        assert post_good(i)[1] == 200
    time.sleep(0.5)
    idle = server.rss_bytes()
    with (
        PeakSampler(server.rss_bytes) as rss,
        concurrent.futures.ThreadPoolExecutor(4) as pool,
    ):
        t0 = time.perf_counter()
        outcomes = list(pool.map(post, range(220)))
        elapsed = time.perf_counter() - t0
    bombs = [o for o in outcomes if o[0] == "bomb"]
    goods = [o for o in outcomes if o[0] == "good"]
    assert len(bombs) == 20 and len(goods) == 200
    for _, status, body in bombs:
        assert status == 422, body
        assert body["error"]["type"] == "DecodedSizeTooLarge"
        assert "--max-clip-samples" in body["error"]["message"]
    assert all(status == 200 and "reward" in body for _, status, body in goods)
    grown = (rss.peak - idle) / 2**20
    assert grown < 200, f"RSS grew {grown:.0f} MB over idle ({idle / 2**20:.0f} MB)"
    assert elapsed < 120


def test_request_over_the_decoded_budget_gets_413(http):
    clip = _clip(30.0, sr=24000)  # 720,000 samples: three exceed the request's 2,000,000
    files = [("file", (f"c{i}.wav", clip)) for i in range(3)]
    r = http.post("/v1/score/batch", files=files)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["type"] == "RequestDecodedTooLarge"
    assert "--max-request-samples" in r.json()["error"]["message"]
    r = http.post("/v1/score/batch", files=files[:2])
    assert r.status_code == 200 and all("reward" in row for row in r.json()["results"])


def test_slow_bodies_are_cut_off_and_good_requests_still_answered(server, http):
    """100 connections declare a 60 MB body, send 1 kB and stall: each gets 408 and is closed
    once --idle-timeout-s passes, while good requests keep being answered."""
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
        f"X-API-Key: {KEY}\r\nContent-Length: 60000000\r\n\r\n"
    ).encode()
    stalled = open_stalled(server.url, 100, head, b"\0" * 1024)
    t0 = time.monotonic()
    for i in range(5):
        r = http.post("/v1/score", files={"file": ("g.wav", _clip(1.0, seed=i))})
        assert r.status_code == 200, r.text
    answers = read_until_closed(stalled, timeout=IDLE_S + 40)
    waited = time.monotonic() - t0
    assert all(a is not None for a in answers), f"{answers.count(None)} of 100 still open"
    assert {status_of_response(a) for a in answers} == {408}
    error = json_of_response(answers[0])["error"]
    assert error["type"] == "RequestTimeout" and "--idle-timeout-s" in error["message"]
    assert waited >= IDLE_S - 0.5
    assert http.get("/health").status_code == 200


def test_trickled_body_hits_the_body_deadline(server):
    head = (
        "POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
        f"X-API-Key: {KEY}\r\nContent-Length: 1000000\r\n\r\n"
    ).encode()
    (sock,) = open_stalled(server.url, 1, head)
    t0 = time.monotonic()
    deadline = t0 + BODY_S + 30
    while time.monotonic() < deadline:  # a byte a second: never idle, never done
        try:
            sock.sendall(b"\0")
        except OSError:
            break
        time.sleep(1.0)
        sock.setblocking(False)
        try:
            if sock.recv(1, 2):  # MSG_PEEK: the answer has arrived
                break
        except BlockingIOError:
            pass
        finally:
            sock.setblocking(True)
    sock.settimeout(10)
    (answer,) = read_until_closed([sock], timeout=10)
    assert status_of_response(answer) == 408
    assert "--body-timeout-s" in json_of_response(answer)["error"]["message"]
    assert time.monotonic() - t0 >= BODY_S - 0.5


def test_slow_or_missing_headers_are_timed_out(server):
    partial = open_stalled(server.url, 4, b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    silent = open_stalled(server.url, 2, b"")
    answers = read_until_closed(partial + silent, timeout=IDLE_S + 30)
    assert all(a is not None for a in answers)
    assert {status_of_response(a) for a in answers} == {408}
    assert json_of_response(answers[0])["error"]["type"] == "RequestTimeout"


def test_unparseable_requests_get_the_json_error_shape(server):
    for bad in (
        b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
        b"Content-Length: 7\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ):
        raw = raw_exchange(server.url, bad)
        assert status_of_response(raw) == 400, raw
        assert b"application/json" in raw.partition(b"\r\n\r\n")[0]
        assert json_of_response(raw)["error"]["type"] == "InvalidRequest"


def test_foreign_host_and_origin_are_refused(server, http):
    clip = {"file": ("g.wav", _clip(1.0))}
    r = http.get("/v1/info", headers={"Host": "rebind.attacker.example:8000"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "HostNotAllowed"
    assert http.get("/health", headers={"Host": "pod-10-1-2-3"}).status_code == 200
    assert http.get("/v1/info", headers={"Host": "localhost:1"}).status_code == 200
    # a web page's cross-origin form post (a CORS "simple request"), even with a key
    r = http.post("/v1/score", files=clip, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "OriginNotAllowed"
    assert http.post("/v1/score", files=clip).status_code == 200  # scripts send no Origin


def test_query_key_spelled_encoded_is_accepted_and_not_logged(server):
    with httpx.Client(base_url=server.url, timeout=60) as anon:
        r = anon.post(f"/v1/score?api%5Fkey={KEY}", files={"file": ("g.wav", _clip(1.0))})
        assert r.status_code == 200, r.text
    time.sleep(0.3)
    log = server.log_text()
    assert re.search(r"api%5Fkey=\*\*\*", log), log[-2000:]
    assert KEY not in log


# ----------------------------------------------------------------------------------------------
# a client that gives up: its clips leave the queue


def test_clips_of_a_client_that_went_away_are_not_scored(tiny_model, monkeypatch):
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    real = batcher_mod.score_waveforms
    scored: list[int] = []

    def slow(model, items, **kwargs):
        time.sleep(0.2)
        scored.append(len(items))
        return real(model, items, **kwargs)

    monkeypatch.setattr(batcher_mod, "score_waveforms", slow)
    app = create_app(model, ServeConfig(warmup=False, max_batch=1))
    files = [("file", (f"c{i}.wav", _clip(1.0, seed=i))) for i in range(30)]
    with ThreadServer(app) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            assert http.post("/v1/score", files=[files[0]]).status_code == 200
            scored.clear()
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/score/batch", files=files, timeout=1.0)
        batcher = app.state.apex.batcher
        deadline = time.monotonic() + 10
        while batcher.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.pending == 0
        time.sleep(0.6)
        settled = sum(scored)
        time.sleep(0.6)
        assert sum(scored) == settled and settled < 15, scored
        assert app.state.apex.budget.in_use == 0
        with httpx.Client(base_url=url, timeout=60) as http:
            assert 'apex_errors_total{type="ClientGone"}' in http.get("/metrics").text


# ----------------------------------------------------------------------------------------------
# the README's example can be followed


def test_readme_server_example_exports_the_key_for_curl(tmp_path):
    """Run the README's serve line and a curl line in one bash session, with ``apex-reward``,
    ``curl`` and ``openssl`` replaced by functions that record the key each one sees (from its
    environment, i.e. what a child process would get)."""
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reward server", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    setup = next(b for b in blocks if "apex-reward serve" in b)
    curl = next(line for b in blocks for line in b.splitlines() if line.startswith("curl "))
    script = f"""
set -e
openssl() {{ echo 0123456789abcdef0123456789abcdef; }}
apex-reward() {{ bash -c 'printf "%s" "$APEX_KEY"' > "$OUT/server_key"; }}
curl() {{ bash -c 'printf "%s" "$APEX_KEY"' > "$OUT/child_key"; printf "%s\\n" "$@" > "$OUT/curl_args"; }}
{setup}
wait
{curl}
"""
    subprocess.run(
        ["bash", "-c", script], check=True, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)}
    )
    server_key = (tmp_path / "server_key").read_text()
    assert server_key == "0123456789abcdef0123456789abcdef"
    assert (tmp_path / "child_key").read_text() == server_key
    assert f"X-API-Key: {server_key}" in (tmp_path / "curl_args").read_text().splitlines()


def test_bad_budget_flags_are_refused():
    from apex_reward.errors import ConfigError

    for field in ("max_clip_samples", "body_timeout_s", "idle_timeout_s"):
        with pytest.raises(ConfigError, match=field.replace("_", "-")):
            ServeConfig(**{field: 0})
    assert np.isfinite(ServeConfig().body_timeout_s)
