"""The Ray Serve application: FastAPI ingress replicas over one shared engine service.

Use it from a Serve config (``import_path: flowprefill_ray.serve.app:build_app`` with ``args``,
see ``deployments/``) or from Python (``serve.run(build_app({...}))``). ``build_app``
validates the args at deploy time and binds two deployments:

- ``EngineService`` (engine_service.py), one replica: starts and owns the scheduler and the
  workers, and is what Serve health-checks and restarts for them;
- ``OpenAIIngress`` (here), any number of replicas (the shipped configs autoscale it): each
  attaches a thin engine client to the service, submits to the one scheduler, streams tokens
  straight from the decode workers, and translates HTTP to ``OpenAIFrontend`` calls.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` class in
# the route signatures of the Serve ingress class, not strings.
import asyncio
import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowprefill_ray.request_clock import RequestClock

from .auth import APIKeyCheck
from .config import ServeAppArgs
from .engine_probe import RestartGrace, scheduler_state
from .engine_service import EngineService
from .errors import APIError, error_response, server_error
from .request_body import read_json_object

logger = logging.getLogger(__name__)

# No schema or docs routes: they would answer without the API key and describe the server.
api = FastAPI(
    title="FlowPrefill OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None
)


def _request_id(request: Request) -> str:
    """This HTTP request's id, as in every error body and the log. It is Serve's own request
    id, which Serve's proxy returns as the ``X-Request-Id`` header (taken from the client's
    header when it sends one) and writes in Serve's access log."""
    rid = getattr(request.state, "request_id", None)
    if rid is None:
        from ray.serve.context import _get_serve_request_context

        rid = _get_serve_request_context().request_id or uuid.uuid4().hex
        request.state.request_id = rid
    return rid


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return error_response(exc, _request_id(request))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # Last resort: whatever escaped a route is logged with its traceback and answered with a
    # generic 500 in the usual JSON shape, never Starlette's plain-text page.
    rid = _request_id(request)
    logger.error("request %s failed", rid, exc_info=exc)
    return error_response(server_error(), rid)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown routes and wrong methods, in OpenAI's error format like everything else.
    if exc.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path}"
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
    else:
        message = str(exc.detail)
    return error_response(
        APIError(
            exc.status_code, message, code="route_not_found" if exc.status_code == 404 else None
        ),
        _request_id(request),
    )


# Which ingress replica answered: Serve's id of the replica, unique within the deployment
# (its actor is named ``SERVE_REPLICA::<app>#OpenAIIngress#<id>`` in the "serve" namespace).
REPLICA_HEADER = "X-FlowPrefill-Replica"


# Defined before the ingress class: serve.ingress pickles the routes (and what they
# reference) when the class is decorated.
def _respond(result, replica: str):
    """A body dict as JSON, an SSE line iterator as a stream."""
    if isinstance(result, dict):
        return JSONResponse(result, headers={REPLICA_HEADER: replica})
    return StreamingResponse(
        result,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", REPLICA_HEADER: replica},
    )


def _last_param(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 100_000:
        raise APIError(
            400,
            f"last must be a whole number from 1 to 100000, got {raw[:20]!r}",
            param="last",
            code="invalid_parameter",
        )
    return int(raw)


def timeline_report(export: dict) -> dict:
    """A timeline export plus the why-late verdicts of its missed requests and their summary."""
    from flowprefill_ray.scheduling.why_late import summarize, why_late

    verdicts = why_late(export)
    return {**export, "why_late": verdicts, "why_late_summary": summarize(export, verdicts)}


@serve.deployment(
    name="OpenAIIngress",
    # No num_replicas here: one replica by default, and a Serve config may then give either a
    # count or an autoscaling_config (the shipped configs autoscale it; Serve refuses both).
    # Requests mostly wait on the engine; the replica must not cap concurrency below it.
    max_ongoing_requests=1024,
    ray_actor_options={"num_cpus": 0.1},
    health_check_period_s=10,
)
@serve.ingress(api)
class OpenAIIngress:
    """Attaches an engine client to the engine service in its (async) constructor and serves
    the OpenAI routes."""

    async def __init__(self, args: dict[str, Any], engine_service) -> None:
        # Imported here: the driver that calls build_app needs neither torch nor the engine.
        from flowprefill_ray.runtime.engine import FlowPrefillEngine

        from .client_leases import LeaseKeeper
        from .frontend import OpenAIFrontend

        parsed = ServeAppArgs.model_validate(args)
        self._auth = APIKeyCheck.from_env(parsed.api.api_key_env)
        self._max_body_bytes = parsed.api.max_body_bytes
        self._body_timeout_s = parsed.api.body_read_timeout_s
        self._grace = RestartGrace()
        self._replica = serve.get_replica_context().replica_id.unique_id
        # Waits until the service's constructor has started the engine.
        self._engine = await FlowPrefillEngine.attach(await engine_service.attachment.remote())
        self._lease = LeaseKeeper(
            engine_service, self._engine, self._replica, parsed.ingress.renew_interval_s
        )
        await self._lease.start()
        self._frontend = OpenAIFrontend(parsed, self._engine)
        logger.info(
            "FlowPrefill ingress replica %s ready: model %s, context %d tokens, API key %s",
            self._replica,
            self._frontend.model_name,
            self._frontend.context_tokens,
            "required" if self._auth.enabled else "not required",
        )
        cache = parsed.runtime.prefill.prefix_cache
        if self._auth.enabled and cache.enabled and cache.share_unsalted:
            # An API key usually means several clients: whether a prefix was cached shows in
            # TTFT, so one client can learn what another recently sent (docs/RUNTIME.md).
            logger.warning(
                "prefix cache shared by unsalted requests of every API client: cache timing "
                "is observable across them; give tenants a cache_salt, or set "
                "runtime.prefill.prefix_cache.share_unsalted: false"
            )

    async def _json_body(self, request: Request) -> dict[str, Any]:
        self._auth.check(request.headers.get("authorization"))
        reading = read_json_object(
            request.stream(), request.headers.get("content-length"), self._max_body_bytes
        )
        try:
            # A client that never finishes its body must not hold a request slot forever.
            return await asyncio.wait_for(reading, self._body_timeout_s)
        except asyncio.TimeoutError:
            raise APIError(
                408,
                f"The request body did not arrive within {self._body_timeout_s:g} s",
                code="body_read_timeout",
            ) from None

    @api.get("/health")
    async def health(self) -> JSONResponse:
        """Open (no API key): for load balancers and readiness probes."""
        healthy = await self._engine_healthy()
        if not healthy:
            return error_response(APIError(503, "engine unavailable", code="engine_unavailable"))
        return JSONResponse({"status": "ok"})

    # Errors raised here are answered by the app's exception handlers above, with the request
    # id: APIError as itself, anything else as a generic 500 with its cause in the log.
    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._auth.check(request.headers.get("authorization"))
        return JSONResponse(self._frontend.models())

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        clock = RequestClock("http_received")  # the request's TTFT starts here
        body = await self._json_body(request)
        return _respond(
            await self._frontend.completion(body, request.headers, _request_id(request), clock),
            self._replica,
        )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        clock = RequestClock("http_received")  # the request's TTFT starts here
        body = await self._json_body(request)
        return _respond(
            await self._frontend.chat_completion(
                body, request.headers, _request_id(request), clock
            ),
            self._replica,
        )

    @api.get("/v1/flowprefill/timeline")
    async def timeline(self, request: Request) -> JSONResponse:
        """The scheduler timeline of the ``last`` most recent requests (default 200), with the
        why-late verdict of every miss and their sum per class. Behind the API key like the
        API; token counts only, never prompt text (docs/SCHEDULING.md)."""
        self._auth.check(request.headers.get("authorization"))
        last = _last_param(request.query_params.get("last", "200"))
        return JSONResponse(timeline_report(await self._engine.timeline(last)))

    async def check_health(self) -> None:
        """Serve's replica health check: a replica whose scheduler is gone is unhealthy (Serve
        replaces it, and the new one attaches to the engine service as it is then). A
        scheduler that Ray is restarting is not, for ``SCHEDULER_RESTART_GRACE_S``."""
        self._grace.check(await scheduler_state(self._engine))

    async def _engine_healthy(self) -> bool:
        return await scheduler_state(self._engine) == "ok"

    async def __del__(self) -> None:
        lease = getattr(self, "_lease", None)
        if lease is not None:
            await lease.stop()
        engine = getattr(self, "_engine", None)
        if engine is not None:
            await engine.shutdown()  # an attached client: the actors stay with the service


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for ``args`` (see ``ServeAppArgs``); invalid args raise a
    pydantic ``ValidationError`` naming each bad field, at deploy time. (Serve calls an app
    builder with the args alone.)"""
    return compose_app(args)


def compose_app(
    args: dict[str, Any], ingress_options: dict[str, Any] | None = None
) -> serve.Application:
    """``build_app`` from Python with Serve options of the ingress deployment, e.g.
    ``{"num_replicas": 2}`` (a Serve config has its ``deployments`` section for that)."""
    parsed = ServeAppArgs.model_validate(args or {}).model_dump(mode="json")
    ingress = OpenAIIngress.options(**ingress_options) if ingress_options else OpenAIIngress
    return ingress.bind(parsed, EngineService.bind(parsed))
