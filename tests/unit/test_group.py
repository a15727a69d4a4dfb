"""The Ray-free parts of services/group.py and services/follower.py: the host's forwarding, a worker's
catch-up before serving, and the one object-store resync per broadcast version.
"""

from __future__ import annotations

import os

import pytest

from services.follower import WeightFollower, catch_up
from services.group import WorkerHost
from services.receiver import WeightReceivingPool
from trainer.core.weights import StaleWeights, WeightsHandle


class Follower:
    def __init__(self, version: int = 0):
        self.version = version
        self.received: list[int] = []
        self.stopped = False

    def held_version(self) -> int:
        return self.version

    def receive(self, handle: WeightsHandle) -> int:
        self.received.append(handle.version)
        self.version = handle.version
        return self.version

    def join_weight_group(self, *args) -> list[int]:
        return [os.getpid()]

    def describe(self) -> dict:
        return {"weight_group_ranks": 2}

    def shutdown(self) -> None:
        self.stopped = True

    def _secret(self) -> str:
        return "no"


def handle(version: int, transport: str = "object_store") -> WeightsHandle:
    return WeightsHandle(version=version, transport=transport, num_tensors=1, num_bytes=1, digest="")


def test_the_host_builds_its_worker_and_forwards_only_public_methods():
    host = WorkerHost(Follower, {"version": 3}, {"PAPO_TEST_HOST_ENV": "1"})
    assert os.environ.pop("PAPO_TEST_HOST_ENV") == "1"
    assert host.ready() == {"pid": os.getpid(), "weight_group_ranks": 2}
    assert host.call("held_version") == 3 and host.call("receive", handle(4)) == 4
    with pytest.raises(AttributeError, match="private"):
        host.call("_secret")
    assert host.shutdown() is True and host.worker.stopped
    assert isinstance(host.worker, WeightFollower)


def test_a_worker_catches_up_before_serving_except_from_a_broadcast():
    worker = Follower(version=0)
    catch_up(worker, None)
    catch_up(worker, handle(0))
    assert worker.received == []
    catch_up(worker, handle(2))
    assert worker.received == [2] and worker.version == 2
    with pytest.raises(StaleWeights) as info:
        catch_up(worker, handle(3, "gloo"))
    assert (info.value.held, info.value.wanted) == (2, 3)
    catch_up(worker, handle(2, "gloo"))  # the version held: nothing to do


def test_resync_publishes_a_broadcast_version_by_the_object_store_once():
    pool = WeightReceivingPool(group=None, role="perception")  # type: ignore[arg-type]
    assert pool.resync_handle() is None and pool.current_version() == 0
    pool.current_handle = handle(1)
    assert pool.resync_handle() is pool.current_handle  # not a broadcast: itself
    pool.current_handle = handle(2, "gloo")
    with pytest.raises(RuntimeError, match="fallback_publish"):
        pool.resync_handle()
    published: list[int] = []
    pool.fallback_publish = lambda v: published.append(v) or handle(v)
    first = pool.resync_handle()
    assert first.transport == "object_store" and first.version == 2
    assert pool.resync_handle() is first and published == [2]
    pool.current_handle = handle(3, "gloo")
    assert pool.resync_handle().version == 3 and published == [2, 3]
    assert pool.current_version() == 3
