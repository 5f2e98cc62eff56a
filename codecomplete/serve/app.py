"""The Ray Serve application: an HTTP ingress (FastAPI) in front of engine replicas.

    Ray Serve HTTP proxy -> Gateway (auth, limits, API shapes -> CompletionRequest)
      -> SessionAffinityRouter -> EngineReplica (one Engine: one request at a time, or with
         batching many at once, their decode steps run together by the engine's scheduler)

Every error answer, on every route, is `{"error": {"message", "type", "code"}}` (OpenAI's
shape). A client that disconnects cancels its request: Ray Serve cancels the replica call,
and the replica sets the request's CancelToken, so decoding stops at the next step.
"""

import asyncio
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig

from codecomplete.request import CancelToken, Completion, CompletionRequest
from codecomplete.serve import infill, native, openai
from codecomplete.serve.auth import ApiKey, ConcurrencyLimit, KeyRing
from codecomplete.serve.common import MAX_BODY_BYTES, ApiError, is_warm, parse_body

log = logging.getLogger("codecomplete.serve")

REPLICA_HEADER = "X-Codecomplete-Replica"
WARM_HEADER = "X-Codecomplete-Warm"
ANONYMOUS = "anonymous"  # the owner of requests when no keys are configured
# a replica call that fails because its process died is sent once more (a completion has no
# side effects), to a replica Ray Serve still has or the one it restarts
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
REPLICA_ONGOING_REQUESTS = 64  # with batching, a replica's requests all run at once (one thread each)


@dataclass
class ServeSettings:
    """What the ingress needs to know (the replicas' engine settings are bound separately)."""

    model_name: str = "codecomplete-default"
    keys: tuple[ApiKey, ...] = ()
    per_key_concurrency: int = 4
    request_timeout_s: float = 30.0


@serve.deployment(max_ongoing_requests=REPLICA_ONGOING_REQUESTS, health_check_period_s=2.0)
class EngineReplica:
    """One Engine, off the replica's event loop: without batching its requests run one at a
    time in one thread; with batching each in its own thread, all at once."""

    def __init__(self, model: str | None, runtime: str, device: str, precision: str, threads: int | None,
                 batching: str = "off"):
        from codecomplete.engine import Engine

        self.engine = Engine.load(model, runtime=runtime, device=device, precision=precision, threads=threads,
                                  batching=batching)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        workers = REPLICA_ONGOING_REQUESTS if batching == "on" else 1
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")
        self.cancelled_requests = 0  # calls whose client went away before the answer

    async def complete(self, request: CompletionRequest, session: str = "") -> tuple[Completion, str]:
        """The engine's answer and this replica's id. `session` is read by the router only."""
        request.cancel = token = CancelToken()
        running = asyncio.get_running_loop().run_in_executor(self._worker, self.engine.complete, request)
        try:
            return await running, self.replica_id
        except asyncio.CancelledError:
            token.cancel()  # the client went away: the decode loop stops at its next step
            self.cancelled_requests += 1
            raise

    def describe(self) -> dict[str, Any]:
        return {"replica": self.replica_id, "pid": os.getpid(), "model": self.engine.describe(),
                "cancelled_requests": self.cancelled_requests}


fastapi_app = FastAPI(title="codecomplete team server", docs_url=None, redoc_url=None, openapi_url=None)


def _completion_headers(completion: Completion, replica: str) -> dict[str, str]:
    return {REPLICA_HEADER: replica, WARM_HEADER: "1" if is_warm(completion) else "0"}


def _sse(payloads: list[Any], headers: dict[str, str]) -> StreamingResponse:
    async def events():
        for p in payloads:
            yield f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def read_json(request: Request) -> Any:
    """The body as JSON: 413 past MAX_BODY_BYTES (declared or sent), 400 when malformed."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}", "invalid_request_error") from None


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(fastapi_app)
class Gateway:
    """Checks and translates requests; the engine work happens in EngineReplica."""

    def __init__(self, engine, settings: ServeSettings):
        self.engine = engine
        self.settings = settings
        self.keyring = KeyRing(list(settings.keys))
        self.limit = ConcurrencyLimit(settings.per_key_concurrency)
        self.started = int(time.time())
        self.ready = False

    # -- the shared steps -----------------------------------------------------------------
    def _owner(self, request: Request) -> str:
        """The key's name (401 without a valid one when keys are configured)."""
        if not self.keyring.enabled:
            return ANONYMOUS
        name = self.keyring.identify(request.headers.get("authorization"))
        if name is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error")
        return name

    async def _health(self) -> dict[str, Any]:
        try:
            info = await asyncio.wait_for(self.engine.describe.remote(), timeout=2.0)
        except (asyncio.TimeoutError, *REPLICA_LOST):
            raise ApiError(503, "the model is loading (no engine replica answers yet)", "service_unavailable") from None
        self.ready = True
        return info

    async def _complete(self, request: CompletionRequest, session: str) -> tuple[Completion, str]:
        if not self.ready:
            await self._health()
        for attempt in range(2):
            try:
                return await asyncio.wait_for(self.engine.complete.remote(request, session=session),
                                              timeout=self.settings.request_timeout_s)
            except REPLICA_LOST:
                if attempt:
                    raise ApiError(503, "the engine replica was lost; retry", "service_unavailable") from None
            except asyncio.TimeoutError:
                raise ApiError(503, f"no engine replica answered within {self.settings.request_timeout_s:g} s",
                               "service_unavailable") from None
            except ValueError as e:  # the engine refused the request (e.g. an offset past the text)
                raise ApiError(422, str(e).splitlines()[-1], "invalid_request_error") from None
        raise AssertionError("unreachable")

    async def _shaped(self, request: Request, owner: str, model, api) -> tuple[Any, dict[str, Any], dict[str, str]]:
        """One request of an API shape module (infill, openai): its body, answer and headers.
        The X-Codecomplete-Session header overrides the session the shape derives."""
        body = parse_body(model, await read_json(request))
        completion_request = api.to_completion_request(body)
        header = request.headers.get(native.SESSION_HEADER)
        session = f"{owner}/{header}" if header else api.session_key(body, owner)
        completion, replica = await self._complete(completion_request, session)
        return body, api.to_response(completion, body, self.settings.model_name), _completion_headers(completion, replica)

    async def _guarded(self, request: Request, route: str, handle) -> Response:
        """Auth, the per-key limit, errors as JSON, one log line without document text."""
        t0 = time.perf_counter()
        owner = ANONYMOUS
        acquired = False
        try:
            owner = self._owner(request)
            if self.keyring.enabled:
                acquired = self.limit.acquire(owner)
                if not acquired:
                    raise ApiError(429, f"more than {self.limit.limit} requests in flight for this key",
                                   "rate_limit_exceeded")
            response = await handle(owner)
            log.info("%s key=%s status=%d replica=%s warm=%s ms=%.1f", route, owner, response.status_code,
                     response.headers.get(REPLICA_HEADER, "-"), response.headers.get(WARM_HEADER, "-"),
                     (time.perf_counter() - t0) * 1000)
            return response
        except ApiError as e:
            log.info("%s key=%s status=%d %s", route, owner, e.status, e.kind)
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # the message and traceback may quote a request: log the type only
            log.error("%s key=%s failed: %s", route, owner, type(e).__name__)
            return JSONResponse(ApiError(500, f"internal error: {type(e).__name__}", "server_error").body(),
                                status_code=500)
        finally:
            if acquired:
                self.limit.release(owner)

    # -- routes ---------------------------------------------------------------------------
    @fastapi_app.get("/health")
    async def health(self) -> Response:
        try:
            info = await self._health()
        except ApiError as e:
            return JSONResponse({"status": "loading", **e.body()}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.settings.model_name, "replica": info["replica"]})

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def answer(owner: str) -> Response:
            return JSONResponse(openai.models_response(self.settings.model_name, self.started))
        return await self._guarded(request, "models", answer)

    @fastapi_app.post("/v1/engine/complete")
    async def engine_complete(self, request: Request) -> Response:
        async def answer(owner: str) -> Response:
            raw = await read_json(request)
            completion_request = native.to_completion_request(raw)
            session = native.session_key(raw, request.headers.get(native.SESSION_HEADER), owner)
            completion, replica = await self._complete(completion_request, session)
            return JSONResponse(native.to_response(completion, replica),
                                headers=_completion_headers(completion, replica))
        return await self._guarded(request, "engine", answer)

    @fastapi_app.post("/infill")
    async def infill(self, request: Request) -> Response:
        async def answer(owner: str) -> Response:
            body, response, headers = await self._shaped(request, owner, infill.InfillRequest, infill)
            if body.stream:
                return _sse(infill.stream_events(response, body.response_fields), headers)
            return JSONResponse(infill.select_fields(response, body.response_fields), headers=headers)
        return await self._guarded(request, "infill", answer)

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        async def answer(owner: str) -> Response:
            body, response, headers = await self._shaped(request, owner, openai.CompletionsRequest, openai)
            if body.stream:
                return _sse([*openai.stream_chunks(response), "[DONE]"], headers)
            return JSONResponse(response, headers=headers)
        return await self._guarded(request, "completions", answer)


def build_app(model: str | None = None, runtime: str = "onnx", device: str = "cpu", precision: str = "auto",
              replicas: int = 1, autoscale: tuple[int, int] | None = None, threads: int | None = None,
              replica_cpus: float = 1.0, affinity: bool = True, settings: ServeSettings | None = None,
              imbalance_requests: int | None = None, batching: str = "off"):
    """The application: `serve.run(build_app(...), route_prefix=...)` starts it.
    autoscale (min, max) replaces a fixed replica count; on CUDA each replica takes a GPU.
    batching "on": each replica runs its requests together (Engine's batch scheduler)."""
    resources = {"num_cpus": 1, "num_gpus": 1} if device == "cuda" else {"num_cpus": replica_cpus}
    options: dict[str, Any] = {"ray_actor_options": resources}
    if autoscale:
        low, high = autoscale
        options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": low,
                                         "target_ongoing_requests": 2}
    else:
        options["num_replicas"] = replicas
    if affinity:
        kwargs = {} if imbalance_requests is None else {"imbalance_requests": imbalance_requests}
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="codecomplete.serve.router:SessionAffinityRouter", request_router_kwargs=kwargs)
    engine = EngineReplica.options(**options).bind(model, runtime, device, precision, threads, batching)
    return Gateway.bind(engine, settings or ServeSettings())
