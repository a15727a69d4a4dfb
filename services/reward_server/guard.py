"""The ASGI guard in front of the reward server app: the bearer token (401) checked before a byte
of the body is read, the body-size limit (413) on the bytes actually received, and the request
count and latency per endpoint. Also where the token comes from (`resolve_token`).
"""

from __future__ import annotations

import hmac
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from services.reward_server.api import ENDPOINTS, PUBLIC_PATHS, TOKEN_ENV
from services.reward_server.metrics import Metrics

__all__ = ["GuardMiddleware", "resolve_token"]


def resolve_token(token: str | None) -> str | None:
    """The token argument, else ``$PAPO_REWARD_TOKEN``; an empty string means no token."""
    if token is None:
        token = os.environ.get(TOKEN_ENV)
    return token or None


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


class GuardMiddleware:
    """Pure ASGI middleware, in front of everything: checks the token before a byte of the body
    is read, enforces the body-size limit on the bytes actually received (a missing or lying
    Content-Length changes nothing), and records request count and latency per endpoint."""

    def __init__(self, app: Any, token: str | None, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.token = token
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _relative_path(scope)
        endpoint = path if path in ENDPOINTS else "other"
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
