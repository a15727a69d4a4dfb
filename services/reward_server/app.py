"""The reward server: one FastAPI app, served standalone (uvicorn) or as a Ray Serve deployment.

This module owns the HTTP contract of docs/design.md ("Reward server HTTP API"):

- ``POST /v1/score``  ``{"reward_fn", "items": [{"response", "ground_truth"}]}`` ->
  ``{"scores": [{"overall", "accuracy", "format", "error"}], "reward_fn"}``, in order;
- ``POST /get_reward`` (OpenRLHF) ``{"query", "prompts", "labels"}`` ->
  ``{"rewards", "scores", "extra_logs"}``;
- ``GET /healthz``, ``GET /v1/reward-functions``, ``GET /metrics`` (Prometheus text),
  OpenAPI at ``/openapi.json``;
- limits (items per request, characters per string, body bytes: 413 naming the limit), a bearer
  token when configured (401), default bind 127.0.0.1.

Grading itself happens in a `rewards.pool.GradingPool` owned by the app (created at startup,
closed at shutdown): the server never grades in its own threads, where math-verify's timeout
does not work. Entry points: `create_app`, `LocalRewardServer` (uvicorn in a thread, for tests
and single-machine runs), `start_ray_serve` / `stop_ray_serve`, and `cli_main` behind
``papo reward-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards import registry
from rewards.functions import DEFAULT_FORMAT_WEIGHT
from rewards.pool import TIMEOUT, GradingPool

__all__ = [
    "ScoreItem",
    "ScoreRequest",
    "ItemScore",
    "ScoreResponse",
    "OpenRLHFRequest",
    "OpenRLHFResponse",
    "HealthResponse",
    "RewardFunctionInfo",
    "RewardFunctionsResponse",
    "ErrorResponse",
    "create_app",
    "LocalRewardServer",
    "start_ray_serve",
    "stop_ray_serve",
    "cli_main",
    "TOKEN_ENV",
]

log = logging.getLogger(__name__)

TOKEN_ENV = "PAPO_REWARD_TOKEN"
DEFAULT_MAX_ITEMS = 8192
DEFAULT_MAX_CHARS = 65536
DEFAULT_MAX_BODY_BYTES = 64 << 20
# Paths any caller may read without the token: liveness probes and the API description.
PUBLIC_PATHS = frozenset({"/healthz", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})
_ENDPOINTS = frozenset({"/v1/score", "/get_reward", "/healthz", "/v1/reward-functions", "/metrics"}) | PUBLIC_PATHS


# --------------------------------------------------------------------------------------------
# Payloads.


class ScoreItem(BaseModel):
    """One response to grade against its ground truth."""

    response: str = Field(description="the model's full response text")
    ground_truth: str = Field(description="the reference answer")


class ScoreRequest(BaseModel):
    """Body of ``POST /v1/score``."""

    reward_fn: str | None = Field(None, description="a registered reward function; default: the server's")
    items: list[ScoreItem]


class ItemScore(BaseModel):
    """The grade of one item; a failed item scores 0 with ``error`` saying why."""

    overall: float
    accuracy: float
    format: float
    error: str | None = Field(
        None, description='null when graded; "timeout", "worker_crashed", "deadline" or an exception type'
    )


class ScoreResponse(BaseModel):
    """Body of the ``POST /v1/score`` answer: one score per item, in request order."""

    scores: list[ItemScore]
    reward_fn: str


class OpenRLHFRequest(BaseModel):
    """Body of ``POST /get_reward`` as OpenRLHF's remote reward model sends it.

    ``query[i]`` is prompt + response; when ``prompts[i]`` prefixes it, the prefix is removed
    before grading. Fields OpenRLHF forks add (metadata, templates, ...) are ignored.
    """

    model_config = ConfigDict(extra="ignore")

    query: list[str]
    prompts: list[str] | None = None
    labels: list[str]
    reward_fn: str | None = Field(None, description="papo extension; default: the server's")

    @model_validator(mode="after")
    def _same_lengths(self) -> OpenRLHFRequest:
        if len(self.labels) != len(self.query):
            raise ValueError(f"labels has {len(self.labels)} entries but query has {len(self.query)}")
        if self.prompts is not None and len(self.prompts) != len(self.query):
            raise ValueError(f"prompts has {len(self.prompts)} entries but query has {len(self.query)}")
        return self


class OpenRLHFResponse(BaseModel):
    """``rewards`` = overall, ``scores`` = accuracy (what OpenRLHF filters groups on)."""

    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, list[float]]


class HealthResponse(BaseModel):
    status: str
    workers: int
    workers_alive: int
    reward_functions: list[str]
    default_reward_fn: str


class RewardFunctionInfo(BaseModel):
    name: str
    description: str


class RewardFunctionsResponse(BaseModel):
    default: str
    reward_functions: list[RewardFunctionInfo]


class ErrorResponse(BaseModel):
    detail: str


# --------------------------------------------------------------------------------------------
# Metrics.


class _PoolCollector:
    """Exports the grading pool's own counters at scrape time (they live in the pool)."""

    def __init__(self, get_pool: Callable[[], GradingPool | None]) -> None:
        self._get_pool = get_pool

    def collect(self) -> Any:
        pool = self._get_pool()
        if pool is None:
            return
        s = pool.stats()
        yield GaugeMetricFamily("papo_reward_workers", "grading worker processes configured", value=s["workers"])
        yield GaugeMetricFamily("papo_reward_workers_alive", "grading worker processes ready", value=s["workers_alive"])
        yield GaugeMetricFamily("papo_reward_pending_items", "items queued for grading", value=s["pending"])
        yield CounterMetricFamily(
            "papo_reward_worker_restarts",
            "grading workers replaced (after a timeout or crash)",
            value=s["worker_restarts"],
        )
        yield CounterMetricFamily("papo_reward_worker_crashes", "grading workers that died", value=s["worker_crashes"])


class _Metrics:
    def __init__(self, get_pool: Callable[[], GradingPool | None]) -> None:
        # One registry per app, so several apps in one process (tests) keep separate counts.
        self.registry = CollectorRegistry()
        self.requests = Counter("papo_reward_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram(
            "papo_reward_request_seconds",
            "HTTP request latency",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.items = Counter(
            "papo_reward_items", "items graded (including failed)", ["reward_fn"], registry=self.registry
        )
        self.item_errors = Counter(
            "papo_reward_item_errors",
            "items that scored 0 because grading failed, by reason",
            ["reward_fn", "error"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "papo_reward_item_timeouts",
            "items over the per-item grading timeout",
            ["reward_fn"],
            registry=self.registry,
        )
        self.registry.register(_PoolCollector(get_pool))

    def observe_items(self, reward_fn: str, results: Sequence[Mapping[str, Any]]) -> None:
        self.items.labels(reward_fn).inc(len(results))
        for r in results:
            err = r.get("error")
            if err is not None:
                self.item_errors.labels(reward_fn, err).inc()
                if err == TIMEOUT:
                    self.timeouts.labels(reward_fn).inc()


# --------------------------------------------------------------------------------------------
# Guard middleware: token, body size, request metrics.


def _relative_path(scope: Mapping[str, Any]) -> str:
    """The path inside the app (Ray Serve mounts it under a route prefix given as root_path)."""
    path = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


async def _send_json(send: Callable, status: int, detail: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _GuardMiddleware:
    """Pure ASGI middleware, in front of everything: checks the token before a byte of the body
    is read, enforces the body-size limit on the bytes actually received (a missing or lying
    Content-Length changes nothing), and records request count and latency per endpoint."""

    def __init__(self, app: Any, token: str | None, max_body_bytes: int, metrics: _Metrics) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _relative_path(scope)
        endpoint = path if path in _ENDPOINTS else "other"
        status_box = {"status": 500}
        start = time.perf_counter()

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status_box["status"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper, path)
        finally:
            self.metrics.requests.labels(endpoint, str(status_box["status"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

    async def _guarded(self, scope: dict, receive: Callable, send: Callable, path: str) -> None:
        if self.token and path not in PUBLIC_PATHS and not self._authorized(scope):
            await _send_json(send, 401, "missing or invalid bearer token", [(b"www-authenticate", b"Bearer")])
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _send_json(send, 413, self._too_large(int(declared)))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await _send_json(send, 413, self._too_large(size))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as usual

        await self.app(scope, replay, send)

    def _too_large(self, size: int) -> str:
        return f"request body of {size}+ bytes exceeds max_body_bytes={self.max_body_bytes}"

    def _authorized(self, scope: Mapping[str, Any]) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), self.token.encode())


# --------------------------------------------------------------------------------------------
# The app.


def resolve_token(token: str | None) -> str | None:
    """The token argument, else ``$PAPO_REWARD_TOKEN``; an empty string means no token."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    return token or None


def create_app(
    fn: str = "math",
    workers: int = 2,
    timeout_s: float = 5.0,
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    token: str | None = None,
    user_functions: Mapping[str, str] | None = None,
    deadline_s: float | None = 120.0,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    memory_limit_mb: int | None = 4096,
) -> FastAPI:
    """Build the reward server app. Its grading pool starts with the app (lifespan) and stops with it.

    Args:
        fn: default reward function for requests that name none (all ``/get_reward`` requests);
            a built-in name, a name in ``user_functions``, or a ``path/to/file.py:fn`` spec.
        workers: grading worker processes.
        timeout_s: per-item grading timeout (an item over it: score 0, ``error="timeout"``).
        format_weight: ``overall = (1 - w) * accuracy + w * format``.
        token: required bearer token; None reads ``$PAPO_REWARD_TOKEN``; "" disables.
        user_functions: operator functions, name -> ``path/to/file.py:fn``.
        deadline_s: per-request deadline; unfinished items then fail with ``error="deadline"``.
        max_items / max_chars / max_body_bytes: request limits (413 beyond them).
        memory_limit_mb: address-space cap per grading worker (None: none).
    """
    # Register now, in this process: a bad spec or an unknown default fails at startup.
    registry.register_user_functions(user_functions, fn)
    default_fn = registry.reward_name(fn)
    registry.get(default_fn)
    token = resolve_token(token)
    pool_holder: dict[str, GradingPool | None] = {"pool": None}
    metrics = _Metrics(lambda: pool_holder["pool"])

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Starting the pool blocks ~1 s (the zygote imports math-verify): keep the loop free.
        pool = await asyncio.to_thread(
            GradingPool,
            workers=workers,
            timeout_s=timeout_s,
            format_weight=format_weight,
            fn=fn,
            user_functions=user_functions,
            deadline_s=deadline_s,
            memory_limit_mb=memory_limit_mb,
        )
        pool_holder["pool"] = pool
        app.state.pool = pool
        try:
            yield
        finally:
            pool_holder["pool"] = None
            await asyncio.to_thread(pool.close)

    app = FastAPI(
        title="papo reward server",
        version="1",
        description=(
            "Rule-based rewards for RL on vision-language models (PAPO). Grading runs in worker "
            f"processes with a {timeout_s:g} s per-item timeout; a failed item scores 0 with `error` set."
        ),
        lifespan=lifespan,
    )
    app.state.settings = {
        "fn": default_fn,
        "workers": workers,
        "timeout_s": timeout_s,
        "format_weight": format_weight,
        "max_items": max_items,
        "max_chars": max_chars,
        "max_body_bytes": max_body_bytes,
        "deadline_s": deadline_s,
        "token_required": token is not None,
    }
    app.add_middleware(_GuardMiddleware, token=token, max_body_bytes=max_body_bytes, metrics=metrics)
    # Declares the bearer scheme in the OpenAPI document; the check itself is in the middleware.
    bearer = [Depends(HTTPBearer(auto_error=False))]
    errors = {
        401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
        404: {"model": ErrorResponse, "description": "unknown reward function"},
        413: {"model": ErrorResponse, "description": "over a request limit (named in detail)"},
    }

    def get_pool() -> GradingPool:
        pool = pool_holder["pool"]
        if pool is None or not pool.healthy():
            raise HTTPException(503, "grading pool is not running")
        return pool

    def check_name(name: str | None) -> str:
        name = name or default_fn
        try:
            registry.get(name)
        except registry.UnknownRewardFunction as exc:
            raise HTTPException(404, str(exc)) from None
        return name

    def check_limits(pairs: Sequence[tuple[str, str]], what: tuple[str, str]) -> None:
        if len(pairs) > max_items:
            raise HTTPException(413, f"{len(pairs)} items exceed max_items={max_items}")
        for i, pair in enumerate(pairs):
            for field_name, text in zip(what, pair):
                if len(text) > max_chars:
                    raise HTTPException(
                        413, f"item {i}: {field_name} has {len(text)} characters, over max_chars={max_chars}"
                    )

    async def grade(name: str, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        pool = get_pool()
        results = await asyncio.wrap_future(pool.submit(name, pairs))
        metrics.observe_items(name, results)
        return results

    @app.post("/v1/score", response_model=ScoreResponse, responses=errors, dependencies=bearer)
    async def score(req: ScoreRequest) -> ScoreResponse:
        """Grade a batch; scores come back in the order of ``items``."""
        name = check_name(req.reward_fn)
        pairs = [(it.response, it.ground_truth) for it in req.items]
        check_limits(pairs, ("response", "ground_truth"))
        results = await grade(name, pairs)
        return ScoreResponse(scores=[ItemScore(**r) for r in results], reward_fn=name)

    @app.post("/get_reward", response_model=OpenRLHFResponse, responses=errors, dependencies=bearer)
    async def get_reward(req: OpenRLHFRequest) -> OpenRLHFResponse:
        """OpenRLHF's remote reward model API (``--remote_rm_url http://host:port/get_reward``)."""
        name = check_name(req.reward_fn)
        prompts = req.prompts or [""] * len(req.query)
        responses = [q[len(p) :] if p and q.startswith(p) else q for q, p in zip(req.query, prompts)]
        pairs = list(zip(responses, req.labels))
        check_limits(list(zip(req.query, req.labels)), ("query", "label"))
        results = await grade(name, pairs)
        return OpenRLHFResponse(
            rewards=[r["overall"] for r in results],
            scores=[r["accuracy"] for r in results],
            extra_logs={
                "accuracy": [r["accuracy"] for r in results],
                "format": [r["format"] for r in results],
                "grading_error": [0.0 if r["error"] is None else 1.0 for r in results],
            },
        )

    @app.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def healthz() -> Any:
        """Liveness: the grading pool runs. Public (no token)."""
        pool = pool_holder["pool"]
        stats = pool.stats() if pool is not None else {"workers": workers, "workers_alive": 0}
        ok = pool is not None and pool.healthy()
        body = HealthResponse(
            status="ok" if ok else "unavailable",
            workers=stats["workers"],
            workers_alive=stats["workers_alive"],
            reward_functions=registry.available(),
            default_reward_fn=default_fn,
        )
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    @app.get("/v1/reward-functions", response_model=RewardFunctionsResponse, dependencies=bearer)
    async def reward_functions() -> RewardFunctionsResponse:
        """The names a request may use as ``reward_fn``."""
        return RewardFunctionsResponse(
            default=default_fn,
            reward_functions=[RewardFunctionInfo(name=n, description=d) for n, d in registry.describe().items()],
        )

    @app.get("/metrics", response_class=Response, dependencies=bearer)
    async def prometheus_metrics() -> Response:
        """Prometheus text format: requests, items, errors by reason, timeouts, latency, workers."""
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --------------------------------------------------------------------------------------------
# Standalone: uvicorn.


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free port (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


class LocalRewardServer:
    """The app under uvicorn in a background thread of this process (tests, single-machine runs).

    ``with LocalRewardServer(workers=2) as url: ...`` or ``start()`` / ``stop()``. ``port=0`` picks
    a free port; the URL is known once `start` returns (the pool is up by then).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **app_kwargs: Any) -> None:
        import uvicorn

        self._sock = _bind(host, port)
        self.url = _url(host, self._sock.getsockname()[1])
        self.app = create_app(**app_kwargs)
        config = uvicorn.Config(
            self.app, log_level=log_level, access_log=False, lifespan="on", timeout_graceful_shutdown=5
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> str:
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, name="papo-reward-server", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"reward server did not start within {timeout:.0f} s")
            time.sleep(0.02)
        return self.url

    def stop(self, timeout: float = 15.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# Ray Serve.


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_deployment(replicas: int, num_cpus: float, max_ongoing_requests: int) -> Any:
    """The Serve deployment class, built lazily so that importing this module needs no Ray."""
    from ray import serve

    @serve.deployment(
        name="RewardServer",
        num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
        max_ongoing_requests=max_ongoing_requests,
        health_check_period_s=10,
    )
    @serve.ingress()
    class RewardServer:
        """One replica: the FastAPI app of `create_app` with its own grading pool."""

        def __init__(self, app_kwargs: dict[str, Any]) -> None:
            self._app_kwargs = app_kwargs
            self._app: FastAPI | None = None

        def __serve_build_asgi_app__(self) -> FastAPI:
            self._app = create_app(**self._app_kwargs)
            return self._app

        def check_health(self) -> None:
            # Serve replaces a replica whose grading pool (dispatcher thread) has died.
            pool = getattr(self._app.state, "pool", None) if self._app is not None else None
            if pool is not None and not pool.healthy():
                raise RuntimeError("grading pool is not running")

    return RewardServer


def start_ray_serve(
    fn: str = "math",
    workers: int = 2,
    timeout_s: float = 5.0,
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    replicas: int = 1,
    token: str | None = None,
    num_cpus: float = 0.5,
    user_functions: Mapping[str, str] | None = None,
    deadline_s: float | None = 120.0,
    max_items: int = DEFAULT_MAX_ITEMS,
    max_chars: int = DEFAULT_MAX_CHARS,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    memory_limit_mb: int | None = 4096,
    host: str = "127.0.0.1",
    port: int | None = None,
    app_name: str = "papo-reward",
    route_prefix: str = "/papo-reward",
    max_ongoing_requests: int = 64,
    ready_timeout_s: float = 120.0,
) -> str:
    """Deploy the reward server on the running Ray cluster; return its base URL once it answers.

    Needs ``ray.init()`` done. If Serve is not running yet it is started with its HTTP proxy on
    ``host``:``port`` (port None: a free one); if it is, its proxy is reused. Each of ``replicas``
    replicas reserves ``num_cpus`` (fractional, so small machines do not deadlock) and runs
    ``workers`` grading processes of its own (outside Ray's CPU accounting). The token and
    user-function paths are resolved here and passed to the replicas; user files must exist at
    the same absolute path on every node.
    """
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client

    app_kwargs = dict(
        fn=_abs_if_spec(fn),
        workers=workers,
        timeout_s=timeout_s,
        format_weight=format_weight,
        token=resolve_token(token) or "",
        user_functions={k: _abs_if_spec(v) for k, v in (user_functions or {}).items()},
        deadline_s=deadline_s,
        max_items=max_items,
        max_chars=max_chars,
        max_body_bytes=max_body_bytes,
        memory_limit_mb=memory_limit_mb,
    )
    # Validate here, in the caller's process, rather than in a replica that Serve retries forever.
    registry.register_user_functions(app_kwargs["user_functions"], app_kwargs["fn"])
    registry.get(registry.reward_name(fn))

    # There is no public API for the running proxy's port; the controller client holds it.
    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        serve.start(http_options={"host": host, "port": port or _free_port(host)})
        client = _get_global_client()
    http = client.http_config
    deployment = _serve_deployment(replicas, num_cpus, max_ongoing_requests)
    serve.run(deployment.bind(app_kwargs), name=app_name, route_prefix=route_prefix, blocking=False)
    url = _url(http.host, http.port) + route_prefix.rstrip("/")

    deadline = time.monotonic() + ready_timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url + "/healthz", timeout=5.0)
            if r.status_code == 200:
                return url
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise RuntimeError(f"reward server on Ray Serve did not answer at {url} within {ready_timeout_s:.0f} s: {last}")


def stop_ray_serve(app_name: str = "papo-reward") -> None:
    """Delete the reward server application (Serve itself keeps running for other apps)."""
    from ray import serve

    serve.delete(app_name)


def _abs_if_spec(fn: str) -> str:
    if registry.is_user_spec(fn):
        path, _, attr = fn.rpartition(":")
        return f"{os.path.abspath(os.path.expanduser(path))}:{attr}"
    return fn


# --------------------------------------------------------------------------------------------
# CLI: papo reward-server.


def _user_function_arg(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not registry.is_user_spec(spec):
        raise argparse.ArgumentTypeError(f"expected NAME=path/to/file.py:fn, got {text!r}")
    return name, spec


def build_parser(prog: str = "papo reward-server") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Serve papo's rule-based rewards over HTTP (/v1/score, OpenRLHF /get_reward).",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (0: pick a free one; the URL is printed)")
    p.add_argument("--workers", type=int, default=2, help="grading worker processes (default 2)")
    p.add_argument("--token", default=None, help=f"required bearer token (default ${TOKEN_ENV}; none if unset)")
    p.add_argument("--fn", default="math", help="default reward function, a name or path/to/file.py:fn (default math)")
    p.add_argument(
        "--user-function",
        action="append",
        type=_user_function_arg,
        default=[],
        metavar="NAME=FILE.py:FN",
        help="register an operator reward function (repeatable)",
    )
    p.add_argument("--timeout-s", type=float, default=5.0, help="per-item grading timeout in seconds (default 5)")
    p.add_argument("--deadline-s", type=float, default=120.0, help="per-request deadline in seconds (default 120)")
    p.add_argument("--format-weight", type=float, default=DEFAULT_FORMAT_WEIGHT, help="w in (1-w)*acc + w*format")
    p.add_argument("--max-items", type=int, default=DEFAULT_MAX_ITEMS, help="items per request")
    p.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS, help="characters per string")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="request body size")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def cli_main(argv: list[str]) -> int:
    """``papo reward-server --host --port --workers --token ...``: serve until interrupted."""
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = resolve_token(args.token)
    if token is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without a token: anyone who can reach it can use it (set %s)", args.host, TOKEN_ENV)
    try:
        app = create_app(
            fn=args.fn,
            workers=args.workers,
            timeout_s=args.timeout_s,
            format_weight=args.format_weight,
            token=token or "",
            user_functions=dict(args.user_function),
            deadline_s=args.deadline_s,
            max_items=args.max_items,
            max_chars=args.max_chars,
            max_body_bytes=args.max_body_bytes,
        )
        sock = _bind(args.host, args.port)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        print(f"papo reward-server: {exc}", file=sys.stderr)
        return 2
    url = _url(args.host, sock.getsockname()[1])
    config = uvicorn.Config(app, log_level=args.log_level, access_log=args.log_level == "debug", lifespan="on")
    server = uvicorn.Server(config)
    print(f"papo reward-server: {url} (reward functions: {', '.join(registry.available())})", flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn has already shut down gracefully (grading pool closed) and re-raises Ctrl-C.
        pass
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
