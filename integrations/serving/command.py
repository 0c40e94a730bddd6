"""``apex-reward serve``: load the model, warm it up, and serve it with uvicorn until interrupted.

The command's flags come from :class:`~apex_reward.integrations.serving.config.ServeConfig`; the
model is loaded by :func:`apex_reward.loading.load_model` like every other command's. uvicorn
comes with ``pip install 'apex-reward[serve]'`` and is imported only when serving.
"""

from __future__ import annotations

import argparse
import logging
import time

from apex_reward.cli import Command
from apex_reward.dataclass_io import add_dataclass_arguments, dataclass_from_args
from apex_reward.errors import require

from .config import ServeConfig
from .process import tune_process
from .transport import RedactApiKey, configure, uvicorn_options

logger = logging.getLogger(__name__)

__all__ = ["serve", "add_serve_arguments", "run_serve", "COMMAND"]


def serve(config: ServeConfig) -> None:
    """Load the model, warm it up, and serve until interrupted (blocking).

    Raises:
        MissingDependencyError: the ``serve`` extra is not installed.
        ConfigError, CheckpointError: bad options or checkpoint.
    """
    from apex_reward.loading import load_model

    from .app import create_app

    if config.ray:
        from .ray_serve import serve_ray

        serve_ray(config)
        return
    uvicorn = require("uvicorn", "serve", "the reward server")
    tune_process(config)  # before the server starts its threads
    model = load_model(config.model)
    app = create_app(model, config)
    state = app.state.apex
    if config.host not in ("127.0.0.1", "localhost", "::1") and not config.api_key_env:
        logger.warning(
            "serving on %s without an API key: anyone who can reach this port can use the model "
            "(set --api-key-env)",
            config.host,
        )
    if config.host in ("0.0.0.0", "::") and "*" not in config.allowed_hosts:
        logger.warning(
            "listening on every interface, but only requests addressed to %s are answered "
            "(others get 400 HostNotAllowed); add the names clients use with --allowed-hosts",
            ", ".join(config.allowed_hosts),
        )
    if config.warmup:
        t0 = time.perf_counter()
        state.warmup()
        logger.info("warm-up forward pass took %.2f s", time.perf_counter() - t0)
    logging.getLogger("uvicorn.access").addFilter(RedactApiKey())
    server_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        access_log=config.access_log,
        timeout_graceful_shutdown=30,
        **uvicorn_options(config),
    )
    uvicorn.Server(configure(server_config, config)).run()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """``apex-reward serve`` flags, generated from :class:`ServeConfig`."""
    add_dataclass_arguments(parser, ServeConfig)


def run_serve(args: argparse.Namespace) -> int:
    """Entry point of ``apex-reward serve``."""
    serve(dataclass_from_args(ServeConfig, args))
    return 0


COMMAND = Command("serve", "HTTP reward server for RL workers", add_serve_arguments, run_serve)
