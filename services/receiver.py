"""The one :class:`~services.group.WeightReceiver` implementation, over an :class:`~services.group.ActorGroup`.

This module owns the pool half of weight sync (docs/design.md step 6) that the rollout and
perception pools share: the current handle every served call carries, joining the weight-broadcast
group with consecutive ranks, starting and finishing a receive on every worker, the versions they
hold, and the one object-store copy of a broadcast version for a worker that restarted after it.
The workers are :class:`~services.follower.WeightFollower` s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from services.group import ActorGroup, gather_sync_versions
from trainer.core.weights import BROADCAST_TRANSPORTS, WeightsHandle


class WeightReceivingPool:
    """:class:`WeightReceiver` over an :class:`ActorGroup` of :class:`~services.follower.WeightFollower` workers.

    Rollout and perception pools subclass it and add their own serving; ``current_handle`` is what
    every served call carries, so a worker that Ray restarted re-syncs before it serves.
    """

    def __init__(self, group: ActorGroup, *, role: str, initial_version: int = 0) -> None:
        self.group = group
        self.role = role
        self.initial_version = int(initial_version)
        self.current_handle: WeightsHandle | None = None
        self.fallback_publish: Callable[[int], WeightsHandle] | None = None
        #: The object-store copy of the current broadcast version, published once (see :meth:`resync_handle`).
        self.fallback_handle: WeightsHandle | None = None

    @property
    def actors(self) -> list[Any]:
        return self.group.actors

    @property
    def info(self) -> list[dict[str, Any]]:
        return self.group.info

    @property
    def pids(self) -> list[int]:
        return self.group.pids

    @property
    def resubmissions(self) -> int:
        return self.group.resubmissions

    @property
    def num_workers(self) -> int:
        return len(self.group)

    def current_version(self) -> int:
        """The version the pool serves: its current handle's, else the initial one."""
        return self.initial_version if self.current_handle is None else self.current_handle.version

    def weight_group_ranks(self) -> int:
        return sum(int(i.get("weight_group_ranks", 1)) for i in self.group.info)

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> list[Any]:
        refs, rank = [], first_rank
        for w, info in enumerate(self.group.info):
            refs.append(
                self.group.call(w, "join_weight_group", group_id, host, port, rank, world_size, backend, timeout_s)
            )
            rank += int(info.get("weight_group_ranks", 1))
        return refs

    def current_pids(self) -> list[int]:
        self.group.refresh()
        return self.group.pids

    def start_receive(self, handle: WeightsHandle) -> list[Any]:
        # Current first: a worker that dies here (or later) re-syncs to it before it next serves.
        self.current_handle = handle
        return self.group.call_all("receive", handle)

    def finish_receive(self, handle: WeightsHandle, refs: list[Any]) -> list[int]:
        versions = gather_sync_versions(refs, self.group.get_timeout_s, f"{self.role} worker")
        if any(v not in (handle.version, -1) for v in versions):
            raise RuntimeError(f"{self.role} workers report versions {versions} after syncing to {handle.version}")
        return versions

    def receive_weights(self, handle: WeightsHandle) -> list[int]:
        return self.finish_receive(handle, self.start_receive(handle))

    def versions(self) -> list[int]:
        return self.group.run_all("held_version")

    def resync_handle(self) -> WeightsHandle | None:
        """The current handle, or for a broadcast (nccl/gloo) one, the same version by the object store.

        A worker that Ray restarted after a broadcast holds the folder's weights and cannot receive
        a broadcast alone; the pool asks ``fallback_publish(version)`` (the driver's learner) once
        per version, only when that happens.
        """
        handle = self.current_handle
        if handle is None or handle.transport not in BROADCAST_TRANSPORTS:
            return handle
        if self.fallback_handle is None or self.fallback_handle.version != handle.version:
            if self.fallback_publish is None:
                raise RuntimeError(
                    f"a {self.role} worker restarted after the {handle.transport} broadcast of version "
                    f"{handle.version} and has no way to catch up: set the pool's fallback_publish"
                )
            self.fallback_handle = self.fallback_publish(handle.version)
        return self.fallback_handle

    def shutdown(self) -> None:
        self.group.shutdown()

    def __enter__(self) -> WeightReceivingPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
