"""The Ray Serve application: a thin FastAPI ingress over one FlowPrefill engine.

Use it from a Serve config (``import_path: flowprefill_ray.serve.app:build_app`` with ``args``,
see ``deployments/``) or from Python (``serve.run(build_app({...}))``). ``build_app``
validates the args at deploy time; the ingress replica starts the engine once, in its
constructor, and translates HTTP to ``OpenAIFrontend`` calls.

One ingress replica per application: the engine (scheduler and worker actors) belongs to the
replica, and two replicas would start two engines competing for the same workers' resources.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class in
# the route signatures of the Serve ingress class, not strings.
import asyncio
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from .auth import APIKeyCheck
from .config import ServeAppArgs
from .errors import APIError, error_response
from .request_body import read_json_object

logger = logging.getLogger(__name__)

api = FastAPI(title="FlowPrefill OpenAI-compatible API", docs_url=None, redoc_url=None)


@api.exception_handler(APIError)
async def _api_error(_: Request, exc: APIError) -> JSONResponse:
    return error_response(exc)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in OpenAI's error format like everything else.
    if exc.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(APIError(exc.status_code, message, code="route_not_found"
                                   if exc.status_code == 404 else None))


# Defined before the ingress class: serve.ingress pickles the routes (and what they
# reference) when the class is decorated.
def _respond(result):
    """A body dict as JSON, an SSE line iterator as a stream."""
    if isinstance(result, dict):
        return JSONResponse(result)
    return StreamingResponse(
        result, media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# How long Serve's health check tolerates a scheduler that Ray is restarting (seconds): a
# restart takes a few seconds; one that takes longer than this is treated as a dead engine.
SCHEDULER_RESTART_GRACE_S = 60.0


@serve.deployment(
    name="OpenAIIngress",
    num_replicas=1,
    # Requests mostly wait on the engine; the replica must not cap concurrency below it.
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=10,
)
@serve.ingress(api)
class OpenAIIngress:
    """Starts the engine in its (async) constructor and serves the OpenAI routes."""

    async def __init__(self, args: dict[str, Any]) -> None:
        # Imported here: the driver that calls build_app needs neither torch nor the engine.
        from flowprefill_ray.runtime.engine import FlowPrefillEngine

        from .frontend import OpenAIFrontend

        parsed = ServeAppArgs.model_validate(args)
        self._auth = APIKeyCheck.from_env(parsed.api.api_key_env)
        self._max_body_bytes = parsed.api.max_body_bytes
        self._restarting_since: float | None = None  # when the scheduler was seen restarting
        self._engine = await FlowPrefillEngine.start(parsed.runtime)
        self._frontend = OpenAIFrontend(parsed, self._engine)
        logger.info("FlowPrefill ingress ready: model %s, context %d tokens, API key %s",
                    self._frontend.model_name, self._frontend.context_tokens,
                    "required" if self._auth.enabled else "not required")

    async def _json_body(self, request: Request) -> dict[str, Any]:
        self._auth.check(request.headers.get("authorization"))
        return await read_json_object(
            request.stream(), request.headers.get("content-length"), self._max_body_bytes
        )

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Open (no API key): for load balancers and readiness probes."""
        healthy = await self._engine_healthy()
        if not healthy:
            return error_response(APIError(503, "engine unavailable", code="engine_unavailable"))
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._auth.check(request.headers.get("authorization"))
        return JSONResponse(self._frontend.models())

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        body = await self._json_body(request)
        return _respond(await self._frontend.completion(body, request.headers))

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        body = await self._json_body(request)
        return _respond(await self._frontend.chat_completion(body, request.headers))

    async def check_health(self) -> None:
        """Serve's replica health check: an engine that lost its scheduler is unhealthy.

        A scheduler that Ray is restarting is not (for ``SCHEDULER_RESTART_GRACE_S``): failing
        the check would make Serve replace this replica, and with it the whole engine - the
        decode workers and every stream they are serving."""
        state = await self._engine_state()
        if state == "restarting":
            now = time.monotonic()
            self._restarting_since = self._restarting_since or now
            if now - self._restarting_since < SCHEDULER_RESTART_GRACE_S:
                return
        elif state == "ok":
            self._restarting_since = None
            return
        raise RuntimeError(f"FlowPrefill engine is unavailable ({state})")

    async def _engine_healthy(self) -> bool:
        return await self._engine_state() == "ok"

    async def _engine_state(self) -> str:
        """The engine's state: "ok" when the scheduler answers stats() within a few seconds,
        "restarting" while Ray restarts it, "down" otherwise."""
        from ray.exceptions import ActorUnavailableError

        from flowprefill_ray.runtime.errors import EngineUnavailableError

        try:
            await asyncio.wait_for(self._engine.stats(), timeout=5.0)
        except EngineUnavailableError as error:
            if isinstance(error.__cause__, ActorUnavailableError):
                logger.warning("engine scheduler is restarting: %s", error)
                return "restarting"
            logger.warning("engine health check failed", exc_info=True)
            return "down"
        except Exception:  # noqa: BLE001 - any other failure to answer means unhealthy
            logger.warning("engine health check failed", exc_info=True)
            return "down"
        return "ok"

    async def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.shutdown()


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``args`` (see ``ServeAppArgs``); invalid args raise a
    pydantic ``ValidationError`` naming each bad field, at deploy time."""
    parsed = ServeAppArgs.model_validate(args or {})
    return OpenAIIngress.bind(parsed.model_dump(mode="json"))
