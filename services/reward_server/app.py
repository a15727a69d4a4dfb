"""The reward server's FastAPI app (`create_app`): the endpoints of the contract in
`services.reward_server.api`, over a `rewards.pool.GradingPool` the app starts with its lifespan
and closes at shutdown. The server never grades in its own threads, where math-verify's timeout
does not work. Serving it (uvicorn, Ray Serve) is `services.reward_server.serve`'s job.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from rewards import registry
from rewards.functions import DEFAULT_FORMAT_WEIGHT
from rewards.pool import GradingPool
from services.reward_server.api import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CHARS,
    DEFAULT_MAX_ITEMS,
    ErrorResponse,
    HealthResponse,
    ItemScore,
    OpenRLHFRequest,
    OpenRLHFResponse,
    RewardFunctionInfo,
    RewardFunctionsResponse,
    ScoreRequest,
    ScoreResponse,
)
from services.reward_server.guard import GuardMiddleware, resolve_token
from services.reward_server.metrics import Metrics

__all__ = ["create_app", "RewardEndpoints"]

# The error answers the OpenAPI document declares for the grading endpoints.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid bearer token"},
    404: {"model": ErrorResponse, "description": "unknown reward function"},
    413: {"model": ErrorResponse, "description": "over a request limit (named in detail)"},
}


class RewardEndpoints:
    """The state of one app (its grading pool, limits, metrics) and its endpoint handlers.

    The handlers' names and docstrings are the OpenAPI operation ids and descriptions.
    """

    def __init__(
        self,
        default_fn: str,
        *,
        max_items: int,
        max_chars: int,
        pool_kwargs: Mapping[str, Any],
    ) -> None:
        self.default_fn = default_fn
        self.max_items = max_items
        self.max_chars = max_chars
        self.pool_kwargs = dict(pool_kwargs)
        self.pool: GradingPool | None = None
        self.metrics = Metrics(lambda: self.pool)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the grading pool with the app and close it at shutdown."""
        # Starting the pool blocks ~1 s (the zygote imports math-verify): keep the loop free.
        pool = await asyncio.to_thread(GradingPool, **self.pool_kwargs)
        self.pool = pool
        app.state.pool = pool
        try:
            yield
        finally:
            self.pool = None
            await asyncio.to_thread(pool.close)

    # ---------------------------------------------------------------- request checks

    def running_pool(self) -> GradingPool:
        pool = self.pool
        if pool is None or not pool.healthy():
            raise HTTPException(503, "grading pool is not running")
        return pool

    def check_name(self, name: str | None) -> str:
        name = name or self.default_fn
        try:
            registry.get(name)
        except registry.UnknownRewardFunction as exc:
            raise HTTPException(404, str(exc)) from None
        return name

    def check_limits(self, pairs: Sequence[tuple[str, str]], what: tuple[str, str]) -> None:
        if len(pairs) > self.max_items:
            raise HTTPException(413, f"{len(pairs)} items exceed max_items={self.max_items}")
        for i, pair in enumerate(pairs):
            for field_name, text in zip(what, pair):
                if len(text) > self.max_chars:
                    raise HTTPException(
                        413, f"item {i}: {field_name} has {len(text)} characters, over max_chars={self.max_chars}"
                    )

    async def grade(self, name: str, pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        pool = self.running_pool()
        results = await asyncio.wrap_future(pool.submit(name, pairs))
        self.metrics.observe_items(name, results)
        return results

    # ---------------------------------------------------------------- endpoints

    async def score(self, req: ScoreRequest) -> ScoreResponse:
        """Grade a batch; scores come back in the order of ``items``."""
        name = self.check_name(req.reward_fn)
        pairs = [(it.response, it.ground_truth) for it in req.items]
        self.check_limits(pairs, ("response", "ground_truth"))
        results = await self.grade(name, pairs)
        return ScoreResponse(scores=[ItemScore(**r) for r in results], reward_fn=name)

    async def get_reward(self, req: OpenRLHFRequest) -> OpenRLHFResponse:
        """OpenRLHF's remote reward model API (``--remote_rm_url http://host:port/get_reward``)."""
        name = self.check_name(req.reward_fn)
        prompts = req.prompts or [""] * len(req.query)
        responses = [q[len(p) :] if p and q.startswith(p) else q for q, p in zip(req.query, prompts)]
        pairs = list(zip(responses, req.labels))
        self.check_limits(list(zip(req.query, req.labels)), ("query", "label"))
        results = await self.grade(name, pairs)
        return OpenRLHFResponse(
            rewards=[r["overall"] for r in results],
            scores=[r["accuracy"] for r in results],
            extra_logs={
                "accuracy": [r["accuracy"] for r in results],
                "format": [r["format"] for r in results],
                "grading_error": [0.0 if r["error"] is None else 1.0 for r in results],
            },
        )

    async def healthz(self) -> Any:
        """Liveness: the grading pool runs. Public (no token)."""
        pool = self.pool
        stats = pool.stats() if pool is not None else {"workers": self.pool_kwargs["workers"], "workers_alive": 0}
        ok = pool is not None and pool.healthy()
        body = HealthResponse(
            status="ok" if ok else "unavailable",
            workers=stats["workers"],
            workers_alive=stats["workers_alive"],
            reward_functions=registry.available(),
            default_reward_fn=self.default_fn,
        )
        return body if ok else JSONResponse(body.model_dump(), status_code=503)

    async def reward_functions(self) -> RewardFunctionsResponse:
        """The names a request may use as ``reward_fn``."""
        return RewardFunctionsResponse(
            default=self.default_fn,
            reward_functions=[RewardFunctionInfo(name=n, description=d) for n, d in registry.describe().items()],
        )

    async def prometheus_metrics(self) -> Response:
        """Prometheus text format: requests, items, errors by reason, timeouts, latency, workers."""
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def add_routes(self, app: FastAPI) -> None:
        """Mount the endpoints on ``app``."""
        # Declares the bearer scheme in the OpenAPI document; the check itself is in the guard.
        bearer = [Depends(HTTPBearer(auto_error=False))]
        errors = ERROR_RESPONSES
        app.post("/v1/score", response_model=ScoreResponse, responses=errors, dependencies=bearer)(self.score)
        app.post("/get_reward", response_model=OpenRLHFResponse, responses=errors, dependencies=bearer)(self.get_reward)
        app.get("/healthz", response_model=HealthResponse, responses={503: {"model": HealthResponse}})(self.healthz)
        app.get("/v1/reward-functions", response_model=RewardFunctionsResponse, dependencies=bearer)(
            self.reward_functions
        )
        app.get("/metrics", response_class=Response, dependencies=bearer)(self.prometheus_metrics)


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
    endpoints = RewardEndpoints(
        default_fn,
        max_items=max_items,
        max_chars=max_chars,
        pool_kwargs=dict(
            workers=workers,
            timeout_s=timeout_s,
            format_weight=format_weight,
            fn=fn,
            user_functions=user_functions,
            deadline_s=deadline_s,
            memory_limit_mb=memory_limit_mb,
        ),
    )
    app = FastAPI(
        title="papo reward server",
        version="1",
        description=(
            "Rule-based rewards for RL on vision-language models (PAPO). Grading runs in worker "
            f"processes with a {timeout_s:g} s per-item timeout; a failed item scores 0 with `error` set."
        ),
        lifespan=endpoints.lifespan,
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
    app.add_middleware(GuardMiddleware, token=token, max_body_bytes=max_body_bytes, metrics=endpoints.metrics)
    endpoints.add_routes(app)
    return app
