"""The reward server over real HTTP on loopback: contract, bad input, robustness, concurrency,
the client's retries, the standalone CLI and the Ray Serve deployment.

One uvicorn server (in a thread of this process) serves most tests; the CLI test runs
``python -m services.reward_server.cli`` as a subprocess; the Ray Serve test deploys on the
session's ``ray_cluster`` and shuts Serve down when this module ends.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from rewards.client import RewardClient, RewardServerError
from services.reward_server.cli import cli_main
from services.reward_server.serve import LocalRewardServer

pytestmark = pytest.mark.timeout(180)

TOKEN = "test-token-123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ITEM_TIMEOUT_S = 2.0
PATHOLOGICAL = r"<think>big</think> \boxed{9^{9^{9^{9^{9}}}}}"

USER_FNS = """
import os

def flaky(response, ground_truth):
    if response == "CRASH":
        os._exit(3)
    if response == "RAISE":
        raise KeyError("boom")
    return float(response.strip() == ground_truth.strip())
"""


def T(answer_text: str) -> str:
    return f"<think>reasoning</think> The answer is {answer_text}."


@pytest.fixture(scope="module")
def user_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("user_fns") / "flaky_rewards.py"
    path.write_text(textwrap.dedent(USER_FNS))
    return str(path)


@pytest.fixture(scope="module")
def server(user_file):
    srv = LocalRewardServer(
        workers=2,
        timeout_s=ITEM_TIMEOUT_S,
        token=TOKEN,
        user_functions={"flaky": f"{user_file}:flaky"},
        max_items=300,
        max_chars=10_000,
        max_body_bytes=200_000,
    )
    url = srv.start()
    yield url
    srv.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def mixed_batch(n: int, salt: int = 0) -> tuple[list[dict], list[float]]:
    """n math items whose expected accuracy alternates irregularly (so a reordering shows)."""
    items, expected = [], []
    for i in range(n):
        value = i + 7 * salt
        correct = (i * 7 + salt) % 3 != 0
        truth = f"\\frac{{{value}}}{{2}}" if correct else str(value + 1)
        items.append({"response": T(f"\\boxed{{{value / 2}}}"), "ground_truth": truth})
        expected.append(1.0 if correct else 0.0)
    return items, expected


def check_contract(client: httpx.Client) -> None:
    """The docs/design.md contract, shared by the uvicorn and the Ray Serve deployments."""
    items, expected = mixed_batch(20)
    r = client.post("/v1/score", json={"reward_fn": "math", "items": items})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["reward_fn"] == "math"
    assert [s["accuracy"] for s in body["scores"]] == expected  # order preserved
    for s, acc in zip(body["scores"], expected):
        assert s == {"overall": pytest.approx(0.9 * acc + 0.1), "accuracy": acc, "format": 1.0, "error": None}

    prompt = "<|im_start|>user\nWhat colour is the square?<|im_end|>\n<|im_start|>assistant\n"
    r = client.post(
        "/get_reward",
        json={
            "query": [prompt + T(r"\boxed{red}"), prompt + r"\boxed{blue}", prompt + T(r"\boxed{4}")],
            "prompts": [prompt, prompt, prompt],
            "labels": ["red", "red", "4"],
            "reward_fn": "exact",
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rewards"] == pytest.approx([1.0, 0.0, 1.0])
    assert body["scores"] == [1.0, 0.0, 1.0]
    assert body["extra_logs"] == {
        "accuracy": [1.0, 0.0, 1.0],
        "format": [1.0, 0.0, 1.0],
        "grading_error": [0.0, 0.0, 0.0],
    }

    r = client.get("/v1/reward-functions")
    assert r.status_code == 200
    names = [f["name"] for f in r.json()["reward_functions"]]
    assert {"math", "choice", "exact"} <= set(names) and r.json()["default"] == "math"

    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert {"/v1/score", "/get_reward", "/healthz", "/v1/reward-functions", "/metrics"} <= set(spec["paths"])
    assert {"ScoreRequest", "ScoreResponse", "ItemScore", "OpenRLHFRequest"} <= set(spec["components"]["schemas"])

    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_contract(http: httpx.Client) -> None:
    check_contract(http)
    assert "flaky" in [f["name"] for f in http.get("/v1/reward-functions").json()["reward_functions"]]
    assert http.get("/docs").status_code == 200


def test_default_reward_fn_and_empty_batch(http: httpx.Client) -> None:
    r = http.post("/v1/score", json={"items": [{"response": T(r"\boxed{3}"), "ground_truth": "3"}]})
    assert r.status_code == 200 and r.json()["reward_fn"] == "math"
    assert r.json()["scores"][0]["accuracy"] == 1.0
    r = http.post("/v1/score", json={"reward_fn": "choice", "items": []})
    assert r.status_code == 200 and r.json() == {"scores": [], "reward_fn": "choice"}


@pytest.mark.parametrize(
    "body,status,needle",
    [
        (b'{"reward_fn": "math", "items": [', 422, "json"),  # malformed JSON
        (b'{"reward_fn": "math"}', 422, "items"),  # missing field
        (b'{"items": [{"response": "x"}]}', 422, "ground_truth"),  # missing field in an item
        (b'{"items": [{"response": 3, "ground_truth": "3"}]}', 422, "response"),  # wrong type
        (b'{"reward_fn": "nope", "items": []}', 404, "nope"),
        (json.dumps({"items": [{"response": "x", "ground_truth": "y"}] * 301}).encode(), 413, "max_items=300"),
        (json.dumps({"items": [{"response": "x" * 10_001, "ground_truth": "y"}]}).encode(), 413, "max_chars=10000"),
        (
            json.dumps({"items": [{"response": "x" * 9_000, "ground_truth": "y"}] * 25}).encode(),
            413,
            "max_body_bytes=200000",
        ),
    ],
    ids=[
        "malformed",
        "missing-items",
        "missing-ground-truth",
        "wrong-type",
        "unknown-fn",
        "too-many-items",
        "too-long-string",
        "body-too-large",
    ],
)
def test_bad_input(http: httpx.Client, body: bytes, status: int, needle: str) -> None:
    r = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.text


def test_body_limit_without_content_length(server: str) -> None:
    """The body limit counts received bytes, so a chunked upload cannot slip past it."""

    def chunks():
        yield b'{"items": ['
        for _ in range(300):
            yield json.dumps({"response": "x" * 1000, "ground_truth": "y"}).encode() + b","
        yield b'{"response": "x", "ground_truth": "y"}]}'

    r = httpx.post(server + "/v1/score", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes=200000" in r.text


def test_get_reward_bad_input(http: httpx.Client) -> None:
    r = http.post("/get_reward", json={"query": ["a", "b"], "labels": ["a"]})
    assert r.status_code == 422 and "labels" in r.text
    r = http.post("/get_reward", json={"query": ["a"]})
    assert r.status_code == 422


def test_token(server: str) -> None:
    item = {"items": [{"response": "x", "ground_truth": "y"}]}
    assert httpx.post(server + "/v1/score", json=item).status_code == 401
    r = httpx.post(server + "/v1/score", json=item, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(server + "/get_reward", json={"query": [], "labels": []}).status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.get(server + "/v1/reward-functions", headers={"Authorization": TOKEN}).status_code == 401
    # Liveness and the API description stay public.
    assert httpx.get(server + "/healthz").status_code == 200
    assert httpx.get(server + "/openapi.json").status_code == 200
    assert httpx.post(server + "/v1/score", json=item, headers=AUTH).status_code == 200


def test_pathological_item_does_not_stall_the_batch(http: httpx.Client) -> None:
    items, expected = mixed_batch(50, salt=1)
    items[17] = {"response": PATHOLOGICAL, "ground_truth": "1"}
    start = time.monotonic()
    r = http.post("/v1/score", json={"reward_fn": "math", "items": items})
    elapsed = time.monotonic() - start
    assert r.status_code == 200
    assert elapsed < ITEM_TIMEOUT_S + 2.0, elapsed
    scores = r.json()["scores"]
    assert scores[17] == {"overall": 0.0, "accuracy": 0.0, "format": 0.0, "error": "timeout"}
    others = [s for i, s in enumerate(scores) if i != 17]
    assert [s["accuracy"] for s in others] == [e for i, e in enumerate(expected) if i != 17]
    assert all(s["error"] is None for s in others)
    # Counted, not silent; the killed worker was replaced.
    metrics = http.get("/metrics").text
    assert _metric(metrics, 'papo_reward_item_timeouts_total{reward_fn="math"}') >= 1
    assert _metric(metrics, 'papo_reward_item_errors_total{error="timeout",reward_fn="math"}') >= 1
    assert _metric(metrics, "papo_reward_worker_restarts_total") >= 1
    assert _wait_workers(http, 2)


def test_worker_crash_mid_batch(http: httpx.Client) -> None:
    items = [{"response": f"v{i}", "ground_truth": f"v{i}" if i % 4 else "other"} for i in range(50)]
    items[25] = {"response": "CRASH", "ground_truth": "x"}
    items[31] = {"response": "RAISE", "ground_truth": "x"}
    start = time.monotonic()
    r = http.post("/v1/score", json={"reward_fn": "flaky", "items": items})
    assert r.status_code == 200 and time.monotonic() - start < ITEM_TIMEOUT_S + 2.0
    scores = r.json()["scores"]
    assert scores[25]["error"] == "worker_crashed" and scores[25]["overall"] == 0.0
    assert scores[31]["error"] == "KeyError" and scores[31]["overall"] == 0.0
    for i, s in enumerate(scores):
        if i not in (25, 31):
            assert s["error"] is None and s["accuracy"] == (1.0 if i % 4 else 0.0), (i, s)
    metrics = http.get("/metrics").text
    assert _metric(metrics, "papo_reward_worker_crashes_total") >= 1
    assert _metric(metrics, 'papo_reward_item_errors_total{error="worker_crashed",reward_fn="flaky"}') >= 1
    assert _wait_workers(http, 2)


def test_eight_concurrent_clients(server: str) -> None:
    def one_client(k: int) -> None:
        with RewardClient(server, token=TOKEN, timeout=60) as client:
            for rep in range(3):
                items, expected = mixed_batch(40, salt=k * 10 + rep)
                got = client.score([(it["response"], it["ground_truth"]) for it in items], reward_fn="math")
                assert [s["accuracy"] for s in got] == expected, (k, rep)
                assert all(s["error"] is None for s in got)

    with ThreadPoolExecutor(8) as ex:
        for f in [ex.submit(one_client, k) for k in range(8)]:
            f.result(timeout=120)


def test_metrics_exposition(http: httpx.Client) -> None:
    http.post("/v1/score", json={"items": [{"response": T(r"\boxed{1}"), "ground_truth": "1"}]})
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _metric(text, 'papo_reward_requests_total{endpoint="/v1/score",status="200"}') >= 1
    assert _metric(text, 'papo_reward_items_total{reward_fn="math"}') >= 1
    assert _metric(text, 'papo_reward_request_seconds_count{endpoint="/v1/score"}') >= 1
    assert _metric(text, "papo_reward_workers_alive") == 2


# ------------------------------------------------------------------------ client


def test_client_against_server(server: str) -> None:
    with RewardClient(server, token=TOKEN) as client:
        got = client.score_batch([T(r"\boxed{B}"), T(r"\boxed{C}")], ["B", "B"], reward_fn="choice")
        assert [s["accuracy"] for s in got] == [1.0, 0.0]
        got = client.score([{"response": T(r"\boxed{2}"), "ground_truth": "2"}])
        assert got[0]["accuracy"] == 1.0
        assert {"math", "choice", "exact"} <= set(client.reward_functions())
        assert client.health()["status"] == "ok"
    # 4xx is not retried: the same request cannot succeed.
    with RewardClient(server, token="wrong", retries=3, backoff_s=5.0) as client:
        start = time.monotonic()
        with pytest.raises(RewardServerError) as err:
            client.score([("x", "y")])
        assert err.value.status == 401 and err.value.attempts == 1
        assert time.monotonic() - start < 2.0
    with RewardClient(server, token=TOKEN) as client:
        with pytest.raises(RewardServerError) as err:
            client.score([("x", "y")], reward_fn="nope")
        assert err.value.status == 404 and "nope" in str(err.value)


def test_client_token_from_env(server: str, monkeypatch) -> None:
    monkeypatch.setenv("PAPO_REWARD_TOKEN", TOKEN)
    with RewardClient(server) as client:
        assert client.score([(T(r"\boxed{1}"), "1")])[0]["accuracy"] == 1.0


def test_client_gives_up_on_connection_errors() -> None:
    port = _closed_port()
    with RewardClient(f"http://127.0.0.1:{port}", retries=2, backoff_s=0.05) as client:
        with pytest.raises(RewardServerError) as err:
            client.score([("x", "y")])
    assert err.value.attempts == 3 and err.value.status is None
    assert "after 3 attempts" in str(err.value) and "ConnectError" in str(err.value)


def test_client_retries_5xx_then_succeeds_or_fails_clearly() -> None:
    calls = {"n": 0, "fail_first": 2}
    app = FastAPI()

    @app.post("/v1/score")
    async def flaky_score(body: dict) -> JSONResponse:
        calls["n"] += 1
        if calls["n"] <= calls["fail_first"]:
            return JSONResponse({"detail": "overloaded"}, status_code=503)
        return JSONResponse(
            {
                "scores": [{"overall": 1.0, "accuracy": 1.0, "format": 0.0, "error": None}] * len(body["items"]),
                "reward_fn": "math",
            }
        )

    import uvicorn

    from services.reward_server.serve import bind_socket as _bind

    sock = _bind("127.0.0.1", 0)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.01)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with RewardClient(url, retries=3, backoff_s=0.05) as client:
            assert client.score([("a", "b")])[0]["accuracy"] == 1.0
            assert calls["n"] == 3
            calls.update(n=0, fail_first=100)
            with pytest.raises(RewardServerError) as err:
                client.score([("a", "b")])
            assert err.value.status == 503 and err.value.attempts == 4 and "overloaded" in str(err.value)
            assert calls["n"] == 4
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


# ------------------------------------------------------------------------ standalone CLI


def test_cli_standalone_uses_env_token(tmp_path) -> None:
    env = dict(os.environ, PAPO_REWARD_TOKEN="env-token")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.reward_server.cli", "--port", "0", "--workers", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        line = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
        assert m, line
        url = m.group(1)
        assert _wait_healthy(url)
        assert httpx.post(url + "/v1/score", json={"items": []}).status_code == 401
        r = httpx.post(
            url + "/v1/score",
            json={"items": [{"response": T(r"\boxed{2}"), "ground_truth": "2"}]},
            headers={"Authorization": "Bearer env-token"},
        )
        assert r.status_code == 200 and r.json()["scores"][0]["accuracy"] == 1.0
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_create_app_resolves_default_fn(user_file) -> None:
    from rewards.registry import UnknownRewardFunction
    from services.reward_server.app import create_app

    # reward.fn may name a file's function directly; requests then use the function's name.
    assert create_app(fn=f"{user_file}:flaky").state.settings["fn"] == "flaky"
    with pytest.raises(UnknownRewardFunction):
        create_app(fn="no_such_reward")


def test_cli_rejects_bad_user_function(tmp_path, capsys) -> None:
    rc = cli_main(["--port", "0", "--user-function", f"x={tmp_path}/missing.py:fn"])
    assert rc == 2
    assert "missing.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["--user-function", "no-equals-sign"])


# ------------------------------------------------------------------------ Ray Serve


@pytest.fixture(scope="module")
def serve_url(ray_cluster, user_file):
    from ray import serve

    from services.reward_server.serve import start_ray_serve

    try:
        url = start_ray_serve(
            workers=1,
            replicas=1,
            num_cpus=0.25,
            token=TOKEN,
            user_functions={"flaky": f"{user_file}:flaky"},
            timeout_s=ITEM_TIMEOUT_S,
            ready_timeout_s=90,
        )
        yield url
    finally:
        # Leave the shared cluster as this module found it.
        serve.shutdown()


@pytest.mark.ray
def test_ray_serve_contract(serve_url: str) -> None:
    assert serve_url.startswith("http://127.0.0.1:") and serve_url.endswith("/papo-reward")
    with httpx.Client(base_url=serve_url, headers=AUTH, timeout=60) as client:
        check_contract(client)
        r = client.post(
            "/v1/score",
            json={
                "reward_fn": "flaky",
                "items": [{"response": "CRASH", "ground_truth": "x"}, {"response": "a", "ground_truth": "a"}],
            },
        )
        assert [s["error"] for s in r.json()["scores"]] == ["worker_crashed", None]
        assert r.json()["scores"][1]["accuracy"] == 1.0
    assert httpx.post(serve_url + "/v1/score", json={"items": []}).status_code == 401
    with RewardClient(serve_url, token=TOKEN) as client:
        assert client.score([(T(r"\boxed{0.5}"), r"\frac12")])[0]["accuracy"] == 1.0


# ------------------------------------------------------------------------ helpers


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found in:\n{text}")


def _wait_workers(client: httpx.Client, n: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/healthz").json()["workers_alive"] == n:
            return True
        time.sleep(0.05)
    return False


def _wait_healthy(url: str, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
