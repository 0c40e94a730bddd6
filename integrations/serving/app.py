"""The reward server's routes: :func:`create_app` builds the FastAPI app.

Endpoints (JSON in, JSON out; errors are ``{"error": {"type": ..., "message": ...}}`` with the
status :mod:`~apex_reward.integrations.serving.errors` gives their type):

* ``POST /v1/score``: one clip, as a multipart upload (one file part), an ``audio/*`` file body,
  raw samples (``audio/pcm; rate=N[; channels=C][; format=f32le|s16le]``), or JSON
  ``{"base64": "...", "name": "x.wav"}`` / ``{"path": "rel/x.wav"}`` (server-side paths only
  under ``--allow-dir``) -> ``{"name", "scores", "reward", "duration_s"}``; a clip that cannot be
  scored -> 422 naming the problem.
* ``POST /v1/score/batch``: many clips (multipart with several file parts, or JSON
  ``{"clips": [clip, ...]}``) -> ``{"results": [...]}``, one per clip in order, each a score or an
  error; one bad clip never fails the others.
* ``POST /v1/compare``: clips ``a`` and ``b`` -> ``logit P(a > b)``, its probability, both rewards.
* ``/v1/score``, ``/v1/score/batch`` and ``/v1/compare`` take ``?condition=VALUE`` for a
  conditioned checkpoint: the audience of the request's clips (default: the server's
  ``--condition``, else the learned average); an unknown value is a 422
  ``UnknownConditionError`` naming the known ones, before the body is read.
* ``POST /get_reward``: OpenRLHF's remote reward protocol
  (:mod:`~apex_reward.integrations.serving.protocols.openrlhf`).
* ``POST /v1/verl/score``: verl-omni's HTTP audio scorer protocol v1
  (:mod:`~apex_reward.integrations.serving.protocols.verl_omni`).
* ``GET /health`` (liveness), ``GET /ready`` (model warmed up and batch worker running),
  ``GET /metrics`` (Prometheus text), ``GET /v1/info`` (model and limits).

Handlers stay thin: bodies are read and validated by :mod:`.bodies` (with :mod:`.schemas`), clips
are decoded and scored by :class:`~apex_reward.integrations.serving.state.ServerState`, and auth, the body limit
and request metrics live in the :class:`~apex_reward.integrations.serving.middleware.Guard`.
fastapi and python-multipart are imported only when an app is built.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from apex_reward._version import __version__
from apex_reward.conditioning import per_input_conditions
from apex_reward.errors import ApexError, require

from . import bodies
from .config import ServeConfig
from .errors import (
    ClipError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    NotReady,
    RequestError,
    error_payload,
    status_of,
    type_of,
)
from .hosts import HostPolicy
from .middleware import ApiKeyAuth, BodyTooLarge, Guard, drain, too_large
from .state import ServerState, preference_logit, sigmoid

if TYPE_CHECKING:
    from apex_reward.model import ApexRewardModel

logger = logging.getLogger(__name__)

__all__ = ["create_app"]


def create_app(model: ApexRewardModel, config: ServeConfig | None = None) -> Any:
    """Build the FastAPI app serving ``model`` (batch worker starts with the app's lifespan).

    Args:
        model: a loaded :class:`~apex_reward.ApexRewardModel` (eval mode, on its device), e.g.
            from :func:`apex_reward.loading.load_model`.
        config: server options (default :class:`ServeConfig`).

    Returns:
        A ``fastapi.FastAPI`` app; its :class:`ServerState` is ``app.state.apex``.

    Raises:
        MissingDependencyError: fastapi / python-multipart / prometheus-client are not installed.
        ConfigError: invalid options (unset API key variable, missing --allow-dir, ...).
    """
    fastapi = require("fastapi", "serve", "the reward server")
    if importlib.util.find_spec("python_multipart") is None:  # python-multipart < 0.0.13
        require("multipart", "serve", "the reward server's file uploads")
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response

    from .protocols import openrlhf, verl_omni

    config = config or ServeConfig()
    state = ServerState(model, config)
    auth = ApiKeyAuth(config.api_key_env, config.allow_query_api_key)

    def respond(error: BaseException) -> JSONResponse:
        """The JSON answer to ``error`` (counted in ``apex_errors_total``)."""
        if isinstance(error, ClipError):
            status, kind, message = error.status, error.type, error.message
        else:
            status, kind = status_of(error), type_of(error)
            message = str(error) if kind != "InternalError" else "internal server error"
        headers = getattr(error, "headers", None)
        if status == 503:
            headers = {**(headers or {}), "Retry-After": "1"}
        state.metrics.count_error(kind)
        return JSONResponse(error_payload(kind, message), status_code=status, headers=headers)

    @asynccontextmanager
    async def lifespan(app: Any):
        state.batcher.start()
        warmup = None
        if not state.warmed_up:  # serve() warms up before binding; an embedding app may not
            warmup = asyncio.get_running_loop().run_in_executor(state.pool, state.warmup)
        try:
            yield
        finally:
            if warmup is not None and warmup.done() and warmup.exception() is not None:
                logger.error("warm-up failed: %s", warmup.exception())
            state.batcher.stop()
            state.pool.shutdown(wait=False, cancel_futures=True)

    app = fastapi.FastAPI(
        title="apex-reward",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.apex = state

    async def on_error(request: Request, exc: Exception) -> Response:
        if status_of(exc) >= 500 and not isinstance(exc, ClipError):
            logger.error("error on %s", request.url.path, exc_info=exc)
        return respond(exc)

    async def on_starlette_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        if exc.status_code == 404:
            return respond(NotFound(f"no endpoint {request.url.path!r}"))
        if exc.status_code == 405:
            return respond(
                MethodNotAllowed(f"{request.method} is not allowed on {request.url.path}")
            )
        if exc.status_code == 400:
            return respond(InvalidRequest(detail))
        state.metrics.count_error("HTTPError")
        return JSONResponse(
            error_payload("HTTPError", detail),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    async def on_too_large(request: Request, exc: BodyTooLarge) -> Response:
        await drain(request.receive, config.max_body_bytes * 4)
        return respond(too_large(None, config.max_body_bytes, config.max_body_mb))

    app.add_exception_handler(RequestError, on_error)
    app.add_exception_handler(ClipError, on_error)
    app.add_exception_handler(ApexError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_starlette_error)
    app.add_exception_handler(BodyTooLarge, on_too_large)

    def with_untrained(payload: dict[str, Any]) -> dict[str, Any]:
        if model.untrained:
            payload["untrained"] = True
        return payload

    # -- endpoints ------------------------------------------------------------------------------

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> Response:
        if state.ready:
            return JSONResponse({"status": "ready"})
        why = "warming up" if not state.warmed_up else "the batch worker is not running"
        return respond(NotReady(why))

    async def metrics(request: Request) -> Response:
        from .metrics import CONTENT_TYPE

        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    async def info(request: Request) -> Response:
        return JSONResponse(state.info(auth_required=auth.required))

    def request_condition(request: Request) -> str | None:
        """The request's ``?condition=`` for a conditioned checkpoint, checked before the body is
        read (an unknown one is a 422 naming the known values)."""
        value = request.query_params.get("condition")
        if value is not None:
            per_input_conditions(model.config.head.condition, value, 1)
        return value

    async def score(request: Request) -> Response:
        condition = request_condition(request)
        clip = await bodies.one_clip(request, state)
        clip.condition = condition
        if clip.error is not None:
            raise clip.error
        res = await state.score_one(clip, request.receive)
        return JSONResponse(with_untrained(state.result_json(res, clip.name)))

    async def score_batch(request: Request) -> Response:
        condition = request_condition(request)
        clips = await bodies.batch_clips(request, state)
        for clip in clips:
            clip.condition = condition
        rows = []
        for clip, res in zip(clips, await state.score_clips(clips, receive=request.receive)):
            if isinstance(res, ClipError):
                rows.append({"name": clip.name, "error": res.to_json()})
            else:
                rows.append(state.result_json(res, clip.name))
        return JSONResponse(with_untrained({"results": rows}))

    async def compare(request: Request) -> Response:
        condition = request_condition(request)
        (a, b), instrumental = await bodies.compare_clips(request, state)
        a.condition = b.condition = condition
        results = await state.score_clips([a, b], count_errors=False, receive=request.receive)
        for res in results:
            if isinstance(res, ClipError):
                raise res
        ra, rb = results
        # off the event loop: with the head on a GPU this waits for the device
        logit = await state.run_blocking(
            preference_logit, model, ra, rb, 1.0 if instrumental else 0.0
        )
        payload = {
            "a": a.name,
            "b": b.name,
            "logit": logit,
            "probability": sigmoid(logit),
            "reward_a": ra.reward,
            "reward_b": rb.reward,
            "scores_a": ra.scores,
            "scores_b": rb.scores,
            "method": state.preference_method,
        }
        return JSONResponse(with_untrained(payload))

    async def get_reward(request: Request) -> Response:
        bodies.require_body(request)
        if bodies.media_type(request.headers) != "application/json":
            raise bodies.unsupported(request, "application/json")
        return JSONResponse(
            await openrlhf.get_reward(
                state, await bodies.read_json(request, state), request.receive
            )
        )

    async def verl_score(request: Request) -> Response:
        bodies.require_body(request)
        if bodies.media_type(request.headers) != "application/json":
            raise bodies.unsupported(request, "application/json")
        return JSONResponse(await verl_omni.score(state, await bodies.read_json(request, state)))

    app.add_route("/health", health, methods=["GET"])
    app.add_route("/ready", ready, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    app.add_route("/v1/info", info, methods=["GET"])
    app.add_route("/v1/score", score, methods=["POST"])
    app.add_route("/v1/score/batch", score_batch, methods=["POST"])
    app.add_route("/v1/compare", compare, methods=["POST"])
    app.add_route("/get_reward", get_reward, methods=["POST"])
    app.add_route("/v1/verl/score", verl_score, methods=["POST"])

    app.add_middleware(
        Guard,
        auth=auth,
        metrics=state.metrics,
        max_body_bytes=config.max_body_bytes,
        max_body_mb=config.max_body_mb,
        respond=respond,
        client_disconnect=ClientDisconnect,
        hosts=HostPolicy(config.allowed_hosts, config.allowed_origins, config.host),
        body_timeout_s=config.body_timeout_s,
        idle_timeout_s=config.idle_timeout_s,
    )
    return app
