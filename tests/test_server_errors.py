"""The reward server's errors: one mapping from error type to HTTP status, typed per-clip errors,
a server-side fault answered 5xx next to a bad clip answered 4xx, request schemas; and the
package's shape (small modules, no web framework imported by the package) and the test harness's
``--port`` handling."""

from __future__ import annotations

import base64
import copy
import io
import socket
import subprocess
import sys

import pytest
import soundfile as sf
from conftest import REPO, synth_music
from server_harness import ServerProcess, ThreadServer, port_in_args

from apex_reward.errors import (
    AudioDecodeError,
    AudioTooShortError,
    CheckpointError,
    ConfigError,
    MissingDependencyError,
    UnsupportedSampleRateError,
)
from apex_reward.scoring import ScoreResult

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from apex_reward.integrations.serving import (  # noqa: E402
    ClipError,
    OverloadedError,
    ServeConfig,
    create_app,
    status_of,
)
from apex_reward.integrations.serving import batcher as batcher_mod  # noqa: E402
from apex_reward.integrations.serving import errors as serving_errors  # noqa: E402
from apex_reward.integrations.serving.schemas import (  # noqa: E402
    ClipRef,
    CompareRequest,
    RewardRequest,
    validate,
)

SERVING = REPO / "integrations" / "serving"


@pytest.fixture(scope="module")
def fast_model(tiny_model):
    """Tiny model with 1 s segments (short clips cost a 1 s encoder pass)."""
    model = copy.deepcopy(tiny_model)
    model.config.frontend.segment_seconds = 1.0
    return model


def _wav(seconds: float, sr: int = 24000, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth_music(seconds, sr, 1, seed=seed).T, sr, format="WAV")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# the mapping and the typed per-clip error


def test_one_mapping_from_error_type_to_status():
    e = serving_errors
    assert status_of(AudioDecodeError("not audio", "x.wav")) == 422
    assert status_of(UnsupportedSampleRateError("44101 Hz", "x.wav")) == 422
    assert status_of(ConfigError("bad option in the request")) == 422
    assert status_of(e.InvalidRequest("x")) == 400 and status_of(e.InvalidJSON("x")) == 400
    assert status_of(e.InvalidBase64("x")) == 400 and status_of(e.TooManyClips("x")) == 400
    assert status_of(e.Unauthorized("x")) == 401 and status_of(e.PathNotAllowed("x")) == 403
    assert status_of(e.PayloadTooLarge("x")) == 413
    assert status_of(e.UnsupportedMediaType("x")) == 415
    assert status_of(OverloadedError("busy")) == 503 and status_of(e.ScoringTimeout("x")) == 503
    # the server's own faults
    assert status_of(CheckpointError("weights truncated")) == 500
    assert status_of(MissingDependencyError("no fastapi")) == 500
    assert status_of(RuntimeError("CUDA out of memory")) == 500
    assert status_of(e.ModelOutputError("NaN scores")) == 500


def test_a_clip_error_carries_the_exception_its_status_and_message():
    cause = AudioTooShortError("0.2 s; the minimum is 1 s", "take.wav")
    err = ClipError("take.wav", cause)
    assert err.error is cause and isinstance(err.error, AudioTooShortError)
    assert (err.status, err.type) == (422, "AudioTooShortError")
    assert err.message == "take.wav: 0.2 s; the minimum is 1 s"
    assert err.to_json() == {"type": "AudioTooShortError", "message": err.message}
    prefixed = err.with_prefix("clip a: ")
    assert prefixed.error is cause and prefixed.message.startswith("clip a: take.wav")
    fault = ClipError("x", RuntimeError("boom"))
    assert (fault.status, fault.type, fault.message) == (500, "InternalError", "RuntimeError: boom")
    busy = ClipError("x", OverloadedError("queue full"))
    assert (busy.status, busy.type, busy.retryable) == (503, "Overloaded", True)
    assert ClipError("x", CheckpointError("gone")).type == "CheckpointError"


def test_scoring_gives_each_failed_clip_a_typed_error(fast_model):
    import asyncio

    from apex_reward.integrations.serving.admission import decode_clip
    from apex_reward.integrations.serving.state import ServerState

    state = ServerState(fast_model, ServeConfig(warmup=False))

    async def score():
        state.batcher.start()
        try:
            clips = [
                await decode_clip(state, "good.wav", _wav(1.2)),
                await decode_clip(state, "bad", b"x"),
            ]
            return await state.score_clips(clips)
        finally:
            state.batcher.stop()
            state.pool.shutdown(wait=False)

    good, bad = asyncio.run(score())
    assert isinstance(good, ScoreResult) and good.ok
    assert isinstance(bad, ClipError) and isinstance(bad.error, AudioDecodeError)
    assert (bad.name, bad.status, bad.type) == ("bad", 422, "AudioDecodeError")
    assert bad.error.__traceback__ is None  # no frames (and upload bytes) kept alive


def test_request_schemas_give_typed_errors_naming_the_field():
    assert validate(ClipRef, {"base64": "AAAA", "name": "n"}, "clip").name == "n"
    assert validate(ClipRef, {"path": "a.wav"}, "clip").path == "a.wav"
    cases = [
        (ClipRef, {"audio": "x"}, serving_errors.InvalidRequest, "unknown field 'audio'"),
        (ClipRef, {"base64": "A", "path": "b"}, serving_errors.InvalidRequest, "exactly one"),
        (ClipRef, {}, serving_errors.InvalidRequest, "exactly one"),
        (ClipRef, "not an object", serving_errors.InvalidRequest, "expected a JSON object"),
        (ClipRef, {"base64": 5}, serving_errors.InvalidBase64, "'base64' must be a string"),
        (ClipRef, {"path": "a", "name": "\ud800x"}, serving_errors.InvalidRequest, "name"),
        (ClipRef, {"path": "a", "name": ""}, serving_errors.InvalidRequest, "name"),
        (CompareRequest, {"a": {"base64": "AAAA"}}, serving_errors.InvalidRequest, "'b'"),
        (
            CompareRequest,
            {"a": {"path": "a"}, "b": {"path": "b"}, "is_instrumental": "yes"},
            serving_errors.InvalidRequest,
            "is_instrumental",
        ),
        (RewardRequest, {"query": "x"}, serving_errors.InvalidRequest, "query"),
        (
            RewardRequest,
            {"query": ["a", "b"], "prompts": ["a"]},
            serving_errors.InvalidRequest,
            "'prompts' must be a list as long as 'query' (2)",
        ),
    ]
    for model, data, error, text in cases:
        with pytest.raises(error) as caught:
            validate(model, data, "where")
        assert text in str(caught.value) and str(caught.value).startswith("where: "), (data, caught)
    ok = validate(RewardRequest, {"query": ["a"], "extra": 1}, "get_reward")  # extra keys ignored
    assert ok.column("labels") == [None]


# ----------------------------------------------------------------------------------------------
# a server-side fault is a 5xx, a bad clip a 4xx


def _wait_ready(http) -> None:
    import time

    deadline = time.monotonic() + 60
    while http.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, "server not ready"
        time.sleep(0.05)


def test_checkpoint_error_while_scoring_is_5xx_and_a_bad_clip_4xx(fast_model, monkeypatch):
    def broken(*args, **kwargs):
        raise CheckpointError("model.safetensors: weights truncated")

    monkeypatch.setattr(batcher_mod, "score_waveforms", broken)
    app = create_app(fast_model, ServeConfig(warmup=False))
    good = {"Content-Type": "audio/wav", "X-Audio-Name": "good.wav"}
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        _wait_ready(http)
        r = http.post("/v1/score", content=_wav(1.2), headers=good)
        assert r.status_code == 500, r.text
        assert r.json()["error"]["type"] == "CheckpointError"
        assert "weights truncated" in r.json()["error"]["message"]

        r = http.post("/v1/score", content=b"not audio", headers={"Content-Type": "audio/wav"})
        assert r.status_code == 422 and r.json()["error"]["type"] == "AudioDecodeError"

        clips = [
            {"base64": base64.b64encode(_wav(1.2)).decode(), "name": "good"},
            {"base64": base64.b64encode(b"junk").decode(), "name": "junk"},
        ]
        r = http.post("/v1/score/batch", json={"clips": clips})
        assert r.status_code == 200
        assert [row["error"]["type"] for row in r.json()["results"]] == [
            "CheckpointError",
            "AudioDecodeError",
        ]
        metrics = http.get("/metrics").text
        assert 'apex_errors_total{type="CheckpointError"} 2.0' in metrics
        assert 'apex_requests_total{endpoint="/v1/score",status="500"} 1.0' in metrics


def test_a_failed_result_maps_by_its_exception_not_its_name(fast_model, monkeypatch):
    def results(model, items, **kwargs):
        out = []
        for name, *_ in items:
            if name == "fault.wav":
                exc = CheckpointError("head weights missing")
                out.append(ScoreResult(name, error=str(exc), error_type="X", exception=exc))
            else:
                out.append(ScoreResult(name, error="NaN scores", error_type="NonFiniteOutput"))
        return out

    monkeypatch.setattr(batcher_mod, "score_waveforms", results)
    app = create_app(fast_model, ServeConfig(warmup=False))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as http:
        _wait_ready(http)
        for name, kind in (("fault.wav", "CheckpointError"), ("nan.wav", "InternalError")):
            headers = {"Content-Type": "audio/wav", "X-Audio-Name": name}
            r = http.post("/v1/score", content=_wav(1.2), headers=headers)
            assert r.status_code == 500 and r.json()["error"]["type"] == kind, r.text
        assert "NonFiniteOutput" in r.json()["error"]["message"]


# ----------------------------------------------------------------------------------------------
# the package's shape


def test_each_serving_module_is_small():
    sizes = {
        p.relative_to(SERVING).as_posix(): len(p.read_text().splitlines())
        for p in SERVING.rglob("*.py")
    }
    assert {"app.py", "config.py", "errors.py", "schemas.py", "protocols/openrlhf.py"} <= set(sizes)
    assert all(n <= 400 for n in sizes.values()), sizes
    assert not (REPO / "integrations" / "server.py").exists()


def test_importing_the_package_imports_no_web_framework():
    code = (
        "import sys\n"
        "from apex_reward.integrations.serving import ApexRewardClient, ServeConfig, create_app\n"
        "bad = [m for m in ('fastapi', 'starlette', 'pydantic', 'uvicorn', 'httpx') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ----------------------------------------------------------------------------------------------
# the test harness


def test_server_process_honours_a_port_in_its_args(tiny_model, tmp_path):
    assert port_in_args(["--max-batch", "4", "--port", "8768"]) == 8768
    assert port_in_args(["--port=9000"]) == 9000 and port_in_args(["--threads", "1"]) is None
    with pytest.raises(ValueError, match="--port 8768"):
        ServerProcess("m", ["--port", "8768"], port=9000)
    assert ServerProcess("m", ["--port", "8768"]).url == "http://127.0.0.1:8768"

    ckpt = tiny_model.save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--port", str(port), "--no-warmup", "--threads", "1", "--log-level", "warning"]
    with ServerProcess(ckpt, args, env={"HF_HUB_OFFLINE": "1"}, ready_timeout=120) as server:
        assert server.port == port
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).json() == {"status": "ok"}
