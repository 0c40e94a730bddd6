"""verl-omni's HTTP audio scorer protocol v1 against the real ``apex-reward serve``.

verl-omni's client is re-typed below from its documented behaviour (our own code, httpx instead
of aiohttp): it serialises ``(waveform, sample_rate)`` as little-endian float32 base64 with
``num_samples``, ``sample_rate``, ``prompt`` and scalar ``metadata``; retries transient failures
(connection errors, 408, 429, 5xx) with exponential backoff, and nothing else; and accepts only a
JSON object with a finite ``score`` whose other values are finite JSON scalars.

Speed: the tiny random encoder with 1 s segments, one server for the module.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import math
from typing import Any

import numpy as np
import pytest
from conftest import synth_music
from server_harness import ServerProcess

from apex_reward import ApexRewardModel

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

RETRYABLE = {408, 429}


# ----------------------------------------------------------------------------------------------
# verl-omni's audio HTTP scorer client, re-typed


class Retryable(RuntimeError):
    pass


def scalar_metadata(extra_info: dict | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (extra_info or {}).items():
        if key in {"audio", "audio_sample_rate"}:
            continue
        if hasattr(value, "item") and getattr(value, "shape", None) == ():
            value = value.item()
        if value is None or isinstance(value, (str, int, bool)):
            out[str(key)] = value
        elif isinstance(value, float) and math.isfinite(value):
            out[str(key)] = value
    return out


def serialize_request(solution_audio, ground_truth: str, extra_info: dict | None) -> dict:
    if not isinstance(solution_audio, tuple) or len(solution_audio) != 2:
        raise TypeError("expects solution_audio=(waveform, sample_rate)")
    waveform, sample_rate = solution_audio
    waveform = np.asarray(waveform, dtype="<f4").reshape(-1)
    if waveform.size == 0:
        raise ValueError("empty waveform")
    if not np.isfinite(waveform).all():
        raise ValueError("non-finite waveform")
    if isinstance(sample_rate, bool) or int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {sample_rate!r}")
    return {
        "protocol_version": "1",
        "waveform_f32_base64": base64.b64encode(waveform.tobytes()).decode("ascii"),
        "num_samples": int(waveform.size),
        "sample_rate": int(sample_rate),
        "prompt": str(ground_truth or ""),
        "metadata": scalar_metadata(extra_info),
    }


def validate_response(payload: Any) -> dict:
    if not isinstance(payload, dict):
        raise RuntimeError("response must be a JSON object")
    if "error" in payload:
        raise RuntimeError(f"scorer error: {payload['error']}")
    if "score" not in payload:
        raise RuntimeError("response is missing 'score'")
    score = payload["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)):
        raise RuntimeError(f"invalid score: {score!r}")
    if not math.isfinite(score):
        raise RuntimeError(f"non-finite score: {score!r}")
    diagnostics = {}
    for key, value in payload.items():
        if key == "score":
            continue
        if value is None or isinstance(value, (str, int, bool)):
            diagnostics[key] = value
        elif isinstance(value, float) and math.isfinite(value):
            diagnostics[key] = value
        else:
            raise RuntimeError(f"diagnostic {key!r} must be a finite JSON scalar, got {value!r}")
    return {"score": float(score), **diagnostics}


async def compute_score(
    solution_audio,
    ground_truth: str,
    extra_info: dict | None = None,
    *,
    server_url: str,
    client: Any,
    timeout_s: float = 60.0,
    max_retries: int = 2,
    retry_backoff_s: float = 0.0,
) -> dict:
    payload = serialize_request(solution_audio, ground_truth, extra_info)
    last: Exception | None = None
    for attempt in range(max_retries + 1):
        try:
            r = await client.post(server_url, json=payload, timeout=timeout_s)
            if r.status_code != 200:
                error = f"HTTP {r.status_code}: {r.text}"
                if r.status_code in RETRYABLE or 500 <= r.status_code < 600:
                    raise Retryable(error)
                raise RuntimeError(error)
            try:
                body = r.json()
            except ValueError as e:
                raise RuntimeError("malformed JSON") from e
            return validate_response(body)
        except (Retryable, httpx.TransportError) as e:
            last = e
        if attempt < max_retries:
            await asyncio.sleep(retry_backoff_s * 2**attempt)
    raise RuntimeError(f"failed after {max_retries + 1} attempts: {last}") from last


class FlakyTransport(httpx.AsyncBaseTransport):
    """Forwards to the real server; answers the first ``fail`` requests itself with ``status``
    (a proxy in between having a bad moment). Counts every request."""

    def __init__(self, fail: int = 0, status: int = 503) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.fail, self.status, self.sent = fail, status, 0

    async def handle_async_request(self, request):
        self.sent += 1
        if self.sent <= self.fail:
            await request.aread()
            return httpx.Response(self.status, json={"error": "temporarily unavailable"})
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def served_model(tmp_path_factory, tiny_model):
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    ckpt = tmp_path_factory.mktemp("verl-http") / "tiny-1s"
    model.save_pretrained(ckpt)
    return ckpt, ApexRewardModel.from_pretrained(ckpt)


@pytest.fixture(scope="module")
def server(served_model):
    ckpt, _ = served_model
    args = ["--threads", "1", "--max-batch", "8", "--max-wait-ms", "20", "--no-access-log"]
    proc = ServerProcess(ckpt, args + ["--log-level", "warning"], env={"HF_HUB_OFFLINE": "1"})
    proc.start()
    yield proc
    proc.stop()
    assert "Traceback" not in proc.log_text(), proc.log_text()[-3000:]


def _waveforms() -> list[tuple[np.ndarray, int]]:
    """Mono float32 waveforms as verl-omni hands them over: 24 kHz and 16 kHz, 1-2 s, and one
    silent clip (flagged: the guard gives it the floor reward)."""
    out = []
    for i in range(6):
        rate = 24000 if i % 2 == 0 else 16000
        out.append((synth_music(1.0 + 0.2 * i, rate, seed=300 + i)[0].astype(np.float32), rate))
    out.append((np.zeros(24000, dtype=np.float32), 24000))
    return out


def _run(coro):
    return asyncio.run(coro)


# ----------------------------------------------------------------------------------------------
# tests


def test_verl_http_scorer_rewards_equal_in_process(server, served_model):
    _, model = served_model
    waves = _waveforms()
    reference = model.score([(w, sr) for w, sr in waves], num_workers=0, guard="penalize")
    url = f"{server.url}/v1/verl/score"
    transport = FlakyTransport()

    async def main():
        async with httpx.AsyncClient(transport=transport) as client:
            calls = [
                compute_score(
                    (w, sr),
                    "a calm piano piece",
                    {"id": f"s{i}", "seed": np.array(7)},
                    server_url=url,
                    client=client,
                )  # fmt: skip
                for i, (w, sr) in enumerate(waves)
            ]
            return await asyncio.gather(*calls)

    results = _run(main())
    assert transport.sent == len(waves)  # nothing retried
    keys = {frozenset(r) for r in results}
    assert len(keys) == 1  # one key set: verl stacks the extras across samples
    for got, ref in zip(results, reference):
        assert abs(got["score"] - ref.reward) <= 1e-5, (got["score"], ref.reward)
        for name, value in ref.scores.items():
            assert abs(got[f"apex_{name}"] - value) <= 1e-5 * max(1.0, abs(value)), name
        assert got["apex_flagged"] == float(bool(ref.flags))
        assert got["duration_s"] == pytest.approx(ref.duration_s)
    assert results[-1]["apex_flagged"] == 1.0  # the silent clip, at the floor
    assert results[-1]["apex_signal_silent_fraction"] > 0.9


def test_verl_http_scorer_retries_transient_failures_only(server):
    url = f"{server.url}/v1/verl/score"
    wave = (synth_music(1.5, 24000, seed=9)[0], 24000)

    async def call(transport, **kw):
        async with httpx.AsyncClient(transport=transport) as client:
            return await compute_score(wave, "", None, server_url=url, client=client, **kw)

    flaky = FlakyTransport(fail=2, status=503)
    assert math.isfinite(_run(call(flaky))["score"])
    assert flaky.sent == 3  # two 503s, then the server's answer
    for status in (408, 429):
        once = FlakyTransport(fail=1, status=status)
        _run(call(once))
        assert once.sent == 2
    down = FlakyTransport(fail=10, status=500)
    with pytest.raises(RuntimeError, match="failed after 3 attempts"):
        _run(call(down))
    assert down.sent == 3
    # a 422 from the server (audio it cannot score) is final: no retry
    short = FlakyTransport()
    with pytest.raises(RuntimeError, match="HTTP 422"):
        _run(call_raw_audio(short, url, (np.full(100, 0.1, np.float32), 24000)))
    assert short.sent == 1


async def call_raw_audio(transport, url, wave):
    async with httpx.AsyncClient(transport=transport) as client:
        return await compute_score(wave, "", None, server_url=url, client=client)


def _payload(samples: np.ndarray, rate: int, **override) -> dict:
    body = {
        "protocol_version": "1",
        "waveform_f32_base64": base64.b64encode(samples.astype("<f4").tobytes()).decode(),
        "num_samples": int(samples.size),
        "sample_rate": rate,
        "prompt": "",
        "metadata": {},
    }
    body.update(override)
    return body


@pytest.mark.parametrize(
    ("case", "status", "error_type"),
    [
        ("empty", 422, "EmptyAudioError"),
        ("nan", 422, "NonFiniteAudioError"),
        ("inf", 422, "NonFiniteAudioError"),
        ("rate_not_accepted", 422, "UnsupportedSampleRateError"),
        ("rate_zero", 422, "UnsupportedSampleRateError"),
        ("too_short", 422, "AudioTooShortError"),
        ("num_samples_mismatch", 422, "AudioShapeError"),
        ("misaligned_bytes", 422, "AudioShapeError"),
        ("bad_base64", 400, "InvalidBase64"),
        ("protocol_2", 400, "InvalidRequest"),
        ("rate_not_int", 400, "InvalidRequest"),
        ("metadata_not_scalar", 400, "InvalidRequest"),
    ],
)
def test_verl_http_scorer_bad_input_gets_protocol_error(server, case, status, error_type):
    good = synth_music(1.2, 24000, seed=5)[0]
    bodies = {
        "empty": _payload(np.zeros(0, np.float32), 24000),
        "nan": _payload(np.where(np.arange(good.size) == 7, np.nan, good), 24000),
        "inf": _payload(np.where(np.arange(good.size) == 7, np.inf, good), 24000),
        "rate_not_accepted": _payload(good, 12345),
        "rate_zero": _payload(good, 0),
        "too_short": _payload(good[:100], 24000),
        "num_samples_mismatch": _payload(good, 24000, num_samples=good.size + 1),
        "misaligned_bytes": _payload(
            good, 24000, waveform_f32_base64=base64.b64encode(b"\x00" * 6).decode()
        ),
        "bad_base64": _payload(good, 24000, waveform_f32_base64="not base64!"),
        "protocol_2": _payload(good, 24000, protocol_version="2"),
        "rate_not_int": _payload(good, 24000, sample_rate="24000"),
        "metadata_not_scalar": _payload(good, 24000, metadata={"audio": [1.0, 2.0]}),
    }
    r = httpx.post(f"{server.url}/v1/verl/score", json=bodies[case], timeout=60)
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"error"}
    assert payload["error"]["type"] == error_type, payload
    with pytest.raises(RuntimeError, match="scorer error"):
        validate_response(payload)
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_raw_pcm_body_scores_like_the_same_samples_as_a_file(server, served_model):
    """``/v1/score`` with ``Content-Type: audio/pcm`` (int16 stereo and float32 mono) reads the
    same samples the one raw-PCM reader gives the verl endpoint."""
    _, model = served_model
    x = synth_music(1.5, 16000, channels=2, seed=77)
    pcm16 = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    as_read = pcm16.astype(np.float32) / 32768.0
    (ref16,) = model.score([(as_read, 16000)], num_workers=0, guard="penalize")
    r = httpx.post(
        f"{server.url}/v1/score",
        content=pcm16.T.tobytes(),
        headers={"Content-Type": "audio/pcm; rate=16000; channels=2"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert abs(r.json()["reward"] - ref16.reward) <= 1e-5
    mono = x[0].astype("<f4")
    (ref32,) = model.score([(mono, 16000)], num_workers=0, guard="penalize")
    r = httpx.post(
        f"{server.url}/v1/score",
        content=mono.tobytes(),
        headers={"Content-Type": "audio/pcm; rate=16000; format=f32le"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert abs(r.json()["reward"] - ref32.reward) <= 1e-5
    r = httpx.post(
        f"{server.url}/v1/score",
        content=mono.tobytes(),
        headers={"Content-Type": "audio/pcm; format=f32le"},
        timeout=60,
    )
    assert r.status_code == 400 and "rate" in r.json()["error"]["message"]
