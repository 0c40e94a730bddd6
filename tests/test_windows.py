"""Dense per-window rewards (``model(x, sr, return_windows=...)``): the windows of a song average
to its score, each window's gradient stays inside the window, times and token spans are right."""

from __future__ import annotations

import pytest
import torch
from conftest import synth_music

from apex_reward import ApexConfig, ApexRewardModel, FrontendConfig
from apex_reward.config import NEW_FRONTEND
from apex_reward.errors import ConfigError
from apex_reward.windows import WindowSpec, window_token_spans

pytestmark = pytest.mark.usefixtures("one_thread")

SEG = 2.0  # seconds per encoder segment in these tests


def build(mode: str) -> ApexRewardModel:
    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny", mode=mode)
    cfg.frontend = FrontendConfig(**NEW_FRONTEND, segment_seconds=SEG, min_duration_s=0.5)
    return ApexRewardModel.from_config(cfg, encoder="random")


@pytest.fixture(scope="module")
def model() -> ApexRewardModel:
    return build("segment")


def song(seconds: float, sr: int, seed: int = 0, lead_silence_s: float = 0.0) -> torch.Tensor:
    x = torch.from_numpy(synth_music(seconds, sr, seed=seed)[0])
    return torch.cat([torch.zeros(int(lead_silence_s * sr)), x])


def test_segment_windows_average_to_the_song_score(model):
    songs = [song(5.0, 24000, seed=1), song(3.1, 24000, seed=2)]
    with torch.no_grad():
        out = model(songs, 24000, return_windows=True)
    win = out.windows
    assert win.reward.shape == (2, 3)  # 2 s + 2 s + 1 s; 2 s + 1.1 s (+ padding)
    assert win.mask.tolist() == [[True, True, True], [True, True, False]]
    mean = win.mean()
    for name, value in out.scores.items():
        torch.testing.assert_close(mean[name].float(), value, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean["reward"].float(), out.reward, rtol=1e-5, atol=1e-5)
    assert win.start_s[0].tolist() == pytest.approx([0.0, 2.0, 4.0])
    assert win.end_s[0].tolist() == pytest.approx([2.0, 4.0, 5.0])
    assert win.end_s[1, :2].tolist() == pytest.approx([2.0, 3.1])
    assert win.weights[1, 2] == 0 and win.reward[1, 2] == 0
    # the records leave the padding out
    records = win.to_records()
    assert [len(r) for r in records] == [3, 2]
    assert records[0][2]["reward"] == pytest.approx(float(win.reward[0, 2]))
    assert set(records[0][0]["scores"]) == set(model.score_names)


def test_song_mode_windows_are_per_segment_scores():
    """With the head in song mode the windows are still each segment's own score: equal to
    scoring that segment alone."""
    model = build("song")
    x = song(4.0, 24000, seed=3)
    with torch.no_grad():
        win = model(x[None], 24000, return_windows=True).windows
        alone = model(x[None, 48000:], 24000).reward
    torch.testing.assert_close(win.reward[0, 1], alone[0], rtol=1e-5, atol=1e-6)


def test_window_times_count_the_trimmed_lead_in(model):
    x = song(4.0, 16000, seed=4, lead_silence_s=0.5)
    with torch.no_grad():
        win = model(x, 16000, return_windows=True).windows
    assert win.start_s[0].tolist() == pytest.approx([0.5, 2.5], abs=1e-4)
    assert win.end_s[0, -1].item() == pytest.approx(4.5, abs=1e-3)


def test_gradient_of_one_window_stays_in_that_window(model):
    sr = 16000  # resampled to 24 kHz: the resampler's filter is the only boundary context
    x = song(6.0, sr, seed=5).requires_grad_(True)
    out = model(x, sr, return_windows=True)
    out.windows.reward[0, 1].backward()
    g = x.grad.abs()
    inside = g[int(2.0 * sr) : int(4.0 * sr)]
    assert (inside > 0).float().mean() > 0.9
    touched = torch.nonzero(g > 0).flatten()
    context_s = 0.01
    assert touched.min().item() >= (2.0 - context_s) * sr
    assert touched.max().item() < (4.0 + context_s) * sr
    assert g[: int(1.9 * sr)].sum() == 0 and g[int(4.1 * sr) :].sum() == 0
    # at the encoder's own rate there is no resampler: exactly the window's samples
    x = song(6.0, 24000, seed=5).requires_grad_(True)
    model(x, 24000, return_windows=True).windows.reward[0, 2].backward()
    touched = torch.nonzero(x.grad != 0).flatten()
    assert touched.min().item() >= 4 * 24000 and touched.max().item() < 6 * 24000
    assert (x.grad[4 * 24000 :] != 0).float().mean() > 0.9


def test_configured_windows_length_and_hop(model):
    x = song(5.0, 24000, seed=6)
    spec = WindowSpec(length_s=2.0, hop_s=1.0)
    with torch.no_grad():
        win = model(x, 24000, return_windows=spec).windows
        first = model(x[: 2 * 24000], 24000).reward
        last = model(x[-2 * 24000 :], 24000).reward
    # 0-2, 1-3, 2-4, then the last window aligned to the end: 3-5
    assert win.start_s[0].tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert win.end_s[0].tolist() == pytest.approx([2.0, 3.0, 4.0, 5.0])
    # a window scores as that stretch of audio alone does
    torch.testing.assert_close(win.reward[0, 0], first[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(win.reward[0, -1], last[0], rtol=1e-5, atol=1e-6)


def test_token_spans_for_a_codec_frame_rate():
    spans = window_token_spans(
        torch.tensor([[0.0, 2.0, 4.0]]), torch.tensor([[2.0, 4.0, 5.01]]), 50, num_tokens=250
    )
    assert spans.tolist() == [[[0, 100], [100, 200], [200, 250]]]
    # a prompt of 1 s before the generated audio: its tokens are not part of any window
    spans = window_token_spans([1.5], [2.5], 50, offset_s=1.0)
    assert spans.tolist() == [[25, 75]]


def test_bad_window_specs_are_config_errors(model):
    with pytest.raises(ConfigError, match="length_s"):
        WindowSpec(length_s=0.0)
    with pytest.raises(ConfigError, match="hop_s needs length_s"):
        WindowSpec(hop_s=1.0)
    with pytest.raises(ConfigError, match="return_windows"):
        model(song(1.0, 24000), 24000, return_windows="yes")
    with pytest.raises(ConfigError, match="frame_rate"):
        window_token_spans([0.0], [1.0], 0)


def test_score_command_writes_windows(model, tmp_path, capsys):
    import json

    import soundfile as sf

    from apex_reward.cli import main

    ckpt = model.save_pretrained(tmp_path / "ckpt")
    wav = tmp_path / "song.wav"
    sf.write(wav, synth_music(5.0, 24000, seed=7)[0], 24000, subtype="FLOAT")
    assert main(["score", "--model", str(ckpt), "--guard", "off", "--windows", str(wav)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert [(w["start_s"], w["end_s"]) for w in row["windows"]] == [(0, 2), (2, 4), (4, 5)]
    durations = [w["end_s"] - w["start_s"] for w in row["windows"]]
    mean = sum(d * w["reward"] for d, w in zip(durations, row["windows"])) / sum(durations)
    assert mean == pytest.approx(row["reward"], abs=1e-5)
    assert (
        main(
            [
                "score",
                "--model",
                str(ckpt),
                "--windows",
                "--window-seconds",
                "2",
                "--window-hop",
                "1.5",
                str(wav),
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    assert [w["start_s"] for w in row["windows"]] == [0, 1.5, 3]
    # a plain score has no windows; windows need jsonl
    assert main(["score", "--model", str(ckpt), str(wav)]) == 0
    assert "windows" not in json.loads(capsys.readouterr().out)
    assert main(["score", "--model", str(ckpt), "--format", "csv", "--windows", str(wav)]) != 0
    assert "--windows needs --format jsonl" in capsys.readouterr().err
    assert main(["score", "--model", str(ckpt), "--window-seconds", "2", str(wav)]) != 0
    assert "need --windows" in capsys.readouterr().err


def test_server_serves_windows(model):
    import io

    import soundfile as sf

    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from server_harness import ThreadServer

    from apex_reward.integrations.serving import ApexRewardClient, ServeConfig, create_app

    x = synth_music(3.0, 24000, seed=8)[0]
    buf = io.BytesIO()
    sf.write(buf, x, 24000, format="WAV", subtype="FLOAT")
    config = ServeConfig(windows=True, guard="off", warmup=False)
    with ThreadServer(create_app(model, config)) as url:
        r = httpx.post(
            f"{url}/v1/score",
            content=buf.getvalue(),
            headers={"Content-Type": "audio/wav"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        (via_client,) = ApexRewardClient(url).score([(x, 24000)])
    with torch.no_grad():
        direct = model(torch.from_numpy(x), 24000, return_windows=True).windows.to_records()[0]
    assert [(w["start_s"], w["end_s"]) for w in body["windows"]] == [(0, 2), (2, 3)]
    for got in (body["windows"], via_client.windows):
        assert [w["reward"] for w in got] == pytest.approx([w["reward"] for w in direct], abs=1e-6)
    with pytest.raises(ConfigError, match="need --windows"):
        ServeConfig(window_seconds=5.0)


def test_trl_reward_function_logs_windows_through_log_extra(model):
    """Called as TRL's GRPOTrainer calls reward functions: keyword arguments, ``log_extra``
    appending one value per completion to a completions-table column."""
    import json
    from collections import defaultdict

    from apex_reward.integrations.trl_rewards import ApexRewardFunction

    fn = ApexRewardFunction(model, guard="off", windows=True, name="apex")
    extra: dict[str, list] = defaultdict(list)
    audio = [(synth_music(3.0, 24000, seed=9)[0], 24000), "missing.wav"]
    values = fn(
        prompts=["p", "q"],
        completions=audio,
        completion_ids=[[1], [2]],
        trainer_state=None,
        log_extra=lambda column, vals: extra[column].extend(vals),
        log_metric=lambda name, value: None,
    )
    assert values[1] is None and list(extra) == ["apex/windows"]
    cell, failed = extra["apex/windows"]
    assert failed is None
    windows = json.loads(cell)
    assert [w[:2] for w in windows] == [[0, 2], [2, 3]]
    mean = (2 * windows[0][2] + windows[1][2]) / 3
    assert mean == pytest.approx(values[0], abs=1e-5)


def test_verl_reward_extra_info_carries_windows(model, tmp_path):
    """Through verl's re-typed ``run_single`` (tests/test_verl.py), sync and async: the extras
    hold the windows' rewards and times under a fixed key set."""
    import asyncio

    import numpy as np
    from test_verl import bind_reward_kwargs, run_single

    from apex_reward.integrations import verl as apex_verl

    ckpt = model.save_pretrained(tmp_path / "ckpt")
    kwargs = {"model": str(ckpt), "guard": "off", "windows": True, "max_windows": 4}
    audio = (synth_music(5.0, 24000, seed=10)[0].astype(np.float32), 24000)
    with torch.no_grad():
        direct = model(torch.from_numpy(audio[0]), 24000, return_windows=True).windows
    try:
        for fn in (apex_verl.compute_score, apex_verl.compute_score_async):
            got = asyncio.run(run_single(bind_reward_kwargs(fn, kwargs), solution_audio=audio))
            extra = got["extra"]
            assert extra["apex_num_windows"] == 3.0
            rewards = [extra[f"apex_window_{k}_reward"] for k in range(3)]
            assert rewards == pytest.approx(direct.reward[0].tolist(), abs=1e-5)
            assert [extra[f"apex_window_{k}_end_s"] for k in range(4)] == [2.0, 4.0, 5.0, -1.0]
            assert extra["apex_window_3_reward"] == 0.0
        with pytest.raises(ConfigError, match="windows: unknown keys"):
            apex_verl.compute_score(solution_audio=audio, **{**kwargs, "windows": {"len": 3}})
    finally:
        apex_verl.close_batchers()
