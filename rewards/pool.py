"""Robust grading: a pool of worker processes with a per-item timeout and a per-request deadline.

Why processes: math-verify's timeout is ``signal.alarm``, which only works in a process's main
thread (in server threads or Ray actors it raises or is skipped) and cannot interrupt C-level
big-integer work such as ``\\boxed{9^{9^{9}}}``, which then hangs a grader for minutes. The only
reliable bound is a separate process that is killed. So:

- each worker process grades items one after another (`rewards.registry.score`) in its main
  thread, with math-verify's own timeout off;
- one dispatcher thread in the owning process hands out items (the one a worker grades plus
  at most one small item queued behind it, so a worker never waits for the dispatcher and the
  dispatcher never blocks on a full pipe), collects results and watches the clock: an item
  running longer than ``timeout_s`` gets ``error="timeout"``, its worker is killed and
  replaced, and the worker's other queued items go back to the front of the queue;
- a worker that dies (segfault, ``os._exit``, OOM kill) fails only the item it was grading
  (``error="worker_crashed"``) and is replaced; an exception inside a reward function fails
  only that item (``error=<exception type name>``);
- a batch whose deadline passes returns at once, its unfinished items with
  ``error="deadline"``.

Every failed item scores 0 *and* carries its error; `GradingPool.stats` counts them, so no zero
is silent. Workers are forked by a zygote process (`rewards._zygote`) that has math-verify
imported and warmed, so a replacement is ready in milliseconds, and nothing is ever forked from
the (threaded) server process itself.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from rewards import registry
from rewards.functions import DEFAULT_FORMAT_WEIGHT, math_reward

__all__ = ["GradingPool", "PoolClosed", "error_score"]

log = logging.getLogger(__name__)

TIMEOUT = "timeout"
WORKER_CRASHED = "worker_crashed"
DEADLINE = "deadline"
SHUTDOWN = "shutdown"
# A worker that has not said "ready" by then is killed and replaced.
_STARTUP_TIMEOUT_S = 60.0
# Only an item this small (upper bound of its pickled size) is queued behind a busy worker's
# current one: it always fits the pipe's buffer, so the dispatcher's send never blocks on a
# worker stuck in a computation (which only the dispatcher itself could kill).
_QUEUE_BEHIND_MAX_BYTES = 32 * 1024
_SPAWN_BACKOFF_S = 5.0


class PoolClosed(RuntimeError):
    """The pool was closed; it grades nothing more."""


def error_score(error: str) -> dict[str, Any]:
    """The score of an item that could not be graded: 0 everywhere, with the reason."""
    return {"overall": 0.0, "accuracy": 0.0, "format": 0.0, "error": error}


# --------------------------------------------------------------------------------------------
# Worker process side (runs in processes forked by rewards._zygote).


# One of each kind of answer the parser meets: latex2sympy's ANTLR parser caches its decisions
# per process, so a worker forked after these parses starts with a warm cache (~20% faster on
# its first few hundred items than after a single warm-up parse).
_WARM_UP_ANSWERS = (
    r"\frac{1}{2}",
    "0.5",
    "-3",
    r"50\%",
    "[1,2)",
    "(1,2)",
    r"\{1,2\}",
    r"2\sqrt{3}",
    "x^2+1",
    r"\pi",
    r"(-\infty, 3]",
    r"5\text{ cm}",
    r"30^\circ",
    "x=3",
    r"\dfrac{3}{4}",
    "1,2",
    "12.5",
)


def warm_up() -> None:
    """Import math-verify and parse one answer of each kind (the first grades cost ~0.3 s)."""
    for answer in _WARM_UP_ANSWERS:
        math_reward(f"<think>warm-up</think> \\boxed{{{answer}}}", "7")


def worker_loop(fd: int, format_weight: float, memory_limit_mb: int | None) -> None:
    """Grade ``(task_id, name, response, ground_truth)`` messages from ``fd`` until EOF or None.

    Replies ``(task_id, score_dict, None)`` or ``(task_id, None, exception type name)``.
    """
    if memory_limit_mb:
        # An answer like 10^{10^{10}} allocates gigabytes within the timeout; cap it so it
        # fails as MemoryError in this worker instead of pressuring the whole node.
        limit = int(memory_limit_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    conn = Connection(fd)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        task_id, name, response, ground_truth = msg
        try:
            result = registry.score(name, response, ground_truth, format_weight=format_weight)
            reply = (task_id, result, None)
        except BaseException as exc:  # noqa: BLE001 - any failure is that item's error, by design
            reply = (task_id, None, type(exc).__name__)
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return


# --------------------------------------------------------------------------------------------
# Owner side.


@dataclass(eq=False)
class _Batch:
    results: list[dict[str, Any] | None]
    remaining: int
    future: Future
    deadline: float | None
    done: bool = False


@dataclass(eq=False)
class _Task:
    batch: _Batch
    index: int
    name: str
    response: str
    ground_truth: str


@dataclass(eq=False)
class _Worker:
    pid: int
    conn: Connection
    started: float
    ready: bool = False
    outstanding: collections.deque = field(default_factory=collections.deque)  # (task_id, _Task)
    item_started: float = 0.0

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # already gone (the zygote reaps its children)
        self.conn.close()


class _Zygote:
    """Owner-side handle of `rewards._zygote`: starts it and asks it for workers."""

    def __init__(self, config: dict[str, Any], start_timeout_s: float = _STARTUP_TIMEOUT_S) -> None:
        self.sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        # The zygote must import this very copy of `rewards`, wherever the owner found it.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rewards._zygote", str(theirs.fileno()), json.dumps(config)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self.sock.settimeout(start_timeout_s)
        try:
            ready = self.sock.recv(16)
        except OSError:
            ready = b""
        if ready != b"R":
            self.close()
            raise RuntimeError(f"the grading zygote did not start (exit code {self.proc.poll()}); see its stderr above")
        self.sock.settimeout(10.0)

    def spawn(self) -> _Worker:
        self.sock.sendall(b"S")
        msg, fds, _, _ = socket.recv_fds(self.sock, 16, 1)
        if len(msg) != 4 or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise RuntimeError("the grading zygote is gone")
        (pid,) = struct.unpack("!i", msg)
        return _Worker(pid=pid, conn=Connection(fds[0]), started=time.monotonic())

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.sock.close()  # the zygote exits on EOF; its workers die with it (PR_SET_PDEATHSIG)
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait(5.0)


def _abs_spec(spec: str) -> str:
    """``path.py:fn`` with an absolute path, so the zygote resolves it whatever its cwd."""
    path, _, attr = spec.rpartition(":")
    return f"{os.path.abspath(os.path.expanduser(path))}:{attr}"


class GradingPool:
    """Grade batches of ``(response, ground_truth)`` in ``workers`` processes.

    Args:
        workers: grading processes (each grades one item at a time).
        timeout_s: per-item limit; an item over it scores 0 with ``error="timeout"``.
        format_weight: ``w`` in ``overall = (1 - w) * accuracy + w * format``.
        fn: the configured reward function; when it is a ``path/to/file.py:fn`` spec it is
            registered (in this process and in every worker).
        user_functions: more operator functions, name -> ``path/to/file.py:fn``.
        deadline_s: default per-batch deadline (None: no deadline beyond the item timeouts).
        memory_limit_mb: address-space cap per worker (None: no cap).
    """

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 5.0,
        format_weight: float = DEFAULT_FORMAT_WEIGHT,
        fn: str | None = None,
        user_functions: Mapping[str, str] | None = None,
        deadline_s: float | None = 120.0,
        memory_limit_mb: int | None = 4096,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if not 0.0 <= format_weight <= 1.0:
            raise ValueError("format_weight must be in [0, 1]")
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.format_weight = float(format_weight)
        self.deadline_s = deadline_s
        self.memory_limit_mb = memory_limit_mb
        self._fn = fn
        self._user_functions = dict(user_functions or {})
        # Load the operator's functions here first: a bad path fails now, loudly, not in workers.
        registry.register_user_functions(self._user_functions, fn)

        self._zygote_config = {
            "user_functions": {k: _abs_spec(v) for k, v in self._user_functions.items()},
            "fn": _abs_spec(fn) if fn is not None and registry.is_user_spec(fn) else fn,
            "format_weight": self.format_weight,
            "memory_limit_mb": self.memory_limit_mb,
        }
        self._zygote = _Zygote(self._zygote_config)
        self._lock = threading.Lock()
        self._incoming: list[tuple[_Batch, list[_Task]]] = []
        self._closing = False
        self._closed = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ids = itertools.count()
        self._pending: collections.deque[_Task] = collections.deque()
        self._batches: set[_Batch] = set()
        self._slots: list[_Worker | None] = [None] * self.workers
        self._spawn_retry_at = 0.0
        self._stats = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        for i in range(self.workers):
            self._slots[i] = self._spawn()
        self._thread = threading.Thread(target=self._run, name="papo-grading-dispatcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- public API

    def submit(
        self,
        reward_fn: str,
        items: Sequence[tuple[str, str]],
        deadline_s: float | None = None,
    ) -> Future[list[dict[str, Any]]]:
        """Queue a batch; the future resolves to one score dict per item, in order.

        Each dict has ``overall``, ``accuracy``, ``format`` and ``error`` (None when graded).
        Raises `rewards.registry.UnknownRewardFunction` for an unregistered name.
        """
        registry.get(reward_fn)  # unknown names fail here, before anything is queued
        future: Future = Future()
        if deadline_s is None:
            deadline_s = self.deadline_s
        batch = _Batch(
            results=[None] * len(items),
            remaining=len(items),
            future=future,
            deadline=None if deadline_s is None else time.monotonic() + deadline_s,
        )
        if not items:
            batch.done = True
            future.set_result([])
            return future
        tasks = [_Task(batch, i, reward_fn, str(r), str(g)) for i, (r, g) in enumerate(items)]
        with self._lock:
            if self._closing:
                raise PoolClosed("grading pool is closed")
            self._incoming.append((batch, tasks))
        self._wake()
        return future

    def grade(
        self,
        reward_fn: str,
        items: Sequence[tuple[str, str]],
        deadline_s: float | None = None,
    ) -> list[dict[str, Any]]:
        """Blocking `submit`."""
        return self.submit(reward_fn, items, deadline_s).result()

    def stats(self) -> dict[str, Any]:
        """Counters since start: items graded/failed by reason, worker restarts, queue length."""
        with self._lock:
            # A worker counts once it has said "ready"; a dead one leaves its slot at once.
            alive = sum(1 for w in self._slots if w is not None and w.ready)
            return {
                "workers": self.workers,
                "workers_alive": alive,
                "items": self._stats["items"],
                "items_ok": self._stats["ok"],
                "errors": dict(self._errors),
                "timeouts": self._errors.get(TIMEOUT, 0),
                "worker_crashes": self._stats["crashes"],
                "worker_restarts": self._stats["restarts"],
                "zygote_restarts": self._stats["zygote_restarts"],
                "pending": len(self._pending) + sum(len(t) for _, t in self._incoming),
                "running": not self._closing and self._thread.is_alive(),
            }

    def healthy(self) -> bool:
        """The dispatcher runs (workers are replaced as they die, so it is the one that matters)."""
        return not self._closing and self._thread.is_alive()

    def worker_pids(self) -> list[int]:
        with self._lock:
            return [w.pid for w in self._slots if w is not None]

    def close(self, timeout: float = 5.0) -> None:
        """Stop the dispatcher and the workers; unfinished batches resolve with ``error="shutdown"``."""
        with self._lock:
            if self._closing:
                already = True
            else:
                already = False
                self._closing = True
        if not already:
            self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():  # pragma: no cover - only if the dispatcher itself hangs
            log.error("grading dispatcher did not stop within %.1f s", timeout)

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the real API
        try:
            if not self._closing:
                self.close(timeout=1.0)
        except Exception:
            pass

    # ---------------------------------------------------------------- dispatcher

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # the socket already holds a wake-up byte (or the pool is gone)

    def _spawn(self) -> _Worker:
        if not self._zygote.alive():
            log.error("the grading zygote died (exit code %s); starting a new one", self._zygote.proc.poll())
            self._zygote.close()
            self._zygote = _Zygote(self._zygote_config)
            self._stats["zygote_restarts"] += 1
        return self._zygote.spawn()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:  # pragma: no cover - a bug here must not hang callers forever
            log.exception("grading dispatcher failed")
        finally:
            self._shutdown()

    def _loop(self) -> None:
        while True:
            with self._lock:
                incoming, self._incoming = self._incoming, []
                closing = self._closing
            for batch, tasks in incoming:
                self._batches.add(batch)
                self._pending.extend(tasks)
            if closing:
                return
            self._respawn_missing()
            self._expire(time.monotonic())
            self._assign()
            waitables: list[Any] = [self._wake_r]
            waitables += [w.conn for w in self._slots if w is not None]
            ready = wait(waitables, self._next_wakeup(time.monotonic()))
            for obj in ready:
                if obj is self._wake_r:
                    self._drain_wake()
            for i, w in enumerate(self._slots):
                if w is None:
                    continue
                if w.conn in ready:
                    self._read(i, w)
            self._check_timeouts(time.monotonic())

    def _drain_wake(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _respawn_missing(self) -> None:
        if time.monotonic() < self._spawn_retry_at:
            return
        for i, w in enumerate(self._slots):
            if w is None:
                try:
                    self._slots[i] = self._spawn()
                    self._stats["restarts"] += 1
                except Exception:  # pragma: no cover - e.g. out of processes or memory
                    # Back off: starting a zygote blocks this loop (timeouts, deadlines) for up
                    # to a minute, so do not try again at once.
                    log.exception("could not start a grading worker; retrying in %.0f s", _SPAWN_BACKOFF_S)
                    self._spawn_retry_at = time.monotonic() + _SPAWN_BACKOFF_S
                    return

    def _next_wakeup(self, now: float) -> float | None:
        times = []
        for w in self._slots:
            if w is None:
                times.append(max(now + 0.05, self._spawn_retry_at))  # retry a failed spawn
            elif not w.ready:
                times.append(w.started + _STARTUP_TIMEOUT_S)
            elif w.outstanding:
                times.append(w.item_started + self.timeout_s)
        times += [b.deadline for b in self._batches if b.deadline is not None and not b.done]
        if not times:
            return None
        return max(0.0, min(times) - now) + 0.001

    def _assign(self) -> None:
        for w in self._slots:
            if w is None or not w.ready:
                continue
            while len(w.outstanding) < 2 and self._pending:
                task = self._pending[0]
                if task.batch.done or task.batch.future.cancelled():
                    self._pending.popleft()
                    continue
                size_bound = 4 * (len(task.response) + len(task.ground_truth) + len(task.name)) + 256
                if w.outstanding and size_bound > _QUEUE_BEHIND_MAX_BYTES:
                    break  # a large item waits until this worker is idle
                task_id = next(self._ids)
                try:
                    w.conn.send((task_id, task.name, task.response, task.ground_truth))
                except (OSError, EOFError, ValueError):
                    break  # the worker is gone; _read notices and replaces it
                self._pending.popleft()
                if not w.outstanding:
                    w.item_started = time.monotonic()
                w.outstanding.append((task_id, task))

    def _read(self, slot: int, w: _Worker) -> None:
        """Take every reply the worker has sent; replace it if it has died."""
        dead = False
        try:
            while w.conn.poll():
                msg = w.conn.recv()
                if msg[0] == "ready":
                    w.ready = True
                    continue
                task_id, result, error = msg
                if not w.outstanding or w.outstanding[0][0] != task_id:  # pragma: no cover
                    log.error("grading worker replied out of order; replacing it")
                    dead = True
                    break
                _, task = w.outstanding.popleft()
                w.item_started = time.monotonic()
                if error is None:
                    self._finish(task, dict(result, error=None))
                else:
                    self._finish(task, error_score(error))
        except (EOFError, OSError):
            dead = True  # the worker's end closed: it exited or was killed
        if dead:
            self._replace(slot, w, WORKER_CRASHED)

    def _replace(self, slot: int, w: _Worker, reason: str) -> None:
        """Kill ``w``; its current item fails with ``reason``, its queued items go back."""
        w.kill()
        if reason == WORKER_CRASHED:
            self._stats["crashes"] += 1
            log.warning("grading worker %s died (%s)", w.pid, "while grading an item" if w.outstanding else "idle")
        current = w.outstanding.popleft()[1] if w.outstanding else None
        for _, task in reversed(w.outstanding):
            self._pending.appendleft(task)
        self._slots[slot] = None
        # Start the replacement before the failed item's batch can resolve, so a caller that
        # reads stats() after its result sees the restart counted.
        if not self._closing:
            self._respawn_missing()
        if current is not None:
            self._finish(current, error_score(reason))

    def _check_timeouts(self, now: float) -> None:
        for i, w in enumerate(self._slots):
            if w is None:
                continue
            if not w.ready and now - w.started > _STARTUP_TIMEOUT_S:
                log.error("grading worker %s did not start in %.0f s; replacing it", w.pid, _STARTUP_TIMEOUT_S)
                self._replace(i, w, WORKER_CRASHED)
            elif w.outstanding and now - w.item_started > self.timeout_s:
                self._read(i, w)  # a result may have arrived just now
                w = self._slots[i]
                if w is not None and w.outstanding and time.monotonic() - w.item_started > self.timeout_s:
                    log.warning("grading item exceeded %.1f s; killing worker %s", self.timeout_s, w.pid)
                    self._replace(i, w, TIMEOUT)

    def _expire(self, now: float) -> None:
        for batch in list(self._batches):
            if batch.done:
                self._batches.discard(batch)
            elif batch.future.cancelled():
                batch.done = True
                self._batches.discard(batch)
            elif batch.deadline is not None and now >= batch.deadline:
                self._complete(batch, DEADLINE)

    def _complete(self, batch: _Batch, reason: str) -> None:
        """Resolve ``batch`` now, its ungraded items failing with ``reason``."""
        for i, r in enumerate(batch.results):
            if r is None:
                batch.results[i] = error_score(reason)
                self._count(batch.results[i])
        batch.remaining = 0
        batch.done = True
        self._batches.discard(batch)
        if not batch.future.done():
            batch.future.set_result(batch.results)

    def _count(self, result: dict[str, Any]) -> None:
        with self._lock:
            self._stats["items"] += 1
            if result["error"] is None:
                self._stats["ok"] += 1
            else:
                self._errors[result["error"]] += 1

    def _finish(self, task: _Task, result: dict[str, Any]) -> None:
        batch = task.batch
        if batch.done:
            return  # the batch already returned (deadline or cancelled); this result is late
        self._count(result)
        batch.results[task.index] = result
        batch.remaining -= 1
        if batch.remaining == 0:
            batch.done = True
            self._batches.discard(batch)
            if not batch.future.done():
                try:
                    batch.future.set_result(batch.results)
                except Exception:  # pragma: no cover - cancelled concurrently
                    pass

    def _shutdown(self) -> None:
        with self._lock:
            self._closing = True
            incoming, self._incoming = self._incoming, []
        for batch, _ in incoming:
            self._batches.add(batch)
        for batch in list(self._batches):
            if not batch.done:
                self._complete(batch, SHUTDOWN)
        self._pending.clear()
        for w in self._slots:
            if w is None:
                continue
            try:
                w.conn.send(None)
            except (OSError, EOFError, ValueError):
                pass
        for i, w in enumerate(self._slots):
            if w is not None:
                w.kill()
                self._slots[i] = None
        self._zygote.close()
        self._closed = True
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass
