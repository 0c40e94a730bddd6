"""Per-sample reward logs in OpenRLHF's reply shape, shared by the reward-function file
(:mod:`apex_reward.integrations.openrlhf`) and the server's ``/get_reward``.

OpenRLHF averages every ``extra_logs`` key over a step's samples, and every sample must carry the
same keys. :class:`RewardLogs` gives each sample ``apex_ok``, ``apex_flagged`` and
``apex_<score>`` per score; a sample that could not be scored gets, in place of its scores, the
mean of the scored samples (of the same call, else of the last ``window`` scored ones, else the
middle of each score's range), so failures never pull a logged mean towards 0.
:class:`FailureLog` counts failures by error type and writes one JSON line each.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from apex_reward.config import SCORE_RANGES
from apex_reward.scoring import ScoreResult

logger = logging.getLogger(__name__)

__all__ = ["FailureLog", "RewardLogs", "response_text"]

#: Longest excerpt of a response kept in a failure-log line.
_EXCERPT = 200


def response_text(query: str, prompt: Any) -> str:
    """The response part of an OpenRLHF query: the text after the prompt when the query starts
    with it, else the whole query."""
    if isinstance(prompt, str) and query.startswith(prompt):
        return query[len(prompt) :]
    return query


# ----------------------------------------------------------------------------------------------
# logs


class FailureLog:
    """Counts failed samples by error type and appends one JSON line per failure to ``path``.

    Attributes:
        counts: ``{error type: failed samples}`` so far in this process.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        """Failed samples so far."""
        return sum(self.counts.values())

    def record(self, sample: str, error: Mapping[str, Any], response: str | None = None) -> None:
        """Count one failed sample (``error``: ``{"type", "message"}``) and log it."""
        kind, message = str(error.get("type")), str(error.get("message"))
        line = {"time": time.time(), "sample": sample, "type": kind, "message": message}
        if response is not None:
            line["response"] = response[:_EXCERPT]
        with self._lock:
            self.counts[kind] += 1
            if self.path is not None:
                with self.path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(line) + "\n")
        logger.warning("reward sample %s not scored: %s: %s", sample, kind, message)


class RewardLogs:
    """Builds OpenRLHF's reply (``rewards``, ``scores``, ``extra_logs``, ``errors``) from scored
    and failed samples, filling a failed sample's logs with the mean of scored ones.

    Args:
        score_names: the checkpoint's scores (one ``apex_<name>`` log each).
        window: how many recent scored samples the fallback mean covers.
        failure_log: where failures are counted and written.
    """

    def __init__(
        self,
        score_names: Sequence[str],
        *,
        window: int = 1024,
        failure_log: FailureLog | None = None,
    ) -> None:
        self.score_names = tuple(score_names)
        self.failures = failure_log or FailureLog()
        self._recent: deque[dict[str, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def _logged(self, res: ScoreResult) -> dict[str, float]:
        values = res.scores or {}
        out = {f"apex_{s}": float(values[s]) for s in self.score_names}
        out["apex_flagged"] = 1.0 if res.flags else 0.0
        return out

    def _fill(self, scored: list[dict[str, float]]) -> dict[str, float]:
        rows = scored or list(self._recent)
        if rows:
            return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        out = {f"apex_{s}": sum(SCORE_RANGES.get(s, (0.0, 0.0))) / 2 for s in self.score_names}
        out["apex_flagged"] = 0.0
        return out

    def reply(
        self,
        results: Sequence[ScoreResult | Mapping[str, Any]],
        *,
        score_key: str,
        failure_reward: float,
        names: Sequence[str] | None = None,
        responses: Sequence[str | None] | None = None,
    ) -> dict[str, Any]:
        """The reply for the samples of one call, in order.

        Args:
            results: per sample, a scored :class:`ScoreResult` or an error ``{"type",
                "message"}``.
            score_key: the score given as ``scores`` (a score name or ``"reward"``).
            failure_reward: ``rewards`` and ``scores`` of a failed sample.
            names, responses: per sample, its name and response text for the failure log.

        Returns:
            ``{"rewards": [float], "scores": [float], "extra_logs": {name: [float]},
            "errors": [None | {"type", "message"}]}``, lists as long as ``results``.
        """
        scored = [self._logged(r) for r in results if isinstance(r, ScoreResult)]
        with self._lock:
            fill = self._fill(scored)
            self._recent.extend(scored)
        rewards: list[float] = []
        scores: list[float] = []
        logs: dict[str, list[float]] = {"apex_ok": []}
        errors: list[Mapping[str, Any] | None] = []
        for i, res in enumerate(results):
            if isinstance(res, ScoreResult):
                reward = float(res.reward or 0.0)  # set: the clip was scored
                rewards.append(reward)
                scores.append(reward if score_key == "reward" else float(res.scores[score_key]))
                row, ok = self._logged(res), 1.0
                errors.append(None)
            else:
                rewards.append(failure_reward)
                scores.append(failure_reward)
                row, ok = fill, 0.0
                errors.append(dict(res))
                name = names[i] if names is not None else f"query[{i}]"
                self.failures.record(name, res, responses[i] if responses is not None else None)
            logs["apex_ok"].append(ok)
            for k, v in row.items():
                logs.setdefault(k, []).append(v)
        return {"rewards": rewards, "scores": scores, "extra_logs": logs, "errors": errors}
