"""ActorGroup on the session's Ray cluster with a toy worker: readiness, least-loaded dispatch, a killed
actor restarted and its work resubmitted, a stale broadcast resubmitted with the object-store copy,
timeouts on every wait, a start that cannot be scheduled, and an orderly, idempotent shutdown.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle
from ray.exceptions import GetTimeoutError, RayActorError

from services.follower import catch_up
from services.group import ActorGroup, Resources, StartTimeout, Work
from trainer.core.weights import WeightsHandle

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

# The toy worker lives in this test module: ship it by value (the Ray workers need not import tests/).
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class Toy:
    def __init__(self, marker: str = "", version: int = 0):
        self.marker = marker
        self.version = version

    def describe(self) -> dict:
        return {"version": self.version, "env": os.environ.get("PAPO_TOY")}

    def held_version(self) -> int:
        return self.version

    def receive(self, handle: WeightsHandle) -> int:
        self.version = handle.version
        return self.version

    def work(self, x: int, delay: float = 0.0, handle: WeightsHandle | None = None) -> tuple[int, int, int]:
        catch_up(self, handle)
        time.sleep(delay)
        return x * 10, os.getpid(), self.version

    def shutdown(self) -> None:
        if self.marker:
            Path(self.marker).write_text(str(os.getpid()))


def group(n: int = 1, **kwargs) -> ActorGroup:
    return ActorGroup(
        "toy pool",
        Toy,
        kwargs.pop("worker_kwargs", {}),
        num_actors=n,
        resources=Resources(num_cpus=0.1, env={"PAPO_TOY": "1"}, max_restarts=2),
        get_timeout_s=60.0,
        **kwargs,
    )


def handle(version: int, transport: str = "object_store") -> WeightsHandle:
    return WeightsHandle(version=version, transport=transport, num_tensors=1, num_bytes=1, digest="")


def test_work_runs_least_loaded_in_order_and_env_reaches_the_actor(ray_cluster):
    with group(2) as g:
        assert len(g.pids) == 2 and g.info[0] == {"pid": g.pids[0], "version": 0, "env": "1"}
        busy = g.submit(0, "work", 0, 2.0)
        assert g.pick() == 1  # actor 0 has an unfinished call
        results = g.run([Work("work", (i,)) for i in range(4)])
        assert [r[0] for r in results] == [0, 10, 20, 30]
        assert g.get(busy)[0] == 0
        assert sum(g.calls_per_actor) == 5
        assert g.health() == [True, True]
        assert g.get(g.call(0, "describe")) == {"version": 0, "env": "1"}


def test_a_killed_actor_is_restarted_and_its_work_resubmitted(ray_cluster):
    with group(1) as g:
        old_pid = g.pids[0]
        running = g.start([Work("work", (7, 3.0), label="the slow item")])
        time.sleep(0.5)
        ray_cluster.kill(g.actors[0], no_restart=False)
        (result,) = g.finish(running)
        assert result[0] == 70 and result[1] != old_pid
        assert g.resubmissions == 1 and g.pids[0] == result[1]


def test_a_stale_broadcast_is_resubmitted_with_the_object_store_copy(ray_cluster):
    with group(1) as g:
        resynced: list[int] = []

        def resync() -> WeightsHandle:
            resynced.append(1)
            return handle(4)

        (result,) = g.run([Work("work", (1,), {"handle": handle(4, "gloo")})], resync=resync)
        assert result[2] == 4 and resynced == [1]
        assert g.run_all("held_version") == [4]


def test_every_wait_has_a_timeout(ray_cluster):
    with group(1) as g:
        with pytest.raises(GetTimeoutError, match="did not finish within 1 s"):
            g.run([Work("work", (1, 5.0))], timeout_s=1.0)
        with pytest.raises(GetTimeoutError):
            g.get(g.call(0, "work", 1, 5.0), timeout_s=0.5)


def test_a_group_that_cannot_be_scheduled_fails_at_start(ray_cluster):
    with pytest.raises(StartTimeout, match="toy pool: 1 actors .* did not start within 2 s"):
        ActorGroup("toy pool", Toy, {}, num_actors=1, resources=Resources(num_cpus=64), start_timeout_s=2.0)


def test_shutdown_stops_the_workers_then_kills_the_actors(ray_cluster, tmp_path):
    marker = tmp_path / "stopped"
    g = group(1, worker_kwargs={"marker": str(marker)}, stop_workers=True)
    actor, pid = g.actors[0], g.pids[0]
    g.shutdown()
    assert marker.read_text() == str(pid)  # the worker's own shutdown ran first
    # ray.kill is asynchronous: a call sent right after it may still be served, so poll until it is gone.
    deadline = time.monotonic() + 30
    with pytest.raises(RayActorError):
        while time.monotonic() < deadline:
            ray_cluster.get(actor.ready.remote(), timeout=30)
            time.sleep(0.2)
    g.shutdown()  # idempotent
    with pytest.raises(RuntimeError, match="the toy pool is shut down"):
        g.run([Work("work", (1,))])


def test_concurrent_runs_share_the_group(ray_cluster):
    with group(2) as g:
        out: dict[int, list] = {}
        threads = [
            threading.Thread(target=lambda k=k: out.__setitem__(k, g.run([Work("work", (k, 0.2))] * 2)))
            for k in range(3)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(out) == [0, 1, 2] and all(r[0] == k * 10 for k, rs in out.items() for r in rs)
