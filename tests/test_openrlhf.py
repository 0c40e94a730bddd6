"""APEX as OpenRLHF's reward, driven the way OpenRLHF (0.10) drives it.

OpenRLHF is not installed here; its side is re-typed from ``openrlhf/utils/agent.py``
(``SingleTurnAgentExecutor``) and ``openrlhf/trainer/ppo_utils/samples_generator.py``:

* ``--reward.remote_url file.py``: the file is loaded standalone with
  ``importlib.util.spec_from_file_location("reward_func", path)`` and ``reward_func`` is called
  once per sample, in a worker thread (``asyncio.to_thread``), with one-element lists
  ``([query], [prompt], [label])``, query = prompt + response text;
* ``--reward.remote_url http://.../get_reward``: one JSON POST per sample with ``{"query": [q],
  "prompts": [p], "labels": [l]}``, retried on errors;
* either way it reads ``rewards``, ``scores`` (else ``rewards``) and ``extra_logs``, stores each
  sample's ``torch.tensor([value])`` in its info, and logs each key's mean over the step's
  samples.

The policy here writes note names (``"C4 E4 G4 ..."``, examples/note_lm.py); the decoder
``note_lm:decode_notes`` synthesises them. Rewards are checked against ``ApexRewardModel.score`` on
the same audio under the same guard policy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import io
import json
import runpy
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from conftest import fast_model, synth_music

from apex_reward import ApexRewardModel
from apex_reward.audio import decode_audio_bytes
from apex_reward.config import SCORE_RANGES
from apex_reward.errors import ConfigError
from apex_reward.integrations import openrlhf as apex_openrlhf
from apex_reward.integrations.model_cache import clear_model_cache
from apex_reward.integrations.openrlhf import (
    REWARD_FILE,
    OpenRLHFReward,
    OpenRLHFRewardConfig,
    RewardLogs,
    config_from_env,
)

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
sys.path.insert(0, str(EXAMPLES))
from note_lm import decode_notes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "<calm> compose:"
#: note-name responses: five phrases, then three that cannot be scored
GOOD = [
    " C4 E4 G4 C5 G4 E4 C4 _",
    " D4 F4 A4 D5 A4 F4",
    " G4 G4 A4 B4 C5 C5 B4 A4 G4",
    " E5 D5 C5 B4 A4 G4 F4 E4",
    " C4 C5 C4 C5 G4 G4 E4 E4",
]
BAD = [
    " I cannot write music",  # no notes: the decoder raises
    " C4 E4",  # 0.25 s: shorter than the model's minimum
    "",  # empty response
]


# ----------------------------------------------------------------------------------------------
# OpenRLHF's side, re-typed


def load_reward_file(path: Path):
    """``SingleTurnAgentExecutor.__init__``: the file as a standalone module named reward_func."""
    spec = importlib.util.spec_from_file_location("reward_func", str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reward_func


def sample_info(rewards_info: dict | None) -> dict[str, torch.Tensor]:
    """``execute`` + ``samples_generator``: one sample's reward, score and extra logs as info."""
    if not rewards_info:
        return {}
    score = rewards_info.get("scores")
    if score is None:
        score = rewards_info.get("rewards")
    info = {"reward": torch.tensor([rewards_info.get("rewards")]), "score": torch.tensor([score])}
    for key, value in (rewards_info.get("extra_logs") or {}).items():
        if isinstance(value, torch.Tensor):
            value = value.flatten()[0].item()
        info[key] = torch.tensor([value])
    return info


async def via_function(reward_func, queries, prompts, labels) -> list[dict]:
    """``_fetch_rewards_via_func``, one sample per call, all samples of a step concurrently."""

    async def one(q, p, lab):
        try:
            return sample_info(await asyncio.to_thread(reward_func, [q], [p], [lab]))
        except Exception:  # OpenRLHF logs it and leaves the sample without a reward
            return {}

    return list(await asyncio.gather(*(one(*s) for s in zip(queries, prompts, labels))))


def via_http(url: str, queries, prompts, labels) -> list[dict]:
    """``_fetch_rewards_via_http``: one JSON POST per sample, its reply as the sample's info."""
    import httpx

    infos = []
    for q, p, lab in zip(queries, prompts, labels):
        r = httpx.post(url, json={"query": [q], "prompts": [p], "labels": [lab]}, timeout=180)
        r.raise_for_status()
        reply = r.json()
        reply = {
            "rewards": torch.tensor(reply["rewards"]),
            "scores": torch.tensor(reply["scores"]),
            "extra_logs": {k: torch.tensor(v) for k, v in reply["extra_logs"].items()},
        }
        infos.append(sample_info(reply))
    return infos


def logged_means(infos: list[dict]) -> dict[str, float]:
    """What OpenRLHF logs for a step: each info key's mean over the samples (every sample must
    carry the same keys, else its batching fails)."""
    keys = {tuple(sorted(i)) for i in infos}
    assert len(keys) == 1, keys
    return {k: torch.cat([i[k].flatten() for i in infos]).mean().item() for k in infos[0]}


# ----------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("openrlhf") / "ckpt"
    fast_model().save_pretrained(d)
    yield d
    clear_model_cache()


@pytest.fixture(scope="module")
def reference(checkpoint):
    model = ApexRewardModel.from_pretrained(checkpoint)
    results = model.score([decode_notes(r) for r in GOOD], num_workers=0, guard="penalize")
    assert all(r.ok for r in results)
    return results


@pytest.fixture
def env(monkeypatch, checkpoint, tmp_path):
    """A fresh reward-function configuration from the environment."""
    monkeypatch.setattr(apex_openrlhf, "_DEFAULT", None)
    for key in ("MODEL", "URL", "DECODER", "CONFIG", "FAILURE_LOG", "SCORE"):
        monkeypatch.delenv(f"APEX_OPENRLHF_{key}", raising=False)
    return monkeypatch


def check_rewards(infos, reference, score="overall"):
    for info, ref in zip(infos[: len(GOOD)], reference):
        assert info["reward"].flatten().item() == pytest.approx(ref.reward, abs=1e-5)
        assert info["score"].flatten().item() == pytest.approx(ref.scores[score], abs=1e-5)
        assert info["apex_ok"].item() == 1.0
        for name, value in ref.scores.items():
            assert info[f"apex_{name}"].item() == pytest.approx(value, abs=1e-5)
    for info in infos[len(GOOD) :]:
        assert info["reward"].flatten().item() == 0.0 and info["apex_ok"].item() == 0.0


def check_means_not_lowered(infos, reference):
    """A step's logged score means stay among the scored samples' values."""
    means = logged_means(infos)
    for name in reference[0].scores:
        values = [r.scores[name] for r in reference]
        assert min(values) - 1e-5 <= means[f"apex_{name}"] <= max(values) + 1e-5, name
    assert means["apex_ok"] == pytest.approx(len(GOOD) / (len(GOOD) + len(BAD)))


# ----------------------------------------------------------------------------------------------
# the shipped reward-function file, in-process


def test_shipped_file_scores_note_responses_in_process(env, checkpoint, reference, tmp_path):
    log = tmp_path / "failures.jsonl"
    env.setenv("APEX_OPENRLHF_MODEL", str(checkpoint))
    env.setenv("APEX_OPENRLHF_DECODER", "note_lm:decode_notes")
    env.setenv("APEX_OPENRLHF_FAILURE_LOG", str(log))
    reward_func = load_reward_file(REWARD_FILE)
    responses = GOOD + BAD
    queries = [PROMPT + r for r in responses]
    # the first sample alone, so every failure below has a scored sample before it
    first = asyncio.run(via_function(reward_func, queries[:1], [PROMPT], [None]))
    infos = first + asyncio.run(via_function(reward_func, queries[1:], [PROMPT] * 7, [None] * 7))
    check_rewards(infos, reference)
    check_means_not_lowered(infos, reference)
    # the file is the package's, and running it names its path (for --reward.remote_url)
    assert reward_func is apex_openrlhf.reward_func and REWARD_FILE.suffix == ".py"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_path(str(REWARD_FILE), run_name="__main__")
    assert printed.getvalue().strip() == str(REWARD_FILE)
    # what OpenRLHF's own example returns: float tensors [n]
    out = reward_func([queries[0]], [PROMPT], [None])
    assert out["rewards"].dtype == torch.float32 and out["rewards"].shape == (1,)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(x["type"] for x in lines) == [
        "AudioDecodeError",
        "AudioDecodeError",
        "AudioTooShortError",
    ]
    assert "decoder raised ValueError" in " ".join(x["message"] for x in lines)
    assert apex_openrlhf._DEFAULT.failure_log.total == 3


def test_failed_sample_logs_the_mean_of_scored_ones(checkpoint, reference):
    """Several samples in one call: the call's scored samples fill a failed sample's logs, so a
    step's logged means equal the scored samples' means exactly."""
    fn = OpenRLHFReward(OpenRLHFRewardConfig(model=str(checkpoint), decoder="note_lm:decode_notes"))
    responses = [GOOD[0], BAD[0], GOOD[1], BAD[1], GOOD[2]]
    out = fn([PROMPT + r for r in responses], [PROMPT] * 5, [None] * 5)
    scored = [reference[0], reference[1], reference[2]]
    for name in reference[0].scores:
        logs = out["extra_logs"][f"apex_{name}"]
        mean = sum(r.scores[name] for r in scored) / 3
        assert logs.mean().item() == pytest.approx(mean, abs=1e-5)
        assert logs[1].item() == pytest.approx(mean, abs=1e-5)
    assert out["extra_logs"]["apex_ok"].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]
    assert [e and e["type"] for e in out["errors"]] == [
        None,
        "AudioDecodeError",
        None,
        "AudioTooShortError",
        None,
    ]
    assert fn.failure_log.counts == {"AudioDecodeError": 1, "AudioTooShortError": 1}


def test_in_process_reads_audio_references_without_a_decoder(checkpoint):
    """No decoder: the response's data URI is the audio (the server's convention)."""
    wav = synth_music(1.5, 16000, seed=3)
    buf = io.BytesIO()
    sf.write(buf, wav.T, 16000, format="FLAC")
    uri = "data:audio/flac;base64," + base64.b64encode(buf.getvalue()).decode()
    fn = OpenRLHFReward(OpenRLHFRewardConfig(model=str(checkpoint), score="reward"))
    out = fn([PROMPT + " " + uri, PROMPT + " no audio"], [PROMPT, PROMPT], [None, None])
    model = ApexRewardModel.from_pretrained(checkpoint)
    decoded = decode_audio_bytes(buf.getvalue())
    expected = model.score([decoded], num_workers=0, guard="penalize")
    assert out["rewards"][0].item() == pytest.approx(expected[0].reward, abs=1e-5)
    assert out["errors"][1]["type"] == "NoAudioReference"


def test_configuration_from_the_environment(tmp_path):
    cfg = config_from_env({"APEX_OPENRLHF_MODEL": "runs/x", "APEX_OPENRLHF_FAILURE_REWARD": "-1"})
    assert cfg.model == "runs/x" and cfg.failure_reward == -1.0
    path = tmp_path / "reward.yaml"
    path.write_text("url: http://127.0.0.1:9\nretries: 0\n")
    cfg = config_from_env({"APEX_OPENRLHF_CONFIG": str(path), "APEX_OPENRLHF_TIMEOUT_S": "5"})
    assert (cfg.url, cfg.retries, cfg.timeout_s) == ("http://127.0.0.1:9", 0, 5.0)
    with pytest.raises(ConfigError, match="exactly one"):
        config_from_env({})
    with pytest.raises(ConfigError, match="serve --decoder"):
        config_from_env({"APEX_OPENRLHF_URL": "http://x", "APEX_OPENRLHF_DECODER": "m:f"})
    with pytest.raises(ConfigError, match="module:function"):
        config_from_env({"APEX_OPENRLHF_MODEL": "x", "APEX_OPENRLHF_DECODER": "nocolon"})
    # the server's --decoder is checked when the options are built, and imported at start-up
    from apex_reward.integrations.decoders import import_decoder
    from apex_reward.integrations.serving import ServeConfig

    with pytest.raises(ConfigError, match="--decoder: expected 'module:function'"):
        ServeConfig(decoder="nocolon")
    with pytest.raises(ConfigError, match="cannot import"):
        import_decoder("no_such_module_here:decode")
    assert import_decoder("note_lm:decode_notes") is decode_notes
    # before any sample was scored, a failure is logged at the middle of each score's range
    logs = RewardLogs(["clarity", "overall"])
    reply = logs.reply([{"type": "E", "message": "m"}], score_key="overall", failure_reward=0.0)
    assert reply["extra_logs"]["apex_clarity"] == [sum(SCORE_RANGES["clarity"]) / 2]
    assert reply["rewards"] == [0.0] and logs.failures.counts == {"E": 1}


# ----------------------------------------------------------------------------------------------
# through the server: apex-reward serve --decoder


def test_serve_decoder_turns_text_responses_into_rewards(env, checkpoint, reference, tmp_path):
    pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from server_harness import ServerProcess

    log = tmp_path / "server-failures.jsonl"
    args = ["--threads", "1", "--decoder", "note_lm:decode_notes", "--failure-log", str(log)]
    args += ["--resampler", "exact"]  # the decoder's audio is prepared on the decode threads
    pythonpath = f"{EXAMPLES}:{REPO / 'tests'}"
    with ServerProcess(checkpoint, args, env={"PYTHONPATH": pythonpath}) as server:
        responses = GOOD + BAD
        queries = [PROMPT + r for r in responses]
        n = len(queries)
        # OpenRLHF's HTTP client: one POST per sample
        infos = via_http(f"{server.url}/get_reward", queries, [PROMPT] * n, [None] * n)
        check_rewards(infos, reference)
        check_means_not_lowered(infos, reference)
        # the shipped file in server mode gives the same rewards
        env.setenv("APEX_OPENRLHF_URL", server.url)
        reward_func = load_reward_file(REWARD_FILE)
        infos = asyncio.run(via_function(reward_func, queries, [PROMPT] * n, [None] * n))
        check_rewards(infos, reference)
    kinds = sorted(json.loads(x)["type"] for x in log.read_text().splitlines())
    assert kinds == ["AudioDecodeError"] * 4 + ["AudioTooShortError"] * 2  # two runs of BAD


def test_serve_decoder_audio_is_charged_to_the_decoded_size_budget(checkpoint, tmp_path):
    """Audio a --decoder makes has no header to read first: it is charged once decoded, so a
    clip over --max-clip-samples is refused with its typed error and the server stays up."""
    pytest.importorskip("httpx")
    from server_harness import ServerProcess

    log = tmp_path / "server-failures.jsonl"
    args = ["--threads", "1", "--decoder", "note_lm:decode_notes", "--failure-log", str(log)]
    args += ["--max-clip-samples", "1000"]
    pythonpath = f"{EXAMPLES}:{REPO / 'tests'}"
    with ServerProcess(checkpoint, args, env={"PYTHONPATH": pythonpath}) as server:
        infos = via_http(f"{server.url}/get_reward", [PROMPT + GOOD[0]], [PROMPT], [None])
        assert infos[0]["apex_ok"].item() == 0.0
        import httpx

        assert httpx.get(f"{server.url}/ready", timeout=30).status_code == 200
    kinds = [json.loads(x)["type"] for x in log.read_text().splitlines()]
    assert kinds == ["DecodedSizeTooLarge"]
