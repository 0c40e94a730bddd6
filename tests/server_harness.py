"""Reward servers for tests and benchmarks.

* :class:`ServerProcess`: the real ``apex-reward serve`` in a child process::

      with ServerProcess("runs/apex", ["--max-batch", "32"]) as server:
          client = ApexRewardClient(server.url)

* :class:`ThreadServer`: an app from ``create_app`` under uvicorn in a thread of this process
  (monkeypatches reach it)::

      with ThreadServer(create_app(model, config)) as url:
          httpx.get(f"{url}/health")

Test code, not part of the package: ``tests/`` imports it as ``server_harness``; the benchmarks
put ``tests/`` on ``sys.path`` and import it the same way.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ServerProcess", "ThreadServer", "port_in_args"]


def port_in_args(args: Sequence[str]) -> int | None:
    """The port a ``--port N`` / ``--port=N`` flag in ``args`` asks for (the last one), or None.

    Raises:
        ValueError: ``--port`` without a value, or a value that is not an integer.
    """
    port: int | None = None
    args = list(args)
    for i, a in enumerate(args):
        if a == "--port" or a.startswith("--port="):
            value = a.partition("=")[2] if "=" in a else (args[i + 1] if i + 1 < len(args) else "")
            try:
                port = int(value)
            except ValueError:
                raise ValueError(f"ServerProcess: --port needs an integer, got {value!r}") from None
    return port


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``apex-reward serve`` in a child process on 127.0.0.1.

    Args:
        model: checkpoint directory or hub id.
        args: more ``apex-reward serve`` flags. A ``--port N`` among them is honoured (as if
            ``port=N`` were given).
        port: TCP port (default: a free one, and another if that one is taken meanwhile).
        env: extra environment variables (e.g. the API key named by ``--api-key-env``).
        ready_timeout: seconds to wait for ``/ready``.
        log_path: where the server's output goes (default: a temporary file).
        program: what Python runs, followed by ``serve ...`` (default ``-m apex_reward``; the
            benchmarks pass a script that wraps the CLI).

    Raises:
        ValueError: ``port`` and a ``--port`` in ``args`` disagree.

    Attributes:
        url: ``http://127.0.0.1:PORT``.
        pid: the server's process id.
    """

    def __init__(
        self,
        model: str | Path,
        args: Sequence[str] = (),
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 180.0,
        log_path: str | Path | None = None,
        program: Sequence[str] = ("-m", "apex_reward"),
    ) -> None:
        in_args = port_in_args(args)
        if port is not None and in_args is not None and port != in_args:
            raise ValueError(f"ServerProcess: port={port} but args say --port {in_args}")
        self.model = str(model)
        self.args = list(args)
        self.port = port if port is not None else in_args
        self._fixed_port = self.port is not None
        self._port_in_args = in_args is not None
        self.env = dict(env or {})
        self.ready_timeout = ready_timeout
        self.log_path = log_path
        self.program = list(program)
        self.process: Any = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    def start(self) -> ServerProcess:
        """Start the server and wait until ``/ready`` answers 200.

        Raises:
            RuntimeError: the process exited or did not become ready (its log is in the
                message), or the port asked for is in use.
        """
        attempts = 1 if self._fixed_port else 3
        for _ in range(attempts):
            if not self._fixed_port:
                self.port = _free_port()
            self._log = (
                open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
                if self.log_path
                else tempfile.TemporaryFile()
            )
            cmd = [sys.executable, *self.program, "serve", "--model", self.model]
            if not self._port_in_args:
                cmd += ["--port", str(self.port)]
            cmd += self.args
            self.process = subprocess.Popen(
                cmd,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
            if self._wait_ready():
                return self
            log = self.log_text()
            self.stop()
            if "address already in use" not in log.lower():
                raise RuntimeError(f"apex-reward serve did not become ready:\n{log[-4000:]}")
            if self._fixed_port:
                raise RuntimeError(f"apex-reward serve: port {self.port} is already in use")
        raise RuntimeError(f"apex-reward serve: no free port after {attempts} attempts")

    def _wait_ready(self) -> bool:
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                if httpx.get(f"{self.url}/ready", timeout=2.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        return False

    def log_text(self) -> str:
        """What the server has written to stdout/stderr so far."""
        if self._log is None:
            return ""
        fd = self._log.fileno()  # pread: the child shares this file offset, leave it alone
        return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux ``/proc/PID/status`` VmRSS), in bytes."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"no VmRSS in /proc/{self.pid}/status")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout`` s)."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class ThreadServer:
    """An ASGI app under uvicorn in a daemon thread, on a free loopback port.

    ``with ThreadServer(app) as url`` starts it and gives ``http://127.0.0.1:PORT``; leaving the
    block stops it.
    """

    def __init__(self, app: Any, start_timeout: float = 60.0) -> None:
        import threading

        import uvicorn

        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.start_timeout = start_timeout

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the in-process server did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
