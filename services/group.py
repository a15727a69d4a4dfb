"""The one actor-group pattern every pool is built on (docs/design.md "The pieces" and "Layout").

This module owns the Ray plumbing that the rollout pool, the perception and reference pools, the
corruption pool and the learner group share, so each role adds only what is its own:

* :class:`WorkerHost` — the one thin Ray actor: it builds a plain worker (a class that runs
  without Ray) in its own process and forwards calls to it.
* :class:`ActorGroup` — N hosts with fractional CPUs/GPUs and env vars (optionally in a placement
  group): readiness with a timeout, health, one least-loaded dispatch, ``get`` with a timeout on
  every ``ray.get``, restart of a dead actor and resubmission of its work (one retry policy,
  :meth:`ActorGroup.finish`), and an orderly shutdown.
* :class:`WeightReceiver` — the typed protocol the driver talks to for weight sync (step 6); its
  one implementation over a group is services/receiver.py.
* The fault helpers :func:`await_restart` and :func:`gather_sync_versions`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from trainer.core.weights import BroadcastFailed, StaleWeights, WeightsHandle

logger = logging.getLogger(__name__)


class StartTimeout(TimeoutError, RuntimeError):
    """A group's actors (or its placement group) were not ready within the start timeout."""


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class WorkerHost:
    """The body of every pool's Ray actor: builds ``factory(**kwargs)`` here and forwards calls to it.

    ``env`` is applied before the worker is built (the group also passes it as the actor's
    ``runtime_env``, so it holds before any library loads in the process).
    """

    def __init__(self, factory: Callable[..., Any], kwargs: Mapping[str, Any], env: Mapping[str, str]) -> None:
        os.environ.update(env)
        self.worker = factory(**kwargs)

    def ready(self) -> dict[str, Any]:
        """``pid`` and what the worker describes about itself (``describe()``, when it has one)."""
        describe = getattr(self.worker, "describe", None)
        return {"pid": os.getpid(), **(describe() if describe is not None else {})}

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``worker.<method>(*args, **kwargs)``; only public methods are reachable."""
        if method.startswith("_"):
            raise AttributeError(f"{type(self.worker).__name__}.{method} is private")
        return getattr(self.worker, method)(*args, **kwargs)

    def shutdown(self) -> bool:
        """Stop the worker's own resources (engines, shared memory) before the actor is killed."""
        stop = getattr(self.worker, "shutdown", None)
        if stop is not None:
            stop()
        return True


# ---------------------------------------------------------------------------------------------
# Fault helpers
# ---------------------------------------------------------------------------------------------


def await_restart(call: Callable[[], Any], deadline: float, what: str) -> Any:
    """Block until ``call()`` (an actor method's ``.remote()``) answers while Ray restarts the actor;
    returns its answer. Raises when the deadline passes or the actor is gone for good."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise GetTimeoutError(f"{what} did not come back before the deadline")
        try:
            return ray.get(call(), timeout=left)
        except ActorUnavailableError:
            time.sleep(0.5)
        except ActorDiedError as e:
            raise RuntimeError(f"{what} died and cannot be restarted (max_restarts reached): {e}") from e


def gather_sync_versions(refs: Sequence[Any], timeout_s: float, what: str) -> list[int]:
    """The versions the workers report after a weight sync (``receive`` refs), -1 for a worker
    that died during it (Ray restarts it and it re-syncs before it serves) or whose broadcast failed
    because another member died (it keeps its version and catches up through the object store)."""
    versions: list[int] = []
    for w, ref in enumerate(refs):
        try:
            versions.append(ray.get(ref, timeout=timeout_s))
        except RayActorError as e:
            logger.warning("%s %d died while syncing weights (%s); it re-syncs on restart", what, w, type(e).__name__)
            versions.append(-1)
        except BroadcastFailed as e:
            logger.warning("%s %d: %s; it catches up through the object store", what, w, e)
            versions.append(-1)
    return versions


# ---------------------------------------------------------------------------------------------
# The group
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """What each actor of a group asks Ray for, and how Ray treats it when it dies.

    ``max_task_retries`` stays 0 unless the calls are pure and their refs are handed on unawaited
    (the corruption pool): otherwise :meth:`ActorGroup.run` resubmits itself, with current weights.
    ``placement_group``: the actors go into one PACK placement group, one bundle each (learner ranks).
    """

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    env: Mapping[str, str] = field(default_factory=dict)
    max_restarts: int = 3
    max_task_retries: int = 0
    placement_group: bool = False

    def bundle(self) -> dict[str, float]:
        out = {"CPU": float(self.num_cpus)}
        if self.num_gpus > 0:
            out["GPU"] = float(self.num_gpus)
        return out


@dataclass
class Work:
    """One call of :meth:`ActorGroup.run`: ``worker.<method>(*args, **kwargs)`` on ``actor`` (None: least loaded).

    ``label`` names it in errors ("chunk at request 8"). A method that serves with the pool's
    weights takes them as the keyword ``handle``, which a resubmission after :class:`StaleWeights`
    replaces.
    """

    method: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = "call"
    actor: int | None = None


@dataclass
class Running:
    """Work that :meth:`ActorGroup.start` submitted: the items, their unfinished calls, the resync source."""

    works: list[Work]
    pending: dict[Any, tuple[int, int, int]]  # ref -> (work index, actor, attempt)
    resync: Callable[[], WeightsHandle | None] | None = None


class ActorGroup:
    """N :class:`WorkerHost` actors of one role, each hosting ``factory(**kwargs)``.

    ``kwargs`` is one mapping for all actors or a function of the actor index (e.g. a rank). The
    constructor waits for every actor's :meth:`WorkerHost.ready` (``start_timeout_s``, default
    ``get_timeout_s``) and leaves nothing running when that fails. Every ``ray.get`` here has a
    timeout (``get_timeout_s`` unless given).
    """

    def __init__(
        self,
        name: str,
        factory: Callable[..., Any],
        kwargs: Mapping[str, Any] | Callable[[int], Mapping[str, Any]],
        *,
        num_actors: int,
        resources: Resources,
        get_timeout_s: float = 900.0,
        start_timeout_s: float | None = None,
        max_resubmits: int = 3,
        stop_workers: bool = False,
    ) -> None:
        if isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1:
            raise ValueError(f"num_workers must be an integer >= 1, got {num_actors!r}")
        self.name = name
        self.resources = resources
        self.get_timeout_s = get_timeout_s
        self.max_resubmits = max_resubmits
        #: Call each worker's ``shutdown()`` before killing its actor (engines that hold shared memory).
        self.stop_workers = stop_workers
        self.resubmissions = 0
        self.closed = False
        self.actors: list[Any] = []
        self.info: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._inflight: list[list[Any]] = [[] for _ in range(num_actors)]
        self._calls = [0] * num_actors
        self._placement_group: Any = None
        start_timeout_s = get_timeout_s if start_timeout_s is None else start_timeout_s
        kwargs_of = kwargs if callable(kwargs) else (lambda _: kwargs)
        env = dict(resources.env)
        try:
            options: list[dict[str, Any]] = [{} for _ in range(num_actors)]
            if resources.placement_group:
                self._placement_group = self._reserve(num_actors, start_timeout_s)
                for r, opts in enumerate(options):
                    opts["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                        placement_group=self._placement_group, placement_group_bundle_index=r
                    )
            host = ray.remote(WorkerHost)
            self.actors = [
                host.options(
                    num_cpus=float(resources.num_cpus),
                    num_gpus=float(resources.num_gpus),
                    max_restarts=resources.max_restarts,
                    max_task_retries=resources.max_task_retries,
                    runtime_env={"env_vars": env} if env else None,
                    **options[i],
                ).remote(factory, dict(kwargs_of(i)), env)
                for i in range(num_actors)
            ]
            try:
                self.info = ray.get([a.ready.remote() for a in self.actors], timeout=start_timeout_s)
            except GetTimeoutError:
                raise StartTimeout(
                    f"{name}: {num_actors} actors with num_cpus={resources.num_cpus} num_gpus={resources.num_gpus} "
                    f"did not start within {start_timeout_s:.0f} s; the cluster may lack free resources "
                    f"(available: {ray.available_resources()})"
                ) from None
        except BaseException:
            self.shutdown()
            raise

    def _reserve(self, n: int, timeout_s: float) -> Any:
        bundle = self.resources.bundle()
        pg = placement_group([dict(bundle) for _ in range(n)], strategy="PACK")
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(pg)
            raise StartTimeout(
                f"{self.name}: placement group of {n} x {bundle} not ready within {timeout_s:.0f} s "
                f"(available: {ray.available_resources()})"
            ) from None
        return pg

    # ---- facts -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.actors)

    @property
    def pids(self) -> list[int]:
        """The actors' processes at the last readiness answer (:meth:`refresh`, a restart)."""
        return [int(i["pid"]) for i in self.info]

    @property
    def calls_per_actor(self) -> list[int]:
        """Calls dispatched by :meth:`submit` (work, resubmissions included) to each actor."""
        return list(self._calls)

    def refresh(self) -> list[dict[str, Any]]:
        """Every actor's readiness answer now (a restarted actor reports its new pid)."""
        self.info = self.get([a.ready.remote() for a in self.actors])
        return self.info

    def health(self, timeout_s: float | None = None) -> list[bool]:
        """Whether each actor answers :meth:`WorkerHost.ready` within ``timeout_s`` (a restarting one does not)."""
        refs = [a.ready.remote() for a in self.actors]
        deadline = time.monotonic() + (self.get_timeout_s if timeout_s is None else timeout_s)
        alive = []
        for w, ref in enumerate(refs):
            try:
                self.info[w] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                alive.append(True)
            except (RayActorError, GetTimeoutError):
                alive.append(False)
        return alive

    # ---- calls -------------------------------------------------------------------------------

    def get(self, refs: Any, timeout_s: float | None = None) -> Any:
        """``ray.get`` with the group's timeout."""
        return ray.get(refs, timeout=self.get_timeout_s if timeout_s is None else timeout_s)

    def call(self, actor: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """Start ``worker.<method>`` on one actor, outside the load accounting (an ObjectRef)."""
        return self.actors[actor].call.remote(method, *args, **kwargs)

    def call_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Start ``worker.<method>`` on every actor (ObjectRefs, in actor order)."""
        return [self.call(w, method, *args, **kwargs) for w in range(len(self.actors))]

    def run_all(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``worker.<method>`` on every actor; the results in actor order."""
        return self.get(self.call_all(method, *args, **kwargs))

    def pick(self) -> int:
        """The least-loaded actor: fewest unfinished submitted calls, then fewest calls so far, then index."""
        with self._lock:
            for w, refs in enumerate(self._inflight):
                if refs:
                    # fetch_local=False: only ask whether a call finished, never pull its result here.
                    _, self._inflight[w] = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            return min(range(len(self.actors)), key=lambda w: (len(self._inflight[w]), self._calls[w], w))

    def submit(self, actor: int | None, method: str, *args: Any, num_returns: int = 1, **kwargs: Any) -> Any:
        """Start ``worker.<method>`` as work on ``actor`` (None: :meth:`pick`); counts toward its load.

        ``num_returns > 1`` gives a list of ObjectRefs (one per returned value).
        """
        w = self.pick() if actor is None else actor
        remote = self.actors[w].call
        if num_returns != 1:
            remote = remote.options(num_returns=num_returns)
        refs = remote.remote(method, *args, **kwargs)
        with self._lock:
            self._inflight[w].append(refs[0] if num_returns != 1 else refs)
            self._calls[w] += 1
        return refs

    def await_restart(self, actor: int, deadline: float) -> dict[str, Any]:
        """Wait for Ray to bring a dead actor back (its new readiness answer is recorded)."""
        self.info[actor] = await_restart(
            lambda: self.actors[actor].ready.remote(), deadline, f"{self.name} actor {actor}"
        )
        return self.info[actor]

    def start(self, works: Sequence[Work], *, resync: Callable[[], WeightsHandle | None] | None = None) -> Running:
        """Submit every work item (least loaded unless it names an actor); :meth:`finish` gathers them.

        ``resync`` gives the handle a resubmission after :class:`StaleWeights` carries.
        """
        if self.closed:
            raise RuntimeError(f"the {self.name} is shut down")
        running = Running(list(works), {}, resync)
        for i, work in enumerate(running.works):
            self._start(running, i, work.actor, 0, work.kwargs)
        return running

    def _start(self, running: Running, i: int, actor: int | None, attempt: int, kwargs: dict[str, Any]) -> None:
        w = self.pick() if actor is None else actor
        work = running.works[i]
        running.pending[self.submit(w, work.method, *work.args, **kwargs)] = (i, w, attempt)

    def finish(self, running: Running, timeout_s: float | None = None) -> list[Any]:
        """The results of :meth:`start`'s work in order, within one deadline (``timeout_s``, default ``get_timeout_s``).

        The one retry policy: an item whose actor died is resubmitted to that actor once Ray has
        restarted it; an item whose actor answers :class:`StaleWeights` is resubmitted to it with
        ``handle=resync()``; each item at most ``max_resubmits`` times.
        """
        timeout_s = self.get_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        works, pending = running.works, running.pending
        results: dict[int, Any] = {}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GetTimeoutError(f"{self.name}: {works[0].method} did not finish within {timeout_s:.0f} s")
            done, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            for ref in done:
                i, w, attempt = pending.pop(ref)
                work = works[i]
                try:
                    results[i] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
                except StaleWeights as e:
                    if attempt >= self.max_resubmits or running.resync is None:
                        raise
                    logger.warning(
                        "%s actor %d restarted after the last broadcast (%s); resubmitting with the weights "
                        "from the object store",
                        self.name,
                        w,
                        e,
                    )
                    self._start(running, i, w, attempt + 1, {**work.kwargs, "handle": running.resync()})
                except RayActorError as e:
                    if attempt >= self.max_resubmits:
                        raise RuntimeError(
                            f"{self.name} {work.label} failed {attempt + 1} times; last error: {e}"
                        ) from e
                    logger.warning(
                        "%s actor %d died during %s (%s); resubmitting its %s",
                        self.name,
                        w,
                        work.method,
                        type(e).__name__,
                        work.label,
                    )
                    self.resubmissions += 1
                    # Calls to an actor that Ray is restarting fail at once: wait for it to be back.
                    self.await_restart(w, deadline)
                    self._start(running, i, w, attempt + 1, work.kwargs)
        return [results[i] for i in range(len(works))]

    def run(
        self,
        works: Sequence[Work],
        *,
        timeout_s: float | None = None,
        resync: Callable[[], WeightsHandle | None] | None = None,
    ) -> list[Any]:
        """:meth:`start` then :meth:`finish`."""
        return self.finish(self.start(works, resync=resync), timeout_s)

    # ---- shutdown ----------------------------------------------------------------------------

    def shutdown(self, stop_timeout_s: float = 120.0) -> None:
        """Stop the workers (``stop_workers``), kill the actors, free the placement group (idempotent).

        Killing an engine before it stops leaks its shared memory, so with ``stop_workers`` each
        worker's ``shutdown()`` runs first; an actor that does not answer is killed anyway.
        """
        if self.closed:
            return
        self.closed = True
        stops = [a.shutdown.remote() for a in self.actors] if self.stop_workers else [None] * len(self.actors)
        for a, ref in zip(self.actors, stops):
            if ref is not None:
                try:
                    ray.get(ref, timeout=min(self.get_timeout_s, stop_timeout_s))
                except Exception as e:  # a dead actor has nothing left to stop
                    logger.warning("%s: a worker's shutdown failed (%s); killing it", self.name, type(e).__name__)
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already gone
                logger.debug("%s: kill failed: %s", self.name, e)
        if self._placement_group is not None:
            try:
                remove_placement_group(self._placement_group)
            except Exception as e:  # already removed
                logger.debug("%s: placement group removal failed: %s", self.name, e)
        self._inflight = [[] for _ in self.actors]

    def __enter__(self) -> ActorGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


# ---------------------------------------------------------------------------------------------
# Weight sync: the protocol the driver talks to
# ---------------------------------------------------------------------------------------------


@runtime_checkable
class WeightReceiver(Protocol):
    """A pool that follows the policy's weights (rollout, perception): what the driver's weight sync calls.

    ``fallback_publish(version)`` publishes a version by the object store, for a worker that
    restarted after a broadcast (nccl/gloo); the driver sets it when it forms the weight group.
    """

    fallback_publish: Callable[[int], WeightsHandle] | None

    def weight_group_ranks(self) -> int:
        """Processes of this pool that join a weight-broadcast group."""
        ...

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[Any]:
        """Start every worker's join (ObjectRefs): the learner and the other pools join at the same time."""
        ...

    def current_pids(self) -> list[int]:
        """The worker processes now (a restarted worker has a new one)."""
        ...

    def start_receive(self, handle: WeightsHandle) -> list[Any]:
        """Make ``handle`` current and start every worker's load (ObjectRefs for :meth:`finish_receive`)."""
        ...

    def finish_receive(self, handle: WeightsHandle, refs: list[Any]) -> list[int]:
        """Each worker's version after the load, -1 for one that died or whose broadcast failed."""
        ...

    def receive_weights(self, handle: WeightsHandle) -> list[int]:
        """:meth:`start_receive` then :meth:`finish_receive`."""
        ...

    def versions(self) -> list[int]:
        """The version each worker holds now."""
        ...

    def current_version(self) -> int:
        """The version the pool serves (its current handle's, else the initial one)."""
        ...

    def resync_handle(self) -> WeightsHandle | None:
        """What a restarted worker catches up with: the current handle, by the object store for a broadcast."""
        ...

    def shutdown(self) -> None: ...
