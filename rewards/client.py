"""HTTP client for the reward server (papo's own or any server speaking its API).

Owns the trainer's side of the contract: batching a step's responses into ``POST /v1/score``,
bounded retries with exponential backoff on connection errors and 5xx answers, and a clear
`RewardServerError` once retries are spent, because the trainer must never train on rewards it
did not get. 4xx answers (bad request, unknown function, over a limit, bad token) are not
retried: sending the same request again cannot fix them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx

__all__ = ["RewardClient", "RewardServerError"]

TOKEN_ENV = "PAPO_REWARD_TOKEN"


class RewardServerError(RuntimeError):
    """The reward server could not give the scores asked for.

    ``status`` is the last HTTP status (None for a connection failure); ``attempts`` how many
    requests were made.
    """

    def __init__(self, message: str, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


Item = tuple[str, str] | Mapping[str, str]


class RewardClient:
    """Client for ``/v1/score`` and friends.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000`` (a Ray Serve URL includes its route
            prefix).
        token: bearer token; None reads ``$PAPO_REWARD_TOKEN``; "" sends none.
        timeout: seconds per HTTP request (reading a large batch's answer included).
        retries: extra attempts after the first, on connection errors and 5xx.
        backoff_s: first wait between attempts; doubles each time, capped at ``max_backoff_s``.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
    ) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        self.url = url.rstrip("/")
        if token is None:
            token = os.environ.get(TOKEN_ENV)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def score(self, items: Sequence[Item], reward_fn: str | None = None) -> list[dict[str, Any]]:
        """Grade ``items`` (``(response, ground_truth)`` pairs or dicts with those keys).

        Returns one ``{"overall", "accuracy", "format", "error"}`` per item, in order. Items the
        server could not grade come back with score 0 and ``error`` set (count them, do not drop
        them). Raises `RewardServerError` when the request itself fails.
        """
        payload_items = [
            {"response": it["response"], "ground_truth": it["ground_truth"]}
            if isinstance(it, Mapping)
            else {"response": it[0], "ground_truth": it[1]}
            for it in items
        ]
        body: dict[str, Any] = {"items": payload_items}
        if reward_fn is not None:
            body["reward_fn"] = reward_fn
        data = self._request("POST", "/v1/score", json=body)
        scores = data.get("scores")
        if not isinstance(scores, list) or len(scores) != len(payload_items):
            got = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardServerError(f"{self.url}/v1/score returned {got} scores for {len(payload_items)} items")
        return scores

    def score_batch(
        self, responses: Sequence[str], ground_truths: Sequence[str], reward_fn: str | None = None
    ) -> list[dict[str, Any]]:
        """`score` for parallel lists."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        return self.score(list(zip(responses, ground_truths)), reward_fn)

    def reward_functions(self) -> list[str]:
        """Names the server accepts as ``reward_fn``."""
        data = self._request("GET", "/v1/reward-functions")
        return [f["name"] for f in data["reward_functions"]]

    def health(self) -> dict[str, Any]:
        """``GET /healthz`` (raises `RewardServerError` unless the server is up)."""
        return self._request("GET", "/healthz")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        attempts = 0
        delay = self.backoff_s
        last_error = ""
        last_status: int | None = None
        while True:
            attempts += 1
            try:
                resp = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last_error, last_status = f"{type(exc).__name__}: {exc}", None
            else:
                if resp.status_code < 400:
                    try:
                        return resp.json()
                    except ValueError:
                        raise RewardServerError(
                            f"{method} {self.url}{path}: answer is not JSON", resp.status_code, attempts
                        ) from None
                detail = _detail(resp)
                if resp.status_code < 500:
                    raise RewardServerError(
                        f"{method} {self.url}{path} failed with HTTP {resp.status_code}: {detail}",
                        resp.status_code,
                        attempts,
                    )
                last_error, last_status = f"HTTP {resp.status_code}: {detail}", resp.status_code
            if attempts > self.retries:
                raise RewardServerError(
                    f"{method} {self.url}{path} failed after {attempts} attempts; last error: {last_error}",
                    last_status,
                    attempts,
                )
            time.sleep(delay)
            delay = min(delay * 2, self.max_backoff_s)


def _detail(resp: httpx.Response) -> str:
    try:
        data = resp.json()
        if isinstance(data, dict) and "detail" in data:
            return str(data["detail"])[:500]
    except ValueError:
        pass
    return resp.text[:500]
