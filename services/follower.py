"""The worker half of weight sync (docs/design.md step 6), shared by every plain worker that follows the policy.

:class:`WeightFollower` is what the rollout worker and the perception scorer implement for their
pool (services/group.py drives it); :func:`catch_up` is the one check a worker runs before it
serves with the pool's current weights. No Ray here: the plain workers stay testable without it.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from trainer.core.weights import BROADCAST_TRANSPORTS, StaleWeights, WeightsHandle


@runtime_checkable
class WeightFollower(Protocol):
    """A plain worker that holds one weight version and loads published ones in place."""

    def held_version(self) -> int:
        """The weight version the worker holds now."""
        ...

    def receive(self, handle: WeightsHandle) -> int:
        """Load ``handle`` whatever its transport (fetching its blob if needed); returns the version held."""
        ...

    def join_weight_group(
        self, group_id: str, host: str, port: int, first_rank: int, world_size: int, backend: str, timeout_s: float
    ) -> Any:
        """Join the learner's nccl/gloo weight group from ``first_rank`` on (collective)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What the pool records at readiness; ``weight_group_ranks``: processes that join a weight group."""
        ...


def catch_up(worker: WeightFollower, handle: WeightsHandle | None) -> None:
    """Load the pool's current ``handle`` before serving if the worker holds another version.

    A worker that Ray restarted holds the model folder's weights; a broadcast (nccl/gloo) cannot
    reach one process alone, so that case raises :class:`StaleWeights` and the pool resubmits with
    the same version by the object store.
    """
    if handle is None or handle.version == worker.held_version():
        return
    if handle.transport in BROADCAST_TRANSPORTS:
        raise StaleWeights(worker.held_version(), handle.version)
    worker.receive(handle)
