"""The Ray Serve application: replicas that each answer HTTP (FastAPI) and hold one engine.

    Ray Serve HTTP proxy -> SessionAffinityRouter -> Gateway replica
        (auth, limits, API shapes -> CompletionRequest -> its own EngineReplica: one Engine,
         one request at a time, or with batching many at once, their decode steps run together)

A request that carries Ray Serve's session header (`X-Session-Id`: the language server's
remote mode sends it) is routed by the proxy to the replica holding that session's KV and
answered there: one hop. A request without it (llama.vim, OpenAI clients: their session key
is in the body) goes to one entry replica, which reads the body's session key and hands the
request on through the same router to the session's replica: two hops, as every request
took when the ingress and the engines were separate deployments. Every hop through Ray
Serve costs ~10 ms on a 2-core machine, which is why the engine lives in the ingress.

Every error answer, on every route, is `{"error": {"message", "type", "code"}}` (OpenAI's
shape). A client that disconnects cancels its request: Ray Serve cancels the handler (and
a handed-on call), and the replica sets the request's CancelToken, so decoding stops at the
next step.
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.schema import LoggingConfig

from codecomplete.request import CancelToken, Completion, CompletionRequest
from codecomplete.serve import infill, native, openai
from codecomplete.serve.auth import ApiKey, ConcurrencyLimit, KeyRing
from codecomplete.serve.common import MAX_BODY_BYTES, ApiError, is_warm, parse_body
from codecomplete.serve.replica_engine import build_replica_engine

log = logging.getLogger("codecomplete.serve")

REPLICA_HEADER = "X-Codecomplete-Replica"
WARM_HEADER = "X-Codecomplete-Warm"
ANONYMOUS = "anonymous"  # the owner of requests when no keys are configured
# a replica call that fails because its process died is sent once more (a completion has no
# side effects), to a replica Ray Serve still has or the one it restarts
REPLICA_LOST = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
REPLICA_ONGOING_REQUESTS = 64  # with batching, a replica's requests all run at once (one thread each)
GRACEFUL_SHUTDOWN_MARGIN_S = 5.0  # past the request timeout: the answers' way back


@dataclass
class ServeSettings:
    """What the HTTP side needs to know (the engine's settings are bound separately)."""

    model_name: str = "codecomplete-default"
    keys: tuple[ApiKey, ...] = ()
    per_key_concurrency: int = 4  # per replica: each replica counts the requests it received
    request_timeout_s: float = 30.0
    # more than one replica: requests without a session header are handed on by session
    hand_on: bool = True


@dataclass(frozen=True)
class Autoscaling:
    """Ray Serve's autoscaling on ongoing requests (queued and running, per replica),
    between min_replicas and max_replicas. The defaults are for typists: grow within
    seconds of a sustained rise (a new replica takes seconds to load its engine), shrink
    only after minutes of less load (a replica going away sends its sessions elsewhere,
    cold once, and typists pause)."""

    min_replicas: int
    max_replicas: int
    # without batching a replica runs one request at a time: two ongoing means one waits;
    # with batching its requests' decode steps run together, many at once
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 15.0
    downscale_delay_s: float = 300.0
    look_back_period_s: float = 15.0  # the window the ongoing requests are averaged over
    # how often replicas and proxies report their ongoing requests; None: Ray Serve's own
    # (10 s; Ray marks the field deprecated in favour of environment variables, but reads it)
    metrics_interval_s: float | None = None

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"autoscaling: need 1 <= min_replicas ({self.min_replicas}) <= max_replicas "
                             f"({self.max_replicas})")
        if self.target_ongoing_requests <= 0:
            raise ValueError("autoscaling: target_ongoing_requests must be positive")

    def ray_config(self) -> dict[str, Any]:
        """The deployment's autoscaling_config."""
        config = {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                  "initial_replicas": self.min_replicas, "target_ongoing_requests": self.target_ongoing_requests,
                  "upscale_delay_s": self.upscale_delay_s, "downscale_delay_s": self.downscale_delay_s,
                  "look_back_period_s": self.look_back_period_s}
        if self.metrics_interval_s is not None:
            config["metrics_interval_s"] = self.metrics_interval_s
        return config


def default_target_ongoing_requests(batching: str) -> float:
    """Requests a replica is meant to hold at once: 2 without batching (one running, one
    waiting); 16 with batching (a GPU replica decodes them together: a quarter of the
    threads it can run at once, so that a burst still finds room while a new one loads)."""
    return REPLICA_ONGOING_REQUESTS / 4 if batching == "on" else 2.0


class EngineReplica:
    """One Engine, off the replica's event loop: without batching its requests run one at a
    time in one thread; with batching each in its own thread, all at once, and by default
    the Engine in a child process (engine_process "on"): there its batch scheduler thread
    has a GIL of its own, not shared with this process's HTTP handling, asyncio loop and
    Ray's threads (on one H200 that sharing made the engine 1.37x slower than in a plain
    process). Without batching the engine stays here: one request at a time gains nothing
    from the process hop."""

    def __init__(self, model: str | None, runtime: str, device: str, precision: str, threads: int | None,
                 batching: str = "off", exact_new_tokens: int | None = None, rerank_workers: int | None = None,
                 engine_process: str | None = None):
        engine_args = (model, runtime, device, precision, threads, batching, exact_new_tokens, rerank_workers)
        workers = REPLICA_ONGOING_REQUESTS if batching == "on" else 1
        if (engine_process or ("on" if batching == "on" else "off")) == "on":
            from codecomplete.isolation import ProcessEngine

            # the child loads the model and is the only process of the replica that touches
            # CUDA; it inherits the CUDA_VISIBLE_DEVICES Ray set for this replica: its GPU.
            # It runs as many requests at once as this replica's threads hand it.
            self.engine = ProcessEngine(build_replica_engine, engine_args, label=model or "the default model",
                                        concurrency=workers)
        else:
            self.engine = build_replica_engine(*engine_args)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._worker = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="engine")
        self.cancelled_requests = 0  # calls whose client went away before the answer

    async def complete(self, request: CompletionRequest) -> tuple[Completion, str]:
        """The engine's answer and this replica's id; 503 when the engine's process gave none
        (it crashed and restarts, or failed on this request)."""
        request.cancel = token = CancelToken()
        running = asyncio.get_running_loop().run_in_executor(self._worker, self.engine.complete, request)
        try:
            completion = await running
        except asyncio.CancelledError:
            token.cancel()  # the client went away: the decode loop stops at its next step
            self.cancelled_requests += 1
            raise
        if completion is None:
            raise ApiError(503, f"the engine did not answer ({getattr(self.engine, 'state', 'failed')}); retry",
                           "service_unavailable")
        return completion, self.replica_id

    @property
    def failed(self) -> str:
        """Why the engine is down for good ("" while it answers): its process kept crashing."""
        return self.engine.message if getattr(self.engine, "state", "ready") == "error" else ""

    def describe(self) -> dict[str, Any]:
        # outside Ray (a test's own replica) asking for the node would start a Ray instance
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        described = {"replica": self.replica_id, "pid": os.getpid(), "node": node,
                     "model": self.engine.describe(), "cancelled_requests": self.cancelled_requests}
        if hasattr(self.engine, "pid"):
            described["engine_pid"] = self.engine.pid  # the engine's own process
        return described

    def close(self) -> None:
        """Stop the engine (its process, its scheduler and rerank workers)."""
        self._worker.shutdown(wait=False, cancel_futures=True)
        close = getattr(self.engine, "close", None)
        if callable(close):
            close()


fastapi_app = FastAPI(title="codecomplete team server", docs_url=None, redoc_url=None, openapi_url=None)


def _completion_headers(completion: Completion, replica: str, hand_on_ms: float | None) -> dict[str, str]:
    """Which replica answered, whether warm, and Server-Timing: the engine's own time and,
    for a request handed on, the call to the session's replica (the gateway's whole time
    is added by _guarded), so a client can count what each hop costs."""
    timing = f"engine;dur={completion.timings_ms.get('total', 0.0):.2f}"
    if hand_on_ms is not None:
        timing += f", hand-on;dur={hand_on_ms:.2f}"
    return {REPLICA_HEADER: replica, WARM_HEADER: "1" if is_warm(completion) else "0", "Server-Timing": timing}


def _sse(payloads: list[Any], headers: dict[str, str]) -> StreamingResponse:
    async def events():
        for p in payloads:
            yield f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n"
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


async def read_json(request: Request) -> Any:
    """The body as JSON: 413 past MAX_BODY_BYTES (declared or sent), 400 when malformed.
    The time it took to arrive goes to Server-Timing (`body`): through Ray Serve's proxy
    the replica fetches it from the proxy with a call of its own."""
    t0 = time.perf_counter()
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large")
    request.state.body_ms = (time.perf_counter() - t0) * 1000
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}", "invalid_request_error") from None


# Ray Serve's own access log writes a line per request in the proxy and the replica; ours
# (one line per request, the key's name, no document text) is enough
NO_ACCESS_LOG = LoggingConfig(enable_access_log=False)


def proxy_session() -> str:
    """The session Ray Serve's proxy routed this request by (its X-Session-Id header); ""
    when it routed without one, or for a call handed on by another replica."""
    context = getattr(serve.context, "_get_serve_request_context", lambda: None)()
    session = getattr(context, "session_id", "") if context is not None else ""
    return session if isinstance(session, str) else ""


def deployment_replicas() -> dict[str, Any]:
    """{"running": N, "states": {state: count}} of the deployment this replica belongs to.
    (Defined before the deployment: Ray Serve pickles the class as it is decorated, with the
    module-level names that exist by then.)"""
    context = serve.get_replica_context()
    app = serve.status().applications.get(context.app_name)
    deployment = app.deployments.get(context.deployment) if app is not None else None
    states = dict(deployment.replica_states) if deployment is not None else {}
    return {"running": states.get("RUNNING", 0), "states": states}


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=2.0, logging_config=NO_ACCESS_LOG)
@serve.ingress(fastapi_app)
class Gateway:
    """One replica: the HTTP routes (checks, API shapes) and its own EngineReplica, loaded in
    the background so that /health answers 503 meanwhile."""

    def __init__(self, engine_args: tuple, settings: ServeSettings, engine_options: dict | None = None):
        self.settings = settings
        self.keyring = KeyRing(list(settings.keys))
        self.limit = ConcurrencyLimit(settings.per_key_concurrency)
        self.started = int(time.time())
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._loaded: concurrent.futures.Future[EngineReplica] = concurrent.futures.Future()
        threading.Thread(target=self._load, args=engine_args, kwargs=engine_options or {}, name="engine-load",
                         daemon=True).start()
        self._peers = None  # a handle to this deployment, for requests handed on by session

    def _load(self, *engine_args, **engine_options) -> None:
        try:
            self._loaded.set_result(EngineReplica(*engine_args, **engine_options))
        except BaseException as e:  # the replica reports it unhealthy; Ray Serve starts another
            log.error("the engine failed to load: %s: %s", type(e).__name__, e)
            self._loaded.set_exception(e)

    def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine failed to load, or whose engine
        process kept crashing, is replaced."""
        error = self._loaded.exception() if self._loaded.done() else None
        if error is not None:
            raise RuntimeError(f"the engine failed to load: {type(error).__name__}: {error}")
        if self._loaded.done() and self._loaded.result().failed:
            raise RuntimeError(self._loaded.result().failed)

    def __del__(self) -> None:
        """Ray Serve calls this when the replica shuts down: the engine's process goes with it
        (were the replica killed instead, the child would still end, on its pipe's EOF)."""
        loaded = getattr(self, "_loaded", None)
        if loaded is not None and loaded.done() and loaded.exception() is None:
            loaded.result().close()

    async def _engine(self, wait_s: float) -> EngineReplica:
        """This replica's engine, waiting up to wait_s for it to load (503 after that)."""
        if not self._loaded.done():
            loading = ApiError(503, "the model is loading", "service_unavailable")
            if wait_s <= 0:
                raise loading
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(self._loaded)), timeout=wait_s)
            except asyncio.TimeoutError:
                raise loading from None
            except Exception:
                pass  # the failure is reported below
        error = self._loaded.exception()
        if error is not None:
            raise ApiError(503, f"the engine failed to load ({type(error).__name__})", "service_unavailable")
        return self._loaded.result()

    # -- what other replicas call --------------------------------------------------------
    async def complete(self, request: CompletionRequest, session: str = "") -> tuple[Completion, str]:
        """A request handed on by the entry replica. `session` is read by the router only."""
        engine = await self._engine(self.settings.request_timeout_s)
        return await engine.complete(request)

    async def describe(self) -> dict[str, Any]:
        engine = await self._engine(self.settings.request_timeout_s)
        return engine.describe()

    # -- the shared steps -----------------------------------------------------------------
    def _owner(self, request: Request) -> str:
        """The key's name (401 without a valid one when keys are configured)."""
        if not self.keyring.enabled:
            return ANONYMOUS
        name = self.keyring.identify(request.headers.get("authorization"))
        if name is None:
            raise ApiError(401, "missing or invalid API key (Authorization: Bearer KEY)", "authentication_error")
        return name

    async def _complete(self, request: CompletionRequest, session: str) -> tuple[Completion, str, float | None]:
        """(completion, replica, ms of the hand-on call or None): the answer of this replica's
        engine when the proxy routed the request here by its session (or there is no other
        replica); else of the session's replica, handed on."""
        timeout_s = self.settings.request_timeout_s
        try:
            if proxy_session() or not self.settings.hand_on:
                engine = await self._engine(timeout_s)
                return (*await asyncio.wait_for(engine.complete(request), timeout=timeout_s), None)
            t0 = time.perf_counter()
            completion, replica = await self._hand_on(request, session, timeout_s)
            return completion, replica, (time.perf_counter() - t0) * 1000.0
        except asyncio.TimeoutError:
            raise ApiError(503, f"no engine answered within {timeout_s:g} s", "service_unavailable") from None
        except ValueError as e:  # the engine refused the request (e.g. an offset past the text)
            raise ApiError(422, str(e).splitlines()[-1], "invalid_request_error") from None

    async def _hand_on(self, request: CompletionRequest, session: str, timeout_s: float) -> tuple[Completion, str]:
        if self._peers is None:
            context = serve.get_replica_context()
            # a Ray actor call: Ray Serve's gRPC channel (`_by_reference=False`) is 2.5 ms faster
            # per handed-on request here, but a cancelled call to the replica itself then runs on
            # to its deadline (and the proxy's gRPC mode loses a client's disconnect altogether)
            self._peers = serve.get_deployment_handle(context.deployment, context.app_name)
        for attempt in range(2):
            response = self._peers.complete.remote(request, session=session)
            try:
                return await asyncio.wait_for(response, timeout=timeout_s)
            except (asyncio.CancelledError, asyncio.TimeoutError):
                # Ray passes a cancelled request's cancellation on to the calls it made, but not
                # our timeout: without this the session's replica would decode on for nobody
                response.cancel()
                raise
            except REPLICA_LOST:
                if attempt:
                    raise ApiError(503, "the engine replica was lost; retry", "service_unavailable") from None
            except ray.exceptions.RayTaskError as e:  # that replica's answer was an error
                if isinstance(getattr(e, "cause", None), ApiError):
                    raise e.cause from None
                raise
        raise AssertionError("unreachable")

    async def _shaped(self, request: Request, owner: str, model, api) -> tuple[Any, dict[str, Any], dict[str, str]]:
        """One request of an API shape module (infill, openai): its body, answer and headers.
        The X-Session-Id header overrides the session the shape derives."""
        body = parse_body(model, await read_json(request))
        completion_request = api.to_completion_request(body)
        header = request.headers.get(native.SESSION_HEADER)
        session = f"{owner}/{header}" if header else api.session_key(body, owner)
        completion, replica, hand_on_ms = await self._complete(completion_request, session)
        return (body, api.to_response(completion, body, self.settings.model_name),
                _completion_headers(completion, replica, hand_on_ms))

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
            gateway_ms = (time.perf_counter() - t0) * 1000
            timing = f"gateway;dur={gateway_ms:.2f}"
            if hasattr(request.state, "body_ms"):
                timing += f", body;dur={request.state.body_ms:.2f}"
            earlier = response.headers.get("Server-Timing")  # the route's own entries: one header
            response.headers["Server-Timing"] = f"{earlier}, {timing}" if earlier else timing
            log.info("%s key=%s status=%d replica=%s warm=%s ms=%.1f", route, owner, response.status_code,
                     response.headers.get(REPLICA_HEADER, "-"), response.headers.get(WARM_HEADER, "-"), gateway_ms)
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
            await self._engine(0.0)
        except ApiError as e:
            return JSONResponse({"status": "loading", **e.body()}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.settings.model_name, "replica": self.replica_id})

    @fastapi_app.get("/v1/models")
    async def models(self, request: Request) -> Response:
        async def answer(owner: str) -> Response:
            return JSONResponse(openai.models_response(self.settings.model_name, self.started))
        return await self._guarded(request, "models", answer)

    @fastapi_app.get("/v1/replicas")
    async def replicas(self, request: Request) -> Response:
        """How many replicas this deployment has, by state (RUNNING, STARTING, STOPPING ...), as
        Ray Serve's controller reports them: what a client watching autoscaling reads."""
        async def answer(owner: str) -> Response:
            return JSONResponse(await asyncio.get_running_loop().run_in_executor(None, deployment_replicas))
        return await self._guarded(request, "replicas", answer)

    @fastapi_app.post("/v1/engine/complete")
    async def engine_complete(self, request: Request) -> Response:
        async def answer(owner: str) -> Response:
            raw = await read_json(request)
            completion_request = native.to_completion_request(raw)
            session = native.session_key(raw, request.headers.get(native.SESSION_HEADER), owner)
            completion, replica, hand_on_ms = await self._complete(completion_request, session)
            return JSONResponse(native.to_response(completion, replica),
                                headers=_completion_headers(completion, replica, hand_on_ms))
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


def wait_until_loaded(app_name: str, replicas: int, timeout_s: float = 600.0) -> list[dict[str, Any]]:
    """Each replica's describe() once `replicas` of them have loaded their engines (Ray Serve
    reports a replica running as soon as it answers HTTP, while its engine still loads). The
    handle picks replicas at random: ask until that many different ones answered.
    RuntimeError at once when a replica's engine failed to load."""
    handle = serve.get_deployment_handle("Gateway", app_name=app_name)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout_s
    while len(seen) < replicas:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise TimeoutError(f"{len(seen)} of {replicas} replicas loaded their engines in {timeout_s:g} s")
        try:
            info = handle.describe.remote().result(timeout_s=min(left_s, 5.0))
        except TimeoutError:  # no replica running yet (one restarting), or its engine still loading
            continue
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, ApiError) and "failed to load" in cause.message:
                raise RuntimeError(f"a replica of {app_name}: {cause.message}; its log has the reason") from None
            raise
        except DeploymentUnavailableError:  # every replica failed its health check, or to start
            status = serve.status().applications.get(app_name)
            if status is not None and status.status in ("UNHEALTHY", "DEPLOY_FAILED"):
                messages = "; ".join(d.message for d in status.deployments.values() if d.message)
                raise RuntimeError(f"the replicas of {app_name} failed to start: {messages or status.status}; "
                                   "their logs have the reason") from None
            time.sleep(0.5)
            continue
        seen[info["replica"]] = info
    return list(seen.values())


def build_app(model: str | None = None, runtime: str = "onnx", device: str = "cpu", precision: str = "auto",
              replicas: int = 1, autoscale: tuple[int, int] | Autoscaling | None = None, threads: int | None = None,
              replica_cpus: float = 1.0, affinity: bool = True, settings: ServeSettings | None = None,
              imbalance_requests: int | None = None, batching: str = "off", exact_new_tokens: int | None = None,
              rerank_workers: int | None = None, engine_process: str | None = None):
    """The application: `serve.run(build_app(...), route_prefix=...)` starts it.
    autoscale (min, max), or an Autoscaling, replaces a fixed replica count; on CUDA each
    replica takes a GPU. batching "on": each replica runs its requests together (Engine's
    batch scheduler). exact_new_tokens (benchmarks only): every keystroke
    decodes exactly that many tokens (Engine.exact_new_tokens, keystroke reuse off).
    rerank_workers: each replica's rerank processes (None: the Engine's default, a few
    with batching, none without). engine_process "on": each replica's engine runs in a
    child process of its own (None: on with batching, off without; see EngineReplica)."""
    resources = {"num_cpus": 1, "num_gpus": 1} if device == "cuda" else {"num_cpus": replica_cpus}
    settings = settings or ServeSettings()
    options: dict[str, Any] = {
        "ray_actor_options": resources,
        # a replica that goes away (scaled down, or an update) first answers what it holds:
        # every request it accepted ends within the request timeout, so wait that long
        "graceful_shutdown_timeout_s": settings.request_timeout_s + GRACEFUL_SHUTDOWN_MARGIN_S}
    if autoscale is not None:
        if not isinstance(autoscale, Autoscaling):
            autoscale = Autoscaling(*autoscale, target_ongoing_requests=default_target_ongoing_requests(batching))
        with warnings.catch_warnings():  # metrics_interval_s: see Autoscaling
            warnings.simplefilter("ignore", DeprecationWarning)
            deployment = Gateway.options(autoscaling_config=autoscale.ray_config())
        most_replicas = autoscale.max_replicas
    else:
        deployment = Gateway
        options["num_replicas"] = replicas
        most_replicas = replicas
    if affinity:
        kwargs = {} if imbalance_requests is None else {"imbalance_requests": imbalance_requests}
        options["request_router_config"] = RequestRouterConfig(
            request_router_class="codecomplete.serve.router:SessionAffinityRouter", request_router_kwargs=kwargs)
    settings = dataclasses.replace(settings, hand_on=affinity and most_replicas > 1)
    engine_options = {name: value for name, value in (("exact_new_tokens", exact_new_tokens),
                                                       ("rerank_workers", rerank_workers),
                                                       ("engine_process", engine_process)) if value is not None}
    return deployment.options(**options).bind((model, runtime, device, precision, threads, batching), settings,
                                              engine_options or None)
