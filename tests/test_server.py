"""The reward server, end to end: the real ``apex-reward serve`` in a child process on loopback.

One server (API key, ``--allow-dir``, small body and audio limits) serves these end-to-end tests:

1. 200 concurrent score requests all succeed, equal in-process ``model.score``, and the metrics
   show batches of more than one clip;
2. 1,000 requests interleaving 200 malformed ones of every kind with good ones: each bad one gets
   its 4xx, each good one its correct scores, the server stays up; sent twice, the first 1,000
   warm the server up and its resident memory (``/proc/PID/status`` VmRSS of the server
   process) grows by at most 10 % over the second 1,000 (a leak, not warm-up, fails it);
3. ``/get_reward`` answers a request shaped exactly like OpenRLHF's remote reward client sends it,
   with a reply OpenRLHF can consume;
4. ``ApexRewardClient`` used as a TRL reward function gives the in-process rewards.

Speed: the test model is the tiny random encoder with 1 s front-end segments (the served
checkpoint records ``segment_seconds``), so a 1–2 s clip costs a 1–2 s encoder pass instead of a
zero-padded 30 s one; every code path is the one a 30 s model takes.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import math
import pickle
import re

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_music
from server_harness import ServerProcess

from apex_reward import ApexRewardModel
from apex_reward.audio import decode_audio_bytes

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from apex_reward.integrations.serving import ApexRewardClient, RemoteError  # noqa: E402

KEY = "test-key-0123456789"
AUTH = {"X-API-Key": KEY}
N_CLIPS = 200
RATES = (16000, 22050, 24000, 44100, 48000)
FORMATS = (("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("WAV", "FLOAT"))


# ----------------------------------------------------------------------------------------------
# fixtures: checkpoint, clips, their in-process scores, the server


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_model):
    """(checkpoint dir, the same model loaded in-process)."""
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    ckpt = tmp_path_factory.mktemp("serve") / "tiny-1s"
    model.save_pretrained(ckpt)
    return ckpt, ApexRewardModel.from_pretrained(ckpt)


def _encode(x: np.ndarray, sr: int, fmt: str, subtype: str) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x.T, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.fixture(scope="module")
def clips():
    """200 distinct clips: 1.0-1.9 s, 5 sample rates, mono/stereo, PCM16 WAV / FLAC / float WAV."""
    out = []
    for i in range(N_CLIPS):
        sr = RATES[i % len(RATES)]
        fmt, subtype = FORMATS[i % len(FORMATS)]
        x = synth_music(1.0 + 0.15 * (i % 7), sr, channels=1 + i % 2, seed=1000 + i)
        suffix = ".flac" if fmt == "FLAC" else ".wav"
        out.append({"name": f"clip{i:03d}{suffix}", "data": _encode(x, sr, fmt, subtype)})
    return out


@pytest.fixture(scope="module")
def reference(served_model, clips):
    """In-process ``model.score`` of every clip (decoded exactly as the server decodes it), under
    the server's default guard policy (``penalize``)."""
    _, model = served_model
    decoded = [decode_audio_bytes(c["data"], name=c["name"]) for c in clips]
    results = model.score(decoded, batch_size=16, num_workers=0, guard="penalize")
    assert all(r.ok for r in results)
    return results


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory, clips):
    """The server's --allow-dir: a few of the clips as files, and a secret file next to it."""
    root = tmp_path_factory.mktemp("allowed")
    d = root / "audio"
    d.mkdir()
    for c in clips[:10]:
        (d / c["name"]).write_bytes(c["data"])
    (root / "secret.wav").write_bytes(clips[0]["data"])  # outside the allowed dir
    return d


@pytest.fixture(scope="module")
def server(served_model, audio_dir):
    ckpt, _ = served_model
    args = [
        "--threads",  # one torch thread: steady on a shared 2-core CI machine
        "1",
        "--api-key-env",
        "APEX_TEST_KEY",
        "--allow-query-api-key",
        "--allow-dir",
        str(audio_dir),
        "--max-batch",
        "32",
        "--max-wait-ms",
        "25",
        "--max-body-mb",
        "1",
        "--max-audio-s",
        "8",
        "--no-access-log",
        "--log-level",
        "warning",
    ]
    proc = ServerProcess(ckpt, args, env={"APEX_TEST_KEY": KEY, "HF_HUB_OFFLINE": "1"})
    proc.start()
    yield proc
    proc.stop()
    log = proc.log_text()
    assert "Traceback" not in log, log[-3000:]


def _metric(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else "") + r" (\S+)"
    m = re.search(r"^" + pattern + r"$", text, flags=re.M)
    return float(m.group(1)) if m else 0.0


def _metrics(server) -> str:
    r = httpx.get(f"{server.url}/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200
    return r.text


def _assert_matches(got: dict, ref) -> None:
    """Server answer == in-process ScoreResult: reward within 1e-5; every score within 1e-5
    relative to its magnitude (streams/likes/popularity are on 0-100, where one float32 ulp is
    ~8e-6 and batch composition moves the encoder's float32 sums by an ulp or two)."""
    assert abs(got["reward"] - ref.reward) <= 1e-5, (got["reward"], ref.reward)
    assert set(got["scores"]) == set(ref.scores)
    for k, v in ref.scores.items():
        assert abs(got["scores"][k] - v) <= 1e-5 * max(1.0, abs(v)), (k, got["scores"][k], v)


def _score_request(clip: dict, style: int) -> dict:
    """Request kwargs for /v1/score in one of three encodings."""
    if style == 0:
        return {"files": {"file": (clip["name"], clip["data"], "application/octet-stream")}}
    if style == 1:
        ctype = "audio/flac" if clip["name"].endswith(".flac") else "audio/wav"
        return {
            "content": clip["data"],
            "headers": {"Content-Type": ctype, "X-Audio-Name": clip["name"]},
        }
    body = {"base64": base64.b64encode(clip["data"]).decode(), "name": clip["name"]}
    return {"json": body}


async def _send_all(url: str, requests: list[tuple[str, str, dict]], concurrency: int):
    """Send (method, path, kwargs) requests with at most ``concurrency`` in flight; keeps order."""
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(method, path, kw):
            kw = dict(kw)
            headers = {**AUTH, **kw.pop("headers", {})}
            for k in kw.pop("drop_headers", ()):
                headers.pop(k, None)
            async with sem:
                return await client.request(method, path, headers=headers, **kw)

        return await asyncio.gather(*(one(m, p, kw) for m, p, kw in requests))


# ----------------------------------------------------------------------------------------------
# 200 concurrent requests, batched


def test_200_concurrent_score_requests_match_in_process_and_are_batched(server, clips, reference):
    before = _metrics(server)
    requests = [("POST", "/v1/score", _score_request(c, i % 3)) for i, c in enumerate(clips)]
    # a liveness probe in the middle of the load is answered too (the model runs off the loop)
    requests.insert(100, ("GET", "/health", {}))
    responses = asyncio.run(_send_all(server.url, requests, concurrency=N_CLIPS + 1))
    health = responses.pop(100)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    worst = 0.0
    for clip, ref, resp in zip(clips, reference, responses):
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["name"] == clip["name"] and body["untrained"] is True
        _assert_matches(body, ref)
        worst = max(worst, abs(body["reward"] - ref.reward))
    after = _metrics(server)
    batches = _metric(after, "apex_batch_size_count") - _metric(before, "apex_batch_size_count")
    scored = _metric(after, "apex_batch_size_sum") - _metric(before, "apex_batch_size_sum")
    singles = _metric(after, "apex_batch_size_bucket", le="1.0") - _metric(
        before, "apex_batch_size_bucket", le="1.0"
    )
    print(
        f"200 requests: {batches:.0f} batches (mean {scored / batches:.1f} clips, "
        f"{singles:.0f} of one clip); max |reward - in-process| = {worst:.2e}"
    )
    assert scored == N_CLIPS
    assert batches < N_CLIPS and singles < batches, (batches, singles)  # batches of > 1 clip
    ok = _metric(after, "apex_requests_total", endpoint="/v1/score", status="200")
    assert ok - _metric(before, "apex_requests_total", endpoint="/v1/score", status="200") == 200


# ----------------------------------------------------------------------------------------------
# 1,000 mixed good and malformed requests


def _bad_requests(clips, audio_dir) -> list[tuple[str, tuple[str, str, dict], int, str]]:
    """(kind, request, expected status, expected error type) for every kind of bad input."""
    good = clips[0]
    text = b"these are not the droids you are looking for\n" * 20
    full = _encode(synth_music(4.0, 44100), 44100, "FLAC", "PCM_16")
    nan = synth_music(2.0, 22050)
    nan[0, 100:110] = np.nan
    long_clip = _encode(synth_music(10.0, 8000), 8000, "WAV", "PCM_16")  # > --max-audio-s 8
    short = _encode(synth_music(0.2, 16000), 16000, "WAV", "PCM_16")
    odd_rate = _encode(synth_music(1.5, 44101), 44101, "WAV", "PCM_16")
    many_channels = _encode(synth_music(1.5, 16000, channels=12), 16000, "WAV", "PCM_16")
    huge = b"\0" * (1024 * 1024 + 10)  # > --max-body-mb 1
    loud = _encode(np.full((2, 32000), 3e38, np.float32), 16000, "WAV", "FLOAT")
    cut_wav = _encode(synth_music(4.0, 16000), 16000, "WAV", "PCM_16")
    cut_wav = cut_wav[: len(cut_wav) // 3]
    good_b64 = base64.b64encode(good["data"]).decode()
    lone_surrogate = json.dumps({"base64": good_b64, "name": "\ud800x"}).encode()  # escaped
    deep = b"[" * 200_000 + b"]" * 200_000
    as_json = {"Content-Type": "application/json"}
    up = lambda data, name="x.wav": {  # noqa: E731
        "files": {"file": (name, data, "application/octet-stream")}
    }
    return [
        ("undecodable", ("POST", "/v1/score", up(text, "notes.mp3")), 422, "AudioDecodeError"),
        (
            "truncated",
            (
                "POST",
                "/v1/score",
                {"content": full[: len(full) // 3], "headers": {"Content-Type": "audio/flac"}},
            ),
            422,
            "AudioDecodeError",
        ),
        (
            "nan",
            ("POST", "/v1/score", up(_encode(nan, 22050, "WAV", "FLOAT"))),
            422,
            "NonFiniteAudioError",
        ),
        ("too short", ("POST", "/v1/score", up(short)), 422, "AudioTooShortError"),
        ("too long", ("POST", "/v1/score", up(long_clip)), 422, "AudioTooLongError"),
        ("odd rate", ("POST", "/v1/score", up(odd_rate)), 422, "UnsupportedSampleRateError"),
        ("12 channels", ("POST", "/v1/score", up(many_channels)), 422, "AudioShapeError"),
        ("peak 3e38", ("POST", "/v1/score", up(loud)), 422, "AudioRangeError"),
        ("truncated wav", ("POST", "/v1/score", up(cut_wav)), 422, "AudioDecodeError"),
        (
            "lone surrogate name",
            ("POST", "/v1/score", {"content": lone_surrogate, "headers": as_json}),
            400,
            "InvalidRequest",
        ),
        (
            "deeply nested json",
            ("POST", "/v1/score/batch", {"content": deep, "headers": as_json}),
            400,
            "InvalidJSON",
        ),
        (
            "empty body",
            ("POST", "/v1/score", {"headers": {"Content-Type": "application/json"}}),
            400,
            "EmptyBody",
        ),
        ("empty file", ("POST", "/v1/score", up(b"")), 400, "EmptyBody"),
        (
            "wrong content type",
            ("POST", "/v1/score", {"content": b"hello", "headers": {"Content-Type": "text/plain"}}),
            415,
            "UnsupportedMediaType",
        ),
        ("oversize", ("POST", "/v1/score", up(huge)), 413, "PayloadTooLarge"),
        (
            "malformed json",
            (
                "POST",
                "/v1/score",
                {"content": b'{"base64": "UklG', "headers": {"Content-Type": "application/json"}},
            ),
            400,
            "InvalidJSON",
        ),
        (
            "bad base64",
            ("POST", "/v1/score", {"json": {"base64": "UklGR!!!"}}),
            400,
            "InvalidBase64",
        ),
        ("wrong schema", ("POST", "/v1/score", {"json": {"audio": "x"}}), 400, "InvalidRequest"),
        (
            "path outside allow-dir",
            ("POST", "/v1/score", {"json": {"path": "../secret.wav"}}),
            403,
            "PathNotAllowed",
        ),
        (
            "symlink-free absolute escape",
            ("POST", "/v1/score", {"json": {"path": str(audio_dir.parent / "secret.wav")}}),
            403,
            "PathNotAllowed",
        ),
        (
            "missing api key",
            ("POST", "/v1/score", {**up(good["data"]), "drop_headers": ["X-API-Key"]}),
            401,
            "Unauthorized",
        ),
        (
            "wrong api key",
            ("POST", "/v1/score", {**up(good["data"]), "headers": {"X-API-Key": "nope"}}),
            401,
            "Unauthorized",
        ),
        (
            "get_reward not a list",
            ("POST", "/get_reward", {"json": {"query": "data:audio/wav;base64,AAAA"}}),
            400,
            "InvalidRequest",
        ),
        (
            "compare missing b",
            ("POST", "/v1/compare", {"json": {"a": {"base64": "AAAA"}}}),
            400,
            "InvalidRequest",
        ),
        ("wrong method", ("GET", "/v1/score", {}), 405, "MethodNotAllowed"),
    ]


def _good_requests(clips, audio_dir):
    """Cycle of good requests of every endpoint: (request, how to check the answer)."""
    names = {c["name"] for c in clips[:10]}
    out = []
    for i, c in enumerate(clips):
        out.append((("POST", "/v1/score", _score_request(c, i % 3)), ("score", [i])))
        if i % 10 == 3:
            j = (i + 1) % len(clips)
            files = [
                ("file", (clips[k]["name"], clips[k]["data"], "application/octet-stream"))
                for k in (i, j)
            ]
            out.append((("POST", "/v1/score/batch", {"files": files}), ("batch", [i, j])))
        if i % 10 == 6 and c["name"] in names:
            out.append((("POST", "/v1/score", {"json": {"path": c["name"]}}), ("score", [i])))
        if i % 10 == 8:
            j = (i + 5) % len(clips)
            files = {
                "a": (clips[i]["name"], clips[i]["data"], "application/octet-stream"),
                "b": (clips[j]["name"], clips[j]["data"], "application/octet-stream"),
            }
            out.append((("POST", "/v1/compare", {"files": files}), ("compare", [i, j])))
    return out


def _check_good(resp, check, reference, model) -> None:
    kind, idx = check
    assert resp.status_code == 200, resp.text
    body = resp.json()
    if kind == "score":
        _assert_matches(body, reference[idx[0]])
    elif kind == "batch":
        assert len(body["results"]) == 2
        for row, i in zip(body["results"], idx):
            _assert_matches(row, reference[i])
    else:
        ra, rb = reference[idx[0]], reference[idx[1]]
        expected = (ra.reward - rb.reward) / model.config.preference.temperature
        assert abs(body["logit"] - expected) <= 2e-5
        assert abs(body["probability"] - 1 / (1 + math.exp(-body["logit"]))) <= 1e-12


def test_fault_injection_1000_mixed_requests(server, served_model, clips, reference, audio_dir):
    _, model = served_model
    bad = _bad_requests(clips, audio_dir)
    good = _good_requests(clips, audio_dir)
    # 1,000 requests: 200 malformed (every kind, round robin) interleaved with 800 good ones
    plan = []
    g = b = 0
    for n in range(1000):
        if n % 5 == 2:
            plan.append(("bad", bad[b % len(bad)]))
            b += 1
        else:
            plan.append(("good", good[g % len(good)]))
            g += 1
    assert b == 200 and {k for k, *_ in bad} == {bad[i % len(bad)][0] for i in range(200)}
    before = _metrics(server)

    def run(chunk):
        reqs = [item[0] if kind == "good" else item[1] for kind, item in chunk]
        return asyncio.run(_send_all(server.url, reqs, concurrency=48))

    def check(chunk, responses):
        for (kind, item), resp in zip(chunk, responses):
            if kind == "good":
                _check_good(resp, item[1], reference, model)
            else:
                name, _, status, etype = item
                assert resp.status_code == status, (name, resp.status_code, resp.text)
                err = resp.json()["error"]
                assert err["type"] == etype and err["message"], (name, err)

    # the plan twice: the first 1,000 warm the server up (allocator arenas, kernel caches,
    # resampler filters), so the second 1,000 measure steady state: a leak, not warm-up
    check(plan, run(plan))
    rss_warm = server.rss_bytes()
    check(plan, run(plan))
    rss_after = server.rss_bytes()

    # still up, still scoring, and it counted what it refused
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    check([("good", good[0])], run([("good", good[0])]))
    after = _metrics(server)
    for etype in ("PayloadTooLarge", "Unauthorized", "InvalidBase64", "AudioDecodeError"):
        sent = 2 * sum(1 for i in range(200) if bad[i % len(bad)][3] == etype)
        got = _metric(after, "apex_errors_total", type=etype) - _metric(
            before, "apex_errors_total", type=etype
        )
        assert got == sent, (etype, got, sent)
    growth = (rss_after - rss_warm) / rss_warm
    print(
        f"server RSS after 1000 warm-up requests {rss_warm / 2**20:.1f} MiB, after 1000 more "
        f"{rss_after / 2**20:.1f} MiB ({100 * growth:+.1f} %)"
    )
    assert abs(growth) <= 0.10, (rss_warm, rss_after)


# ----------------------------------------------------------------------------------------------
# OpenRLHF's /get_reward


def test_get_reward_answers_openrlhf_shaped_request(server, clips, reference, audio_dir):
    flac = [i for i, c in enumerate(clips) if c["name"].endswith(".flac")][:3]
    uri = lambda i: "data:audio/flac;base64," + base64.b64encode(clips[i]["data"]).decode()  # noqa: E731
    prompts = [
        "<|user|>compose a calm piano piece<|assistant|>",
        "<|user|>continue data:audio/flac;base64,"
        + base64.b64encode(clips[flac[2]]["data"]).decode()  # reference audio in the prompt
        + "<|assistant|>",
        "<|user|>lofi beat<|assistant|>",
        "<|user|>a waltz<|assistant|>",
        "<|user|>silence<|assistant|>",
    ]
    responses = [
        f"here it is: {uri(flac[0])}<|eos|>",
        f"{uri(flac[1])}<|eos|>",  # the prompt's own audio must not be scored
        f"rendered to file://{audio_dir / clips[5]['name']}<|eos|>",
        "<|eos|>",  # no reference in the response: the label has it
        "I cannot do that<|eos|>",  # no audio anywhere
    ]
    labels = ["", None, "", f"file://{audio_dir / clips[7]['name']}", ""]
    data = {
        "query": [p + r for p, r in zip(prompts, responses)],
        "prompts": prompts,
        "labels": labels,
    }
    # what OpenRLHF's remote reward client (openrlhf.utils.remote_rm_utils) sends: requests.post(
    # url=url, json=data, headers={"Content-Type": "application/json"}, timeout=180); the key
    # rides in the URL because OpenRLHF sends no other header
    resp = httpx.post(
        f"{server.url}/get_reward?api_key={KEY}",
        content=json.dumps(data).encode(),
        headers={"Content-Type": "application/json"},
        timeout=180,
    )
    assert resp.status_code == 200, resp.text
    reply = resp.json()
    # what OpenRLHF does with the reply (update_samples_with_rewards): tensors of the rewards,
    # the scores and every extra_logs entry, concatenated over requests and split per sample
    rewards = torch.as_tensor(reply["rewards"])
    scores = torch.as_tensor(reply["scores"])
    logs = {k: torch.as_tensor(v) for k, v in reply["extra_logs"].items()}
    assert rewards.shape == scores.shape == (5,) and rewards.dtype == torch.float32
    assert all(v.shape == (5,) for v in logs.values())
    torch.cat([rewards, rewards]).split([5, 5])
    expected = [reference[flac[0]], reference[flac[1]], reference[5], reference[7]]
    for i, ref in enumerate(expected):
        assert abs(reply["rewards"][i] - ref.reward) <= 1e-5
        assert abs(reply["scores"][i] - ref.scores["overall"]) <= 1e-5
        assert reply["extra_logs"]["apex_ok"][i] == 1.0 and reply["errors"][i] is None
        assert abs(reply["extra_logs"]["apex_clarity"][i] - ref.scores["clarity"]) <= 1e-5
    assert reply["rewards"][4] == 0.0 and reply["extra_logs"]["apex_ok"][4] == 0.0
    assert reply["errors"][4]["type"] == "NoAudioReference"
    # without the key (OpenRLHF's plain URL) a keyed server refuses
    plain = httpx.post(f"{server.url}/get_reward", json=data, timeout=60)
    assert plain.status_code == 401


# ----------------------------------------------------------------------------------------------
# the client as a TRL reward function


def _decode_completion(text: str) -> tuple[np.ndarray, int]:
    """A user-supplied decoder: completion text -> (audio, sample rate). Module-level, picklable."""
    seed = int(text.split(":")[1])
    return synth_music(1.2 + 0.1 * (seed % 5), 24000, seed=seed), 24000


def test_client_as_trl_reward_function_matches_in_process(server, served_model, tmp_path):
    pytest.importorskip("trl")
    from trl.trainer.utils import get_callable_name, is_async_callable

    _, model = served_model
    client = ApexRewardClient(
        server.url, api_key=KEY, decoder=_decode_completion, max_clips_per_request=3
    )
    client = pickle.loads(pickle.dumps(client))  # TRL / dataloader workers pickle reward funcs
    assert get_callable_name(client) == "apex_remote_reward" and not is_async_callable(client)
    completions = [f"<audio>:{s}" for s in range(7)] + ["<audio>:not-a-number"]
    prompts = ["make music"] * len(completions)
    logged = {}
    rewards = client(
        prompts=prompts,
        completions=completions,
        completion_ids=[[1, 2, 3]] * len(completions),
        trainer_state=None,
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    arrays = [_decode_completion(c) for c in completions[:7]]
    expected = [r.reward for r in model.score(arrays, num_workers=0, guard="penalize")]
    assert len(rewards) == 8 and rewards[7] is None  # the decoder failed on the last one
    assert all(abs(a - b) <= 1e-5 for a, b in zip(rewards[:7], expected)), (rewards, expected)
    assert logged == {"apex_remote_reward/failed": 1 / 8}

    # completions that already are audio: paths (uploaded), arrays, and a clip too short to score
    path = tmp_path / "take.flac"
    x = synth_music(1.5, 44100, channels=2, seed=77)
    sf.write(path, x.T, 44100, format="FLAC")
    plain = ApexRewardClient(server.url, api_key=KEY, sample_rate=24000)
    short = synth_music(0.3, 24000, seed=5)[0]
    got = plain(["p"] * 3, [str(path), arrays[0][0][0], short])
    want = model.score([str(path), (arrays[0][0][0], 24000)], num_workers=0, guard="penalize")
    assert abs(got[0] - want[0].reward) <= 1e-5 and abs(got[1] - want[1].reward) <= 1e-5
    assert got[2] is None
    res = plain.score([str(path), short])
    assert res[0].ok and not res[1].ok and res[1].error_type == "AudioTooShortError"
    cmp = plain.compare(str(path), (arrays[0][0][0], 24000))
    assert abs(cmp.logit - (want[0].reward - want[1].reward)) <= 2e-5


def test_client_retries_5xx_and_connection_errors_not_4xx(server):
    calls = []

    def handler(request):
        calls.append(request.url.path)
        if len(calls) < 3:
            return httpx.Response(503, json={"error": {"type": "Overloaded", "message": "busy"}})
        return httpx.Response(200, json={"status": "ok"})

    client = ApexRewardClient("http://apex.test", retries=3, backoff_s=0.01)
    client._http = httpx.Client(transport=httpx.MockTransport(handler))
    assert client.request("GET", "/v1/info") == {"status": "ok"} and len(calls) == 3

    calls.clear()
    client._http = httpx.Client(
        transport=httpx.MockTransport(
            lambda r: (
                calls.append(1)
                or httpx.Response(400, json={"error": {"type": "InvalidJSON", "message": "bad"}})
            )
        )
    )
    with pytest.raises(RemoteError) as e:
        client.request("POST", "/v1/score")
    assert e.value.status == 400 and e.value.type == "InvalidJSON" and len(calls) == 1

    # nothing listens there: three attempts, then a RemoteError naming the failure
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = ApexRewardClient(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.01)
    with pytest.raises(RemoteError, match="after 3 attempts: ConnectError"):
        down.score([(np.zeros(24000, np.float32), 24000)])

    # a real 4xx from the real server is raised at once, not retried
    wrong = ApexRewardClient(server.url, api_key="wrong", retries=3, backoff_s=5.0)
    with pytest.raises(RemoteError) as e:
        wrong.info()
    assert e.value.status == 401 and e.value.type == "Unauthorized"


def test_serve_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from apex_reward.cli import main

    assert main(["serve", "--model", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("apex-reward serve: error:") and "Traceback" not in err
    assert main(["serve"]) == 1
    assert "--model is required" in capsys.readouterr().err
