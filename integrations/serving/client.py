"""``ApexRewardClient``: call a remote ``apex-reward serve`` from Python, or use it as a TRL reward.

::

    from apex_reward.integrations.serving import ApexRewardClient

    client = ApexRewardClient("http://127.0.0.1:8000", api_key="...")   # or $APEX_REWARD_API_KEY
    client = ApexRewardClient(["http://gpu0:8000", "http://gpu1:8000"])  # replicas, round-robin
    results = client.score(["a.wav", (waveform, 44100)])   # list[ScoreResult], like model.score
    cmp = client.compare("a.wav", "b.wav")                   # Comparison(logit, probability, ...)

    # TRL GRPO/RLOO: reward_funcs=[client]; completions are audio (paths, arrays) or anything the
    # decoder turns into audio
    client = ApexRewardClient(url, decoder=my_decoder, sample_rate=32000)
    rewards = client(prompts, completions)                   # list[float | None]

Audio travels as files: paths are read here and uploaded (or, with ``send_paths=True``, sent as
paths for a server started with ``--allow-dir`` on a shared filesystem); arrays are written as
32-bit float WAV, so the server decodes exactly the samples given. Requests are split to respect
the server's body and clip limits and sent concurrently, so the server can batch them with other
workers' clips. Connection errors, timeouts, 429 and 5xx answers are retried with exponential
backoff; 4xx answers are not (they raise :class:`RemoteError`). Given several server URLs, the
client sends its requests round-robin and fails over: a request that meets a connection error, a
timeout, 429 or 5xx goes to the next server at once (a server that refused a connection is left
out for ``down_s`` seconds), and backs off only when every server failed. A clip the server cannot score gets
a :class:`~apex_reward.scoring.ScoreResult` with ``.error`` (reward ``None``), never an exception.

The client pickles without its connection pool (re-created on first use), so it can be shipped to
dataloader or Ray workers; the API key is pickled only if it was passed explicitly.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from apex_reward.errors import ApexError, require
from apex_reward.scoring import ScoreResult

from .rotation import ServerRotation, backoff_delay
from .wire import (
    AudioLike,
    Comparison,
    Part,
    RemoteError,
    b64_clip,
    chunk_parts,
    error_of,
    is_pair,
    make_part,
    score_result,
)

logger = logging.getLogger(__name__)

__all__ = ["ApexRewardClient", "Comparison", "RemoteError", "API_KEY_ENV"]

#: Environment variable read for the API key when none is passed.
API_KEY_ENV = "APEX_REWARD_API_KEY"

_RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


class ApexRewardClient:
    """HTTP client of an apex-reward server; also a TRL reward function.

    Args:
        url: base URL of the server, e.g. ``"http://127.0.0.1:8000"``, or a list of the base
            URLs of several servers of the same model (requests go round-robin, with failover).
        api_key: the server's API key; default: the ``APEX_REWARD_API_KEY`` environment variable
            (read at request time, so it is not pickled).
        timeout: seconds to wait for one HTTP answer (connecting: at most 10 s).
        retries: extra attempts after a connection error, timeout, 429 or 5xx.
        backoff_s: first retry delay; doubles each attempt (with jitter), at most 30 s.
        sample_rate: Hz of arrays given without one.
        decoder: for the TRL call, ``decoder(completion) -> audio`` (a path, an array at
            ``sample_rate``, or ``(array, sample_rate)``); it must be picklable to pickle the
            client. Without one, completions must already be audio.
        max_clips_per_request: clips per HTTP request (the server's limit is 256 by default).
        max_request_mb: split requests to stay under this body size (server default: 64 MiB).
        concurrency: requests in flight at once for one call.
        send_paths: send paths as server-side paths instead of uploading the files (the server
            must be started with ``--allow-dir`` covering them).
        name: the ``__name__`` TRL logs the reward under.
        down_s: with several URLs, how long a server that could not be reached is skipped
            (it is tried again after that, or earlier when every server is down).
    """

    def __init__(
        self,
        url: str | Sequence[str] = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        sample_rate: int | None = None,
        decoder: Callable[[Any], AudioLike] | None = None,
        max_clips_per_request: int = 32,
        max_request_mb: float = 32.0,
        concurrency: int = 4,
        send_paths: bool = False,
        name: str = "apex_remote_reward",
        down_s: float = 5.0,
    ) -> None:
        if retries < 0 or timeout <= 0 or backoff_s < 0:
            raise ValueError("need retries >= 0, timeout > 0, backoff_s >= 0")
        if max_clips_per_request < 1 or max_request_mb <= 0 or concurrency < 1:
            raise ValueError(
                "need max_clips_per_request >= 1, max_request_mb > 0, concurrency >= 1"
            )
        urls = [url] if isinstance(url, str) else list(url)
        if not urls or not all(isinstance(u, str) and u for u in urls):
            raise ValueError(f"need one server URL or a non-empty list of them, got {url!r}")
        self.urls = [u.rstrip("/") for u in urls]
        self.url = self.urls[0]
        self.down_s = float(down_s)
        self._rotation = ServerRotation(self.urls, down_s)
        self.api_key = api_key
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.sample_rate = sample_rate
        self.decoder = decoder
        self.max_clips_per_request = int(max_clips_per_request)
        self.max_request_bytes = int(max_request_mb * 1024 * 1024)
        self.concurrency = int(concurrency)
        self.send_paths = bool(send_paths)
        self.__name__ = name
        self._http: Any = None
        self._lock = threading.Lock()

    # -- pickling: no sockets, no locks ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_http"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        url = self.url if len(self.urls) == 1 else self.urls
        return f"ApexRewardClient({url!r}, name={self.__name__!r})"

    # -- HTTP ---------------------------------------------------------------------------------------

    def _client(self):
        if self._http is None:
            with self._lock:
                if self._http is None:
                    httpx = require("httpx", "serve", "ApexRewardClient")
                    self._http = httpx.Client(
                        timeout=httpx.Timeout(self.timeout, connect=min(10.0, self.timeout)),
                        limits=httpx.Limits(max_connections=max(4, 2 * self.concurrency)),
                    )
        return self._http

    def _headers(self) -> dict[str, str]:
        key = self.api_key if self.api_key is not None else os.environ.get(API_KEY_ENV)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def close(self) -> None:
        """Close the connection pool (it is re-created if the client is used again)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> ApexRewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request with retries; returns the decoded JSON (or text for non-JSON answers).

        Raises:
            RemoteError: a 4xx answer (not retried), or no success after ``retries`` retries.
        """
        import httpx

        http = self._client()
        url = f"{self.url}{path}"
        last: str = ""
        status: int | None = None
        for attempt in range(self.retries + 1):
            retry_after = None
            for base in self._rotation.order():  # one server, or each of several once, in turn
                url = f"{base}{path}"
                try:
                    resp = http.request(method, url, headers=self._headers(), **kwargs)
                except httpx.TransportError as e:  # connect, read/write timeouts, protocol errors
                    last, status = f"{type(e).__name__}: {e}", None
                    if isinstance(e, httpx.ConnectError):
                        self._rotation.mark_down(base)
                    continue
                if resp.status_code < 400:
                    if resp.headers.get("content-type", "").startswith("application/json"):
                        return resp.json()
                    return resp.text
                kind, message = error_of(resp)
                if resp.status_code not in _RETRY_STATUSES:
                    raise RemoteError(resp.status_code, kind, message)
                last, status = f"{kind}: {message}", resp.status_code
                retry_after = resp.headers.get("retry-after")
            if attempt < self.retries:
                delay = backoff_delay(attempt, retry_after, self.backoff_s)
                logger.warning(
                    "%s %s failed (%s); retry %d/%d in %.1f s",
                    method,
                    url,
                    last,
                    attempt + 1,
                    self.retries,
                    delay,
                )
                time.sleep(delay)
        raise RemoteError(
            status,
            "Unavailable",
            f"{method} {url} failed after {self.retries + 1} attempts: {last}",
        )

    # -- endpoints ----------------------------------------------------------------------------------

    def health(self) -> bool:
        """Whether the server (with several: any of them) answers ``/health`` (one attempt each,
        no retries)."""
        return self._any_answers("/health")

    def _any_answers(self, path: str) -> bool:
        import httpx

        for base in self.urls:
            try:
                if self._client().get(f"{base}{path}").status_code == 200:
                    return True
            except httpx.TransportError:
                pass
        return False

    def ready(self) -> bool:
        """Whether the server (with several: any of them) is ready to score (``/ready``; one
        attempt each)."""
        return self._any_answers("/ready")

    def info(self) -> dict[str, Any]:
        """The server's model, score names and limits (``/v1/info``)."""
        return self.request("GET", "/v1/info")

    def _part(self, index: int, item: AudioLike, sample_rate: int | None) -> Part:
        return make_part(index, item, sample_rate, send_paths=self.send_paths)

    def _chunks(self, parts: list[Part]) -> list[list[Part]]:
        return chunk_parts(parts, self.max_clips_per_request, self.max_request_bytes)

    def _send_chunk(self, chunk: list[Part]) -> list[dict[str, Any]]:
        if chunk[0].path is not None:
            body = {"clips": [{"path": p.path, "name": p.name} for p in chunk]}
            out = self.request("POST", "/v1/score/batch", json=body)
        else:
            files = [("file", (p.name, p.data, "application/octet-stream")) for p in chunk]
            out = self.request("POST", "/v1/score/batch", files=files)
        rows = out.get("results") if isinstance(out, dict) else None
        if not isinstance(rows, list) or len(rows) != len(chunk):
            raise RemoteError(200, "BadResponse", f"unexpected answer from the server: {out!r}")
        return rows

    def score(self, inputs: Any, *, sample_rate: int | None = None) -> list[ScoreResult]:
        """Score clips remotely; like :meth:`apex_reward.ApexRewardModel.score`.

        Args:
            inputs: a path, an array/tensor (``[T]`` or ``[C, T]``), an ``(array, sample_rate)``
                tuple, or a list of them.
            sample_rate: Hz of arrays given without one (default: the client's ``sample_rate``).

        Returns:
            One :class:`~apex_reward.scoring.ScoreResult` per input, in order: scores and reward,
            or the error the server (or the local file read) reported.

        Raises:
            RemoteError: the server refused the request or could not be reached.
        """
        single = isinstance(inputs, (str, Path)) or hasattr(inputs, "shape") or is_pair(inputs)
        items = [inputs] if single else list(inputs)
        rate = sample_rate if sample_rate is not None else self.sample_rate
        results: list[ScoreResult | None] = [None] * len(items)
        parts = []
        for i, item in enumerate(items):
            try:
                parts.append(self._part(i, item, rate))
            except ApexError as e:
                name = str(item) if isinstance(item, (str, Path)) else f"array[{i}]"
                results[i] = ScoreResult(
                    name, error=getattr(e, "reason", str(e)), error_type=type(e).__name__
                )
        chunks = self._chunks(parts)
        if len(chunks) > 1 and self.concurrency > 1:
            with ThreadPoolExecutor(min(self.concurrency, len(chunks))) as pool:
                answers = list(pool.map(self._send_chunk, chunks))
        else:
            answers = [self._send_chunk(c) for c in chunks]
        for chunk, rows in zip(chunks, answers):
            for part, row in zip(chunk, rows):
                results[part.index] = score_result(part.name, row)
        return [r for r in results if r is not None]

    def compare(
        self,
        a: AudioLike,
        b: AudioLike,
        *,
        sample_rate: int | None = None,
        is_instrumental: bool = False,
    ) -> Comparison:
        """``logit P(a > b)`` from the server (``/v1/compare``).

        Raises:
            RemoteError: e.g. a clip the server cannot score (422, naming it).
        """
        rate = sample_rate if sample_rate is not None else self.sample_rate
        pa, pb = self._part(0, a, rate), self._part(1, b, rate)
        if pa.path is not None or pb.path is not None:
            body = {
                "a": {"path": pa.path} if pa.path else b64_clip(pa),
                "b": {"path": pb.path} if pb.path else b64_clip(pb),
                "is_instrumental": bool(is_instrumental),
            }
            out = self.request("POST", "/v1/compare", json=body)
        else:
            files = [
                ("a", (pa.name, pa.data, "application/octet-stream")),
                ("b", (pb.name, pb.data, "application/octet-stream")),
            ]
            out = self.request(
                "POST",
                "/v1/compare",
                files=files,
                data={"is_instrumental": "true" if is_instrumental else "false"},
            )
        return Comparison(
            logit=float(out["logit"]),
            probability=float(out["probability"]),
            reward_a=float(out["reward_a"]),
            reward_b=float(out["reward_b"]),
            scores_a=dict(out["scores_a"]),
            scores_b=dict(out["scores_b"]),
            method=str(out["method"]),
        )

    # -- TRL reward function ----------------------------------------------------------------------

    def __call__(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[float | None]:
        """TRL reward function: one reward per completion, ``None`` where it cannot be scored.

        Completions are decoded to audio by ``decoder`` (if given). ``kwargs`` are TRL's extra
        columns; if TRL passes ``log_metric``, the fraction of unscoreable completions is logged as
        ``<name>/failed``.
        """
        audio: list[Any] = []
        failed_decode: dict[int, str] = {}
        for i, c in enumerate(completions):
            if self.decoder is None:
                audio.append(c)
                continue
            try:
                audio.append(self.decoder(c))
            except Exception as e:  # one bad completion must not stop the batch
                failed_decode[i] = f"{type(e).__name__}: {e}"
                audio.append(None)
        keep = [i for i in range(len(audio)) if i not in failed_decode]
        results = self.score([audio[i] for i in keep]) if keep else []
        rewards: list[float | None] = [None] * len(audio)
        for i, r in zip(keep, results):
            rewards[i] = r.reward if r.ok else None
            if not r.ok:
                logger.warning(
                    "%s: completion %d not scored: %s: %s", self.__name__, i, r.error_type, r.error
                )
        for i, why in failed_decode.items():
            logger.warning("%s: decoder failed on completion %d: %s", self.__name__, i, why)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and audio:
            log_metric(f"{self.__name__}/failed", sum(r is None for r in rewards) / len(audio))
        return rewards
