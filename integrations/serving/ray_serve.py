"""``apex-reward serve --ray``: the reward server's HTTP API on Ray Serve, one replica per GPU or N
CPU replicas.

Each replica is the same FastAPI app :func:`~apex_reward.integrations.serving.create_app` builds
(loaded model, :class:`~apex_reward.integrations.serving.batcher.DynamicBatcher`, decode pool,
limits, auth, metrics), mounted through Ray Serve's ASGI ingress; Ray's HTTP proxy spreads the
requests over the replicas, and each replica batches the clips that reach it exactly as a single
server does. Answers carry an ``X-Apex-Replica`` header naming the replica that scored them.

``ray[serve]`` comes with ``pip install 'apex-reward[ray]'`` and is imported only here.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from typing import Any

from apex_reward.errors import require

from .config import ServeConfig

logger = logging.getLogger(__name__)

__all__ = ["REPLICA_HEADER", "build_ray_app", "replica_resources", "start_ray_serve", "serve_ray"]

#: Response header naming the Ray Serve replica that answered.
REPLICA_HEADER = "x-apex-replica"


def _is_cuda(config: ServeConfig) -> bool:
    import torch

    device = config.model.device
    if device is None:
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def replica_resources(config: ServeConfig) -> tuple[int, dict[str, float]]:
    """``(replicas, ray_actor_options)`` for ``config``: one GPU per CUDA replica (default: one
    replica per visible GPU), ``--threads`` CPUs (default 1) per CPU replica (default 1 replica)."""
    import torch

    if _is_cuda(config):
        replicas = config.replicas or max(1, torch.cuda.device_count())
        return replicas, {"num_gpus": 1.0, "num_cpus": float(config.threads or 1)}
    return config.replicas or 1, {"num_cpus": float(config.threads or 1)}


def _replica_config(config: ServeConfig) -> ServeConfig:
    """The options one replica runs with: its own GPU is ``cuda`` (Ray sets
    ``CUDA_VISIBLE_DEVICES`` per replica), and the replica does not start Ray again."""
    model = config.model
    if _is_cuda(config):
        model = dataclasses.replace(model, device="cuda")
    return dataclasses.replace(config, model=model, ray=False)


def _with_replica_header(app: Any, replica: str) -> Any:
    """``app`` (ASGI) with the :data:`REPLICA_HEADER` added to every HTTP answer."""
    value = replica.encode()

    async def wrapped(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return

        async def send_with_header(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-apex-replica", value)],
                }
            await send(message)

        await app(scope, receive, send_with_header)

    return wrapped


def build_ray_app(config: ServeConfig) -> Any:
    """The Ray Serve application (``Deployment.bind()``) serving ``config``'s model.

    Each replica loads the model with :func:`apex_reward.loading.load_model`, builds the app with
    :func:`~apex_reward.integrations.serving.create_app`, and warms it up before Ray routes
    requests to it.

    Raises:
        MissingDependencyError: ``ray[serve]`` is not installed.
    """
    require("ray", "ray", "serving on Ray Serve")
    from ray import serve

    replicas, actor_options = replica_resources(config)
    replica_config = _replica_config(config)

    def build_replica_app() -> Any:
        # runs in each replica process
        from apex_reward.loading import load_model

        from .app import create_app
        from .process import tune_process

        tune_process(replica_config, default_threads=1)
        model = load_model(replica_config.model)
        app = create_app(model, replica_config)
        if replica_config.warmup:
            app.state.apex.warmup()
        try:
            replica = serve.get_replica_context().replica_tag
        except Exception:  # outside a replica (not expected) or a Ray without replica tags
            replica = "replica"
        return _with_replica_header(app, str(replica))

    deployment = serve.deployment(
        serve.ingress(build_replica_app)(),
        name="apex_reward",
        num_replicas=replicas,
        ray_actor_options=actor_options,
        # the app queues and batches on its own; let Ray hand each replica enough requests to
        # fill a batch
        max_ongoing_requests=max(2 * replica_config.max_batch, 16),
    )
    return deployment.bind()


def _init_ray(ray: Any) -> None:
    if not ray.is_initialized():
        # $RAY_ADDRESS names an existing cluster; without it a local one is started
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=True)


def start_ray_serve(
    config: ServeConfig, *, timeout_s: float = 600.0, cancel: threading.Event | None = None
) -> str:
    """Start (or join) Ray, run the deployment and wait until every replica is up (or until
    ``cancel`` is set).

    Returns:
        The base URL of Ray's HTTP proxy, ``http://HOST:PORT``.
    """
    ray = require("ray", "ray", "serving on Ray Serve")
    from ray import serve

    replicas, options = replica_resources(config)
    _init_ray(ray)
    serve.start(http_options={"host": config.host, "port": config.port})
    logger.info(
        "starting %d Ray Serve replica(s) of the reward server (%s each)", replicas, options
    )
    t0 = time.perf_counter()
    serve.run(build_ray_app(config), name="apex_reward", route_prefix="/", blocking=False)
    while time.perf_counter() - t0 < timeout_s:
        if cancel is not None and cancel.is_set():
            break
        status = serve.status().applications.get("apex_reward")
        if status is not None and str(status.status).endswith("RUNNING"):
            break
        if status is not None and "FAIL" in str(status.status):
            raise RuntimeError(f"Ray Serve could not start the reward server: {status.message}")
        time.sleep(0.5)
    else:
        raise RuntimeError(f"Ray Serve replicas not running after {timeout_s:g} s")
    logger.info("replicas running after %.1f s", time.perf_counter() - t0)
    return f"http://{config.host}:{config.port}"


def serve_ray(config: ServeConfig) -> None:
    """``apex-reward serve --ray``: serve until interrupted (SIGINT or SIGTERM), then shut the
    deployment (and a Ray instance this call started) down."""
    ray = require("ray", "ray", "serving on Ray Serve")
    from ray import serve

    started_ray = not ray.is_initialized()
    stop = threading.Event()
    children: list[Any] = []
    try:
        _init_ray(ray)
        # after ray.init, which installs a SIGTERM handler of its own that aborts the process
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        url = start_ray_serve(config, cancel=stop)
        if started_ray:
            children = _child_processes()
        logger.info("serving on %s (Ray Serve)", url)
        while not stop.wait(1.0):
            pass
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
                _end_processes(children)


def _child_processes() -> list[Any]:
    """The processes this one started (the local Ray instance: GCS, raylet and its agents)."""
    import psutil  # a dependency of ray

    return psutil.Process().children(recursive=True)


def _end_processes(processes: list[Any], timeout_s: float = 10.0) -> None:
    """Terminate those of ``processes`` that outlived ``ray.shutdown()`` (its node agents can be
    left behind when the raylet goes first), then kill what is still there."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for p in alive:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=timeout_s)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
