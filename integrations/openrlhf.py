"""APEX as OpenRLHF's reward: the ``reward_func`` of a ``--reward.remote_url file.py``, and the
per-sample logs both it and the server's ``/get_reward`` answer with.

OpenRLHF (0.10) takes ``--reward.remote_url`` either as HTTP URLs (``/get_reward`` of
``apex-reward serve``) or as the path of a Python file ending in ``.py``. It loads that file
standalone (``importlib``, module name ``reward_func``), and for every rollout sample calls
``reward_func(queries, prompts, labels)`` in a worker thread with lists of one element: ``queries``
the decoded prompt + response text, ``prompts`` the prompt, ``labels`` the dataset's label. It
reads ``rewards`` (the training reward), ``scores`` (dynamic filtering; falls back to ``rewards``)
and ``extra_logs`` (``{name: value}``, logged as the mean over a step's samples) from the returned
dict; an exception is logged and leaves the sample without a reward.

The shipped file is ``apex_reward/integrations/openrlhf_reward.py`` (:data:`REWARD_FILE`), which
re-exports :func:`reward_func`. OpenRLHF passes no options to it, so it is configured from the
environment (:func:`config_from_env`): ``APEX_OPENRLHF_CONFIG=file.yaml`` and/or one
``APEX_OPENRLHF_<FIELD>`` variable per field of :class:`OpenRLHFRewardConfig`. With ``model`` it
scores in the trainer's process; with ``url`` it posts to an ``apex-reward serve`` (whose
``--decoder`` turns text responses into audio).

Logs (:class:`RewardLogs`): every sample's ``extra_logs`` has the same keys, ``apex_ok`` (1 scored,
0 failed), ``apex_flagged`` and ``apex_<score>`` for each of the checkpoint's scores. OpenRLHF
averages each key over all samples of a step, so a failed sample's 0.0 would drag every score's
mean down (a clarity mean below its range's bottom of 1). A failed sample is logged as the mean
of the scored samples instead: those of the same call when there are any, else the last
``window`` scored samples of this process (OpenRLHF sends one sample per call), else, before any
sample was scored, the middle of the score's range. Failures are counted by error type and
written, one JSON line each, to an optional failure log.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_type_hints

import torch

from apex_reward.conditioning import per_input_conditions
from apex_reward.dataclass_io import from_dict, load_config_file
from apex_reward.errors import ConfigError
from apex_reward.guard import POLICIES
from apex_reward.scoring import ScoreResult

from .decoders import check_target
from .reward_logs import FailureLog, RewardLogs, response_text

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = [
    "ENV_PREFIX",
    "REWARD_FILE",
    "FailureLog",
    "OpenRLHFReward",
    "OpenRLHFRewardConfig",
    "RewardLogs",
    "config_from_env",
    "response_text",
    "reward_func",
]

#: Environment variables configuring the reward-function file start with this.
ENV_PREFIX = "APEX_OPENRLHF_"

#: The file to pass as ``--reward.remote_url``.
REWARD_FILE = Path(__file__).with_name("openrlhf_reward.py")


@dataclass
class OpenRLHFRewardConfig:
    """Options of the OpenRLHF reward-function file (``APEX_OPENRLHF_<FIELD>`` each)."""

    model: str | None = field(
        default=None,
        metadata={"help": "checkpoint directory or hub id: score in the trainer's process"},
    )
    url: str | None = field(
        default=None,
        metadata={
            "help": "base URL of an apex-reward server (e.g. http://127.0.0.1:8000): post each "
            "sample to its /get_reward instead (set either model or url)"
        },
    )
    decoder: str | None = field(
        default=None,
        metadata={
            "help": "in-process only: 'module:function' turning the response text into audio "
            "(with url, start the server with --decoder); without one, the response must hold "
            "an audio reference (data:audio/...;base64, or file://)"
        },
    )
    sample_rate: int | None = field(
        default=None, metadata={"help": "Hz of a bare waveform the decoder returns"}
    )
    score: str = field(
        default="overall",
        metadata={"help": "in-process: the score returned as 'scores' (a score name or 'reward')"},
    )
    guard: Literal["off", "flag", "penalize"] = field(
        default="penalize",
        metadata={
            "help": "in-process: reward guard policy (penalize: flagged clips get the floor)"
        },
    )
    failure_reward: float = field(
        default=0.0,
        metadata={"help": "in-process: reward and score of a sample that cannot be scored"},
    )
    condition: str | None = field(
        default=None,
        metadata={
            "help": "in-process: a conditioned checkpoint's audience for every sample (default: "
            "the learned average); with url, start the server with --condition instead"
        },
    )
    failure_log: str | None = field(
        default=None,
        metadata={"help": "append one JSON line per failed sample to this file"},
    )
    window: int = field(
        default=1024,
        metadata={"help": "scored samples whose mean a failed sample is logged as"},
    )
    device: str | None = field(default=None, metadata={"help": "in-process: torch device"})
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = field(
        default="auto", metadata={"help": "in-process: model precision"}
    )
    api_key_env: str = field(
        default="APEX_REWARD_API_KEY",
        metadata={"help": "with url: environment variable holding the server's API key"},
    )
    timeout_s: float = field(default=180.0, metadata={"help": "with url: seconds per request"})
    retries: int = field(
        default=3, metadata={"help": "with url: retries after a connection error, 429 or 5xx"}
    )

    def __post_init__(self) -> None:
        if (self.model is None) == (self.url is None):
            raise ConfigError(
                f"openrlhf reward: set exactly one of {ENV_PREFIX}MODEL (score in-process) and "
                f"{ENV_PREFIX}URL (an apex-reward server)"
            )
        if self.decoder is not None:
            check_target(self.decoder)
            if self.url is not None:
                raise ConfigError(
                    "openrlhf reward: with a server URL the decoder runs on the server; start it "
                    "with 'apex-reward serve --decoder module:function' and unset the decoder here"
                )
        if self.guard not in POLICIES:
            raise ConfigError(f"openrlhf reward: guard must be one of {POLICIES}")
        if self.condition is not None and self.url is not None:
            raise ConfigError(
                "openrlhf reward: with a server URL the condition is the server's; start it with "
                "'apex-reward serve --condition VALUE' and unset the condition here"
            )
        if not math.isfinite(self.failure_reward):
            raise ConfigError(
                f"openrlhf reward: failure_reward must be finite, got {self.failure_reward}"
            )
        if self.window < 1 or self.timeout_s <= 0 or self.retries < 0:
            raise ConfigError("openrlhf reward: need window >= 1, timeout_s > 0, retries >= 0")


def _env_value(raw: str, hint: Any) -> Any:
    """An environment string as the field's type: strings stay strings, the rest is YAML."""
    if raw.strip().lower() in ("", "null", "none"):
        return None
    if hint is str or str in get_args(hint):
        return raw
    import yaml

    return yaml.safe_load(raw)


def config_from_env(environ: Mapping[str, str] | None = None) -> OpenRLHFRewardConfig:
    """The reward file's options: ``APEX_OPENRLHF_CONFIG`` (a YAML/JSON file of fields), then
    ``APEX_OPENRLHF_<FIELD>`` variables over it (e.g. ``APEX_OPENRLHF_MODEL=runs/apex``).

    Raises:
        ConfigError: unknown fields in the file, bad values, neither or both of model and url.
    """
    env = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    if env.get(ENV_PREFIX + "CONFIG"):
        data.update(load_config_file(env[ENV_PREFIX + "CONFIG"]))
    hints = get_type_hints(OpenRLHFRewardConfig)
    for f in fields(OpenRLHFRewardConfig):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            data[f.name] = _env_value(raw, hints[f.name])
    return from_dict(OpenRLHFRewardConfig, data, where="openrlhf reward")


# ----------------------------------------------------------------------------------------------
# the reward function


def _error(e: BaseException) -> dict[str, str]:
    return {"type": type(e).__name__, "message": str(e)}


def _as_tensors(reply: Mapping[str, Any]) -> dict[str, Any]:
    """A reply's lists as float32 tensors ``[n]`` (what OpenRLHF's own examples return)."""
    as_t = lambda v: torch.tensor([float(x) for x in v], dtype=torch.float32)  # noqa: E731
    return {
        "rewards": as_t(reply["rewards"]),
        "scores": as_t(reply["scores"]),
        "extra_logs": {k: as_t(v) for k, v in reply["extra_logs"].items()},
        "errors": list(reply.get("errors") or [None] * len(reply["rewards"])),
    }


class OpenRLHFReward:
    """``reward_func(queries, prompts, labels, **kwargs)`` for OpenRLHF, scoring in this process
    (``config.model``) or through an apex-reward server (``config.url``).

    Thread-safe: OpenRLHF calls it from worker threads; the model runs under its cache's lock.

    Attributes:
        logs: the :class:`RewardLogs` (in-process) whose ``failures`` count failed samples.
    """

    def __init__(self, config: OpenRLHFRewardConfig) -> None:
        self.config = config
        self.failure_log = FailureLog(config.failure_log)
        self.logs: RewardLogs | None = None
        self._client: Any = None
        self._init_lock = threading.Lock()

    def _model(self) -> tuple[ApexRewardModel, threading.Lock]:
        from apex_reward.loading import ModelOptions

        from .model_cache import load_cached_model

        cfg = self.config
        opts = ModelOptions(model=cfg.model, device=cfg.device, dtype=cfg.dtype)
        model, lock = load_cached_model(opts)
        with self._init_lock:
            if self.logs is None:
                if cfg.score != "reward" and cfg.score not in model.score_names:
                    raise ConfigError(
                        f"openrlhf reward: score {cfg.score!r} is not 'reward' or one of "
                        f"{list(model.score_names)}"
                    )
                # an unknown condition (or one for an unconditioned checkpoint) fails here
                per_input_conditions(model.config.head.condition, cfg.condition, 1)
                self.logs = RewardLogs(
                    model.score_names, window=cfg.window, failure_log=self.failure_log
                )
        return model, lock

    def _audio(self, model: ApexRewardModel, query: str, prompt: Any, label: Any, name: str):
        """One sample's checked ``(waveform, sample_rate)``."""
        from apex_reward.audio import decode_audio_bytes, load_audio

        from .decoders import decode_response
        from .serving.decoding import ClipDecoder
        from .serving.errors import NoAudioReference
        from .serving.protocols.openrlhf import reference_for

        cfg = self.config
        if cfg.decoder is not None:
            wav, sr = decode_response(
                cfg.decoder, response_text(query, prompt), sample_rate=cfg.sample_rate, where=name
            )
        else:
            ref = reference_for(query, prompt, label)
            if ref is None:
                raise NoAudioReference(
                    f"{name}: no decoder, and no 'data:audio/...;base64,' or 'file://' reference "
                    "in the response or the label"
                )
            kind, value = ref
            if kind == "base64":
                wav, sr = decode_audio_bytes(ClipDecoder.b64decode(value, name), name=name)
            else:
                wav, sr = load_audio(Path(value))
        model.frontend.check(wav, sr, name)
        return wav, int(sr)

    def _in_process(self, queries: list[str], prompts: list[Any], labels: list[Any]) -> dict:
        model, lock = self._model()
        assert self.logs is not None
        names = [f"query[{i}]" for i in range(len(queries))]
        outcomes: list[ScoreResult | dict[str, str] | None] = [None] * len(queries)
        todo: list[tuple[int, Any]] = []
        for i, (q, p, lab) in enumerate(zip(queries, prompts, labels)):
            try:
                todo.append((i, self._audio(model, q, p, lab, names[i])))
            except ConfigError:
                raise
            except Exception as e:  # this sample only: typed audio/decoder/reference errors
                outcomes[i] = _error(e)
        if todo:
            with lock:
                results = model.score(
                    [a for _, a in todo],
                    num_workers=0,
                    guard=self.config.guard,
                    condition=self.config.condition,
                )
            for (i, _), res in zip(todo, results):
                outcomes[i] = (
                    res if res.ok else {"type": str(res.error_type), "message": str(res.error)}
                )
        return self.logs.reply(
            outcomes,  # type: ignore[arg-type]
            score_key=self.config.score,
            failure_reward=self.config.failure_reward,
            names=names,
            responses=[response_text(q, p) for q, p in zip(queries, prompts)],
        )

    def _remote(self, queries: list[str], prompts: list[Any], labels: list[Any]) -> dict:
        from .serving.client import ApexRewardClient
        from .serving.wire import RemoteError

        cfg = self.config
        if self._client is None:
            with self._init_lock:
                if self._client is None:
                    self._client = ApexRewardClient(
                        cfg.url or "",
                        api_key=os.environ.get(cfg.api_key_env),
                        timeout=cfg.timeout_s,
                        retries=cfg.retries,
                    )
        body = {"query": queries, "prompts": prompts, "labels": labels}
        reply = self._client.request("POST", "/get_reward", json=body)
        n = len(queries)
        ok = isinstance(reply, dict) and all(
            isinstance(reply.get(k), list) and len(reply[k]) == n for k in ("rewards", "scores")
        )
        if not ok or not isinstance(reply.get("extra_logs"), dict):
            raise RemoteError(200, "BadResponse", f"unexpected /get_reward answer: {reply!r:.300}")
        for i, err in enumerate(reply.get("errors") or []):
            if err is not None:
                self.failure_log.record(f"query[{i}]", err, response_text(queries[i], prompts[i]))
        return reply

    def __call__(
        self, queries: Sequence[str], prompts: Sequence[Any], labels: Sequence[Any], **kwargs: Any
    ) -> dict[str, Any]:
        """Score OpenRLHF samples.

        Args:
            queries: prompt + response text per sample.
            prompts: the prompt per sample (the response is the query after it).
            labels: the dataset label per sample (may hold an audio reference); None allowed.
            **kwargs: whatever else OpenRLHF passes; not used.

        Returns:
            ``{"rewards": float32 [n], "scores": float32 [n], "extra_logs": {name: float32 [n]},
            "errors": [None | {"type", "message"}]}`` (see the module docstring for the logs).

        Raises:
            ConfigError: bad configuration (raised, so the run stops instead of training on
                failure rewards).
            RemoteError: the server refused the request or stayed unreachable (with ``url``).
        """
        queries = list(queries)
        n = len(queries)
        prompts = list(prompts) if prompts is not None else [None] * n
        labels = list(labels) if labels is not None else [None] * n
        if len(prompts) != n or len(labels) != n:
            raise ConfigError(
                f"openrlhf reward: {n} queries but {len(prompts)} prompts and {len(labels)} labels"
            )
        if self.config.url is not None:
            reply = self._remote(queries, prompts, labels)
        else:
            reply = self._in_process(queries, prompts, labels)
        return _as_tensors(reply)


_DEFAULT: OpenRLHFReward | None = None
_DEFAULT_LOCK = threading.Lock()


def reward_func(
    queries: Sequence[str], prompts: Sequence[Any], labels: Sequence[Any], **kwargs: Any
) -> dict[str, Any]:
    """OpenRLHF's reward-function entry point, configured from the environment
    (:func:`config_from_env`, read on the first call). See :meth:`OpenRLHFReward.__call__`."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = OpenRLHFReward(config_from_env())
    return _DEFAULT(queries, prompts, labels, **kwargs)
