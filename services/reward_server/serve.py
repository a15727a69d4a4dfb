"""Running the reward server app: `LocalRewardServer` (uvicorn in a thread of this process, for
tests and single-machine runs) and `start_ray_serve` / `stop_ray_serve` (a Ray Serve deployment
on the running cluster, whose replicas each build the app with their own grading pool).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from rewards import registry
from rewards.functions import DEFAULT_FORMAT_WEIGHT
from services.reward_server.api import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CHARS, DEFAULT_MAX_ITEMS
from services.reward_server.app import create_app
from services.reward_server.guard import resolve_token

__all__ = ["LocalRewardServer", "start_ray_serve", "stop_ray_serve", "bind_socket", "server_url"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket; port 0 picks a free port (read it back with getsockname)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def server_url(host: str, port: int) -> str:
    """The base URL a client on this machine reaches ``host:port`` at (wildcards: loopback)."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}"


# --------------------------------------------------------------------------------------------
# Standalone: uvicorn.


class LocalRewardServer:
    """The app under uvicorn in a background thread of this process (tests, single-machine runs).

    ``with LocalRewardServer(workers=2) as url: ...`` or ``start()`` / ``stop()``. ``port=0`` picks
    a free port; the URL is known once `start` returns (the pool is up by then).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", **app_kwargs: Any) -> None:
        self._sock = bind_socket(host, port)
        self.url = server_url(host, self._sock.getsockname()[1])
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
    from ray import serve  # lazy: Ray is heavy, and the standalone server never needs it

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
    # lazy: Ray is heavy, and the standalone server never needs it
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
    url = server_url(http.host, http.port) + route_prefix.rstrip("/")

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
    from ray import serve  # lazy: Ray is heavy, and the standalone server never needs it

    serve.delete(app_name)


def _abs_if_spec(fn: str) -> str:
    if registry.is_user_spec(fn):
        path, _, attr = fn.rpartition(":")
        return f"{os.path.abspath(os.path.expanduser(path))}:{attr}"
    return fn
