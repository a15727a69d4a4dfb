"""Benchmark of the reward server: batch endpoint vs one request per sample vs inline grading.

Two reward functions, each on its own stream of well-formed items (GRPO-style groups: every
problem answered n=5 times, 4 of 5 answers correct; every request uses problems not seen
before, so no cache flatters a number):

- ``math``: a mix of fractions, decimals, LaTeX, percentages, negatives, intervals, sets,
  tuples and roots, written in varied but equivalent forms (about half need sympy);
- ``exact``: the demo's synthetic task (``red``, ``3``, ``left``, ``yes``): nearly free to
  grade, so its rows show the server's own overhead.

Modes, for servers with 1 and 2 grading workers:

- ``batch``: ``POST /v1/score`` with batches of 1, 64 and 1024 items;
- ``per-sample``: the one-request-per-sample pattern other trainers use: sequential with a new
  connection per request (a plain ``requests.post`` per sample, as OpenRLHF's remote reward
  call does), sequential on one keep-alive connection, and 8 keep-alive requests in flight;
- ``inline``: the same kind of items graded by ``rewards.score`` in this one process (no
  timeout protection).

For each row: items/s over the run, p50 / p99 latency of one request (of one batch for inline)
and CPU milliseconds per item (this client plus the server's process tree, read from /proc).
Wall-clock numbers depend on whatever else the machine runs; CPU per item hardly does. The
server runs as its own process (``python -m services.reward_server.cli``) so the client does not
share its interpreter. Prints a table and writes JSON (default
``bench/results/reward_server.json``).

Run: ``.venv/bin/python bench/reward_server.py [--quick]`` (about 2 min; ``--quick`` about 50 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import rewards  # noqa: E402

GROUP = 5  # responses per problem, as in a GRPO rollout


class MathItems:
    """Endless well-formed ``math`` items, never repeating a problem."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.counter = 0

    def _problem(self) -> tuple[str, list[str], str]:
        """(ground truth, a correct answer's forms, a wrong answer)."""
        self.counter += 1
        k = self.counter
        r = self.rng
        kind = k % 7
        if kind == 0:
            a, b = r.randint(10, 40), r.randint(2, 9)
            return (
                rf"\frac{{{a}}}{{{b}}}",
                [rf"\frac{{{a}}}{{{b}}}", rf"\dfrac{{{a * 2}}}{{{b * 2}}}"],
                rf"\frac{{{b}}}{{{a}}}",
            )
        if kind == 1:
            x = r.randint(1, 999) / 4
            return f"{x}", [f"{x}", rf"\frac{{{int(x * 4)}}}{{4}}"], f"{x / 10}"
        if kind == 2:
            n = r.randint(-500, -1)
            return f"{n}", [f"{n}", f"{n}.0"], f"{-n}"
        if kind == 3:
            p = r.randint(1, 99)
            return f"{p}", [rf"{p}\%", f"{p}"], f"{p + 1}"
        if kind == 4:
            a, b = sorted(r.sample(range(-20, 20), 2))
            return f"[{a},{b})", [f"[{a}, {b})"], f"[{a},{b}]"
        if kind == 5:
            a, b = sorted(r.sample(range(1, 30), 2))
            if k % 2:
                return f"({a},{b})", [f"({a}, {b})"], f"({b},{a})"  # a tuple's order matters
            return rf"\{{{a},{b}\}}", [rf"\{{{b}, {a}\}}"], rf"\{{{a},{b + 30}\}}"  # a set's does not
        s = r.randint(2, 50)
        return rf"{s}\sqrt{{2}}", [rf"{s}\sqrt{{2}}", rf"\sqrt{{{2 * s * s}}}"], rf"{s}\sqrt{{3}}"

    def items(self, n: int) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while len(out) < n:
            truth, right, wrong = self._problem()
            for j in range(GROUP):
                answer = wrong if j == GROUP - 1 else right[j % len(right)]
                reasoning = "Let me compute this carefully. " * self.rng.randint(3, 12)
                out.append((f"<think>{reasoning}</think> The final answer is \\boxed{{{answer}}}.", truth))
        return out[:n]


class ExactItems:
    """Endless ``exact`` items like the demo's: colours, counts, directions, yes/no."""

    WORDS = ("red", "green", "blue", "yellow", "left", "right", "top", "bottom", "yes", "no")

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def items(self, n: int) -> list[tuple[str, str]]:
        out = []
        for i in range(n):
            truth = self.rng.choice(self.WORDS + tuple(str(k) for k in range(10)))
            answer = truth.capitalize() if i % GROUP != GROUP - 1 else truth + "x"
            out.append((f"<think>The shape in the image is {truth}.</think> \\boxed{{{answer}}}", truth))
        return out


def start_server(workers: int) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env.pop("PAPO_REWARD_TOKEN", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.reward_server.cli",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--log-level",
            "warning",
            "--deadline-s",
            "600",
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    line = proc.stdout.readline()
    m = re.search(r"(http://\S+:\d+)", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"reward server did not start: {line!r}")
    url = m.group(1)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("reward server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds (user + system) used so far by ``root`` and its live descendants (the
    server, its grading zygote and workers), read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    total = 0.0
    for pid in cpu:
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += cpu[pid]
    return total


class CpuMeter:
    """CPU used by the benchmark client (this process) plus the server's process tree. Unlike
    wall-clock time it hardly depends on what else runs on the machine."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid

    def read(self) -> float:
        own = time.process_time()
        return own + (tree_cpu_seconds(self.server_pid) if self.server_pid else 0.0)


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def row(
    fn: str, mode: str, workers, batch: int, lats: list[float], items: int, seconds: float, errors: int, cpu_s: float
) -> dict:
    return {
        "reward_fn": fn,
        "mode": mode,
        "workers": workers,
        "batch": batch,
        "requests": len(lats),
        "items": items,
        "seconds": round(seconds, 3),
        "items_per_s": round(items / seconds, 1),
        "p50_ms": round(1000 * statistics.median(lats), 2),
        "p99_ms": round(1000 * percentile(lats, 99), 2),
        "max_ms": round(1000 * max(lats), 2),
        "cpu_ms_per_item": round(1000 * cpu_s / items, 3),
        "errors": errors,
    }


def post_batch(client: httpx.Client, fn: str, items: list[tuple[str, str]]) -> tuple[float, int]:
    body = {"reward_fn": fn, "items": [{"response": r, "ground_truth": g} for r, g in items]}
    t = time.perf_counter()
    resp = client.post("/v1/score", json=body)
    dt = time.perf_counter() - t
    resp.raise_for_status()
    scores = resp.json()["scores"]
    assert len(scores) == len(items)
    return dt, sum(1 for s in scores if s["error"] is not None)


def bench_batches(url: str, fn: str, workers: int, src, plan: dict[int, int], meter: CpuMeter) -> list[dict]:
    rows = []
    with httpx.Client(base_url=url, timeout=600) as client:
        post_batch(client, fn, src.items(64))  # warm-up: connections, first-request paths
        for batch, reqs in plan.items():
            batches = [src.items(batch) for _ in range(reqs)]
            lats, errors = [], 0
            c0, t0 = meter.read(), time.perf_counter()
            for items in batches:
                dt, err = post_batch(client, fn, items)
                lats.append(dt)
                errors += err
            seconds, cpu = time.perf_counter() - t0, meter.read() - c0
            rows.append(row(fn, "batch", workers, batch, lats, batch * reqs, seconds, errors, cpu))
    return rows


def bench_per_sample(
    url: str, fn: str, workers: int, src, n: int, concurrency: int, meter: CpuMeter, fresh: bool = False
) -> dict:
    """One request per item; ``fresh``: a new TCP connection for each."""
    items = src.items(n)
    # "Connection: close" makes each request open its own connection, as a fresh requests.post
    # does, without timing the construction of client objects.
    headers = {"Connection": "close"} if fresh else {}
    limits = httpx.Limits(max_connections=2 * concurrency, max_keepalive_connections=2 * concurrency)
    with httpx.Client(base_url=url, timeout=600, limits=limits, headers=headers) as client:
        post_batch(client, fn, src.items(1))
        c0, t0 = meter.read(), time.perf_counter()
        if concurrency == 1:
            results = [post_batch(client, fn, [it]) for it in items]
        else:
            with ThreadPoolExecutor(concurrency) as ex:
                results = list(ex.map(lambda it: post_batch(client, fn, [it]), items))
        seconds, cpu = time.perf_counter() - t0, meter.read() - c0
    mode = "per-sample new-conn" if fresh else ("per-sample" if concurrency == 1 else f"per-sample x{concurrency}")
    return row(fn, mode, workers, 1, [r[0] for r in results], n, seconds, sum(r[1] for r in results), cpu)


def bench_inline(fn: str, src, plan: dict[int, int]) -> list[dict]:
    rewards.score(fn, *src.items(1)[0])  # import and warm math-verify outside the timing
    meter = CpuMeter(None)
    rows = []
    for batch, reqs in plan.items():
        batches = [src.items(batch) for _ in range(reqs)]
        lats = []
        c0, t0 = meter.read(), time.perf_counter()
        for items in batches:
            t = time.perf_counter()
            for r, g in items:
                rewards.score(fn, r, g)
            lats.append(time.perf_counter() - t)
        seconds, cpu = time.perf_counter() - t0, meter.read() - c0
        rows.append(row(fn, "inline", "-", batch, lats, batch * reqs, seconds, 0, cpu))
    return rows


def summarise(rows: list[dict], workers: list[int], fns: list[str]) -> tuple[dict, dict]:
    """The issue's targets: batch >= 3x the per-sample pattern's items/s; p99 of a batch of 64
    under 1 s. Also the CPU each per-sample item costs relative to a batched one."""
    checks: dict = {}
    targets: dict = {}
    for fn in fns:
        for w in workers:
            mine = [r for r in rows if r["reward_fn"] == fn and r["workers"] == w]
            batch = [r for r in mine if r["mode"] == "batch"]
            # A batch of 1 is the per-sample pattern itself: the endpoint's gain is in real batches.
            best = max((r for r in batch if r["batch"] > 1), key=lambda r: r["items_per_s"])
            cpu = min(r["cpu_ms_per_item"] for r in batch if r["batch"] > 1)
            for r in mine:
                if r["mode"].startswith("per-sample"):
                    key = f"{fn}/w{w}: batch {best['batch']} vs {r['mode']}"
                    checks[key + " items/s ratio"] = round(best["items_per_s"] / r["items_per_s"], 2)
                    checks[key + " cpu/item ratio"] = round(r["cpu_ms_per_item"] / cpu, 2)
                    targets[key + " >= 3x"] = checks[key + " items/s ratio"] >= 3.0
            p99 = next(r["p99_ms"] for r in batch if r["batch"] == 64)
            checks[f"{fn}/w{w}: p99 ms, batch 64"] = p99
            targets[f"{fn}/w{w}: p99 batch 64 < 1 s"] = p99 < 1000
    return checks, targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reward-fns", nargs="+", default=["math", "exact"], choices=["math", "exact"])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_server.json"))
    args = ap.parse_args(argv)

    plan = {1: 100, 64: 20, 1024: 3} if not args.quick else {1: 40, 64: 8, 1024: 1}
    per_sample_n = 256 if not args.quick else 96
    sources = {"math": MathItems(seed=0), "exact": ExactItems(seed=0)}
    rows: list[dict] = []
    t_start = time.time()
    load_start = round(os.getloadavg()[0], 2)
    for workers in args.workers:
        proc, url = start_server(workers)
        meter = CpuMeter(proc.pid)
        try:
            for fn in args.reward_fns:
                src = sources[fn]
                rows += bench_batches(url, fn, workers, src, plan, meter)
                rows.append(bench_per_sample(url, fn, workers, src, per_sample_n, 1, meter, fresh=True))
                rows.append(bench_per_sample(url, fn, workers, src, per_sample_n, 1, meter))
                rows.append(bench_per_sample(url, fn, workers, src, per_sample_n, 8, meter))
        finally:
            stop_server(proc)
    for fn in args.reward_fns:
        rows += bench_inline(fn, sources[fn], {64: plan[64], 1024: plan[1024]})

    header = (
        f"{'fn':<7}{'mode':<21}{'workers':>7}{'batch':>6}{'reqs':>6}{'items/s':>10}{'p50 ms':>10}"
        f"{'p99 ms':>10}{'max ms':>10}{'cpu ms/item':>13}{'errors':>7}"
    )
    print(header)
    print("-" * len(header))
    for fn in args.reward_fns:
        for r in (r for r in rows if r["reward_fn"] == fn):
            print(
                f"{fn:<7}{r['mode']:<21}{r['workers']!s:>7}{r['batch']:>6}{r['requests']:>6}"
                f"{r['items_per_s']:>10.1f}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['max_ms']:>10.1f}"
                f"{r['cpu_ms_per_item']:>13.3f}{r['errors']:>7}"
            )
    checks, targets = summarise(rows, args.workers, args.reward_fns)
    load_end = round(os.getloadavg()[0], 2)
    print(f"\nload average (1 min) at start / end: {load_start} / {load_end} on {os.cpu_count()} CPUs")
    for k, v in checks.items():
        print(f"{k}: {v}")
    print("\ntargets met:")
    for k, v in targets.items():
        print(f"  {k}: {v}")

    result = {
        "benchmark": "reward_server",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            # Other work on the machine skews every wall-clock number; this says how busy it was.
            "load_average_1m_start_end": [load_start, load_end],
        },
        "plan": {"requests_per_batch_size": plan, "per_sample_items": per_sample_n, "group_size": GROUP},
        "rows": rows,
        "checks": checks,
        "targets_met": targets,
        "wall_s": round(time.time() - t_start, 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
