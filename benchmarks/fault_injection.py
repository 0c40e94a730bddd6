"""Fault injection: every hostile input and client the reward server is hardened against, in one
run, with a tally of what it answered.

Starts ``apex-reward serve`` (a tiny random-encoder checkpoint, loopback, an API key, short
timeouts) and throws at it, interleaved with good requests: decompression bombs, a request over
the decoded-size budget, stalled and trickled bodies, slow and missing headers, unparseable HTTP
(bad ``Content-Length``), foreign ``Host`` and ``Origin`` headers, an URL-encoded query key (which
must not reach the log), clients that disconnect while their clips wait, and the malformed
requests of every kind (bad JSON, base64, audio, media type, keys, paths, limits). Each request
has one right answer (status and error type); a good request must come back with its scores.

When ``benchmarks/faults_files.py`` is present (the file, checkpoint and extraction faults), its
``run_cases(workdir)`` runs too and both groups are printed with their total.

    python benchmarks/fault_injection.py [--json out.json]

Columns: requests tried / answered right / wrong / 5xx / crashes (the server process died);
faults injected / survived (answered right and the server still healthy afterwards) / data lost
(good requests that did not get their scores).
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import json
import platform
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "tests"))
sys.path.insert(0, str(HERE))

KEY = "fault-injection-key-0123456789"
IDLE_S, BODY_S = 2.0, 5.0
FIELDS = ("tried", "right", "wrong", "errors_5xx", "crashes")
FAULT_FIELDS = ("faults_injected", "faults_survived", "data_lost")


class Tally:
    """Counts answers against their expected status (and error type)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.wrong: list[str] = []

    def answer(self, what: str, status: int, expected: int, ok: bool = True) -> bool:
        self.counts["tried"] += 1
        if status >= 500:
            self.counts["errors_5xx"] += 1
        right = status == expected and ok
        self.counts["right" if right else "wrong"] += 1
        if not right:
            self.wrong.append(f"{what}: got {status}, expected {expected}")
        return right

    def fault(self, survived: bool, lost: int = 0) -> None:
        self.counts["faults_injected"] += 1
        self.counts["faults_survived"] += int(survived)
        self.counts["data_lost"] += lost


def _checkpoint(directory: Path) -> Path:
    import torch

    from apex_reward import ApexConfig, ApexRewardModel
    from apex_reward.config import FrontendConfig

    torch.manual_seed(0)
    cfg = ApexConfig.from_preset("tiny", encoder_source=None)
    cfg.frontend = FrontendConfig(segment_seconds=1.0, min_duration_s=0.5)
    return ApexRewardModel.from_config(cfg, encoder="random").save_pretrained(directory / "tiny")


def run_server_faults(workdir: Path) -> tuple[Tally, list[str]]:
    """All server faults against one ``apex-reward serve``; the tally and notes."""
    import httpx
    import numpy as np
    from server_faults import (
        flac_bomb,
        json_of_response,
        open_stalled,
        raw_exchange,
        read_until_closed,
        status_of_response,
        wav_bytes,
    )
    from server_harness import ServerProcess

    tally = Tally()
    notes: list[str] = []
    rng = np.random.default_rng(0)
    t = np.arange(24000) / 24000

    def clip(seed: int) -> bytes:
        f = 110.0 * 2 ** (seed % 24 / 12)
        x = 0.3 * np.sin(2 * np.pi * f * t) + 0.05 * rng.standard_normal(t.size)
        return wav_bytes(x.astype(np.float32), 24000)

    good = [clip(i) for i in range(16)]
    bomb = flac_bomb(120.0)
    args = ["--threads", "1", "--api-key-env", "APEX_FI_KEY", "--allow-query-api-key"]
    args += ["--max-request-samples", "2000000", "--idle-timeout-s", str(IDLE_S)]
    args += ["--body-timeout-s", str(BODY_S), "--max-batch", "8", "--max-clips-per-request", "8"]
    log_path = workdir / "server.log"
    ckpt = _checkpoint(workdir)
    env = {"APEX_FI_KEY": KEY, "HF_HUB_OFFLINE": "1"}
    with (
        ServerProcess(ckpt, args, env=env, log_path=log_path) as server,
        httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}, timeout=120) as http,
    ):

        def healthy() -> bool:
            try:
                return server.process.poll() is None and http.get("/ready").status_code == 200
            except httpx.TransportError:
                return False

        def post_good(i: int) -> bool:
            r = http.post("/v1/score", files={"file": (f"g{i}.wav", good[i % len(good)])})
            ok = r.status_code == 200 and np.isfinite(r.json().get("reward", float("nan")))
            return tally.answer("good clip", r.status_code, 200, ok)

        def expect(what: str, expected: int, kind: str | None, send: Callable) -> bool:
            try:
                r = send()
                status, body = r.status_code, r.json()
            except (httpx.TransportError, ValueError) as e:
                return tally.answer(f"{what} ({type(e).__name__})", 0, expected)
            ok = kind is None or body.get("error", {}).get("type") == kind
            return tally.answer(what, status, expected, ok)

        def fault(name: str, run: Callable[[], tuple[bool, int]]) -> None:
            try:
                answered, lost = run()
            except Exception as e:  # a fault the script did not foresee is a failed fault
                notes.append(f"{name}: {type(e).__name__}: {e}")
                answered, lost = False, 0
            survived = answered and healthy()
            tally.fault(survived, lost)
            if not survived:
                notes.append(f"{name}: not survived")

        # 1. decompression bombs interleaved with good requests, 4 clients at once
        def bombs() -> tuple[bool, int]:
            def one(i: int) -> tuple[bool, bool]:
                if i % 11 == 5:
                    r = expect(
                        "bomb",
                        422,
                        "DecodedSizeTooLarge",
                        lambda: http.post(
                            "/v1/score", content=bomb, headers={"Content-Type": "audio/flac"}
                        ),
                    )
                    return r, True
                return post_good(i), False

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                out = list(pool.map(one, range(220)))
            lost = sum(1 for ok, is_bomb in out if not ok and not is_bomb)
            return all(ok for ok, _ in out), lost

        fault("decompression bombs (20, with 200 good requests)", bombs)

        # 2. a request whose clips together decode past the request budget
        long_clip = wav_bytes(np.zeros(720_000, dtype=np.float32), 24000)
        fault(
            "request over --max-request-samples",
            lambda: (
                expect(
                    "3 x 30 s batch",
                    413,
                    "RequestDecodedTooLarge",
                    lambda: http.post(
                        "/v1/score/batch",
                        files=[("file", (f"{i}.wav", long_clip)) for i in range(3)],
                    ),
                ),
                0,
            ),
        )

        # 3. stalled bodies, trickled bodies, slow and missing headers
        def stalled(n: int, head: bytes, body: bytes, expected: int, wait: float) -> bool:
            socks = open_stalled(server.url, n, head, body)
            lost = 0
            for i in range(3):  # good requests while the stalled ones hold their connections
                lost += not post_good(100 + i)
            answers = read_until_closed(socks, timeout=wait)
            for a in answers:
                tally.answer(f"stalled ({n})", status_of_response(a), expected, a is not None)
            return all(status_of_response(a) == expected for a in answers) and not lost

        auth = f"X-API-Key: {KEY}\r\n".encode()
        slow_head = (
            b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: audio/wav\r\n"
            + auth
            + b"Content-Length: 60000000\r\n\r\n"
        )
        fault(
            "100 stalled bodies (60 MB declared, 1 kB sent)",
            lambda: (stalled(100, slow_head, b"\0" * 1024, 408, IDLE_S + 40), 0),
        )
        fault(
            "10 slow request headers",
            lambda: (
                stalled(10, b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"", 408, 40),
                0,
            ),
        )
        fault("5 silent connections", lambda: (stalled(5, b"", b"", 408, 40), 0))

        def trickle() -> tuple[bool, int]:
            (sock,) = open_stalled(server.url, 1, slow_head.replace(b"60000000", b"1000000"))
            deadline = time.monotonic() + BODY_S + 20
            while time.monotonic() < deadline:
                try:
                    sock.sendall(b"\0")
                except OSError:
                    break
                time.sleep(1.0)
            (answer,) = read_until_closed([sock], timeout=10)
            return tally.answer("trickled body", status_of_response(answer), 408), 0

        fault("a body trickled a byte a second", trickle)

        # 4. what uvicorn cannot parse
        for what, raw in (
            ("Content-Length: abc", b"Content-Length: abc\r\n\r\n"),
            ("two Content-Lengths", b"Content-Length: 5\r\nContent-Length: 7\r\n\r\n"),
            ("negative Content-Length", b"Content-Length: -1\r\n\r\n"),
        ):

            def bad_http(raw: bytes = raw, what: str = what) -> tuple[bool, int]:
                answer = raw_exchange(
                    server.url, b"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\n" + raw
                )
                kind = json_of_response(answer)["error"]["type"] if answer else None
                ok = kind == "InvalidRequest"
                return tally.answer(what, status_of_response(answer), 400, ok), 0

            fault(f"unparseable request ({what})", bad_http)

        # 5. web pages: DNS rebinding and cross-origin form posts
        fault(
            "DNS rebinding (foreign Host)",
            lambda: (
                expect(
                    "foreign Host",
                    400,
                    "HostNotAllowed",
                    lambda: http.get("/v1/info", headers={"Host": "rebind.attacker.example"}),
                ),
                0,
            ),
        )
        fault(
            "cross-origin form post",
            lambda: (
                expect(
                    "foreign Origin",
                    403,
                    "OriginNotAllowed",
                    lambda: http.post(
                        "/v1/score",
                        files={"file": ("x.wav", good[0])},
                        headers={"Origin": "http://evil.example"},
                    ),
                ),
                0,
            ),
        )

        # 6. the key in an URL-encoded query must work and never reach the log
        def query_key() -> tuple[bool, int]:
            with httpx.Client(base_url=server.url, timeout=60) as anon:
                r = anon.post(f"/v1/score?api%5Fkey={KEY}", files={"file": ("q.wav", good[1])})
            time.sleep(0.3)
            leaked = KEY in log_path.read_text(errors="replace")
            return tally.answer("api%5Fkey query", r.status_code, 200, not leaked), 0

        fault("API key as ?api%5Fkey= (redaction)", query_key)

        # 7. clients that give up while their clips wait
        def give_up() -> tuple[bool, int]:
            files = [("file", (f"c{i}.wav", good[i % 16])) for i in range(8)]
            for _ in range(10):
                try:
                    http.post("/v1/score/batch", files=files, timeout=0.05)
                except httpx.TimeoutException:
                    pass
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                metrics = http.get("/metrics").text
                if "apex_queue_clips 0.0" in metrics:
                    break
                time.sleep(0.1)
            drained = "apex_queue_clips 0.0" in http.get("/metrics").text
            return tally.answer("queue drained", 200 if drained else 0, 200) and post_good(7), 0

        fault("10 clients disconnecting mid-request", give_up)

        # 8. malformed requests of every kind, each with its one right answer
        b64 = base64.b64encode(good[2]).decode()
        malformed = [
            ("invalid JSON", 400, "InvalidJSON", dict(content=b"{", headers={"Content-Type": "application/json"})),
            ("bad base64", 400, "InvalidBase64", dict(json={"base64": "!!!"})),
            ("not audio", 422, "AudioDecodeError", dict(content=b"hello", headers={"Content-Type": "audio/wav"})),
            ("empty body", 400, "EmptyBody", dict(content=b"", headers={"Content-Type": "audio/wav"})),
            ("wrong media type", 415, "UnsupportedMediaType", dict(content=b"x", headers={"Content-Type": "text/plain"})),
            ("path while paths are off", 403, "PathNotAllowed", dict(json={"path": "/etc/passwd"})),
            ("unknown field", 400, "InvalidRequest", dict(json={"base64": b64, "evil": 1})),
            ("missing key", 401, "Unauthorized", dict(json={"base64": b64}, headers={"X-API-Key": ""})),
            ("wrong key", 401, "Unauthorized", dict(json={"base64": b64}, headers={"X-API-Key": "nope"})),
            ("too short clip", 422, "AudioTooShortError", dict(content=wav_bytes(np.zeros(2400, np.float32), 24000), headers={"Content-Type": "audio/wav"})),
            ("odd sample rate", 422, "UnsupportedSampleRateError", dict(content=wav_bytes(np.zeros(44101, np.float32), 44101), headers={"Content-Type": "audio/wav"})),
        ]  # fmt: skip
        for what, status, kind, kw in malformed:

            def bad(what: str = what, status: int = status, kind: str = kind, kw=kw):
                ok = expect(what, status, kind, lambda: http.post("/v1/score", **kw))
                return ok, 0

            fault(f"malformed: {what}", bad)
        too_many = [{"base64": b64}] * 9
        fault(
            "too many clips",
            lambda: (
                expect(
                    "9 clips",
                    400,
                    "TooManyClips",
                    lambda: http.post("/v1/score/batch", json={"clips": too_many}),
                ),
                0,
            ),
        )
        alive = healthy()
    log = log_path.read_text(errors="replace")
    if not alive:
        tally.counts["crashes"] += 1
    if "Traceback" in log:
        notes.append("the server log holds a traceback")
    return tally, notes


def _table(groups: dict[str, dict[str, int]]) -> str:
    cols = FIELDS + FAULT_FIELDS
    width = max(len(g) for g in groups) + 2
    lines = [" " * width + " ".join(f"{c:>15}" for c in cols)]
    for name, counts in groups.items():
        lines.append(f"{name:<{width}}" + " ".join(f"{counts.get(c, 0):>15}" for c in cols))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--json", type=Path, help="also write the counts here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    groups: dict[str, dict[str, int]] = {}
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "server").mkdir()
        tally, server_notes = run_server_faults(work / "server")
        groups["server"] = {k: tally.counts.get(k, 0) for k in FIELDS + FAULT_FIELDS}
        notes += server_notes + tally.wrong
        try:
            from faults_files import run_cases
        except ImportError:
            notes.append("benchmarks/faults_files.py not present: file faults not run")
        else:
            (work / "files").mkdir()
            files = run_cases(work / "files")
            groups["files"] = {k: int(files.get(k, 0)) for k in FIELDS + FAULT_FIELDS}
    groups["total"] = {k: sum(g.get(k, 0) for g in groups.values()) for k in FIELDS + FAULT_FIELDS}
    print(_table(groups))
    for n in notes:
        print(f"note: {n}")
    print(f"wall time {time.perf_counter() - t0:.0f} s; {platform.platform()}")
    if args.json:
        args.json.write_text(json.dumps({"groups": groups, "notes": notes}, indent=2))
    bad = groups["total"]
    return int(bool(bad["wrong"] or bad["crashes"] or bad["errors_5xx"] or bad["data_lost"]))


if __name__ == "__main__":
    raise SystemExit(main())
